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
    python train_kto.py --train_batch_size 8                     # the same batch of 8 on 1 GPU (22 GB)
    python train_kto.py --gradient_accumulation_steps 4 --lora_rank 8   # LoRA adapters instead of the whole UNet
    python train_kto.py --pretrained_model stabilityai/stable-diffusion-xl-base-1.0 --resolution 1024 --lora_rank 8
    python train_kto.py --plot runs/kto                          # redraw a run's curves.png
Every flag: python train_kto.py --help. Outputs (docs/outputs.md): <output_dir>/run.json, metrics.jsonl,
curves.png, validation/, checkpoint-<step>/ (unet/ or the LoRA file, model card).
Other files (the README's table): models.py what is trained, encoders.py the model families' inputs, data.py
the likes and dislikes (pickapic.py: Pick-a-Pic's), latent_cache.py --cache_latents, heldout.py the held-out
margin, reports.py the run's record, profiling.py --profile, checkpoints.py the checkpoints, utils.py the run
time, tiny_world.py --tiny.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import checkpoints
import data
import encoders
import heldout
import models
import pickapic
import profiling
import reports
import tiny_world
import utils
from utils import DataError, TrainingError


@dataclass
class Config:
    # data and model
    pretrained_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """base model (hub id or diffusers folder; SD v1-5, SD 2.1 or SDXL, read from its configs): policy and ref"""
    pretrained_vae: str = ""
    """a replacement VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix ('': the base model's)"""
    dataset: str = "yuvalkirstain/pickapic_v2"
    """like/dislike data: Pick-a-Pic v2 (hub id or folder of its parquet shards), or a .csv/.jsonl/.json/.parquet
    file with columns image, caption, label"""
    label_policy: str = "won_once"
    """how Pick-a-Pic pairs become per-image labels (ties dropped, each image uid counted once): won_once =
    preferred in at least one comparison is desirable, never preferred is undesirable (paper); always_won =
    desirable only if never the loser, images that both won and lost are dropped"""
    output_dir: str = "runs/kto"
    """folder for run.json, metrics.jsonl and checkpoint-<step>/"""
    tiny: bool = False
    """train on the offline tiny world (tiny_world.py; built once, cached) with CPU-sized defaults; explicit
    flags still win"""
    world_seed: int = 0
    """with --tiny: which tiny world to build and train on (independent worlds per seed)"""
    resolution: int = 512
    """training image side in pixels (resize short side, center crop)"""
    random_flip: bool = True
    """flip each image horizontally with probability 0.5 (released code; paper silent)"""
    caption_dropout: float = 0.2
    """probability of replacing a caption by the unconditional input, the empty caption's (zeros for SDXL)
    (released code; not in the paper)"""
    desirable_ratio: float = 0.8
    """probability that a sample is drawn from the desirable set (the paper's gamma)"""
    dataloader_workers: int = 4
    """DataLoader worker processes per rank that decode images"""
    # the objective
    objective: str = "kto"
    """kto: Diffusion-KTO | sft: the paper's baseline, the plain denoising loss on desirable images only (same
    loop; --desirable_ratio is then 1 and --reference_point zero: SFT has no z; --beta, --utility, --lambda_d
    and --lambda_u have no effect)"""
    beta: float = 5000.0
    """scale of the implicit reward inside the utility (paper: 5000; released code: 1000)"""
    utility: str = "kahneman_tversky"
    """U in lambda_y * (1 - U(w * beta * (r - z))): kahneman_tversky = sigmoid | loss_averse = log sigmoid |
    risk_seeking = -log sigmoid(-x)"""
    reference_point: str = "kl_mismatched"
    """z: kl_mismatched (paper, KTO: rewards of mismatched image-caption pairs) | batch_mean (released code:
    rewards of the batch itself) | zero"""
    lambda_d: float = 1.0
    """loss weight lambda_D of desirable samples"""
    lambda_u: float = 1.0
    """loss weight lambda_U of undesirable samples"""
    lora_rank: int = 0
    """0: fine-tune the whole UNet (the paper's) | R: train rank-R LoRA adapters on its attention projections
    instead (peft); the reference is then the same UNet with the adapters off"""
    # optimisation
    train_batch_size: int = 2
    """images per rank per forward pass (global batch = this x accumulation steps x number of ranks)"""
    gradient_accumulation_steps: int = 1
    """forward/backward passes per optimizer step; z and the metrics are over the whole accumulated batch (the
    paper's batch 8 on 1 GPU where memory is short: 2 x 4, 3.8x slower than batch 8, docs/benchmarks.md)"""
    max_train_steps: int = 10_000
    """optimizer steps"""
    learning_rate: float = 1e-7
    """peak learning rate of AdamW (weight decay 0, i.e. Adam)"""
    lr_warmup_steps: int = 1000
    """steps of linear learning-rate warm-up (step k of W at k/W of the rate), then constant"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (released code: 1.0; 0: no clipping, the norm is still logged)"""
    seed: int = 0
    """seed for everything; ranks derive their own noise streams from (seed, rank), and take their own draws of
    one stream of images"""
    checkpointing_steps: int = 1000
    """save checkpoint-<step>/ every this many steps (and at the end)"""
    checkpoints_total_limit: int = 0
    """keep only the newest this many checkpoints (0: keep all)"""
    resume: str = ""
    """continue from a checkpoint-<step> folder, or 'latest' in output_dir (a fresh start if there is none);
    refused if a setting outside RESUMABLE (the data, model, objective, optimisation) differs from the
    checkpoint's, except that the global batch may be split otherwise (ranks x --train_batch_size x
    --gradient_accumulation_steps)"""
    max_bad_steps: int = 10
    """stop after this many consecutive steps with a non-finite loss or gradient (each is skipped: no update,
    no learning-rate step)"""
    allow_one_class: bool = False
    """train on data with only desirable or only undesirable samples"""
    # speed and memory (docs/benchmarks.md); attention is PyTorch's scaled_dot_product_attention
    mixed_precision: str = "auto"
    """autocast dtype of the UNets, frozen modules stored in it (norms in float32): auto (bf16 on GPUs that
    have it, fp16 + grad scaler on older GPUs, no on CPU) | bf16 | fp16 | no"""
    gradient_checkpointing: bool = False
    """recompute the policy's activations in the backward pass: less memory, one more policy forward (+12% of
    a kl_mismatched step's FLOPs, docs/benchmarks.md)"""
    optimizer: str = "adamw"
    """adamw (torch, fused kernel) | adamw8bit (bitsandbytes, installed separately; 2 instead of 8 bytes of
    state per parameter)"""
    compile: bool = False
    """torch.compile the repeated blocks of the policy and reference UNets (the first steps are slow)"""
    cache_latents: bool = False
    """encode every image (both flips with --random_flip) and caption once, to disk; training then never loads
    the VAE and text encoder"""
    cache_dir: str = ""
    """folder of the --cache_latents files (default: <output_dir>/latent_cache); reused and resumed when its
    settings match"""
    profile: bool = False
    """add seconds per phase of each step (time_<phase>, CUDA-synchronised), the step's FLOPs (counted once),
    TFLOP/s, GPU utilisation and, on a GPU, max_memory_gb to metrics.jsonl"""
    peak_tflops: float = 0.0
    """with --profile: the GPU's dense bf16/fp16 peak in TFLOP/s, for the utilisation (0: looked up by GPU
    name in PEAK_TFLOPS; none for unknown GPUs and CPUs)"""
    # watching a run (docs/outputs.md)
    validation_prompts: str = (
        "a photo of a cat on a sofa|a watercolor painting of a lighthouse at dusk|an astronaut riding a horse|"
        "a bowl of ramen, studio lighting"
    )
    """prompts sampled with the same seeds at every validation: '|'-separated, or a .txt file with one per
    line"""
    validation_steps: int = 500
    """sample the validation prompts every this many steps and at the start, into
    <output_dir>/validation/step-NNNNNN.png (0: never)"""
    validation_guidance: float = 7.5
    """classifier-free guidance scale of the validation images (25 steps)"""
    heldout_images: int = 256
    """images never trained on (at most a tenth of the data, and of each class at most a tenth rounded up),
    scored every --heldout_steps (heldout.py)"""
    heldout_steps: int = 1000
    """measure the held-out reward every this many steps (0: never; the cost: docs/outputs.md)"""
    report_to: str = "none"
    """also log metrics and validation grids to: none | tensorboard | wandb (WANDB_MODE=offline works without
    a network)"""
    plot: str = ""
    """only redraw <RUN_DIR>/curves.png from its metrics.jsonl (any run, resumed ones too); exit"""


# --tiny: a CPU-sized run on the tiny world (base model and feedback built once by tiny_world.py)
TINY = dict(
    resolution=32,
    train_batch_size=8,
    max_train_steps=200,
    learning_rate=1e-5,
    lr_warmup_steps=5,
    beta=200.0,
    checkpointing_steps=100,
    dataloader_workers=0,
    output_dir="runs/tiny",
    validation_steps=50,
    validation_guidance=3.0,
    heldout_steps=50,
    # the world's captions that never get feedback
    validation_prompts="|".join(tiny_world.HELD_OUT),
)
CHOICES = dict(
    label_policy=pickapic.LABEL_POLICIES,
    utility=("kahneman_tversky", "loss_averse", "risk_seeking"),
    reference_point=("kl_mismatched", "batch_mean", "zero"),
    objective=("kto", "sft"),
    mixed_precision=("auto", "bf16", "fp16", "no"),
    optimizer=("adamw", "adamw8bit"),
    report_to=reports.TRACKERS,
)
# Ranges of the numeric flags, checked before anything loads
AT_LEAST_1 = "resolution train_batch_size gradient_accumulation_steps max_train_steps checkpointing_steps max_bad_steps"
AT_LEAST_0 = """dataloader_workers lora_rank lr_warmup_steps checkpoints_total_limit validation_steps heldout_images
    heldout_steps beta learning_rate max_grad_norm lambda_d lambda_u peak_tflops validation_guidance seed"""
BOUNDS = dict.fromkeys(AT_LEAST_1.split(), (1, None)) | dict.fromkeys(AT_LEAST_0.split(), (0, None))
BOUNDS |= dict(caption_dropout=(0, 1), desirable_ratio=(0, 1))
# What may differ between a run and its resumption; anything else is refused. The data are compared by content
# (data.fingerprint), not by path; the output folder may have moved
RESUMABLE = set(
    "dataset output_dir max_train_steps checkpointing_steps checkpoints_total_limit resume max_bad_steps dataloader_workers "
    "gradient_checkpointing compile profile peak_tflops cache_latents cache_dir validation_prompts "
    "validation_steps validation_guidance report_to plot".split()
)


def parse_config(argv=None) -> Config:
    """Flags come from Config's fields. --tiny only changes defaults: flags given explicitly always win."""
    cfg, _ = utils.parse_config(
        Config, argv, __doc__, CHOICES, TINY, tiny_world.train_paths, BOUNDS, check_flags
    )
    cfg = utils.resolve_paths(
        cfg, ("output_dir", "cache_dir"), ("pretrained_model", "dataset", "pretrained_vae")
    )
    if cfg.pretrained_vae:
        utils.resolve_model(cfg.pretrained_vae, f"--pretrained_vae {cfg.pretrained_vae}")
    # SFT: desirable images only, and no reference point to compute
    return (
        dataclasses.replace(cfg, desirable_ratio=1.0, reference_point="zero")
        if cfg.objective == "sft"
        else cfg
    )


def check_flags(cfg: Config):
    """Flags that cannot work, alone or together, refused before anything is loaded or built (--tiny's
    world)."""
    # A loss that is the same for every sample trains nothing, silently (SFT's loss has no beta or weights)
    if cfg.beta == 0 and cfg.objective == "kto":
        raise DataError(
            "--beta 0: the utility is then the same for every image and nothing trains; beta must be > 0"
        )
    weight = cfg.desirable_ratio * cfg.lambda_d + (1 - cfg.desirable_ratio) * cfg.lambda_u
    if weight == 0 and cfg.objective == "kto":
        raise DataError(
            f"--lambda_d {cfg.lambda_d} --lambda_u {cfg.lambda_u} --desirable_ratio {cfg.desirable_ratio}: "
            "every sample drawn has loss weight 0 and nothing trains"
        )
    if cfg.reference_point == "kl_mismatched" and cfg.objective == "kto":
        # Each image is paired with another sample's caption: a batch of one fails now, with a clear message
        mismatched_indices(cfg.train_batch_size * cfg.gradient_accumulation_steps)
    # A missing optimizer or tracker package, or prompts file, fails now, not after the models load
    try:
        models.optimizer_class(cfg.optimizer)
    except ImportError as e:
        raise DataError(str(e)) from e
    reports.tracker_backend(cfg.report_to)
    if cfg.validation_steps and not reports.read_prompts(cfg.validation_prompts):
        raise DataError(
            f"--validation_prompts {cfg.validation_prompts!r}: no prompt in it; give at least one, or pass "
            "--validation_steps 0 for no validation images"
        )


# ----------------------------------------------------------------------------------------------------
# The objective (paper Eq. 8): the loss, the reference point, the frozen reference, one step


def denoising_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over latent elements of the squared error, per sample, in float32: shape [B]."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


def kto_loss(policy_err, ref_err, desirable, beta, z, utility="kahneman_tversky", lambda_d=1.0, lambda_u=1.0):
    """Per-sample Diffusion-KTO loss, lambda_y * (1 - U(w * beta * (r - z))), shape [B].

    policy_err, ref_err: [B] mean squared denoising errors; desirable: bool [B]; z: scalar reference point
    in the units of r. Written with sigmoid/softplus so that beta = 5000 cannot overflow in float32.
    """
    # Implicit reward: log pi_theta/pi_ref up to scale
    r = ref_err - policy_err
    # w(x0) = +1 desirable, -1 undesirable
    w = desirable.float() * 2 - 1
    # Eq. 8: w * (beta * log-ratio - Q_ref), Q_ref = beta z
    x = w * beta * (r - z)
    if utility == "kahneman_tversky":
        # U = sigmoid(x), so 1 - U = sigmoid(-x)
        one_minus_u = torch.sigmoid(-x)
    elif utility == "loss_averse":
        # U = log sigmoid(x), so 1 - U = 1 + softplus(-x)
        one_minus_u = 1 + F.softplus(-x)
    elif utility == "risk_seeking":
        # U = -log sigmoid(-x), so 1 - U = 1 - softplus(x)
        one_minus_u = 1 - F.softplus(x)
    else:
        raise ValueError(f"utility must be one of {', '.join(CHOICES['utility'])}; got {utility!r}")
    lambda_y = torch.where(
        desirable, torch.tensor(lambda_d, dtype=x.dtype), torch.tensor(lambda_u, dtype=x.dtype)
    )
    return lambda_y * one_minus_u


def reference_point(rewards: torch.Tensor) -> torch.Tensor:
    """z = max(0, mean of the rewards over all ranks), detached: KTO's estimate of KL(policy || ref).

    With rewards of mismatched (image, caption) pairs this is the paper's z; with the matched batch it is the
    released code's. Identical on every rank: the sum and the count are all-reduced (unequal sizes are fine)."""
    s = utils.global_sums(
        dict(sum=rewards.sum(), count=torch.tensor(float(rewards.numel()), device=rewards.device))
    )
    return (s["sum"] / s["count"]).clamp(min=0).detach()


def mismatched_indices(n: int) -> torch.Tensor:
    """Sample i is paired with the caption of sample i+1 (roll by one): no sample keeps its own row's caption. The
    partner's caption may be the same text (another image of the prompt, the same image drawn twice): such pairs
    stay in z's mean as drawn (README, departures)."""
    if n < 2:
        raise DataError(
            "--reference_point kl_mismatched pairs each image with another sample's caption, so it "
            f"needs --train_batch_size >= 2 per rank (got {n}). Raise the batch or use batch_mean."
        )
    return (torch.arange(n) + 1) % n


def frozen_reference(policy: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of the policy stored in `dtype`, except its normalisation layers, which keep the policy's
    exact float32 values. Autocast rounds conv/linear weights to bf16/fp16 for both models alike, but runs the
    norms with their parameters as stored: rounded norms would make ref != policy at step 0 (beta * std(r) ~ 1).
    It stays in the policy's train mode: diffusers' blocks branch on it (a ResnetBlock2D makes its shortcut's input
    contiguous only when training, which changes a CPU convolution's rounding); SD's UNets have no dropout."""
    return models.store_frozen(copy.deepcopy(policy), dtype)


def sft_loss(policy_err, ref_err, desirable, z):
    """The paper's SFT baseline: the plain denoising loss of the policy (the sampler then draws desirable images
    only). Same arguments as kto_loss, so that the training step does not branch on the objective."""
    return policy_err


def kto_step(
    policy,
    ref,
    scheduler,
    x0,
    cond,
    cond_mismatched,
    desirable,
    gen,
    loss_fn,
    z_from="kl_mismatched",
    micro_batches=1,
    backward=torch.Tensor.backward,
):
    """One step of the objective (paper Eq. 8) on a batch: the loss, its gradients and the step's statistics.

        L = E_{x0, t} [ lambda_y * (1 - U(w(x0) * beta * (r - z))) ]
        r = ||eps - eps_ref(x_t, t, c)||^2 - ||eps - eps_policy(x_t, t, c)||^2     (means over latent elements)

    x0: latents [B, 4, h, w]; cond / cond_mismatched: the UNet's keyword inputs (encoders.unet_inputs) for each
    image's own caption / for the caption of the sample it is mismatched with (kl_mismatched only); desirable: bool
    [B]; gen: this rank's generator.
    loss_fn(policy_err, ref_err, desirable, z=z): per-sample losses (kto_loss with its settings bound, or sft_loss).
    z_from: where the reference point z comes from (kl_mismatched | batch_mean | zero; --reference_point).
    `policy` may be DDP-wrapped; `ref` is frozen. The policy's forward and backward run in `micro_batches` chunks,
    each ending in backward(loss_k) (the caller may scale it for fp16); the micro-losses sum to the batch mean.
    Returns the loss (detached) and the per-sample r, policy_err, ref_err and the scalar z.
    """
    micro = torch.arange(len(x0), device=x0.device).chunk(micro_batches)
    # Sample noise and a timestep per image; x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, the same for both UNets
    eps = torch.randn(x0.shape, generator=gen, device=x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen, device=x0.device)
    x_t = scheduler.add_noise(x0, eps, t)
    # What the UNet predicts: the noise, or the velocity for v-prediction models (SD 2.1)
    target = scheduler.get_velocity(x0, eps, t) if scheduler.config.prediction_type == "v_prediction" else eps

    # Denoising error of samples i under the conditioning c (captions, and SDXL's sizes)
    def err(unet, c, i):
        return denoising_error(unet(x_t[i], t[i], **encoders.take(c, i)).sample, target[i])

    # ... of the whole batch, one micro-batch at a time (the batch shapes of the policy)
    def errors(unet, c):
        return torch.cat([err(unet, c, i) for i in micro])

    # Forwards without gradient skip DDP
    raw_policy = getattr(policy, "module", policy)
    with torch.no_grad():
        # Reference model's denoising error
        ref_err = errors(ref, cond)
        # Reference point z = max(0, mean r over all ranks), detached, before any loss: on mismatched (image,
        # caption) pairs, KTO's estimate of KL(policy || ref); or on the batch itself (the released code's); or 0
        if z_from == "kl_mismatched":
            z = reference_point(errors(ref, cond_mismatched) - errors(raw_policy, cond_mismatched))
        elif z_from == "batch_mean":
            z = reference_point(ref_err - errors(raw_policy, cond))
        else:
            z = torch.zeros((), device=x0.device)
    policy_err, loss = [], torch.zeros((), device=x0.device)
    for k, i in enumerate(micro):
        # DDP averages the gradients over ranks in the last micro-batch's backward only
        last = k == len(micro) - 1
        with contextlib.nullcontext() if last or not hasattr(policy, "no_sync") else policy.no_sync():
            # Policy's denoising error: the only forward with gradients
            policy_err.append(err(policy, cond, i))
            # Loss: lambda_y * (1 - U(w * beta * (r - z))), its share of the batch mean
            loss_k = loss_fn(policy_err[-1], ref_err[i], desirable[i], z=z).sum() / len(x0)
            backward(loss_k)
        loss = loss + loss_k.detach()
    policy_err = torch.cat(policy_err).detach()
    return loss, dict(r=ref_err - policy_err, z=z, policy_err=policy_err, ref_err=ref_err)


def objective(cfg: Config, backward):
    """kto_step with the run's settings bound: Diffusion-KTO's utility of the implicit reward, or the SFT baseline."""
    loss_fn = functools.partial(
        kto_loss, beta=cfg.beta, utility=cfg.utility, lambda_d=cfg.lambda_d, lambda_u=cfg.lambda_u
    )
    return functools.partial(
        kto_step,
        loss_fn=sft_loss if cfg.objective == "sft" else loss_fn,
        z_from=cfg.reference_point,
        micro_batches=cfg.gradient_accumulation_steps,
        backward=backward,
    )


# ----------------------------------------------------------------------------------------------------
# Data for the objective: the desirable-ratio sampler


class DesirableRatioSampler(torch.utils.data.Sampler):
    """This rank's share of one infinite stream of dataset indices: desirable with probability `ratio`, else
    undesirable, uniform within. Each step the ranks take the stream's next world_size x per_rank draws, rank r
    the r-th per_rank of them: no two ranks share a draw, and a run resumed after `start` draws (Counters.n_drawn)
    continues with the very images of an uninterrupted run, however the global batch is split."""

    def __init__(self, desirable, ratio, seed, rank=0, world_size=1, per_rank=1, start=0, held_out=None):
        # Never the held-out images (heldout.py)
        train = ~held_out if held_out is not None else np.ones(len(desirable), bool)
        self.d, self.u = np.flatnonzero(desirable & train), np.flatnonzero(~desirable & train)
        self.ratio = (ratio if len(self.u) else 1.0) if len(self.d) else 0.0
        self.seed, self.rank, self.world_size, self.per_rank = seed, rank, world_size, per_rank
        self.start, self.chunk = start, 4096

    def draws(self, k: int) -> np.ndarray:
        """The stream's draws k * chunk onwards (keyed as rank 0's own stream was, so one-rank runs draw as
        before)."""
        rng = np.random.default_rng([self.seed, 0, k])
        pick_d = rng.random(self.chunk) < self.ratio
        d = self.d[rng.integers(0, max(len(self.d), 1), self.chunk)] if len(self.d) else 0
        u = self.u[rng.integers(0, max(len(self.u), 1), self.chunk)] if len(self.u) else 0
        return np.where(pick_d, d, u)

    def __iter__(self):
        k, chunk = -1, None
        for step in itertools.count():
            first = self.start + (step * self.world_size + self.rank) * self.per_rank
            for i in range(first, first + self.per_rank):
                if i // self.chunk != k:
                    k = i // self.chunk
                    chunk = self.draws(k)
                yield int(chunk[i % self.chunk])


# ----------------------------------------------------------------------------------------------------
# Plumbing: the models and the loop (data: data.py; inputs: encoders.py; optimizer: models.py; checkpoints:
# checkpoints.py; the record: reports.py)


def load_models(cfg: Config, path: str, device: torch.device):
    """The trainable policy (float32 master weights) and the frozen reference, both from the base UNet; the
    noise scheduler; the autocast dtype (None: float32), which is also the dtype the frozen modules are stored
    in."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    amp_dtype = models.autocast_dtype(cfg.mixed_precision, device)
    # The objective's noise: the base model's discrete beta schedule; its target: the noise or the velocity
    models.check_noise_schedule(path)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    policy = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device).train()
    if cfg.lora_rank:
        # LoRA: only the adapters train; the reference is the same UNet with them off (no second UNet held)
        ref = models.AdaptersOff(models.add_lora(policy, cfg.lora_rank, amp_dtype or torch.float32, cfg.seed))
    else:
        # Two modules: never swap weights in and out of one
        ref = frozen_reference(policy, amp_dtype or torch.float32)
    if cfg.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    if cfg.compile:
        models.compile_blocks(policy, ref)
    return policy, ref, scheduler, amp_dtype


# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    """Train; returns the trained policy UNet (unwrapped) so tests and notebooks can inspect it (None with --plot
    or when nothing is left to train)."""
    utils.quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    # First: --tiny may build the tiny world while parsing
    with utils.reported((DataError,)):
        cfg = parse_config(argv)
    if cfg.plot:
        print(f"wrote {reports.plot_curves(Path(cfg.plot))}")
        return None
    stopped = lambda cfg: checkpoints.resume_command(cfg, os.path.relpath(__file__), argv)
    command = [os.path.relpath(__file__), *argv]
    errors, folder = (DataError, TrainingError), ("--output_dir", Path(cfg.output_dir))
    return utils.run_main(functools.partial(train, command=command), cfg, errors, stopped, folder)


def train(cfg: Config, rank: int, world_size: int, device: torch.device, command: list[str]):
    # Images per rank and optimizer step
    per_rank = cfg.train_batch_size * cfg.gradient_accumulation_steps
    mismatched = mismatched_indices if cfg.reference_point == "kl_mismatched" else None
    # The output folder, the data and the run to resume, checked before any model loads
    utils.check_shared_folder(Path(cfg.output_dir), rank, world_size)
    # A relaunch of a finished run (a restart or requeue after its last save): nothing to train; only curves.png
    # is redrawn, where the run stopped before drawing its last steps
    if done := checkpoints.finished(cfg):
        if rank == 0:
            reports.redraw_stale_curves(Path(cfg.output_dir))
        print(f"nothing to train: {done} is the run's last step (--max_train_steps)", flush=True)
        return None
    # The data and its held-out images (never trained on: the sampler skips them; scored with fixed draws)
    table, dataset, desirable, held_out, counts = data.load_data(cfg)
    resume_from = checkpoints.find_resume(cfg, RESUMABLE, data_id := counts["fingerprint"], world_size)
    if rank == 0:  # what saves killed midway left (checkpoint-<step>.*.tmp, as large as a checkpoint)
        checkpoints.remove_stopped_saves(Path(cfg.output_dir))

    # The trainable policy and a separate frozen reference, both from the base model's UNet
    path = utils.check_pretrained(cfg.pretrained_model, "--pretrained_model")
    policy, ref, scheduler, amp_dtype = load_models(cfg, path, device)
    # Ref: never wrapped
    model = torch.nn.parallel.DistributedDataParallel(policy) if world_size > 1 else policy
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
    optimizer, lr_schedule, scaler = models.make_optimizer(cfg, policy, device, amp_dtype)
    # Noise, t, flips, dropout
    gen = torch.Generator(device).manual_seed(utils.derive_seed(cfg.seed, rank))
    state = checkpoints.State(policy, optimizer, lr_schedule, scaler, gen)
    # Counters: non-finite steps in a row, corrupt images, images read and the image stream's draws used
    start_step, counters = checkpoints.load_checkpoint(resume_from, state, cfg, rank, world_size, device)
    record = reports.Reports(
        cfg, start_step, path, device, autocast, world_size, counts, resume_from, command, rank == 0
    )

    # The data: desirable with probability gamma (a stream a resume continues exactly), encoded or from the cache
    inputs = encoders.Inputs(
        cfg, path, dataset, table["caption"], amp_dtype, autocast, device, rank, world_size, mismatched
    )
    measure = heldout.HeldOut(
        held_out, inputs, scheduler, autocast, denoising_error, cfg.seed, rank, world_size
    )
    sampler = DesirableRatioSampler(
        desirable, cfg.desirable_ratio, cfg.seed, rank, world_size, per_rank, counters.n_drawn, held_out
    )
    # The objective, chosen once; fp16: the loss scaled so that its gradients do not underflow
    step_fn = objective(cfg, backward=lambda loss_k: scaler.scale(loss_k).backward())
    phases = profiling.Phases(cfg.profile, device, cfg.peak_tflops)
    # SIGTERM from here on: finish the step, save, stop
    stop = utils.StopRequest()
    # The baseline grid, before any update
    record.validate(policy, start_step, inputs)

    # The batches' worker processes (which ignore SIGTERM: encoders.ignore_sigterm) stop on every way out
    with contextlib.closing(inputs.loader(sampler, per_rank)) as batches:
        for step in range(start_step + 1, cfg.max_train_steps + 1):
            t0 = time.perf_counter()
            with phases("data"):
                batch = next(batches)
                is_desirable = batch["desirable"].to(device)
            with phases.count_flops():
                with phases("encode"), torch.no_grad(), autocast:
                    x0, cond, cond_mismatched = inputs(batch, gen)
                with phases("forward_backward"), autocast:
                    optimizer.zero_grad(set_to_none=True)
                    loss, stats = step_fn(model, ref, scheduler, x0, cond, cond_mismatched, is_desirable, gen)
            with phases("clip"):
                # Fp16: the true gradients, so that clipping sees their norm
                scaler.unscale_(optimizer)
                trained = optimizer.param_groups[0]["params"]
                # 0: no clipping (a bound of inf scales by exactly 1); the norm is still computed and logged
                grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm or float("inf"))
            with phases("optimizer"):
                # A non-finite loss or gradient on any rank: no rank steps (fp16 overflows: the scaler's business)
                finite = torch.isfinite(grad_norm) | scaler.is_enabled()
                sums = reports.step_sums(loss, stats, is_desirable, finite, batch["corrupt"], stop.requested)
                lr = lr_schedule.get_last_lr()[0]
                # fp16: the scaler also skips a step whose gradients overflowed (not a bad step: it lowers the scale)
                skipped = not models.update(optimizer, lr_schedule, scaler, sums["not_finite"].item() > 0)
            # Too many corrupt images stops every rank here
            counters.count(sums)

            seconds = time.perf_counter() - t0
            row = reports.log_row(step, sums, stats["z"], grad_norm, lr, skipped, seconds)
            row |= phases.report(seconds)
            # Every --heldout_steps steps only (not at a run's last step): a resumed run measures where the whole did
            if held_out.any() and step % cfg.heldout_steps == 0:
                row |= measure(policy, ref, cfg.train_batch_size)
            record.log(row)
            utils.check_bad_steps(counters.bad_steps, cfg.max_bad_steps, step)
            record.validate(policy, step, inputs)
            # Preemption (SIGTERM on any rank): the step is done; save it and stop, resumable
            preempted = sums["stop"].item() > 0
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps or preempted:
                checkpoints.save_checkpoint(
                    cfg, state, step, counters, rank, world_size, data_id, record.card(step)
                )
                record.checkpoint()
            # Preempted at the last step: the run is complete and ends as usual
            if preempted and step < cfg.max_train_steps:
                raise utils.Preempted(f"SIGTERM at step {step}: the step was finished and saved.")
    record.close()
    return policy


if __name__ == "__main__":
    main()
