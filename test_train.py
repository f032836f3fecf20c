"""Tests of train_kto.py end to end on the tiny random model: logs, checkpoints, flags, resume, atomic saves,
non-finite steps, refused inputs, several ranks, and parity with the code before the redesign.

Run: python -m pytest -q test_train.py   (offline; the fast layer: -m "not slow")
"""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

import fixtures
import train_kto
import data

os.environ.setdefault("HF_HUB_OFFLINE", "1")
UTILITIES = ("kahneman_tversky", "loss_averse", "risk_seeking")
HERE = Path(__file__).parent
# --tiny with the random-weight tiny model and its small CSV dataset (fast); --tiny alone trains on the tiny
# world (tiny_world.py), which test_world.py covers
TINY = ["--tiny", "--pretrained_model", str(fixtures.tiny_model_path()), "--dataset", str(fixtures.tiny_dataset_path()),
        "--validation_steps", "0"]  # validation images: test_validation_grids_...; TINY[:-2] for older commits


def write_table(tmp_path, rows, name="data.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_feedback_dataset_shapes_and_bytes(tmp_path):
    from PIL import Image
    Image.new("RGB", (40, 24), (255, 0, 0)).save(tmp_path / "a.png")
    table = data.load_feedback(write_table(tmp_path, [{"image": "a.png", "caption": "red", "label": "desirable"}]))
    item = data.FeedbackDataset(table, tmp_path, 16)[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["desirable"]
    assert item["pixel_values"][0].min() == 1.0 and item["pixel_values"][1].max() == -1.0
    buf = (tmp_path / "a.png").read_bytes()
    pd.DataFrame([{"image": buf, "caption": "red", "label": 0}]).to_parquet(tmp_path / "b.parquet")
    table = data.load_feedback(tmp_path / "b.parquet")
    assert data.FeedbackDataset(table, tmp_path, 8)[0]["pixel_values"].shape == (3, 8, 8)


@pytest.mark.parametrize("rows, message", [
    ([{"img": "a.png", "caption": "x", "label": 1}], r"missing column\(s\) image"),
    ([{"image": "a.png", "caption": "x", "label": "maybe"}], r"column 'label', row 0 .* 'maybe'"),
    ([{"image": "nope.png", "caption": "x", "label": 1}],
     r"column 'image', row 0: image file 'nope.png' does not exist"),
])
def test_bad_dataset_is_refused_with_a_message(tmp_path, rows, message, capsys):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = write_table(tmp_path, rows)
    with pytest.raises(SystemExit) as e:
        train_kto.main([*TINY, "--dataset", str(path), "--output_dir", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    assert re.search(message, err), err


# ---------------------------------------------------------------------------------------------------
# End to end on the tiny model

def run(tmp_path, *args, out="out"):
    policy = train_kto.main([*TINY, "--output_dir", str(tmp_path / out), *args])
    rows = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
    return policy, rows


def test_tiny_run_writes_loadable_checkpoints_and_logs(tmp_path):
    from diffusers import UNet2DConditionModel
    policy, rows = run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2",
                       "--lr_warmup_steps", "4", "--learning_rate", "1e-3")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    unet = UNet2DConditionModel.from_pretrained(out / "checkpoint-4", subfolder="unet")
    for a, b in zip(unet.state_dict().values(), policy.state_dict().values()):
        assert torch.equal(a, b)
    run_json = json.loads((out / "run.json").read_text())
    assert json.loads((out / "checkpoint-4" / "config.json").read_text()) == run_json["config"]
    assert [launch["start_step"] for launch in run_json["launches"]] == [0]
    table = pd.read_csv(fixtures.tiny_dataset_path())
    assert run_json["num_desirable"] == table.label.sum() and run_json["num_undesirable"] == (table.label == 0).sum()
    assert run_json["config"]["beta"] == train_kto.TINY["beta"] and run_json["world_size"] == 1
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warm-up
    # the optimizer state (2x the UNet) is kept in the newest checkpoint only; an older one cannot be resumed
    assert (out / "checkpoint-4" / "optimizer.pt").exists() and not (out / "checkpoint-2" / "optimizer.pt").exists()
    with pytest.raises(SystemExit):
        run(tmp_path, "--max_train_steps", "5", "--resume", str(out / "checkpoint-2"))
    keys = {"loss", "z", "reward_desirable", "reward_undesirable", "accuracy", "policy_err", "ref_err",
            "grad_norm", "lr", "images_per_sec"}
    assert keys <= set(rows[0])
    assert rows[0]["loss"] == pytest.approx(0.5)            # policy == ref at step 1: lambda / 2


@pytest.mark.parametrize("utility", UTILITIES[1:])
def test_every_utility_trains(tmp_path, utility):
    _, rows = run(tmp_path, "--max_train_steps", "2", "--utility", utility, "--lambda_d", "2", "--lambda_u", "3")
    # step 1: policy == ref, so x = -w * beta * z = 0 and 1 - U(0) is the same for every sample
    one_minus_u0 = {"loss_averse": 1 + math.log(2), "risk_seeking": 1 - math.log(2)}[utility]
    frac_d = rows[0]["desirable_frac"]
    assert rows[0]["loss"] == pytest.approx(one_minus_u0 * (2 * frac_d + 3 * (1 - frac_d)), rel=1e-5)


def test_reference_points(tmp_path):
    _, rows = run(tmp_path, "--max_train_steps", "3", "--reference_point", "zero", out="zero")
    assert all(r["z"] == 0 for r in rows)
    _, rows = run(tmp_path, "--max_train_steps", "3", "--reference_point", "batch_mean",
                  "--desirable_ratio", "1.0", "--beta", "50", out="bm")
    assert all(r["desirable_frac"] == 1 for r in rows)
    for r in rows:  # all samples desirable: z = max(0, mean r) = max(0, mean desirable reward)
        assert r["z"] == pytest.approx(max(0.0, r["reward_desirable"]), abs=1e-7)


@pytest.mark.slow
def test_same_seed_same_run_and_workers_do_not_change_it(tmp_path):
    args = ("--max_train_steps", "3", "--random_flip", "--caption_dropout", "0.5")
    _, a = run(tmp_path, *args, out="a")
    _, b = run(tmp_path, *args, "--dataloader_workers", "1", out="b")
    _, c = run(tmp_path, *args, "--seed", "1", out="c")
    _, d = run(tmp_path, *args, "--no-random_flip", "--caption_dropout", "0", out="d")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows]
    assert strip(a) == strip(b)
    assert strip(a) != strip(c) and strip(a) != strip(d)


def test_max_grad_norm_clips(tmp_path):
    from diffusers import UNet2DConditionModel
    base = UNet2DConditionModel.from_pretrained(fixtures.tiny_model_path(), subfolder="unet").state_dict()
    free, _ = run(tmp_path, "--max_train_steps", "2", "--lr_warmup_steps", "1", out="free")
    tight, _ = run(tmp_path, "--max_train_steps", "2", "--lr_warmup_steps", "1", "--max_grad_norm", "1e-12",
                   out="tight")
    change = lambda m: max((m.state_dict()[k] - base[k]).abs().max().item() for k in base)
    # Adam normalises the gradient's scale, so only a norm far below its eps (1e-8) slows it down
    assert change(tight) < 0.01 * change(free)


# ---------------------------------------------------------------------------------------------------
# Runs that survive: resume, atomic saves, non-finite steps, refused inputs, several ranks

def weights(path):
    from safetensors.torch import load_file
    return load_file(Path(path) / "unet" / "diffusion_pytorch_model.safetensors")


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tmp_path):
    args = ("--checkpointing_steps", "2", "--checkpoints_total_limit", "1")
    _, whole = run(tmp_path, "--max_train_steps", "4", *args, out="whole")
    run(tmp_path, "--max_train_steps", "2", *args, out="split")
    _, split = run(tmp_path, "--max_train_steps", "4", "--resume", "latest", *args, out="split")
    assert max_diff(weights(tmp_path / "whole/checkpoint-4"), weights(tmp_path / "split/checkpoint-4")) <= 1e-6
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows]
    assert strip(whole) == strip(split)
    assert [p.name for p in (tmp_path / "split").glob("checkpoint-*")] == ["checkpoint-4"]  # total limit 1
    _, again = run(tmp_path, "--max_train_steps", "5", "--resume", str(tmp_path / "split/checkpoint-4"), out="split")
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5]


