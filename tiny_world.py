"""A tiny offline world in which Diffusion-KTO's effect is visible and measured on a CPU in minutes.

The repository's demo and end-to-end test fixture, not part of the method (docs/tiny_world.md describes
it): coloured shapes captioned "a red circle on a white background" (sample_world), a hidden utility read
off the pixels (world_utility), a tiny Stable-Diffusion-shaped base model trained on the world
(build_tiny_model, train_base) and loaded by train_kto.py and eval.py like SD v1-5, and feedback in the
Pick-a-Pic v2 schema on fresh drawings, with a label-shuffled control (write_feedback). A world is a pure
function of its seed (and sizes), built once into $DIFFUSION_KTO_CACHE/tiny-world-<VERSION>-seed<seed>
(world_path). study.py runs the study of many worlds.

    python tiny_world.py [--seed 1] [--sizes n_images=256 ...]   # build (or find) a world, print its folder
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import utils

# bump when anything below changes, so cached worlds are rebuilt
WORLD_VERSION = "v5"
RESOLUTION = 32
# torch threads of every build (floats depend on it): the same world whatever the launcher
BUILD_THREADS = 2
# The build's sizes (world_path(seed, **sizes) overrides them). asked_pct: how many of the base's training
# images have the caption's colour (v2 had 50: docs/tiny_world.md says why not)
SIZES = dict(
    n_images=4096,
    vae_steps=600,
    unet_steps=1500,
    unet_batch=64,
    pairs_per_prompt=30,
    sample_steps=20,
    asked_pct=100,
)
# seconds between the progress lines of a long build stage (k/N and an ETA; the tests set 0)
PROGRESS_SECONDS = 30.0
# Seconds per unit of each build stage on a 2-core CPU, for the estimate a build prints first
# (expected_seconds), scaled to the 411-439 s the default world took there (docs/tiny_world.md)
SECONDS_PER = dict(
    start=10.0,
    drawing=0.0002,
    vae_step=0.11,
    unet_image_step=0.0033,
    sample_image_step=0.0011,
    check_image=0.003,
)


def say(*args):
    """print, flushed: a build's lines reach a log file as they happen."""
    print(*args, flush=True)


def duration(seconds: float) -> str:
    return "<1s" if seconds < 0.5 else f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.0f} min"


class Progress:
    """Lines "<stage>: k/N <unit>, <detail>, <elapsed>, about <ETA> left" through `log`, at most one per
    PROGRESS_SECONDS. detail: a function giving the line's middle (a loss), called only when a line is due."""

    def __init__(self, stage: str, total: int, unit: str, log):
        self.stage, self.total, self.unit, self.log = stage, total, unit, log
        self.t0 = self.last = time.time()

    def __call__(self, k: int, detail=None, force: bool = False):
        now = time.time()
        if not force and (k >= self.total or now - self.last < PROGRESS_SECONDS):
            return
        self.last = now
        left = (now - self.t0) / max(k, 1) * (self.total - k)
        extra = f", {detail()}" if detail else ""
        eta = f", about {duration(left)} left" if k < self.total else ""
        self.log(f"{self.stage}: {k}/{self.total} {self.unit}{extra}, {now - self.t0:.0f}s{eta}")


# ----------------------------------------------------------------------------------------------------
# The world: coloured shapes, captions that name them, and the hidden utility

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20)}
# every word of every caption: the vocabulary of the tiny tokenizers
WORDS = ["a", "on", "background", *COLORS, *SHAPES, *BACKGROUNDS]
# Captions that never get feedback (the base model still learns them): each colour on both backgrounds.
HELD_OUT = (
    "a yellow triangle on a black background",
    "a green square on a white background",
    "a red circle on a black background",
    "a blue triangle on a white background",
    "a red square on a white background",
    "a green circle on a black background",
    "a blue square on a black background",
    "a yellow circle on a white background",
)


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


def draw_caption(rng: np.random.Generator, caption: str, resolution: int) -> tuple[Image.Image, float]:
    """An image of the caption ("a red circle on a white background") at a random size and position: (image, size)."""
    _, color, shape, _, _, background, _ = caption.split()
    size = float(rng.uniform(0.12, 0.45))
    center = rng.uniform(0.5 - (0.5 - size) * 0.8, 0.5 + (0.5 - size) * 0.8, size=2)
    return draw_shape(shape, color, background, size, center, resolution), size


