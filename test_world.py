"""The tiny world: a pure function of its seed, a shuffled-label control without signal, and end to end (build,
train with KTO, evaluate against the base with the hidden utility).

The slow tests build the default world of seed 0 once (minutes on 2 CPU cores, then cached in
$DIFFUSION_KTO_CACHE); the determinism test builds three very small worlds in a temporary cache.
"""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import data
import eval as ev
import study
import tiny_world
import train_kto
import utils

HERE = Path(__file__).parent
SMALL = dict(n_images=64, vae_steps=2, unet_steps=4, unet_batch=8, pairs_per_prompt=1, sample_steps=2)


# ----------------------------------------------------------------------------------------------------
# The shuffled-label control (fast: drawn images, no model)


def drawn_pairs(n_pairs: int, seed: int = 0):
    """Pairs of drawn world images of one caption each: colour right half the time, random size."""
    rng = np.random.default_rng(seed)
    prompts = tiny_world.train_prompts()
    images, captions = [], []
    for _ in range(n_pairs):
        caption = prompts[rng.integers(len(prompts))]
        _, asked, shape, _, _, background, _ = caption.split()
        for _ in range(2):
            color = (
                asked if rng.random() < 0.5 else str(rng.choice([c for c in tiny_world.COLORS if c != asked]))
            )
            size = float(rng.uniform(0.12, 0.45))
            images.append(
                tiny_world.draw_shape(shape, color, background, size, (0.5, 0.5), tiny_world.RESOLUTION)
            )
            captions.append(caption)
    return images, captions


def test_shuffled_labels_keep_the_pairs_and_carry_no_signal(tmp_path):
    table, u = tiny_world.feedback_table(*drawn_pairs(300), seed=0)
    u0, u1 = u[0::2], u[1::2]
    real = tiny_world.label_stats(table, u0, u1)
    assert real["utility_gap"] > 0.15 and real["rater_agreement"] > 0.75  # the real labels follow u
    gaps = []
    for seed in range(20):
        shuffled = tiny_world.shuffle_labels(table, seed)
        for col in ("caption", "jpg_0", "jpg_1", "image_0_uid", "image_1_uid"):  # same images and captions
            assert shuffled.column(col).equals(table.column(col)), col
        a, b = table.column("label_0").to_numpy(), shuffled.column("label_0").to_numpy()
        assert sorted(a) == sorted(b) and not (a == b).all()  # same label counts, moved
        assert (shuffled.column("label_1").to_numpy() == 1 - b).all()
        best = shuffled.column("best_image_uid").to_pylist()
        assert best == tiny_world.best_uids(
            b, table.column("image_0_uid").to_pylist(), table.column("image_1_uid").to_pylist()
        )
        gaps.append(tiny_world.label_stats(shuffled, u0, u1)["utility_gap"])
    # no drift toward either class: liked and disliked images of the control have the same mean utility
    se = np.std(np.abs(u0 - u1)) / np.sqrt(len(u0))
    assert abs(np.mean(gaps)) < 3 * se / np.sqrt(len(gaps)) + 0.005, (np.mean(gaps), se)
    assert max(abs(g) for g in gaps) < 4 * se, (gaps, se)
    # and data.load_feedback reads the control with the same desirable / undesirable counts as the real labels
    import pyarrow.parquet as pq

    counts = []
    for name, t in (("real", table), ("shuffled", tiny_world.shuffle_labels(table, 0))):
        folder = tmp_path / name
        folder.mkdir()
        pq.write_table(t, folder / "train-00000-of-00001.parquet")
        labels = data.load_feedback(folder)
        counts.append((int(labels.desirable.sum()), int((~labels.desirable).sum())))
    assert counts[0] == counts[1]


def test_world_images_have_the_asked_colour_as_often_as_asked():
    """sample_world draws the asked colour as often as asked (the default world: always, SIZES["asked_pct"]; its
    base's colour match is checked on the built world below); the pixel utility agrees."""
    for p_asked, lo, hi in ((1.0, 1.0, 1.0), (0.5, 0.4, 0.6)):
        rng = np.random.default_rng(0)
        drawn = [tiny_world.sample_world(rng, tiny_world.RESOLUTION, p_asked) for _ in range(200)]
        right = np.array([u >= 0.5 for _, _, u in drawn])
        assert lo <= right.mean() <= hi, (p_asked, right.mean())
        measured = np.array([tiny_world.world_utility(im, c) >= 0.5 for im, c, _ in drawn])
        assert (measured == right).mean() > 0.97  # the hidden utility sees the colour on pixels