def run_script(tmp_path, body, *argv, torchrun=None, check=True):
    """Run train_kto.main in a fresh process with a patch applied first (`body` is Python code)."""
    script = tmp_path / "patched.py"
    script.write_text("import os, sys, json, torch\nsys.path.insert(0, %r)\nimport train_kto\n" % str(HERE)
                      + textwrap.dedent(body) + "\ntrain_kto.main(sys.argv[1:])\n"
                      + "on_exit()\n" * ("def on_exit" in body))
    launcher = [sys.executable, "-m", "torch.distributed.run", *torchrun] if torchrun else [sys.executable]
    proc = subprocess.run([*launcher, str(script), *TINY, *argv], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    out = tmp_path / "out"
    die_in_save = """
        real = train_kto.fsync_tree
        def fsync_tree(path):
            if path.name.startswith("checkpoint-4.") and path.name.endswith(".tmp"):
                os._exit(9)  # killed mid-save: unet/ written, not yet renamed
            real(path)
        train_kto.fsync_tree = fsync_tree
    """
    proc = run_script(tmp_path, die_in_save, "--max_train_steps", "4", "--checkpointing_steps", "2",
                      "--output_dir", str(out), check=False)
    assert proc.returncode == 9
    assert (out / "checkpoint-2" / "training_state.pt").exists() and list(out.glob("checkpoint-4.*.tmp"))
    assert [p.name for p in train_kto.list_checkpoints(out)] == ["checkpoint-2"]
    _, rows = run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume", "latest")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch, capsys):
    real = train_kto.kto_loss
    calls = []

    def nan_at_step_2(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(train_kto, "kto_loss", nan_at_step_2)
    _, rows = run(tmp_path, "--max_train_steps", "3", "--lr_warmup_steps", "4", out="one")
    assert [r["skipped"] for r in rows] == [0, 1, 0] and math.isnan(rows[1]["loss"])
    lr = train_kto.TINY["learning_rate"]  # the skipped step did not advance the warm-up
    assert [r["lr"] for r in rows] == pytest.approx([lr / 4, lr / 2, lr / 2])
    monkeypatch.setattr(train_kto, "kto_loss", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--max_train_steps", "10", "--max_bad_steps", "3", out="always")
    assert e.value.code == 3 and "3 consecutive steps" in capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "always/metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [1, 1, 1]


@pytest.mark.parametrize("case", ["one_class", "empty_captions", "batch_of_one", "foreign_output_dir", "bad_resume",
                                  "no_such_model_folder", "not_a_pipeline_folder", "unreachable_hub_model"])
def test_bad_input_is_refused_before_training(tmp_path, case, capsys):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "caption": f"c{i}", "label": i % 2} for i in range(20)]
    args = ["--max_train_steps", "1"]
    if case == "one_class":
        rows = [dict(r, label=1) for r in rows]
    if case == "empty_captions":
        rows = [dict(r, caption="" if i < 2 else r["caption"]) for i, r in enumerate(rows)]
    if case == "batch_of_one":
        args += ["--train_batch_size", "1"]
    if case == "foreign_output_dir":
        (tmp_path / "out" / "checkpoint-7").mkdir(parents=True)
    if case == "bad_resume":
        args += ["--resume", str(tmp_path)]
    if case == "no_such_model_folder":
        args += ["--pretrained_model", str(tmp_path / "runs" / "nope")]
    if case == "not_a_pipeline_folder":
        args += ["--pretrained_model", str(tmp_path)]
    if case == "unreachable_hub_model":  # offline here: the hub cannot be reached, and the cache lacks it
        args += ["--pretrained_model", "nobody-here/no-such-model"]
    args += ["--dataset", str(write_table(tmp_path, rows))]
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *args)
    err = capsys.readouterr().err
    expected = {"one_class": "--allow_one_class", "empty_captions": "10% of the captions are empty",
                "batch_of_one": "--train_batch_size >= 2", "foreign_output_dir": "--resume latest",
                "bad_resume": "not a checkpoint folder", "no_such_model_folder": "no such file or folder",
                "not_a_pipeline_folder": "no unet/, scheduler/", "unreachable_hub_model": "hf download"}[case]
    assert e.value.code == 2 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing started
    if case == "one_class":  # allowed on request
        run(tmp_path, *args, "--allow_one_class", out="allowed")


