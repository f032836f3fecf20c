"""Tests of train_kto.py: the loss and reference point by hand and by invariants, then tiny end-to-end runs.

Run: python -m pytest -q   (offline; builds the tiny model once into $DIFFUSION_KTO_CACHE or ~/.cache)
"""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train_kto
import fixtures
import utils
from train_kto import DesirableRatioSampler, augment, kto_loss, mismatched_indices, reference_point

os.environ.setdefault("HF_HUB_OFFLINE", "1")
UTILITIES = ("kahneman_tversky", "loss_averse", "risk_seeking")
HERE = Path(__file__).parent
# --tiny with the random-weight tiny model and its small CSV dataset (fast); --tiny alone trains on the tiny
# world (tiny_world.py), which test_world.py covers
TINY = ["--tiny", "--pretrained_model", str(fixtures.tiny_model_path()), "--dataset", str(fixtures.tiny_dataset_path())]


# ---------------------------------------------------------------------------------------------------
# The loss

def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def by_hand(policy_err, ref_err, desirable, beta, z, utility, lambda_d, lambda_u):
    """An independent, scalar transcription of lambda_y * (1 - U(w * beta * (r - z)))."""
    out = []
    for p, q, d in zip(policy_err, ref_err, desirable):
        x = (1 if d else -1) * beta * ((q - p) - z)
        u = {"kahneman_tversky": sigmoid(x), "loss_averse": math.log(sigmoid(x)),
             "risk_seeking": -math.log(sigmoid(-x))}[utility]
        out.append((lambda_d if d else lambda_u) * (1 - u))
    return out


