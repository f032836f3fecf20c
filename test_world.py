"""End to end in the tiny world: build it, train with KTO, evaluate against the base with the hidden utility.

Slow on first use (the world is built once, a few minutes on 2 CPU cores, then cached in $DIFFUSION_KTO_CACHE).
"""

import json

import pandas as pd

import eval as ev
import tiny_world
import train_kto
import utils


def test_feedback_is_pickapic_shaped_and_follows_the_utility():
    folder = tiny_world.world_path() / "feedback"
    table = pd.read_parquet(next(folder.glob("*.parquet")))
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid"} <= set(table.columns)
    assert set(table.caption) == set(tiny_world.train_prompts())          # held-out prompts never get feedback
    stats = json.loads((folder / "world.json").read_text())
    assert 0.6 < stats["rater_agreement"] < 1.0                           # noisy, but mostly right
    assert 0.2 < stats["color_match"] < 0.9                               # the base makes liked and disliked images
    labels = utils.load_feedback(folder)
    assert labels.desirable.any() and (~labels.desirable).any()


def test_kto_beats_the_base_model(tmp_path):
    out = tmp_path / "run"
    train_kto.main(["--tiny", "--output_dir", str(out)])
    run = json.loads((out / "run.json").read_text())
    report = ev.main(["--ckpt", str(out / f"checkpoint-{run['config']['max_train_steps']}"), "--tiny",
                      "--out", str(tmp_path / "eval")])
    utility = report["metrics"]["utility"]
    assert utility["n_prompts"] >= 200
    assert utility["ci95"][0] > 0.5, utility                             # better than the base, not by chance
    assert utility["mean_ckpt"] > utility["mean_baseline"]
    tiny_world.make_figure(tmp_path / "eval", tmp_path / "figure.png")           # the README's figure
    from PIL import Image
    assert Image.open(tmp_path / "figure.png").size[1] > 8 * 64                  # 4 prompts x (base, KTO) rows