def test_rated_images_are_drawings_of_the_world_not_the_base_samples(tmp_path, monkeypatch):
    """v5: people rate fresh drawings (another "model" than the one fine-tuned, as in Pick-a-Pic); label-free
    fine-tuning on the base's own samples lowered the utility in v4. A barely trained base (SMALL) samples noise,
    drawings have a plain background."""
    monkeypatch.setenv("DIFFUSION_KTO_CACHE", str(tmp_path))
    world = tiny_world.world_path(0, **SMALL)
    table = pd.read_parquet(next((world / "feedback").glob("*.parquet")))
    captions = [*table.caption, *table.caption]
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in [*table.jpg_0, *table.jpg_1]]
    for im, c in zip(images, captions):
        background = np.array(tiny_world.BACKGROUNDS[c.split()[5]], np.float32)
        plain = np.linalg.norm(np.asarray(im, np.float32) - background, axis=-1) < 40
        assert plain.mean() > 0.2, (c, plain.mean())  # a drawing, not a noisy sample
    u = [tiny_world.world_utility(im, c) for im, c in zip(images, captions)]
    record = json.loads((world / "world.json").read_text())
    # the record measures the same utility on the images before JPEG encoding: the compression moves a few
    # foreground pixels across the threshold, 0.01 in the mean
    assert record["feedback_images"]["mean_utility"] == pytest.approx(np.mean(u), abs=0.01)


def test_a_build_says_what_it_does_and_how_long_it_takes(tmp_path, monkeypatch, capsys):
    """A build first lists its stages and the expected time (an estimate), then prints k/N lines with an ETA while
    each long stage runs (here at every step: PROGRESS_SECONDS = 0), and ends with the world's folder, not the
    temporary one it was built in. Reporting changes nothing built: the same world and record as a build
    without it."""
    monkeypatch.setattr(tiny_world, "PROGRESS_SECONDS", 0)
    monkeypatch.setenv("DIFFUSION_KTO_CACHE", str(tmp_path / "a"))
    world = tiny_world.world_path(0, **SMALL)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"building the tiny world of seed 0 (once; later runs reuse it) into {world}"
    assert [line.split(".")[0] for line in lines[1:6]] == ["  1", "  2", "  3", "  4", "  5"]
    assert "an estimate" in lines[6] and "in all" in lines[6]
    assert (
        lines[-1].startswith("world built in")
        and lines[-1].endswith(f": {world}")
        and ".tmp" not in lines[-1]
    )

    def before(pattern: str, end: str) -> list[str]:
        """The lines matching pattern that come before the first line starting with end (the stage's last)."""
        stop = next(i for i, line in enumerate(lines) if line.startswith(end))
        return [line for line in lines[:stop] if re.fullmatch(pattern, line)]

    assert (
        len(before(r"vae: 1/2 steps, reconstruction mse [\d.]+, \d+s, about \S+ left", "vae: 2 steps")) == 1
    )
    assert len(before(r"unet: [123]/4 steps, loss [\d.]+, \d+s, about \S+ left", "unet: 4/4 steps")) == 3
    # 32 images of 2 steps, one batch: a line after each step but the last
    assert before(r"base samples: \d+/64 image-steps, \d+s, about \S+ left", "feedback:") == [
        next(line for line in lines if line.startswith("base samples: 32/64"))
    ]
    # the default world's estimate is the build time measured on a 2-core CPU (docs/tiny_world.md: 411-439 s)
    assert 360 < sum(tiny_world.expected_seconds(tiny_world.SIZES).values()) < 480

    # the step callback that counts the base's sampling leaves its images as they are (a barely trained base
    # samples noise, whose utility in the record barely moves: compare pixels)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(world / "model")
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = tiny_world.train_prompts()[:3], [5, 6, 7]
    counted_lines = []
    counted = tiny_world.Progress("base samples", 3 * 2, "image-steps", counted_lines.append)
    images = []
    for progress in (None, counted):
        # the world's pipeline loads its scheduler as DDPM (model_index.json), whose steps draw from torch's RNG
        torch.manual_seed(0)
        images.append(
            tiny_world.sample_images(pipe, prompts, seeds, steps=2, guidance=1.0, batch=2, progress=progress)
        )
    # batches of 2 and 1 image, 2 steps each: 2, 4, 5 of 6 image-steps done
    assert [line.split()[2] for line in counted_lines] == ["2/6", "4/6", "5/6"], counted_lines
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(*images))

    # the same world built with no reporting at all (no step callback in the base's sampling)
    class Silent:
        def __init__(self, *args):
            pass

        def __call__(self, *args, **kwargs):
            pass

        def __bool__(self):
            return False

    monkeypatch.setattr(tiny_world, "Progress", Silent)
    monkeypatch.setenv("DIFFUSION_KTO_CACHE", str(tmp_path / "b"))
    quiet = tiny_world.world_path(0, **SMALL)
    assert tiny_world.world_hash(quiet) == tiny_world.world_hash(world)
    # and the same record (the base's samples and the caption check are measured only there)
    records = [json.loads((w / "world.json").read_text()) for w in (world, quiet)]
    assert records[0] | {"build_seconds": 0} == records[1] | {"build_seconds": 0}
    # which world it is, and what else than the seed it may depend on
    assert records[0]["world_hash"] == tiny_world.world_hash(world)
    assert records[0]["versions"]["numpy"] == np.__version__ and records[0]["machine"]