def sample_world(rng: np.random.Generator, resolution: int, p_asked: float = 0.5):
    """One (image, caption, utility in [0, 1]): the shape has the caption's colour with probability p_asked."""
    shape, asked, background = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(BACKGROUNDS))
    color = asked if rng.random() < p_asked else rng.choice([c for c in COLORS if c != asked])
    caption = f"a {asked} {shape} on a {background} background"
    image, size = draw_caption(rng, f"a {color} {shape} on a {background} background", resolution)
    return image, caption, 0.5 * (color == asked) + 0.5 * (size - 0.12) / 0.33


def all_captions() -> list[str]:
    """Every caption the tiny world can produce (colour x shape x background), in a fixed order."""
    return [f"a {c} {s} on a {b} background" for c in COLORS for s in SHAPES for b in BACKGROUNDS]


def train_prompts() -> list[str]:
    """The captions that get feedback: all but the held-out ones."""
    return [p for p in all_captions() if p not in HELD_OUT]


def eval_prompts(repeats: int = 32) -> list[str]:
    """The held-out captions, each repeated: eval.py gives every entry its own seed (8 x 32 = 256 pairs)."""
    return list(HELD_OUT) * repeats


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


# ----------------------------------------------------------------------------------------------------
# The base model: a tiny Stable-Diffusion-shaped pipeline (build_tiny_model, random weights), its VAE, UNet and
# text encoder then trained on the world. Every random draw comes from generators seeded by the world seed (CPU
# generators, also when the models run on CUDA), so a world is a function of its seed.


def build_clip_tokenizer(words, path: Path):
    """A CLIP BPE tokenizer made offline: byte-level characters plus one merge chain per known word."""
    from transformers import CLIPTokenizer

    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(c) for c in bs] + [chr(256 + n) for n in range(256 - len(bs))]
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
    # the tiny world's captions are <= 10 tokens; SD's CLIP uses 77
    tokenizer.model_max_length = 16
    tokenizer.save_pretrained(path)
    return tokenizer


