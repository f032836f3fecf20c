"""heldout.py: the held-out reward margin, measured with fixed draws on images never trained on.
Run: python -m pytest -q test_heldout.py   (offline; the fast layer: -m "not slow")"""

import json
import os

import numpy as np
import pytest

import fixtures
import heldout
import train_kto
from test_train import TORCHRUN, run_script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = ["--tiny", "--pretrained_model", str(fixtures.tiny_model_path()), "--dataset"]
TINY += [str(fixtures.tiny_dataset_path()), "--validation_steps", "0", "--heldout_steps", "2"]
KEYS = ("heldout_reward_desirable", "heldout_reward_undesirable", "heldout_margin")


def run(out, *args):
    train_kto.main([*TINY, "--output_dir", str(out), *args])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_split_holds_out_both_classes_and_the_sampler_never_draws_them():
    desirable = np.arange(1000) % 3 == 0
    mask = heldout.split(desirable, 256, seed=0)
    # at most a tenth of the data, and of each class (334 liked: 34), the rest disliked; the same for the same seed
    assert mask.sum() == 100 and desirable[mask].sum() == 34
    balanced = np.arange(950) % 2 == 0  # the tiny world's 475 liked + 475 disliked: 47 + 48
    assert (
        heldout.split(balanced, 256, seed=0).sum() == 95
        and balanced[heldout.split(balanced, 256, 0)].sum() == 47
    )
    # a small class is never emptied: 50 disliked of 1000 give 5 (95 liked fill the rest); 6 liked of 1000 give none
    held = heldout.split(np.arange(1000) < 950, 256, seed=0)
    assert held.sum() == 100 and held[950:].sum() == 5
    held = heldout.split(np.arange(1000) < 6, 256, seed=0)
    assert held.sum() == 100 and held[:6].sum() == 0
    assert (heldout.split(desirable, 256, seed=0) == mask).all() and not (
        heldout.split(desirable, 256, 1) == mask
    ).all()
    assert heldout.split(desirable, 0, seed=0).sum() == 0
    sampler = train_kto.DesirableRatioSampler(desirable, 0.8, seed=0, held_out=mask)
    drawn = np.array([i for _, i in zip(range(100_000), sampler)])
    # every other image is drawn (100k draws: each undesirable one ~32 times)
    assert not mask[drawn].any() and len(set(drawn)) == 900


def test_heldout_reward_is_zero_for_the_base_and_its_draws_are_fixed(tmp_path):
    rows = run(tmp_path, "--max_train_steps", "5", "--learning_rate", "0", "--checkpointing_steps", "4")
    measured = [r for r in rows if "heldout_margin" in r]
    # every --heldout_steps
    assert [r["step"] for r in measured] == [2, 4]
    # policy == reference (lr 0): each held-out reward is exactly 0, so every image ties (half a win each)
    assert all(r[k] == 0 for r in measured for k in KEYS) and all(
        r["heldout_accuracy"] == 0.5 for r in measured
    )
    # the same images, timesteps and noise at every measurement: the same error, bit for bit
    assert len({r["heldout_policy_err"] for r in measured}) == 1 and measured[0]["heldout_policy_err"] > 0
    card = (tmp_path / "checkpoint-4" / "README.md").read_text()
    assert "## Held-out reward at step 4" in card and "`heldout_margin` | 0 |" in card


@pytest.mark.slow
def test_heldout_reward_is_the_same_after_a_resume_and_on_two_ranks(tmp_path):
    args = ["--checkpointing_steps", "2", "--learning_rate", "1e-4"]
    whole = run(tmp_path / "whole", "--max_train_steps", "4", *args)
    run(tmp_path / "split", "--max_train_steps", "2", *args)
    split = run(tmp_path / "split", "--max_train_steps", "4", "--resume", "latest", *args)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows]  # noqa: E731
    # trained, so the margin moved; a resume measures the identical thing
    assert strip(split) == strip(whole) and whole[-1]["heldout_margin"] != 0
    # a checkpoint after a resume, before the next measurement: its model card has the one before the resume
    run(tmp_path / "short", "--max_train_steps", "2", *args)
    run(tmp_path / "short", "--max_train_steps", "3", "--resume", "latest", *args)
    assert "## Held-out reward at step 2" in (tmp_path / "short" / "checkpoint-3" / "README.md").read_text()
    # two ranks score half the held-out images each; the sums are all-reduced: at lr 0 the same policy error as
    # one rank's, up to the order of a float32 sum over 25 images (~1e-7 relative; 1e-6 is headroom)
    one = run(tmp_path / "one", "--max_train_steps", "2", "--learning_rate", "0")
    run_script(
        tmp_path,
        "",
        *TINY[1:],
        "--max_train_steps",
        "2",
        "--learning_rate",
        "0",
        "--output_dir",
        str(tmp_path / "two"),
        "--train_batch_size",
        "4",
        torchrun=TORCHRUN,
    )
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert two[-1]["heldout_policy_err"] == pytest.approx(one[-1]["heldout_policy_err"], rel=1e-6)
    assert all(two[-1][k] == 0 for k in KEYS) and two[-1]["heldout_accuracy"] == 0.5


