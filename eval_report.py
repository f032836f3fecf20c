"""What an evaluation (eval.py) shows a person: results.md (what was compared and how, then the win-rate
table), win_rates.png, grids of the first prompts' images with their scores, and the section it adds to a
checkpoint's model card. `cfg` is eval.py's Config; `titles` names each metric as tables and charts show
it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

import model_card
import reports
from reports import wrap


def counted(n: int, noun: str) -> str:
    """'1 image', '5 images'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def generation_settings(cfg) -> str:
    """The settings besides the models and prompts that change the numbers, in words."""
    return (
        f"{counted(cfg.images_per_prompt, 'image')} per prompt, compare = {cfg.compare}, "
        f"{counted(cfg.steps, 'step')}, guidance {cfg.guidance:g}, seed {cfg.seed}"
    )


def write_markdown(results: dict, path: Path, cfg, pair: dict, titles: dict, note: str = ""):
    """results.md: what was compared and how (with the VAE of each model that has its own), then the table.
    pair = {'checkpoint': model, 'baseline': model} as models.describe_model gives them."""
    names = [titles[m] for m in results]
    rows = [
        ("win rate (%)", lambda r: f"{100 * r['win_rate']:.1f}"),
        ("95% CI (%)", lambda r: f"{100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f}"),
        ("mean, checkpoint", lambda r: f"{r['mean_ckpt']:.4g}"),
        ("mean, baseline", lambda r: f"{r['mean_baseline']:.4g}"),
    ]
    n = next(iter(results.values()))["n_prompts"] if results else 0
    vaes = [f"{tag} `{model['vae']}`" for tag, model in pair.items() if model.get("vae")]
    lines = [
        f"Win rate of `{cfg.ckpt}` over `{cfg.baseline}` on {counted(n, 'prompt')} of `{cfg.prompts}`, "
        f"{generation_settings(cfg)}."
        + (f" VAE instead of the base model's: {', '.join(vaes)}." if vaes else ""),
        "",
    ]
    if note:
        lines += [f"**{note}**", ""]
    lines += ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(fmt(results[m]) for m in results) + " |" for label, fmt in rows]
    path.write_text("\n".join(lines) + "\n")


