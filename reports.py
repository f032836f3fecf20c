"""What a run shows a person: progress lines, training curves, image grids, experiment trackers and the run's record
(run.json, metrics.jsonl); the checkpoints' model cards are model_card.py's."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoders import native_resolution
from model_card import write_model_card
from models import autocast_dtype, load_pipeline
from utils import DataError, atomic_path, derive_seed, global_sums

# ----------------------------------------------------------------------------------------------------
# Progress of long work


class Progress:
    """Progress of long work: a tqdm bar on a terminal; in a log file (stderr not a terminal) one plain line every
    `every` seconds and at the end, instead of a bar redrawn with carriage returns into one endless line."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "steps",
        initial: int = 0,
        every: float = 60.0,
        enabled: bool = True,
    ):
        self.total, self.desc, self.unit, self.every, self.done = total, desc, unit, every, initial
        self.start, self.shown, self.first, self.info = time.monotonic(), time.monotonic(), initial, ""
        self.enabled, self.bar = enabled, None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit.rstrip("s"), dynamic_ncols=True
            )

    def update(self, n: int = 1, **info):
        self.done += n
        self.info = " ".join(f"{k}={v}" for k, v in info.items())
        if self.bar is not None:
            self.bar.set_postfix_str(self.info, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and (now - self.shown >= self.every or self.done >= self.total):
            self.shown, each = now, (now - self.start) / max(self.done - self.first, 1)
            print(
                f"{self.desc}: {self.done}/{self.total} {self.unit}, {each:.3g} s each, "
                f"{each * (self.total - self.done):.0f} s left {self.info}".rstrip(),
                file=sys.stderr,
                flush=True,
            )

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------
# Figures: training curves and image grids


def wrap(text: str, width: int, path: bool = False) -> str:
    """Lines of at most `width` characters, broken at spaces (and after a "/" too when `path`)."""
    import textwrap

    mark = "\x1f"  # a space after each "/" lets textwrap break there; the marked spaces are removed again
    lines = textwrap.wrap(text.replace("/", f"/{mark} ") if path else text, width, break_on_hyphens=False)
    return "\n".join(line.replace(f"{mark} ", "").replace(mark, "") for line in lines) or text


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib Figure as PNG, atomically. A character the font lacks draws a box, not a warning."""
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(tmp, format="png")
    return Path(path)


def show_image(ax, image: Image.Image, label: str):
    """One image on `ax`, no ticks, `label` under it; small images stay sharp (no smoothing of their pixels)."""
    ax.imshow(
        np.asarray(image.convert("RGB")), interpolation="nearest" if image.width < 128 else "antialiased"
    )
    ax.set(xticks=[], yticks=[])
    ax.set_xlabel(label, fontsize=8)


# (metrics.jsonl keys, panel title): one panel each; the rewards of both classes share one
CURVES = (
    (("loss",), "loss"),
    (("reward_desirable", "reward_undesirable"), "implicit reward"),
    (("z",), "reference point z"),
    (("accuracy",), "implicit accuracy"),
    (("grad_norm",), "grad norm"),
    (("lr",), "learning rate"),
    # Measured every --heldout_steps with fixed draws (heldout.py): points, not smoothed
    (("heldout_reward_desirable", "heldout_reward_undesirable"), "held-out reward (fixed draws)"),
    (("heldout_margin",), "held-out margin: liked - disliked"),
)


def metric_lines(text: str):
    """(line, row) for each line of a metrics.jsonl that is a JSON row with a step; a line that is not (a run killed
    while writing it) is skipped."""
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            yield line, row


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, one per step (the last one written wins), in step order. A line that is not
    JSON (a run killed while writing it) is skipped."""
    if not Path(path).is_file():
        raise DataError(
            f"{path}: no such file. Pass the --output_dir of a train_kto.py run (it holds metrics.jsonl)."
        )
    rows = {int(row["step"]): row for _, row in metric_lines(Path(path).read_text())}
    if not rows:
        raise DataError(f"{path}: no metrics yet (no complete line with a step).")
    return [rows[s] for s in sorted(rows)]


def ema(values: np.ndarray, span: float) -> np.ndarray:
    """Exponential moving average with weight 2 / (span + 1), debiased as TensorBoard's smoothing is (the first
    points are not pulled towards 0). NaN/inf values (skipped steps) are left out; the average carries over them."""
    alpha, avg, weight, out = 2.0 / (span + 1.0), 0.0, 0.0, np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if np.isfinite(v):
            avg, weight = (1 - alpha) * avg + alpha * v, (1 - alpha) * weight + alpha
        out[i] = avg / weight if weight > 0 else np.nan
    return out


def curves_figure(rows: list[dict], title: str):
    """The figure of plot_curves: one panel per CURVES entry, raw (thin, light) and smoothed (bold) against step."""
    from matplotlib.figure import Figure

    steps = np.array([r["step"] for r in rows])
    span = max(1.0, len(rows) / 20)  # the average covers about a twentieth of the run
    fig = Figure(figsize=(16, 8), dpi=100, layout="constrained")
    for ax, (keys, name) in zip(fig.subplots(2, 4).flat, CURVES):
        for key, color in zip(keys, ("tab:blue", "tab:red")):
            y = np.array([r.get(key, np.nan) for r in rows], dtype=np.float64)
            y[~np.isfinite(y)] = np.nan
            if key.startswith("heldout_"):
                seen = np.isfinite(y)
                ax.plot(steps[seen], y[seen], color=color, marker="o", markersize=3, label=key)
                # 0: the base model's value
                ax.axhline(0, color="gray", linewidth=0.8)
                continue
            ax.plot(steps, y, color=color, linewidth=0.8, alpha=0.35)
            ax.plot(steps, ema(y, span), color=color, linewidth=2, label=key)
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    skipped = sum(int(r.get("skipped", 0)) for r in rows)
    note = f"; {skipped} skipped step(s)" if skipped else ""
    fig.suptitle(f"{title}: {len(rows)} steps{note} (thin: raw; bold: EMA, span {span:.0f} steps)")
    return fig


def plot_curves(run_dir: Path) -> Path:
    """<run_dir>/curves.png from <run_dir>/metrics.jsonl (see CURVES); returns its path."""
    run_dir = Path(run_dir)
    fig = curves_figure(read_metrics(run_dir / "metrics.jsonl"), run_dir.resolve().name)
    return save_figure(fig, run_dir / "curves.png")


def redraw_stale_curves(run_dir: Path) -> Path | None:
    """curves.png redrawn where metrics.jsonl is newer (a run stopped between its last save and the redraw after
    it); returns its path, or None where it was current."""
    curves, metrics = Path(run_dir) / "curves.png", Path(run_dir) / "metrics.jsonl"
    if not metrics.exists() or (curves.exists() and curves.stat().st_mtime_ns >= metrics.stat().st_mtime_ns):
        return None
    return plot_curves(run_dir)


def save_image_grid(
    images: list, labels: list[str], title: str, path: Path, columns: int | None = None
) -> Path:
    """PIL `images` in rows of `columns` (default: up to 4), each with its full `label` wrapped under it, `title`
    on top; written to `path` (PNG) atomically. Returns `path`."""
    from matplotlib.figure import Figure

    if len(images) != len(labels) or not images:
        raise ValueError(
            f"need one label per image and at least one image; got {len(images)} images, {len(labels)} labels"
        )
    columns = max(1, min(columns or 4, len(images)))
    rows = -(-len(images) // columns)
    labels = [wrap(str(label), 30) for label in labels]
    lines = max(label.count("\n") + 1 for label in labels)
    fig = Figure(
        figsize=(max(4.0, 2.5 * columns), rows * (2.5 + 0.15 * lines) + 0.6), dpi=100, layout="constrained"
    )
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat[len(images) :]:
        ax.set_axis_off()
    for ax, image, label in zip(axes.flat, images, labels):
        show_image(ax, image, label)
    fig.suptitle(wrap(title, int(12 * fig.get_figwidth())), fontsize=11)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------
# Experiment trackers

TRACKERS = ("none", "tensorboard", "wandb")


def is_number(v) -> bool:
    """A real number a tracker can plot: int, float, numpy scalars, one-element tensors (not bools or strings)."""
    import numbers

    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def tracker_backend(kind: str):
    """The module a --report_to tracker logs through (None for "none"), or a DataError that says what to install:
    train_kto.check_flags calls it, so that a missing package fails before any model loads."""
    if kind not in TRACKERS:
        raise DataError(f"tracker {kind!r}: choose from {', '.join(TRACKERS)}.")
    try:
        if kind == "tensorboard":
            import torch.utils.tensorboard as tensorboard

            return tensorboard
        if kind == "wandb":
            import wandb

            return wandb
    except ImportError as e:
        raise DataError(
            {
                "tensorboard": "--report_to tensorboard needs the tensorboard package: pip install tensorboard",
                "wandb": "--report_to wandb needs the wandb package: pip install wandb (then `wandb login`, "
                "or WANDB_MODE=offline to keep the run on disk)",
            }[kind]
        ) from e
    return None


def read_prompts(text: str) -> list[str]:
    """--validation_prompts: a .txt file with one prompt per line, or prompts separated by '|' (blanks dropped).
    A missing or unreadable file is a DataError (train_kto.check_flags reads it before any model loads)."""
    if text.endswith(".txt"):
        try:
            text = Path(text).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(
                f"--validation_prompts {text}: cannot read it ({e.__class__.__name__}: {e}). Pass a UTF-8 .txt "
                "file with one prompt per line, or the prompts themselves separated by '|'."
            ) from e
        prompts = text.splitlines()
    else:
        prompts = text.split("|")
    return [p.strip() for p in prompts if p.strip()]


class Tracker:
    """Metrics and images to TensorBoard (<run_dir>/tensorboard) or Weights & Biases, or nowhere ("none").

    The backend is imported only when asked for. W&B runs online unless WANDB_MODE says otherwise: without a
    network, WANDB_MODE=offline keeps the run in <run_dir>/wandb for a later `wandb sync`."""

    def __init__(self, kind: str, run_dir: Path, config: dict):
        self.kind, self.writer, self.run = kind, None, None
        backend = tracker_backend(kind)
        if kind == "tensorboard":
            self.writer = backend.SummaryWriter(str(Path(run_dir) / "tensorboard"))
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")
        elif kind == "wandb":
            wandb = backend
            mode = os.environ.get("WANDB_MODE", "online")
            try:
                self.run = wandb.init(project="diffusion-kto", dir=str(run_dir), config=config, mode=mode)
            except Exception as e:  # not logged in, no network, ...
                raise DataError(
                    f"wandb could not start a run in {mode} mode ({type(e).__name__}: {e}). Without a "
                    "network or a login: WANDB_MODE=offline, then `wandb sync` later."
                ) from e

    def log(self, row: dict, step: int):
        """Every number in `row` (except the step itself) at `step`; text and other values are skipped."""
        numbers = {k: float(v) for k, v in row.items() if k != "step" and is_number(v)}
        if self.writer is not None:
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, step)
        elif self.run is not None:
            self.run.log(numbers, step=step)

    def log_image(self, name: str, path: Path, step: int):
        """An image file (a validation grid) under `name` at `step`."""
        if self.writer is not None:
            with Image.open(path) as image:
                self.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        elif self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(str(path))}, step=step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        elif self.run is not None:
            self.run.finish()
        self.writer = self.run = None


