"""The tiny-world study: docs/tiny_world.md's tables and plots, from many worlds and training runs.

It builds the worlds (tiny_world.py), trains KTO, KTO on shuffled labels (the control) and SFT on each (and the
ablations on one), with several training seeds, evaluates each run against the base (and KTO against SFT) on the
held-out captions with the hidden utility, and writes the tables (win rates with their CIs over prompts, and
t-intervals over runs) and the plot of win rate against training steps. Every run is a subprocess of
train_kto.py or eval.py (--jobs of them at a time); finished runs are reused, so an interrupted study resumes.

    python study.py --jobs 2 --out runs/study-out     # the whole study (times in docs/tiny_world.md)
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from tiny_world import BUILD_THREADS, HELD_OUT, SIZES, world_hash, world_path

TINY_STEPS = 200  # train_kto.py's --tiny max_train_steps
# the README's worlds; 0-2 were used to choose the --tiny learning rate (docs/tiny_world.md)
STUDY_WORLDS = (3, 4, 5)
ABLATIONS = {
    "loss_averse": ["--utility", "loss_averse"],
    "risk_seeking": ["--utility", "risk_seeking"],
    "z=batch_mean": ["--reference_point", "batch_mean"],
    "z=zero": ["--reference_point", "zero"],
    "gamma=0.5": ["--desirable_ratio", "0.5"],
    "gamma=1.0": ["--desirable_ratio", "1.0"],
}


def run_jobs(
    commands: list[tuple[str, list[str], Path]], jobs: int, threads: int, log, deadline=None
) -> None:
    """Run (name, argv, log file) subprocesses, `jobs` at a time, each with `threads` torch threads; none is
    started after time.time() passes `deadline`."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
    }

    def one(cmd):
        name, argv, logfile = cmd
        if deadline and time.time() > deadline:
            log(f"  {name}: skipped (past --deadline_s)")
            return -1
        logfile.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(logfile, "w") as f:
            rc = subprocess.run(
                [sys.executable, *argv],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=Path(__file__).parent,
            ).returncode
        log(
            f"  {name}: {'ok' if rc == 0 else f'FAILED (exit {rc}, see {logfile})'} in {time.time() - t0:.0f}s"
        )
        return rc

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        failed = [c[0] for c, rc in zip(commands, pool.map(one, commands)) if rc != 0]
    # the study goes on: the table shows what finished, the log what did not
    if failed:
        log(f"FAILED: {failed}")


def check_work(work: Path, settings: dict) -> None:
    """The runs and evaluations in `work` are reused, so they must be made with this study's `settings`
    (training flags, world sizes, device): the first study there records them in work/study.json, and a study
    with other settings is refused before anything runs."""
    record, settings = work / "study.json", json.loads(json.dumps(settings))
    if not record.exists():
        work.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(settings, indent=2))
    elif (recorded := json.loads(record.read_text())) != settings:
        raise ValueError(
            f"study: --work {work} holds runs and evaluations made with {json.dumps(recorded)}, not with "
            f"this study's {json.dumps(settings)}; they would be reused as this study's. Use another --work, "
            f"or delete {work}."
        )


