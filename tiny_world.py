"""A tiny offline world in which Diffusion-KTO's effect is visible and measured on a CPU in minutes.

Why a separate file: it is the repository's demo and end-to-end test fixture, not part of the method. It
builds, once per world seed, everything the Hugging Face hub would otherwise provide:
  1. a procedural image-caption world: coloured shapes of random size on a plain background, captioned "a red
     circle on a white background";
  2. a hidden "human utility" read off the pixels: 0.5 if the shape has the caption's colour, plus up to 0.5
     for a large shape. People like big shapes in the colour they asked for; the base draws the asked colour,
     so its likes and dislikes are about size, and a model that stops following captions loses half;
  3. a base model that generates the world: a tiny Stable-Diffusion-shaped pipeline whose VAE, UNet and text
     encoder are trained here on the world's images (liked and disliked alike), saved in diffusers layout and
     loaded by train_kto.py and eval.py through the same from_pretrained path as SD v1-5;
  4. feedback in the Pick-a-Pic v2 schema: pairs of fresh drawings of the world for the same caption (not
     the base's samples, as Pick-a-Pic's images come from other models than SD v1-5), the preferred one chosen
     by the hidden utility with label noise (feedback/), and the same pairs with the labels permuted
     (feedback-shuffled/, a control: same images and captions, no information in the labels).
A world is a pure function of its seed (and sizes): built once into $DIFFUSION_KTO_CACHE/tiny-world-<VERSION>-
seed<seed> by one process (utils.build_once: file lock, fixed thread count), whatever the launcher.

    python tiny_world.py [--seed 1]                        # build (or find) a world and print its folder
    python tiny_world.py --figure runs/eval-tiny fig.png   # draw base vs KTO from an eval.py --tiny output
    python tiny_world.py --study --jobs 2 --out runs/study-out   # docs/tiny_world.md's tables and plots (times there)
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

import fixtures
import data
import utils
from fixtures import BACKGROUNDS, COLORS

WORLD_VERSION = "v5"  # bump when anything below changes, so cached worlds are rebuilt
RESOLUTION = 32
# Captions that never get feedback (the base model still learns them): each colour on both backgrounds.
HELD_OUT = ("a yellow triangle on a black background", "a green square on a white background",
            "a red circle on a black background", "a blue triangle on a white background",
            "a red square on a white background", "a green circle on a black background",
            "a blue square on a black background", "a yellow circle on a white background")
BUILD_THREADS = 2  # torch threads of every build (floats depend on it): the same world whatever the launcher
# The build's sizes (world_path(seed, **sizes) overrides them; the tests build small worlds quickly). asked_pct:
# how many of the base's training images have the caption's colour (v2 had 50: docs/tiny_world.md says why not)
SIZES = dict(n_images=4096, vae_steps=600, unet_steps=1500, unet_batch=64, pairs_per_prompt=30, sample_steps=20,
             asked_pct=100)


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


def eval_prompts(repeats: int = 32) -> list[str]:
    """The held-out captions, each repeated: every entry gets its own seed in eval.py, so 8 x 32 = 256
    paired (prompt, seed) comparisons between checkpoint and base."""
    return list(HELD_OUT) * repeats


# ----------------------------------------------------------------------------------------------------
# The base model: the tiny pipeline of fixtures.build_tiny_model, its VAE, UNet and text encoder trained on
# the world. Every random draw comes from generators seeded by the world seed (CPU generators, also when the
# models run on CUDA), so a world is a function of its seed.

def world_images(n: int, seed: int, asked_pct: int):
    rng = np.random.default_rng(seed)
    images, captions = zip(*[fixtures.sample_world(rng, RESOLUTION, asked_pct / 100)[:2] for _ in range(n)])
    pixels = torch.stack([data.image_to_tensor(im, RESOLUTION) for im in images])
    return pixels, list(captions)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_base(path: Path, seed: int, n_images: int, vae_steps: int, unet_steps: int, unet_batch: int,
               asked_pct: int, device="cpu", log=print) -> dict:
    """Train the tiny pipeline's VAE, then its UNet and text encoder together, on n_images world images."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    fixtures.build_tiny_model(path, seed=seed)
    pixels, captions = world_images(n_images, seed, asked_pct)
    gen = torch.Generator().manual_seed(seed)

    # VAE: reconstruction + a small KL term, as in latent diffusion
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(vae_steps, 2), pct_start=0.1)
    t0 = time.time()
    for _ in range(vae_steps):
        x = pixels[torch.randint(0, len(pixels), (32,), generator=gen)].to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        loss = (vae.decode(z).sample - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    log(f"vae: {vae_steps} steps, reconstruction mse {loss.item():.4f}, {time.time() - t0:.0f}s")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        posteriors = [vae.encode(pixels[i:i + 256].to(device)).latent_dist for i in range(0, len(pixels), 256)]
    mean, std = (torch.cat([getattr(q, k) for q in posteriors]).cpu() for k in ("mean", "std"))
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))  # unit-variance latents, as SD's 0.18215
    mean, std = mean * vae.config.scaling_factor, std * vae.config.scaling_factor
    vae.save_pretrained(path / "vae")

    # UNet and text encoder: the standard epsilon-prediction loss, 10% empty captions for classifier-free
    # guidance, on latents drawn from the VAE's posterior as train_kto.py draws them (as SD was trained). Trained on
    # the posterior means instead (v3), the base met noisier latents in fine-tuning (error x3.5, mostly at t < 100)
    # and any fine-tuning, with shuffled labels too, learnt that noise and shrank the shapes (docs/tiny_world.md).
    # The text encoder is trained too: a random one barely separates the captions, and then an image is denoised
    # almost as well under another image's caption (the KL estimate z measures nothing).
    pipe = StableDiffusionPipeline.from_pretrained(path, vae=vae)
    ids, empty = tokenize(pipe.tokenizer, captions), tokenize(pipe.tokenizer, [""])
    unet, text_encoder, scheduler = pipe.unet.to(device).train(), pipe.text_encoder.to(device).train(), pipe.scheduler
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(unet_steps, 2),
                                                pct_start=max(0.05, 4 / max(unet_steps, 8)))
    t0, ema, history = time.time(), None, {}
    for step in range(unet_steps):
        idx = torch.randint(0, len(mean), (unet_batch,), generator=gen)
        drop = torch.rand(unet_batch, generator=gen) < 0.1
        c = text_encoder(torch.where(drop[:, None], empty, ids[idx]).to(device))[0]
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (unet_batch,), generator=gen)
        x_t = scheduler.add_noise(x0, eps, t)
        loss = (unet(x_t.to(device), t.to(device), c).sample - eps.to(device)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if (step + 1) % max(1, unet_steps // 8) == 0 or step + 1 == unet_steps:
            history[step + 1] = round(ema, 5)
            log(f"unet: step {step + 1}/{unet_steps}, loss {ema:.4f}, {time.time() - t0:.0f}s")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    unet.save_pretrained(path / "unet")
    text_encoder.save_pretrained(path / "text_encoder")
    return dict(unet_loss_ema=history)


def caption_dependence(pipe, images: list, captions: list[str], seed: int, device="cpu") -> dict:
    """The base model's mean denoising error (eps-MSE) on images with their own caption and with a different
    caption (drawn at random among the others), same x_t, t and noise: if the second is barely larger, the
    model ignores its captions and the paper's mismatched-pair reference point cannot estimate a KL."""
    gen = torch.Generator().manual_seed(seed)
    unet, vae, text_encoder = pipe.unet.to(device), pipe.vae.to(device), pipe.text_encoder.to(device)
    all_captions = sorted(set(captions))
    other = [c for c in captions]
    for i, c in enumerate(captions):
        choices = [x for x in all_captions if x != c]
        other[i] = choices[int(torch.randint(0, len(choices), (1,), generator=gen))]
    err = {"matched": [], "mismatched": []}
    steps = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = torch.stack([data.image_to_tensor(im, RESOLUTION) for im in images[i:i + 256]]).to(device)
            q = vae.encode(x).latent_dist
            x0 = (q.mean.cpu() + q.std.cpu() * torch.randn(q.mean.shape, generator=gen)) * vae.config.scaling_factor
            eps = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
            x_t = pipe.scheduler.add_noise(x0, eps, t).to(device)
            for name, caps in (("matched", captions[i:i + 256]), ("mismatched", other[i:i + 256])):
                c = text_encoder(tokenize(pipe.tokenizer, caps).to(device))[0]
                pred = unet(x_t, t.to(device), c).sample.cpu()
                err[name].append((pred - eps).pow(2).mean(dim=(1, 2, 3)))
            steps.append(t)
    m, mm, t = torch.cat(err["matched"]), torch.cat(err["mismatched"]), torch.cat(steps)
    bands = {f"{lo}<=t<{hi}": (t >= lo) & (t < hi) for lo, hi in ((0, 250), (250, 500), (500, 1000))}
    return dict(matched=float(m.mean()), mismatched=float(mm.mean()), ratio=float(mm.mean() / m.mean()),
                mismatched_larger=float((mm > m).float().mean()), n_images=len(m),
                by_timestep={k: dict(matched=float(m[b].mean()), mismatched=float(mm[b].mean()))
                             for k, b in bands.items()})


# ----------------------------------------------------------------------------------------------------
# Feedback: pairs of drawings per caption, the preferred one chosen by the noisy hidden utility

def sample_images(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                  batch: int = 128, device="cpu"):
    """Images from a pipeline; image i starts from noise seeded by seeds[i] alone (CPU generators)."""
    pipe = pipe.to(device)
    images = []
    for i in range(0, len(prompts), batch):
        latents = torch.stack([torch.randn((4, RESOLUTION // 4, RESOLUTION // 4),
                                           generator=torch.Generator().manual_seed(s)) for s in seeds[i:i + batch]])
        out = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                   latents=latents.to(device), height=RESOLUTION, width=RESOLUTION, output_type="pil")
        images += out.images
    return images


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def feedback_table(images: list, prompts: list[str], seed: int, temperature: float = 0.1):
    """Pick-a-Pic v2 rows for images (2k, 2k+1) of the same prompt: caption, jpg_0, jpg_1, label_0, label_1,
    image_0_uid, ... The preferred image is drawn from a Bradley-Terry model of the hidden utility (noisy raters);
    equal utilities are ties. Returns (pyarrow table, utilities of all images)."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    u = np.array([world_utility(im, p) for im, p in zip(images, prompts)])
    first = np.arange(0, len(prompts), 2)
    p_first = 1 / (1 + np.exp(-(u[first] - u[first + 1]) / temperature))
    label_0 = (rng.random(len(first)) < p_first).astype(np.float64)
    label_0[u[first] == u[first + 1]] = 0.5
    uid = [f"world-{seed}-{i:06d}" for i in range(len(images))]
    n = len(first)
    table = pa.table({
        "caption": [prompts[i] for i in first],
        "jpg_0": pa.array([jpeg(images[i]) for i in first], pa.binary()),
        "jpg_1": pa.array([jpeg(images[i + 1]) for i in first], pa.binary()),
        "label_0": label_0, "label_1": 1.0 - label_0,
        "image_0_uid": [uid[i] for i in first], "image_1_uid": [uid[i + 1] for i in first],
        "best_image_uid": best_uids(label_0, [uid[i] for i in first], [uid[i + 1] for i in first]),
        "are_different": np.ones(n, bool), "has_label": np.ones(n, bool),
        "model_0": ["tiny-world-drawing"] * n, "model_1": ["tiny-world-drawing"] * n,
        "ranking_id": np.arange(n), "user_id": np.zeros(n, np.int64), "num_example_per_prompt": np.ones(n, np.int64),
    })
    return table, u


def best_uids(label_0, uid_0, uid_1) -> list[str]:
    return [a if lab == 1 else b if lab == 0 else "" for lab, a, b in zip(label_0, uid_0, uid_1)]


def shuffle_labels(table, seed: int):
    """The control: the same pairs (images, captions) with label_0 permuted across pairs, so the number of
    first-image wins and of ties is kept and each label is independent of the images it now belongs to."""
    label_0 = np.random.default_rng([seed, 1]).permutation(table.column("label_0").to_numpy())
    uid_0, uid_1 = table.column("image_0_uid").to_pylist(), table.column("image_1_uid").to_pylist()
    names = table.column_names
    table = table.set_column(names.index("label_0"), "label_0", [label_0])
    table = table.set_column(names.index("label_1"), "label_1", [1.0 - label_0])
    return table.set_column(names.index("best_image_uid"), "best_image_uid", [best_uids(label_0, uid_0, uid_1)])


def image_utilities(table) -> tuple[np.ndarray, np.ndarray]:
    """Hidden utilities of (image_0, image_1) of each row of a feedback table."""
    caps = table.column("caption").to_pylist()
    return tuple(np.array([world_utility(Image.open(io.BytesIO(b)), c) for b, c in
                           zip(table.column(col).to_pylist(), caps)]) for col in ("jpg_0", "jpg_1"))


def label_stats(table, u0: np.ndarray, u1: np.ndarray) -> dict:
    """How labels relate to the hidden utility: agreement with it and the utility gap winner - loser."""
    label_0 = table.column("label_0").to_numpy()
    decided = (label_0 != 0.5) & (u0 != u1)
    win, lose = np.where(label_0 == 1, u0, u1), np.where(label_0 == 1, u1, u0)
    return dict(pairs=len(label_0), ties=int((label_0 == 0.5).sum()), first_wins=int((label_0 == 1).sum()),
                rater_agreement=float(np.mean((label_0 == 1)[decided] == (u0 > u1)[decided])),
                utility_gap=float((win - lose)[label_0 != 0.5].mean()))


def write_feedback(pipe, path: Path, seed: int, pairs_per_prompt: int, sample_steps: int, device="cpu",
                   log=print) -> tuple[dict, list, list]:
    """feedback/ (the noisy utility's labels) and feedback-shuffled/ (the control), one parquet shard each."""
    import pyarrow.parquet as pq

    prompts = [p for p in train_prompts() for _ in range(2 * pairs_per_prompt)]
    # The rated images are fresh drawings of the world, not the base's samples: Pick-a-Pic's images come from other
    # models than the one fine-tuned (SDXL variants among them), and fine-tuning the v4 base on its own samples lowered
    # the utility with labels that say nothing (docs/tiny_world.md, "Why v5").
    rng = np.random.default_rng([seed, 2])
    images = [fixtures.draw_caption(rng, p, RESOLUTION)[0] for p in prompts]
    table, u = feedback_table(images, prompts, seed)
    stats = {}
    for name, t in (("feedback", table), ("feedback-shuffled", shuffle_labels(table, seed))):
        (path / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(t, path / name / "train-00000-of-00001.parquet")
        stats[name] = label_stats(t, u[0::2], u[1::2])
    stats["feedback_images"] = dict(mean_utility=float(u.mean()))  # every drawing has the asked colour
    # The base's own samples for the same captions (no guidance), for the record: does it draw the asked colour?
    t0 = time.time()
    samples = sample_images(pipe, prompts, [seed * 10**6 + i for i in range(len(prompts))], steps=sample_steps,
                            guidance=1.0, device=device)
    ub = np.array([world_utility(im, p) for im, p in zip(samples, prompts)])
    stats["base_images"] = dict(mean_utility=float(ub.mean()), color_match=float(np.mean(ub >= 0.5)))
    log(f"feedback: {len(u) // 2} pairs of drawings, mean utility {u.mean():.3f} (base samples {ub.mean():.3f}, "
        f"asked colour {np.mean(ub >= 0.5):.1%}, {time.time() - t0:.0f}s), raters agree with the utility on "
        f"{stats['feedback']['rater_agreement']:.0%} (shuffled: {stats['feedback-shuffled']['rater_agreement']:.0%})")
    return stats, images, prompts


def build_world(path: Path, seed: int = 0, device: str = "cpu", log=print, **sizes) -> None:
    """Base model into path/model; feedback into path/feedback and path/feedback-shuffled; path/world.json."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sizes = {**SIZES, **sizes}
    t0 = time.time()
    record = dict(version=WORLD_VERSION, seed=seed, sizes=sizes, device=str(device), threads=torch.get_num_threads(),
                  torch=torch.__version__, held_out=list(HELD_OUT))
    record.update(train_base(path / "model", seed, sizes["n_images"], sizes["vae_steps"], sizes["unet_steps"],
                             sizes["unet_batch"], sizes["asked_pct"], device, log))
    scheduler = DDIMScheduler(**fixtures.sd15_scheduler_config(), set_alpha_to_one=False)
    scheduler.save_pretrained(path / "model" / "scheduler")
    pipe = StableDiffusionPipeline.from_pretrained(path / "model")
    pipe.set_progress_bar_config(disable=True)
    stats, images, prompts = write_feedback(pipe, path, seed, sizes["pairs_per_prompt"], sizes["sample_steps"],
                                            device, log)
    record.update(stats)
    record["caption_dependence"] = caption_dependence(pipe, images, prompts, seed, device)
    cd = record["caption_dependence"]
    log(f"base denoising error on its feedback images: matched captions {cd['matched']:.4f}, mismatched "
        f"{cd['mismatched']:.4f} (x{cd['ratio']:.2f}; larger on {cd['mismatched_larger']:.0%} of images)")
    record["build_seconds"] = round(time.time() - t0, 1)
    for f in (path / "world.json", path / "feedback" / "world.json"):
        f.write_text(json.dumps(record, indent=2))
    log(f"world built in {time.time() - t0:.0f}s: {path}")


def world_path(seed: int = 0, device: str = "cpu", **sizes) -> Path:
    """The cached world of this seed, built on first use (one process builds, others wait; minutes on 2 CPU cores).
    Non-default sizes (tests) get their own folder. The device is not in the name: build where you run."""
    extra = "".join(f"-{k}{v}" for k, v in sorted(sizes.items()) if v != SIZES[k])
    path = utils.cache_dir() / f"tiny-world-{WORLD_VERSION}-seed{seed}{extra}"
    return utils.build_once(path, functools.partial(build_world, seed=seed, device=device, **sizes), BUILD_THREADS)


def world_hash(path: Path) -> str:
    """sha256 over the model's weights (VAE, UNet, text encoder) and both feedback tables' labels and images."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for part in ("vae", "unet", "text_encoder"):
        weights = load_file(next((Path(path) / "model" / part).glob("*.safetensors")))
        for k in sorted(weights):
            h.update(k.encode() + weights[k].contiguous().numpy().tobytes())
    for name in ("feedback", "feedback-shuffled"):
        t = pq.read_table(next((Path(path) / name).glob("*.parquet")))
        for col in ("caption", "label_0", "jpg_0", "jpg_1"):
            h.update(repr(t.column(col).to_pylist()).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Figures

def make_figure(eval_out: Path, png: Path, seeds: int = 8) -> dict:
    """Base and KTO images of each held-out prompt (two rows per prompt), same seeds column by column, from the
    images/ folder that `eval.py --tiny --out eval_out` wrote. Returns {(prompt, model, k): (x, y)} of each tile."""
    from PIL import ImageDraw

    index = pd.read_csv(Path(eval_out) / "images" / "index.csv")
    size, pad, label, left = 48, 4, 14, 150
    rows = [(p, m) for p in HELD_OUT for m in ("baseline", "checkpoint")]
    canvas = Image.new("RGB", (left + seeds * (size + pad), len(rows) * (size + pad) + label), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 0), "same seed in each column", fill="black")
    tiles = {}
    for r, (prompt, model) in enumerate(rows):
        y = label + r * (size + pad)
        if model == "baseline":
            draw.text((2, y + 4), prompt.replace(" on a ", "\non a "), fill="black")
        draw.text((2, y + size - 14), "base" if model == "baseline" else "KTO",
                  fill="gray" if model == "baseline" else "blue")
        paths = index[(index.model == model) & (index.prompt == prompt)].sort_values("prompt_id").path.tolist()
        for k, path in enumerate(paths[:seeds]):
            image = Image.open(Path(eval_out) / "images" / path).convert("RGB").resize((size, size), Image.NEAREST)
            canvas.paste(image, (left + k * (size + pad), y))
            tiles[(prompt, model, k)] = (left + k * (size + pad), y, path)
    canvas.save(png)
    return tiles


def steps_figure(rows: list[dict], png: Path, first_train_seed: int = 0) -> None:
    """Win rate over the base (95% CI) against training steps: KTO per world seed, and the controls; the runs of
    other training seeds (default steps only) as hollow markers without CI."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    styles = {"KTO": ("o-", None), "shuffled labels": ("s--", 0.6), "SFT": ("^:", 0.6)}
    seeds = sorted({r["seed"] for r in rows})
    for kind, (marker, alpha) in styles.items():
        for i, seed in enumerate(seeds):
            mine = [r for r in rows if r["seed"] == seed and r["kind"] == kind and r["baseline"] == "base"
                    and not r["ablation"]]
            pts = sorted((r["steps"], r["win_rate"], *r["ci95"]) for r in mine
                         if r.get("train_seed", first_train_seed) == first_train_seed)
            if not pts:
                continue
            s, w, lo, hi = map(np.array, zip(*pts))
            ax.errorbar(s + 4 * (i - 1), w, yerr=[w - lo, hi - w], fmt=marker, color=f"C{i}", alpha=alpha or 1,
                        capsize=2, label=f"{kind}, world {seed}")
            others = [(r["steps"], r["win_rate"]) for r in mine if r.get("train_seed", first_train_seed)
                      != first_train_seed]
            if others:
                s, w = map(np.array, zip(*others))
                ax.plot(s + 4 * (i - 1), w, marker[0], mfc="none", color=f"C{i}", alpha=alpha or 1)
    ax.axhline(0.5, color="gray", lw=0.8)
    ax.set_xlabel("training steps (--tiny default: 200)")
    ax.set_ylabel("win rate over the base, hidden utility")
    ax.set_title("Tiny world: win rate vs steps (256 held-out comparisons, 95% CI; hollow: other training seeds)",
                 fontsize=8)
    ax.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below: hides no point
    fig.tight_layout()
    fig.savefig(png, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# The study: docs/tiny_world.md's table and plot, every run a subprocess (runs in parallel with --jobs)

TINY_STEPS = 200  # train_kto.py's --tiny max_train_steps
STUDY_WORLDS = (3, 4, 5)  # the README's worlds; 0-2 were used to choose the --tiny learning rate (docs/tiny_world.md)
ABLATIONS = {"loss_averse": ["--utility", "loss_averse"], "risk_seeking": ["--utility", "risk_seeking"],
             "z=batch_mean": ["--reference_point", "batch_mean"], "z=zero": ["--reference_point", "zero"],
             "gamma=0.5": ["--desirable_ratio", "0.5"], "gamma=1.0": ["--desirable_ratio", "1.0"]}


def run_jobs(commands: list[tuple[str, list[str], Path]], jobs: int, threads: int, log, deadline=None) -> None:
    """Run (name, argv, log file) subprocesses, `jobs` at a time, each with `threads` torch threads; none is
    started after time.time() passes `deadline`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}

    def one(cmd):
        name, argv, logfile = cmd
        if deadline and time.time() > deadline:
            log(f"  {name}: skipped (past --deadline_s)")
            return -1
        logfile.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(logfile, "w") as f:
            rc = subprocess.run([sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=Path(__file__).parent).returncode
        log(f"  {name}: {'ok' if rc == 0 else f'FAILED (exit {rc}, see {logfile})'} in {time.time() - t0:.0f}s")
        return rc

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        failed = [c[0] for c, rc in zip(commands, pool.map(one, commands)) if rc != 0]
    if failed:  # the study goes on: the table shows what finished, the log what did not
        log(f"FAILED: {failed}")


def study(seeds=STUDY_WORLDS, out: Path = Path("runs/study-out"), work: Path = Path("runs/study"), device: str = "cpu",
          jobs: int = 1, fractions=(0.25, 0.5, 1.0, 1.5, 2.0), ablation_seeds=None, extra: list[str] = (),
          sizes: dict | None = None, deadline_s: float = 0, train_seeds=(0, 1, 2, 3, 4)) -> list:
    """Build the worlds, train KTO / shuffled-label KTO / SFT (and the ablations) on each, evaluate each against
    the base (and KTO against SFT) on the held-out captions. Writes 6 files into `out`: tiny_world_table.md,
    tiny_world_results.json, tiny_world_steps.png, tiny_world.png, tiny_world_worlds.json, tiny_world_study.log.
    Runs are folders under `work`; finished runs and evaluations are reused, so an interrupted study resumes.
    `sizes` overrides the worlds' build sizes (SIZES); the --tiny training defaults are used for every run.
    train_seeds: train_kto.py --seed of the runs; the first gets every row, the others KTO, shuffled labels and SFT
    at the default steps (one checkpoint's win rate varies more between training seeds than its CI says).
    ablation_seeds: worlds with the ablation rows (None: the first world; each must be one of `seeds`).
    deadline_s > 0: start no run or evaluation after that many seconds, and write the table of what finished."""
    ablation_seeds = seeds[:1] if ablation_seeds is None else ablation_seeds
    if not set(ablation_seeds) <= set(seeds):
        raise ValueError(f"study: ablation world(s) {sorted(set(ablation_seeds) - set(seeds))} are not among the "
                         f"worlds {list(seeds)}; pass --ablation_seeds from --seeds (or none)")
    out, work = Path(out), Path(work)
    out.mkdir(parents=True, exist_ok=True)
    logfile = open(out / "tiny_world_study.log", "a")

    def log(msg):
        print(msg, flush=True)
        logfile.write(msg + "\n")
        logfile.flush()

    t_start, sizes = time.time(), sizes or {}
    deadline = t_start + deadline_s if deadline_s > 0 else None
    size_flags = [f"{k}={v}" for k, v in sizes.items()]
    threads = max(1, (os.cpu_count() or 2) // max(1, jobs))
    log(f"study: seeds {list(seeds)}, device {device}, {jobs} job(s) x {threads} thread(s), fractions "
        f"{list(fractions)}, training seeds {list(train_seeds)}, ablations on {list(ablation_seeds)}, extra train "
        f"flags {list(extra)}, world sizes "
        f"{ {**SIZES, **sizes} }")
    # 1. worlds (each in its own process; build_once makes this a no-op when cached). A CPU build always uses
    # BUILD_THREADS threads, so no more builds run at once than the cores hold (oversubscribed: 5x slower each)
    builders = jobs if device != "cpu" else max(1, min(jobs, (os.cpu_count() or 2) // BUILD_THREADS))
    run_jobs([(f"world {s}", ["tiny_world.py", "--seed", str(s), "--device", device, "--sizes", *size_flags],
               work / "logs" / f"world{s}.log") for s in seeds], builders, threads, log, deadline)
    world = {s: world_path(s, device, **sizes) for s in seeds}
    # 2. training runs: one per (seed, kind) to the longest step count, checkpoints at every fraction
    steps = sorted({round(f * TINY_STEPS) for f in fractions})
    top = max(steps)
    every = functools.reduce(np.gcd, steps)
    first, runs = train_seeds[0], {}
    for s in seeds:
        model, data = ["--pretrained_model", str(world[s] / "model")], ["--dataset", str(world[s] / "feedback")]
        for kind, flags in (("KTO", data), ("shuffled labels", ["--dataset", str(world[s] / "feedback-shuffled")]),
                            ("SFT", [*data, "--objective", "sft"])):
            for t in train_seeds:
                runs[(s, kind, t)] = ([*model, *flags], top if t == first else TINY_STEPS)
        for name in (ABLATIONS if s in ablation_seeds else {}):
            runs[(s, name, first)] = ([*model, *data, *ABLATIONS[name]], TINY_STEPS)
    # a run's folder: seed<world>/<kind>[-t<training seed>] (the first training seed's name has no suffix)
    name = lambda s, kind, t: (work / f"seed{s}" / (kind.replace(" ", "_").replace("=", "-")  # noqa: E731
                                                    + ("" if t == first else f"-t{t}")))
    commands = []
    for (s, kind, t), (flags, n) in sorted(runs.items(), key=lambda kv: (kv[0][1] in ABLATIONS, kv[0][2] != first,
                                                                         kv[0][0])):
        folder = name(s, kind, t)
        if not (folder / f"checkpoint-{n}" / "unet").exists():
            commands.append((f"train seed {s} {kind} t{t}", ["train_kto.py", "--tiny", "--world_seed", str(s),
                             "--seed", str(t), "--max_train_steps", str(n), "--checkpointing_steps",
                             str(int(every) if n == top else n), "--output_dir", str(folder), *extra, *flags],
                             folder.with_suffix(".log")))
    run_jobs(commands, jobs, threads, log, deadline)
    # 3. evaluations: 256 paired (held-out caption, seed) comparisons each
    evals = []
    for s in seeds:
        e = dict(seed=s, train_seed=first, baseline="base", ablation=False)
        evals += [dict(e, kind="KTO", steps=n) for n in steps]
        evals += [dict(e, kind=k, steps=n) for k in ("shuffled labels", "SFT") for n in sorted({TINY_STEPS, top})]
        evals += [dict(e, kind="KTO", steps=n, baseline="SFT") for n in sorted({TINY_STEPS, top})]
        evals += [dict(e, kind=a, steps=TINY_STEPS, ablation=True) for a in (ABLATIONS if s in ablation_seeds else {})]
        for t in train_seeds[1:]:
            e = dict(seed=s, train_seed=t, steps=TINY_STEPS, ablation=False)
            evals += [dict(e, kind=k, baseline="base") for k in ("KTO", "shuffled labels", "SFT")]
            evals.append(dict(e, kind="KTO", baseline="SFT"))
    # most important first, in case --deadline_s cuts the study short: the default steps on every world, then 2x
    evals.sort(key=lambda e: (e["ablation"], e["steps"] != TINY_STEPS, e["steps"] != top, e["train_seed"] != first,
                              e["seed"]))
    commands = []
    for e in evals:
        run = name(e["seed"], e["kind"], e["train_seed"])
        e["out"] = str(run.parent / "eval" / f"{run.name}-{e['steps']}-vs-{e['baseline']}")
        argv = ["eval.py", "--ckpt", str(run / f"checkpoint-{e['steps']}"), "--tiny", "--out", e["out"]]
        if e["baseline"] != "base":
            argv += ["--baseline", str(name(e["seed"], e["baseline"], e["train_seed"]) / f"checkpoint-{e['steps']}")]
        if not (Path(e["out"]) / "results.json").exists():
            commands.append((f"eval seed {e['seed']} {e['kind']}@{e['steps']} t{e['train_seed']} vs {e['baseline']}",
                             argv, Path(e["out"] + ".log")))
    run_jobs(commands, jobs, threads, log, deadline)
    # 4. table, figures, world records
    rows = []
    for e in evals:
        if not (Path(e["out"]) / "results.json").exists():
            log(f"missing from the table (failed above): {e['out']}")
            continue
        u = json.loads((Path(e["out"]) / "results.json").read_text())["metrics"]["utility"]
        rows.append({**e, **{k: u[k] for k in ("win_rate", "ci95", "n_prompts", "mean_ckpt", "mean_baseline")}})
    worlds = {s: json.loads((world[s] / "world.json").read_text()) for s in seeds}
    minutes = (time.time() - t_start) / 60
    table = study_table(rows, worlds, steps, device, jobs, minutes, train_seeds)
    (out / "tiny_world_table.md").write_text(table)
    (out / "tiny_world_results.json").write_text(json.dumps(rows, indent=2))
    (out / "tiny_world_worlds.json").write_text(json.dumps(worlds, indent=2))
    steps_figure(rows, out / "tiny_world_steps.png", first)
    shown = [r for r in rows if r["kind"] == "KTO" and r["steps"] == TINY_STEPS and r["baseline"] == "base"]
    if shown:
        make_figure(Path(shown[0]["out"]), out / "tiny_world.png")
    print(table)
    log(f"study done in {minutes:.1f} min; wrote {sorted(p.name for p in out.iterdir())} to {out}")
    return rows


# 97.5% quantiles of Student's t with 1..30 degrees of freedom (scipy.stats.t.ppf), for intervals over a few runs
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.16, 2.145, 2.131,
        2.12, 2.11, 2.101, 2.093, 2.086, 2.08, 2.074, 2.069, 2.064, 2.06, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean of independent runs' values (2 to 31 of them)."""
    v = np.asarray(values, dtype=float)
    if not 2 <= len(v) <= len(T975) + 1:
        raise ValueError(f"t_interval: {len(v)} values; the table T975 covers 2 to {len(T975) + 1} runs (add quantiles "
                         "of Student's t to T975 for more)")
    half = T975[len(v) - 2] * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def over_runs(rows, train_seeds) -> list[str]:
    """The default-step cells over training seeds: a table of each run's win rate, then per comparison the mean over
    every (world, training seed) run with its t-interval: a claim that holds across runs, not only over prompts.
    Also the mean over runs of the change in mean hidden utility (checkpoint - baseline): a same-seed win rate
    counts the sign of every small change, so a run that shifts all shapes by a pixel scores near 0 or 1. Last, KTO
    and the control world by world over its training seeds."""
    key = lambda r: (r["kind"], r["baseline"])  # noqa: E731
    kinds = [("KTO", "base"), ("shuffled labels", "base"), ("SFT", "base"), ("KTO", "SFT")]
    picked = {(r["seed"], r.get("train_seed", 0), *key(r)): r for r in rows
              if r["steps"] == TINY_STEPS and not r["ablation"] and key(r) in kinds}
    runs = {k: r["win_rate"] for k, r in picked.items()}
    worlds = sorted({k[0] for k in runs})
    lines = ["", f"| world ({TINY_STEPS} steps; training seeds {' / '.join(map(str, train_seeds))}) | KTO vs base | "
             "shuffled labels vs base | SFT vs base | KTO vs SFT |", "|---|---|---|---|---|"]
    for s in worlds:
        cells = [" / ".join(f"{runs[(s, t, *k)]:.3f}" if (s, t, *k) in runs else "not run" for t in train_seeds)
                 for k in kinds]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("")
    for k in kinds:
        done = [(s, t, *k) for s in worlds for t in train_seeds if (s, t, *k) in runs]
        v = [runs[r] for r in done]
        if len(v) >= 2:
            m, lo, hi = t_interval(v)
            g = t_interval([picked[r]["mean_ckpt"] - picked[r]["mean_baseline"] for r in done])
            lines.append(f"{k[0]} vs {k[1]} at {TINY_STEPS} steps over {len(v)} runs (worlds x training seeds): mean "
                         f"{m:.3f}, 95% t-interval [{lo:.3f}, {hi:.3f}], {sum(x > 0.5 for x in v)} of {len(v)} above "
                         f"0.5; mean utility change {g[0]:+.4f} [{g[1]:+.4f}, {g[2]:+.4f}].")
    pairs = [(s, t) for s in worlds for t in train_seeds
             if (s, t, "KTO", "base") in runs and (s, t, "shuffled labels", "base") in runs]
    if len(pairs) >= 2:
        d = [runs[(*p, "KTO", "base")] - runs[(*p, "shuffled labels", "base")] for p in pairs]
        m, lo, hi = t_interval(d)
        lines.append(f"KTO minus shuffled labels, paired by run: {m:+.3f} [{lo:+.3f}, {hi:+.3f}], positive in "
                     f"{sum(x > 0 for x in d)} of {len(d)}.")
    for k in kinds[:2]:  # world by world over its training seeds: what a CI over one run's prompts cannot show
        cells = []
        for s in worlds:
            v = [runs[(s, t, *k)] for t in train_seeds if (s, t, *k) in runs]
            if len(v) >= 2:
                m, lo, hi = t_interval(v)
                cells.append(f"world {s} {m:.3f} [{lo:.3f}, {hi:.3f}]")
        if cells:
            lines.append(f"{k[0]} vs {k[1]} per world, mean over its training seeds [95% t-interval]: "
                         + "; ".join(cells) + ".")
    return lines


def study_table(rows, worlds, steps, device, jobs, minutes, train_seeds=(0,)) -> str:
    """The README's tables: the worlds; KTO, shuffled labels and SFT against the base and KTO against SFT at the
    default and the longest step count; the ablations; KTO against the base by steps; a summary line per count;
    with several training seeds, the default-step cells over them (over_runs). The other tables show the first
    training seed's runs."""
    by = {(r["seed"], r["kind"], r["steps"], r["baseline"]): r for r in rows
          if r.get("train_seed", train_seeds[0]) == train_seeds[0]}
    cell = lambda *key: (f"{by[key]['win_rate']:.3f} [{by[key]['ci95'][0]:.3f}, {by[key]['ci95'][1]:.3f}]"  # noqa
                         if key in by else "not run")
    seeds = sorted(worlds)
    lines = [f"Tiny world study ({device}, {jobs} job(s), {minutes:.1f} min). Win rate on the hidden utility over "
             f"the baseline, {rows[0]['n_prompts'] if rows else 0} paired held-out comparisons, bootstrap 95% CI.",
             "", "| world | base error, own / another caption | raters agree | base samples: asked colour, mean "
             "utility | rated drawings: mean utility |", "|---|---|---|---|---|"]
    for s in seeds:
        cd, w = worlds[s]["caption_dependence"], worlds[s]
        lines.append(f"| {s} | {cd['matched']:.4f} / {cd['mismatched']:.4f} (x{cd['ratio']:.2f}) | "
                     f"{w['feedback']['rater_agreement']:.0%} | {w['base_images']['color_match']:.1%}, "
                     f"{w['base_images']['mean_utility']:.3f} | {w['feedback_images']['mean_utility']:.3f} |")
    lines += ["", "| world | steps | KTO vs base | shuffled labels vs base | SFT vs base | KTO vs SFT |",
              "|---|---|---|---|---|---|"]
    for s in seeds:
        for n in sorted({TINY_STEPS, max(steps)}):
            lines.append(f"| {s} | {n} | {cell(s, 'KTO', n, 'base')} | {cell(s, 'shuffled labels', n, 'base')} | "
                         f"{cell(s, 'SFT', n, 'base')} | {cell(s, 'KTO', n, 'SFT')} |")
    ablations = sorted({(r["seed"], r["kind"]) for r in rows if r["ablation"]},
                       key=lambda k: (k[0], list(ABLATIONS).index(k[1])))
    if ablations:
        lines += ["", f"| world | {TINY_STEPS} steps, one change from the defaults | vs base |", "|---|---|---|"]
        lines += [f"| {s} | `{' '.join(ABLATIONS[a])}` | {cell(s, a, TINY_STEPS, 'base')} |"
                  for s, a in ablations]
    lines += ["", "| world | " + " | ".join(f"KTO, {n} steps" for n in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(cell(s, "KTO", n, "base") for n in steps) + " |" for s in seeds]
    lines.append("")
    for n in sorted({TINY_STEPS, max(steps)}):
        kto = [r for r in by.values() if r["kind"] == "KTO" and r["baseline"] == "base" and r["steps"] == n]
        if kto:
            lines.append(f"KTO vs base at {n} steps: mean win rate over {len(kto)} world(s) "
                         f"{np.mean([r['win_rate'] for r in kto]):.3f}, lowest CI lower bound "
                         f"{min(r['ci95'][0] for r in kto):.3f}.")
    if len(train_seeds) > 1:
        lines += over_runs(rows, train_seeds)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Build (or find) a tiny world; draw the figure; run the study.")
    parser.add_argument("--seed", type=int, default=0, help="world seed (one independent world per seed)")
    parser.add_argument("--device", default="cpu", help="where to build worlds (cpu | cuda); training and "
                        "evaluation pick CUDA themselves when it is there")
    parser.add_argument("--figure", nargs=2, metavar=("EVAL_OUT", "PNG"),
                        help="draw base vs KTO images from an eval.py --tiny output folder")
    parser.add_argument("--study", action="store_true", help="run the whole study (docs/tiny_world.md)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(STUDY_WORLDS),
                        help="--study: world seeds (default 3 4 5; worlds 0-2 chose the --tiny learning rate, "
                        "docs/tiny_world.md)")
    parser.add_argument("--train_seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="--study: training seeds (the first: every row; the others: the default-step cells)")
    parser.add_argument("--ablation_seeds", type=int, nargs="*", default=None,
                        help="--study: worlds with the ablation rows, from --seeds (default: the first)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0, 1.5, 2.0],
                        help="--study: KTO steps as fractions of the --tiny default (200)")
    parser.add_argument("--jobs", type=int, default=1, help="--study: runs at a time (threads split between them)")
    parser.add_argument("--out", default="runs/study-out", help="--study: folder of the tables and plots (6 files)")
    parser.add_argument("--work", default="runs/study", help="--study: folder of the runs and evaluations")
    parser.add_argument("--sizes", nargs="*", default=[], metavar="KEY=N",
                        help=f"world build sizes other than the defaults {SIZES} (own cache folder)")
    parser.add_argument("--deadline_s", type=float, default=0,
                        help="--study: start nothing after this many seconds; the table shows what finished")
    parser.add_argument("--train_flags", default="", help="--study: extra train_kto.py flags for every run")
    args = parser.parse_args()
    sizes = {k: int(v) for k, v in (kv.split("=") for kv in args.sizes)}
    if args.study:
        study(args.seeds, Path(args.out), Path(args.work), args.device, args.jobs, args.fractions,
              args.ablation_seeds, args.train_flags.split(), sizes, args.deadline_s, args.train_seeds)
    else:
        print(world_path(args.seed, args.device, **sizes))
    if args.figure:
        make_figure(Path(args.figure[0]), Path(args.figure[1]))
