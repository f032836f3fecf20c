"""Helpers shared by train_kto.py and eval.py.

- reading a like/dislike dataset (CSV, JSONL or parquet) and checking it before any training starts;
- turning images into the [-1, 1] tensors a Stable Diffusion VAE expects (PIL + torch, no torchvision);
- the offline "tiny" world: a small Stable-Diffusion-shaped model and a small labelled dataset that the
  repository builds itself, so every code path runs on a CPU without the Hugging Face hub.

Nothing here knows about KTO; the method lives in train_kto.py.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw


class DataError(ValueError):
    """Bad user input (a dataset, a path, a flag). The scripts print the message and exit, no traceback."""


# ----------------------------------------------------------------------------------------------------
# Images


def load_image(source, base_dir: Path | None = None) -> Image.Image:
    """An RGB PIL image from a path (relative to base_dir) or from encoded bytes (PNG, JPEG, ...)."""
    if isinstance(source, dict) and "bytes" in source:  # datasets' Image feature stored in parquet
        source = source["bytes"]
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source))).convert("RGB")
    path = Path(source)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return Image.open(path).convert("RGB")


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, center-crop a square, scale to [-1, 1]; returns [3, H, W]."""
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float().div(127.5).sub(1.0)


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """Inverse of image_to_tensor for one [3, H, W] tensor in [-1, 1]."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(x)


# ----------------------------------------------------------------------------------------------------
# Like/dislike datasets: a table with columns image, caption, label

LABEL_VALUES = {
    "1": True, "1.0": True, "true": True, "desirable": True,
    "0": False, "0.0": False, "false": False, "undesirable": False,
}
REQUIRED_COLUMNS = ("image", "caption", "label")


def read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path, keep_default_na=False, dtype={"caption": str, "label": str})
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise DataError(
        f"--dataset {path}: unsupported file type '{suffix}'. Expected a .csv, .jsonl or .parquet file "
        f"with columns {', '.join(REQUIRED_COLUMNS)}."
    )


def load_feedback(path: str | Path) -> pd.DataFrame:
    """Read and check a like/dislike table. Returns columns image, caption, desirable (bool).

    `image` is a path relative to the table's folder (or absolute), or the image's encoded bytes.
    `label` is 1/0, true/false or desirable/undesirable. Raises DataError naming the file, the column or
    row, and what was expected.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"--dataset {path}: no such file. Pass a .csv, .jsonl or .parquet file.")
    table = read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(
            f"--dataset {path}: missing column(s) {', '.join(missing)}. Found columns: "
            f"{', '.join(map(str, table.columns))}. Expected image (a path relative to the file, or image "
            f"bytes), caption (text) and label (1/0, true/false or desirable/undesirable)."
        )
    if len(table) == 0:
        raise DataError(f"--dataset {path}: the table has no rows.")
    labels = table["label"].map(lambda v: LABEL_VALUES.get(str(v).strip().lower()))
    bad = labels.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"--dataset {path}: column 'label', row {row} (0-based, {int(bad.sum())} bad rows in all) has "
            f"value {table['label'].iloc[row]!r}. Expected 1/0, true/false or desirable/undesirable."
        )
    images = table["image"]
    is_path = images.map(lambda v: isinstance(v, str))
    if is_path.any():
        base = path.parent
        exists = images[is_path].map(lambda p: Path(p).is_absolute() and Path(p).exists() or (base / p).exists())
        if not exists.all():
            row = int(exists.index[~exists.to_numpy()][0])
            raise DataError(
                f"--dataset {path}: column 'image', row {row}: image file {images.iloc[row]!r} does not exist "
                f"(paths are relative to {base}). {int((~exists).sum())} image path(s) are missing in all."
            )
    captions = table["caption"].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    return pd.DataFrame({"image": images, "caption": captions, "desirable": labels.astype(bool)})


class FeedbackDataset(torch.utils.data.Dataset):
    """Decodes one image at a time (in DataLoader workers); nothing is held decoded in memory."""

    def __init__(self, table: pd.DataFrame, base_dir: Path, resolution: int):
        self.images = table["image"].tolist()
        self.captions = table["caption"].tolist()
        self.desirable = torch.as_tensor(table["desirable"].to_numpy(), dtype=torch.bool)
        self.base_dir, self.resolution = Path(base_dir), resolution

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        pixels = image_to_tensor(load_image(self.images[i], self.base_dir), self.resolution)
        return {"pixel_values": pixels, "caption": self.captions[i], "desirable": self.desirable[i]}


