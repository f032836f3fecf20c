"""A checkpoint's model card (checkpoint-<step>/README.md, the Hugging Face format): what was trained, from what, with
which recipe and license, the code that loads it, the held-out margin; written at each save, extended by eval.py's
results."""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

from models import LORA_FILE
from utils import DataError, atomic_path, is_hub_id

CARD_TAGS = ["diffusion-kto", "text-to-image", "stable-diffusion", "diffusers"]


RECIPE = (
    "objective",
    "beta",
    "utility",
    "reference_point",
    "learning_rate",
    "lr_warmup_steps",
    "train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "max_train_steps",
    "desirable_ratio",
    "lora_rank",
)

# Settings that SFT's loss does not read
KTO_ONLY = ("beta", "utility", "reference_point")


def base_license(base: str) -> str:
    """creativeml-openrail-m for Stable Diffusion v1-5 (any owner's copy: the name is the model), else other."""
    return (
        "creativeml-openrail-m"
        if base.rstrip("/").rsplit("/", 1)[-1].lower() == "stable-diffusion-v1-5"
        else "other"
    )


def heldout_section(heldout: dict | None) -> str:
    """The model card's section on the held-out reward (heldout.py), measured at step heldout["step"]."""
    if not heldout:
        return ""
    value = lambda v: "n/a (no held-out image of the class)" if v is None else f"{v:.4g}"  # noqa: E731
    rows = "\n".join(f"| `{k}` | {value(v)} |" for k, v in heldout.items() if k != "step")
    return f"""## Held-out reward at step {heldout["step"]}

Images never trained on, scored with fixed draws (`heldout.py`); the margin is the mean implicit reward of the liked
minus the disliked ones (0 for the base model).

| metric | value |
|---|---|
{rows}

"""