# ----------------------------------------------------------------------------------------------------
# A training run's record: run.json, metrics.jsonl, validation grids, model cards


def start_warnings(cfg, num_heldout: int, native: int) -> list[str]:
    """Settings that run but do less than they seem to: said at the start, and in run.json's launch entry.
    native: the base model's image side (encoders.native_resolution)."""
    said = []
    if cfg.resolution != native:
        said.append(
            f"--resolution {cfg.resolution}: the base model makes {native} px images, and the validation "
            "images and eval.py sample at that size, where this run does not train; pass --resolution "
            f"{native} to train there."
        )
    if cfg.learning_rate == 0:
        said.append("--learning_rate 0: the weights never change (a control run).")
    if cfg.lr_warmup_steps > cfg.max_train_steps:
        said.append(
            f"--lr_warmup_steps {cfg.lr_warmup_steps} > --max_train_steps {cfg.max_train_steps}: the "
            f"learning rate reaches only {cfg.max_train_steps / cfg.lr_warmup_steps:.0%} of --learning_rate."
        )
    if num_heldout and cfg.heldout_steps > cfg.max_train_steps:
        said.append(
            f"{num_heldout} images are held out of training (--heldout_images) but never scored: "
            f"--heldout_steps {cfg.heldout_steps} > --max_train_steps {cfg.max_train_steps}. Pass "
            "--heldout_steps 0 to train on them, or a smaller --heldout_steps."
        )
    return said


