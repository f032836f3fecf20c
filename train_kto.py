"""Diffusion-KTO: align a text-to-image diffusion model with per-image likes and dislikes.

Li et al., "Aligning Diffusion Models by Optimizing Human Utility", NeurIPS 2024 (arXiv 2404.04465).
Each step draws images labelled desirable or undesirable, noises them at a random timestep, and scores how
much better the trainable `policy` UNet denoises them than the frozen `ref` UNet (the implicit reward r).
The loss maximises a Kahneman-Tversky utility of beta * (r - z), pushing r up on desirable images and down
on undesirable ones, relative to a reference point z (an estimate of KL(policy || ref)).

Launch:
    python train_kto.py --tiny                                      # CPU, offline: the tiny world of tiny_world.py
    torchrun --standalone --nproc_per_node 2 train_kto.py --tiny    # the same with 2 CPU processes (gloo)
    python train_kto.py --dataset likes.csv                         # 1 GPU, SD v1-5
    torchrun --standalone --nproc_per_node 4 train_kto.py           # the paper's recipe: 4 GPUs x 2 images
Every flag: python train_kto.py --help. Outputs: <output_dir>/run.json, metrics.jsonl, checkpoint-<step>/unet.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import utils
from utils import DataError


def arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # data and model
    pretrained_model: str = arg("stable-diffusion-v1-5/stable-diffusion-v1-5", "base model: hub id or local diffusers folder; policy and ref both start from its UNet")
    dataset: str = arg("yuvalkirstain/pickapic_v2", "like/dislike data: Pick-a-Pic v2 (hub id or folder of its parquet shards), or a .csv/.jsonl/.parquet file with columns image, caption, label")
    label_policy: str = arg("won_once", utils.LABEL_POLICY_HELP)
    output_dir: str = arg("runs/kto", "folder for run.json, metrics.jsonl and checkpoint-<step>/")
    tiny: bool = arg(False, "train on the offline tiny world (tiny_world.py; built once, cached) with CPU-sized defaults; explicit flags still win")
    resolution: int = arg(512, "training image side in pixels (resize short side, center crop)")
    random_flip: bool = arg(True, "flip each image horizontally with probability 0.5 (released code; the paper is silent)")
    caption_dropout: float = arg(0.2, "probability of replacing a caption by the empty one (released code; not in the paper)")
    desirable_ratio: float = arg(0.8, "probability that a sample is drawn from the desirable set (the paper's gamma)")
    dataloader_workers: int = arg(4, "DataLoader worker processes per rank that decode images")
    # the objective
    beta: float = arg(5000.0, "scale of the implicit reward inside the utility (paper: 5000; released code default: 1000)")
    utility: str = arg("kahneman_tversky", "U in lambda_y * (1 - U(w * beta * (r - z))): kahneman_tversky | loss_averse | risk_seeking")
    reference_point: str = arg("kl_mismatched", "z: kl_mismatched (paper, KTO) | batch_mean (released code) | zero")
    lambda_d: float = arg(1.0, "loss weight lambda_D of desirable samples")
    lambda_u: float = arg(1.0, "loss weight lambda_U of undesirable samples")
    # optimisation
    train_batch_size: int = arg(2, "images per rank per step (global batch = this x number of ranks)")
    max_train_steps: int = arg(10_000, "optimizer steps")
    learning_rate: float = arg(1e-7, "peak learning rate of AdamW (weight decay 0, i.e. Adam)")
    lr_warmup_steps: int = arg(1000, "steps of linear learning-rate warm-up from 0, then constant")
    max_grad_norm: float = arg(1.0, "clip the global gradient norm to this (released code: 1.0)")
    seed: int = arg(0, "seed for everything; ranks derive their own streams from (seed, rank)")
    checkpointing_steps: int = arg(1000, "save checkpoint-<step>/ every this many steps (and at the end)")
    checkpoints_total_limit: int = arg(0, "keep only the newest this many checkpoints (0: keep all)")
    resume: str = arg("", "continue from a checkpoint-<step> folder, or 'latest' in output_dir (a fresh start if there is none)")
    max_bad_steps: int = arg(10, "stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)")
    allow_one_class: bool = arg(False, "train on data with only desirable or only undesirable samples (KTO can learn from one kind)")
    # speed and memory (README "Benchmarks"); attention is PyTorch's scaled_dot_product_attention (diffusers' default)
    mixed_precision: str = arg("auto", "autocast dtype of the UNets, frozen modules stored in it: auto (bf16 on GPUs that have it, fp16 + grad scaler on older GPUs, no on CPU) | bf16 | fp16 | no")
    gradient_checkpointing: bool = arg(False, "recompute the policy UNet's activations in the backward pass: less memory, about a third more compute")
    optimizer: str = arg("adamw", "adamw (torch, fused kernel) | adamw8bit (bitsandbytes, installed separately; 8-bit states: 2 instead of 8 bytes per parameter)")
    compile: bool = arg(False, "torch.compile the policy and reference UNets (the first steps are slow while it compiles)")
    cache_latents: bool = arg(False, "encode every image (both flips) with the VAE and every caption with the text encoder once, to disk; training then never loads them")
    cache_dir: str = arg("", "folder of the --cache_latents files (default: <output_dir>/latent_cache); reused and resumed when its settings match")
    profile: bool = arg(False, "add seconds per phase of each step (time_<phase>, CUDA-synchronised) to metrics.jsonl")


TINY = dict(  # --tiny: a CPU-sized run on the tiny world (base model and feedback built once by tiny_world.py)
    resolution=32, train_batch_size=8, max_train_steps=200, learning_rate=3e-5, lr_warmup_steps=5, beta=200.0,
    checkpointing_steps=100, dataloader_workers=0, output_dir="runs/tiny",
)
MIN_IMAGES_TO_JUDGE = 1000  # corrupt images: the 1% limit applies once this many were read
MAX_EMPTY_CAPTIONS = 0.05  # more empty captions than this in a dataset is taken for a broken caption column
CHOICES = dict(label_policy=utils.LABEL_POLICIES, utility=("kahneman_tversky", "loss_averse", "risk_seeking"),
               reference_point=("kl_mismatched", "batch_mean", "zero"), mixed_precision=("auto", "bf16", "fp16", "no"),
               optimizer=("adamw", "adamw8bit"))


def parse_config(argv=None) -> Config:
    """Flags come from Config's fields. --tiny only changes defaults: flags given explicitly always win."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        kind = dict(action=argparse.BooleanOptionalAction) if f.type == "bool" else dict(type=eval(f.type))
        parser.add_argument(f"--{f.name}", help=f.metadata["help"] + f" (default: {f.default})",
                            choices=CHOICES.get(f.name), **kind)
    given = vars(parser.parse_args(argv))
    cfg = Config()
    if given.get("tiny"):  # the tiny world's base model and feedback (tiny_world.py), built once, only if used
        import tiny_world
        cfg = dataclasses.replace(cfg, **TINY)
        if "pretrained_model" not in given:
            cfg = dataclasses.replace(cfg, pretrained_model=str(tiny_world.world_path() / "model"))
        if "dataset" not in given:
            cfg = dataclasses.replace(cfg, dataset=str(tiny_world.world_path() / "feedback"))
    return dataclasses.replace(cfg, **given)