def test_building_the_model_says_nothing_about_torchvision(tmp_path):
    """diffusers' pipelines import transformers' CLIP and Siglip image processors, which announce on stderr that
    they want torchvision (not a dependency; nothing here uses them): a build silences exactly that notice."""
    script = "import sys, pathlib, tiny_world; tiny_world.build_tiny_model(pathlib.Path(sys.argv[1]))"
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model")],
        cwd=HERE,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "model" / "model_index.json").exists()
    assert "torchvision" not in out.stderr + out.stdout, out.stderr


def test_eval_prompts_are_the_held_out_captions():
    prompts = tiny_world.eval_prompts()
    assert len(prompts) >= 256 and set(prompts) == set(tiny_world.HELD_OUT) and len(tiny_world.HELD_OUT) == 8
    assert not set(tiny_world.HELD_OUT) & set(tiny_world.train_prompts())
    train = [p.split() for p in tiny_world.train_prompts()]
    for colour in tiny_world.COLORS:  # every colour still gets feedback on both backgrounds
        assert {w[5] for w in train if w[1] == colour} == set(tiny_world.BACKGROUNDS)


# ----------------------------------------------------------------------------------------------------
# One world per seed, whatever the launcher

# The HASH line in one write: two ranks share the pipe, and unbuffered (PYTHONUNBUFFERED) print() writes each of its
# pieces on its own, so the ranks' lines could interleave
BUILD = (
    "import sys, tiny_world; p = tiny_world.world_path({seed}, **{sizes}); "
    "sys.stdout.write(f'HASH {{tiny_world.world_hash(p)}} {{p.name}}\\n'); sys.stdout.flush()"
)


