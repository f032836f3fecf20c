"""The tiny-world study's harness (study.py): its tables, intervals over runs and plot from made-up results (no
training), and which runs it starts.

    python -m pytest -q test_study.py
"""

import numpy as np
import pytest
from PIL import Image

import study

# ----------------------------------------------------------------------------------------------------
# The study's tables and plot (from made-up results: no training)


def made_up_study():
    rng = np.random.default_rng(0)
    rows = []

    def row(seed, kind, steps, baseline="base", ablation=False, train_seed=0):
        w = float(rng.uniform(0.3, 0.9))
        rows.append(
            dict(
                seed=seed,
                kind=kind,
                steps=steps,
                baseline=baseline,
                ablation=ablation,
                win_rate=w,
                ci95=[w - 0.06, w + 0.05],
                n_prompts=256,
                mean_ckpt=float(rng.uniform(0.7, 0.9)),
                mean_baseline=0.8,
                train_seed=train_seed,
            )
        )

    for s in (0, 1, 2):
        for n in (50, 100, 200, 300, 400):
            row(s, "KTO", n)
        for n in (200, 400):
            row(s, "shuffled labels", n)
            row(s, "SFT", n)
            row(s, "KTO", n, baseline="SFT")
    for a in study.ABLATIONS:
        row(0, a, 200, ablation=True)
    for s in (0, 1, 2):  # two more training seeds, default steps
        for t in (5, 7):
            for kind in ("KTO", "shuffled labels", "SFT"):
                row(s, kind, 200, train_seed=t)
            row(s, "KTO", 200, baseline="SFT", train_seed=t)
    rows = [
        r for r in rows if not (r["seed"] == 2 and r["kind"] == "SFT" and r["steps"] == 400)
    ]  # one failed
    worlds = {
        s: dict(
            caption_dependence=dict(matched=0.04, mismatched=0.14, ratio=3.5),
            feedback=dict(rater_agreement=0.64, utility_gap=0.08),
            **{"feedback-shuffled": dict(utility_gap=-0.004)},
            world_hash=f"{s}bc" * 20,
            base_images=dict(color_match=0.999, mean_utility=0.8),
            feedback_images=dict(mean_utility=0.7),
        )
        for s in (0, 1, 2)
    }
    return rows, worlds


def test_study_table_has_every_row_and_says_what_did_not_run(tmp_path):
    rows, worlds = made_up_study()
    table = study.study_table(rows, worlds, [50, 100, 200, 300, 400], "cpu", 2, 1.0)
    cells = {
        line.split("|")[1].strip() + "/" + line.split("|")[2].strip(): [
            c.strip() for c in line.split("|")[3:-1]
        ]
        for line in table.splitlines()
        if line.startswith("| ") and line.split("|")[2].strip() in ("200", "400")
    }
    fmt = lambda r: f"{r['win_rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"  # noqa: E731
    rows = [r for r in rows if r["train_seed"] == 0]  # the tables of the first training seed
    for r in rows:
        if r["ablation"] or r["steps"] not in (200, 400):
            continue
        column = 3 if r["baseline"] == "SFT" else ["KTO", "shuffled labels", "SFT"].index(r["kind"])
        assert cells[f"{r['seed']}/{r['steps']}"][column] == fmt(r), r
    assert cells["2/400"][2] == "not run"  # the failed run is named, not hidden
    # the worlds
    assert (
        "| 1 (1bc1bc1bc1bc) | 0.0400 / 0.1400 (x3.50) | 64% | -5% | 99.9%, 0.800 | 0.700 |"
        in table.splitlines()
    )
    for a, flags in study.ABLATIONS.items():
        r = next(r for r in rows if r["kind"] == a)
        assert f"| 0 | `{' '.join(flags)}` | {fmt(r)} |" in table
    kto200 = [
        r["win_rate"] for r in rows if r["kind"] == "KTO" and r["steps"] == 200 and r["baseline"] == "base"
    ]
    assert f"mean win rate over 3 world(s) {np.mean(kto200):.3f}" in table
    for s in (0, 1, 2):  # the steps curve, one line per world
        line = next(
            line
            for line in table.splitlines()
            if line.startswith(f"| {s} | ") and line.count("|") == 7 and "[" in line.split("|")[2]
        )
        assert line.split("|")[2:-1] == [
            f" {fmt(r)} "
            for r in sorted(
                (r for r in rows if r["seed"] == s and r["kind"] == "KTO" and r["baseline"] == "base"),
                key=lambda r: r["steps"],
            )
        ]
    study.steps_figure(rows, tmp_path / "steps.png")
    assert Image.open(tmp_path / "steps.png").size[0] > 400