def write_run_record(
    cfg,
    out_dir: Path,
    start_step: int,
    world_size: int,
    device,
    data: dict,
    said: list[str],
    command: list[str],
):
    """run.json: the current config, the data counts, library versions and every launch (its command line as
    main() was given it, step, ranks, precision, the start's warnings `said`). A resume whose run.json is gone
    says so in its launch (earlier_launches_lost); one that cannot be read is refused, not overwritten."""
    file = out_dir / "run.json"
    launches = []
    if start_step and file.exists():
        try:
            launches = list(json.loads(file.read_text())["launches"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{file}: not a run record that can be read ({type(e).__name__}: {e}), so this resume cannot "
                "add its launch to the earlier ones. Restore it, or move it aside to start the record again."
            ) from e
    versions = {m: __import__(m).__version__ for m in ("torch", "diffusers", "transformers", "numpy")}
    launches.append(
        dict(
            argv=list(command),
            start_step=start_step,
            world_size=world_size,
            device=str(device),
            # what --mixed_precision (auto by default) resolved to on this device
            precision=str(autocast_dtype(cfg.mixed_precision, device) or torch.float32).removeprefix(
                "torch."
            ),
            warnings=said,
            # resumed, but the record of the launches before was gone
            **(dict(earlier_launches_lost=True) if start_step and not launches else {}),
            time=time.strftime("%Y-%m-%d %H:%M:%S"),
            versions=dict(python=platform.python_version(), **versions),
        )
    )
    run = dict(
        config=dataclasses.asdict(cfg), world_size=world_size, device=str(device), **data, launches=launches
    )
    with atomic_path(file) as tmp:
        tmp.write_text(json.dumps(run, indent=2))


def step_sums(loss, stats, desirable, grad_finite, corrupt, stop: bool) -> dict[str, torch.Tensor]:
    """The step's metrics as global sums and counts, reduced by name over all ranks (see log_row)."""
    r, z, d = stats["r"], stats["z"], desirable.float()
    # W * (r - z) > 0: the utility is above its midpoint; a tie (r = z, as at step 1) counts half
    won = torch.where(desirable, r > z, r < z).float() + 0.5 * (r == z).float()
    return global_sums(
        dict(
            loss=loss.detach() * len(r),
            r_desirable=(r * d).sum(),
            n_desirable=d.sum(),
            r_undesirable=(r * (1 - d)).sum(),
            n=torch.tensor(float(len(r)), device=r.device),
            won=won.sum(),
            policy_err=stats["policy_err"].sum(),
            ref_err=stats["ref_err"].sum(),
            not_finite=(~(torch.isfinite(loss.detach()) & grad_finite)).float(),
            corrupt=corrupt.sum().float().to(r.device),
            # SIGTERM on any rank (utils.StopRequest)
            stop=torch.tensor(float(stop), device=r.device),
        )
    )


def log_row(step: int, s: dict, z, grad_norm, lr: float, skipped: bool, seconds: float) -> dict:
    """One line of metrics.jsonl (names in docs/outputs.md)."""
    n, n_desirable = s["n"].item(), s["n_desirable"].item()
    # a class with no image in this step's batch (often: 80% of it desirable) has no mean reward: null, not 0
    mean = lambda total, count: total.item() / count if count else None
    return dict(
        step=step,
        loss=s["loss"].item() / n,
        z=z.item(),
        reward_desirable=mean(s["r_desirable"], n_desirable),
        reward_undesirable=mean(s["r_undesirable"], n - n_desirable),
        accuracy=s["won"].item() / n,
        policy_err=s["policy_err"].item() / n,
        ref_err=s["ref_err"].item() / n,
        grad_norm=grad_norm.item(),
        lr=lr,
        desirable_frac=s["n_desirable"].item() / n,
        skipped=int(skipped),
        images_per_sec=n / seconds,
    )


def open_metrics(out_dir: Path, start_step: int):
    """metrics.jsonl for appending; on resume the lines after the checkpoint's step (and any line cut short by a
    crash) are dropped first."""
    file = out_dir / "metrics.jsonl"
    old = metric_lines(file.read_text()) if start_step and file.exists() else []
    with atomic_path(file) as tmp:
        tmp.write_text("".join(line + "\n" for line, row in old if row["step"] <= start_step))
    return open(file, "a")


def decode_images(pipe, latents: torch.Tensor) -> list:
    """The pipeline's last step, latents -> PIL images, outside autocast: the policy needs autocast, but under fp16 it
    would run a float32 VAE (force_upcast: SDXL's overflows in fp16) in fp16, as training avoids (Inputs.posterior)."""
    vae, config = pipe.vae, pipe.vae.config
    z = latents.to(vae.dtype)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:  # VAEs whose latents are standardised per channel
        mean, std = (torch.tensor(v, dtype=z.dtype, device=z.device).view(1, -1, 1, 1) for v in (mean, std))
        z = z * std / config.scaling_factor + mean
    else:
        z = z / config.scaling_factor
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        return pipe.image_processor.postprocess(vae.decode(z).sample, output_type="pil")


class Reports:
    """Rank 0's record of a run as it goes: run.json (written at the start), metrics.jsonl, the progress line, the
    tracker (--report_to), validation grids of the same prompts and seeds (--validation_steps), curves.png and a
    model card per checkpoint. A no-op on other ranks."""

    def __init__(
        self,
        cfg,
        start_step: int,
        path: str,
        device,
        autocast,
        world_size: int,
        counts: dict,
        resume_from,
        command: list[str],
        enabled: bool,
    ):
        self.cfg, self.path, self.device, self.autocast = cfg, path, device, autocast
        self.enabled, self.out, self.pipe = enabled, Path(cfg.output_dir), None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        said = start_warnings(cfg, counts.get("num_heldout", 0), native_resolution(path, cfg.pretrained_vae))
        write_run_record(cfg, self.out, start_step, world_size, device, counts, said, command)
        per_rank = cfg.train_batch_size * cfg.gradient_accumulation_steps
        held_out = f" ({counts['num_heldout']} held out)" if counts.get("num_heldout") else ""
        print(
            f"{counts['num_desirable']} desirable / {counts['num_undesirable']} undesirable "
            f"images{held_out}; {world_size} rank(s) x {cfg.train_batch_size} x "
            f"{cfg.gradient_accumulation_steps} accumulation step(s) = global batch {world_size * per_rank}; "
            f"device {device}"
            + (f"; resuming from {resume_from} at step {start_step}" if resume_from else "")
        )
        for line in said:
            print(f"warning: {line}")
        self.metrics, self.heldout = open_metrics(self.out, start_step), {}
        # Resumed: the model cards start from the last held-out measurement kept, as the whole run's would
        for _, row in metric_lines((self.out / "metrics.jsonl").read_text()):
            self.note_heldout(row)
        self.tracker = Tracker(cfg.report_to, self.out, dataclasses.asdict(cfg))
        self.bar = Progress(cfg.max_train_steps, cfg.objective, initial=start_step)
        self.prompts = read_prompts(cfg.validation_prompts)

    def note_heldout(self, row: dict):
        """Keeps the newest held-out numbers, for the model cards."""
        if any(k.startswith("heldout_") for k in row):
            self.heldout = {"step": row["step"], **{k: v for k, v in row.items() if k.startswith("heldout_")}}

    def log(self, row: dict):
        self.note_heldout(row)
        if self.enabled:
            # strict JSON (jq, pandas, browsers): a non-finite number, a skipped step's loss or norm, is null
            finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
            self.metrics.write(json.dumps(finite, allow_nan=False) + "\n")
            self.metrics.flush()
            self.tracker.log(row, row["step"])
            self.bar.update(loss=f"{row['loss']:.4f}", z=f"{row['z']:.2e}", acc=f"{row['accuracy']:.2f}")

    def validate(self, policy, step: int, inputs):
        """The validation prompts, one image each, seeded by (seed, prompt index) on the CPU: the training streams
        are untouched. The policy runs in eval mode (and goes back to train mode). The VAE and text encoders are
        those of the training inputs where they are loaded (no --cache_latents)."""
        if not (self.enabled and self.cfg.validation_steps and step % self.cfg.validation_steps == 0):
            return
        if self.pipe is None:
            self.pipe = load_pipeline(self.path, unet=policy, dtype=inputs.dtype, **inputs.components())
            self.pipe.to(self.device)
            self.pipe.set_progress_bar_config(disable=True)
        gens = [
            torch.Generator().manual_seed(derive_seed(self.cfg.seed, i)) for i in range(len(self.prompts))
        ]
        policy.eval()
        with torch.no_grad(), self.autocast:
            latents = self.pipe(
                self.prompts,
                num_inference_steps=25,
                guidance_scale=self.cfg.validation_guidance,
                generator=gens,
                output_type="latent",
            ).images
        images = decode_images(self.pipe, latents)
        policy.train()
        (self.out / "validation").mkdir(exist_ok=True)
        grid = save_image_grid(
            images, self.prompts, f"validation, step {step}", self.out / "validation" / f"step-{step:06d}.png"
        )
        self.tracker.log_image("validation", grid, step)

    def card(self, step: int):
        """What writes checkpoint-<step>'s model card into the folder being saved
        (checkpoints.save_checkpoint's card), so that the card is part of the checkpoint's atomic save.
        Nothing on the other ranks."""
        if not self.enabled:
            return lambda folder: None
        run = json.loads((self.out / "run.json").read_text())
        heldout = self.heldout if len(self.heldout) > 1 else None
        return lambda folder: write_model_card(folder, run, heldout, name=f"checkpoint-{step}")

    def checkpoint(self):
        """After a save: curves.png redrawn."""
        if self.enabled:
            plot_curves(self.out)

    def close(self):
        if self.enabled:
            self.bar.close()
            self.metrics.close()
            self.tracker.close()
            print(
                f"done: {self.out / f'checkpoint-{self.cfg.max_train_steps}'}; curves: {self.out / 'curves.png'}"
            )