def split_by_rows(desirable, n, seed):
    """heldout.split's rule before images in several rows were grouped (rows are images), frozen as the reference
    that a split of distinct images must keep (a run resumed across the change holds out the same images)."""
    rng = np.random.default_rng([seed, 20_240_404])
    liked, disliked = np.flatnonzero(desirable), np.flatnonzero(~desirable)
    # each class spares a tenth of its images, rounded up; a class under 10 spares none
    can_liked, can_disliked = (-(-len(c) // 10) * (len(c) >= 10) for c in (liked, disliked))
    n = min(n, len(desirable) // 10)
    # half each, the liked taking what the disliked cannot spare
    take_liked = min(can_liked, max(n // 2, n - can_disliked))
    held = [*rng.choice(liked, take_liked, replace=False)]
    held += [*rng.choice(disliked, min(can_disliked, n - take_liked), replace=False)]
    return np.isin(np.arange(len(desirable)), held)


def test_split_of_distinct_images_is_the_row_rule():
    """Where every image is in one row (the tiny world, Pick-a-Pic), the mask is the one recorded runs used, with
    keys or without (keys in an order unlike the rows')."""
    rng = np.random.default_rng(0)
    for size, n in [(950, 256), (1000, 256), (37, 5), (5000, 256), (120, 1000)]:
        desirable = rng.random(size) < rng.uniform(0.05, 0.95)
        keys = [f"/data/{k:06d}.png" for k in rng.permutation(size)]
        for seed in (0, 1, 7):
            reference = split_by_rows(desirable, n, seed)
            assert (heldout.split(desirable, n, seed) == reference).all()
            assert (heldout.split(desirable, n, seed, keys) == reference).all()


def test_split_never_trains_on_a_held_out_image_in_several_rows():
    """500 images in 2 rows each (two raters, who may disagree): every row of a held-out image is held out, at
    most n images and a tenth of each class's images; both classes keep training rows."""
    rng = np.random.default_rng(1)
    image = rng.permutation(np.repeat(np.arange(500), 2))
    desirable = rng.random(1000) < 0.4
    keys = [f"img-{k}" for k in image]
    mask = heldout.split(desirable, 256, 0, keys)
    held = set(image[mask])
    assert not held & set(image[~mask])  # no training row shares an image with a held-out row
    assert 0 < len(held) <= 50  # a tenth of the 500 images
    first = {k: d for k, d in zip(image[::-1], desirable[::-1])}  # each image's class: that of its first row
    for c in (True, False):
        k = sum(v == c for v in first.values())
        assert sum(first[i] == c for i in held) <= -(-k // 10)
        assert (desirable[~mask] == c).any()
    # the liked rows only on one image, whose first row is disliked: held out, it is given back to training
    desirable = np.zeros(40, bool)
    keys = [f"img-{k}" for k in range(20)] * 2
    chosen = np.flatnonzero(split_by_rows(desirable[:20], 256, 0))
    desirable[20 + chosen[0]] = True
    mask = heldout.split(desirable, 256, 0, keys)
    assert desirable[~mask].any() and not mask[[chosen[0], 20 + chosen[0]]].any() and mask.any()


def test_training_holds_out_every_row_of_an_image(tmp_path, monkeypatch):
    """train_kto passes each row's image (data.image_keys: the resolved path, or the bytes' hash) to the split: an
    image in two rows, written a.png and ./a.png, is held out in both or in neither."""
    from PIL import Image

    import data

    rows = ["image,caption,label"]
    for k in range(100):
        Image.new("RGB", (16, 16), (k, 2 * k, 0)).save(tmp_path / f"{k}.png")
        rows += [f"{k}.png,picture {k},{k % 2}", f"./{k}.png,picture {k},{(k // 2) % 2}"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    keys = data.image_keys(data.load_feedback(tmp_path / "t.csv"), tmp_path)
    assert keys[0] == keys[1] == str((tmp_path / "0.png").resolve()) and len(set(keys)) == 100
    masks, real = [], heldout.split
    monkeypatch.setattr(heldout, "split", lambda *a: masks.append(real(*a)) or masks[-1])
    flags = "--validation_steps 0 --heldout_steps 1 --max_train_steps 1 --resolution 16".split()
    train_kto.main([*TINY[:4], str(tmp_path / "t.csv"), *flags, "--output_dir", str(tmp_path / "out")])
    (mask,) = masks
    assert mask.sum() == 20 and (mask[0::2] == mask[1::2]).all()  # 10 images (a tenth), both rows of each


def test_a_class_without_held_out_images_has_no_reward_and_no_margin(tmp_path):
    """6 liked images of 100: split holds out none of them. The liked reward and the margin are null in
    metrics.jsonl (strict JSON), not 0 and the disliked reward; the curves and the model card say so, no crash."""
    from PIL import Image

    import reports

    rows = ["image,caption,label"]
    for k in range(100):
        Image.new("RGB", (16, 16), (k, 0, 0)).save(tmp_path / f"{k}.png")
        rows.append(f"{k}.png,picture {k},{int(k < 6)}")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    flags = "--validation_steps 0 --heldout_steps 1 --max_train_steps 1 --resolution 16".split()
    train_kto.main([*TINY[:4], str(tmp_path / "t.csv"), *flags, "--output_dir", str(tmp_path / "out")])
    strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))  # noqa: E731
    (row,) = [strict(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert row["heldout_reward_desirable"] is None and row["heldout_margin"] is None
    assert isinstance(row["heldout_reward_undesirable"], float) and row["heldout_accuracy"] >= 0
    card = (tmp_path / "out" / "checkpoint-1" / "README.md").read_text()
    assert "`heldout_margin` | n/a (no held-out image of the class) |" in card
    reports.plot_curves(tmp_path / "out")
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0