def test_study_table_gives_each_training_seeds_run_and_intervals_over_runs():
    rows, worlds = made_up_study()
    first_only = study.study_table(rows, worlds, [50, 100, 200, 300, 400], "cpu", 2, 1.0, train_seeds=(0,))
    table = study.study_table(rows, worlds, [50, 100, 200, 300, 400], "cpu", 2, 1.0, train_seeds=(0, 5, 7))
    assert table.startswith(first_only.rstrip("\n"))  # the other tables show the first seed's runs
    win = {
        (r["seed"], r["train_seed"], r["kind"], r["baseline"]): r["win_rate"]
        for r in rows
        if r["steps"] == 200 and not r["ablation"]
    }
    kinds = [("KTO", "base"), ("shuffled labels", "base"), ("SFT", "base"), ("KTO", "SFT")]
    lines = table.splitlines()
    header = next(
        i for i, x in enumerate(lines) if x.startswith("| world (200 steps; training seeds 0 / 5 / 7) |")
    )
    for s in (0, 1, 2):
        line = next(x for x in lines[header:] if x.startswith(f"| {s} | "))
        assert line.split("|")[2:-1] == [
            " " + " / ".join(f"{win[(s, t, *k)]:.3f}" for t in (0, 5, 7)) + " " for k in kinds
        ]
    kto = [win[(s, t, "KTO", "base")] for s in (0, 1, 2) for t in (0, 5, 7)]
    half = 2.306 * np.std(kto, ddof=1) / 3  # t quantile, 8 degrees of freedom
    assert (
        f"KTO vs base at 200 steps over 9 runs (worlds x training seeds): mean {np.mean(kto):.3f}, 95% "
        f"t-interval [{np.mean(kto) - half:.3f}, {np.mean(kto) + half:.3f}], {sum(x > 0.5 for x in kto)} of 9"
        in table
    )
    gain = [
        r["mean_ckpt"] - 0.8
        for s in (0, 1, 2)
        for t in (0, 5, 7)
        for r in rows
        if r["steps"] == 200
        and (r["seed"], r["train_seed"], r["kind"], r["baseline"]) == (s, t, "KTO", "base")
    ]
    half = 2.306 * np.std(gain, ddof=1) / 3
    assert (
        f"above 0.5; mean utility change {np.mean(gain):+.4f} [{np.mean(gain) - half:+.4f}, "
        f"{np.mean(gain) + half:+.4f}].\nshuffled labels vs base" in table
    )
    d = [
        win[(s, t, "KTO", "base")] - win[(s, t, "shuffled labels", "base")]
        for s in (0, 1, 2)
        for t in (0, 5, 7)
    ]
    assert f"KTO minus shuffled labels, paired by run: {np.mean(d):+.3f}" in table
    w1 = [win[(1, t, "shuffled labels", "base")] for t in (0, 5, 7)]
    half = 4.303 * np.std(w1, ddof=1) / np.sqrt(3)  # 2 degrees of freedom
    assert (
        "shuffled labels vs base per world, mean over its training seeds [95% t-interval]: world 0 " in table
        and f"; world 1 {np.mean(w1):.3f} [{np.mean(w1) - half:.3f}, {np.mean(w1) + half:.3f}]; " in table
    )


