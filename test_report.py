"""Tests of the reports (reports.py): training curves, image grids, trackers, model cards, and eval.py's
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
import model_card
import models
import reports
from utils import DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the report functions save, in order (each is still written to disk)."""
    saved, real = [], reports.save_figure
    monkeypatch.setattr(reports, "save_figure", lambda fig, path: saved.append(fig) or real(fig, path))
    return saved


def figure_text(fig) -> str:
    return " ".join(" ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text)).split())


# ----------------------------------------------------------------------------------------------------
# Training curves


def metrics_row(step, loss, **extra):
    return dict(
        dict(
            step=step,
            loss=loss,
            z=0.01 * step,
            reward_desirable=0.1 * step,
            reward_undesirable=-0.1 * step,
            accuracy=0.5,
            policy_err=1.0,
            ref_err=1.0,
            grad_norm=2.0,
            lr=1e-5,
            desirable_frac=0.8,
            skipped=0,
            images_per_sec=3.0,
        ),
        **extra,
    )


def test_curves_keep_the_last_row_per_step_and_draw_every_panel(tmp_path, figures):
    run = tmp_path / "kto-run-7"
    run.mkdir()
    first = [metrics_row(s, 1.0) for s in range(1, 41)]
    # resumed at 30: 31..40 again; the held-out margin measured at steps 40 and 60 only
    held = lambda s: dict(heldout_margin=s / 1e4) if s % 20 == 0 else {}  # noqa: E731
    resumed = [metrics_row(s, 0.5, skipped=int(s == 45), **held(s)) for s in range(31, 61)]
    lines = [json.dumps(r) for r in first + resumed] + ['{"step": 61, "loss": 0.']  # a line cut by a kill
    (run / "metrics.jsonl").write_text("\n".join(lines))
    path = reports.plot_curves(run)
    assert path == run / "curves.png" and Image.open(path).size == (1600, 800)
    (fig,) = figures
    assert "kto-run-7" in fig._suptitle.get_text() and "1 skipped step" in fig._suptitle.get_text()
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "loss",
        "implicit reward",
        "reference point z",
        "implicit accuracy",
        "grad norm",
        "learning rate",
        "held-out reward (fixed draws)",
        "held-out margin: liked - disliked",
    ]
    # the held-out margin: its measurements as points, not smoothed, and a line at 0 (the base model)
    margin, zero = fig.axes[7].get_lines()
    assert list(margin.get_xdata()) == [40, 60] and list(margin.get_ydata()) == [40 / 1e4, 60 / 1e4]
    assert margin.get_marker() == "o" and list(zero.get_ydata()) == [0, 0]
    raw, smooth = fig.axes[0].get_lines()
    assert list(raw.get_xdata()) == list(range(1, 61))
    assert list(raw.get_ydata()) == [1.0] * 30 + [0.5] * 30  # steps 31..40: the resumed rows
    assert smooth.get_linewidth() > raw.get_linewidth() and raw.get_alpha() < 1
    assert 0.5 < smooth.get_ydata()[30] < 1.0 and smooth.get_ydata()[0] == 1.0  # EMA over 3 steps, debiased
    labels = [line.get_label() for line in fig.axes[1].get_lines() if line.get_linewidth() > 1]
    assert labels == ["reward_desirable", "reward_undesirable"]  # both classes in one panel
    # float64 values drawn as given: approx's default covers the float64 rounding of -0.1 * s
    assert list(fig.axes[1].get_lines()[2].get_ydata()) == pytest.approx([-0.1 * s for s in range(1, 61)])