# ----------------------------------------------------------------------------------------------------
# The objective: pure tensor functions (tests import them)

def kto_loss(policy_err, ref_err, desirable, beta, z, utility="kahneman_tversky", lambda_d=1.0, lambda_u=1.0):
    """Per-sample Diffusion-KTO loss, lambda_y * (1 - U(w * beta * (r - z))), shape [B].

    policy_err, ref_err: [B] mean squared denoising errors; desirable: bool [B]; z: scalar reference point
    in the units of r. Written with sigmoid/softplus so that beta = 5000 cannot overflow in float32.
    """
    r = ref_err - policy_err                                  # implicit reward: log pi_theta/pi_ref up to scale
    w = desirable.float() * 2 - 1                             # w(x0) = +1 desirable, -1 undesirable
    x = w * beta * (r - z)                                    # paper Eq. 8: w * (beta * log-ratio - Q_ref), Q_ref = beta * z
    if utility == "kahneman_tversky":
        one_minus_u = torch.sigmoid(-x)                       # U = sigmoid(x);            1 - U = sigmoid(-x)
    elif utility == "loss_averse":
        one_minus_u = 1 + F.softplus(-x)                      # U = log sigmoid(x);        1 - U = 1 + softplus(-x)
    elif utility == "risk_seeking":
        one_minus_u = 1 - F.softplus(x)                       # U = -log sigmoid(-x);      1 - U = 1 - softplus(x)
    else:
        raise ValueError(f"utility must be one of {', '.join(CHOICES['utility'])}; got {utility!r}")
    lambda_y = torch.where(desirable, torch.as_tensor(lambda_d, dtype=x.dtype), torch.as_tensor(lambda_u, dtype=x.dtype))
    return lambda_y * one_minus_u


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of x over all of its elements on ALL ranks (sum and count all-reduced, so unequal sizes are fine)."""
    stats = torch.stack([x.detach().float().sum(), torch.tensor(float(x.numel()), device=x.device)])
    if dist.is_initialized():
        dist.all_reduce(stats)
    return stats[0] / stats[1]


def reference_point(rewards: torch.Tensor) -> torch.Tensor:
    """z = max(0, mean of the rewards over all ranks), detached: KTO's estimate of KL(policy || ref).

    With rewards of mismatched (image, caption) pairs this is the paper's z; with the matched batch it is the
    released code's. Identical on every rank because the mean is all-reduced."""
    return global_mean(rewards).clamp(min=0).detach()


