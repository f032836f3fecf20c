"""Diffusion-KTO: align a text-to-image diffusion model with per-image likes and dislikes.

Li et al., "Aligning Diffusion Models by Optimizing Human Utility", NeurIPS 2024 (arXiv 2404.04465).
Each step draws images labelled desirable or undesirable, noises them at a random timestep, and scores how
much better the trainable `policy` UNet denoises them than the frozen `ref` UNet (the implicit reward r).
The loss maximises a Kahneman-Tversky utility of beta * (r - z), pushing r up on desirable images and down
on undesirable ones, relative to a reference point z (an estimate of KL(policy || ref)).

Launch:
    python train_kto.py --tiny                                   # CPU, offline: the tiny world of tiny_world.py
    torchrun --standalone --nproc_per_node 2 train_kto.py --tiny --train_batch_size 4   # 2 CPU processes
    python train_kto.py --dataset likes.csv                      # 1 GPU, SD v1-5, your data
    torchrun --standalone --nproc_per_node 4 train_kto.py        # the paper's recipe: 4 GPUs x 2 images
    python train_kto.py --gradient_accumulation_steps 4          # the same batch of 8 on 1 GPU (2 x 4)
    python train_kto.py --plot runs/kto                          # redraw a run's curves.png
Every flag: python train_kto.py --help. Outputs (README "Outputs"): <output_dir>/run.json, metrics.jsonl,
curves.png, validation/, checkpoint-<step>/ (unet/, model card).
File map: this file is the method and its training loop; utils.py the plumbing (data, distributed set-up,
atomic files); fixtures.py and tiny_world.py the offline stand-ins for the hub (tests and the CPU demo).
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import utils
from utils import DataError, arg


@dataclass
class Config:
    # data and model
    pretrained_model: str = arg("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                "base model: hub id or local diffusers folder; policy and ref both start from its UNet")
    dataset: str = arg("yuvalkirstain/pickapic_v2", "like/dislike data: Pick-a-Pic v2 (hub id or folder of its parquet "
                       "shards), or a .csv/.jsonl/.parquet file with columns image, caption, label")
    label_policy: str = arg("won_once", utils.LABEL_POLICY_HELP)
    output_dir: str = arg("runs/kto", "folder for run.json, metrics.jsonl and checkpoint-<step>/")
    tiny: bool = arg(False, "train on the offline tiny world (tiny_world.py; built once, cached) with CPU-sized "
                     "defaults; explicit flags still win")
    world_seed: int = arg(0, "with --tiny: which tiny world to build and train on (independent worlds per seed)")
    resolution: int = arg(512, "training image side in pixels (resize short side, center crop)")
    random_flip: bool = arg(True, "flip each image horizontally with probability 0.5 (released code; paper silent)")
    caption_dropout: float = arg(0.2, "probability of replacing a caption by the empty one (released code; not in "
                                 "the paper)")
    desirable_ratio: float = arg(0.8, "probability that a sample is drawn from the desirable set (the paper's gamma)")
    dataloader_workers: int = arg(4, "DataLoader worker processes per rank that decode images")
    # the objective
    objective: str = arg("kto", "kto: Diffusion-KTO | sft: the paper's baseline, the plain denoising loss on "
                         "desirable images only (same loop; --desirable_ratio is then 1)")
    beta: float = arg(5000.0, "scale of the implicit reward inside the utility (paper: 5000; released code: 1000)")
    utility: str = arg("kahneman_tversky", "U in lambda_y * (1 - U(w * beta * (r - z))): kahneman_tversky = sigmoid | "
                       "loss_averse = log sigmoid | risk_seeking = -log sigmoid(-x)")
    reference_point: str = arg("kl_mismatched", "z: kl_mismatched (paper, KTO: rewards of mismatched image-caption "
                               "pairs) | batch_mean (released code: rewards of the batch itself) | zero")
    lambda_d: float = arg(1.0, "loss weight lambda_D of desirable samples")
    lambda_u: float = arg(1.0, "loss weight lambda_U of undesirable samples")
    # optimisation
    train_batch_size: int = arg(2, "images per rank per forward pass (global batch = this x accumulation steps x "
                                "number of ranks)")
    gradient_accumulation_steps: int = arg(1, "forward/backward passes per optimizer step; z and the metrics are over "
                                           "the whole accumulated batch (the paper's batch 8 on 1 GPU: 2 x 4)")
    max_train_steps: int = arg(10_000, "optimizer steps")
    learning_rate: float = arg(1e-7, "peak learning rate of AdamW (weight decay 0, i.e. Adam)")
    lr_warmup_steps: int = arg(1000, "steps of linear learning-rate warm-up from 0, then constant")
    max_grad_norm: float = arg(1.0, "clip the global gradient norm to this (released code: 1.0)")
    seed: int = arg(0, "seed for everything; ranks derive their own streams from (seed, rank)")
    checkpointing_steps: int = arg(1000, "save checkpoint-<step>/ every this many steps (and at the end)")
    checkpoints_total_limit: int = arg(0, "keep only the newest this many checkpoints (0: keep all)")
    resume: str = arg("", "continue from a checkpoint-<step> folder, or 'latest' in output_dir (a fresh start if "
                      "there is none); refused if the data, model or objective differ from the checkpoint's")
    max_bad_steps: int = arg(10, "stop after this many consecutive steps with a non-finite loss or gradient (each "
                             "is skipped: no update, no learning-rate step)")
    allow_one_class: bool = arg(False, "train on data with only desirable or only undesirable samples")
    # speed and memory (docs/benchmarks.md); attention is PyTorch's scaled_dot_product_attention
    mixed_precision: str = arg("auto", "autocast dtype of the UNets, frozen modules stored in it (norms in float32): "
                               "auto (bf16 on GPUs that have it, fp16 + grad scaler on older GPUs, no on CPU) | bf16 "
                               "| fp16 | no")
    gradient_checkpointing: bool = arg(False, "recompute the policy's activations in the backward pass: less memory, "
                                       "about a third more compute")
    optimizer: str = arg("adamw", "adamw (torch, fused kernel) | adamw8bit (bitsandbytes, installed separately; "
                         "2 instead of 8 bytes of state per parameter)")
    compile: bool = arg(False, "torch.compile the repeated blocks of the policy and reference UNets (the first steps "
                        "are slow)")
    cache_latents: bool = arg(False, "encode every image (both flips) and caption once, to disk; training then never "
                              "loads the VAE and text encoder")
    cache_dir: str = arg("", "folder of the --cache_latents files (default: <output_dir>/latent_cache); reused and "
                         "resumed when its settings match")
    profile: bool = arg(False, "add seconds per phase of each step (time_<phase>, CUDA-synchronised), the step's FLOPs "
                        "(counted once), TFLOP/s and GPU utilisation to metrics.jsonl")
    peak_tflops: float = arg(0.0, "with --profile: the GPU's dense bf16/fp16 peak in TFLOP/s, for the utilisation "
                             "(0: looked up by GPU name in PEAK_TFLOPS; none for unknown GPUs and CPUs)")
    # watching a run (README "Outputs")
    validation_prompts: str = arg("a photo of a cat on a sofa|a watercolor painting of a lighthouse at dusk|an "
                                  "astronaut riding a horse|a bowl of ramen, studio lighting",
                                  "prompts sampled with the same seeds at every validation: '|'-separated, or a .txt "
                                  "file with one per line")
    validation_steps: int = arg(500, "sample the validation prompts every this many steps and at the start, into "
                                "<output_dir>/validation/step-<N>.png (0: never)")
    validation_guidance: float = arg(7.5, "classifier-free guidance scale of the validation images (25 steps)")
    report_to: str = arg("none", "also log metrics and validation grids to: none | tensorboard | wandb "
                         "(WANDB_MODE=offline works without a network)")
    plot: str = arg("", "only redraw <RUN_DIR>/curves.png from its metrics.jsonl (any run, resumed ones too); exit")


TINY = dict(  # --tiny: a CPU-sized run on the tiny world (base model and feedback built once by tiny_world.py)
    resolution=32, train_batch_size=8, max_train_steps=200, learning_rate=1e-5, lr_warmup_steps=5, beta=200.0,
    checkpointing_steps=100, dataloader_workers=0, output_dir="runs/tiny", validation_steps=50,
    validation_guidance=3.0,
)
CHOICES = dict(label_policy=utils.LABEL_POLICIES, utility=("kahneman_tversky", "loss_averse", "risk_seeking"),
               reference_point=("kl_mismatched", "batch_mean", "zero"), objective=("kto", "sft"),
               mixed_precision=("auto", "bf16", "fp16", "no"), optimizer=("adamw", "adamw8bit"),
               report_to=utils.TRACKERS)
RESUMABLE = {  # what may differ between a run and its resumption; anything else is refused
    "max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "resume", "max_bad_steps",
    "dataloader_workers", "gradient_checkpointing", "compile", "profile", "peak_tflops", "cache_latents", "cache_dir",
    "validation_prompts", "validation_steps", "validation_guidance", "report_to", "plot"}
MIN_IMAGES_TO_JUDGE = 1000  # corrupt images: the 1% limit applies once this many were read
MAX_EMPTY_CAPTIONS = 0.05  # more empty captions than this in a dataset is taken for a broken caption column


def parse_config(argv=None) -> Config:
    """Flags come from Config's fields. --tiny only changes defaults: flags given explicitly always win."""
    def tiny_world(given):  # built on first use, and only if the run needs it
        import tiny_world
        world = lambda: tiny_world.world_path(given.get("world_seed", 0))  # noqa: E731
        return {**({} if "pretrained_model" in given else dict(pretrained_model=str(world() / "model"))),
                **({} if "dataset" in given else dict(dataset=str(world() / "feedback"))),
                "validation_prompts": "|".join(tiny_world.HELD_OUT)}
    cfg, _ = utils.parse_config(Config, argv, __doc__, CHOICES, TINY, tiny_world)
    return dataclasses.replace(cfg, desirable_ratio=1.0) if cfg.objective == "sft" else cfg