def test_hand_computed_values():
    # r = [0.1, -0.1]; x = w * beta * (r - z) = [+10 * 0.05, -10 * (-0.15)] = [0.5, 1.5]
    p, q, d = torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.2]), torch.tensor([True, False])
    expected = {
        "kahneman_tversky": [1 - 1 / (1 + math.exp(-0.5)), 1 - 1 / (1 + math.exp(-1.5))],
        "loss_averse": [1 + math.log(1 + math.exp(-0.5)), 1 + math.log(1 + math.exp(-1.5))],
        "risk_seeking": [1 - math.log(1 + math.exp(0.5)), 1 - math.log(1 + math.exp(1.5))],
    }
    for utility, values in expected.items():
        got = kto_loss(p, q, d, beta=10.0, z=0.05, utility=utility, lambda_d=2.0, lambda_u=3.0)
        torch.testing.assert_close(got, torch.tensor([2 * values[0], 3 * values[1]]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("utility", UTILITIES)
def test_parity_with_independent_transcription(utility):
    g = torch.Generator().manual_seed(1)
    p, q = torch.rand(64, generator=g, dtype=torch.float64), torch.rand(64, generator=g, dtype=torch.float64)
    d = torch.rand(64, generator=g) < 0.6
    got = kto_loss(p, q, d, beta=3.0, z=0.02, utility=utility, lambda_d=1.5, lambda_u=0.7)
    want = by_hand(p.tolist(), q.tolist(), d.tolist(), 3.0, 0.02, utility, 1.5, 0.7)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


def test_policy_equal_to_ref_gives_half_lambda():
    err = torch.rand(6)
    d = torch.tensor([True, False, True, True, False, False])
    loss = kto_loss(err, err.clone(), d, beta=5000.0, z=0.0, lambda_d=2.0, lambda_u=0.5)
    torch.testing.assert_close(loss, torch.where(d, 1.0, 0.25))


@pytest.mark.parametrize("utility", UTILITIES)
def test_gradient_signs(utility):
    """Descending the loss lowers policy_err on desirable samples and raises it on undesirable ones."""
    policy_err = torch.tensor([0.5, 0.5, 0.4, 0.6], requires_grad=True)
    ref_err = torch.tensor([0.5, 0.5, 0.45, 0.55])
    d = torch.tensor([True, False, True, False])
    kto_loss(policy_err, ref_err, d, beta=10.0, z=0.01, utility=utility).sum().backward()
    grad = policy_err.grad
    assert (grad[d] > 0).all() and (grad[~d] < 0).all(), grad  # step -lr*grad: down for d, up for u


@pytest.mark.parametrize("utility", UTILITIES)
def test_stable_in_float32_at_beta_5000(utility):
    policy_err = torch.tensor([0.0, 1.0, 0.0, 1.0], requires_grad=True)
    ref_err = torch.tensor([1.0, 0.0, 1.0, 0.0])  # beta * r = +-5000: exp() of that overflows float32
    d = torch.tensor([True, True, False, False])
    loss = kto_loss(policy_err, ref_err, d, beta=5000.0, z=0.0, utility=utility)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(policy_err.grad).all(), (loss, policy_err.grad)


def test_unknown_utility_names_the_choices():
    with pytest.raises(ValueError, match="kahneman_tversky, loss_averse, risk_seeking"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), 1.0, 0.0, utility="prospect")


# ---------------------------------------------------------------------------------------------------
# The reference point z and the mismatched pairs

def test_reference_point_is_clamped_and_detached():
    r = torch.tensor([-0.3, 0.1], requires_grad=True)
    z = reference_point(r)
    assert z.item() == 0.0 and not z.requires_grad
    r2 = torch.tensor([0.3, 0.1], requires_grad=True)
    z2 = reference_point(r2)
    assert z2.item() == pytest.approx(0.2) and not z2.requires_grad and z2.grad_fn is None


@pytest.mark.parametrize("n", range(2, 10))
def test_mismatched_roll_never_keeps_own_caption(n):
    j = mismatched_indices(n)
    assert sorted(j.tolist()) == list(range(n))            # every caption is used once
    assert (j != torch.arange(n)).all()


def test_mismatched_needs_two_per_rank():
    with pytest.raises(utils.DataError, match="train_batch_size >= 2"):
        mismatched_indices(1)


# ---------------------------------------------------------------------------------------------------
# Data helpers

def test_sampler_ratio_resume_and_seeds():
    desirable = np.array([True] * 10 + [False] * 90)
    stream = DesirableRatioSampler(desirable, 0.8, seed=[0, 0], chunk=64)
    draws = [i for _, i in zip(range(5000), stream)]
    frac = np.mean(desirable[draws])
    assert abs(frac - 0.8) < 0.03                          # gamma, whatever the class sizes
    resumed = DesirableRatioSampler(desirable, 0.8, seed=[0, 0], start=1234, chunk=64)
    assert [i for _, i in zip(range(300), resumed)] == draws[1234:1534]
    other_rank = DesirableRatioSampler(desirable, 0.8, seed=[0, 1], chunk=64)
    assert [i for _, i in zip(range(50), other_rank)] != draws[:50]
    never_d = DesirableRatioSampler(np.array([True, False, True]), 0.0, seed=[0, 0])
    assert {i for _, i in zip(range(50), never_d)} == {1}
    only_u = DesirableRatioSampler(np.zeros(4, bool), 0.8, seed=[0, 0])  # one class: every draw from it
    assert {i for _, i in zip(range(200), only_u)} == {0, 1, 2, 3}


def test_augment_flip_and_caption_dropout():
    pixels = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    caps = ["a", "b"]
    g = torch.Generator().manual_seed(0)
    same, kept = augment(pixels, caps, g, random_flip=False, caption_dropout=0.0)
    assert torch.equal(same, pixels) and kept == caps
    _, dropped = augment(pixels, caps, g, random_flip=False, caption_dropout=1.0)
    assert dropped == ["", ""]
    flips = [augment(pixels, caps, g, random_flip=True, caption_dropout=0.0)[0] for _ in range(40)]
    flipped = [bool(torch.equal(f[0], pixels[0].flip(-1))) for f in flips]
    assert 5 < sum(flipped) < 35 and all(torch.equal(f[0], pixels[0]) or fl for f, fl in zip(flips, flipped))


def write_table(tmp_path, rows, name="data.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_feedback_dataset_shapes_and_bytes(tmp_path):
    from PIL import Image
    Image.new("RGB", (40, 24), (255, 0, 0)).save(tmp_path / "a.png")
    table = utils.load_feedback(write_table(tmp_path, [{"image": "a.png", "caption": "red", "label": "desirable"}]))
    item = utils.FeedbackDataset(table, tmp_path, 16)[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["desirable"]
    assert item["pixel_values"][0].min() == 1.0 and item["pixel_values"][1].max() == -1.0
    buf = (tmp_path / "a.png").read_bytes()
    pd.DataFrame([{"image": buf, "caption": "red", "label": 0}]).to_parquet(tmp_path / "b.parquet")
    table = utils.load_feedback(tmp_path / "b.parquet")
    assert utils.FeedbackDataset(table, tmp_path, 8)[0]["pixel_values"].shape == (3, 8, 8)


@pytest.mark.parametrize("rows, message", [
    ([{"img": "a.png", "caption": "x", "label": 1}], r"missing column\(s\) image"),
    ([{"image": "a.png", "caption": "x", "label": "maybe"}], r"column 'label', row 0 .* 'maybe'"),
    ([{"image": "nope.png", "caption": "x", "label": 1}], r"column 'image', row 0: image file 'nope.png' does not exist"),
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
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    policy, rows = run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2",
                       "--lr_warmup_steps", "4", "--learning_rate", "1e-3")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    unet = UNet2DConditionModel.from_pretrained(out / "checkpoint-4", subfolder="unet")
    for a, b in zip(unet.state_dict().values(), policy.state_dict().values()):
        assert torch.equal(a, b)
    pipe = StableDiffusionPipeline.from_pretrained(fixtures.tiny_model_path(), unet=unet)
    assert pipe.unet is unet
    run_json = json.loads((out / "run.json").read_text())
    table = pd.read_csv(fixtures.tiny_dataset_path())
    assert run_json["num_desirable"] == table.label.sum() and run_json["num_undesirable"] == (table.label == 0).sum()
    assert run_json["config"]["beta"] == train_kto.TINY["beta"] and run_json["world_size"] == 1
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warm-up
    keys = {"loss", "z", "reward_desirable", "reward_undesirable", "accuracy", "policy_err", "ref_err",
            "grad_norm", "lr", "images_per_sec"}
    assert keys <= set(rows[0]) and all(r["z"] >= 0 for r in rows)
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
    tight, _ = run(tmp_path, "--max_train_steps", "2", "--lr_warmup_steps", "1", "--max_grad_norm", "1e-12", out="tight")
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
                      + textwrap.dedent(body) + "\ntrain_kto.main(sys.argv[1:])\n" + "on_exit()\n" * ("def on_exit" in body))
    launcher = [sys.executable, "-m", "torch.distributed.run", *torchrun] if torchrun else [sys.executable]
    proc = subprocess.run([*launcher, str(script), *TINY, *argv], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    out = tmp_path / "out"
    die_in_save = """
        real = train_kto.fsync_tree
        def fsync_tree(path):
            if path.name == "checkpoint-4.tmp":
                os._exit(9)  # killed mid-save: unet/ written, not yet renamed
            real(path)
        train_kto.fsync_tree = fsync_tree
    """
    proc = run_script(tmp_path, die_in_save, "--max_train_steps", "4", "--checkpointing_steps", "2",
                      "--output_dir", str(out), check=False)
    assert proc.returncode == 9
    assert (out / "checkpoint-2" / "training_state.pt").exists() and (out / "checkpoint-4.tmp").exists()
    assert [p.name for p in train_kto.list_checkpoints(out)] == ["checkpoint-2"]
    _, rows = run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume", "latest")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and not (out / "checkpoint-4.tmp").exists()


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch, capsys):
    real = train_kto.kto_loss
    calls = []

    def nan_at_step_2(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(train_kto, "kto_loss", nan_at_step_2)
    _, rows = run(tmp_path, "--max_train_steps", "3", out="one")
    assert [r["skipped"] for r in rows] == [0, 1, 0] and math.isnan(rows[1]["loss"])
    monkeypatch.setattr(train_kto, "kto_loss", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--max_train_steps", "10", "--max_bad_steps", "3", out="always")
    assert e.value.code == 3 and "3 consecutive steps" in capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "always/metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [1, 1, 1]


@pytest.mark.parametrize("case", ["one_class", "empty_captions", "batch_of_one", "foreign_output_dir", "bad_resume"])
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
    args += ["--dataset", str(write_table(tmp_path, rows))]
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *args)
    err = capsys.readouterr().err
    expected = {"one_class": "--allow_one_class", "empty_captions": "10% of the captions are empty",
                "batch_of_one": "--train_batch_size >= 2", "foreign_output_dir": "--resume latest",
                "bad_resume": "not a checkpoint folder"}[case]
    assert e.value.code == 2 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing started
    if case == "one_class":  # allowed on request
        run(tmp_path, *args, "--allow_one_class", out="allowed")


TORCHRUN = ["--standalone", "--nproc_per_node", "2"]


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

    os.environ["KILL_AT"] = "4"
    try:
        proc = run_script(tmp_path, record, *args, "--output_dir", str(tmp_path / "killed"),
                          torchrun=["--max-restarts", "1", *TORCHRUN])
    finally:
        del os.environ["KILL_AT"]
    assert "resuming from" in proc.stdout + proc.stderr
    assert max_diff(weights(tmp_path / "whole/checkpoint-5"), weights(tmp_path / "killed/checkpoint-5")) <= 1e-6