TORCHRUN = ["--standalone", "--nproc_per_node", "2"]


@pytest.mark.slow
def test_two_ranks_stay_in_sync_and_survive_a_killed_rank(tmp_path):
    record = """
        real = train_kto.kto_loss
        zs = []
        def kto_loss(*a, **k):
            zs.append(float(a[4]))
            if os.environ.get("KILL_AT") and int(os.environ["TORCHELASTIC_RESTART_COUNT"]) == 0 \\
                    and os.environ["RANK"] == "1" and len(zs) == int(os.environ["KILL_AT"]):
                os._exit(1)  # a worker dies; torchrun restarts the group, which resumes from the latest checkpoint
            return real(*a, **k)
        train_kto.kto_loss = kto_loss
        real_main = train_kto.main
        def main(argv):
            policy = real_main(argv)
            out = os.path.join(argv[argv.index("--output_dir") + 1], "rank%s.json" % os.environ["RANK"])
            json.dump({"z": zs, "sum": sum(p.double().sum().item() for p in policy.parameters())}, open(out, "w"))
        train_kto.main = main
    """
    args = ("--max_train_steps", "5", "--checkpointing_steps", "2", "--resume", "latest")
    run_script(tmp_path, record, *args, "--output_dir", str(tmp_path / "whole"), torchrun=TORCHRUN)
    r0, r1 = (json.loads((tmp_path / f"whole/rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and len(r0["z"]) == 5 and max(r0["z"]) > 0  # z and weights identical on both ranks
    run_json = json.loads((tmp_path / "whole/run.json").read_text())
    assert run_json["world_size"] == 2
    # with gradient accumulation DDP skips the all-reduce on the inner passes (no_sync): still in sync
    run_script(tmp_path, record, *args, "--gradient_accumulation_steps", "2", "--train_batch_size", "4",
               "--output_dir", str(tmp_path / "acc"), torchrun=TORCHRUN)
    a0, a1 = (json.loads((tmp_path / f"acc/rank{r}.json").read_text()) for r in (0, 1))
    assert a0 == a1 and a0["sum"] != r0["sum"]

    os.environ["KILL_AT"] = "4"
    try:
        proc = run_script(tmp_path, record, *args, "--output_dir", str(tmp_path / "killed"),
                          torchrun=["--max-restarts", "1", *TORCHRUN])
    finally:
        del os.environ["KILL_AT"]
    assert "resuming from" in proc.stdout + proc.stderr
    assert max_diff(weights(tmp_path / "whole/checkpoint-5"), weights(tmp_path / "killed/checkpoint-5")) <= 1e-6


def test_sft_trains_on_desirable_images_with_the_denoising_loss(tmp_path):
    _, rows = run(tmp_path, "--max_train_steps", "2", "--objective", "sft")
    assert all(r["desirable_frac"] == 1 for r in rows)
    assert all(r["loss"] == pytest.approx(r["policy_err"], rel=1e-6) for r in rows)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["config"]["desirable_ratio"] == 1.0


def test_resume_refuses_other_data_or_objective_and_keeps_every_launch(tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    other = write_table(tmp_path, [{"image": "a.png", "caption": f"c{i}", "label": i % 2} for i in range(8)])
    run(tmp_path, "--max_train_steps", "2")
    for flag, value in (("--dataset", str(other)), ("--beta", "7"), ("--objective", "sft")):
        with pytest.raises(SystemExit) as e:
            run(tmp_path, "--max_train_steps", "3", "--resume", "latest", flag, value)
        err = capsys.readouterr().err
        assert e.value.code == 2 and flag in err and "another --output_dir" in err, err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["config"]["max_train_steps"] == 2 and len(record["launches"]) == 1  # the refusals wrote nothing
    _, rows = run(tmp_path, "--max_train_steps", "3", "--resume", "latest", "--checkpointing_steps", "5")
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [launch["start_step"] for launch in record["launches"]] == [0, 2]
    assert record["config"]["max_train_steps"] == 3
    assert [r["step"] for r in rows] == [1, 2, 3]


PRE_REDESIGN = "4461090"  # the last commit before the modules were split: same metrics, bit for bit, on the same machine


@pytest.mark.slow
def test_same_metrics_and_weights_as_before_the_redesign(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(HERE), "archive", PRE_REDESIGN], capture_output=True)
    if archive.returncode:
        pytest.skip(f"commit {PRE_REDESIGN} is not in this checkout's history")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    args = ["--max_train_steps", "3", "--learning_rate", "1e-3", "--caption_dropout", "0.5"]
    variants = ([], ["--reference_point", "batch_mean", "--utility", "loss_averse", "--no-random_flip"],
                ["--objective", "sft"], ["--train_batch_size", "4", "--gradient_accumulation_steps", "2"],
                ["--reference_point", "batch_mean", "--gradient_accumulation_steps", "2", "--cache_latents"])
    for n, extra in enumerate(variants):
        out = tmp_path / f"old-{n}"
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(old)!r}); import train_kto; "
                        "train_kto.main(sys.argv[1:])", *TINY[:-2], *args, *extra, "--output_dir", str(out)],
                       check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=old)
        _, rows = run(tmp_path, *args, *extra, out=f"new-{n}")
        before = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        for a, b in zip(rows, before, strict=True):
            for k in b:
                if k != "images_per_sec":
                    assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (k, a[k], b[k])
        assert max_diff(weights(out / "checkpoint-3"), weights(tmp_path / f"new-{n}" / "checkpoint-3")) <= 1e-6