# ----------------------------------------------------------------------------------------------------
# The objective (paper Eq. 8): pure tensor functions

def denoising_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over latent elements of the squared error, per sample, in float32: shape [B]."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


def kto_loss(policy_err, ref_err, desirable, beta, z, utility="kahneman_tversky", lambda_d=1.0, lambda_u=1.0):
    """Per-sample Diffusion-KTO loss, lambda_y * (1 - U(w * beta * (r - z))), shape [B].

    policy_err, ref_err: [B] mean squared denoising errors; desirable: bool [B]; z: scalar reference point
    in the units of r. Written with sigmoid/softplus so that beta = 5000 cannot overflow in float32.
    """
    r = ref_err - policy_err                                  # implicit reward: log pi_theta/pi_ref up to scale
    w = desirable.float() * 2 - 1                             # w(x0) = +1 desirable, -1 undesirable
    x = w * beta * (r - z)                                    # Eq. 8: w * (beta * log-ratio - Q_ref), Q_ref = beta z
    if utility == "kahneman_tversky":
        one_minus_u = torch.sigmoid(-x)                       # U = sigmoid(x);            1 - U = sigmoid(-x)
    elif utility == "loss_averse":
        one_minus_u = 1 + F.softplus(-x)                      # U = log sigmoid(x);        1 - U = 1 + softplus(-x)
    elif utility == "risk_seeking":
        one_minus_u = 1 - F.softplus(x)                       # U = -log sigmoid(-x);      1 - U = 1 - softplus(x)
    else:
        raise ValueError(f"utility must be one of {', '.join(CHOICES['utility'])}; got {utility!r}")
    lambda_y = torch.where(desirable, torch.tensor(lambda_d, dtype=x.dtype), torch.tensor(lambda_u, dtype=x.dtype))
    return lambda_y * one_minus_u


