"""Test of toy_2d.py, the paper's 2-D toy (Sec. 6): Diffusion-KTO with the Kahneman-Tversky utility moves the
model's samples toward the desirable centre and away from the undesirable one.

Run: python -m pytest -q test_toy.py   (offline, CPU, ~15-20 s)
"""

from pathlib import Path

import pytest
import torch

import toy_2d


def test_kahneman_tversky_moves_toward_desirable_and_away_from_undesirable(tmp_path: Path):
    out = tmp_path / "toy.png"
    threads = torch.get_num_threads()
    try:
        res = toy_2d.main(["--seeds", "1", "--steps", "300", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # main() sets 1 thread; later tests keep theirs
    (seed0,) = res["per_seed"]  # --seeds 1: one seed
    base, kt = seed0["pretrained"], seed0["kahneman_tversky"]
    # 2,000 samples: a fraction near 6% has a sampling std of ~0.5 points, so these margins are several stds wide
    # (at these settings the run gives 6.8% -> 12.6% near the desirable centre and 5.1% -> 1.4% near the other)
    assert kt["near_desirable"] > 1.5 * base["near_desirable"], (base, kt)
    assert kt["near_undesirable"] < 0.5 * base["near_undesirable"], (base, kt)
    assert kt["dist_desirable"] < base["dist_desirable"], (base, kt)
    assert kt["finite"] == 1.0
    assert out.exists() and 0 < out.stat().st_size < 300_000  # --out: the figure, small enough for the repo
    assert all(toy_2d.LABELS[m] in res["table"] for m in toy_2d.METHODS)


def test_no_seeds_is_refused(capsys):
    """--seeds 0 would print a table of nan and name a figure it never wrote."""
    with pytest.raises(SystemExit) as e:
        toy_2d.main(["--seeds", "0"])
    assert e.value.code == 2 and "--seeds 0: must be at least 1" in capsys.readouterr().err