# ----------------------------------------------------------------------------------------------------
# The tiny offline world: coloured shapes, captions that name them, a hidden "utility" that likes big
# shapes in the colour the caption asks for. Labels are derived from that utility.

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20)}
WORDS = ["a", "on", "background", *COLORS, *SHAPES, *BACKGROUNDS]


def draw_shape(shape: str, color: str, background: str, size: float, center, resolution: int) -> Image.Image:
    """Draw one shape (size = half-width as a fraction of the image) at 4x and downsample (anti-aliasing)."""
    s = 4 * resolution
    image = Image.new("RGB", (s, s), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    cx, cy, r = center[0] * s, center[1] * s, size * s
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return image.resize((resolution, resolution), Image.LANCZOS)


def sample_world(rng: np.random.Generator, resolution: int):
    """One (image, caption, utility) from the world. Utility in [0, 1]: right colour and large size."""
    shape, asked, background = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(BACKGROUNDS))
    color = asked if rng.random() < 0.5 else rng.choice([c for c in COLORS if c != asked])
    size = float(rng.uniform(0.12, 0.45))
    center = rng.uniform(0.5 - (0.5 - size) * 0.8, 0.5 + (0.5 - size) * 0.8, size=2)
    image = draw_shape(shape, color, background, size, center, resolution)
    caption = f"a {asked} {shape} on a {background} background"
    utility = 0.5 * (color == asked) + 0.5 * (size - 0.12) / 0.33
    return image, caption, utility


def tiny_prompts() -> list[str]:
    """Every caption the tiny world can produce (colour x shape x background), in a fixed order."""
    return [f"a {c} {s} on a {b} background" for c in COLORS for s in SHAPES for b in BACKGROUNDS]


def build_clip_tokenizer(words, path: Path):
    """A CLIP BPE tokenizer made offline: byte-level characters plus one merge chain per known word."""
    from transformers import CLIPTokenizer

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:] + [256 + n for n in range(256 - len(bs))]
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
        tokenizer = CLIPTokenizer(vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"))
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(path)
    return tokenizer


def sd15_scheduler_config() -> dict:
    """Stable Diffusion v1-5's DDPM training noise schedule (scheduler/scheduler_config.json)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, steps_offset=1)


def build_tiny_model(path: Path, seed: int = 0) -> None:
    """Save a random-weight, Stable-Diffusion-shaped pipeline (32 px images, 16x16x4 latents) in diffusers layout."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(WORDS, path / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32, attention_head_dim=8,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler(**sd15_scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)


def build_tiny_dataset(path: Path, n: int = 256, resolution: int = 32, seed: int = 0) -> None:
    """Write n world images as PNGs and data.csv (image, caption, label); desirable = utility >= 0.5."""
    rng = np.random.default_rng(seed)
    (path / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        image, caption, utility = sample_world(rng, resolution)
        image.save(path / "images" / f"{i:05d}.png")
        rows.append({"image": f"images/{i:05d}.png", "caption": caption, "label": int(utility >= 0.5)})
    pd.DataFrame(rows).to_csv(path / "data.csv", index=False)


TINY_VERSION = "v1"  # bump when the tiny model or data change, so stale caches are rebuilt


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFUSION_KTO_CACHE", Path.home() / ".cache" / "diffusion_kto"))


def build_once(path: Path, build) -> Path:
    """Run build(tmp_path) into a temporary folder and rename it to path; a no-op when path exists.

    Safe when several ranks race: the rename is atomic and the loser's copy is discarded."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp", dir=path.parent))
    try:
        build(tmp)
        os.rename(tmp, path)
    except OSError:
        if not path.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_model_path() -> Path:
    return build_once(cache_dir() / f"tiny-model-{TINY_VERSION}", build_tiny_model)


def tiny_dataset_path() -> Path:
    return build_once(cache_dir() / f"tiny-data-{TINY_VERSION}", build_tiny_dataset) / "data.csv"