def global_sums(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each named scalar over ALL ranks (one all-reduce); without a process group, the values themselves."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in named.values()])
    if dist.is_initialized():
        dist.all_reduce(stacked)
    return dict(zip(named, stacked))


def reference_point(rewards: torch.Tensor) -> torch.Tensor:
    """z = max(0, mean of the rewards over all ranks), detached: KTO's estimate of KL(policy || ref).

    With rewards of mismatched (image, caption) pairs this is the paper's z; with the matched batch it is the
    released code's. Identical on every rank: the sum and the count are all-reduced (unequal sizes are fine)."""
    s = global_sums(dict(sum=rewards.sum(), count=torch.tensor(float(rewards.numel()), device=rewards.device)))
    return (s["sum"] / s["count"]).clamp(min=0).detach()


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
    for module in ref.modules():
        if not isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(dtype)
    return ref


def kto_step(policy, ref, scheduler, x0, emb, emb_mismatched, desirable, gen, cfg: Config,
             backward=torch.Tensor.backward):
    """One step of the Diffusion-KTO objective (paper Eq. 8) on a batch: the loss and its gradients.

        L = E_{x0, t} [ lambda_y * (1 - U(w(x0) * beta * (r - z))) ]
        r = ||eps - eps_ref(x_t, t, c)||^2 - ||eps - eps_policy(x_t, t, c)||^2     (means over latent elements)

    x0: latents [B, 4, h, w]; emb / emb_mismatched: caption embeddings of each image's own caption / of another
    sample's caption (None unless --reference_point kl_mismatched); desirable: bool [B]; gen: this rank's generator.
    `policy` may be DDP-wrapped; `ref` is frozen. With --objective sft the loss is the plain denoising loss of the
    policy instead (the paper's SFT baseline). The policy's forward and backward run in
    cfg.gradient_accumulation_steps micro-batches, each ending in backward(loss_k) (the caller may scale it for
    fp16); the micro-losses sum to the batch mean. z is a statistic of the whole batch, so it comes first.
    Returns the loss (detached) and stats: per-sample r, policy_err, ref_err and the scalar z.
    """
    micro = torch.arange(len(x0), device=x0.device).chunk(cfg.gradient_accumulation_steps)
    # Sample noise and a timestep per image; x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; the same for both UNets
    eps = torch.randn(x0.shape, generator=gen, device=x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen, device=x0.device)
    x_t = scheduler.add_noise(x0, eps, t)
    target = scheduler.get_velocity(x0, eps, t) if scheduler.config.prediction_type == "v_prediction" else eps

    def err(unet, c, i):  # denoising error of samples i under captions c
        return denoising_error(unet(x_t[i], t[i], c[i]).sample, target[i])

    raw_policy, z = getattr(policy, "module", policy), None
    with torch.no_grad():
        # Reference model's denoising error
        ref_err = torch.cat([err(ref, emb, i) for i in micro])
        if cfg.reference_point == "kl_mismatched":
            # z = max(0, E[r]) on (image, another sample's caption), no gradient: KTO's KL(policy || ref) estimate
            z = reference_point(torch.cat([err(ref, emb_mismatched, i) - err(raw_policy, emb_mismatched, i)
                                           for i in micro]))
        elif cfg.reference_point == "batch_mean" and len(micro) > 1:  # every micro-batch's r is needed first
            z = reference_point(ref_err - torch.cat([err(raw_policy, emb, i) for i in micro]))
        elif cfg.reference_point == "zero":
            z = torch.zeros((), device=x0.device)
    policy_err, loss = [], torch.zeros((), device=x0.device)
    for k, i in enumerate(micro):  # DDP averages the gradients over ranks in the last micro-batch's backward
        with policy.no_sync() if k < len(micro) - 1 and hasattr(policy, "no_sync") else contextlib.nullcontext():
            # Policy's denoising error (the only forward with gradients)
            policy_err.append(err(policy, emb, i))
            if z is None:  # batch_mean (released code): max(0, mean r over all GPUs) of this very forward
                z = reference_point(ref_err - policy_err[-1].detach())
            # Final loss: lambda_y * (1 - U(w * beta * (r - z))), r = ref_err - policy_err, mean over the batch
            if cfg.objective == "sft":
                loss_k = policy_err[-1].sum() / len(x0)
            else:
                loss_k = kto_loss(policy_err[-1], ref_err[i], desirable[i], cfg.beta, z, cfg.utility, cfg.lambda_d,
                                  cfg.lambda_u).sum() / len(x0)
            backward(loss_k)
        loss = loss + loss_k.detach()
    policy_err = torch.cat(policy_err).detach()
    return loss, dict(r=ref_err - policy_err, z=z, policy_err=policy_err, ref_err=ref_err)


def step_sums(loss, stats, desirable, grad_finite, corrupt) -> dict[str, torch.Tensor]:
    """The step's metrics as global sums and counts, reduced by name over all ranks (see log_row)."""
    r, z, d = stats["r"], stats["z"], desirable.float()
    won = torch.where(desirable, r > z, r < z).float()        # w * (r - z) > 0: the utility is above its midpoint
    return global_sums(dict(
        loss=loss.detach() * len(r), r_desirable=(r * d).sum(), n_desirable=d.sum(), r_undesirable=(r * (1 - d)).sum(),
        n=torch.tensor(float(len(r)), device=r.device), won=won.sum(), policy_err=stats["policy_err"].sum(),
        ref_err=stats["ref_err"].sum(), not_finite=(~(torch.isfinite(loss.detach()) & grad_finite)).float(),
        corrupt=corrupt.sum().float().to(r.device)))


def log_row(step: int, s: dict, z, grad_norm, lr: float, skipped: bool, seconds: float) -> dict:
    """One line of metrics.jsonl (names in README "Outputs")."""
    n = s["n"].item()
    return dict(step=step, loss=s["loss"].item() / n, z=z.item(),
                reward_desirable=s["r_desirable"].item() / max(s["n_desirable"].item(), 1),
                reward_undesirable=s["r_undesirable"].item() / max(n - s["n_desirable"].item(), 1),
                accuracy=s["won"].item() / n, policy_err=s["policy_err"].item() / n, ref_err=s["ref_err"].item() / n,
                grad_norm=grad_norm.item(), lr=lr, desirable_frac=s["n_desirable"].item() / n, skipped=int(skipped),
                images_per_sec=n / seconds)


# ----------------------------------------------------------------------------------------------------
# Data for the objective: the desirable-ratio sampler and augmentation

class DesirableRatioSampler(torch.utils.data.Sampler):
    """Infinite stream of dataset indices: desirable with probability `ratio`, else undesirable, uniform within.

    Draw i depends only on (seed, i), so a run resumed at draw `start` continues the exact same stream."""

    def __init__(self, desirable: np.ndarray, ratio: float, seed, start: int = 0, chunk: int = 4096):
        self.d, self.u = np.flatnonzero(desirable), np.flatnonzero(~desirable)
        self.ratio = (ratio if len(self.u) else 1.0) if len(self.d) else 0.0
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
    flip = (torch.rand(b, generator=gen, device=gen.device) < 0.5 if random_flip
            else torch.zeros(b, dtype=torch.bool, device=gen.device))
    return flip, torch.rand(b, generator=gen, device=gen.device) < caption_dropout


def augment(pixels: torch.Tensor, captions: list[str], gen: torch.Generator, random_flip: bool, caption_dropout: float):
    """Random horizontal flip (p = 0.5) and caption dropout (caption -> "" with p = caption_dropout)."""
    flip, drop = augment_draws(pixels.shape[0], gen, random_flip, caption_dropout)
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    return pixels, ["" if d else c for c, d in zip(captions, drop.tolist())]


# ----------------------------------------------------------------------------------------------------
# Plumbing: models, inputs (images or the latent cache), timing, checkpoints, the run record

class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite losses); the message says what to try."""
    exit_code = 3


def load_models(cfg: Config, path: str, device: torch.device):
    """The trainable policy (float32 master weights) and the frozen reference, both from the base UNet; the
    noise scheduler; the autocast dtype (None: float32) and the dtype the frozen modules are stored in."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "no" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    amp_dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(precision)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    policy = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device).train()
    ref = frozen_reference(policy, amp_dtype or torch.float32)  # two modules: never swap weights in and out of one
    if cfg.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    if cfg.compile:
        # Regional compilation: the UNet's repeated blocks (diffusers' `_repeated_blocks`), compiled in place, so
        # state_dict keys, saving and DDP are unchanged; blocks of one shape share one compiled graph. Allow a
        # graph per block shape, weight dtype (policy float32, ref bf16) and grad mode
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        policy.compile_repeated_blocks()
        ref.compile_repeated_blocks()
    return policy, ref, scheduler, amp_dtype