def sd15_scheduler_config() -> dict:
    """Stable Diffusion v1-5's DDPM training noise schedule (scheduler/scheduler_config.json)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


# The tiny VAE: 32 px images to 8 x 8 x 4 latents (fixtures.py's tiny SDXL uses it too)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    sample_size=32,
)


def build_tiny_model(path: Path, seed: int = 0) -> None:
    """Save a random-weight, Stable-Diffusion-shaped pipeline (32 px images, 8x8x4 latents) in diffusers layout."""
    # diffusers' pipelines import transformers' image processors, which announce they want torchvision
    utils.silence_torchvision_notice()
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(WORDS, path / "tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(**TINY_VAE)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(**sd15_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    length = tokenizer.model_max_length
    return tokenizer(
        captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids


def train_base(path: Path, seed: int, sizes: dict, device="cpu", log=say) -> dict:
    """Train the tiny pipeline's VAE, then its UNet and text encoder together, on world images."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    build_tiny_model(path, seed=seed)
    rng = np.random.default_rng(seed)
    world = [sample_world(rng, RESOLUTION, sizes["asked_pct"] / 100) for _ in range(sizes["n_images"])]
    pixels = torch.stack([data.image_to_tensor(image, RESOLUTION) for image, _, _ in world])
    captions = [caption for _, caption, _ in world]
    gen = torch.Generator().manual_seed(seed)
    vae_steps, unet_steps, unet_batch = sizes["vae_steps"], sizes["unet_steps"], sizes["unet_batch"]

    # VAE: reconstruction + a small KL term, as in latent diffusion
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=2e-3, total_steps=max(vae_steps, 2), pct_start=0.1
    )
    t0 = time.time()
    progress = Progress("vae", vae_steps, "steps", log)
    for step in range(vae_steps):
        x = pixels[torch.randint(0, len(pixels), (32,), generator=gen)].to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        loss = (vae.decode(z).sample - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        progress(step + 1, lambda: f"reconstruction mse {loss.item():.4f}")
    log(f"vae: {vae_steps} steps, reconstruction mse {loss.item():.4f}, {time.time() - t0:.0f}s")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        posteriors = [
            vae.encode(pixels[i : i + 256].to(device)).latent_dist for i in range(0, len(pixels), 256)
        ]
    mean, std = (torch.cat([getattr(q, k) for q in posteriors]).cpu() for k in ("mean", "std"))
    # unit-variance latents, as SD's 0.18215
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    mean, std = mean * vae.config.scaling_factor, std * vae.config.scaling_factor
    vae.save_pretrained(path / "vae")

    # UNet and text encoder: the epsilon-prediction loss, 10% empty captions for classifier-free guidance,
    # on latents drawn from the VAE's posterior as train_kto.py draws them (not its means: v3,
    # docs/tiny_world.md). The text encoder is trained too: a random one barely separates the captions (the
    # KL estimate z then measures nothing).
    pipe = StableDiffusionPipeline.from_pretrained(path, vae=vae)
    ids, empty = tokenize(pipe.tokenizer, captions), tokenize(pipe.tokenizer, [""])
    unet, text_encoder = pipe.unet.to(device).train(), pipe.text_encoder.to(device).train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=2e-3, total_steps=max(unet_steps, 2), pct_start=max(0.05, 4 / max(unet_steps, 8))
    )
    t0, ema, history = time.time(), None, {}
    progress = Progress("unet", unet_steps, "steps", log)
    for step in range(unet_steps):
        idx = torch.randint(0, len(mean), (unet_batch,), generator=gen)
        drop = torch.rand(unet_batch, generator=gen) < 0.1
        c = text_encoder(torch.where(drop[:, None], empty, ids[idx]).to(device))[0]
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (unet_batch,), generator=gen)
        x_t = pipe.scheduler.add_noise(x0, eps, t)
        loss = (unet(x_t.to(device), t.to(device), c).sample - eps.to(device)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        milestone = (step + 1) % max(1, unet_steps // 8) == 0 or step + 1 == unet_steps
        if milestone:
            history[step + 1] = round(ema, 5)
        progress(step + 1, lambda: f"loss {ema:.4f}", force=milestone)
    for name, model in (("unet", unet), ("text_encoder", text_encoder)):
        model.eval().requires_grad_(False).save_pretrained(path / name)
    return dict(unet_loss_ema=history)


def caption_dependence(pipe, images: list, captions: list[str], seed: int, device="cpu", log=say) -> dict:
    """The base model's mean denoising error (eps-MSE) on images with their own caption and with another one
    drawn at random, same x_t, t and noise: if the second is barely larger, the model ignores its captions and
    the paper's mismatched-pair reference point cannot estimate a KL."""
    gen = torch.Generator().manual_seed(seed)
    unet, vae, text_encoder = pipe.unet.to(device), pipe.vae.to(device), pipe.text_encoder.to(device)
    names, other = sorted(set(captions)), []
    for c in captions:
        choices = [x for x in names if x != c]
        other.append(choices[int(torch.randint(0, len(choices), (1,), generator=gen))])
    err, steps = {"matched": [], "mismatched": []}, []
    progress = Progress("caption check", len(images), "images", log)
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = torch.stack([data.image_to_tensor(im, RESOLUTION) for im in images[i : i + 256]]).to(device)
            q = vae.encode(x).latent_dist
            noise = torch.randn(q.mean.shape, generator=gen)
            x0 = (q.mean.cpu() + q.std.cpu() * noise) * vae.config.scaling_factor
            eps = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
            x_t = pipe.scheduler.add_noise(x0, eps, t).to(device)
            for name, caps in (("matched", captions[i : i + 256]), ("mismatched", other[i : i + 256])):
                c = text_encoder(tokenize(pipe.tokenizer, caps).to(device))[0]
                pred = unet(x_t, t.to(device), c).sample.cpu()
                err[name].append((pred - eps).pow(2).mean(dim=(1, 2, 3)))
            steps.append(t)
            progress(i + len(x))
    m, mm, t = torch.cat(err["matched"]), torch.cat(err["mismatched"]), torch.cat(steps)
    bands = {f"{lo}<=t<{hi}": (t >= lo) & (t < hi) for lo, hi in ((0, 250), (250, 500), (500, 1000))}
    return dict(
        matched=float(m.mean()),
        mismatched=float(mm.mean()),
        ratio=float(mm.mean() / m.mean()),
        mismatched_larger=float((mm > m).float().mean()),
        n_images=len(m),
        by_timestep={
            k: dict(matched=float(m[b].mean()), mismatched=float(mm[b].mean())) for k, b in bands.items()
        },
    )


# ----------------------------------------------------------------------------------------------------
# Feedback: pairs of drawings per caption, the preferred one chosen by the noisy hidden utility


def sample_images(pipe, prompts, seeds, steps, guidance, batch=128, device="cpu", progress=None):
    """Images from a pipeline; image i starts from noise seeded by seeds[i] alone (CPU generators). progress:
    called with the number of images times denoising steps done (a Progress over len(prompts) * steps)."""
    pipe, images, shape = pipe.to(device), [], (4, RESOLUTION // 4, RESOLUTION // 4)

    # The pipeline's callback after step k of the batch that starts at image i. It returns no tensors, so the
    # pipeline's own are used unchanged.
    def step_end(pipe, k, t, tensors):
        progress(i * steps + (k + 1) * len(tensors["latents"]))
        return {}

    for i in range(0, len(prompts), batch):
        latents = [
            torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds[i : i + batch]
        ]
        out = pipe(
            prompts[i : i + batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=torch.stack(latents).to(device),
            height=RESOLUTION,
            width=RESOLUTION,
            output_type="pil",
            callback_on_step_end=step_end if progress else None,
        )
        images += out.images
    return images


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def feedback_table(images: list, prompts: list[str], seed: int, temperature: float = 0.1):
    """Pick-a-Pic v2 rows for images (2k, 2k+1) of the same prompt, the preferred one drawn from a
    Bradley-Terry model of the hidden utility (noisy raters; equal utilities are ties). Returns (table,
    utilities of all images)."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    u = np.array([world_utility(im, p) for im, p in zip(images, prompts)])
    first = np.arange(0, len(prompts), 2)
    p_first = 1 / (1 + np.exp(-(u[first] - u[first + 1]) / temperature))
    label_0 = (rng.random(len(first)) < p_first).astype(np.float64)
    label_0[u[first] == u[first + 1]] = 0.5
    uid_0, uid_1 = ([f"world-{seed}-{i:06d}" for i in first + k] for k in (0, 1))
    n = len(first)
    table = pa.table(
        {
            "caption": [prompts[i] for i in first],
            "jpg_0": pa.array([jpeg(images[i]) for i in first], pa.binary()),
            "jpg_1": pa.array([jpeg(images[i + 1]) for i in first], pa.binary()),
            "label_0": label_0,
            "label_1": 1.0 - label_0,
            "image_0_uid": uid_0,
            "image_1_uid": uid_1,
            "best_image_uid": best_uids(label_0, uid_0, uid_1),
            "are_different": np.ones(n, bool),
            "has_label": np.ones(n, bool),
            "model_0": ["tiny-world-drawing"] * n,
            "model_1": ["tiny-world-drawing"] * n,
            "ranking_id": np.arange(n),
            "user_id": np.zeros(n, np.int64),
            "num_example_per_prompt": np.ones(n, np.int64),
        }
    )
    return table, u


def best_uids(label_0, uid_0, uid_1) -> list[str]:
    return [a if lab == 1 else b if lab == 0 else "" for lab, a, b in zip(label_0, uid_0, uid_1)]


def shuffle_labels(table, seed: int):
    """The control: the same pairs (images, captions) with label_0 permuted across pairs, so the number of
    first-image wins and of ties is kept and each label is independent of the images it now belongs to."""
    label_0 = np.random.default_rng([seed, 1]).permutation(table.column("label_0").to_numpy())
    best = best_uids(
        label_0, table.column("image_0_uid").to_pylist(), table.column("image_1_uid").to_pylist()
    )
    for name, column in (("label_0", label_0), ("label_1", 1.0 - label_0), ("best_image_uid", best)):
        table = table.set_column(table.column_names.index(name), name, [column])
    return table


def label_stats(table, u0: np.ndarray, u1: np.ndarray) -> dict:
    """How labels relate to the hidden utility: agreement with it and the utility gap winner - loser."""
    label_0 = table.column("label_0").to_numpy()
    decided = (label_0 != 0.5) & (u0 != u1)
    win, lose = np.where(label_0 == 1, u0, u1), np.where(label_0 == 1, u1, u0)
    return dict(
        pairs=len(label_0),
        ties=int((label_0 == 0.5).sum()),
        first_wins=int((label_0 == 1).sum()),
        rater_agreement=float(np.mean((label_0 == 1)[decided] == (u0 > u1)[decided])),
        utility_gap=float((win - lose)[label_0 != 0.5].mean()),
    )


def write_feedback(
    pipe, path: Path, seed: int, sizes: dict, device="cpu", log=say
) -> tuple[dict, list, list]:
    """feedback/ (the noisy utility's labels) and feedback-shuffled/ (the control), one parquet shard each."""
    import pyarrow.parquet as pq

    prompts = [p for p in train_prompts() for _ in range(2 * sizes["pairs_per_prompt"])]
    # The rated images are fresh drawings of the world, not the base's samples: Pick-a-Pic's images come from
    # other models than the one fine-tuned (docs/tiny_world.md, "Why v5").
    rng = np.random.default_rng([seed, 2])
    images = [draw_caption(rng, p, RESOLUTION)[0] for p in prompts]
    table, u = feedback_table(images, prompts, seed)
    stats = {}
    for name, t in (("feedback", table), ("feedback-shuffled", shuffle_labels(table, seed))):
        (path / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(t, path / name / "train-00000-of-00001.parquet")
        stats[name] = label_stats(t, u[0::2], u[1::2])
    # every drawing has the asked colour
    stats["feedback_images"] = dict(mean_utility=float(u.mean()))
    # The base's own samples for the same captions (no guidance), for the record: does it draw the asked colour?
    t0, steps, seeds = time.time(), sizes["sample_steps"], [seed * 10**6 + i for i in range(len(prompts))]
    progress = Progress("base samples", len(prompts) * steps, "image-steps", log)
    samples = sample_images(pipe, prompts, seeds, steps, guidance=1.0, device=device, progress=progress)
    ub = np.array([world_utility(im, p) for im, p in zip(samples, prompts)])
    stats["base_images"] = dict(mean_utility=float(ub.mean()), color_match=float(np.mean(ub >= 0.5)))
    log(
        f"feedback: {len(u) // 2} pairs of drawings, mean utility {u.mean():.3f} (base samples {ub.mean():.3f}, "
        f"asked colour {np.mean(ub >= 0.5):.1%}, {time.time() - t0:.0f}s), raters agree with the utility on "
        f"{stats['feedback']['rater_agreement']:.0%} (shuffled: {stats['feedback-shuffled']['rater_agreement']:.0%})"
    )
    return stats, images, prompts


def expected_seconds(sizes: dict) -> dict[str, float]:
    """The build's stages and their expected seconds on a 2-core CPU (SECONDS_PER): an estimate."""
    s, n, steps = SECONDS_PER, 2 * len(train_prompts()) * sizes["pairs_per_prompt"], sizes["sample_steps"]
    unet_steps, unet_batch = sizes["unet_steps"], sizes["unet_batch"]
    return {
        f"set-up and {sizes['n_images']} training images": s["start"] + s["drawing"] * sizes["n_images"],
        f"VAE, {sizes['vae_steps']} steps": s["vae_step"] * sizes["vae_steps"],
        f"UNet and text encoder, {unet_steps} steps of {unet_batch} images": (
            s["unet_image_step"] * unet_steps * unet_batch
        ),
        f"feedback: {n // 2} pairs of drawings, and {n} base samples of {steps} steps": (
            s["drawing"] * n + s["sample_image_step"] * n * steps
        ),
        f"caption check on {n} images": s["check_image"] * n,
    }


def build_world(
    path: Path, seed: int = 0, device: str = "cpu", log=say, final: Path | None = None, **sizes
) -> None:
    """Base model into path/model; feedback into path/feedback and path/feedback-shuffled; path/world.json.
    final: where the world will live once built, named by the log (path is then a temporary folder beside
    it)."""
    # before diffusers' import, as in build_tiny_model
    utils.silence_torchvision_notice()
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sizes, final = {**SIZES, **sizes}, Path(final or path)
    # the first lines: where the world goes, its stages and the expected time, said to be an estimate
    stages = expected_seconds(sizes)
    where = "a 2-core CPU" + ("" if str(device) == "cpu" else f"; on {device} it should take less")
    log(f"building the tiny world of seed {seed} (once; later runs reuse it) into {final}")
    for k, (stage, seconds) in enumerate(stages.items(), 1):
        estimate = duration(seconds)
        log(f"  {k}. {stage}: {'' if estimate.startswith('<') else '~'}{estimate}")
    log(
        f"  about {duration(sum(stages.values()))} in all (an estimate for {where}); the long stages print their "
        f"progress and an ETA measured here every {PROGRESS_SECONDS:.0f}s"
    )
    t0 = time.time()
    record = dict(
        version=WORLD_VERSION,
        seed=seed,
        sizes=sizes,
        device=str(device),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        # what else the weights may depend on: the same seed built elsewhere can be another world
        versions={m: importlib.metadata.version(m) for m in ("diffusers", "transformers", "numpy", "pillow")},
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        held_out=list(HELD_OUT),
    )
    record.update(train_base(path / "model", seed, sizes, device, log))
    scheduler = DDIMScheduler(**sd15_scheduler_config(), set_alpha_to_one=False)
    scheduler.save_pretrained(path / "model" / "scheduler")
    pipe = StableDiffusionPipeline.from_pretrained(path / "model")
    pipe.set_progress_bar_config(disable=True)
    stats, images, prompts = write_feedback(pipe, path, seed, sizes, device, log)
    record.update(stats)
    record["caption_dependence"] = cd = caption_dependence(pipe, images, prompts, seed, device, log)
    log(
        f"base denoising error on its feedback images: matched captions {cd['matched']:.4f}, mismatched "
        f"{cd['mismatched']:.4f} (x{cd['ratio']:.2f}; larger on {cd['mismatched_larger']:.0%} of images)"
    )
    record["build_seconds"] = round(time.time() - t0, 1)
    record["world_hash"] = world_hash(path)
    for f in (path / "world.json", path / "feedback" / "world.json"):
        f.write_text(json.dumps(record, indent=2))
    log(f"world built in {time.time() - t0:.0f}s: {final}")


def train_paths(cfg, given: dict) -> dict:
    """train_kto.py --tiny's base model and data, those of world --world_seed unless given, built only if needed. A
    given --dataset is checked first: bad data fail now, not after the world's build (minutes on an empty cache)."""
    if "dataset" in given:
        data.check_feedback(data.load_feedback(cfg.dataset, cfg.label_policy), cfg)
    world = lambda: world_path(cfg.world_seed)  # noqa: E731
    return {
        **({} if "pretrained_model" in given else dict(pretrained_model=str(world() / "model"))),
        **({} if "dataset" in given else dict(dataset=str(world() / "feedback"))),
    }


def world_path(seed: int = 0, device: str = "cpu", **sizes) -> Path:
    """The cached world of this seed, built on first use (one process builds, others wait; minutes on 2 CPU cores).
    Non-default sizes (tests) get their own folder. The device is not in the name: build where you run."""
    extra = "".join(f"-{k}{v}" for k, v in sorted(sizes.items()) if v != SIZES[k])
    path = utils.cache_dir() / f"tiny-world-{WORLD_VERSION}-seed{seed}{extra}"
    build = functools.partial(build_world, seed=seed, device=device, final=path, **sizes)
    return utils.build_once(path, build, BUILD_THREADS)


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


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Build (or find) a tiny world. The study and its figures: study.py."
    )
    parser.add_argument("--seed", type=int, default=0, help="world seed (one independent world per seed)")
    parser.add_argument("--device", default="cpu", help="where to build the world (cpu | cuda)")
    sizes_help = f"world build sizes other than the defaults {SIZES} (own cache folder)"
    parser.add_argument("--sizes", nargs="*", default=[], metavar="KEY=N", help=sizes_help)
    args = parser.parse_args()
    utils.quiet_libraries()
    sizes = {k: int(v) for k, v in (kv.split("=") for kv in args.sizes)}
    print(world_path(args.seed, args.device, **sizes))