def build_in_subprocess(cache: Path, launcher: list, threads: str, seed: int = 0) -> str:
    script = cache / "build.py"
    cache.mkdir(parents=True, exist_ok=True)
    script.write_text(BUILD.format(seed=seed, sizes=SMALL))
    env = {
        **os.environ,
        "DIFFUSION_KTO_CACHE": str(cache),
        "OMP_NUM_THREADS": threads,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(HERE),
    }
    out = subprocess.run(
        [*launcher, str(script)], env=env, cwd=HERE, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_a_build_removes_what_stopped_builds_left(tmp_path, capsys):
    """A build killed before its rename leaves <name>.<host>.<pid>.<random>.tmp (older versions <name>.<pid>.tmp)
    beside the target; the next build of that target (holding the lock, so no other build is under way) removes
    it, and nothing else."""
    target = tmp_path / "tiny-world-v5-seed0"
    leftovers = [
        tmp_path / f"{target.name}.4242.tmp",
        tmp_path / f"{target.name}.77.tmp",
        tmp_path / f"{target.name}.node-3.4242.0a1b2c3d.tmp",
    ]
    for stale in leftovers:
        (stale / "model" / "vae").mkdir(parents=True)
        (stale / "model" / "vae" / "config.json").write_text("{}")
    # another target's stopped build and files that only look alike are kept
    kept = [
        tmp_path / "tiny-world-v5-seed0-unet_steps4.4242.tmp",
        tmp_path / f"{target.name}.notes.tmp",
        tmp_path / f"{target.name}.v2.node-3.4242.0a1b2c3d.tmp",  # of a target named <name>.v2
    ]
    for other in kept:
        other.mkdir()
    built = utils.build_once(target, lambda folder: (folder / "done").write_text("ok"))
    assert built == target and (target / "done").read_text() == "ok"
    assert not any(stale.exists() for stale in leftovers) and all(other.exists() for other in kept)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == sorted(
        p.name for p in kept
    )
    assert str(leftovers[0]) in capsys.readouterr().out


def test_two_writers_of_one_file_in_one_process_get_their_own_temporary_files(tmp_path):
    """As writers on two nodes of a shared file system whose containers reuse pids (pickapic.py: every rank
    writes the label cache): each write has its own temporary file, named after the host, and the last rename
    wins with a whole file."""
    target = tmp_path / "labels.parquet"
    with utils.atomic_path(target) as first, utils.atomic_path(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        assert utils.temp_writer(target.name, first.name) == (utils.HOST, os.getpid())
        first.write_text("first writer")
        second.write_text("second writer")
    assert target.read_text() == "first writer" and [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.mark.slow
def test_world_is_a_function_of_its_seed_whatever_the_launcher(tmp_path):
    plain = build_in_subprocess(tmp_path / "a", [sys.executable], "1")
    other_threads = build_in_subprocess(tmp_path / "b", [sys.executable], "3")
    ranks = build_in_subprocess(
        tmp_path / "c",
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        "1",
    )
    hashes = [
        line.split()[1]
        for text in (plain, other_threads, ranks)
        for line in text.splitlines()
        if line.startswith("HASH")
    ]
    assert len(hashes) == 4 and len(set(hashes)) == 1, hashes  # both ranks see the one world
    assert ranks.count("world built in") == 1  # one rank built it, logged once
    record = json.loads(next((tmp_path / "c").glob("tiny-world-*")).joinpath("world.json").read_text())
    assert (
        record["seed"] == 0
        and record["threads"] == 2
        and record["sizes"]["unet_steps"] == SMALL["unet_steps"]
    )
    other_seed = build_in_subprocess(tmp_path / "a", [sys.executable], "1", seed=1)
    assert other_seed.split()[1] != hashes[0]  # another seed, another world


# ----------------------------------------------------------------------------------------------------
# The default world and the end-to-end result (slow: builds world 0 once)


@pytest.mark.slow
def test_feedback_is_pickapic_shaped_and_follows_the_utility():
    world = tiny_world.world_path(0)
    table = pd.read_parquet(next((world / "feedback").glob("*.parquet")))
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid"} <= set(
        table.columns
    )
    assert set(table.caption) == set(tiny_world.train_prompts())  # held-out prompts never get feedback
    stats = json.loads((world / "world.json").read_text())
    assert 0.6 < stats["feedback"]["rater_agreement"] < 1.0  # noisy, but mostly right
    assert abs(stats["feedback-shuffled"]["utility_gap"]) < 0.015  # the control carries no signal
    assert stats["base_images"]["color_match"] > 0.9  # the base draws the asked colour
    assert stats["feedback"]["utility_gap"] > 0.02  # liked images are bigger
    assert stats["caption_dependence"]["ratio"] > 2  # a wrong caption: clearly larger error
    labels = data.load_feedback(world / "feedback")
    assert labels.desirable.any() and (~labels.desirable).any()


def check_figure(eval_out: Path, png: Path, tiles: dict, size: int = 48):
    """Every tile of the figure is the eval image of its (prompt, model, seed), and every held-out prompt has a
    base row and a KTO row."""
    canvas = Image.open(png).convert("RGB")
    assert {(p, m) for p, m, _ in tiles} == {
        (p, m) for p in tiny_world.HELD_OUT for m in ("baseline", "checkpoint")
    }
    ys = [tiles[(p, m, 0)][1] for p in tiny_world.HELD_OUT for m in ("baseline", "checkpoint")]
    assert ys == sorted(ys)  # prompt by prompt, base above KTO
    index = pd.read_csv(eval_out / "images" / "index.csv")
    for (prompt, model, k), (x, y, path) in tiles.items():
        row = index[index.path == path].iloc[0]
        assert row.prompt == prompt and row.model == model
        expected = Image.open(eval_out / "images" / path).convert("RGB").resize((size, size), Image.NEAREST)
        assert np.array_equal(np.asarray(canvas.crop((x, y, x + size, y + size))), np.asarray(expected))


def test_figure_shows_each_held_out_caption_base_above_kto(tmp_path):
    """make_figure on a fake eval output (drawn images): each tile must be the image of its row and column."""
    images, _ = drawn_pairs(8 * 8)
    rows = []
    (tmp_path / "images" / "baseline").mkdir(parents=True)
    (tmp_path / "images" / "checkpoint").mkdir()
    for i, prompt in enumerate(tiny_world.eval_prompts()[:64]):
        for j, model in enumerate(("baseline", "checkpoint")):
            path = f"{model}/{i:05d}_0.png"
            images[2 * i + j].save(tmp_path / "images" / path)
            rows.append(dict(model=model, prompt_id=i, image_index=0, seed=i, path=path, prompt=prompt))
    pd.DataFrame(rows).to_csv(tmp_path / "images" / "index.csv", index=False)
    tiles = study.make_figure(tmp_path, tmp_path / "figure.png")
    assert len(tiles) == 8 * 2 * 8
    check_figure(tmp_path, tmp_path / "figure.png", tiles)


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """The README's quick start on world 0: train at the --tiny defaults, evaluate against the base."""
    tmp = tmp_path_factory.mktemp("quick_start")
    train_kto.main(["--tiny", "--world_seed", "0", "--output_dir", str(tmp / "run")])
    report = ev.main(["--ckpt", str(tmp / "run" / "checkpoint-200"), "--tiny", "--out", str(tmp / "eval")])
    return tmp, report["metrics"]["utility"]


@pytest.mark.slow
def test_the_quick_start_trains_evaluates_and_draws(quick_start):
    tmp, utility = quick_start
    assert (
        utility["n_prompts"] == 256
        and 0 <= utility["ci95"][0] <= utility["win_rate"] <= utility["ci95"][1] <= 1
    )
    # baseline grid
    assert sorted(p.name for p in (tmp / "run" / "validation").iterdir())[0] == "step-000000.png"
    tiles = study.make_figure(tmp / "eval", tmp / "figure.png")  # the docs' figure
    check_figure(tmp / "eval", tmp / "figure.png", tiles)


@pytest.mark.slow
def test_fine_tuning_sees_the_latents_the_base_was_trained_on(quick_start):
    """train_kto.py draws x0 from the VAE's posterior; a base trained on the posterior means (v3) met noisier latents
    in fine-tuning: the frozen reference's error was x3 its training loss, and fine-tuning with any labels (also
    shuffled ones) learnt that noise and shrank the shapes."""
    tmp, _ = quick_start
    record = json.loads((tiny_world.world_path(0) / "world.json").read_text())
    trained = record["unet_loss_ema"][str(record["sizes"]["unet_steps"])]
    ref_err = np.mean([json.loads(line)["ref_err"] for line in (tmp / "run" / "metrics.jsonl").open()])
    assert ref_err < 1.3 * trained, (ref_err, trained)


@pytest.mark.slow
def test_kto_beats_the_base_model(quick_start):
    """World 0, training seed 0, lr 1e-5: 0.799 [0.750, 0.846] (95 images held out; 0.854 [0.811, 0.895]
    before the held-out split, with 1 thread and with 2; at lr 3e-5: 0.848; v4 0.688,
    v3 0.529 [0.467, 0.590], failed). Training runs differ more than this CI says (at 3e-5, world 2 seed 0: 0.420);
    the claims over worlds and runs are in docs/tiny_world.md."""
    _, utility = quick_start
    assert utility["ci95"][0] > 0.5, utility  # better than the base, not by chance
    assert utility["mean_ckpt"] > utility["mean_baseline"]


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    """The quick start on the same world's shuffled labels (the control: no information in the labels)."""
    tmp = tmp_path_factory.mktemp("control")
    shuffled = tiny_world.world_path(0) / "feedback-shuffled"
    train_kto.main(
        ["--tiny", "--world_seed", "0", "--dataset", str(shuffled), "--output_dir", str(tmp / "run")]
    )
    return tmp


@pytest.mark.slow
def test_heldout_margin_rises_for_kto_and_not_for_the_control(quick_start, control):
    margins = lambda run: [  # noqa: E731
        r["heldout_margin"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "heldout_margin" in r
    ]
    kto, shuffled = margins(quick_start[0] / "run"), margins(control / "run")
    assert len(kto) == len(shuffled) == 4  # every 50 steps
    # KTO learns the likes on images it never saw; the control has nothing to learn
    assert kto[-1] > 0 and kto[-1] > shuffled[-1] and kto[-1] > kto[0], (kto, shuffled)
