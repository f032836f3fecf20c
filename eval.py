"""Evaluate a Diffusion-KTO checkpoint against a baseline: prompt-by-prompt win rates on five scorers.

Both models draw images from the same prompts, starting from the same initial noise for every (prompt, image
index); five automatic scorers (Aesthetic, PickScore, ImageReward, CLIP, HPS v2) rate every image, and for each
prompt the median-scoring image of each model is compared (Li et al., NeurIPS 2024, Sec. 5 and App. A.2). With
an even number of images per prompt that is the lower median, the lower of the two middle values: the worse
one at 2.
Paper, Pick-a-Pic test prompts, Diffusion-KTO vs SD v1-5: 86.0 / 85.2 / 87.2 / 62.0 / 62.0 % win rate.

Launch:
    python eval.py --ckpt runs/tiny/checkpoint-200 --tiny             # CPU, offline: the tiny world's utility
    python eval.py --ckpt runs/kto/checkpoint-10000 --num_prompts 100  # 1 GPU, vs the run's base model
    torchrun --standalone --nproc_per_node 8 eval.py --ckpt runs/kto/checkpoint-10000 --prompts pickapic_test
    python eval.py --ckpt runs/kto/checkpoint-10000 --export runs/kto-pipeline  # a full diffusers folder; no eval
Every flag: python eval.py --help. Scorers and outputs: docs/evaluation.md. Outputs in --out: results.json,
results.md, win_rates.png, grid_*.png, images/{checkpoint,baseline}/*.png, images/index.csv and
images/generation.json. A rerun with the same --out skips finished images, and is refused if the settings or
the models' weights changed. A checkpoint-<step> folder's model card (README.md) gets the results table.

This file is the protocol: the flags, evaluate() (check, generate, score, compare, report), the win rate, the
scoring interface (SCORERS), generation with shared noise and --export. The report's table, charts and grids
are in eval_report.py; the prompt sets in prompt_sets.py; the five scorers' weights, models and upstream
preprocessing in scorers.py; the tiny world's utility in tiny_world.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from PIL import Image

import eval_report
import models
import prompt_sets
import reports
import scorers
import tiny_world
import utils
from scorers import DEFAULT_PATHS, METRICS
from utils import DataError

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    ckpt: str = ""
    """model under test: a checkpoint-<step> folder of train_kto.py, a diffusers folder or a hub id"""
    baseline: str = ""
    """model to compare against, same forms as --ckpt; empty: the base model in the checkpoint's run.json,
    with the VAE the checkpoint was trained with (--pretrained_vae) where there is one, so that only the UNet
    differs"""
    prompts: str = "pickapic_test"
    """pickapic_test (500) | hps (3,200) | parti (1,632) | tiny (the tiny world's held-out captions) | a
    .txt/.csv/.tsv/.jsonl/.parquet file"""
    num_prompts: int = 0
    """use this many prompts, evenly spaced through the set (0 = all)"""
    images_per_prompt: int = 5
    """images per prompt per model; the per-prompt score is their median (paper: 5), the lower of the two
    middle values for an even count: the worse one at 2"""
    steps: int = 50
    """denoising steps of the model's own scheduler"""
    guidance: float = 7.5
    """classifier-free guidance scale (1: no classifier-free guidance)"""
    seed: int = 0
    """image (p, k) starts from noise seeded by (seed, p, k) only: the same for both models"""
    metrics: str = ",".join(METRICS)
    """comma-separated scorers to run: any of the default's, and utility (the tiny world's captions only)"""
    compare: str = "median"
    """median: median image per model per prompt (paper) | all: every checkpoint x baseline image pair"""
    batch_size: int = 8
    """images per generation call and per scorer call, per rank"""
    out: str = "runs/eval"
    """output folder (images, results.json, results.md, PNG charts)"""
    tiny: bool = False
    """the offline tiny world: its held-out prompts, its hidden utility as metric; the five paper metrics'
    paths become tiny RANDOM-WEIGHT scorers (plumbing only)"""
    aesthetic_path: str = DEFAULT_PATHS["aesthetic"]
    """LAION aesthetic v2 head (.pth file, folder, URL); a CLIP folder beside it overrides ViT-L/14"""
    pickscore_path: str = DEFAULT_PATHS["pickscore"]
    """PickScore CLIPModel: hub id or local folder"""
    imagereward_path: str = DEFAULT_PATHS["imagereward"]
    """folder or hub repo with ImageReward.pt and med_config.json"""
    clip_path: str = DEFAULT_PATHS["clip"]
    """CLIPModel for the CLIP score (cosine of image and text embeddings): hub id or folder"""
    hps_path: str = DEFAULT_PATHS["hps"]
    """HPS v2.0 weights: HPS_v2_compressed.pt, a folder holding it, or a hub repo"""
    export: str = ""
    """write --ckpt as a complete diffusers pipeline folder (its base model in run.json + its UNet and VAE; no
    safety checker, as eval.py generates without one) to this new folder, then exit: no images, no scores"""


# --tiny defaults (flags still win): one image per (held-out prompt, seed), each its own comparison
TINY = dict(
    prompts="tiny",
    steps=20,
    guidance=3.0,
    images_per_prompt=1,
    batch_size=64,
    metrics="utility",
    out="runs/eval-tiny",
)
CHOICES = dict(compare=("median", "all"))
# Ranges of the numeric flags, checked before anything loads
BOUNDS = dict(images_per_prompt=(1, None), steps=(1, None), batch_size=(1, None), num_prompts=(0, None))
BOUNDS |= dict(seed=(0, None), guidance=(1, None))


def tiny_paths(cfg, given: dict) -> dict:
    """--tiny: the five paper metrics' weights are the tiny random-weight scorers (fixtures.py, built once). The one
    place eval.py imports the test fixtures, and only under --tiny."""
    import fixtures

    return {f"{m}_path": str(p) for m, p in fixtures.tiny_scorer_paths().items()}


def parse_config(argv=None) -> Config:
    """Flags come from Config's fields. --tiny only changes defaults: flags given explicitly always win."""
    cfg, parser = utils.parse_config(Config, argv, __doc__, CHOICES, TINY, tiny_paths, BOUNDS)
    if not cfg.ckpt:
        parser.error("--ckpt is required")
    return cfg


def tiny_note(cfg: Config) -> str:
    """The warning the results carry when some of --metrics are scored by --tiny's random-weight scorers (a
    --<metric>_path given explicitly is used as it is); '' when none are."""
    metrics = [m.strip() for m in cfg.metrics.split(",")]
    if not (cfg.tiny and set(metrics) & set(METRICS)):
        return ""
    tiny = tiny_paths(cfg, {})
    random = [
        SCORERS[m].title for m in METRICS if m in metrics and getattr(cfg, f"{m}_path") == tiny[f"{m}_path"]
    ]
    return (
        f"--tiny: the scores of {', '.join(random)} come from tiny RANDOM-WEIGHT models with the real "
        "architectures; they test the plumbing only and say nothing about image quality ('utility', the tiny "
        "world's own, is real)."
        if random
        else ""
    )


# ----------------------------------------------------------------------------------------------------
# The evaluation: check everything, generate, score, compare per prompt, report


def evaluate(cfg: Config, rank: int, world_size: int, device: torch.device):
    """The whole evaluation on this rank; returns the report on rank 0 (None on other ranks)."""
    why = "Every rank writes its share of the images and reads all of them to score its share"
    utils.check_shared_folder(Path(cfg.out), rank, world_size, ("--out", why))
    cfg, metrics, pair, prompts, ids = check_inputs(cfg)
    items = [(p, k, prompts[p]) for p in ids for k in range(cfg.images_per_prompt)]
    out = Path(cfg.out)
    # Everything an image depends on, the weights by their content (a checkpoint retrained in place is another
    # model); a rerun into the same --out reuses the images only if all of it is the same
    generation = dict(
        ckpt=pair["checkpoint"],
        baseline=pair["baseline"],
        ckpt_weights_sha256=models.weights_digest(pair["checkpoint"]),
        baseline_weights_sha256=models.weights_digest(pair["baseline"]),
        prompts=cfg.prompts,
        prompt_texts_sha256=hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        steps=cfg.steps,
        guidance=cfg.guidance,
        seed=cfg.seed,
        dtype=str(generation_dtype(device)),
    )
    settings_file, problem = out / "images" / "generation.json", None
    if rank == 0:
        settings_file.parent.mkdir(parents=True, exist_ok=True)
        if not settings_file.exists():
            with utils.atomic_path(settings_file) as tmp:
                tmp.write_text(json.dumps(generation, indent=2))
        elif settings_file.read_text() != json.dumps(generation, indent=2):
            problem = (
                f"--out {out}: holds images made with other settings or prompt texts ({settings_file}). Use a "
                f"new --out, or delete {out / 'images'} to regenerate."
            )
    # rank 0 alone reads and writes it; every rank stops together
    problem = utils.agree(problem, world_size)
    if problem:
        raise DataError(problem)
    # an earlier evaluation's results go now: a rerun that stops early leaves none that read as its own
    if rank == 0:
        for old in ("results.json", "results.md"):
            (out / old).unlink(missing_ok=True)

    # -- generate: each rank takes every world_size-th image; images already on disk are skipped --------------
    folders = {tag: out / "images" / tag for tag in pair}
    for tag, model in pair.items():
        generate(cfg, model, items[rank::world_size], folders[tag], tag, rank, device)
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        pd.DataFrame(
            [
                dict(
                    model=tag,
                    prompt_id=p,
                    image_index=k,
                    seed=utils.derive_seed(cfg.seed, p, k),
                    path=str(Path(tag) / image_name(p, k)),
                    prompt=t,
                )
                for tag in folders
                for p, k, t in items
            ]
        ).to_csv(out / "images" / "index.csv", index=False)

    # -- score every image, then compare the models prompt by prompt (rank 0) -----------------------------------
    paths = {(tag, p, k): folders[tag] / image_name(p, k) for tag in folders for p, k, _ in items}
    scores = score_images(cfg, metrics, paths, prompts, rank, world_size, device)
    if rank != 0:
        return None
    # [n_prompts, images_per_prompt] per model
    tables = {
        m: {
            tag: np.array([[scores[m][(tag, p, k)] for k in range(cfg.images_per_prompt)] for p in ids])
            for tag in folders
        }
        for m in metrics
    }
    results = {m: win_rate(tables[m]["checkpoint"], tables[m]["baseline"], cfg.compare) for m in metrics}

    # -- report ----------------------------------------------------------------------------------------------
    versions = {mod: __import__(mod).__version__ for mod in ("torch", "diffusers", "transformers", "numpy")}
    report = dict(
        metrics=results,
        settings=dataclasses.asdict(cfg),
        checkpoint_model=pair["checkpoint"],
        baseline_model=pair["baseline"],
        n_images_per_model=len(items),
        world_size=world_size,
        device=str(device),
        versions=dict(python=platform.python_version(), **versions),
        argv=sys.argv,
    )
    note = tiny_note(cfg)
    if note:
        report["note"] = note
    titles = {m: SCORERS[m].title for m in metrics}
    written = eval_report.write_reports(cfg, report, tables, prompts, ids, paths, out, titles)
    # a checkpoint-<step> folder of train_kto.py: its model card gets the table
    if pair["checkpoint"]["unet"] or pair["checkpoint"]["lora"]:
        written.append(eval_report.add_to_model_card(cfg, out / "results.md", results))
    # Last, and whole: results.json says the evaluation finished (study.py skips those that have one)
    with utils.atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    written.insert(0, out / "results.json")
    print((out / "results.md").read_text())
    if note:
        print(note)
    print("Wrote:\n" + "\n".join(f"  {p}" for p in [*written, out / "images" / "index.csv"]))
    return report


def check_inputs(cfg: Config):
    """Everything bad input can break, checked before any image is generated: the flags, both models, the prompts
    and every scorer's files (resolved to local copies, or fetched now: a failure costs no generation time).
    Returns (cfg with --baseline filled in, metrics, {'checkpoint': model, 'baseline': model}, prompts, prompt ids)."""
    metrics = [m.strip() for m in cfg.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in SCORERS]
    if unknown or not metrics:
        raise DataError(
            f"--metrics {cfg.metrics}: unknown {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(SCORERS)}."
        )
    ckpt = models.describe_model(cfg.ckpt, "--ckpt")
    if not cfg.baseline:
        if ckpt["unet"] is None and ckpt["lora"] is None:
            raise DataError(
                f"--ckpt {cfg.ckpt} is a full model, so there is no recorded base model: pass --baseline."
            )
        cfg = dataclasses.replace(cfg, baseline=ckpt["base"])
        # the base model with the checkpoint's VAE, if it has one: the two models differ only in the UNet
        baseline = dict(ckpt, unet=None, lora=None)
    else:
        baseline = models.describe_model(cfg.baseline, "--baseline")
    pair = dict(checkpoint=ckpt, baseline=baseline)
    prompts = prompt_sets.load_prompts(cfg.prompts)
    # prompt ids are indices in the full set: seeds follow them
    ids = prompt_sets.subset_indices(prompts, cfg.num_prompts)
    if "utility" in metrics:
        captions = tiny_world.all_captions()
        others = [prompts[p] for p in ids if prompts[p] not in set(captions)]
        if others:
            raise DataError(
                f"--metrics utility: the tiny world's utility is defined only for its own captions (such "
                f"as '{captions[0]}'), but --prompts {cfg.prompts} has {len(others)} "
                f"other prompt(s), e.g. {others[0]!r}. Use --prompts tiny (the --tiny default) or a file "
                f"of world captions, or score these prompts with other --metrics."
            )
    for m in metrics:
        SCORERS[m].locate(cfg)
    return cfg, metrics, pair, prompts, ids


# ----------------------------------------------------------------------------------------------------
# Win rates: a pure function of two score arrays (tests import it)


def lower_median(x: np.ndarray) -> np.ndarray:
    """Median over the last axis that is always one of the values (the lower middle one for even counts)."""
    return np.sort(x, axis=-1)[..., (x.shape[-1] - 1) // 2]


def wilson_interval(rate: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion `rate` seen over n trials (z: the normal quantile, 95% by
    default)."""
    centre = (rate + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(rate * (1 - rate) / n + z**2 / (4 * n**2))
    # within [0, 1] but for float rounding
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(
    ckpt: np.ndarray, baseline: np.ndarray, compare: str = "median", n_boot: int = 10_000, seed: int = 0
) -> dict:
    """Win rate of the checkpoint over the baseline. ckpt, baseline: scores [n_prompts, images_per_prompt].

    Per prompt: win 1, tie 0.5, loss 0 between the two models' median images (compare="median", the paper), or
    the mean of that over every checkpoint x baseline image pair (compare="all"). Win rate = mean over prompts;
    ci95 = 2.5 / 97.5 % percentiles of the mean over prompts resampled with replacement (fixed seed). When
    every prompt has the same outcome (or there is one prompt) every resample is the same and that interval is
    a point, so ci95 is then the Wilson score 95% interval of the win rate over n_prompts instead."""
    ckpt, baseline = np.asarray(ckpt, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if ckpt.shape != baseline.shape or ckpt.ndim != 2 or ckpt.size == 0:
        raise ValueError(
            f"need two score arrays of the same shape [n_prompts, n_images]; got {ckpt.shape}, "
            f"{baseline.shape}"
        )
    if not (np.isfinite(ckpt).all() and np.isfinite(baseline).all()):
        raise ValueError("scores contain NaN or inf")
    if compare == "median":
        a, b = lower_median(ckpt), lower_median(baseline)
        outcome = (a > b) + 0.5 * (a == b)
    elif compare == "all":
        a, b = ckpt[:, :, None], baseline[:, None, :]
        outcome = ((a > b) + 0.5 * (a == b)).mean(axis=(1, 2))
    else:
        raise ValueError(f"compare must be 'median' or 'all'; got {compare!r}")
    rng, n = np.random.default_rng(seed), len(outcome)
    boot = np.concatenate(
        [outcome[rng.integers(0, n, (min(1000, n_boot - i), n))].mean(axis=1) for i in range(0, n_boot, 1000)]
    )
    lo, hi = np.quantile(boot, [0.025, 0.975])
    if (outcome == outcome[0]).all():
        lo, hi = wilson_interval(outcome.mean(), n)
    return dict(
        win_rate=float(outcome.mean()),
        ci95=[float(lo), float(hi)],
        mean_ckpt=float(ckpt.mean()),
        mean_baseline=float(baseline.mean()),
        n_prompts=int(n),
    )


# ----------------------------------------------------------------------------------------------------
# Scoring: a metric is a Scorer; the five paper metrics' files, preprocessing and models are in scorers.py


class Scorer(NamedTuple):
    """A metric, as SCORERS names it: how to find its files and load it."""

    # in tables and charts
    title: str
    # locate(cfg) -> every file the scorer reads, resolved (downloaded now if need be) or DataError
    locate: Callable
    # load(cfg, device) -> score(images: list[PIL.Image], prompts: list[str]) -> FloatTensor [N]
    load: Callable


def load_utility(cfg: Config, device):
    """The tiny world's hidden utility, read off the pixels (tiny_world.world_utility); needs no weights."""
    return lambda images, prompts: torch.tensor(
        [tiny_world.world_utility(im, p) for im, p in zip(images, prompts)]
    )


SCORERS = dict(
    aesthetic=Scorer("Aesthetic", scorers.locate_aesthetic, scorers.load_aesthetic),
    pickscore=Scorer("PickScore", scorers.locate_pickscore, scorers.load_pickscore),
    imagereward=Scorer("ImageReward", scorers.locate_imagereward, scorers.load_imagereward),
    clip=Scorer("CLIP", scorers.locate_clip_score, scorers.load_clip_score),
    hps=Scorer("HPS v2", scorers.locate_hps, scorers.load_hps),
    utility=Scorer("Utility (tiny world)", lambda cfg: {}, load_utility),
)


def score_images(
    cfg: Config, metrics: list, paths: dict, prompts: list, rank: int, world_size: int, device
) -> dict:
    """{metric: {key: score}} for every image file in paths = {key: path}, key = (model, prompt id, k).

    Identical images (same file bytes) with the same prompt are scored once, so identical models tie exactly.
    The ranks split the unique images and then share their scores."""
    digest = {key: hashlib.sha1(path.read_bytes()).hexdigest() for key, path in paths.items()}
    first = {}
    for key, path in paths.items():
        # (image hash, prompt id) -> one of its files
        first.setdefault((digest[key], key[1]), path)
    mine = sorted(first)[rank::world_size]
    unique = {m: {} for m in metrics}
    for m in metrics:
        score, bar = (
            SCORERS[m].load(cfg, device),
            reports.Progress(len(mine), f"{m} rank {rank}", unit="images"),
        )
        for i in range(0, len(mine), cfg.batch_size):
            batch = mine[i : i + cfg.batch_size]
            images = [Image.open(first[u]).convert("RGB") for u in batch]
            with torch.no_grad():
                values = score(images, [prompts[p] for _, p in batch]).float().cpu().tolist()
            unique[m].update(zip(batch, values))
            bar.update(len(batch))
        bar.close()
        del score
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, unique)
        unique = {m: {u: v for part in gathered for u, v in part[m].items()} for m in metrics}
    return {m: {key: unique[m][(digest[key], key[1])] for key in paths} for m in metrics}


# ----------------------------------------------------------------------------------------------------
# Generation: both models, the same initial noise for image k of prompt p


def generation_dtype(device: torch.device) -> torch.dtype:
    """Images are generated in fp16 on GPUs, in fp32 on CPUs."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_pipeline(model: dict, device: torch.device):
    """The pipeline of `model` (models.describe_model): the base, with the checkpoint's UNet or LoRA adapters and
    VAE, in generation_dtype."""
    dtype = generation_dtype(device)
    try:
        pipe = models.load_pipeline(model["base"], dtype=dtype, **models.trained_components(model, dtype))
    except OSError as e:
        raise DataError(
            f"could not load the model {model} ({e}). Offline? Pass a local diffusers folder."
        ) from e
    if model["lora"]:
        pipe.load_lora_weights(model["lora"], weight_name=models.LORA_FILE)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(cfg: Config, model: dict, items: list[tuple], folder: Path, desc: str, rank: int, device):
    """Generate the images of `items` = [(prompt_id, k, prompt)] not yet on disk, batch_size at a time. The noise
    of image (p, k) is seeded by (cfg.seed, p, k) only: the same for both models, whatever the batch or rank."""
    todo = [it for it in items if not (folder / image_name(it[0], it[1])).exists()]
    if len(todo) < len(items):
        print(
            f"reusing {eval_report.counted(len(items) - len(todo), 'image')} already in {folder}", flush=True
        )
    if not todo:
        return
    pipe = load_pipeline(model, device)
    folder.mkdir(parents=True, exist_ok=True)
    c = pipe.unet.config.in_channels
    # latent side; image side = this x the VAE's scale factor
    h = w = pipe.unet.config.sample_size
    # plain lines in a log file
    bar = reports.Progress(len(todo), f"{desc} rank {rank}", unit="images")
    for i in range(0, len(todo), cfg.batch_size):
        batch = todo[i : i + cfg.batch_size]
        # one CPU generator per image: its initial latents, then any noise a stochastic scheduler draws
        gens = [torch.Generator("cpu").manual_seed(utils.derive_seed(cfg.seed, p, k)) for p, k, _ in batch]
        latents = torch.stack([torch.randn((c, h, w), generator=g) for g in gens])
        with torch.no_grad():
            images = pipe(
                [t for _, _, t in batch],
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance,
                latents=latents.to(pipe.device, pipe.unet.dtype),
                generator=gens,
            ).images
        for (p, k, _), image in zip(batch, images):
            # a killed run never leaves half an image
            with utils.atomic_path(folder / image_name(p, k)) as tmp:
                image.save(tmp, format="PNG")
        bar.update(len(batch))
    bar.close()
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()


def image_name(p: int, k: int) -> str:
    return f"{p:05d}_{k:02d}.png"


# ----------------------------------------------------------------------------------------------------
# Export: a checkpoint as a complete diffusers pipeline


def export(cfg: Config, rank: int, world_size: int, device) -> Path:
    """--export OUT: the base model of --ckpt (from its run.json) with the checkpoint's UNet and VAE, saved as one
    diffusers folder (with the checkpoint's model card, if it has one) that DiffusionPipeline.from_pretrained(OUT)
    loads alone."""
    model, out = models.describe_model(cfg.ckpt, "--ckpt"), Path(cfg.export)
    if model["unet"] is None and model["lora"] is None:
        raise DataError(
            f"--ckpt {cfg.ckpt}: already a complete pipeline; --export takes a checkpoint-<step> folder "
            f"of train_kto.py."
        )
    if out.exists():
        raise DataError(f"--export {out}: already exists; pass a new folder (or delete this one).")
    # weights as saved (float32): the exported UNet equals the checkpoint's bit for bit; LoRA adapters are fused
    if rank == 0:
        pipe = models.load_pipeline(model["base"], **models.trained_components(model))
        if model["lora"]:
            pipe.load_lora_weights(model["lora"], weight_name=models.LORA_FILE)
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        out.parent.mkdir(parents=True, exist_ok=True)
        with utils.atomic_path(out) as tmp:
            pipe.save_pretrained(tmp)
            if (Path(cfg.ckpt) / "README.md").exists():
                shutil.copyfile(Path(cfg.ckpt) / "README.md", tmp / "README.md")
        print(
            f"Exported {cfg.ckpt} (base model {model['base']} + its UNet and VAE, no safety checker) "
            f"to {out}\n"
            f"  load it with DiffusionPipeline.from_pretrained({str(out)!r})"
        )
    return out


# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    """Run the evaluation: returns the report on rank 0, None on other ranks; or --export: returns the exported
    folder on every rank."""
    # first: --tiny may build the tiny scorers while parsing
    utils.quiet_libraries()
    with utils.reported((DataError,)):
        cfg = parse_config(argv)
    return utils.run_main(export if cfg.export else evaluate, cfg, (DataError,))


if __name__ == "__main__":
    main()