class Inputs:
    """Turns a loader batch into the objective's inputs: x0 ~ q(x0 | image) after a random flip (scaled latents),
    the caption embeddings after caption dropout and, for kl_mismatched, those of the rolled batch's own captions.
    From images through the VAE and text encoder, or from the --cache_latents files (built here on first use);
    both paths draw the same random numbers, so they give the same run."""

    def __init__(self, cfg: Config, path: str, dataset, captions: list[str], dtype, autocast, device, rank, world_size):
        from diffusers import AutoencoderKL
        self.cfg, self.device, self.dtype, self.autocast = cfg, device, dtype, autocast
        self.scaling_factor = AutoencoderKL.load_config(path, subfolder="vae").get("scaling_factor", 0.18215)
        self.cache = Path(cfg.cache_dir or Path(cfg.output_dir) / "latent_cache") if cfg.cache_latents else None
        if not (self.cache and all((self.cache / f).exists() for f in cache_files(len(dataset), len(captions)))):
            self.load_encoders(path)  # the VAE and text encoder are loaded only to encode images and captions
            if rank == 0:
                self.warn_truncation(captions)
        if self.cache:
            self.cache.mkdir(parents=True, exist_ok=True)
            check_cache_settings(self.cache, dict(
                pretrained_model=path, dataset=cfg.dataset, label_policy=cfg.label_policy, resolution=cfg.resolution,
                random_flip=cfg.random_flip, images=len(dataset), captions=len(captions), dtype=str(dtype)), rank)
            if hasattr(self, "vae"):
                build_latent_cache(self.cache, dataset, captions, self, cfg, rank, world_size)
                del self.vae, self.text_encoder, self.tokenizer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            self.dataset = CachedLatents(self.cache, dataset.desirable)
            self.empty_emb = self.dataset.empty_emb.to(device)
        else:
            self.dataset = dataset

    def load_encoders(self, path: str):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer
        self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=self.dtype)
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=self.dtype)
        for m in (self.text_encoder, self.vae):
            m.to(self.device).requires_grad_(False).eval()

    def warn_truncation(self, captions: list[str], sample: int = 20_000):
        """Captions longer than the text encoder's context are cut (as in SD's own training): say how many, once
        (counted on at most `sample` distinct captions, evenly spaced)."""
        step = max(1, len(captions) // sample)
        lengths = [len(ids) for ids in self.tokenizer(captions[::step], verbose=False).input_ids]
        n, limit = sum(n > self.tokenizer.model_max_length for n in lengths), self.tokenizer.model_max_length
        if n:
            of = f"{n} of {len(lengths)}" + (f" sampled (of {len(captions)})" if step > 1 else "")
            print(f"warning: {of} distinct captions are longer than the text encoder's {limit} tokens and are "
                  "truncated", file=sys.stderr)

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def posterior(self, pixels: torch.Tensor):
        """The VAE's q(x0 | image) as (mean, std); pixels [B, 3, H, W] in [-1, 1]."""
        latent_dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return latent_dist.mean, latent_dist.std

    def __call__(self, batch: dict, gen: torch.Generator):
        """(x0 [B, 4, h, w] float32, emb [B, L, D], emb_mismatched [B, L, D] or None)."""
        cfg, device, b = self.cfg, self.device, len(batch["desirable"])
        rolled = mismatched_indices(b) if cfg.reference_point == "kl_mismatched" else torch.zeros(0, dtype=torch.long)
        if self.cache:
            flip, drop = augment_draws(b, gen, cfg.random_flip, cfg.caption_dropout)
            mean, std = (batch[k].to(device, non_blocking=True)[torch.arange(b, device=device), flip.long()]
                         for k in ("mean", "std"))
            emb = batch["emb"].to(device, non_blocking=True)
            both = torch.cat([torch.where(drop[:, None, None], self.empty_emb, emb), emb[rolled.to(device)]])
        else:
            captions = list(batch["caption"])
            pixels = batch["pixel_values"].to(device, non_blocking=True)
            pixels, captions_in = augment(pixels, captions, gen, cfg.random_flip, cfg.caption_dropout)
            mean, std = self.posterior(pixels)
            both = self.encode_captions(captions_in + [captions[j] for j in rolled.tolist()])  # one call for both
        x0 = mean + std * torch.randn(mean.shape, generator=gen, device=device, dtype=mean.dtype)  # as diffusers
        return (x0 * self.scaling_factor).float(), both[:b], both[b:] if len(rolled) else None


PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, vendor datasheets


def attention_flops_cpu():
    """FLOP formulas for the CPU's fused attention kernels, which torch's counter does not know (it knows the GPU's):
    those of the GPU's flash attention, which does the same matrix products."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: fc.sdpa_flop_count(q, k, v),
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
                lambda g, q, k, v, *a, **kw: fc.sdpa_backward_flop_count(g, q, k, v)}


class Phases:
    """--profile: `with phases("name"):` adds the block's seconds to time_<name> (CUDA-synchronised, since GPU work
    is asynchronous); a no-op otherwise. The first step runs under torch's FLOP counter (matrix products,
    convolutions and attention, forward and backward; the shapes are the same at every step). report() returns
    the step's times, FLOPs, TFLOP/s, utilisation of the GPU's peak (and peak GPU memory), then resets."""

    def __init__(self, enabled: bool, device: torch.device, peak_tflops: float = 0.0):
        self.enabled, self.cuda, self.times, self.flops = enabled, device.type == "cuda", {}, None
        if self.cuda and not peak_tflops:
            name = torch.cuda.get_device_name(device)
            peak_tflops = next((tflops for gpu, tflops in PEAK_TFLOPS.items() if gpu in name), 0.0)
        self.peak_tflops = peak_tflops

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.enabled and self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.enabled:
            if self.cuda:
                torch.cuda.synchronize()
            self.times[f"time_{name}"] = self.times.get(f"time_{name}", 0.0) + time.perf_counter() - t0

    @contextlib.contextmanager
    def count_flops(self):
        if not self.enabled or self.flops is not None:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode
        # eager: compiled code hides its operations from the counter, and a step traced under the counter would
        # never be compiled afterwards
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False,
                                                                         custom_mapping=attention_flops_cpu()) as counter:
            yield
        self.flops = counter.get_total_flops()

    def report(self, seconds: float) -> dict:
        row, self.times = self.times, {}
        if self.enabled and self.flops:
            row.update(flops_per_step=self.flops, tflops_per_sec=self.flops / seconds / 1e12)
            if self.peak_tflops:
                row["utilization"] = row["tflops_per_sec"] / self.peak_tflops
        if self.enabled and self.cuda:
            row["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return row


CACHE_CHUNK = 256  # images (or captions) per cache file: the unit of work shared out over ranks and of resuming


def cache_files(n_images: int, n_captions: int) -> list[str]:
    return ([f"text-{k:06d}.pt" for k in range(math.ceil(n_captions / CACHE_CHUNK))]
            + [f"latents-{k:06d}.pt" for k in range(math.ceil(n_images / CACHE_CHUNK))])


def check_cache_settings(folder: Path, settings: dict, rank: int):
    """A cache is reused only for the same model, data, resolution, flips and dtype; rank 0 records them."""
    file = folder / "settings.json"
    if file.exists() and json.loads(file.read_text()) != settings:
        raise DataError(f"--cache_dir {folder} holds a latent cache made with other settings ({file}); "
                        f"delete it or choose another --cache_dir. Wanted: {settings}")
    if rank == 0 and not file.exists():
        file.write_text(json.dumps(settings, indent=2))


class CachedLatents(torch.utils.data.Dataset):
    """--cache_latents: per image the VAE posterior's mean and std [views, 4, h, w] (view 1 = flipped image)
    and its caption's text embedding, memory-mapped from <cache>/latents-*.pt and text-*.pt."""

    def __init__(self, folder: Path, desirable: torch.Tensor):
        self.desirable = desirable
        self.latents = [torch.load(f, mmap=True, weights_only=True) for f in sorted(folder.glob("latents-*.pt"))]
        self.text = [torch.load(f, mmap=True, weights_only=True)["emb"] for f in sorted(folder.glob("text-*.pt"))]
        self.empty_emb = self.text[0][0]  # caption 0 is "" (caption dropout)

    def __len__(self):
        return len(self.desirable)

    def __getitem__(self, i: int) -> dict:
        part, j = self.latents[i // CACHE_CHUNK], i % CACHE_CHUNK
        c = int(part["caption_id"][j])
        return dict(mean=part["mean"][j], std=part["std"][j], emb=self.text[c // CACHE_CHUNK][c % CACHE_CHUNK],
                    desirable=self.desirable[i], corrupt=int(part["corrupt"][j]))


def build_latent_cache(folder: Path, dataset, captions: list[str], inputs: Inputs, cfg: Config, rank, world_size):
    """Encode the chunks of CACHE_CHUNK images / captions not yet on disk, chunk k on rank k % world_size, each
    written atomically (a killed run resumes where it stopped). Images are encoded in both flips (view 1 flipped)."""
    caption_id = {c: i for i, c in enumerate(captions)}
    for name in cache_files(len(dataset), len(captions))[rank::world_size]:
        file, k = folder / name, int(name[-9:-3])
        if file.exists():
            continue
        rows = range(k * CACHE_CHUNK, min((k + 1) * CACHE_CHUNK, len(captions if name.startswith("text") else dataset)))
        with torch.no_grad(), inputs.autocast:
            if name.startswith("text"):
                part = dict(emb=torch.cat([inputs.encode_captions([captions[i] for i in rows[n:n + 64]])
                                           for n in range(0, len(rows), 64)]))
            else:
                part = dict(mean=[], std=[], caption_id=[], corrupt=[])
                for batch in torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows),
                                                         batch_size=cfg.train_batch_size,
                                                         num_workers=cfg.dataloader_workers):
                    pixels = batch["pixel_values"]
                    views = [inputs.posterior(p) for p in ([pixels, pixels.flip(-1)] if cfg.random_flip else [pixels])]
                    part["mean"].append(torch.stack([m for m, _ in views], 1))
                    part["std"].append(torch.stack([s for _, s in views], 1))
                    part["caption_id"].append(torch.tensor([caption_id[c] for c in batch["caption"]]))
                    part["corrupt"].append(batch["corrupt"])
                part = {key: torch.cat(v) for key, v in part.items()}
        with utils.atomic_path(file) as tmp:
            torch.save({key: v.cpu().contiguous() for key, v in part.items()}, tmp)
    if world_size > 1:
        dist.barrier()


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A save in progress lives in checkpoint-<step>.*.tmp and is ignored."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def fsync_tree(path: Path):
    """Flush a folder's files to disk: the rename that follows is atomic, but durable only for data on disk."""
    for p in [*path.rglob("*"), path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(cfg: Config, policy, optimizer, lr_schedule, scaler, gen, step: int, bad_steps: int, rank: int,
                    world_size: int):
    """checkpoint-<step>/: unet/ (diffusers layout), optimizer.pt (newest checkpoint only), training_state.pt,
    rng_state.pt (every rank's generator) and config.json. Rank 0 writes it to a temporary folder, flushes it to
    disk, then renames it. All ranks call this."""
    rng_states = [gen.get_state()]
    if world_size > 1:
        rng_states = [None] * world_size
        dist.all_gather_object(rng_states, gen.get_state())
    if rank == 0:
        with utils.atomic_path(Path(cfg.output_dir) / f"checkpoint-{step}") as tmp:
            policy.save_pretrained(tmp / "unet")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(dict(lr_schedule=lr_schedule.state_dict(), step=step, bad_steps=bad_steps,
                            scaler=scaler.state_dict()), tmp / "training_state.pt")
            torch.save([s.cpu() for s in rng_states], tmp / "rng_state.pt")
            (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
            fsync_tree(tmp)
        *older, _ = list_checkpoints(cfg.output_dir)
        for old in older:  # the optimizer state (2x the UNet) is kept in the newest checkpoint only
            (old / "optimizer.pt").unlink(missing_ok=True)
        if cfg.checkpoints_total_limit > 0:
            for old in list_checkpoints(cfg.output_dir)[:-cfg.checkpoints_total_limit]:
                shutil.rmtree(old)
    if world_size > 1:
        dist.barrier()


def find_resume(cfg: Config) -> Path | None:
    """The checkpoint to resume from, or None. Refuses to write into another run's folder without --resume, and
    to resume a checkpoint whose data, model or objective differ from this launch's (RESUMABLE may differ)."""
    out = Path(cfg.output_dir)
    if not cfg.resume:
        if list_checkpoints(out):
            raise DataError(f"--output_dir {out} already holds checkpoints ({list_checkpoints(out)[-1].name}, ...) "
                            "of another run. Pass --resume latest to continue it, or choose another --output_dir.")
        return None
    path = (list_checkpoints(out) or [None])[-1] if cfg.resume == "latest" else Path(cfg.resume)
    if path is None:
        return None
    if not (path / "training_state.pt").exists():
        raise DataError(f"--resume {path}: not a checkpoint folder of train_kto.py (no training_state.pt). "
                        f"Pass a checkpoint-<step> folder or 'latest'.")
    if not (path / "optimizer.pt").exists():
        raise DataError(f"--resume {path}: this checkpoint keeps the weights but not the optimizer state, which only "
                        "the newest checkpoint of a run keeps. Resume from the newest one (--resume latest).")
    saved = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    now = dataclasses.asdict(cfg)
    differ = [k for k in saved if k not in RESUMABLE and k in now and saved[k] != now[k]]
    if differ:
        raise DataError(f"--resume {path}: this launch differs from the checkpoint's run in "
                        + ", ".join(f"--{k} ({saved[k]!r} there, {now[k]!r} here)" for k in differ)
                        + ". Resuming would mix two runs in one record: pass the checkpoint's values, or start a new "
                        "run with another --output_dir (and --pretrained_model pointing at the checkpoint's unet).")
    return path


def write_run_record(cfg: Config, out_dir: Path, start_step: int, world_size: int, device, data: dict):
    """run.json: the current config, the data counts, library versions and every launch (argv, step, ranks)."""
    file = out_dir / "run.json"
    launches = json.loads(file.read_text()).get("launches", []) if start_step and file.exists() else []
    versions = {m: __import__(m).__version__ for m in ("torch", "diffusers", "transformers", "numpy")}
    launches.append(dict(argv=sys.argv, start_step=start_step, world_size=world_size, device=str(device),
                         time=time.strftime("%Y-%m-%d %H:%M:%S"), versions=dict(python=platform.python_version(),
                                                                                **versions)))
    run = dict(config=dataclasses.asdict(cfg), world_size=world_size, device=str(device), **data, launches=launches)
    with utils.atomic_path(file) as tmp:
        tmp.write_text(json.dumps(run, indent=2))


def open_metrics(out_dir: Path, start_step: int):
    """metrics.jsonl for appending; on resume the lines after the checkpoint's step are dropped first."""
    file = out_dir / "metrics.jsonl"
    old = file.read_text().splitlines() if start_step and file.exists() else []
    with utils.atomic_path(file) as tmp:
        tmp.write_text("".join(line + "\n" for line in old if json.loads(line)["step"] <= start_step))
    return open(file, "a")


def load_data(cfg: Config):
    """The feedback table and its dataset, checked before any model is loaded."""
    table = utils.load_feedback(cfg.dataset, label_policy=cfg.label_policy)
    dataset = utils.FeedbackDataset(table, Path(cfg.dataset).parent, cfg.resolution)
    desirable = table["desirable"].to_numpy()
    n_d, n_u = int(desirable.sum()), int((~desirable).sum())
    if min(n_d, n_u) == 0 and not cfg.allow_one_class and cfg.objective == "kto":
        raise DataError(f"--dataset {cfg.dataset}: {n_d} desirable and {n_u} undesirable samples. KTO can learn "
                        "from one kind alone, but this is often a labelling mistake: check the label column, or "
                        "pass --allow_one_class to train anyway.")
    if cfg.objective == "sft" and n_d == 0:
        raise DataError(f"--dataset {cfg.dataset}: --objective sft trains on desirable samples, and there are none.")
    empty = float((table["caption"].str.strip() == "").mean())
    if empty > MAX_EMPTY_CAPTIONS:
        raise DataError(f"--dataset {cfg.dataset}: {empty:.0%} of the captions are empty (at most "
                        f"{MAX_EMPTY_CAPTIONS:.0%} allowed; caption dropout already trains the unconditional case). "
                        "Fill in the caption column or drop those rows.")
    counts = dict(num_desirable=n_d, num_undesirable=n_u, label_policy=cfg.label_policy, data=table.attrs.get("stats"))
    return table, dataset, desirable, counts


class Reports:
    """Rank 0's record of a run as it goes: metrics.jsonl, the tracker (--report_to), validation grids of the same
    prompts and seeds (--validation_steps), curves.png and a model card per checkpoint. A no-op on other ranks."""

    def __init__(self, cfg: Config, start_step: int, path: str, inputs: Inputs, device, autocast, enabled: bool):
        self.cfg, self.path, self.inputs, self.device, self.autocast = cfg, path, inputs, device, autocast
        self.enabled, self.out, self.pipe = enabled, Path(cfg.output_dir), None
        if enabled:
            self.metrics = open_metrics(self.out, start_step)
            self.tracker = utils.Tracker(cfg.report_to, self.out, dataclasses.asdict(cfg))
            text = cfg.validation_prompts
            self.prompts = (Path(text).read_text().splitlines() if text.endswith(".txt") else text.split("|"))
            self.prompts = [p.strip() for p in self.prompts if p.strip()]

    def log(self, row: dict):
        if self.enabled:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
            self.tracker.log(row, row["step"])

    def validate(self, policy, step: int):
        """The validation prompts, one image each, seeded by (seed, prompt index) on the CPU: the training streams
        are untouched. The policy runs in eval mode (and goes back to train mode)."""
        if not (self.enabled and self.cfg.validation_steps and step % self.cfg.validation_steps == 0):
            return
        from diffusers import StableDiffusionPipeline
        if self.pipe is None:  # the encoders of the training inputs when they are loaded (no --cache_latents)
            shared = {k: getattr(self.inputs, k) for k in ("vae", "text_encoder", "tokenizer")
                      if hasattr(self.inputs, k)}
            self.pipe = StableDiffusionPipeline.from_pretrained(
                self.path, unet=policy, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                dtype=self.inputs.dtype, **shared).to(self.device)
            self.pipe.set_progress_bar_config(disable=True)
        gens = [torch.Generator().manual_seed(utils.derive_seed(self.cfg.seed, i)) for i in range(len(self.prompts))]
        policy.eval()
        with torch.no_grad(), self.autocast:
            images = self.pipe(self.prompts, num_inference_steps=25, guidance_scale=self.cfg.validation_guidance,
                               generator=gens).images
        policy.train()
        (self.out / "validation").mkdir(exist_ok=True)
        grid = utils.save_image_grid(images, self.prompts, f"validation, step {step}",
                                     self.out / "validation" / f"step-{step:06d}.png")
        self.tracker.log_image("validation", grid, step)

    def checkpoint(self, step: int):
        if self.enabled:
            utils.write_model_card(self.out / f"checkpoint-{step}", json.loads((self.out / "run.json").read_text()))
            utils.plot_curves(self.out)

    def close(self):
        if self.enabled:
            self.metrics.close()
            self.tracker.close()


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    """Train; returns the trained policy UNet (unwrapped) so tests and notebooks can inspect it."""
    utils.quiet_libraries()  # first: --tiny may build the tiny world while parsing
    cfg = parse_config(argv)
    if cfg.plot:
        print(f"wrote {utils.plot_curves(Path(cfg.plot))}")
        return None
    return utils.run_main(train, cfg, (DataError, TrainingError))


def train(cfg: Config, rank: int, world_size: int, device: torch.device):
    master = rank == 0
    out_dir = Path(cfg.output_dir)
    per_rank = cfg.train_batch_size * cfg.gradient_accumulation_steps  # images per rank and optimizer step
    if cfg.reference_point == "kl_mismatched":
        mismatched_indices(per_rank)  # fails early, with a clear message, for a batch of 1
    if cfg.optimizer == "adamw8bit":  # the released code's optimizer; imported only when asked for
        try:
            import bitsandbytes
        except ImportError as e:
            raise DataError("--optimizer adamw8bit needs bitsandbytes, which is not installed (pip install "
                            "bitsandbytes; CUDA GPUs only). Install it, or use --optimizer adamw.") from e
    table, dataset, desirable, counts = load_data(cfg)
    resume_from = find_resume(cfg)
    start_step = int(resume_from.name.split("-")[1]) if resume_from else 0

    # -- models: a trainable policy and a separate frozen reference, both from the base UNet ----------
    path = cfg.pretrained_model
    if path == "sd15-random":  # SD v1-5's architecture with random weights (benchmarks), built once
        path = str(__import__("fixtures").sd15_random_path())
    path = utils.check_pretrained(path, "--pretrained_model")
    policy, ref, scheduler, amp_dtype = load_models(cfg, path, device)
    model = torch.nn.parallel.DistributedDataParallel(policy) if world_size > 1 else policy  # ref is never wrapped
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
    if cfg.optimizer == "adamw8bit":
        optimizer = bitsandbytes.optim.AdamW8bit(policy.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    else:  # fused: one kernel for all parameters
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=0.0, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 gradients underflow
    warmup = lambda s: min(1.0, (s + 1) / max(cfg.lr_warmup_steps, 1))  # noqa: E731  linear, then constant
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    gen = torch.Generator(device).manual_seed(utils.derive_seed(cfg.seed, rank))  # noise, t, flips, dropout
    bad_steps, n_corrupt, n_seen = 0, 0, 0
    if resume_from:  # weights, optimizer, schedule, loss scale, step and every rank's generator
        from diffusers import UNet2DConditionModel
        policy.load_state_dict(UNet2DConditionModel.from_pretrained(resume_from, subfolder="unet").state_dict())
        state = torch.load(resume_from / "training_state.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", map_location=device, weights_only=True))
        lr_schedule.load_state_dict(state["lr_schedule"])
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        bad_steps = state["bad_steps"]
        rng_states = torch.load(resume_from / "rng_state.pt", weights_only=True)
        if len(rng_states) == world_size:
            gen.set_state(rng_states[rank])
        else:  # a different number of ranks: same weights and optimizer, new per-rank streams
            gen.manual_seed(utils.derive_seed(cfg.seed + start_step, rank))
            if master:
                print(f"warning: {resume_from} was saved by {len(rng_states)} ranks, resuming on {world_size}: "
                      "random streams restart, so the run will not match an uninterrupted one exactly")
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_record(cfg, out_dir, start_step, world_size, device, counts)
        print(f"{counts['num_desirable']} desirable / {counts['num_undesirable']} undesirable images; {world_size} "
              f"rank(s) x {cfg.train_batch_size} x {cfg.gradient_accumulation_steps} accumulation step(s) = global "
              f"batch {world_size * per_rank}; device {device}"
              + (f"; resuming from {resume_from} at step {start_step}" if resume_from else ""))

    # -- data: the desirable-ratio sampler resumes its exact stream; inputs from images or the latent cache ----
    captions = list(dict.fromkeys(["", *table["caption"]]))  # "" first: the dropped-out caption
    inputs = Inputs(cfg, path, dataset, captions, amp_dtype or torch.float32, autocast, device, rank, world_size)
    sampler = DesirableRatioSampler(desirable, cfg.desirable_ratio, seed=[cfg.seed, rank],
                                    start=start_step * per_rank)
    batches = iter(torch.utils.data.DataLoader(
        inputs.dataset, batch_size=per_rank, sampler=sampler, num_workers=cfg.dataloader_workers,
        pin_memory=device.type == "cuda", persistent_workers=cfg.dataloader_workers > 0))
    phases = Phases(cfg.profile, device, cfg.peak_tflops)
    reports = Reports(cfg, start_step, path, inputs, device, autocast, enabled=master)
    reports.validate(policy, start_step)  # the baseline grid, before any update
    bar = utils.Progress(cfg.max_train_steps, cfg.objective, initial=start_step, enabled=master)

    for step in range(start_step + 1, cfg.max_train_steps + 1):
        t0 = time.perf_counter()
        with phases("data"):
            batch = next(batches)
            is_desirable = batch["desirable"].to(device)
        with phases.count_flops():
            with phases("encode"), torch.no_grad(), autocast:
                x0, emb, emb_mismatched = inputs(batch, gen)
            with phases("forward_backward"), autocast:
                optimizer.zero_grad(set_to_none=True)
                loss, stats = kto_step(model, ref, scheduler, x0, emb, emb_mismatched, is_desirable, gen, cfg,
                                       backward=lambda loss_k: scaler.scale(loss_k).backward())
        with phases("clip"):
            scaler.unscale_(optimizer)                         # fp16: true gradients, so clipping sees their norm
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        with phases("optimizer"):
            # fp16 overflows are the scaler's business (it skips the step); any other NaN/inf: no rank steps
            sums = step_sums(loss, stats, is_desirable, torch.isfinite(grad_norm) | scaler.is_enabled(),
                             batch["corrupt"])
            skipped = sums["not_finite"].item() > 0            # the same decision on every rank
            bad_steps = bad_steps + 1 if skipped else 0
            lr = lr_schedule.get_last_lr()[0]
            scale = scaler.get_scale()
            if not skipped:
                scaler.step(optimizer)
            scaler.update()                                    # fp16: halve the loss scale after an overflow
            if not skipped and scaler.get_scale() >= scale:    # a step skipped (by us or the fp16 scaler) does
                lr_schedule.step()                             # not advance the learning-rate schedule
        n_corrupt, n_seen = n_corrupt + int(sums["corrupt"]), n_seen + int(sums["n"] + sums["corrupt"])
        utils.check_corrupt(n_corrupt, n_seen, min_seen=MIN_IMAGES_TO_JUDGE)  # every rank stops together

        seconds = time.perf_counter() - t0
        row = log_row(step, sums, stats["z"], grad_norm, lr, skipped, seconds)
        reports.log({**row, **phases.report(seconds)})
        bar.update(loss=f"{row['loss']:.4f}", z=f"{row['z']:.2e}", acc=f"{row['accuracy']:.2f}")
        if bad_steps >= cfg.max_bad_steps:
            raise TrainingError(f"{bad_steps} consecutive steps had a non-finite loss or gradient (step {step}); "
                                "the last good weights are in the latest checkpoint. Try a lower --learning_rate or "
                                "--beta, check the data for broken images, or raise --max_bad_steps.")
        reports.validate(policy, step)
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            save_checkpoint(cfg, policy, optimizer, lr_schedule, scaler, gen, step, bad_steps, rank, world_size)
            reports.checkpoint(step)
    bar.close()
    reports.close()
    if master:
        print(f"done: {out_dir / f'checkpoint-{cfg.max_train_steps}'}; curves: {out_dir / 'curves.png'}")
    return policy


if __name__ == "__main__":
    main()
