"""What is trained, and what a checkpoint of it holds: full fine-tuning of the UNet (the paper's recipe), or LoRA
adapters on its attention projections (peft, as diffusers uses it), whose frozen reference is the same UNet with
the adapters switched off, so that no second UNet is held. A full policy is saved as a diffusers `unet/` folder;
a LoRA policy as `pytorch_lora_weights.safetensors` in the diffusers LoRA format, which
`pipe.load_lora_weights(folder)` reads. Also the frozen modules' storage (store_frozen), the autocast dtype
(--mixed_precision), regional compilation (--compile), the optimizer of the trainable parameters and its step,
which base models the objective can train (check_noise_schedule), and how a checkpoint folder is read back
(describe_model: its base model and VAE from the run's run.json; trained_components and load_pipeline: the
base model's pipeline with the trained parts in place)."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch

from utils import DataError, resolve_model

LORA_FILE = "pytorch_lora_weights.safetensors"
# The attention projections of every transformer block (self- and cross-attention), as in diffusers' LoRA scripts
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def check_noise_schedule(path: str):
    """The objective noises images with the base model's discrete beta schedule (the DDPM family: DDPM, DDIM,
    PNDM, Euler, DPM-Solver configs) and regresses the noise or the velocity. A model trained otherwise (EDM,
    e.g. Playground v2.5; flow matching, e.g. SD3; x0-prediction) would be trained on inputs and targets it
    never saw, silently: refused before its weights load."""
    from diffusers import DDPMScheduler

    config = DDPMScheduler.load_config(path, subfolder="scheduler")
    where = f"--pretrained_model {path}: its scheduler ({config.get('_class_name')}, "
    where += "scheduler/scheduler_config.json)"
    if config.get("beta_schedule") is None and config.get("trained_betas") is None:
        raise DataError(
            f"{where} has no discrete beta schedule (an EDM or flow-matching model?); Diffusion-KTO here "
            "trains models with DDPM-family schedules only (SD v1-5, SD 2.1, SDXL)"
        )
    if config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise DataError(
            f"{where} predicts {config['prediction_type']!r}; the training step regresses the noise "
            "(epsilon) or the velocity (v_prediction) only"
        )


def store_frozen(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Freeze `module` and store its weights in `dtype`, except its normalisation layers, which keep their exact
    float32 values: autocast rounds conv/linear weights to bf16/fp16 for a frozen and a trainable module alike,
    but runs norms with their parameters as stored (rounded norms would make ref != policy at step 0)."""
    module.requires_grad_(False)
    for m in module.modules():
        if not isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            for p in m.parameters(recurse=False):
                p.data = p.data.to(dtype)
    return module


def add_lora(unet, rank: int, frozen_dtype: torch.dtype, seed: int):
    """LoRA adapters of rank `rank` (alpha = rank: scale 1) on the attention projections of `unet`, in place.
    The base weights are frozen and stored as the reference's are (store_frozen); the adapters, the only
    trainable parameters, are float32 (master weights, as the full policy's). lora_A is drawn from `seed` (the
    same on every rank and every launch) from N(0, 1/rank^2), as diffusers' LoRA scripts draw it (peft's
    "gaussian"; peft's default, Kaiming-uniform, is 4-10x smaller at rank 8, so the adapters would move that
    much less per step at a learning rate taken from those scripts); lora_B starts at 0: policy ==
    reference."""
    from peft import LoraConfig

    store_frozen(unet, frozen_dtype)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
    trainable_float32(unet)
    return unet


def trainable_float32(unet):
    """peft creates (and a load may restore) adapters in the base layer's dtype: the trainable ones go float32."""
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def is_lora(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))