def test_help_shows_the_tiny_defaults(capsys):
    with pytest.raises(SystemExit):
        train_kto.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 10000; --tiny: 200)" in text and "(default: 5000.0; --tiny: 200.0)" in text


def test_long_captions_are_counted_and_warned_about(tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    long = "a red circle on a white background next to a blue square on a black background"  # > 16 tiny tokens
    rows = [{"image": "a.png", "caption": long if i < 3 else f"c{i}", "label": i % 2} for i in range(8)]
    run(tmp_path, "--max_train_steps", "1", "--dataset", str(write_table(tmp_path, rows)))
    assert "warning: 1 of 7 distinct captions are longer than the text encoder's 16 tokens" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_failure_is_reported_once_and_in_the_summary(tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "caption": f"c{i}", "label": 1} for i in range(4)]  # one class: refused
    proc = run_script(tmp_path, "", "--dataset", str(write_table(tmp_path, rows)), "--output_dir",
                      str(tmp_path / "out"), torchrun=TORCHRUN, check=False)
    message = "--allow_one_class to train anyway"
    assert proc.returncode != 0 and proc.stderr.count("error: --dataset") == 1, proc.stderr[-3000:]
    summary = proc.stderr[proc.stderr.index("Root Cause"):]
    assert message in summary, summary  # torchrun's failure summary carries the message, not only an exit code