def test_a_resume_keeps_the_rows_up_to_its_step_and_drops_a_line_cut_by_a_crash(tmp_path):
    killed_mid_line = '{"step": 6, "loss": 0.'
    lines = [json.dumps(metrics_row(s, 1.0)) for s in range(1, 6)] + [killed_mid_line]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    with reports.open_metrics(tmp_path, 3) as f:  # resumed from checkpoint-3
        f.write(json.dumps(metrics_row(4, 0.5)) + "\n")
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(
        lines[:3] + [json.dumps(metrics_row(4, 0.5))]
    ) + "\n"
    with reports.open_metrics(tmp_path, 0):  # a fresh start: nothing kept
        pass
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_ema_is_debiased_and_steps_over_skipped_values():
    # debiased: no pull towards 0 (float64 division by the bias correction: a few 1e-16)
    assert reports.ema(np.array([3.0, 3.0, 3.0]), span=10) == pytest.approx([3.0, 3.0, 3.0])
    y = reports.ema(np.array([1.0, np.nan, np.inf, 3.0]), span=1)  # span 1: no smoothing at all
    assert y == pytest.approx([1.0, 1.0, 1.0, 3.0])


def test_curves_of_a_folder_without_metrics_say_so(tmp_path):
    with pytest.raises(DataError, match="metrics.jsonl"):
        reports.plot_curves(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match="no metrics yet"):
        reports.plot_curves(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Image grids


def test_image_grid_shows_every_full_label_and_the_title(tmp_path, figures):
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue", "white", "black")]
    labels = [
        f"prompt {i}: a very long caption of a yellow triangle on a black background, golden hour"
        for i in range(5)
    ]
    path = reports.save_image_grid(images, labels, "validation, step 50", tmp_path / "grid.png", columns=2)
    assert path == tmp_path / "grid.png" and path.exists()
    text = figure_text(figures[0])
    assert "validation, step 50" in text and all(label in text for label in labels)  # wrapped, never cut
    shown = [ax for ax in figures[0].axes if ax.get_images()]
    assert len(shown) == 5 and len(figures[0].axes) == 6  # 3 rows of 2, the last cell empty
    assert shown[2].get_images()[0].get_array()[0, 0].tolist() == [0, 0, 255]  # in order
    wide = reports.save_image_grid(images, labels, "t", tmp_path / "wide.png")  # default: 4 per row
    assert len(figures[1].axes) == 8
    assert Image.open(wide).width > Image.open(path).width
    with pytest.raises(ValueError, match="one label per image"):
        reports.save_image_grid(images, labels[:4], "t", tmp_path / "x.png")


# ----------------------------------------------------------------------------------------------------
# Trackers

ROW = dict(step=3, loss=0.25, lr=np.float32(1e-4), skipped=1, grad=torch.tensor(2.5), note="text", flag=True)


def test_tensorboard_writes_every_number_and_the_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = reports.Tracker("tensorboard", tmp_path, {"beta": 200.0})
    tracker.log(ROW, step=3)
    tracker.log(dict(ROW, loss=0.125), step=4)
    picture = tmp_path / "grid.png"
    Image.new("RGB", (40, 30), "red").save(picture)
    tracker.log_image("validation", picture, step=4)
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "lr", "skipped", "grad"}  # no text, bool or the step
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(3, 0.25), (4, 0.125)]
    # tensorboard stores float32: 1e-4 comes back rounded (6e-8 relative); 2.5 is exact in float32
    assert events.Scalars("lr")[0].value == pytest.approx(1e-4) and events.Scalars("grad")[0].value == 2.5
    (image,) = events.Images("validation")
    assert (image.step, image.width, image.height) == (4, 40, 30)
    assert "200.0" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_tracker_none_writes_nothing(tmp_path):
    tracker = reports.Tracker("none", tmp_path, {})
    tracker.log(ROW, 1)
    tracker.log_image("x", tmp_path / "missing.png", 1)
    tracker.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="none, tensorboard, wandb"):
        reports.Tracker("mlflow", tmp_path, {})