def draw_win_rates(results: dict, path: Path, cfg, titles: dict, note: str = ""):
    """Win rates (%) as bars with their 95% CIs and the 50% line; the title names both models in full."""
    from matplotlib.figure import Figure

    rates = np.array([100 * r["win_rate"] for r in results.values()])
    ci = np.array([[100 * r["ci95"][0], 100 * r["ci95"][1]] for r in results.values()])
    fig = Figure(figsize=(max(6.4, 1.4 * len(results) + 1.5), 4.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(results))
    ax.bar(x, rates, width=0.6, color="#4c72b0", yerr=[rates - ci[:, 0], ci[:, 1] - rates], capsize=8)
    ax.axhline(50, color="black", linestyle="--", linewidth=1)
    for xi, rate, top in zip(x, rates, ci[:, 1]):
        ax.text(xi, top + 2, f"{rate:.1f}%", ha="center", va="bottom")
    ax.set_xticks(x, [wrap(titles[m], 12) for m in results])
    ax.set(ylim=(0, 112), yticks=range(0, 101, 25), ylabel="win rate of the checkpoint (%), 95% CI")
    n = next(iter(results.values()))["n_prompts"]
    ax.set_title(
        wrap(f"Win rate of {cfg.ckpt} over {cfg.baseline}", 70, path=True)
        + "\n"
        + wrap(
            f"{counted(n, 'prompt')} of {cfg.prompts}, {counted(cfg.images_per_prompt, 'image')} per prompt, "
            f"compare = {cfg.compare}",
            80,
        ),
        fontsize=10,
    )
    # '' when no metric has random weights
    ax.set_xlabel(wrap(note, 90), color="firebrick", fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    return fig


def draw_grid(prompt: str, images: dict, scores: dict, cfg, path: Path, titles: dict, note: str = ""):
    """One row per model (baseline above checkpoint), one column per image index: the same initial noise in
    each column. images = {model: [PIL]}, scores = {model: {metric: [score per image]}}, shown under each
    image; with --compare median a * marks each model's median image for that metric, the one compared."""
    from matplotlib.figure import Figure

    n = len(images["baseline"])
    fig = Figure(
        figsize=(max(4.5, 1.5 + 2 * n), 2 * (2.5 + 0.18 * len(scores["baseline"])) + 1),
        dpi=100,
        layout="constrained",
    )
    axes = fig.subplots(2, n, squeeze=False)
    for row, (tag, model) in enumerate((("baseline", cfg.baseline), ("checkpoint", cfg.ckpt))):
        for k, image in enumerate(images[tag]):
            lines = []
            for m, values in scores[tag].items():
                median = np.argsort(values, kind="stable")[(n - 1) // 2]
                lines.append(
                    f"{titles[m]} {values[k]:.4g}" + (" *" if cfg.compare == "median" and k == median else "")
                )
            reports.show_image(axes[row, k], image, "\n".join(lines))
        axes[row, 0].set_ylabel(wrap(f"{tag}: {model}", 28, path=True), fontsize=8)
    fig.suptitle(wrap(prompt, int(12 * fig.get_figwidth())), fontsize=10)
    notes = ["same initial noise in each column"] + (
        ["* = the model's median image for that metric (the one compared)"] if cfg.compare == "median" else []
    )
    fig.supxlabel(
        wrap(". ".join(filter(None, ["; ".join(notes), note])), int(14 * fig.get_figwidth())),
        fontsize=7,
        color="dimgray",
    )
    # a prompt in a script the font lacks draws boxes; index.csv has its text
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path, bbox_inches="tight")
    return fig


def write_reports(
    cfg, report: dict, tables: dict, prompts: list, ids: list, paths: dict, out: Path, titles: dict
) -> list:
    """results.md, win_rates.png and grid_<prompt id>.png for the first 4 prompts (report: eval.evaluate's,
    with its "note" on random-weight scorers, if any; titles: {metric: its name in tables and charts});
    returns their paths."""
    results, note = report["metrics"], report.get("note", "")
    pair = dict(checkpoint=report["checkpoint_model"], baseline=report["baseline_model"])
    write_markdown(results, out / "results.md", cfg, pair, titles, note)
    draw_win_rates(results, out / "win_rates.png", cfg, titles, note)
    written = [out / "results.md", out / "win_rates.png"]
    # a rerun's grids replace the earlier run's, whose prompts may differ
    for old in out.glob("grid_*.png"):
        old.unlink()
    for row, p in enumerate(ids[:4]):
        images = {
            tag: [Image.open(paths[(tag, p, k)]) for k in range(cfg.images_per_prompt)]
            for tag in ("baseline", "checkpoint")
        }
        scores = {tag: {m: tables[m][tag][row] for m in tables} for tag in images}
        draw_grid(prompts[p], images, scores, cfg, out / f"grid_{p:05d}.png", titles, note)
        written.append(out / f"grid_{p:05d}.png")
    return written


def add_to_model_card(cfg, results_md: Path, results: dict) -> Path:
    """The results table (results.md) as a section of the checkpoint's model card, replacing an earlier
    evaluation with the same prompts, number of prompts, baseline and generation settings
    (generation_settings). A checkpoint without a card gets one from its run.json."""
    ckpt = Path(cfg.ckpt)
    if not (ckpt / "README.md").exists():
        model_card.write_model_card(ckpt, json.loads((ckpt.parent / "run.json").read_text()))
    n = next(iter(results.values()))["n_prompts"]
    model_card.append_to_model_card(
        ckpt,
        f"## Evaluation ({cfg.prompts}, {n} prompts, vs {cfg.baseline}; {generation_settings(cfg)})\n\n"
        + results_md.read_text(),
    )
    return ckpt / "README.md"