class AdaptersOff(torch.nn.Module):
    """The frozen reference of a LoRA policy: the policy's own UNet with its adapters switched off for the call.
    Holds the UNet without registering it as a submodule: no parameters of its own, nothing to save or train."""

    def __init__(self, unet):
        super().__init__()
        self.unet = [unet]

    def forward(self, *args, **kwargs):
        unet = self.unet[0]
        unet.disable_adapters()
        try:
            return unet(*args, **kwargs)
        finally:
            unet.enable_adapters()

    def compile_repeated_blocks(self):
        """Nothing to compile: the blocks are the policy's, compiled with it."""


def load_pipeline(path: str, **components):
    """The base model's own pipeline class (model_index.json's: StableDiffusionPipeline, StableDiffusionXLPipeline,
    ...), with `components` in place of its own and no safety checker."""
    import inspect

    import diffusers

    cls = getattr(diffusers, diffusers.DiffusionPipeline.load_config(path)["_class_name"])
    if "safety_checker" in inspect.signature(cls.__init__).parameters:
        components = dict(
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, **components
        )
    return cls.from_pretrained(path, **components)


def describe_model(spec: str, flag: str) -> dict:
    """{'base': diffusers folder/id, 'unet': checkpoint UNet folder or None, 'lora': checkpoint folder holding a LoRA
    file or None, 'vae': the VAE trained with (--pretrained_vae), only where there is one}, checked to exist. A checkpoint-<step>
    folder holds only unet/ (or the LoRA file); its base model and VAE are config.pretrained_model and
    config.pretrained_vae in the run.json above."""
    path = Path(spec)
    lora = (path / LORA_FILE).exists()
    if (lora or (path / "unet" / "config.json").exists()) and not (path / "model_index.json").exists():
        run_json = path.parent / "run.json"
        if not run_json.exists():
            raise DataError(
                f"{flag} {spec}: a UNet checkpoint without {run_json}, so its base model is unknown. "
                f"Pass the checkpoint of a train_kto.py run, or a full diffusers folder / hub id."
            )
        config = json.loads(run_json.read_text())["config"]
        base, vae = config["pretrained_model"], config.get("pretrained_vae") or None
        resolve_model(base, f"{flag} {spec}: its base model {base} (in {run_json})", "model_index.json")
        if vae:
            resolve_model(vae, f"{flag} {spec}: the VAE it was trained with, {vae} (in {run_json})")
        model = dict(base=base, unet=None if lora else str(path / "unet"), lora=str(path) if lora else None)
        # 'vae' only where one was trained with: images/generation.json of earlier runs stays the same
        return model | {"vae": vae} if vae else model
    if path.is_dir() and not (path / "model_index.json").exists():
        raise DataError(
            f"{flag} {spec}: neither a checkpoint-<step> folder (with unet/ or {LORA_FILE}) nor a "
            "diffusers model folder (with model_index.json)."
        )
    return dict(base=resolve_model(spec, f"{flag} {spec}", "model_index.json"), unet=None, lora=None)


def weights_digest(model: dict) -> str | None:
    """sha256 of the UNet weights a describe_model dict generates with: the checkpoint's unet/ files, or its LoRA
    file and the local base's unet/ files the adapters load into, or a local diffusers folder's unet/; None for a
    hub id (named by its id; a LoRA file on a hub base: the adapters alone). So a checkpoint retrained, or a
    pipeline exported, into the same folder is another model (about a second per GB read)."""
    files = [Path(model["lora"]) / LORA_FILE] if model["lora"] else []
    files += sorted(Path(model["unet"] or Path(model["base"]) / "unet").glob("diffusion_pytorch_model*"))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            hashlib.file_digest(fh, lambda: digest)
    return digest.hexdigest()


