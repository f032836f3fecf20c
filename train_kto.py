"""Diffusion-KTO: align a text-to-image diffusion model with per-image likes and dislikes.

Li et al., "Aligning Diffusion Models by Optimizing Human Utility", NeurIPS 2024 (arXiv 2404.04465).
Each step draws images labelled desirable or undesirable, noises them at a random timestep, and scores how
much better the trainable `policy` UNet denoises them than the frozen `ref` UNet (the implicit reward r).
The loss maximises a Kahneman-Tversky utility of beta * (r - z), pushing r up on desirable images and down
on undesirable ones, relative to a reference point z (an estimate of KL(policy || ref)).

Launch:
    python train_kto.py --tiny                                      # CPU, offline: tiny model + data built here
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
    tiny: bool = arg(False, "build (once, cached) and use a tiny offline model and dataset, with small defaults; explicit flags still win")
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


TINY = dict(  # --tiny: a CPU-sized run; the model and data are built by utils.py
    resolution=32, train_batch_size=4, max_train_steps=60, learning_rate=1e-4, lr_warmup_steps=5, beta=200.0,
    checkpointing_steps=30, dataloader_workers=0, output_dir="runs/tiny",
)
MIN_IMAGES_TO_JUDGE = 1000  # corrupt images: the 1% limit applies once this many were read
MAX_EMPTY_CAPTIONS = 0.05  # more empty captions than this in a dataset is taken for a broken caption column
CHOICES = dict(label_policy=utils.LABEL_POLICIES, utility=("kahneman_tversky", "loss_averse", "risk_seeking"),
               reference_point=("kl_mismatched", "batch_mean", "zero"))


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
    if given.get("tiny"):
        cfg = dataclasses.replace(cfg, **TINY, pretrained_model=str(utils.tiny_model_path()),
                                  dataset=str(utils.tiny_dataset_path()))
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


def augment(pixels: torch.Tensor, captions: list[str], gen: torch.Generator, random_flip: bool, caption_dropout: float):
    """Random horizontal flip (p = 0.5) and caption dropout (caption -> "" with p = caption_dropout)."""
    b = pixels.shape[0]
    if random_flip:
        flip = torch.rand(b, generator=gen, device=pixels.device) < 0.5
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    drop = (torch.rand(b, generator=gen, device=pixels.device) < caption_dropout).tolist()
    return pixels, ["" if d else c for c, d in zip(captions, drop)]


def rank_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


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


def save_checkpoint(cfg: Config, policy, optimizer, lr_schedule, gen, step: int, bad_steps: int, rank: int, world_size: int):
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
                        bad_steps=bad_steps), tmp / "training_state.pt")
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
    ddp = "RANK" in os.environ  # launched by torchrun
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if ddp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # torchrun --max-restarts reuses one key-value store across restarts: a per-restart prefix keeps a
        # restarted group from reading the dead group's addresses (pytorch/pytorch#167288)
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=rank == 0 and not agent_store)
        store = dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world_size, device_id=device if device.type == "cuda" else None)
    try:
        return train(cfg, rank, world_size, device)
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
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train_batch_size, sampler=sampler,
                                         num_workers=cfg.dataloader_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.dataloader_workers > 0)

    # -- models: a trainable policy and a separate frozen reference, both from the base UNet ----------
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    frozen_dtype = torch.bfloat16 if use_bf16 else torch.float32
    path = cfg.pretrained_model
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=frozen_dtype).to(device)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=frozen_dtype).to(device)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    policy = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device)  # fp32 master weights
    ref = copy.deepcopy(policy)  # never swap weights in and out of one module: two modules
    if use_bf16:
        ref.to(frozen_dtype)
    for module in (text_encoder, vae, ref):
        module.requires_grad_(False).eval()
    policy.train()
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    model = torch.nn.parallel.DistributedDataParallel(policy) if world_size > 1 else policy

    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(cfg.lr_warmup_steps, 1)))
    gen = torch.Generator(device).manual_seed(rank_seed(cfg.seed, rank))  # noise, t, flips, dropout: per rank
    bad_steps, n_corrupt, n_seen = 0, 0, 0
    if resume_from:  # weights, optimizer, schedule, step and every rank's generator
        policy.load_state_dict(UNet2DConditionModel.from_pretrained(resume_from, subfolder="unet").state_dict())
        state = torch.load(resume_from / "training_state.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
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

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    batches = iter(loader)
    bar = tqdm(total=cfg.max_train_steps, initial=start_step, disable=not master, desc="kto", dynamic_ncols=True)
    for step in range(start_step + 1, cfg.max_train_steps + 1):
        t0 = time.perf_counter()
        batch = next(batches)
        pixels = batch["pixel_values"].to(device, non_blocking=True)
        is_desirable = batch["desirable"].to(device)
        b = pixels.shape[0]
        captions = list(batch["caption"])

        with torch.no_grad(), autocast:
            pixels, captions_in = augment(pixels, captions, gen, cfg.random_flip, cfg.caption_dropout)
            # x0 = E(image); x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t ~ U{0..T-1}; same x0, eps, t for both UNets
            x0 = vae.encode(pixels.to(frozen_dtype)).latent_dist.sample(generator=gen) * vae.config.scaling_factor
            x0 = x0.float()
            eps = torch.randn(x0.shape, generator=gen, device=device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen, device=device)
            x_t = scheduler.add_noise(x0, eps, t)
            target = scheduler.get_velocity(x0, eps, t) if scheduler.config.prediction_type == "v_prediction" else eps
            if cfg.reference_point == "kl_mismatched":  # one text-encoder call for matched + mismatched captions
                both = encode_captions(captions_in + [captions[j] for j in mismatched_indices(b).tolist()])
                emb, emb_mismatched = both[:b], both[b:]
                ref_both = ref(torch.cat([x_t, x_t]).to(frozen_dtype), torch.cat([t, t]), both.to(frozen_dtype)).sample
                ref_err = denoising_error(ref_both[:b], target)
                # z (paper): KL(policy || ref) estimated on (image, another sample's caption), no gradient
                ref_err_mismatched = denoising_error(ref_both[b:], target)
                policy_err_mismatched = denoising_error(policy(x_t, t, emb_mismatched).sample, target)
            else:
                emb = encode_captions(captions_in)
                ref_err = denoising_error(ref(x_t.to(frozen_dtype), t, emb.to(frozen_dtype)).sample, target)

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

        optimizer.zero_grad(set_to_none=True)
        loss.backward()                                        # DDP averages the gradients over ranks here
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        lr = lr_schedule.get_last_lr()[0]

        # -- metrics: one all-reduce of sums and counts, so rank 0 logs global values -----------------
        d, u = is_desirable.float(), (~is_desirable).float()
        margin = torch.where(is_desirable, r - z, z - r)       # w * (r - z) > 0 means the sample is "won"
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        sums = torch.stack([loss.detach() * b, (r * d).sum(), d.sum(), (r * u).sum(), u.sum(), (margin > 0).float().sum(),
                            policy_err.detach().sum(), ref_err.sum(), torch.tensor(float(b), device=device),
                            (~finite).float(), batch["corrupt"].sum().to(device, torch.float32)])
        if dist.is_initialized():
            dist.all_reduce(sums)
        skipped = sums[9].item() > 0                           # the same decision on every rank
        n_corrupt += int(sums[10].item())
        n_seen += int(sums[8].item()) + int(sums[10].item())
        utils.check_corrupt(n_corrupt, n_seen, min_seen=MIN_IMAGES_TO_JUDGE)  # every rank stops together beyond 1%
        if skipped:  # a NaN/inf anywhere: no rank steps; the bad gradients are dropped at the next zero_grad
            bad_steps += 1
        else:
            optimizer.step()
            bad_steps = 0
        lr_schedule.step()
        if master:
            n = sums[8].item()
            row = dict(step=step, loss=sums[0].item() / n, z=z.item(),
                       reward_desirable=sums[1].item() / max(sums[2].item(), 1),
                       reward_undesirable=sums[3].item() / max(sums[4].item(), 1),
                       accuracy=sums[5].item() / n, policy_err=sums[6].item() / n, ref_err=sums[7].item() / n,
                       grad_norm=grad_norm.item(), lr=lr, desirable_frac=sums[2].item() / n, skipped=int(skipped),
                       images_per_sec=n / (time.perf_counter() - t0))
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            bar.set_postfix(loss=f"{row['loss']:.4f}", z=f"{row['z']:.2e}", acc=f"{row['accuracy']:.2f}")
        bar.update()

        if bad_steps >= cfg.max_bad_steps:
            raise TrainingError(f"{bad_steps} consecutive steps had a non-finite loss or gradient (step {step}); "
                                "the last good weights are in the latest checkpoint. Try a lower --learning_rate or "
                                "--beta, check the data for broken images, or raise --max_bad_steps.")
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            save_checkpoint(cfg, policy, optimizer, lr_schedule, gen, step, bad_steps, rank, world_size)
    bar.close()
    if master:
        metrics_file.close()
        print(f"done: {out_dir / f'checkpoint-{cfg.max_train_steps}'}")
    return policy


if __name__ == "__main__":
    main()
