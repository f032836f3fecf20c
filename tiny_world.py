"""A tiny offline world in which Diffusion-KTO's effect is visible and measured on a CPU in minutes.

Why a separate file: it is the repository's demo and end-to-end test fixture, not part of the method. It
builds, once, everything the Hugging Face hub would otherwise provide:
  1. a procedural image-caption world: coloured shapes on a plain background, captioned "a red circle on a
     white background"; in half of the images the shape's colour is not the one the caption asks for;
  2. a hidden "human utility" read off the pixels: 0.5 if the shape has the caption's colour, plus up to 0.5
     for a large shape. People like big shapes in the colour they asked for;
  3. a base model that generates the world: a tiny Stable-Diffusion-shaped pipeline whose VAE and UNet are
     trained here on the world's images (liked and disliked alike), saved in diffusers layout and loaded by
     train_kto.py and eval.py through the same from_pretrained path as SD v1-5;
  4. feedback in the Pick-a-Pic v2 schema: pairs of base-model images for the same caption, the preferred
     one chosen by the hidden utility with label noise, written as parquet shards.

    python tiny_world.py                                   # build (or find) the world and print its folder
    python tiny_world.py --figure runs/eval-tiny fig.png   # also draw base vs KTO from an eval.py --tiny output
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

import fixtures
import utils
from fixtures import BACKGROUNDS, COLORS

WORLD_VERSION = "v1"  # bump when anything below changes, so cached worlds are rebuilt
RESOLUTION = 32
HELD_OUT = ("a yellow triangle on a black background", "a green square on a white background",
            "a red circle on a black background", "a blue triangle on a white background")


def world_utility(image: Image.Image, caption: str) -> float:
    """The hidden utility, measured on pixels: 0.5 * (shape has the asked colour) + 0.5 * size score in [0, 1]."""
    words = caption.split()
    asked = next((w for w in words if w in COLORS), None)
    background = next((w for w in words if w in BACKGROUNDS), "white")
    x = np.asarray(image.convert("RGB").resize((RESOLUTION, RESOLUTION), Image.BILINEAR), dtype=np.float32)
    foreground = np.linalg.norm(x - np.array(BACKGROUNDS[background], np.float32), axis=-1) > 80
    if asked is None or foreground.sum() < 4:
        return 0.0
    mean = x[foreground].mean(axis=0)
    nearest = min(COLORS, key=lambda c: np.linalg.norm(mean - np.array(COLORS[c], np.float32)))
    size = float(np.clip((np.sqrt(foreground.mean()) - 0.15) / 0.75, 0.0, 1.0))
    return 0.5 * (nearest == asked) + 0.5 * size


def train_prompts() -> list[str]:
    return [p for p in fixtures.tiny_prompts() if p not in HELD_OUT]


def eval_prompts(repeats: int = 64) -> list[str]:
    """The held-out captions, each repeated: every entry gets its own seed in eval.py, so 4 x 64 = 256
    paired (prompt, seed) comparisons between checkpoint and base."""
    return list(HELD_OUT) * repeats


# ----------------------------------------------------------------------------------------------------
# The base model: the tiny pipeline of fixtures.build_tiny_model, its VAE and UNet trained on the world

def world_images(n: int, seed: int):
    rng = np.random.default_rng(seed)
    images, captions = zip(*[fixtures.sample_world(rng, RESOLUTION)[:2] for _ in range(n)])
    pixels = torch.stack([utils.image_to_tensor(im, RESOLUTION) for im in images])
    return pixels, list(captions)


def train_base(path: Path, vae_steps: int = 300, unet_steps: int = 1000, seed: int = 0, log=print):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    fixtures.build_tiny_model(path, seed=seed)
    torch.manual_seed(seed)
    pixels, captions = world_images(4096, seed)
    gen = torch.Generator().manual_seed(seed)

    # VAE: reconstruction + a small KL term, as in latent diffusion
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    t0 = time.time()
    for step in range(vae_steps):
        x = pixels[torch.randint(0, len(pixels), (32,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = (recon - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    log(f"vae: {vae_steps} steps, reconstruction mse {loss.item():.4f}, {time.time() - t0:.0f}s")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))  # unit-variance latents, as SD's 0.18215
    latents = latents * vae.config.scaling_factor
    vae.save_pretrained(path / "vae")

    # UNet: the standard epsilon-prediction loss, 10% empty captions for classifier-free guidance
    pipe = StableDiffusionPipeline.from_pretrained(path, vae=vae)
    with torch.no_grad():
        ids = pipe.tokenizer(captions + [""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        emb_all = torch.cat([pipe.text_encoder(ids[i:i + 512])[0] for i in range(0, len(ids), 512)])
    emb, empty = emb_all[:-1], emb_all[-1:]
    unet, scheduler = pipe.unet, pipe.scheduler
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=unet_steps, pct_start=0.05)
    t0, ema = time.time(), None
    for step in range(unet_steps):
        idx = torch.randint(0, len(latents), (64,), generator=gen)
        x0, c = latents[idx], emb[idx].clone()
        c[torch.rand(64, generator=gen) < 0.1] = empty
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (64,), generator=gen)
        loss = (unet(scheduler.add_noise(x0, eps, t), t, c).sample - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if (step + 1) % 250 == 0:
            log(f"unet: step {step + 1}/{unet_steps}, loss {ema:.4f}, {time.time() - t0:.0f}s")
    unet.eval()
    unet.save_pretrained(path / "unet")


# ----------------------------------------------------------------------------------------------------
# Feedback: pairs of base-model images per caption, the preferred one chosen by the noisy hidden utility

def sample_images(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 3.0, batch: int = 128):
    """Images from a pipeline; image i starts from noise seeded by seeds[i] alone."""
    images = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        out = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   height=RESOLUTION, width=RESOLUTION, output_type="pil")
        images += out.images
    return images


def write_feedback(pipe, folder: Path, pairs_per_prompt: int = 24, temperature: float = 0.1, seed: int = 0, log=print):
    """Pick-a-Pic v2 shards: caption, jpg_0, jpg_1, label_0, label_1, image_0_uid, image_1_uid, ..."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = [p for p in train_prompts() for _ in range(2 * pairs_per_prompt)]
    t0 = time.time()
    images = sample_images(pipe, prompts, [seed * 10**6 + i for i in range(len(prompts))])
    log(f"feedback: {len(images)} base-model images in {time.time() - t0:.0f}s")
    rng = np.random.default_rng(seed)
    u = np.array([world_utility(im, p) for im, p in zip(images, prompts)])
    first = np.arange(0, len(prompts), 2)
    p_first = 1 / (1 + np.exp(-(u[first] - u[first + 1]) / temperature))  # noisy raters (Bradley-Terry)
    label_0 = (rng.random(len(first)) < p_first).astype(np.float64)
    label_0[u[first] == u[first + 1]] = 0.5                                   # no preference: a tie
    jpg = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        jpg.append(buf.getvalue())
    uid = [f"world-{seed}-{i:06d}" for i in range(len(images))]
    n = len(first)
    table = pa.table({
        "caption": [prompts[i] for i in first],
        "jpg_0": pa.array([jpg[i] for i in first], pa.binary()), "jpg_1": pa.array([jpg[i + 1] for i in first], pa.binary()),
        "label_0": label_0, "label_1": 1.0 - label_0,
        "image_0_uid": [uid[i] for i in first], "image_1_uid": [uid[i + 1] for i in first],
        "best_image_uid": [uid[i] if l == 1 else uid[i + 1] if l == 0 else "" for i, l in zip(first, label_0)],
        "are_different": np.ones(n, bool), "has_label": np.ones(n, bool),
        "model_0": ["tiny-world-base"] * n, "model_1": ["tiny-world-base"] * n,
        "ranking_id": np.arange(n), "user_id": np.zeros(n, np.int64), "num_example_per_prompt": np.ones(n, np.int64),
    })
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "train-00000-of-00001.parquet")
    agree = np.mean((label_0 == 1) == (u[first] > u[first + 1]))
    stats = dict(pairs=n, mean_utility=float(u.mean()), color_match=float(np.mean(u >= 0.5)), rater_agreement=float(agree))
    (folder / "world.json").write_text(json.dumps(stats, indent=2))
    log(f"feedback: {n} pairs, base mean utility {u.mean():.3f}, raters agree with the utility on {agree:.0%}")