def trained_components(model: dict, dtype=None) -> dict:
    """The parts of `model` (describe_model) that replace its base model's: the checkpoint's UNet, the VAE trained
    with. LoRA adapters are loaded into the pipeline afterwards."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    parts = dict(unet=(UNet2DConditionModel, model["unet"]), vae=(AutoencoderKL, model.get("vae")))
    return {name: cls.from_pretrained(path, dtype=dtype) for name, (cls, path) in parts.items() if path}


def autocast_dtype(mixed_precision: str, device: torch.device):
    """--mixed_precision as a dtype (None: float32); auto is bf16 on GPUs that have it, fp16 on older ones."""
    if mixed_precision == "auto":
        no_bf16 = device.type == "cuda" and not torch.cuda.is_bf16_supported()
        mixed_precision = "no" if device.type != "cuda" else "fp16" if no_bf16 else "bf16"
    return dict(bf16=torch.bfloat16, fp16=torch.float16).get(mixed_precision)


def compile_blocks(policy, ref):
    """--compile, regional: the UNet's repeated blocks (diffusers' `_repeated_blocks`), compiled in place, so that
    state_dict keys, saving and DDP are unchanged; blocks of one shape share one compiled graph. Allows a graph per
    block shape, weight dtype (policy float32, ref bf16) and grad mode."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # Round bf16/fp16 intermediates inside fused kernels as eager does. Otherwise the policy's training graph and the
    # reference's inference graph round differently and r is not 0 at step 0 (docs/benchmarks.md, "Compilation")
    torch._inductor.config.emulate_precision_casts = True
    policy.compile_repeated_blocks()
    ref.compile_repeated_blocks()


def save_policy(policy, folder: Path):
    """The trained weights into a checkpoint folder: unet/ (full), or the LoRA file (adapters only)."""
    if not is_lora(policy):
        policy.save_pretrained(folder / "unet")
        return
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(policy))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=LORA_FILE)


def load_policy(policy, folder: Path):
    """What save_policy wrote, into a policy made the same way (full, or with the same adapters)."""
    if not is_lora(policy):
        policy.load_state_dict(type(policy).from_pretrained(folder, subfolder="unet").state_dict())
        return
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state, _ = StableDiffusionPipeline.lora_state_dict(folder, weight_name=LORA_FILE)
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    result = set_peft_model_state_dict(policy, state, adapter_name="default")
    # peft loads what matches and returns the rest: an adapter left out would silently keep its initial weights
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{folder / LORA_FILE} does not fit the policy's adapters: the policy's adapters it lacks "
            f"{missing[:3]}, its keys the policy does not have {result.unexpected_keys[:3]}. Resume from a "
            "checkpoint written with the same --pretrained_model and --lora_rank."
        )
    trainable_float32(policy)


# ----------------------------------------------------------------------------------------------------
# The optimizer of the trainable parameters


def optimizer_class(name: str):
    """torch's AdamW as one fused kernel, or bitsandbytes' AdamW8bit (the released code's; 2 instead of 8 bytes of
    state per parameter), imported here, before any model loads, so that a missing package fails at once."""
    if name == "adamw":
        return functools.partial(torch.optim.AdamW, fused=True)
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(
            "--optimizer adamw8bit needs bitsandbytes, which is not installed (pip install "
            "bitsandbytes; CUDA GPUs only). Install it, or use --optimizer adamw."
        ) from e
    return bitsandbytes.optim.AdamW8bit


def make_optimizer(cfg, policy, device: torch.device, amp_dtype):
    """Adam (AdamW, weight decay 0) over the trainable parameters, a linear learning-rate warm-up then constant,
    and the loss scaler that fp16 gradients need (a no-op otherwise)."""
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = optimizer_class(cfg.optimizer)(trainable, lr=cfg.learning_rate, weight_decay=0.0)
    warmup = lambda s: min(1.0, (s + 1) / max(cfg.lr_warmup_steps, 1))
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    return optimizer, lr_schedule, torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def update(optimizer, lr_schedule, scaler, skipped: bool) -> bool:
    """The optimizer step, unless skipped; with fp16 the scaler also skips a step whose gradients overflowed (and
    halves its scale). The learning-rate schedule advances only when a step was taken. Returns whether it was."""
    scale = scaler.get_scale()
    if not skipped:
        scaler.step(optimizer)
    scaler.update()
    taken = not skipped and scaler.get_scale() >= scale
    if taken:
        lr_schedule.step()
    return taken
