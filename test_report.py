"""Tests of the reports (utils.py, "Reports"): training curves, image grids, trackers, model cards, and eval.py's
--export and model-card table. Offline, on CPU, with the tiny model.

    HF_HUB_OFFLINE=1 python -m pytest -q test_report.py
"""

import json
import os
import shutil
import sys
import types
from pathlib import Path

import matplotlib.text
import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
import fixtures
import utils
from utils import DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the report functions save, in order (each is still written to disk)."""
    saved, real = [], utils.save_figure
    monkeypatch.setattr(utils, "save_figure", lambda fig, path: saved.append(fig) or real(fig, path))
    return saved


def figure_text(fig) -> str:
    return " ".join(" ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text)).split())


# ----------------------------------------------------------------------------------------------------
# Training curves

def metrics_row(step, loss, **extra):
    return dict(dict(step=step, loss=loss, z=0.01 * step, reward_desirable=0.1 * step, reward_undesirable=-0.1 * step,
                     accuracy=0.5, policy_err=1.0, ref_err=1.0, grad_norm=2.0, lr=1e-5, desirable_frac=0.8, skipped=0,
                     images_per_sec=3.0), **extra)


def test_curves_keep_the_last_row_per_step_and_draw_every_panel(tmp_path, figures):
    run = tmp_path / "kto-run-7"
    run.mkdir()
    first = [metrics_row(s, 1.0) for s in range(1, 41)]
    resumed = [metrics_row(s, 0.5, skipped=int(s == 45)) for s in range(31, 61)]  # resumed at 30: 31..40 again
    lines = [json.dumps(r) for r in first + resumed] + ['{"step": 61, "loss": 0.']  # a line cut by a kill
    (run / "metrics.jsonl").write_text("\n".join(lines))
    path = utils.plot_curves(run)
    assert path == run / "curves.png" and Image.open(path).size == (1200, 800)
    fig, = figures
    assert "kto-run-7" in fig._suptitle.get_text() and "1 skipped step" in fig._suptitle.get_text()
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "implicit reward", "reference point z", "implicit accuracy", "grad norm", "learning rate"]
    raw, smooth = fig.axes[0].get_lines()
    assert list(raw.get_xdata()) == list(range(1, 61))
    assert list(raw.get_ydata()) == [1.0] * 30 + [0.5] * 30  # steps 31..40: the resumed rows
    assert smooth.get_linewidth() > raw.get_linewidth() and raw.get_alpha() < 1
    assert 0.5 < smooth.get_ydata()[30] < 1.0 and smooth.get_ydata()[0] == 1.0  # EMA over 3 steps, debiased
    labels = [line.get_label() for line in fig.axes[1].get_lines() if line.get_linewidth() > 1]
    assert labels == ["reward_desirable", "reward_undesirable"]  # both classes in one panel
    assert list(fig.axes[1].get_lines()[2].get_ydata()) == pytest.approx([-0.1 * s for s in range(1, 61)])


def test_ema_is_debiased_and_steps_over_skipped_values():
    assert utils.ema(np.array([3.0, 3.0, 3.0]), span=10) == pytest.approx([3.0, 3.0, 3.0])  # no pull towards 0
    y = utils.ema(np.array([1.0, np.nan, np.inf, 3.0]), span=1)  # span 1: no smoothing at all
    assert y == pytest.approx([1.0, 1.0, 1.0, 3.0])


def test_curves_of_a_folder_without_metrics_say_so(tmp_path):
    with pytest.raises(DataError, match="metrics.jsonl"):
        utils.plot_curves(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match="no metrics yet"):
        utils.plot_curves(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Image grids

def test_image_grid_shows_every_full_label_and_the_title(tmp_path, figures):
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue", "white", "black")]
    labels = [f"prompt {i}: a very long caption of a yellow triangle on a black background, golden hour"
              for i in range(5)]
    path = utils.save_image_grid(images, labels, "validation, step 50", tmp_path / "grid.png", columns=2)
    assert path == tmp_path / "grid.png" and path.exists()
    text = figure_text(figures[0])
    assert "validation, step 50" in text and all(label in text for label in labels)  # wrapped, never cut
    shown = [ax for ax in figures[0].axes if ax.get_images()]
    assert len(shown) == 5 and len(figures[0].axes) == 6  # 3 rows of 2, the last cell empty
    assert shown[2].get_images()[0].get_array()[0, 0].tolist() == [0, 0, 255]  # in order
    wide = utils.save_image_grid(images, labels, "t", tmp_path / "wide.png")  # default: 4 per row
    assert len(figures[1].axes) == 8
    assert Image.open(wide).width > Image.open(path).width
    with pytest.raises(ValueError, match="one label per image"):
        utils.save_image_grid(images, labels[:4], "t", tmp_path / "x.png")
