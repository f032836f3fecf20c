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
KEYS = ("heldout_reward_desirable", "heldout_reward_undesirable", "heldout_margin", "heldout_accuracy")


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
    sampler = train_kto.DesirableRatioSampler(desirable, 0.8, seed=[0, 0], held_out=mask)
    drawn = np.array([i for _, i in zip(range(100_000), sampler)])
    # every other image is drawn (100k draws: each undesirable one ~32 times)
    assert not mask[drawn].any() and len(set(drawn)) == 900


def test_heldout_reward_is_zero_for_the_base_and_its_draws_are_fixed(tmp_path):
    rows = run(tmp_path, "--max_train_steps", "5", "--learning_rate", "0", "--checkpointing_steps", "4")
    measured = [r for r in rows if "heldout_margin" in r]
    # every --heldout_steps
    assert [r["step"] for r in measured] == [2, 4]
    # policy == reference (lr 0): each held-out reward is exactly 0
    assert all(r[k] == 0 for r in measured for k in KEYS)
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
    assert all(two[-1][k] == 0 for k in KEYS)