@pytest.mark.parametrize("kind, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_tracker_package_says_how_to_install_it(tmp_path, monkeypatch, kind, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import` of it now raises ImportError
    with pytest.raises(DataError, match=f"pip install {kind}"):
        reports.Tracker(kind, tmp_path, {})


class FakeWandb(types.ModuleType):
    """What Tracker uses of wandb: init(...) -> run with log(dict, step=) and finish(); Image(path)."""

    def __init__(self, fail=False):
        super().__init__("wandb")
        self.calls, self.fail = [], fail
        self.Image = lambda path: ("Image", path)

    def init(self, **kwargs):
        if self.fail:
            raise RuntimeError("no network")
        self.calls.append(("init", kwargs))
        return types.SimpleNamespace(
            log=lambda d, step: self.calls.append(("log", d, step)),
            finish=lambda: self.calls.append(("finish",)),
        )


def test_wandb_calls_and_modes(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    reports.Tracker("wandb", tmp_path, {"beta": 1.0})
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = reports.Tracker("wandb", tmp_path, {"beta": 2.0})
    tracker.log(ROW, 3)
    tracker.log_image("curves", tmp_path / "curves.png", 3)
    tracker.close()
    assert fake.calls[0] == (
        "init",
        dict(project="diffusion-kto", dir=str(tmp_path), config={"beta": 1.0}, mode="online"),
    )
    assert fake.calls[1][1]["mode"] == "offline"
    assert fake.calls[2:] == [
        ("log", dict(loss=0.25, lr=pytest.approx(1e-4), skipped=1.0, grad=2.5), 3),
        ("log", {"curves": ("Image", str(tmp_path / "curves.png"))}, 3),
        ("finish",),
    ]
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(fail=True))
    with pytest.raises(DataError, match="WANDB_MODE=offline"):
        reports.Tracker("wandb", tmp_path, {})


def test_real_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # not a requirement: runs where it is installed
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    picture = tmp_path / "grid.png"
    Image.new("RGB", (40, 30), "red").save(picture)
    tracker = reports.Tracker("wandb", tmp_path, {"beta": 200.0})
    logged, real_log = [], tracker.run.log
    tracker.run.log = lambda d, step: logged.append((d, step)) or real_log(d, step=step)
    tracker.log(ROW, 3)
    tracker.log_image("validation", picture, 3)
    tracker.close()
    assert logged[0] == (dict(loss=0.25, lr=pytest.approx(1e-4), skipped=1.0, grad=2.5), 3)
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert len(list(run.glob("files/media/images/validation_3_*.png"))) == 1


# ----------------------------------------------------------------------------------------------------
# Model cards


def run_record(base: str) -> dict:
    config = dict(
        pretrained_model=base,
        dataset="yuvalkirstain/pickapic_v2",
        label_policy="won_once",
        beta=5000.0,
        utility="kahneman_tversky",
        reference_point="kl_mismatched",
        objective="kto",
        learning_rate=1e-7,
        lr_warmup_steps=500,
        train_batch_size=2,
        gradient_accumulation_steps=4,
        max_train_steps=10000,
        desirable_ratio=0.8,
    )
    return dict(
        config=config, world_size=16, num_desirable=237530, num_undesirable=690115, label_policy="won_once"
    )


def test_model_card_metadata_recipe_data_and_loading(tmp_path):
    from huggingface_hub import ModelCard

    ckpt = tmp_path / "kto" / "checkpoint-2500"
    ckpt.mkdir(parents=True)
    card = ModelCard.load(
        model_card.write_model_card(ckpt, run_record("stable-diffusion-v1-5/stable-diffusion-v1-5"))
    )
    meta = card.data.to_dict()
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["license"] == "creativeml-openrail-m" and meta["library_name"] == "diffusers"
    assert meta["tags"] == ["diffusion-kto", "text-to-image", "stable-diffusion", "diffusers"]
    text = card.text
    for row in (
        "| `beta` | 5000.0 |",
        "| `utility` | kahneman_tversky |",
        "| `reference_point` | kl_mismatched |",
        "| `objective` | kto |",
        "| `learning_rate` | 1e-07 |",
        "| `lr_warmup_steps` | 500 |",
        "| `train_batch_size` | 2 |",
        "| `gradient_accumulation_steps` | 4 |",
        "| `world_size` | 16 |",
        "| `max_train_steps` | 10000 |",
        "| `desirable_ratio` | 0.8 |",
    ):
        assert row in text, row
    assert (
        "`yuvalkirstain/pickapic_v2`: 237530 desirable and 690115 undesirable" in text
        and "`won_once`" in text
    )
    assert "step 2500" in text and "base model's license applies" in text
    assert 'UNet2DConditionModel.from_pretrained("checkpoint-2500", subfolder="unet")' in text
    assert (
        'DiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", unet=unet)' in text
    )
    # another base: license "other"; a local folder is named in the text, not as base_model (the Hub wants an id)
    card = ModelCard.load(model_card.write_model_card(ckpt, run_record("CompVis/stable-diffusion-v1-4")))
    assert card.data.license == "other" and card.data.base_model == "CompVis/stable-diffusion-v1-4"
    card = ModelCard.load(model_card.write_model_card(ckpt, run_record(str(tmp_path))))
    assert card.data.base_model is None and f"`{tmp_path}` (a local folder)" in card.text


def test_append_to_model_card_replaces_a_section_with_the_same_heading(tmp_path):
    from huggingface_hub import ModelCard

    with pytest.raises(DataError, match="no model card"):
        model_card.append_to_model_card(tmp_path, "## A\n")
    model_card.write_model_card(tmp_path, run_record("stable-diffusion-v1-5/stable-diffusion-v1-5"))
    before = ModelCard.load(tmp_path / "README.md")
    model_card.append_to_model_card(
        tmp_path, "## Evaluation (tiny)\n\nold\n\n### detail\n\n```\n# not a heading\n```\n"
    )
    model_card.append_to_model_card(tmp_path, "## Notes\n\nkept\n")
    model_card.append_to_model_card(tmp_path, "## Evaluation (tiny)\n\nnew\n")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.to_dict() == before.data.to_dict() and card.text.strip().startswith(before.text.strip())
    tail = card.text.strip()[len(before.text.strip()) :]
    # in place; the old one wholly gone
    assert tail.split() == "## Evaluation (tiny) new ## Notes kept".split()


def add_section(args):
    model_card.append_to_model_card(*args)


def test_evaluations_adding_to_one_card_at_once_lose_no_section(tmp_path):
    import multiprocessing

    model_card.write_model_card(tmp_path, run_record("stable-diffusion-v1-5/stable-diffusion-v1-5"))
    sections = [(tmp_path, f"## Evaluation {i}\n\nresult {i}\n") for i in range(8)]
    # separate processes, as study.py's parallel evaluations are
    with multiprocessing.get_context("fork").Pool(8) as pool:
        pool.map(add_section, sections)
    text = (tmp_path / "README.md").read_text()
    assert all(f"## Evaluation {i}\n\nresult {i}" in text for i in range(8)), text


# ----------------------------------------------------------------------------------------------------
# eval.py: --export and the model card of an evaluated checkpoint (a real one-step train_kto.py run)


@pytest.fixture(scope="module", params=["synthetic", pytest.param("trained", marks=pytest.mark.slow)])
def checkpoint(request, tmp_path_factory):
    """A checkpoint-1 folder with run.json above it. "trained": one step of train_kto.py (about 25 s on 2 busy
    cores); "synthetic" (the fast layer): the tiny UNet with its weights moved, and the run.json a run would write."""
    out = tmp_path_factory.mktemp("kto")
    if request.param == "trained":
        import train_kto

        train_kto.main(
            [
                "--tiny",
                "--pretrained_model",
                str(fixtures.tiny_model_path()),
                "--dataset",
                str(fixtures.tiny_dataset_path()),
                "--max_train_steps",
                "1",
                "--learning_rate",
                "1e-3",
                "--output_dir",
                str(out),
            ]
        )
        return out / "checkpoint-1"
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(fixtures.tiny_model_path(), subfolder="unet")
    with torch.no_grad():
        for w in unet.parameters():
            w.add_(1e-3)
    unet.save_pretrained(out / "checkpoint-1" / "unet")
    (out / "run.json").write_text(json.dumps(dict(run_record(str(fixtures.tiny_model_path())), world_size=1)))
    return out / "checkpoint-1"


def copy_run(ckpt: Path, dest: Path) -> Path:
    """A run folder of its own: run.json and the checkpoint's unet/."""
    shutil.copytree(ckpt / "unet", dest / ckpt.name / "unet")
    shutil.copy(ckpt.parent / "run.json", dest / "run.json")
    return dest / ckpt.name


def test_export_writes_a_pipeline_that_loads_alone(checkpoint, tmp_path, monkeypatch, capsys):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    monkeypatch.setattr(ev, "evaluate", lambda *a: pytest.fail("--export generated or scored images"))
    ckpt = copy_run(checkpoint, tmp_path / "run")
    model_card.write_model_card(ckpt, json.loads((ckpt.parent / "run.json").read_text()))
    out = tmp_path / "exported" / "sd"
    assert ev.main(["--ckpt", str(ckpt), "--export", str(out)]) == out
    assert str(out) in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(out)
    saved = UNet2DConditionModel.from_pretrained(ckpt / "unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(fixtures.tiny_model_path(), subfolder="unet").state_dict()
    exported = pipe.unet.state_dict()
    assert exported.keys() == saved.keys()
    assert all(exported[k].dtype == saved[k].dtype and torch.equal(exported[k], saved[k]) for k in saved)
    assert not all(torch.equal(base[k], saved[k]) for k in saved)  # the checkpoint's UNet, not the base's
    assert (out / "README.md").read_text() == (ckpt / "README.md").read_text()
    for bad, message in (
        (["--ckpt", str(ckpt), "--export", str(out)], "already exists"),
        (["--ckpt", str(out), "--export", str(tmp_path / "o2")], "already a complete pipeline"),
    ):
        with pytest.raises(SystemExit):
            ev.main(bad)
        assert message in capsys.readouterr().err


def test_the_vae_trained_with_replaces_the_base_models_in_eval_export_and_the_model_card(
    checkpoint, tmp_path, monkeypatch
):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    # A run trained with --pretrained_vae: a VAE whose decoder differs from the base model's
    vae = AutoencoderKL.from_pretrained(fixtures.tiny_model_path(), subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(1.5)
    vae.save_pretrained(tmp_path / "vae")
    ckpt = copy_run(checkpoint, tmp_path / "run")
    run = json.loads((ckpt.parent / "run.json").read_text())
    run["config"]["pretrained_vae"] = str(tmp_path / "vae")
    (ckpt.parent / "run.json").write_text(json.dumps(run))

    def same_as_trained(v):
        return all(
            torch.equal(a, b.to(a.dtype)) for a, b in zip(vae.state_dict().values(), v.state_dict().values())
        )

    assert models.describe_model(str(ckpt), "--ckpt")["vae"] == str(tmp_path / "vae")
    # without one, no 'vae' key: the images/generation.json of an --out begun before --pretrained_vae still matches
    assert "vae" not in models.describe_model(str(checkpoint), "--ckpt")
    assert same_as_trained(
        ev.load_pipeline(models.describe_model(str(ckpt), "--ckpt"), torch.device("cpu")).vae
    )
    assert ev.main(["--ckpt", str(ckpt), "--export", str(tmp_path / "exported")]) == tmp_path / "exported"
    assert same_as_trained(StableDiffusionPipeline.from_pretrained(tmp_path / "exported").vae)
    # The model card's loading code, run as written from the run's folder, loads that VAE too
    text = Path(model_card.write_model_card(ckpt, run)).read_text()
    code = text.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(ckpt.parent)
    scope = {}
    exec(code.replace('image = pipe("a photo of an astronaut riding a horse").images[0]', ""), scope)
    assert same_as_trained(scope["pipe"].vae) and "unet=unet" in code
    # ... and its text says so, for a LoRA run too
    for cfg in (run["config"], dict(run["config"], lora_rank=4)):
        card = Path(model_card.write_model_card(ckpt, dict(run, config=cfg))).read_text()
        assert "; the other parts come from the base model and the VAE it was trained with" in card, cfg


def test_eval_adds_its_table_to_the_model_card(checkpoint, tmp_path, capsys):
    from huggingface_hub import ModelCard

    ckpt = copy_run(checkpoint, tmp_path / "run")  # no README.md yet: written from run.json
    args = ["--ckpt", str(ckpt), "--tiny", "--steps", "1", "--num_prompts", "2", "--out", str(tmp_path / "e")]
    ev.main(args)
    ev.main(args)  # a rerun replaces its section
    assert str(ckpt / "README.md") in capsys.readouterr().out
    card = ModelCard.load(ckpt / "README.md")
    settings = "1 image per prompt, compare = median, 1 step, guidance 3, seed 0"
    heading = f"## Evaluation (tiny, 2 prompts, vs {fixtures.tiny_model_path()}; {settings})"
    table = (tmp_path / "e" / "results.md").read_text()
    assert card.text.count(heading) == 1 and card.text.rstrip().endswith(heading + "\n\n" + table.rstrip())
    assert "| win rate (%) |" in table and card.data.library_name == "diffusers" and "## Recipe" in card.text


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_validation_decodes_as_the_pipeline_and_outside_autocast(family):
    path = fixtures.tiny_sdxl_model_path() if family == "sdxl" else fixtures.tiny_model_path()
    pipe = models.load_pipeline(str(path))
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=["a red circle", "a blue square"], num_inference_steps=2, guidance_scale=2.0)
    latents = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent").images
    expected = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    # the same images as the pipeline's own decoding (float32, no autocast: the same operations)
    got = reports.decode_images(pipe, latents)
    assert [np.asarray(i).tolist() for i in got] == [np.asarray(i).tolist() for i in expected]
    if family == "sdxl":  # VAEs with per-channel latent statistics (SDXL's pipeline reads them)
        channels = pipe.vae.config.latent_channels
        pipe.vae.register_to_config(
            latents_mean=[0.1 * c for c in range(channels)], latents_std=[0.5] * channels
        )
        expected = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        got = reports.decode_images(pipe, latents)
        assert [np.asarray(i).tolist() for i in got] == [np.asarray(i).tolist() for i in expected]
    # under the fp16 autocast that the policy needs, a float32 VAE still decodes in float32
    seen = []
    pipe.vae.decoder.conv_out.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.float16):
        reports.decode_images(pipe, latents)
    assert seen == [torch.float32]


def test_a_class_absent_from_the_steps_batch_has_no_mean_reward():
    # 3 desirable images, no undesirable one (at batch 2 and 80% desirable, 64% of the steps): null, not 0.0
    r, desirable = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([True, True, True])
    stats = dict(r=r, z=torch.tensor(0.1), policy_err=torch.ones(3), ref_err=torch.ones(3))
    sums = reports.step_sums(torch.tensor(0.4), stats, desirable, torch.tensor(True), torch.zeros(3), False)
    row = reports.log_row(7, sums, stats["z"], torch.tensor(1.0), 1e-7, False, 1.0)
    assert row["reward_desirable"] == pytest.approx(0.5) and row["reward_undesirable"] is None
    assert json.loads(json.dumps(row))["reward_undesirable"] is None  # valid JSON: null
    fig = reports.curves_figure([row, dict(row, step=8, reward_undesirable=-0.3)], "run")  # a gap, no error
    assert fig is not None


def test_validation_prompts_come_from_a_txt_file_or_a_bar_separated_list(tmp_path):
    # a file: one prompt per line, a '|' inside a line kept; blank lines dropped
    (tmp_path / "p.txt").write_text("a cat | on a sofa\n\n  a dog\n")
    assert reports.read_prompts(str(tmp_path / "p.txt")) == ["a cat | on a sofa", "a dog"]
    assert reports.read_prompts("a cat| |a dog ") == ["a cat", "a dog"]