def test_study_puts_the_ablations_on_a_world_it_studies(tmp_path, monkeypatch):
    """The ablation rows go on the first studied world unless told otherwise; a world outside --seeds is refused
    before anything runs (it used to drop the ablations from the table without a word). No run starts here: the
    jobs are recorded, the worlds are empty folders."""
    started = []
    monkeypatch.setattr(study, "run_jobs", lambda commands, *a, **k: started.extend(c[0] for c in commands))
    monkeypatch.setattr(study, "world_path", lambda seed, *a, **k: tmp_path / f"world{seed}")
    monkeypatch.setattr(study, "world_hash", lambda path: "0" * 64)
    monkeypatch.setattr(study, "study_table", lambda *a, **k: "")
    monkeypatch.setattr(study, "steps_figure", lambda *a, **k: None)
    for seed in (3, 4):
        (tmp_path / f"world{seed}").mkdir()
        (tmp_path / f"world{seed}" / "world.json").write_text("{}")
    with pytest.raises(ValueError, match=r"ablation world\(s\) \[0\] are not among the worlds \[3, 4\]"):
        study.study(seeds=(3, 4), ablation_seeds=(0,), out=tmp_path / "out", work=tmp_path / "work")
    assert started == [] and not (tmp_path / "out").exists()
    study.study(seeds=(3, 4), out=tmp_path / "out", work=tmp_path / "work", train_seeds=(0,))
    ablations = sorted(n for n in started if any(f" {a} " in n for a in study.ABLATIONS))
    assert ablations == sorted(f"train seed 3 {a} t0" for a in study.ABLATIONS), started


def test_a_study_with_other_settings_does_not_reuse_the_runs_in_its_work_folder(tmp_path, monkeypatch):
    """Run folders are named by world, kind and training seed only: a study with other training flags, world
    sizes or device in the same --work would take the finished runs as its own. It is refused before anything
    runs."""
    started = []
    monkeypatch.setattr(study, "run_jobs", lambda commands, *a, **k: started.extend(c[0] for c in commands))
    monkeypatch.setattr(study, "world_path", lambda seed, *a, **k: tmp_path / f"world{seed}")
    monkeypatch.setattr(study, "world_hash", lambda path: "0" * 64)
    monkeypatch.setattr(study, "study_table", lambda *a, **k: "")
    monkeypatch.setattr(study, "steps_figure", lambda *a, **k: None)
    (tmp_path / "world3").mkdir()
    (tmp_path / "world3" / "world.json").write_text("{}")
    common = dict(seeds=(3,), out=tmp_path / "out", work=tmp_path / "work", train_seeds=(0,))
    study.study(**common)
    # the default study's KTO run finished
    (tmp_path / "work" / "seed3" / "KTO" / "checkpoint-400" / "unet").mkdir(parents=True)
    started.clear()
    for other in (
        dict(extra=["--lora_rank", "8", "--learning_rate", "1e-4"]),
        dict(sizes={"unet_steps": 1000}),
        dict(device="cuda"),
    ):
        with pytest.raises(ValueError, match="Use another --work, or delete"):
            study.study(**common, **other)
        assert started == [], other
    # the same settings again: the finished run is reused, the others start
    study.study(**common)
    assert "train seed 3 SFT t0" in started and "train seed 3 KTO t0" not in started


def test_t_interval_covers_the_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    for n in (3, 9):
        hits = [
            lo <= 0.6 <= hi for lo, hi in (study.t_interval(rng.normal(0.6, 0.1, n))[1:] for _ in range(4000))
        ]
        # a normal quantile (1.96) gives ~0.83 at n=3
        assert 0.935 < np.mean(hits) < 0.965, (
            n,
            np.mean(hits),
        )
    with pytest.raises(ValueError, match="covers 2 to 31 runs"):
        study.t_interval(np.ones(32))