def build_world(path: Path, log=print) -> None:
    """Base model into path/model, feedback into path/feedback."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    t0 = time.time()
    train_base(path / "model", log=log)
    DDIMScheduler(**fixtures.sd15_scheduler_config(), set_alpha_to_one=False).save_pretrained(path / "model" / "scheduler")
    pipe = StableDiffusionPipeline.from_pretrained(path / "model")
    pipe.set_progress_bar_config(disable=True)
    write_feedback(pipe, path / "feedback", log=log)
    log(f"world built in {time.time() - t0:.0f}s: {path}")


def world_path() -> Path:
    """The cached world (built on first use, a few minutes on 2 CPU cores)."""
    return utils.build_once(utils.cache_dir() / f"tiny-world-{WORLD_VERSION}", build_world)


def make_figure(eval_out: Path, png: Path, seeds: int = 8) -> None:
    """Base (top) and KTO (bottom) images of each held-out prompt, same seeds column by column, from the
    images/ folder that `eval.py --tiny --out eval_out` wrote."""
    from PIL import ImageDraw

    index = pd.read_csv(Path(eval_out) / "images" / "index.csv")
    size, pad, label = 64, 4, 14
    rows = [(p, m) for p in HELD_OUT for m in ("baseline", "checkpoint")]
    canvas = Image.new("RGB", (150 + seeds * (size + pad), len(rows) * (size + pad) + label), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((150, 0), "same seed in each column", fill="black")
    for r, (prompt, model) in enumerate(rows):
        y = label + r * (size + pad)
        draw.text((2, y + size // 2 - 12), prompt.replace(" on a ", "\non a "), fill="black")
        draw.text((2, y + size // 2 + 12), "base" if model == "baseline" else "KTO", fill="gray" if model == "baseline" else "blue")
        paths = index[(index.model == model) & (index.prompt == prompt)].sort_values("prompt_id").path.tolist()
        for k, path in enumerate(paths[:seeds]):
            image = Image.open(Path(eval_out) / "images" / path).resize((size, size), Image.NEAREST)
            canvas.paste(image, (150 + k * (size + pad), y))
    canvas.save(png)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Build (or find) the tiny world; optionally draw the README figure.")
    parser.add_argument("--figure", nargs=2, metavar=("EVAL_OUT", "PNG"), help="draw base vs KTO images from an eval.py --tiny output folder")
    args = parser.parse_args()
    print(world_path())
    if args.figure:
        make_figure(Path(args.figure[0]), Path(args.figure[1]))