def mismatched_indices(n: int) -> torch.Tensor:
    """Sample i is paired with the caption of sample i+1 (roll by one): no sample keeps its own caption."""
    if n < 2:
        raise DataError("--reference_point kl_mismatched pairs each image with another sample's caption, so it "
                        f"needs --train_batch_size >= 2 per rank (got {n}). Raise the batch or use batch_mean.")
    return (torch.arange(n) + 1) % n


def frozen_reference(policy: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of the policy stored in `dtype`, except its normalisation layers, which keep the policy's
    exact float32 values. Autocast rounds conv/linear weights to bf16/fp16 for both models alike, but runs the
    norms with their parameters as stored: rounded norms would make ref != policy at step 0 (beta * std(r) ~ 1)."""
    ref = copy.deepcopy(policy).requires_grad_(False).eval()
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for module in ref.modules():
        if not isinstance(module, norms):
            for name, p in module.named_parameters(recurse=False):
                p.data = p.data.to(dtype)
    return ref


def denoising_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over latent elements of the squared error, per sample, in float32: shape [B]."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


class DesirableRatioSampler(torch.utils.data.Sampler):
    """Infinite stream of dataset indices: desirable with probability `ratio`, else undesirable, uniform within.

    Draw i depends only on (seed, i), so a run resumed at draw `start` continues the exact same stream."""

    def __init__(self, desirable: np.ndarray, ratio: float, seed, start: int = 0, chunk: int = 4096):
        self.d, self.u = np.flatnonzero(desirable), np.flatnonzero(~desirable)
        self.ratio = ratio if len(self.u) else 1.0
        self.ratio = self.ratio if len(self.d) else 0.0
        self.seed, self.start, self.chunk = seed, start, chunk

    def __iter__(self):
        k, offset = divmod(self.start, self.chunk)
        while True:
            rng = np.random.default_rng([*self.seed, k])
            pick_d = rng.random(self.chunk) < self.ratio
            d = self.d[rng.integers(0, max(len(self.d), 1), self.chunk)] if len(self.d) else 0
            u = self.u[rng.integers(0, max(len(self.u), 1), self.chunk)] if len(self.u) else 0
            yield from np.where(pick_d, d, u)[offset:].tolist()
            k, offset = k + 1, 0


def augment_draws(b: int, gen: torch.Generator, random_flip: bool, caption_dropout: float):
    """Bool masks [b]: flip horizontally (p = 0.5, or never) and drop the caption (p = caption_dropout)."""
    flip = torch.rand(b, generator=gen, device=gen.device) < 0.5 if random_flip else torch.zeros(b, dtype=torch.bool, device=gen.device)
    return flip, torch.rand(b, generator=gen, device=gen.device) < caption_dropout


def augment(pixels: torch.Tensor, captions: list[str], gen: torch.Generator, random_flip: bool, caption_dropout: float):
    """Random horizontal flip (p = 0.5) and caption dropout (caption -> "" with p = caption_dropout)."""
    flip, drop = augment_draws(pixels.shape[0], gen, random_flip, caption_dropout)
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    return pixels, ["" if d else c for c, d in zip(captions, drop.tolist())]


def rank_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------
# Speed: per-phase timing (--profile) and the latent cache (--cache_latents)

class Laps:
    """lap(name) adds the seconds since the previous mark to phase `name`; a no-op unless --profile."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.cuda, self.times, self.t = enabled, device.type == "cuda", {}, 0.0

    def __call__(self, name: str | None = None):  # lap() alone starts a step
        if not self.enabled:
            return
        if self.cuda:
            torch.cuda.synchronize()  # GPU work is asynchronous: wait for it, or it is billed to a later phase
        now = time.perf_counter()
        self.times = {} if name is None else {**self.times, f"time_{name}": self.times.get(f"time_{name}", 0.0) + now - self.t}
        self.t = now

    def report(self) -> dict:  # the step's phase times, and on a GPU the peak memory so far
        cuda = self.enabled and self.cuda
        return {**self.times, **({"max_memory_gb": torch.cuda.max_memory_allocated() / 2**30} if cuda else {})}


CACHE_CHUNK = 256  # images (or captions) per cache file: the unit of work shared out over ranks and of resuming


def cache_files(n_images: int, n_captions: int) -> list[str]:
    return ([f"text-{k:06d}.pt" for k in range(math.ceil(n_captions / CACHE_CHUNK))]
            + [f"latents-{k:06d}.pt" for k in range(math.ceil(n_images / CACHE_CHUNK))])


def check_cache_settings(folder: Path, settings: dict, master: bool):
    """A cache is reused only for the same model, data, resolution, flips and dtype; rank 0 records them."""
    file = folder / "settings.json"
    if file.exists() and json.loads(file.read_text()) != settings:
        raise DataError(f"--cache_dir {folder} holds a latent cache made with other settings ({file}); "
                        f"delete it or choose another --cache_dir. Wanted: {settings}")
    if master and not file.exists():
        file.write_text(json.dumps(settings, indent=2))


class CachedLatents(torch.utils.data.Dataset):
    """--cache_latents: per image the VAE posterior's mean and std [views, 4, h, w] (view 1 = flipped image)
    and its caption's text embedding, memory-mapped from <cache>/latents-*.pt and text-*.pt."""

    def __init__(self, folder: Path, desirable: torch.Tensor):
        self.desirable = desirable
        self.latents = [torch.load(f, mmap=True, weights_only=True) for f in sorted(folder.glob("latents-*.pt"))]
        text = [torch.load(f, mmap=True, weights_only=True)["emb"] for f in sorted(folder.glob("text-*.pt"))]
        self.empty_emb = text[0][0]  # caption 0 is "" (caption dropout)
        self.text = text

    def __len__(self):
        return len(self.desirable)

    def __getitem__(self, i: int) -> dict:
        part, j = self.latents[i // CACHE_CHUNK], i % CACHE_CHUNK
        c = int(part["caption_id"][j])
        return dict(mean=part["mean"][j], std=part["std"][j], emb=self.text[c // CACHE_CHUNK][c % CACHE_CHUNK],
                    desirable=self.desirable[i], corrupt=int(part["corrupt"][j]))


def build_latent_cache(folder: Path, dataset, captions: list[str], encode_pixels, encode_captions, cfg, rank, world_size):
    """Encode chunks of CACHE_CHUNK images / captions not yet on disk, chunk k on rank k % world_size.

    Each file is written to a temporary name and renamed, so a killed run resumes where it stopped."""
    caption_id = {c: i for i, c in enumerate(captions)}
    for name in cache_files(len(dataset), len(captions))[rank::world_size]:
        file, k = folder / name, int(name[-9:-3])
        if file.exists():
            continue
        rows = range(k * CACHE_CHUNK, min((k + 1) * CACHE_CHUNK, len(captions if name.startswith("text") else dataset)))
        if name.startswith("text"):
            part = dict(emb=torch.cat([encode_captions([captions[i] for i in rows[n:n + 64]]) for n in range(0, len(rows), 64)]))
        else:
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows), batch_size=cfg.train_batch_size,
                                                 num_workers=cfg.dataloader_workers)
            stats = [encode_pixels(batch["pixel_values"]) + ([caption_id[c] for c in batch["caption"]], batch["corrupt"])
                     for batch in loader]
            part = dict(mean=torch.cat([m for m, _, _, _ in stats]), std=torch.cat([s for _, s, _, _ in stats]),
                        caption_id=torch.tensor(sum([c for _, _, c, _ in stats], [])),
                        corrupt=torch.cat([n for _, _, _, n in stats]))
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        torch.save({key: v.cpu().contiguous() for key, v in part.items()}, tmp)
        os.replace(tmp, file)
    if world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# Checkpoints: checkpoint-<step>/ holds unet/ (diffusers layout), training_state.pt and rng_state.pt

class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite losses); the message says what to try."""


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A save in progress lives in checkpoint-<step>.tmp and is ignored."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def fsync_tree(path: Path):
    for p in [*path.rglob("*"), path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(cfg: Config, policy, optimizer, lr_schedule, scaler, gen, step: int, bad_steps: int, rank: int, world_size: int):
    """Atomic save: rank 0 writes checkpoint-<step>.tmp, flushes it to disk, then renames it. All ranks call this."""
    rng_states = [gen.get_state()]
    if world_size > 1:
        rng_states = [None] * world_size
        dist.all_gather_object(rng_states, gen.get_state())  # every rank's noise/timestep stream
    if rank == 0:
        out = Path(cfg.output_dir) / f"checkpoint-{step}"
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_pretrained(tmp / "unet")
        torch.save(dict(optimizer=optimizer.state_dict(), lr_schedule=lr_schedule.state_dict(), step=step,
                        bad_steps=bad_steps, scaler=scaler.state_dict()), tmp / "training_state.pt")
        torch.save([s.cpu() for s in rng_states], tmp / "rng_state.pt")
        fsync_tree(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
        if cfg.checkpoints_total_limit > 0:
            for old in list_checkpoints(cfg.output_dir)[:-cfg.checkpoints_total_limit]:
                shutil.rmtree(old)
    if world_size > 1:
        dist.barrier()


def find_resume(cfg: Config) -> Path | None:
    """The checkpoint to resume from, or None. Refuses to write into another run's folder without --resume."""
    out = Path(cfg.output_dir)
    if not cfg.resume:
        if list_checkpoints(out):
            raise DataError(f"--output_dir {out} already holds checkpoints ({list_checkpoints(out)[-1].name}, ...) "
                            "of another run. Pass --resume latest to continue it, or choose another --output_dir.")
        return None
    if cfg.resume == "latest":
        found = list_checkpoints(out)
        return found[-1] if found else None
    path = Path(cfg.resume)
    if not (path / "training_state.pt").exists():
        raise DataError(f"--resume {path}: not a checkpoint folder of train_kto.py (no training_state.pt). "
                        f"Pass a checkpoint-<step> folder or 'latest'.")
    return path


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    """Train; returns the trained policy UNet (unwrapped) so tests and notebooks can inspect it."""
    cfg = parse_config(argv)
    rank, world_size, device = utils.init_distributed()
    try:
        result = train(cfg, rank, world_size, device)
        if dist.is_initialized():
            dist.barrier()  # rank 0 finishes writing before any rank tears down its connections
        return result
    except (DataError, TrainingError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, DataError) else 3)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: Config, rank: int, world_size: int, device: torch.device):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm
    from transformers import CLIPTextModel, CLIPTokenizer

    master = rank == 0
    out_dir = Path(cfg.output_dir)
    if cfg.reference_point == "kl_mismatched":
        mismatched_indices(cfg.train_batch_size)  # fails early, with a clear message, for a batch of 1
    if cfg.optimizer == "adamw8bit":  # the released code's optimizer; imported only when asked for
        try:
            import bitsandbytes
        except ImportError as e:
            raise DataError("--optimizer adamw8bit needs bitsandbytes, which is not installed (pip install bitsandbytes; "
                            "CUDA GPUs only). Install it, or use --optimizer adamw.") from e

    # -- data: checked before any model is loaded ---------------------------------------------------
    table = utils.load_feedback(cfg.dataset, label_policy=cfg.label_policy)
    dataset = utils.FeedbackDataset(table, Path(cfg.dataset).parent, cfg.resolution)
    desirable = table["desirable"].to_numpy()
    num_desirable, num_undesirable = int(desirable.sum()), int((~desirable).sum())
    if min(num_desirable, num_undesirable) == 0 and not cfg.allow_one_class:
        raise DataError(f"--dataset {cfg.dataset}: {num_desirable} desirable and {num_undesirable} undesirable samples. "
                        "KTO can learn from one kind alone, but this is often a labelling mistake: check the "
                        "label column, or pass --allow_one_class to train anyway.")
    empty = float((table["caption"].str.strip() == "").mean())
    if empty > MAX_EMPTY_CAPTIONS:
        raise DataError(f"--dataset {cfg.dataset}: {empty:.0%} of the captions are empty (at most "
                        f"{MAX_EMPTY_CAPTIONS:.0%} allowed; caption dropout already trains the unconditional case). "
                        "Fill in the caption column or drop those rows.")
    resume_from = find_resume(cfg)
    start_step = int(resume_from.name.split("-")[1]) if resume_from else 0
    sampler = DesirableRatioSampler(desirable, cfg.desirable_ratio, seed=[cfg.seed, rank],
                                    start=start_step * cfg.train_batch_size)  # resumes the exact stream

    # -- models: a trainable policy and a separate frozen reference, both from the base UNet ----------
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "no" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    amp_dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(precision)
    frozen_dtype = amp_dtype or torch.float32  # ref, VAE and text encoder are stored in the autocast dtype
    path = str(__import__("fixtures").sd15_random_path()) if cfg.pretrained_model == "sd15-random" else cfg.pretrained_model
    scaling_factor = AutoencoderKL.load_config(path, subfolder="vae").get("scaling_factor", 0.18215)  # 0.18215: SD's
    captions = list(dict.fromkeys(["", *table["caption"]]))  # "" first: the dropped-out caption
    cache = Path(cfg.cache_dir or out_dir / "latent_cache")
    cache_ready = cfg.cache_latents and all((cache / f).exists() for f in cache_files(len(dataset), len(captions)))
    if not cache_ready:  # the VAE and text encoder are loaded only to encode images and captions
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=frozen_dtype).to(device)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=frozen_dtype).to(device)
        text_encoder.requires_grad_(False).eval()
        vae.requires_grad_(False).eval()
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    policy = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device)  # fp32 master weights
    ref = frozen_reference(policy, frozen_dtype)  # never swap weights in and out of one module: two modules
    policy.train()
    if cfg.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    if cfg.compile:  # in place: state_dict keys, saving and DDP are unchanged
        policy.compile()
        ref.compile()
    model = torch.nn.parallel.DistributedDataParallel(policy) if world_size > 1 else policy

    if cfg.optimizer == "adamw8bit":
        optimizer = bitsandbytes.optim.AdamW8bit(policy.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    else:  # fused: one kernel for all parameters
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=0.0, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 gradients underflow without it
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(cfg.lr_warmup_steps, 1)))
    gen = torch.Generator(device).manual_seed(rank_seed(cfg.seed, rank))  # noise, t, flips, dropout: per rank
    bad_steps, n_corrupt, n_seen = 0, 0, 0
    if resume_from:  # weights, optimizer, schedule, step and every rank's generator
        policy.load_state_dict(UNet2DConditionModel.from_pretrained(resume_from, subfolder="unet").state_dict())
        state = torch.load(resume_from / "training_state.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        if state.get("scaler") and scaler.is_enabled():  # fp16: the loss scale it had reached
            scaler.load_state_dict(state["scaler"])
        bad_steps = state["bad_steps"]
        rng_states = torch.load(resume_from / "rng_state.pt", weights_only=True)
        if len(rng_states) == world_size:
            gen.set_state(rng_states[rank])
        else:  # a different number of ranks: same weights and optimizer, new per-rank streams
            gen.manual_seed(rank_seed(cfg.seed + start_step, rank))
            if master:
                print(f"warning: {resume_from} was saved by {len(rng_states)} ranks, resuming on {world_size}: "
                      "random streams restart, so the run will not match an uninterrupted one exactly")

    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        versions = {m: __import__(m).__version__ for m in ("torch", "diffusers", "transformers", "numpy")}
        run = dict(config=dataclasses.asdict(cfg), world_size=world_size, device=str(device),
                   num_desirable=num_desirable, num_undesirable=num_undesirable, label_policy=cfg.label_policy,
                   data=table.attrs.get("stats"),
                   versions=dict(python=platform.python_version(), **versions), argv=sys.argv)
        (out_dir / "run.json").write_text(json.dumps(run, indent=2))
        print(f"{num_desirable} desirable / {num_undesirable} undesirable images; {world_size} rank(s) x "
              f"{cfg.train_batch_size} = global batch {world_size * cfg.train_batch_size}; device {device}")
    metrics_file = None
    if master:  # on resume keep the log up to the checkpoint's step, then append
        old = (out_dir / "metrics.jsonl").read_text().splitlines() if resume_from and (out_dir / "metrics.jsonl").exists() else []
        metrics_file = open(out_dir / "metrics.jsonl", "w")
        metrics_file.writelines(line + "\n" for line in old if json.loads(line)["step"] <= start_step)
        if resume_from:
            print(f"resuming from {resume_from} at step {start_step}")

    def encode_captions(captions):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        return text_encoder(ids)[0]

    def posterior(pixels):  # the VAE's q(x0 | image): mean and std; pixels [B, 3, H, W] in [-1, 1]
        latent_dist = vae.encode(pixels.to(device, frozen_dtype)).latent_dist
        return latent_dist.mean, latent_dist.std

    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
    if cfg.cache_latents:  # encode once (both flips), then train on the cache without the VAE and text encoder
        cache.mkdir(parents=True, exist_ok=True)
        check_cache_settings(cache, dict(pretrained_model=path, dataset=cfg.dataset, label_policy=cfg.label_policy,
                                         resolution=cfg.resolution, random_flip=cfg.random_flip, images=len(dataset),
                                         captions=len(captions), dtype=str(frozen_dtype)), master)
        if not cache_ready:
            def both_flips(pixels):  # mean and std [B, views, 4, h, w]; view 1 is the flipped image
                views = [posterior(p) for p in ([pixels, pixels.flip(-1)] if cfg.random_flip else [pixels])]
                return torch.stack([m for m, _ in views], 1), torch.stack([s for _, s in views], 1)

            with torch.no_grad(), autocast:
                build_latent_cache(cache, dataset, captions, both_flips, encode_captions, cfg, rank, world_size)
            vae = text_encoder = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dataset = CachedLatents(cache, dataset.desirable)
        empty_emb = dataset.empty_emb.to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train_batch_size, sampler=sampler,
                                         num_workers=cfg.dataloader_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.dataloader_workers > 0)

    def latents_and_embeddings(batch, b):
        """x0 ~ q(x0 | image) after a random flip, and the text embeddings of the captions after dropout, followed
        (kl_mismatched) by those of the rolled batch's own captions: [2b or b, 77, D]. Both paths draw the same numbers."""
        rolled = mismatched_indices(b) if cfg.reference_point == "kl_mismatched" else torch.zeros(0, dtype=torch.long)
        if cfg.cache_latents:
            flip, drop = augment_draws(b, gen, cfg.random_flip, cfg.caption_dropout)
            mean, std = (batch[k].to(device, non_blocking=True)[torch.arange(b, device=device), flip.long()] for k in ("mean", "std"))
            emb = batch["emb"].to(device, non_blocking=True)
            both = torch.cat([torch.where(drop[:, None, None], empty_emb, emb), emb[rolled.to(device)]])
        else:
            captions = list(batch["caption"])
            pixels, captions_in = augment(batch["pixel_values"].to(device, non_blocking=True), captions, gen,
                                          cfg.random_flip, cfg.caption_dropout)
            mean, std = posterior(pixels)
            both = encode_captions(captions_in + [captions[j] for j in rolled.tolist()])
        return mean + std * torch.randn(mean.shape, generator=gen, device=device, dtype=mean.dtype), both  # as diffusers' sample()

    lap = Laps(cfg.profile, device)
    batches = iter(loader)
    bar = tqdm(total=cfg.max_train_steps, initial=start_step, disable=not master, desc="kto", dynamic_ncols=True)
    for step in range(start_step + 1, cfg.max_train_steps + 1):
        t0 = time.perf_counter()
        lap()
        batch = next(batches)
        is_desirable = batch["desirable"].to(device)
        b = len(is_desirable)
        lap("data")

        with torch.no_grad(), autocast:
            # x0 = E(image); x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t ~ U{0..T-1}; same x0, eps, t for both UNets
            x0, both = latents_and_embeddings(batch, b)  # one text-encoder call for matched + mismatched captions
            x0 = (x0 * scaling_factor).float()
            eps = torch.randn(x0.shape, generator=gen, device=device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen, device=device)
            x_t = scheduler.add_noise(x0, eps, t)
            target = scheduler.get_velocity(x0, eps, t) if scheduler.config.prediction_type == "v_prediction" else eps
            lap("encode")
            if cfg.reference_point == "kl_mismatched":
                emb, emb_mismatched = both[:b], both[b:]
                ref_both = ref(torch.cat([x_t, x_t]).to(frozen_dtype), torch.cat([t, t]), both.to(frozen_dtype)).sample
                ref_err = denoising_error(ref_both[:b], target)
                # z (paper): KL(policy || ref) estimated on (image, another sample's caption), no gradient
                ref_err_mismatched = denoising_error(ref_both[b:], target)
                lap("ref_forward")
                policy_err_mismatched = denoising_error(policy(x_t, t, emb_mismatched).sample, target)
                lap("policy_forward_mismatched")
            else:
                emb = both
                ref_err = denoising_error(ref(x_t.to(frozen_dtype), t, emb.to(frozen_dtype)).sample, target)
                lap("ref_forward")

        with autocast:
            policy_err = denoising_error(model(x_t, t, emb.float()).sample, target)
        r = (ref_err - policy_err).detach()                    # implicit reward r = ref_err - policy_err, per sample
        if cfg.reference_point == "kl_mismatched":
            z = reference_point(ref_err_mismatched - policy_err_mismatched)
        elif cfg.reference_point == "batch_mean":
            z = reference_point(r)                             # released code: clamp(mean r over all GPUs, 0)
        else:
            z = torch.zeros((), device=device)
        loss = kto_loss(policy_err, ref_err, is_desirable, cfg.beta, z, cfg.utility, cfg.lambda_d, cfg.lambda_u).mean()
        lap("policy_forward")

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()                          # DDP averages the gradients over ranks here
        lap("backward")
        scaler.unscale_(optimizer)                             # fp16: true gradients, so clipping sees their real norm
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        lap("clip_grad")
        lr = lr_schedule.get_last_lr()[0]

        # -- metrics: one all-reduce of sums and counts, so rank 0 logs global values -----------------
        d, u = is_desirable.float(), (~is_desirable).float()
        margin = torch.where(is_desirable, r - z, z - r)       # w * (r - z) > 0 means the sample is "won"
        finite = torch.isfinite(loss.detach()) & (torch.isfinite(grad_norm) | scaler.is_enabled())  # fp16: see below
        sums = torch.stack([loss.detach() * b, (r * d).sum(), d.sum(), (r * u).sum(), u.sum(), (margin > 0).float().sum(),
                            policy_err.detach().sum(), ref_err.sum(), torch.tensor(float(b), device=device),
                            (~finite).float(), batch["corrupt"].sum().to(device, torch.float32)])
        if dist.is_initialized():
            dist.all_reduce(sums)
        skipped = sums[9].item() > 0                           # the same decision on every rank
        n_corrupt += int(sums[10].item())
        n_seen += int(sums[8].item()) + int(sums[10].item())
        utils.check_corrupt(n_corrupt, n_seen, min_seen=MIN_IMAGES_TO_JUDGE)  # every rank stops together beyond 1%
        lap("allreduce")
        if skipped:  # a NaN/inf anywhere: no rank steps; the bad gradients are dropped at the next zero_grad
            bad_steps += 1
        else:
            scaler.step(optimizer)                             # fp16: a gradient overflow skips the step, as usual
            bad_steps = 0
        scaler.update()                                        # fp16: halve the loss scale after an overflow
        lr_schedule.step()
        lap("optimizer")
        if master:
            n = sums[8].item()
            row = dict(step=step, loss=sums[0].item() / n, z=z.item(),
                       reward_desirable=sums[1].item() / max(sums[2].item(), 1),
                       reward_undesirable=sums[3].item() / max(sums[4].item(), 1),
                       accuracy=sums[5].item() / n, policy_err=sums[6].item() / n, ref_err=sums[7].item() / n,
                       grad_norm=grad_norm.item(), lr=lr, desirable_frac=sums[2].item() / n, skipped=int(skipped),
                       images_per_sec=n / (time.perf_counter() - t0), **lap.report())
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            bar.set_postfix(loss=f"{row['loss']:.4f}", z=f"{row['z']:.2e}", acc=f"{row['accuracy']:.2f}")
        bar.update()

        if bad_steps >= cfg.max_bad_steps:
            raise TrainingError(f"{bad_steps} consecutive steps had a non-finite loss or gradient (step {step}); "
                                "the last good weights are in the latest checkpoint. Try a lower --learning_rate or "
                                "--beta, check the data for broken images, or raise --max_bad_steps.")
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            save_checkpoint(cfg, policy, optimizer, lr_schedule, scaler, gen, step, bad_steps, rank, world_size)
    bar.close()
    if master:
        metrics_file.close()
        print(f"done: {out_dir / f'checkpoint-{cfg.max_train_steps}'}")
    return policy


if __name__ == "__main__":
    main()