def study(
    seeds=STUDY_WORLDS,
    out: Path = Path("runs/study-out"),
    work: Path = Path("runs/study"),
    device: str = "cpu",
    jobs: int = 1,
    fractions=(0.25, 0.5, 1.0, 1.5, 2.0),
    ablation_seeds=None,
    extra: list[str] = (),
    sizes: dict | None = None,
    deadline_s: float = 0,
    train_seeds=(0, 1, 2, 3, 4),
) -> list:
    """Build the worlds, train KTO / shuffled-label KTO / SFT (and the ablations) on each, evaluate each against
    the base (and KTO against SFT) on the held-out captions. Writes 6 files into `out`: tiny_world_table.md,
    tiny_world_results.json, tiny_world_steps.png, tiny_world.png, tiny_world_worlds.json, tiny_world_study.log.
    Runs are folders under `work`; finished runs and evaluations are reused, so an interrupted study resumes,
    and a study whose `extra`, `sizes` or `device` differ from those recorded in work/study.json is refused.
    `sizes` overrides the worlds' build sizes (SIZES); the --tiny training defaults are used for every run.
    train_seeds: train_kto.py --seed of the runs; the first gets every row, the others KTO, shuffled labels and SFT
    at the default steps (one checkpoint's win rate varies more between training seeds than its CI says).
    ablation_seeds: worlds with the ablation rows (None: the first world; each must be one of `seeds`).
    deadline_s > 0: start no run or evaluation after that many seconds, and write the table of what finished."""
    ablation_seeds = seeds[:1] if ablation_seeds is None else ablation_seeds
    if not set(ablation_seeds) <= set(seeds):
        raise ValueError(
            f"study: ablation world(s) {sorted(set(ablation_seeds) - set(seeds))} are not among the "
            f"worlds {list(seeds)}; pass --ablation_seeds from --seeds (or none)"
        )
    out, work = Path(out), Path(work)
    check_work(work, dict(train_flags=list(extra), sizes=sizes or {}, device=device))
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
    log(
        f"study: seeds {list(seeds)}, device {device}, {jobs} job(s) x {threads} thread(s), fractions "
        f"{list(fractions)}, training seeds {list(train_seeds)}, ablations on {list(ablation_seeds)}, extra train "
        f"flags {list(extra)}, world sizes "
        f"{ {**SIZES, **sizes} }"
    )
    # 1. worlds (each in its own process; build_once makes this a no-op when cached). A CPU build always uses
    # BUILD_THREADS threads, so no more builds run at once than the cores hold (oversubscribed: 5x slower each)
    builders = jobs if device != "cpu" else max(1, min(jobs, (os.cpu_count() or 2) // BUILD_THREADS))
    run_jobs(
        [
            (
                f"world {s}",
                ["tiny_world.py", "--seed", str(s), "--device", device, "--sizes", *size_flags],
                work / "logs" / f"world{s}.log",
            )
            for s in seeds
        ],
        builders,
        threads,
        log,
        deadline,
    )
    world = {s: world_path(s, device, **sizes) for s in seeds}
    # 2. training runs: one per (seed, kind) to the longest step count, checkpoints at every fraction
    steps = sorted({round(f * TINY_STEPS) for f in fractions})
    top = max(steps)
    every = functools.reduce(np.gcd, steps)
    first, runs = train_seeds[0], {}
    for s in seeds:
        model, data = (
            ["--pretrained_model", str(world[s] / "model")],
            ["--dataset", str(world[s] / "feedback")],
        )
        for kind, flags in (
            ("KTO", data),
            ("shuffled labels", ["--dataset", str(world[s] / "feedback-shuffled")]),
            ("SFT", [*data, "--objective", "sft"]),
        ):
            for t in train_seeds:
                runs[(s, kind, t)] = ([*model, *flags], top if t == first else TINY_STEPS)
        for name in ABLATIONS if s in ablation_seeds else {}:
            runs[(s, name, first)] = ([*model, *data, *ABLATIONS[name]], TINY_STEPS)
    # a run's folder: seed<world>/<kind>[-t<training seed>] (the first training seed's name has no suffix)
    name = lambda s, kind, t: (
        work
        / f"seed{s}"
        / (
            kind.replace(" ", "_").replace("=", "-")  # noqa: E731
            + ("" if t == first else f"-t{t}")
        )
    )
    commands = []
    for (s, kind, t), (flags, n) in sorted(
        runs.items(), key=lambda kv: (kv[0][1] in ABLATIONS, kv[0][2] != first, kv[0][0])
    ):
        folder = name(s, kind, t)
        if not (folder / f"checkpoint-{n}" / "unet").exists():
            commands.append(
                (
                    f"train seed {s} {kind} t{t}",
                    [
                        "train_kto.py",
                        "--tiny",
                        "--world_seed",
                        str(s),
                        "--seed",
                        str(t),
                        "--max_train_steps",
                        str(n),
                        "--checkpointing_steps",
                        str(int(every) if n == top else n),
                        "--output_dir",
                        str(folder),
                        # every image trained on, as when the study's results were recorded (no held-out set)
                        "--heldout_steps",
                        "0",
                        *extra,
                        *flags,
                    ],
                    folder.with_suffix(".log"),
                )
            )
    run_jobs(commands, jobs, threads, log, deadline)
    # 3. evaluations: 256 paired (held-out caption, seed) comparisons each
    evals = []
    for s in seeds:
        e = dict(seed=s, train_seed=first, baseline="base", ablation=False)
        evals += [dict(e, kind="KTO", steps=n) for n in steps]
        evals += [
            dict(e, kind=k, steps=n) for k in ("shuffled labels", "SFT") for n in sorted({TINY_STEPS, top})
        ]
        evals += [dict(e, kind="KTO", steps=n, baseline="SFT") for n in sorted({TINY_STEPS, top})]
        evals += [
            dict(e, kind=a, steps=TINY_STEPS, ablation=True)
            for a in (ABLATIONS if s in ablation_seeds else {})
        ]
        for t in train_seeds[1:]:
            e = dict(seed=s, train_seed=t, steps=TINY_STEPS, ablation=False)
            evals += [dict(e, kind=k, baseline="base") for k in ("KTO", "shuffled labels", "SFT")]
            evals.append(dict(e, kind="KTO", baseline="SFT"))
    # most important first, in case --deadline_s cuts the study short: the default steps on every world, then 2x
    evals.sort(
        key=lambda e: (
            e["ablation"],
            e["steps"] != TINY_STEPS,
            e["steps"] != top,
            e["train_seed"] != first,
            e["seed"],
        )
    )
    commands = []
    for e in evals:
        run = name(e["seed"], e["kind"], e["train_seed"])
        e["out"] = str(run.parent / "eval" / f"{run.name}-{e['steps']}-vs-{e['baseline']}")
        argv = ["eval.py", "--ckpt", str(run / f"checkpoint-{e['steps']}"), "--tiny", "--out", e["out"]]
        if e["baseline"] != "base":
            argv += [
                "--baseline",
                str(name(e["seed"], e["baseline"], e["train_seed"]) / f"checkpoint-{e['steps']}"),
            ]
        if not (Path(e["out"]) / "results.json").exists():
            commands.append(
                (
                    f"eval seed {e['seed']} {e['kind']}@{e['steps']} t{e['train_seed']} vs {e['baseline']}",
                    argv,
                    Path(e["out"] + ".log"),
                )
            )
    run_jobs(commands, jobs, threads, log, deadline)
    # 4. table, figures, world records
    rows = []
    for e in evals:
        if not (Path(e["out"]) / "results.json").exists():
            log(f"missing from the table (failed above): {e['out']}")
            continue
        u = json.loads((Path(e["out"]) / "results.json").read_text())["metrics"]["utility"]
        rows.append(
            {**e, **{k: u[k] for k in ("win_rate", "ci95", "n_prompts", "mean_ckpt", "mean_baseline")}}
        )
    # each world's record, with its hash (which world was studied: the same seed built elsewhere can differ)
    worlds = {s: json.loads((world[s] / "world.json").read_text()) for s in seeds}
    for s in seeds:
        worlds[s]["world_hash"] = world_hash(world[s])
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
T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.16,
    2.145,
    2.131,
    2.12,
    2.11,
    2.101,
    2.093,
    2.086,
    2.08,
    2.074,
    2.069,
    2.064,
    2.06,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean of independent runs' values (2 to 31 of them)."""
    v = np.asarray(values, dtype=float)
    if not 2 <= len(v) <= len(T975) + 1:
        raise ValueError(
            f"t_interval: {len(v)} values; the table T975 covers 2 to {len(T975) + 1} runs (add quantiles "
            "of Student's t to T975 for more)"
        )
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
    picked = {
        (r["seed"], r.get("train_seed", 0), *key(r)): r
        for r in rows
        if r["steps"] == TINY_STEPS and not r["ablation"] and key(r) in kinds
    }
    runs = {k: r["win_rate"] for k, r in picked.items()}
    worlds = sorted({k[0] for k in runs})
    lines = [
        "",
        f"| world ({TINY_STEPS} steps; training seeds {' / '.join(map(str, train_seeds))}) | KTO vs base | "
        "shuffled labels vs base | SFT vs base | KTO vs SFT |",
        "|---|---|---|---|---|",
    ]
    for s in worlds:
        cells = [
            " / ".join(f"{runs[(s, t, *k)]:.3f}" if (s, t, *k) in runs else "not run" for t in train_seeds)
            for k in kinds
        ]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("")
    for k in kinds:
        done = [(s, t, *k) for s in worlds for t in train_seeds if (s, t, *k) in runs]
        v = [runs[r] for r in done]
        if len(v) >= 2:
            m, lo, hi = t_interval(v)
            g = t_interval([picked[r]["mean_ckpt"] - picked[r]["mean_baseline"] for r in done])
            lines.append(
                f"{k[0]} vs {k[1]} at {TINY_STEPS} steps over {len(v)} runs (worlds x training seeds): mean "
                f"{m:.3f}, 95% t-interval [{lo:.3f}, {hi:.3f}], {sum(x > 0.5 for x in v)} of {len(v)} above "
                f"0.5; mean utility change {g[0]:+.4f} [{g[1]:+.4f}, {g[2]:+.4f}]."
            )
    pairs = [
        (s, t)
        for s in worlds
        for t in train_seeds
        if (s, t, "KTO", "base") in runs and (s, t, "shuffled labels", "base") in runs
    ]
    if len(pairs) >= 2:
        d = [runs[(*p, "KTO", "base")] - runs[(*p, "shuffled labels", "base")] for p in pairs]
        m, lo, hi = t_interval(d)
        lines.append(
            f"KTO minus shuffled labels, paired by run: {m:+.3f} [{lo:+.3f}, {hi:+.3f}], positive in "
            f"{sum(x > 0 for x in d)} of {len(d)}."
        )
    # world by world over its training seeds: what a CI over one run's prompts cannot show
    for k in kinds[:2]:
        cells = []
        for s in worlds:
            v = [runs[(s, t, *k)] for t in train_seeds if (s, t, *k) in runs]
            if len(v) >= 2:
                m, lo, hi = t_interval(v)
                cells.append(f"world {s} {m:.3f} [{lo:.3f}, {hi:.3f}]")
        if cells:
            lines.append(
                f"{k[0]} vs {k[1]} per world, mean over its training seeds [95% t-interval]: "
                + "; ".join(cells)
                + "."
            )
    return lines


def study_table(rows, worlds, steps, device, jobs, minutes, train_seeds=(0,)) -> str:
    """The README's tables: the worlds; KTO, shuffled labels and SFT against the base and KTO against SFT at the
    default and the longest step count; the ablations; KTO against the base by steps; a summary line per count;
    with several training seeds, the default-step cells over them (over_runs). The other tables show the first
    training seed's runs."""
    by = {
        (r["seed"], r["kind"], r["steps"], r["baseline"]): r
        for r in rows
        if r.get("train_seed", train_seeds[0]) == train_seeds[0]
    }
    cell = lambda *key: (
        f"{by[key]['win_rate']:.3f} [{by[key]['ci95'][0]:.3f}, {by[key]['ci95'][1]:.3f}]"  # noqa
        if key in by
        else "not run"
    )
    seeds = sorted(worlds)
    lines = [
        f"Tiny world study ({device}, {jobs} job(s), {minutes:.1f} min). Win rate on the hidden utility over "
        f"the baseline, {rows[0]['n_prompts'] if rows else 0} paired held-out comparisons, bootstrap 95% CI.",
        "",
        "| world (world_hash) | base error, own / another caption | raters agree | shuffled labels' utility "
        "gap, share of the true one's | base samples: asked colour, mean utility | rated drawings: mean utility |",
        "|---|---|---|---|---|---|",
    ]
    for s in seeds:
        cd, w = worlds[s]["caption_dependence"], worlds[s]
        # the control's one permutation, shared by all its training seeds, is by chance a little for or against
        # the utility
        shuffled = w["feedback-shuffled"]["utility_gap"] / w["feedback"]["utility_gap"]
        lines.append(
            f"| {s} ({w['world_hash'][:12]}) | {cd['matched']:.4f} / {cd['mismatched']:.4f} (x{cd['ratio']:.2f}) "
            f"| {w['feedback']['rater_agreement']:.0%} | {shuffled:+.0%} | {w['base_images']['color_match']:.1%}, "
            f"{w['base_images']['mean_utility']:.3f} | {w['feedback_images']['mean_utility']:.3f} |"
        )
    lines += [
        "",
        "| world | steps | KTO vs base | shuffled labels vs base | SFT vs base | KTO vs SFT |",
        "|---|---|---|---|---|---|",
    ]
    for s in seeds:
        for n in sorted({TINY_STEPS, max(steps)}):
            lines.append(
                f"| {s} | {n} | {cell(s, 'KTO', n, 'base')} | {cell(s, 'shuffled labels', n, 'base')} | "
                f"{cell(s, 'SFT', n, 'base')} | {cell(s, 'KTO', n, 'SFT')} |"
            )
    ablations = sorted(
        {(r["seed"], r["kind"]) for r in rows if r["ablation"]},
        key=lambda k: (k[0], list(ABLATIONS).index(k[1])),
    )
    if ablations:
        lines += [
            "",
            f"| world | {TINY_STEPS} steps, one change from the defaults | vs base |",
            "|---|---|---|",
        ]
        lines += [
            f"| {s} | `{' '.join(ABLATIONS[a])}` | {cell(s, a, TINY_STEPS, 'base')} |" for s, a in ablations
        ]
    lines += [
        "",
        "| world | " + " | ".join(f"KTO, {n} steps" for n in steps) + " |",
        "|---" * (len(steps) + 1) + "|",
    ]
    lines += [f"| {s} | " + " | ".join(cell(s, "KTO", n, "base") for n in steps) + " |" for s in seeds]
    lines.append("")
    for n in sorted({TINY_STEPS, max(steps)}):
        kto = [r for r in by.values() if r["kind"] == "KTO" and r["baseline"] == "base" and r["steps"] == n]
        if kto:
            lines.append(
                f"KTO vs base at {n} steps: mean win rate over {len(kto)} world(s) "
                f"{np.mean([r['win_rate'] for r in kto]):.3f}, lowest CI lower bound "
                f"{min(r['ci95'][0] for r in kto):.3f}."
            )
    if len(train_seeds) > 1:
        lines += over_runs(rows, train_seeds)
    return "\n".join(lines) + "\n"


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
            mine = [
                r
                for r in rows
                if r["seed"] == seed and r["kind"] == kind and r["baseline"] == "base" and not r["ablation"]
            ]
            pts = sorted(
                (r["steps"], r["win_rate"], *r["ci95"])
                for r in mine
                if r.get("train_seed", first_train_seed) == first_train_seed
            )
            if not pts:
                continue
            s, w, lo, hi = map(np.array, zip(*pts))
            ax.errorbar(
                s + 4 * (i - 1),
                w,
                yerr=[w - lo, hi - w],
                fmt=marker,
                color=f"C{i}",
                alpha=alpha or 1,
                capsize=2,
                label=f"{kind}, world {seed}",
            )
            others = [
                (r["steps"], r["win_rate"])
                for r in mine
                if r.get("train_seed", first_train_seed) != first_train_seed
            ]
            if others:
                s, w = map(np.array, zip(*others))
                ax.plot(s + 4 * (i - 1), w, marker[0], mfc="none", color=f"C{i}", alpha=alpha or 1)
    ax.axhline(0.5, color="gray", lw=0.8)
    ax.set_xlabel("training steps (--tiny default: 200)")
    ax.set_ylabel("win rate over the base, hidden utility")
    ax.set_title(
        "Tiny world: win rate vs steps (256 held-out comparisons, 95% CI; hollow: other training seeds)",
        fontsize=8,
    )
    # below: hides no point
    ax.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    fig.savefig(png, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        description="Run the tiny-world study (docs/tiny_world.md): worlds, training "
        "runs and evaluations, then the tables and plots."
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(STUDY_WORLDS),
        help="world seeds (default 3 4 5; worlds 0-2 chose the --tiny learning rate, docs/tiny_world.md)",
    )
    parser.add_argument(
        "--train_seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        help="training seeds (the first: every row; the others: the default-step cells)",
    )
    parser.add_argument(
        "--ablation_seeds",
        type=int,
        nargs="*",
        default=None,
        help="worlds with the ablation rows, from --seeds (default: the first)",
    )
    parser.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.25, 0.5, 1.0, 1.5, 2.0],
        help="KTO steps as fractions of the --tiny default (200)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (threads split between them)")
    parser.add_argument("--out", default="runs/study-out", help="folder of the tables and plots (6 files)")
    parser.add_argument(
        "--work",
        default="runs/study",
        help="folder of the runs and evaluations, reused by a rerun; its study.json records the "
        "--train_flags, --sizes and --device they were made with, and a study with other ones is refused",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where to build worlds (cpu | cuda); training and "
        "evaluation pick CUDA themselves when it is there",
    )
    parser.add_argument(
        "--sizes",
        nargs="*",
        default=[],
        metavar="KEY=N",
        help=f"world build sizes other than the defaults {SIZES} (own cache folder)",
    )
    parser.add_argument(
        "--deadline_s",
        type=float,
        default=0,
        help="start nothing after this many seconds; the table shows what finished",
    )
    parser.add_argument("--train_flags", default="", help="extra train_kto.py flags for every run")
    args = parser.parse_args(argv)
    sizes = {k: int(v) for k, v in (kv.split("=") for kv in args.sizes)}
    return study(
        args.seeds,
        Path(args.out),
        Path(args.work),
        args.device,
        args.jobs,
        args.fractions,
        args.ablation_seeds,
        args.train_flags.split(),
        sizes,
        args.deadline_s,
        args.train_seeds,
    )


# ----------------------------------------------------------------------------------------------------
# The figure of base vs KTO images


def make_figure(eval_out: Path, png: Path, seeds: int = 8) -> dict:
    """Base and KTO images of each held-out prompt (two rows per prompt), same seeds column by column, from the
    images/ folder that `eval.py --tiny --out eval_out` wrote. Returns {(prompt, model, k): (x, y, image file)} of
    each tile."""
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
        draw.text(
            (2, y + size - 14),
            "base" if model == "baseline" else "KTO",
            fill="gray" if model == "baseline" else "blue",
        )
        paths = (
            index[(index.model == model) & (index.prompt == prompt)].sort_values("prompt_id").path.tolist()
        )
        for k, path in enumerate(paths[:seeds]):
            image = (
                Image.open(Path(eval_out) / "images" / path)
                .convert("RGB")
                .resize((size, size), Image.NEAREST)
            )
            canvas.paste(image, (left + k * (size + pad), y))
            tiles[(prompt, model, k)] = (left + k * (size + pad), y, path)
    canvas.save(png)
    return tiles


if __name__ == "__main__":
    main()