@pytest.mark.parametrize("reference_point", ["kl_mismatched", "batch_mean"])
def test_gradient_accumulation_equals_the_whole_batch(tmp_path, reference_point):
    """The paper's batch 8 on one GPU: 4 accumulated passes of 2 give the run of one pass of 8, z included."""
    args = ["--max_train_steps", "3", "--learning_rate", "1e-3", "--reference_point", reference_point]
    whole, want = run(tmp_path, *args, "--train_batch_size", "8", out="whole")
    accumulated, rows = run(tmp_path, *args, "--train_batch_size", "2", "--gradient_accumulation_steps", "4", out="acc")
    for a, b in zip(rows, want, strict=True):
        for k in ("loss", "z", "reward_desirable", "reward_undesirable", "accuracy", "policy_err"):
            # rewards are differences of errors of about 1: float32 rounding of the errors is 1e-7 absolute
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6), (k, a[k], b[k])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # float32 gradient sums in another order
    assert rows[-1]["z"] > 0
    # Adam divides by sqrt(v): parameters with gradients near 0 amplify float32 rounding, up to ~1% of a step (1e-3)
    assert max((p - q).abs().max().item() for p, q in zip(whole.parameters(), accumulated.parameters())) <= 2e-5


@pytest.mark.slow
def test_validation_grids_curves_tracker_and_model_cards(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    from diffusers import StableDiffusionPipeline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    args = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3"]
    plain, _ = run(tmp_path, *args, out="plain")
    calls, sample = [], StableDiffusionPipeline.__call__
    monkeypatch.setattr(StableDiffusionPipeline, "__call__",
                        lambda self, *a, **k: calls.append(k) or sample(self, *a, **k))
    watched, rows = run(tmp_path, *args, "--validation_steps", "2", "--report_to", "tensorboard",
                        "--validation_guidance", "2.5",
                        "--validation_prompts", "a red circle on a white background|a blue square on a black bg",
                        out="watched")
    out = tmp_path / "watched"
    # the validation images come from their own generators: the training run is the same with and without them
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), watched.parameters()))
    assert sorted(p.name for p in (out / "validation").iterdir()) == [f"step-00000{k}.png" for k in (0, 2, 4)]
    assert [(k["guidance_scale"], k["num_inference_steps"]) for k in calls] == [(2.5, 25)] * 3
    assert (out / "curves.png").stat().st_size > 10_000 and watched.training
    for step in (2, 4):
        card = (out / f"checkpoint-{step}" / "README.md").read_text()
        assert "diffusion-kto" in card and str(fixtures.tiny_model_path()) in card
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in rows])
    assert len(events.Images("validation")) == 3
    (out / "curves.png").unlink()  # --plot redraws it from metrics.jsonl alone
    train_kto.main(["--plot", str(out)])
    assert (out / "curves.png").exists() and "curves.png" in capsys.readouterr().out


@pytest.mark.slow
def test_a_log_file_gets_plain_progress_lines_and_no_warnings(tmp_path):
    """stderr redirected to a file: no carriage-return progress bars, no notices a user cannot act on."""
    proc = subprocess.run([sys.executable, str(HERE / "train_kto.py"), *TINY, "--max_train_steps", "2",
                           "--validation_steps", "2", "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr and "torchvision" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    assert "kto: 2/2 steps" in proc.stderr