def write_model_card(ckpt_dir: Path, run: dict, heldout: dict | None = None, name: str = "") -> Path:
    """<ckpt_dir>/README.md for a checkpoint-<step> folder: Hub metadata (huggingface_hub's ModelCardData), the
    recipe, the data, the step and how to load it. `run`: the run.json of train_kto.py; `name`: the folder's
    name once saved (default: ckpt_dir's; the card is written into the checkpoint's temporary folder). Returns
    the path."""
    from huggingface_hub import ModelCard, ModelCardData

    ckpt_dir, cfg = Path(ckpt_dir), run.get("config", {})
    name = name or ckpt_dir.name
    base = str(cfg.get("pretrained_model", "?"))
    found = re.match(r"checkpoint-(\d+)", name)
    step = int(found.group(1)) if found else run.get("step", "?")
    terms = base_license(base)
    data = ModelCardData(
        base_model=base if is_hub_id(base) else None,
        tags=[*CARD_TAGS, *(["lora"] if cfg.get("lora_rank") else [])],
        library_name="diffusers",
        license=terms,
        pipeline_tag="text-to-image",
    )
    recipe = dict(cfg, world_size=run.get("world_size", "?"))
    sft = cfg.get("objective") == "sft"
    # SFT's loss has no beta, utility or reference point
    rows = "\n".join(f"| `{k}` | {recipe.get(k, '?')} |" for k in RECIPE if not (sft and k in KTO_ONLY))
    method = "the paper's SFT baseline (the denoising loss on liked images only)" if sft else "Diffusion-KTO"
    # Pick-a-Pic's comparisons become labels by a policy; a table's labels are its own (None)
    policy = run.get("label_policy", cfg.get("label_policy"))
    held_out = run.get("num_heldout") or 0
    lora = cfg.get("lora_rank", 0)
    what = f"Rank-{lora} LoRA adapters of the UNet" if lora else "The UNet"
    # the VAE it was trained with (--pretrained_vae) replaces the base model's
    vae = cfg.get("pretrained_vae")
    imports = [
        "DiffusionPipeline",
        *(["UNet2DConditionModel"] if not lora else []),
        *(["AutoencoderKL"] if vae else []),
    ]
    lines = [f"from diffusers import {', '.join(sorted(imports))}", ""]
    parts = []
    if vae:
        lines.append(f'vae = AutoencoderKL.from_pretrained("{vae}")  # the VAE it was trained with')
        parts.append("vae=vae")
    if not lora:
        lines.append(f'unet = UNet2DConditionModel.from_pretrained("{name}", subfolder="unet")')
        parts.append("unet=unet")
    lines.append("pipe = DiffusionPipeline.from_pretrained(" + ", ".join([f'"{base}"', *parts]) + ")")
    if lora:
        lines.append(f'pipe.load_lora_weights("{name}", weight_name="{LORA_FILE}")')
    lines.append('image = pipe("a photo of an astronaut riding a horse").images[0]')
    code = "\n".join(lines)
    held = "the fine-tuned UNet (`unet/`)"
    if lora:
        held = f"LoRA adapters of the UNet (`{LORA_FILE}`, the diffusers LoRA format), not a UNet"
    held += "; the other parts come from the base model" + (" and the VAE it was trained with" if vae else "")
    use = f"""This folder holds {held}:

```python
{code}
```
"""
    body = f"""
# Diffusion-KTO: {ckpt_dir.parent.name}, step {step}

{what} of Stable Diffusion fine-tuned with {method} (Li et al., NeurIPS 2024) from per-image
like/dislike labels, by `train_kto.py`, for {step} steps. Base model: `{base}`\
{"" if is_hub_id(base) else " (a local folder)"}.

License: {terms}. The base model's license applies to these weights as to the base model itself.

## Recipe

| setting | value |
|---|---|
{rows}

## Data

`{cfg.get("dataset", "?")}`: {run.get("num_desirable", "?")} desirable and {run.get("num_undesirable", "?")} \
undesirable images{f" (label policy `{policy}`)" if policy else ""}\
{f", of which {held_out} held out (never trained on)" if held_out else ""}.

{heldout_section(heldout)}## Use

{use}
`python eval.py --ckpt {name} --export OUT` writes a complete pipeline folder{" (adapters fused)" if lora else ""}:
`DiffusionPipeline.from_pretrained("OUT")`.
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    with atomic_path(ckpt_dir / "README.md") as tmp:
        card.save(tmp)
    return ckpt_dir / "README.md"


def append_to_model_card(ckpt_dir: Path, section: str) -> None:
    """Add a markdown `section` to <ckpt_dir>/README.md; a section with the same first (heading) line is replaced,
    up to the next heading of the same or a higher level. Evaluations running at once (study.py --jobs) take turns:
    a lock on the folder, so that no one's section is lost."""
    file = Path(ckpt_dir) / "README.md"
    if not file.is_file():
        raise DataError(f"{file}: no model card to add to (train_kto.py writes one with each checkpoint).")
    folder = os.open(ckpt_dir, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        replace_section(file, section)
    finally:
        os.close(folder)


def replace_section(file: Path, section: str) -> None:
    """append_to_model_card's edit, under its lock."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(file)
    heading, section = section.strip().splitlines()[0].strip(), section.strip()
    level = len(heading) - len(heading.lstrip("#"))
    out, replaced, skipping, fenced = [], False, False, False
    for line in card.text.strip().splitlines():
        fenced ^= line.startswith("```")
        depth = len(line) - len(line.lstrip("#"))
        if line.strip() == heading and not replaced:
            out, replaced, skipping = out + [section, ""], True, True
        elif skipping and not fenced and 0 < depth <= level and line[depth : depth + 1] == " ":
            skipping = False
        if not skipping:
            out.append(line)
    text = "\n".join(out).strip() + ("\n" if replaced else "\n\n" + section + "\n")
    with atomic_path(file) as tmp:
        ModelCard(f"---\n{card.data.to_yaml()}\n---\n\n{text}").save(tmp)
