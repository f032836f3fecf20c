"""Tests of train_kto.py end to end on the tiny random model: logs, checkpoints, flags, resume, atomic saves,
non-finite steps, refused inputs, several ranks, and parity with the code before the redesign.

Run: python -m pytest -q test_train.py   (offline; the fast layer: -m "not slow")
"""

import dataclasses
import errno
import json
import math
import multiprocessing
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

import checkpoints
import data
import encoders
import fixtures
import reports
import train_kto
import utils

os.environ.setdefault("HF_HUB_OFFLINE", "1")
UTILITIES = ("kahneman_tversky", "loss_averse", "risk_seeking")
HERE = Path(__file__).parent
# --tiny with the random-weight tiny model and its small CSV dataset (fast); --tiny alone trains on the tiny
# world (tiny_world.py), which test_world.py covers
TINY = [
    "--tiny",
    "--pretrained_model",
    str(fixtures.tiny_model_path()),
    "--dataset",
    str(fixtures.tiny_dataset_path()),
    "--validation_steps",
    "0",
]  # validation images: test_validation_grids_...; TINY[:-2] for older commits


def write_table(tmp_path, rows, name="data.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_feedback_dataset_shapes_and_bytes(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 24), (255, 0, 0)).save(tmp_path / "a.png")
    table = data.load_feedback(
        write_table(tmp_path, [{"image": "a.png", "caption": "red", "label": "desirable"}])
    )
    item = data.FeedbackDataset(table, tmp_path, 16)[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["desirable"]
    assert item["pixel_values"][0].min() == 1.0 and item["pixel_values"][1].max() == -1.0
    buf = (tmp_path / "a.png").read_bytes()
    pd.DataFrame([{"image": buf, "caption": "red", "label": 0}]).to_parquet(tmp_path / "b.parquet")
    table = data.load_feedback(tmp_path / "b.parquet")
    assert data.FeedbackDataset(table, tmp_path, 8)[0]["pixel_values"].shape == (3, 8, 8)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"img": "a.png", "caption": "x", "label": 1}], r"missing column\(s\) image"),
        ([{"image": "a.png", "caption": "x", "label": "maybe"}], r"column 'label', row 0 .* 'maybe'"),
        (
            [{"image": "nope.png", "caption": "x", "label": 1}],
            r"column 'image', row 0: image file 'nope.png' does not exist",
        ),
    ],
)
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


@pytest.mark.parametrize(
    "flags, rows, message",
    [
        ([], [{"image": "a.png", "caption": "x", "label": "maybe"}], "column 'label', row 0"),
        ([], [{"image": "a.png", "caption": f"c{i}", "label": 1} for i in range(4)], "--allow_one_class"),
        (
            ["--objective", "sft", "--allow_one_class"],
            [{"image": "a.png", "caption": f"c{i}", "label": 0} for i in range(4)],
            "--objective sft trains on desirable samples, and there are none",
        ),
        (["--train_batch_size", "1"], None, "--train_batch_size >= 2"),
        (["--checkpointing_steps", "0"], None, "--checkpointing_steps 0: must be at least 1"),
        (["--beta", "0"], None, "--beta 0: the utility is then the same for every image"),
        (["--lambda_d", "0", "--desirable_ratio", "1"], None, "every sample drawn has loss weight 0"),
        (
            ["--allow_one_class", "--lambda_d", "0"],
            [{"image": "a.png", "caption": f"c{i}", "label": 1} for i in range(4)],
            "only desirable samples, and their loss weight (--lambda_d) is 0",
        ),
        (["--validation_prompts", "|"], None, "--validation_prompts '|': no prompt in it"),
        (["--report_to", "wandb"], None, "--report_to wandb needs the wandb package: pip install wandb"),
        (
            ["--validation_prompts", "/no/such/prompts.txt"],
            None,
            "--validation_prompts /no/such/prompts.txt: cannot",
        ),
    ],
    ids=[
        "bad_label",
        "one_class",
        "sft_without_likes",
        "batch_of_one",
        "zero_checkpointing_steps",
        "zero_beta",
        "zero_weight",
        "one_class_of_zero_weight",
        "no_validation_prompt",
        "no_wandb",
        "no_prompts_file",
    ],
)
def test_tiny_checks_the_data_and_flags_before_building_the_world(
    tmp_path, monkeypatch, capsys, flags, rows, message
):
    from PIL import Image

    import tiny_world

    # An empty cache: --tiny would build the world (minutes) for its model
    monkeypatch.setenv("DIFFUSION_KTO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiny_world, "build_world", lambda *a, **k: pytest.fail("the world build started"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, as where it is not installed
    if rows:
        Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
        flags = [*flags, "--dataset", str(write_table(tmp_path, rows))]
    with pytest.raises(SystemExit) as e:
        train_kto.main(["--tiny", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.slow
@pytest.mark.parametrize(
    "signal_name, code, first_words",
    [
        ("SIGINT", 130, "stopped by Ctrl-C."),
        ("SIGTERM", 75, "preempted: SIGTERM at step {step}: the step was"),
    ],
)
def test_a_stopped_run_says_what_was_saved_and_how_to_resume(tmp_path, signal_name, code, first_words):
    import signal
    import time

    out = tmp_path / "out"
    argv = [*TINY, "--output_dir", str(out), "--max_train_steps", "500", "--checkpointing_steps", "2"]
    # SIGINT as a terminal sends it: a child of a shell without job control would inherit it ignored
    job = subprocess.Popen(
        [sys.executable, "train_kto.py", *argv],
        cwd=HERE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    while not (out / "checkpoint-2").exists() and job.poll() is None:
        time.sleep(0.2)
    job.send_signal(getattr(signal, signal_name))
    err = job.communicate(timeout=120)[1]
    last = checkpoints.list_checkpoints(out)[-1]
    step = int(last.name.split("-")[1])
    assert job.returncode == code and "Traceback" not in err, err
    # Ctrl-C: at once, the last checkpoint named; SIGTERM (preemption): the step finished and saved (issue 29)
    lines = err.strip().splitlines()
    assert (
        lines[-1].startswith(first_words.format(step=step)) and f"The last checkpoint is {last}." in lines[-1]
    )
    # The printed command, run as printed (with fewer steps): the run goes on from that checkpoint
    command = lines[-1].split("To resume: ")[1]
    assert command.startswith("python train_kto.py ") and command.endswith(" --resume latest"), command
    subprocess.run(
        [sys.executable, *shlex.split(command)[1:], "--max_train_steps", str(step + 1)],
        cwd=HERE,
        check=True,
        timeout=600,
    )
    launches = json.loads((out / "run.json").read_text())["launches"]
    assert [launch["start_step"] for launch in launches] == [0, step]


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_dataloader_workers_saves_and_exits_75(tmp_path):
    import signal
    import time

    # torchrun and SLURM signal the whole process group: the DataLoader's workers get SIGTERM too
    out = tmp_path / "out"
    argv = [*TINY, "--output_dir", str(out), "--max_train_steps", "500", "--checkpointing_steps", "2"]
    job = subprocess.Popen(
        [sys.executable, "train_kto.py", *argv, "--dataloader_workers", "2"],
        cwd=HERE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, not this test's
    )
    while not (out / "checkpoint-2").exists() and job.poll() is None:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGTERM)
    err = job.communicate(timeout=120)[1]
    step = int(checkpoints.list_checkpoints(out)[-1].name.split("-")[1])
    assert job.returncode == 75 and "Traceback" not in err, err
    assert f"preempted: SIGTERM at step {step}" in err and step > 2, err


def test_sigterm_at_the_last_step_ends_the_run_as_complete(tmp_path, monkeypatch):
    import signal

    # SIGTERM during the last step: that step is saved as always, and the run is complete (exit 0, not 75: a
    # relaunch would have nothing left to train)
    class SignalledNow(utils.StopRequest):
        def __init__(self):
            super().__init__()
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(utils, "StopRequest", SignalledNow)
    try:
        policy = train_kto.main([*TINY, "--output_dir", str(tmp_path), "--max_train_steps", "1"])
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert policy is not None and [c.name for c in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-1"]


def test_a_resume_into_a_new_folder_stopped_before_its_first_save_runs_again_as_launched(
    tmp_path, monkeypatch
):
    run(tmp_path, "--max_train_steps", "2", out="a")
    again = ["--resume", str(tmp_path / "a" / "checkpoint-2"), "--max_train_steps", "3"]

    def killed(*args):
        raise KeyboardInterrupt

    # the first launch into b writes its record (run.json, step 3 in metrics.jsonl), then dies in the save
    with monkeypatch.context() as m:
        m.setattr(checkpoints, "save_checkpoint", killed)
        with pytest.raises(SystemExit):
            run(tmp_path, *again, out="b")
    assert (tmp_path / "b" / "run.json").exists() and not checkpoints.list_checkpoints(tmp_path / "b")
    # the same command again: its own record, not another run's
    _, rows = run(tmp_path, *again, out="b")
    last = checkpoints.list_checkpoints(tmp_path / "b")[-1]
    assert [r["step"] for r in rows] == [3] and last.name == "checkpoint-3"


def test_a_relaunch_of_a_finished_run_trains_nothing_and_exits_0(tmp_path, capsys):
    run(tmp_path, "--max_train_steps", "2")
    out = tmp_path / "out"
    # the run's files (.lock names each launch, utils.hold_folder)
    files = lambda: {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    before = files()
    # a torchrun restart or a requeue after the last save: the same command, --resume latest
    relaunch = lambda: train_kto.main(
        [*TINY, "--output_dir", str(out), "--max_train_steps", "2", "--resume", "latest"]
    )
    assert relaunch() is None
    assert "nothing to train: " in capsys.readouterr().out
    assert files() == before
    # stopped between the last save and the curves' redraw (curves.png older than metrics.jsonl, or none yet): the
    # relaunch draws them, and writes nothing else
    curves, metrics = out / "curves.png", out / "metrics.jsonl"
    for stop in (lambda: os.utime(curves, ns=(0, 0)), curves.unlink):
        stop()
        relaunch()
        assert curves.stat().st_mtime_ns >= metrics.stat().st_mtime_ns and files() == before


def test_a_second_launch_into_a_folder_that_a_run_is_writing_stops_at_once(tmp_path, capsys, monkeypatch):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    # a run holds the folder (its lock, as rank 0 of another process would)
    with open(out / ".lock", "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("held by pid 12345 on node7 since 2026-12-07 10:00:00 UTC\n")
        other.flush()
        with pytest.raises(SystemExit) as e:
            run(tmp_path, "--max_train_steps", "1")
        assert e.value.code == 2
        assert "another run is writing there (held by pid 12345 on node7" in capsys.readouterr().err
        assert not (out / "run.json").exists()
    # that run ended: the folder is free; and a run that stops with an error frees it too
    with pytest.raises(SystemExit):
        run(tmp_path, "--max_train_steps", "1", "--resume", str(tmp_path))
    run(tmp_path, "--max_train_steps", "1")
    assert f"pid {os.getpid()}" in (out / ".lock").read_text()

    # a folder that cannot be made (a file where a folder is expected; or no permission): said, nothing started
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        train_kto.main([*TINY, "--output_dir", str(tmp_path / "a_file" / "out"), "--max_train_steps", "1"])
    assert (
        e.value.code == 2
        and "a_file/out: cannot be written ([Errno 20] Not a directory" in capsys.readouterr().err
    )

    # a file system without locks: the run goes on, and says that it is unguarded
    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(utils.fcntl, "flock", no_locks)
    run(tmp_path, "--max_train_steps", "1", out="unguarded")
    assert "cannot be locked ([Errno 37] No locks available); a second launch" in capsys.readouterr().out


def test_the_resume_command_names_the_launch_of_one_or_several_nodes(tmp_path, monkeypatch):
    (tmp_path / "checkpoint-4").mkdir()
    cfg = train_kto.Config(output_dir=str(tmp_path))
    command = lambda: checkpoints.resume_command(cfg, "train_kto.py", ["--beta", "5", "--resume", "x"])
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert command().endswith("To resume: python train_kto.py --beta 5 --resume latest")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert command().endswith("To resume: torchrun --nproc_per_node 4 train_kto.py --beta 5 --resume latest")
    # 2 nodes x 8: each node's torchrun starts 8 processes, not 16
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert "torchrun --nnodes 2 --nproc_per_node 8 with the first launch's rendezvous flags" in command()
    assert command().endswith("then train_kto.py --beta 5 --resume latest")


def test_sigterm_before_training_stops_at_once_with_one_line(capsys):
    # what run_main installs until the training loop takes SIGTERM over (utils.StopRequest)
    with pytest.raises(SystemExit) as e:
        with utils.reported((utils.DataError,), 0, lambda: "The last checkpoint is X."):
            utils.raise_stopped(15, None)
    assert (
        e.value.code == 143 and capsys.readouterr().err == "stopped by SIGTERM. The last checkpoint is X.\n"
    )


# ---------------------------------------------------------------------------------------------------
# End to end on the tiny model


def run(tmp_path, *args, out="out"):
    policy = train_kto.main([*TINY, "--output_dir", str(tmp_path / out), *args])
    rows = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
    return policy, rows


def test_tiny_run_writes_loadable_checkpoints_and_logs(tmp_path):
    from diffusers import UNet2DConditionModel

    policy, rows = run(
        tmp_path,
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--lr_warmup_steps",
        "4",
        "--learning_rate",
        "1e-3",
    )
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    unet = UNet2DConditionModel.from_pretrained(out / "checkpoint-4", subfolder="unet")
    for a, b in zip(unet.state_dict().values(), policy.state_dict().values()):
        # bitwise: the file holds the very tensors the run ended with
        assert torch.equal(a, b)
    run_json = json.loads((out / "run.json").read_text())
    assert json.loads((out / "checkpoint-4" / "config.json").read_text()) == run_json["config"]
    assert [launch["start_step"] for launch in run_json["launches"]] == [0]
    table = pd.read_csv(fixtures.tiny_dataset_path())
    assert (
        run_json["num_desirable"] == table.label.sum()
        and run_json["num_undesirable"] == (table.label == 0).sum()
    )
    assert run_json["config"]["beta"] == train_kto.TINY["beta"] and run_json["world_size"] == 1
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # linear warm-up, in float64 (a few 1e-16 of rounding; approx's default rel 1e-6 is headroom)
    assert [r["lr"] for r in rows] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    # the optimizer state (2x the UNet) is kept in the newest checkpoint only; an older one cannot be resumed
    assert (out / "checkpoint-4" / "optimizer.pt").exists() and not (
        out / "checkpoint-2" / "optimizer.pt"
    ).exists()
    with pytest.raises(SystemExit):
        run(tmp_path, "--max_train_steps", "5", "--resume", str(out / "checkpoint-2"))
    keys = {
        "loss",
        "z",
        "reward_desirable",
        "reward_undesirable",
        "accuracy",
        "policy_err",
        "ref_err",
        "grad_norm",
        "lr",
        "images_per_sec",
    }
    assert keys <= set(rows[0])
    # policy == ref at step 1, bit for bit: r = z = 0 and every sample's loss is lambda * sigmoid(0) = 1/2 exactly
    assert rows[0]["loss"] == pytest.approx(0.5)


@pytest.mark.parametrize("utility", UTILITIES[1:])
def test_every_utility_trains(tmp_path, utility):
    _, rows = run(
        tmp_path, "--max_train_steps", "2", "--utility", utility, "--lambda_d", "2", "--lambda_u", "3"
    )
    # step 1: policy == ref, so x = -w * beta * z = 0 and 1 - U(0) is the same for every sample
    one_minus_u0 = {"loss_averse": 1 + math.log(2), "risk_seeking": 1 - math.log(2)}[utility]
    frac_d = rows[0]["desirable_frac"]
    # float32 softplus(0) against float64 log 2 and a mean of 8: a few U = 6e-8 each; 1e-5 is 100x that
    assert rows[0]["loss"] == pytest.approx(one_minus_u0 * (2 * frac_d + 3 * (1 - frac_d)), rel=1e-5)


def test_reference_points(tmp_path):
    _, rows = run(tmp_path, "--max_train_steps", "3", "--reference_point", "zero", out="zero")
    # exact: --reference_point zero is the constant 0
    assert all(r["z"] == 0 for r in rows)
    _, rows = run(
        tmp_path,
        "--max_train_steps",
        "3",
        "--reference_point",
        "batch_mean",
        "--desirable_ratio",
        "1.0",
        "--beta",
        "50",
        out="bm",
    )
    assert all(r["desirable_frac"] == 1 for r in rows)
    for r in rows:  # all samples desirable: z = max(0, mean r) = max(0, mean desirable reward)
        # the same float32 sum of the same 8 rewards; only the division differs (float32 for z, float64 for the
        # metric): half a float32 ulp of z (< 1e-8 for z < 0.1), so abs 1e-7 holds whatever the CPU
        assert r["z"] == pytest.approx(max(0.0, r["reward_desirable"]), abs=1e-7)


@pytest.mark.slow
def test_same_seed_same_run_and_workers_do_not_change_it(tmp_path):
    args = ("--max_train_steps", "3", "--random_flip", "--caption_dropout", "0.5")
    _, a = run(tmp_path, *args, out="a")
    _, b = run(tmp_path, *args, "--dataloader_workers", "1", out="b")
    _, c = run(tmp_path, *args, "--seed", "1", out="c")
    _, d = run(tmp_path, *args, "--no-random_flip", "--caption_dropout", "0", out="d")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows]
    # bitwise: a worker process only decodes the same images; the training arithmetic is the same
    assert strip(a) == strip(b)
    assert strip(a) != strip(c) and strip(a) != strip(d)


def test_max_grad_norm_clips_and_0_turns_clipping_off(tmp_path):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(fixtures.tiny_model_path(), subfolder="unet").state_dict()
    runs = {
        bound: run(tmp_path, "--max_train_steps", "2", "--lr_warmup_steps", "1", *flag, out=bound)[0]
        for bound, flag in dict(
            free=[],
            tight=["--max_grad_norm", "1e-12"],
            off=["--max_grad_norm", "0"],
            huge=["--max_grad_norm", "1e30"],
        ).items()
    }
    change = lambda m: max((m.state_dict()[k] - base[k]).abs().max().item() for k in base)
    # Adam normalises the gradient's scale, so only a norm far below its eps (1e-8) slows it down
    assert change(runs["tight"]) < 0.01 * change(runs["free"])
    # 0: no clipping, the same run as a bound that the gradient never reaches (the tiny world's norms are ~10)
    assert change(runs["off"]) > 0
    assert all(torch.equal(runs["off"].state_dict()[k], runs["huge"].state_dict()[k]) for k in base)


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
    # the resumed steps are the identical computation (weights, optimizer, schedule and generators restored bit for
    # bit, the same shapes): equal bit for bit; 1e-6 on the weights is headroom
    assert (
        max_diff(weights(tmp_path / "whole/checkpoint-4"), weights(tmp_path / "split/checkpoint-4")) <= 1e-6
    )
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows]
    assert strip(whole) == strip(split)
    assert [p.name for p in (tmp_path / "split").glob("checkpoint-*")] == ["checkpoint-4"]  # total limit 1
    _, again = run(
        tmp_path, "--max_train_steps", "5", "--resume", str(tmp_path / "split/checkpoint-4"), out="split"
    )
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5]


def test_the_model_card_is_saved_with_the_checkpoint_and_pruning_leaves_no_half_checkpoint(
    tmp_path, monkeypatch
):
    import shutil

    flushed, removed = [], []
    real_fsync, real_rmtree = checkpoints.fsync_tree, shutil.rmtree
    # what is in the temporary folder when it is flushed is what the rename makes the checkpoint, all at once
    monkeypatch.setattr(
        checkpoints,
        "fsync_tree",
        lambda tmp: flushed.append((tmp.name, (tmp / "README.md").exists())) or real_fsync(tmp),
    )
    monkeypatch.setattr(
        checkpoints.shutil, "rmtree", lambda p: removed.append(Path(p).name) or real_rmtree(p)
    )
    run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1")
    assert [has_card for _, has_card in flushed] == [True, True]
    card = (tmp_path / "out" / "checkpoint-4" / "README.md").read_text()
    # the card names the checkpoint by its final name, not the temporary one it was written into
    assert "step 4" in card and 'from_pretrained("checkpoint-4"' in card and ".tmp" not in card
    # checkpoint-2 was pruned under a temporary name, which a start-up removes if a crash stops the deletion
    assert len(removed) == 1 and utils.temp_writer("checkpoint-2", removed[0])
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint")] == [
        "checkpoint-4"
    ]


def run_script(tmp_path, body, *argv, torchrun=None, check=True):
    """Run train_kto.main in a fresh process with a patch applied first (`body` is Python code)."""
    script = tmp_path / "patched.py"
    script.write_text(
        "import os, sys, json, torch\nsys.path.insert(0, %r)\nimport train_kto\n" % str(HERE)
        + textwrap.dedent(body)
        + "\ntrain_kto.main(sys.argv[1:])\n"
        + "on_exit()\n" * ("def on_exit" in body)
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", *torchrun] if torchrun else [sys.executable]
    proc = subprocess.run(
        [*launcher, str(script), *TINY, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    out = tmp_path / "out"
    die_in_save = """
        import checkpoints
        real = checkpoints.fsync_tree
        def fsync_tree(path):
            if path.name.startswith("checkpoint-4.") and path.name.endswith(".tmp"):
                os._exit(9)  # killed mid-save: unet/ written, not yet renamed
            real(path)
        checkpoints.fsync_tree = fsync_tree
    """
    proc = run_script(
        tmp_path,
        die_in_save,
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--output_dir",
        str(out),
        check=False,
    )
    assert proc.returncode == 9
    assert (out / "checkpoint-2" / "training_state.pt").exists() and list(out.glob("checkpoint-4.*.tmp"))
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["checkpoint-2"]
    _, rows = run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume", "latest")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # the killed save's partial folder (its writer gone) was removed at start-up
    assert not list(out.glob("checkpoint-4.*.tmp"))


def test_a_save_the_disk_refuses_keeps_the_last_checkpoint_and_says_how_to_go_on(
    tmp_path, monkeypatch, capsys
):
    import models

    real, saves = models.save_policy, []

    def read_only_at_the_second_save(policy, folder):
        saves.append(folder)
        if len(saves) == 2:  # as a folder made read-only (or a failing disk) would refuse it
            raise PermissionError(13, "Permission denied", str(folder / "unet"))
        real(policy, folder)

    monkeypatch.setattr(models, "save_policy", read_only_at_the_second_save)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2")
    err = capsys.readouterr().err
    out = tmp_path / "out"
    # one line, no traceback: what failed, what is intact, how to go on
    assert e.value.code == 3 and "Traceback" not in err, err[-3000:]
    assert f"could not save {out / 'checkpoint-4'} (PermissionError: [Errno 13] Permission denied" in err
    assert f"{out / 'checkpoint-2'} is intact" in err and "--resume latest" in err
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-2"]


def test_start_up_removes_partial_saves_whose_writer_is_gone(tmp_path, capsys):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead, alive = int(gone.stdout), os.getppid()
    removed = [
        f"checkpoint-4.{utils.HOST}.{dead}.0a1b2c3d.tmp",
        f"checkpoint-6.{dead}.tmp",  # and older versions'
        # this process's own pid: a relaunch that got its dead writer's pid (python is pid 1 in a container)
        f"checkpoint-5.{utils.HOST}.{os.getpid()}.0a1b2c3d.tmp",
    ]
    kept = [
        f"checkpoint-8.{utils.HOST}.{alive}.0a1b2c3d.tmp",  # a save under way in the same folder
        f"checkpoint-9.other-node.{dead}.0a1b2c3d.tmp",  # another machine's: its writer cannot be checked
        "checkpoint-2",
        "checkpoint-10.notes.tmp",
    ]
    for name in removed + kept:
        (tmp_path / name / "unet").mkdir(parents=True)
    checkpoints.remove_stopped_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    out = capsys.readouterr().out
    assert all(f"removing {tmp_path / name}, left by a stopped save" in out for name in removed)
    assert f"note: {tmp_path / kept[1]} is a checkpoint save of other-node" in out


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch, capsys):
    real = train_kto.kto_loss
    calls = []

    def nan_at_step_2(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(train_kto, "kto_loss", nan_at_step_2)
    _, rows = run(tmp_path, "--max_train_steps", "3", "--lr_warmup_steps", "4", out="one")
    assert [r["skipped"] for r in rows] == [0, 1, 0] and rows[1]["loss"] is None

    # strict JSON: the NaN loss is null, not the NaN that Python alone reads
    def strict(constant):
        raise ValueError(f"not JSON: {constant}")

    for line in (tmp_path / "one/metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=strict)
    lr = train_kto.TINY["learning_rate"]  # the skipped step did not advance the warm-up
    # float64 schedule arithmetic: approx's default rel 1e-6 is headroom
    assert [r["lr"] for r in rows] == pytest.approx([lr / 4, lr / 2, lr / 2])
    monkeypatch.setattr(train_kto, "kto_loss", lambda *a, **k: real(*a, **k) * float("inf"))
    one_worker = ["--dataloader_workers", "1"]
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--max_train_steps", "10", "--max_bad_steps", "3", *one_worker, out="always")
    assert e.value.code == 3 and "3 consecutive steps" in capsys.readouterr().err
    # a stop outside the loader also stops its workers (which ignore SIGTERM), though the traceback is still held
    assert not multiprocessing.active_children()
    rows = [json.loads(x) for x in (tmp_path / "always/metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [1, 1, 1]


def test_a_data_error_in_a_dataloader_worker_is_one_line(tmp_path, capsys):
    from PIL import Image

    # every disliked image is corrupt: the worker that draws them gives up with a DataError
    rows = []
    for i in range(20):
        if i % 2:
            (tmp_path / f"{i}.png").write_bytes(b"not an image")
        else:
            Image.new("RGB", (8, 8), (12 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"c{i}", "label": i % 2})
    args = ["--dataset", str(write_table(tmp_path, rows)), "--heldout_steps", "0", "--max_train_steps", "2"]
    for workers in ("0", "1"):
        with pytest.raises(SystemExit) as e:
            run(tmp_path, *args, "--dataloader_workers", workers, out=f"w{workers}")
        err = capsys.readouterr().err.strip().splitlines()
        # the error's own message, as without workers: not the worker's traceback that torch passes on
        one_line = err[-1].startswith("error: 10 corrupt images in a row (last: row ")
        assert e.value.code == 2 and one_line, err[-3:]
        assert not any(line.startswith(("Original Traceback", "  File ")) for line in err), workers
        # the workers ignore SIGTERM: stopped on the way out, not left for multiprocessing's exit handler, which
        # would wait for them forever (the error's traceback, still held here, keeps their DataLoader alive)
        assert not multiprocessing.active_children(), workers
    # as a command, the run ends (it hung after printing the error)
    cli = subprocess.run(
        [sys.executable, "train_kto.py", *TINY, "--output_dir", str(tmp_path / "cli"), *args]
        + ["--dataloader_workers", "1"],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 2 and "error: 10 corrupt images in a row" in cli.stderr, cli.stderr[-2000:]


def test_the_corrupt_image_count_goes_on_after_a_resume(tmp_path, monkeypatch, capsys):
    from PIL import Image

    # 4 of 20 images cannot be decoded; the 1% rule judges once 32 images were read (4 steps of 8)
    rows = []
    for i in range(20):
        name = f"{i}.png"
        if i < 4:
            (tmp_path / name).write_bytes(b"not an image")
        else:
            Image.new("RGB", (8, 8), (12 * i, 0, 0)).save(tmp_path / name)
        rows.append({"image": name, "caption": f"c{i}", "label": i % 2})
    args = [
        "--dataset",
        str(write_table(tmp_path, rows)),
        "--heldout_steps",
        "0",
        "--checkpointing_steps",
        "2",
    ]
    monkeypatch.setattr(data, "MIN_IMAGES_TO_JUDGE", 32)

    def stopped(*more, out):
        with pytest.raises(SystemExit) as e:
            run(tmp_path, *args, *more, out=out)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "could not be decoded" in err, err
        return err.strip().splitlines()[-1]

    whole = stopped("--max_train_steps", "8", out="whole")
    run(tmp_path, *args, "--max_train_steps", "2", out="split")
    # the resumed run counts on from the checkpoint's counts: it stops where the whole run did, with its counts
    assert stopped("--max_train_steps", "8", "--resume", "latest", out="split") == whole
    steps = lambda out: [
        json.loads(x)["step"] for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps("split") == steps("whole")
    # a checkpoint of an older version, without the counts, resumes with them at 0
    run(tmp_path, *args, "--max_train_steps", "2", out="old")
    state_file = tmp_path / "old" / "checkpoint-2" / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save({k: v for k, v in state.items() if k not in ("n_corrupt", "n_seen")}, state_file)
    monkeypatch.setattr(data, "MIN_IMAGES_TO_JUDGE", 10**6)
    run(tmp_path, *args, "--max_train_steps", "3", "--resume", "latest", out="old")


@pytest.mark.parametrize(
    "case",
    [
        "one_class",
        "empty_captions",
        "batch_of_one",
        "foreign_output_dir",
        "older_checkpoint_than_the_output_dirs",
        "resume_into_another_runs_folder",
        "resume_with_no_step_left",
        "bad_resume",
        "no_such_model_folder",
        "not_a_pipeline_folder",
        "sdxl_refiner_folder",
        "sdxl_refiner_on_the_hub",
        "unreachable_hub_model",
        "zero_checkpointing_steps",
        "ratio_above_one",
        "nan_ratio",
        "infinite_learning_rate",
        "negative_seed",
    ],
)
def test_bad_input_is_refused_before_training(tmp_path, case, capsys, monkeypatch):
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
    if case == "older_checkpoint_than_the_output_dirs":
        (tmp_path / "out" / "checkpoint-7").mkdir(parents=True)
    if case == "resume_into_another_runs_folder":  # no checkpoint there yet, but another run's record
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "run.json").write_text("{}")
    # a checkpoint (its step and the files that find_resume looks for) in this folder, to resume
    folder = dict(
        older_checkpoint_than_the_output_dirs="other",
        resume_into_another_runs_folder="other",
        resume_with_no_step_left="out",
    ).get(case)
    if folder:
        other = tmp_path / folder / "checkpoint-5"
        other.mkdir(parents=True)
        torch.save(dict(step=5), other / "training_state.pt")
        for name in ("optimizer.pt", "data.json"):
            (other / name).write_text("{}")
        args += ["--resume", str(other)]
    if case == "resume_with_no_step_left":  # was: no step, "done: .../checkpoint-5", run.json rewritten
        args += ["--max_train_steps", "5"]
    if case == "bad_resume":
        args += ["--resume", str(tmp_path)]
    if case == "no_such_model_folder":
        args += ["--pretrained_model", str(tmp_path / "runs" / "nope")]
    if case == "not_a_pipeline_folder":
        args += ["--pretrained_model", str(tmp_path)]
    refiner = ("unet", "scheduler", "vae", "text_encoder_2", "tokenizer_2")  # and model_index.json
    if case == "sdxl_refiner_folder":
        for part in refiner:
            (tmp_path / "refiner" / part).mkdir(parents=True)
        args += ["--pretrained_model", str(tmp_path / "refiner")]
    if case == "sdxl_refiner_on_the_hub":  # offline: a hand-made hub cache holding its model_index.json
        import huggingface_hub.constants

        snapshot = tmp_path / "hub" / "models--someone--refiner" / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        index = {p: ["diffusers", "X"] for p in refiner} | {
            "text_encoder": [None, None],
            "tokenizer": [None, None],
        }
        (snapshot / "model_index.json").write_text(json.dumps(index))
        (tmp_path / "hub" / "models--someone--refiner" / "refs").mkdir()
        (tmp_path / "hub" / "models--someone--refiner" / "refs" / "main").write_text("0" * 40)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        args += ["--pretrained_model", "someone/refiner"]
    if case == "unreachable_hub_model":  # offline here: the hub cannot be reached, and the cache lacks it
        args += ["--pretrained_model", "nobody-here/no-such-model"]
    if case == "zero_checkpointing_steps":  # was a ZeroDivisionError after the first step
        args += ["--checkpointing_steps", "0"]
    if case == "ratio_above_one":
        args += ["--desirable_ratio", "1.5"]
    if case == "nan_ratio":  # NaN passed the bounds: the sampler then drew undesirable images only
        args += ["--desirable_ratio", "nan"]
    if case == "infinite_learning_rate":
        args += ["--learning_rate", "inf"]
    if case == "negative_seed":  # was a ValueError traceback from numpy
        args += ["--seed", "-1"]
    args += ["--dataset", str(write_table(tmp_path, rows))]
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *args)
    err = capsys.readouterr().err
    expected = {
        "one_class": "--allow_one_class",
        "empty_captions": "10% of the captions are empty",
        "batch_of_one": "--train_batch_size >= 2",
        "foreign_output_dir": "--resume latest",
        "older_checkpoint_than_the_output_dirs": "holds checkpoint-7, newer than this checkpoint (step 5)",
        "resume_into_another_runs_folder": "already holds another run (run.json)",
        "resume_with_no_step_left": "at step 5, so --max_train_steps 5 leaves no step to train",
        "bad_resume": "not a checkpoint folder",
        "no_such_model_folder": "no such file or folder",
        "not_a_pipeline_folder": "no unet/, scheduler/",
        "sdxl_refiner_folder": "as an SDXL refiner: not supported",
        "sdxl_refiner_on_the_hub": "someone/refiner: a pipeline with text_encoder_2 but no text_encoder",
        "unreachable_hub_model": "hf download",
        "zero_checkpointing_steps": "--checkpointing_steps 0: must be at least 1",
        "ratio_above_one": "--desirable_ratio 1.5: must be in [0, 1]",
        "nan_ratio": "--desirable_ratio nan: must be a finite number",
        "infinite_learning_rate": "--learning_rate inf: must be a finite number",
        "negative_seed": "--seed -1: must be at least 0",
    }[case]
    assert e.value.code == 2 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing started
    if case == "one_class":  # allowed on request
        run(tmp_path, *args, "--allow_one_class", out="allowed")


TORCHRUN = ["--standalone", "--nproc_per_node", "2"]


def test_two_ranks_save_score_and_sample_at_the_same_step(tmp_path):
    """The fast layer's one torchrun run: rank-0-only work (card, curves, images) beside every rank's
    collectives."""
    out = tmp_path / "out"
    # a save at a step without a held-out score, then one with it
    at = ("--checkpointing_steps", "1", "--heldout_steps", "2", "--validation_steps", "2")
    run_script(tmp_path, "", "--max_train_steps", "2", *at, "--output_dir", str(out), torchrun=TORCHRUN)
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    cards = [(out / f"checkpoint-{step}" / "README.md").read_text() for step in (1, 2)]
    assert "## Held-out reward" not in cards[0] and "## Held-out reward at step 2" in cards[1]
    assert (out / "validation" / "step-000002.png").exists() and (out / "curves.png").exists()
    # a second launch while another run holds the folder: both ranks stop at start-up with the message (torchrun's
    # failure summary gives each rank's error; a rank left going on would fail in its next collective instead)
    # and rank 0 says it
    import fcntl

    with open(out / ".lock", "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        proc = run_script(tmp_path, "", "--output_dir", str(out), torchrun=TORCHRUN, check=False)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0 and said.count("error: --output_dir") == 1, said[-3000:]
    assert said.count("DataError: --output_dir") == 2 and "another run is writing there" in said, said[-3000:]


@pytest.mark.slow
def test_two_ranks_stay_in_sync_and_survive_a_killed_rank(tmp_path):
    record = """
        real = train_kto.kto_loss
        zs = []
        import inspect
        def kto_loss(*a, **k):
            zs.append(float(inspect.signature(real).bind(*a, **k).arguments["z"]))
            if os.environ.get("KILL_AT") and int(os.environ["TORCHELASTIC_RESTART_COUNT"]) == 0 \\
                    and os.environ["RANK"] == "1" and len(zs) == int(os.environ["KILL_AT"]):
                os._exit(1)  # a worker dies; torchrun restarts the group, which resumes from the latest checkpoint
            return real(*a, **k)
        train_kto.kto_loss = kto_loss
        steps, all_reduces = [0], []  # the step of each gradient all-reduce (one per DDP bucket)
        real_step = train_kto.kto_step
        def kto_step(*a, **k):
            steps[0] += 1
            return real_step(*a, **k)
        train_kto.kto_step = kto_step
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        def all_reduce(state, bucket):
            all_reduces.append(steps[0])
            return default_hooks.allreduce_hook(None, bucket)
        real_ddp = torch.nn.parallel.DistributedDataParallel
        def ddp(module, *a, **k):
            model = real_ddp(module, *a, **k)
            model.register_comm_hook(None, all_reduce)
            return model
        torch.nn.parallel.DistributedDataParallel = ddp
        real_main = train_kto.main
        def main(argv):
            policy = real_main(argv)
            out = os.path.join(argv[argv.index("--output_dir") + 1], "rank%s.json" % os.environ["RANK"])
            json.dump({"z": zs, "sum": sum(p.double().sum().item() for p in policy.parameters()),
                       "all_reduces": all_reduces}, open(out, "w"))
        train_kto.main = main
    """
    args = ("--max_train_steps", "5", "--checkpointing_steps", "2", "--resume", "latest")
    run_script(tmp_path, record, *args, "--output_dir", str(tmp_path / "whole"), torchrun=TORCHRUN)
    r0, r1 = (json.loads((tmp_path / f"whole/rank{r}.json").read_text()) for r in (0, 1))
    # bitwise: both ranks get the same all-reduced sums (z, gradients) and then run the identical computation on them
    assert r0 == r1 and len(r0["z"]) == 5 and max(r0["z"]) > 0  # z and weights identical on both ranks
    run_json = json.loads((tmp_path / "whole/run.json").read_text())
    assert run_json["world_size"] == 2
    # with gradient accumulation DDP skips the all-reduce on the inner passes (no_sync): still in sync
    run_script(
        tmp_path,
        record,
        *args,
        "--gradient_accumulation_steps",
        "2",
        "--train_batch_size",
        "4",
        "--output_dir",
        str(tmp_path / "acc"),
        torchrun=TORCHRUN,
    )
    a0, a1 = (json.loads((tmp_path / f"acc/rank{r}.json").read_text()) for r in (0, 1))
    # bitwise, as above
    assert a0 == a1
    # 2 passes per step, both with the step's one z
    assert a0["z"][0::2] == a0["z"][1::2] and len(a0["z"]) == 10
    # the gradients are all-reduced once per step, in the last pass: as many all-reduces, at each step, as without
    # accumulation (all-reducing every pass gives the same sums, so only the count shows it)
    assert a0["all_reduces"] == r0["all_reduces"] and set(r0["all_reduces"]) == {1, 2, 3, 4, 5}

    os.environ["KILL_AT"] = "4"
    try:
        proc = run_script(
            tmp_path,
            record,
            *args,
            "--output_dir",
            str(tmp_path / "killed"),
            torchrun=["--max-restarts", "1", *TORCHRUN],
        )
    finally:
        del os.environ["KILL_AT"]
    assert "resuming from" in proc.stdout + proc.stderr
    # the restarted ranks redo steps 3-5 from checkpoint-2: the identical computation, bit for bit (1e-6: headroom)
    assert (
        max_diff(weights(tmp_path / "whole/checkpoint-5"), weights(tmp_path / "killed/checkpoint-5")) <= 1e-6
    )


# Each rank appends the dataset indices its sampler yields to $DRAWS<rank> (the DataLoader has no workers: it takes
# exactly one batch of indices per step)
RECORD_DRAWS = """
    class Recorded(train_kto.DesirableRatioSampler):
        def __iter__(self):
            for i in super().__iter__():
                with open(os.environ["DRAWS"] + os.environ.get("RANK", "0"), "a") as f:
                    f.write(f"{i}\\n")
                yield i
"""


@pytest.mark.slow
def test_a_checkpoint_of_one_rank_resumes_on_two(tmp_path, capsys, monkeypatch):
    namespace = dict(train_kto=train_kto, os=os)
    exec(textwrap.dedent(RECORD_DRAWS), namespace)
    monkeypatch.setattr(train_kto, "DesirableRatioSampler", namespace["Recorded"])
    draws = lambda name, rank=0: [int(i) for i in (tmp_path / f"{name}{rank}").read_text().split()]
    monkeypatch.setenv("DRAWS", str(tmp_path / "whole"))
    run(tmp_path, "--max_train_steps", "4", out="whole")  # the images of an uninterrupted run, 8 per step
    monkeypatch.setenv("DRAWS", str(tmp_path / "first"))
    run(tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2")
    # as saved before checkpoints counted the images drawn
    state = tmp_path / "out" / "checkpoint-2" / "training_state.pt"
    torch.save({k: v for k, v in torch.load(state, weights_only=True).items() if k != "n_drawn"}, state)
    # 1 rank x 8 images, then 2 x 4: the same global batch split otherwise
    monkeypatch.setenv("DRAWS", str(tmp_path / "second"))
    proc = run_script(
        tmp_path,
        RECORD_DRAWS + "    train_kto.DesirableRatioSampler = Recorded\n",
        "--max_train_steps",
        "3",
        "--resume",
        "latest",
        "--output_dir",
        str(tmp_path / "out"),
        "--train_batch_size",
        "4",
        torchrun=TORCHRUN,
    )
    # one saved generator for two ranks: the run goes on (each rank seeds a new stream), and rank 0 says so, once
    said = proc.stdout + proc.stderr
    saved_as = (
        "was saved by 1 rank(s) x 8 x 1 = global batch 8, resuming as 2 rank(s) x 4 x 1 = global batch 8"
    )
    assert said.count(saved_as) == 1, said
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    launches = json.loads((tmp_path / "out" / "run.json").read_text())["launches"]
    assert [r["step"] for r in rows] == [1, 2, 3] and [x["world_size"] for x in launches] == [1, 2]
    # the images are the uninterrupted run's: steps 1-2, then step 3 split over the two ranks (none again)
    whole = draws("whole")
    assert draws("first") == whole[:16] and draws("second", 0) + draws("second", 1) == whole[16:24]
    # back on one rank with the same per-rank batch: the global batch halves, which is allowed and said
    capsys.readouterr()
    monkeypatch.setenv("DRAWS", str(tmp_path / "third"))
    run(tmp_path, "--max_train_steps", "4", "--resume", "latest", "--train_batch_size", "4")
    assert (
        "resuming as 1 rank(s) x 4 x 1 = global batch 4 (at the same learning rate)"
        in capsys.readouterr().out
    )
    # the stream's next 4 images, and after a resume the next 4 (the checkpoint counts the images drawn: 3 steps of
    # 8, 1 of 4)
    monkeypatch.setenv("DRAWS", str(tmp_path / "fourth"))
    run(tmp_path, "--max_train_steps", "5", "--resume", "latest", "--train_batch_size", "4")
    assert draws("third") == whole[24:28] and draws("fourth") == whole[28:32]


def test_a_resume_may_split_the_global_batch_otherwise_but_not_change_it(tmp_path, capsys):
    run(tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "2")
    # 8 images per step as 4 x 2 accumulation (after running out of memory, say): allowed, and said
    _, rows = run(
        tmp_path,
        "--max_train_steps",
        "3",
        "--resume",
        "latest",
        "--train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "2",
    )
    assert [r["step"] for r in rows] == [1, 2, 3]
    said = capsys.readouterr().out
    assert (
        "saved by 1 rank(s) x 8 x 1 = global batch 8, resuming as 1 rank(s) x 4 x 2 = global batch 8" in said
    )
    # 4 images per step on the same rank would change the recipe's batch: refused, naming the flag
    with pytest.raises(SystemExit):
        run(tmp_path, "--max_train_steps", "4", "--resume", "latest", "--train_batch_size", "2")
    assert "--train_batch_size (4 there, 2 here)" in capsys.readouterr().err


def test_sft_trains_on_desirable_images_with_the_denoising_loss(tmp_path):
    _, rows = run(tmp_path, "--max_train_steps", "2", "--objective", "sft")
    assert all(r["desirable_frac"] == 1 for r in rows)
    # the same float32 sum of the same 8 errors (divided by 8, exactly, for the loss): 1e-6 is headroom
    assert all(r["loss"] == pytest.approx(r["policy_err"], rel=1e-6) for r in rows)
    config = json.loads((tmp_path / "out" / "run.json").read_text())["config"]
    # no reference point: the step skips z's UNet forwards (with kl_mismatched, z > 0 from step 2)
    assert config["desirable_ratio"] == 1.0 and config["reference_point"] == "zero"
    assert all(r["z"] == 0 for r in rows)
    # no mismatched partner needed, so a batch of one is fine (KTO's default kl_mismatched refuses it); nor
    # are beta and the loss weights, so their zeros, which KTO refuses, are no reason to refuse SFT
    assert (
        train_kto.parse_config([*TINY, "--objective", "sft", "--train_batch_size", "1"]).train_batch_size == 1
    )
    assert train_kto.parse_config([*TINY, "--objective", "sft", "--beta", "0", "--lambda_d", "0"]).beta == 0
    # the model card names the SFT baseline and lists no KTO-only setting
    card = (tmp_path / "out" / "checkpoint-2" / "README.md").read_text()
    assert "fine-tuned with the paper's SFT baseline" in card and "Diffusion-KTO (Li" not in card
    assert "| `beta` |" not in card and "| `learning_rate` |" in card


def test_a_run_that_does_less_than_it_seems_says_so_and_ties_count_half(tmp_path, capsys):
    # lr 0: the policy stays the reference, so every reward ties with z (0) and with the held-out 0
    _, rows = run(
        tmp_path,
        "--max_train_steps",
        "2",
        "--learning_rate",
        "0",
        "--lr_warmup_steps",
        "4",
        "--heldout_steps",
        "1",
    )
    out = capsys.readouterr().out
    assert "warning: --learning_rate 0: the weights never change" in out
    assert "warning: --lr_warmup_steps 4 > --max_train_steps 2: the learning rate reaches only 50%" in out
    assert all(r["accuracy"] == 0.5 and r["heldout_accuracy"] == 0.5 for r in rows), rows
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    # what the run trained on and in, as it was, not as the flags read
    assert run_json["num_heldout"] > 0 and f"({run_json['num_heldout']} held out)" in out
    assert run_json["label_policy"] is None and run_json["launches"][0]["precision"] == "float32"
    assert [w.split(":")[0] for w in run_json["launches"][0]["warnings"]] == [
        "--learning_rate 0",
        "--lr_warmup_steps 4 > --max_train_steps 2",
    ]
    card = (tmp_path / "out" / "checkpoint-2" / "README.md").read_text()
    assert f"of which {run_json['num_heldout']} held out" in card and "label policy" not in card
    # held-out images that no step scores
    cfg = train_kto.parse_config([*TINY, "--max_train_steps", "5", "--heldout_steps", "6"])
    (said,) = reports.start_warnings(cfg, 9, native=32)
    assert said.startswith("9 images are held out of training (--heldout_images) but never scored")
    assert not reports.start_warnings(dataclasses.replace(cfg, heldout_steps=5), 9, native=32)
    # training at another size than the base model's (SDXL at the default 512): validation and eval sample at
    # its own, read from its configs
    native = encoders.native_resolution(cfg.pretrained_model, cfg.pretrained_vae)
    (said,) = reports.start_warnings(dataclasses.replace(cfg, heldout_steps=5, resolution=16), 9, native)
    assert native == 32 and said.startswith("--resolution 16: the base model makes 32 px images")


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
    # the refusals wrote nothing
    assert record["config"]["max_train_steps"] == 2 and len(record["launches"]) == 1
    _, rows = run(tmp_path, "--max_train_steps", "3", "--resume", "latest", "--checkpointing_steps", "5")
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [launch["start_step"] for launch in record["launches"]] == [0, 2]
    assert record["config"]["max_train_steps"] == 3
    assert [r["step"] for r in rows] == [1, 2, 3]
    # each launch's command line is the one main() was given (here by a test: not pytest's own)
    flags = [*TINY, "--output_dir", str(tmp_path / "out")]
    assert record["launches"][1]["argv"] == [
        "train_kto.py",
        *flags,
        *"--max_train_steps 3 --resume latest".split(),
        "--checkpointing_steps",
        "5",
    ]
    # a run.json that cannot be read: the resume stops and says so, the record is not overwritten
    (tmp_path / "out" / "run.json").write_text('{"config": {}, "launches": [')
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--max_train_steps", "4", "--resume", "latest")
    err = capsys.readouterr().err
    assert (
        e.value.code == 2 and "run.json: not a run record that can be read" in err and "Traceback" not in err
    )
    assert (tmp_path / "out" / "run.json").read_text() == '{"config": {}, "launches": ['
    # one that is gone: the resume's launch says that the earlier ones are not on record
    (tmp_path / "out" / "run.json").unlink()
    run(tmp_path, "--max_train_steps", "4", "--resume", "latest")
    (launch,) = json.loads((tmp_path / "out" / "run.json").read_text())["launches"]
    assert launch["start_step"] == 3 and launch["earlier_launches_lost"] is True


def test_resume_knows_the_data_by_content_not_by_path(tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(fixtures.tiny_dataset_path().parent, tmp_path / "mydata")
    (tmp_path / "sub").mkdir()
    (tmp_path / "model").symlink_to(fixtures.tiny_model_path())
    base = ["--tiny", "--validation_steps", "0", "--checkpointing_steps", "2"]
    # the model, the data and the run folder, named relative to the working directory
    launch = lambda data, out, steps, *a: train_kto.main(
        [*base, "--pretrained_model", str(Path(data).parent.parent / "model"), "--dataset", data]
        + ["--output_dir", out, "--max_train_steps", str(steps), *a]
    )
    metrics = lambda out: (tmp_path / out / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "images_per_sec"} for x in lines]
    monkeypatch.chdir(tmp_path)
    launch("mydata/data.csv", "whole", 6)
    launch("mydata/data.csv", "runs/B", 2)
    # The same files named from another working directory: the same run
    monkeypatch.chdir(tmp_path / "sub")
    launch("../mydata/data.csv", "../runs/B", 4, "--resume", "latest")
    # A run folder copied elsewhere resumes from where it lies
    shutil.copytree(tmp_path / "runs/B", tmp_path / "runs/Bcopy")
    launch("../mydata/data.csv", "../runs/Bcopy", 6, "--resume", "latest")
    # the resumed steps are the identical computation (restored weights, optimizer and generators): bit for bit
    assert strip(metrics("runs/Bcopy")) == strip(metrics("whole"))
    saved = json.loads((tmp_path / "runs/B/checkpoint-4/data.json").read_text())
    assert json.loads((tmp_path / "runs/B/run.json").read_text())["fingerprint"] == saved
    # Four labels flipped in place, same path: refused, naming what changed, and not recorded as a launch
    table = pd.read_csv(tmp_path / "mydata/data.csv")
    table.loc[:3, "label"] = 1 - table.loc[:3, "label"].astype(int)
    table.to_csv(tmp_path / "mydata/data.csv", index=False)
    before = (tmp_path / "runs/B/run.json").read_text()
    with pytest.raises(SystemExit) as e:
        launch("../mydata/data.csv", "../runs/B", 8, "--resume", "latest")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "changed labels (" in err and "Traceback" not in err, err
    assert (tmp_path / "runs/B/run.json").read_text() == before


PRE_REDESIGN = "4461090"  # the last commit before the modules were split: the same metrics


@pytest.mark.slow
def test_same_metrics_and_weights_as_before_the_redesign(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(HERE), "archive", PRE_REDESIGN], capture_output=True)
    if archive.returncode:
        pytest.skip(f"commit {PRE_REDESIGN} is not in this checkout's history")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    # Learning rate 0: every step starts from the base weights in both codes, so Adam cannot amplify rounding. The two
    # codes need not batch their UNet calls alike (the code before kto_step did not: its step-1 loss was 0.5 + 8e-7
    # at one thread, 0.5 at two), so the runs can differ in float32 rounding, bounded as in
    # test_gradient_accumulation_equals_the_whole_batch: E_TOL on the errors, R_TOL = 2 * E_TOL * max e (e < 2
    # here) on z and the rewards, beta / 2 * R_TOL on the loss, 2 * beta * R_TOL + 2 * E_TOL on the gradient norm.
    # Not the accuracy: at lr 0 every reward ties with z up to rounding, so a win is rounding's call.
    args = ["--max_train_steps", "3", "--learning_rate", "0", "--caption_dropout", "0.5"]
    e_tol, beta = 300 * U, train_kto.TINY["beta"]
    r_tol = 2 * e_tol * 2
    tolerance = dict(
        policy_err=dict(rel=e_tol, abs=0),
        ref_err=dict(rel=e_tol, abs=0),
        z=dict(rel=0, abs=r_tol),
        reward_desirable=dict(rel=0, abs=r_tol),
        reward_undesirable=dict(rel=0, abs=r_tol),
        loss=dict(rel=0, abs=beta / 2 * r_tol),
        grad_norm=dict(rel=2 * beta * r_tol + 2 * e_tol, abs=0),
    )
    variants = (
        [],
        ["--reference_point", "batch_mean", "--utility", "loss_averse", "--no-random_flip"],
        ["--objective", "sft"],
        ["--train_batch_size", "4", "--gradient_accumulation_steps", "2"],
        ["--reference_point", "batch_mean", "--gradient_accumulation_steps", "2", "--cache_latents"],
    )
    for n, extra in enumerate(variants):
        out = tmp_path / f"old-{n}"
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {str(old)!r}); import train_kto; "
                "train_kto.main(sys.argv[1:])",
                *TINY[:-2],
                *args,
                *extra,
                "--output_dir",
                str(out),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            cwd=old,
            timeout=600,
        )
        # the code before had no held-out set: every image trained on, no held-out columns
        _, rows = run(tmp_path, *args, *extra, "--heldout_steps", "0", out=f"new-{n}")
        before = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        for a, b in zip(rows, before, strict=True):
            assert set(a) == set(b), set(a) ^ set(b)
            for k in b:
                # a class absent from the step's batch: null now, 0.0 before
                absent = dict(reward_desirable=0.0, reward_undesirable=1.0).get(k) == b["desirable_frac"]
                if absent:
                    assert a[k] is None and b[k] == 0.0, (n, k, a[k], b[k])
                elif k in tolerance:
                    assert a[k] == pytest.approx(b[k], **tolerance[k]), (n, k, a[k], b[k])
                elif k not in ("images_per_sec", "accuracy"):
                    # exact: counts, the step, the schedule's learning rate
                    assert a[k] == b[k], (n, k, a[k], b[k])


def test_help_shows_the_tiny_defaults(capsys):
    with pytest.raises(SystemExit):
        train_kto.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "optimizer steps (default: 10000; --tiny: 200)" in text and "(default: 5000.0; --tiny: 200.0)" in text
    )
    # each flag's help is the docstring below its Config field, whitespace joined
    assert "stop after this many consecutive steps with a" in text and "(each is skipped: no update" in text
    import eval as evaluation

    for config in (train_kto.Config, evaluation.Config):
        assert set(utils.field_help(config)) == {f.name for f in dataclasses.fields(config)}


def test_long_captions_are_counted_and_warned_about(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    long = (
        "a red circle on a white background next to a blue square on a black background"  # > 16 tiny tokens
    )
    rows = [{"image": "a.png", "caption": long if i < 3 else f"c{i}", "label": i % 2} for i in range(8)]
    run(tmp_path, "--max_train_steps", "1", "--dataset", str(write_table(tmp_path, rows)))
    assert (
        "warning: 1 of 7 distinct captions are longer than the text encoder's 16 tokens"
        in capsys.readouterr().err
    )


@pytest.mark.slow
def test_torchrun_failure_is_reported_once_and_in_the_summary(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "caption": f"c{i}", "label": 1} for i in range(4)]  # one class: refused
    proc = run_script(
        tmp_path,
        "",
        "--dataset",
        str(write_table(tmp_path, rows)),
        "--output_dir",
        str(tmp_path / "out"),
        torchrun=TORCHRUN,
        check=False,
    )
    message = "--allow_one_class to train anyway"
    assert proc.returncode != 0 and proc.stderr.count("error: --dataset") == 1, proc.stderr[-3000:]
    summary = proc.stderr[proc.stderr.index("Root Cause") :]
    # torchrun's failure summary carries the message, not only an exit code
    assert message in summary, summary


# float32's unit roundoff: every float32 operation is exact up to a relative error of at most U
U = 2.0**-24


def record_steps(monkeypatch, replay=None):
    """Record each step's kto_step statistics and the gradients it left (before clipping). With `replay` (another
    run's record), overwrite this run's gradients with that run's after recording them, so both runs take the
    identical optimizer step and every step starts from identical weights and optimizer state."""
    steps = []
    real_step, real_clip = train_kto.kto_step, torch.nn.utils.clip_grad_norm_

    def kto_step(*a, **k):
        loss, stats = real_step(*a, **k)
        steps.append(dict(loss=loss.item(), **{n: v.detach().clone() for n, v in stats.items()}))
        return loss, stats

    def clip_grad_norm_(params, *a, **k):
        params = list(params)
        steps[-1]["grads"] = [p.grad.detach().clone() for p in params]
        if replay is not None:
            for p, g in zip(params, replay[len(steps) - 1]["grads"], strict=True):
                p.grad.copy_(g)
        return real_clip(params, *a, **k)

    monkeypatch.setattr(train_kto, "kto_step", kto_step)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_grad_norm_)
    return steps


@pytest.mark.parametrize("reference_point", ["kl_mismatched", "batch_mean"])
def test_gradient_accumulation_equals_the_whole_batch(tmp_path, monkeypatch, reference_point):
    """The paper's batch 8 on one GPU: 4 accumulated passes of 2 give the step of one pass of 8: the same loss, z,
    rewards, accuracy and gradients, at every step, each step from identical weights and optimizer state."""
    args = ["--max_train_steps", "3", "--learning_rate", "1e-3", "--reference_point", reference_point]
    want = record_steps(monkeypatch)
    _, want_rows = run(tmp_path, *args, "--train_batch_size", "8", out="whole")
    monkeypatch.undo()
    # The accumulated run's optimizer gets the whole batch's gradients (after its own were recorded): Adam divides
    # each gradient by its own running scale, so it would turn a 1e-7 rounding difference in a near-zero component
    # into a step of up to lr, and the runs would drift apart by how the CPU rounds, not by what accumulation does
    got = record_steps(monkeypatch, replay=want)
    _, rows = run(tmp_path, *args, "--train_batch_size", "2", "--gradient_accumulation_steps", "4", out="acc")

    # The tolerances, derived. U = 2**-24 is float32's unit roundoff. Both runs see bitwise identical data, draws
    # and weights; they differ only in the order of float32 sums: the UNets' kernels run on batches of 2 instead
    # of 8, and the gradient is summed in 4 parts. A float32 sum of n terms, reordered, moves by about
    # sqrt(n) * U * sum|terms| (independent roundings: Higham & Mary 2019; the worst case, n * U, is not reached).
    # - e, a sample's denoising error (~1): the UNet's 147 matrix products (convolutions, linear layers, attention)
    #   reduce over K_l terms each, sum K_l = 17,724 (the widest: 1152, a 3x3 convolution of 128 channels), and the
    #   errors add up over the layers like the roundings: sqrt(sum K_l) U = 133 U per run, then the mean over
    #   256 squares (16 U); two runs: relative E_TOL = 300 U = 1.8e-5 (measured: at most 4 U).
    # - r = e_ref - e_policy, z = max(0, mean of rewards), the mean rewards: absolute R_TOL = 2 * E_TOL * max e
    #   (z and the means add B = 8 terms: 3 U more, inside the budget).
    # - loss = mean of lambda * sigmoid(-x), x = w * beta * (r - z): |dx| <= beta * (|dr| + |dz|) <= 2 * beta * R_TOL
    #   and |d sigmoid(-x) / dx| <= 1/4, so |d loss| <= lambda * beta / 2 * R_TOL (lambda = 1 here).
    # - gradients: each sample's gradient is lambda * beta / B * sigmoid'(x) * grad(e_policy); sigmoid'(x) moves by
    #   at most |dx| relatively (|sigmoid''| <= sigmoid'), grad(e_policy) by E_TOL like e, and the sum over the
    #   batch (8 samples x 64 latent positions: sqrt(512) U) by less: ||dg|| <= (2 * beta * R_TOL + 2 * E_TOL)
    #   * ||g||, up to how far the samples' gradients cancel in g (they do not, here: measured ||dg|| / ||g|| is
    #   at most 1.3e-5, a thousand times inside).
    # Accumulation done wrong moves these by far more: z from one micro-batch by 3e-3 to 1e-2 (60 R_TOL or more),
    # a micro-loss over the micro-batch by 4x, the last micro-batch's loss or errors by 1e-2 or more.
    e_tol, beta = 300 * U, train_kto.TINY["beta"]
    norm = lambda grads: torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in grads])
    ).item()
    for step, (a, b, ra, rb) in enumerate(zip(got, want, rows, want_rows, strict=True), start=1):
        if step == 1:  # policy == ref before any update: every reward and z are exactly 0 in both runs
            assert not a["r"].any() and not b["r"].any() and a["z"].item() == b["z"].item() == 0
        else:  # later steps start from weights the update moved: z > 0, so a wrong z shows
            assert b["z"].item() > 0
        r_tol = 2 * e_tol * max(b["policy_err"].max().item(), b["ref_err"].max().item())
        # E_TOL on each sample's errors and their means (see above)
        for k in ("policy_err", "ref_err"):
            torch.testing.assert_close(
                a[k], b[k], rtol=e_tol, atol=0, msg=lambda m, s=step, k=k: f"step {s} {k}: {m}"
            )
            assert ra[k] == pytest.approx(rb[k], rel=e_tol, abs=0), (step, k, ra[k], rb[k])
        # R_TOL on each reward, z and the mean rewards
        torch.testing.assert_close(
            a["r"], b["r"], rtol=0, atol=r_tol, msg=lambda m, s=step: f"step {s} r: {m}"
        )
        for k in ("z", "reward_desirable", "reward_undesirable"):
            assert ra[k] == pytest.approx(rb[k], rel=0, abs=r_tol), (step, k, ra[k], rb[k])
        # lambda * beta / 2 * R_TOL on the loss
        assert ra["loss"] == pytest.approx(rb["loss"], rel=0, abs=beta / 2 * r_tol), (
            step,
            ra["loss"],
            rb["loss"],
        )
        # a sample's win (w * (r - z) > 0) flips only within 2 * R_TOL of z: none is that close, so the same count
        assert step == 1 or (b["r"] - b["z"]).abs().min().item() > 2 * r_tol
        assert ra["accuracy"] == rb["accuracy"], (step, ra["accuracy"], rb["accuracy"])
        # (2 * beta * R_TOL + 2 * E_TOL) * ||g|| on the gradients, in norm
        g_tol = 2 * beta * r_tol + 2 * e_tol
        diff = norm([g - h for g, h in zip(a["grads"], b["grads"], strict=True)])
        assert diff <= g_tol * norm(b["grads"]), (step, diff / norm(b["grads"]), g_tol)


@pytest.mark.slow
def test_validation_grids_curves_tracker_and_model_cards(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    from diffusers import StableDiffusionPipeline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "1e-3"]
    plain, _ = run(tmp_path, *args, out="plain")
    calls, sample = [], StableDiffusionPipeline.__call__
    monkeypatch.setattr(
        StableDiffusionPipeline, "__call__", lambda self, *a, **k: calls.append(k) or sample(self, *a, **k)
    )
    watched, rows = run(
        tmp_path,
        *args,
        "--validation_steps",
        "2",
        "--report_to",
        "tensorboard",
        "--validation_guidance",
        "2.5",
        "--validation_prompts",
        "a red circle on a white background|a blue square on a black bg",
        out="watched",
    )
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
    # tensorboard stores float32: 6e-8 of rounding, inside approx's default rel 1e-6
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in rows])
    assert len(events.Images("validation")) == 3
    (out / "curves.png").unlink()  # --plot redraws it from metrics.jsonl alone
    train_kto.main(["--plot", str(out)])
    assert (out / "curves.png").exists() and "curves.png" in capsys.readouterr().out


@pytest.mark.slow
def test_a_log_file_gets_plain_progress_lines_and_no_warnings(tmp_path):
    """stderr redirected to a file: no carriage-return progress bars, no notices a user cannot act on."""
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "train_kto.py"),
            *TINY,
            "--max_train_steps",
            "2",
            "--validation_steps",
            "2",
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr and "torchvision" not in proc.stderr and "Warning" not in proc.stderr, (
        proc.stderr
    )
    assert "kto: 2/2 steps" in proc.stderr
