"""Many machines and the faults they bring: two torchrun nodes, an output folder that is not shared, preemption by
SIGTERM, and a full disk (a real kernel file-size limit). CPU, gloo, one process per node."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import fixtures

HERE = Path(__file__).parent
TINY = ["--tiny", "--pretrained_model", str(fixtures.tiny_model_path()), "--dataset"]
TINY += [str(fixtures.tiny_dataset_path()), "--validation_steps", "0", "--train_batch_size", "4"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *args]


def two_nodes(outs, *argv, script="train_kto.py", args=lambda out: [*TINY, "--output_dir", str(out)]):
    """Two torchrun agents on this machine, one process each, meeting by a c10d rendezvous on localhost."""
    port, jobs = free_port(), []
    for node, out in enumerate(outs):
        launcher = torchrun("--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1")
        launcher += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "test"]
        jobs.append(
            subprocess.Popen(
                [*launcher, script, *args(out), *argv],
                cwd=HERE,
                env=ENV,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return [(job.wait(timeout=600), job.stderr.read()) for job in jobs]


def metrics(out):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_sec"} for line in lines]


def unet(ckpt):
    return load_file(Path(ckpt) / "unet" / "diffusion_pytorch_model.safetensors")


def same_weights(a, b):
    a, b = unet(a), unet(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_nodes_train_as_one_node_of_two_processes(tmp_path):
    argv = ["--max_train_steps", "3", "--learning_rate", "1e-3"]
    one = subprocess.run(
        [*torchrun("--standalone", "--nproc_per_node", "2"), "train_kto.py", *TINY, "--output_dir"]
        + [str(tmp_path / "one"), *argv],
        cwd=HERE,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    for code, err in two_nodes([tmp_path / "two"] * 2, *argv):
        assert code == 0, err[-3000:]
    # the same global ranks, seeds, batch and reduction order: the identical computation, bit for bit
    assert metrics(tmp_path / "two") == metrics(tmp_path / "one")
    assert same_weights(tmp_path / "two/checkpoint-3", tmp_path / "one/checkpoint-3")


@pytest.mark.slow
def test_a_node_that_does_not_see_the_output_folder_stops_the_run(tmp_path):
    results = two_nodes([tmp_path / "node0", tmp_path / "node1"], "--max_train_steps", "3")
    for code, _ in results:
        assert code != 0
    err = results[0][1]
    assert "rank 1 on" in err and "does not see what rank 0 wrote there" in err, err[-3000:]
    # stopped before any training
    assert (
        not (tmp_path / "node0" / "metrics.jsonl").exists()
        and not (tmp_path / "node1" / "metrics.jsonl").exists()
    )
    # eval.py too, before any image is generated
    base = str(fixtures.tiny_model_path())
    evals = two_nodes(
        [tmp_path / "eval0", tmp_path / "eval1"],
        script="eval.py",
        args=lambda out: ["--ckpt", base, "--baseline", base, "--tiny", "--out", str(out)],
    )
    assert all(code != 0 for code, _ in evals)
    assert "--out" in evals[0][1] and "does not see what rank 0 wrote there" in evals[0][1], evals[0][1][
        -3000:
    ]
    assert not list(tmp_path.glob("eval*/images"))


SLOW_STEPS = """
    import time
    real_step = train_kto.kto_step
    def kto_step(*a, **k):
        time.sleep(0.5)  # a step long enough to be signalled in the middle of the run
        return real_step(*a, **k)
    train_kto.kto_step = kto_step
"""


@pytest.mark.slow
def test_on_preemption_no_rank_exits_before_rank_0_has_written_the_card_and_curves(tmp_path):
    out, script = tmp_path / "out", tmp_path / "preempted.py"
    patch = f"""
        import atexit, os, signal, sys, time
        sys.path.insert(0, {str(HERE)!r})
        import reports, train_kto, utils
        out, rank = {str(out)!r}, os.environ["RANK"]

        class StopRequest(utils.StopRequest):  # SIGTERM before step 1: it is finished, saved, and the run stops
            def __init__(self):
                super().__init__()
                self.requested = True
        utils.StopRequest = StopRequest
        real = reports.Reports.checkpoint
        def checkpoint(self):
            if self.enabled:  # rank 0 draws the curves slowly, after the save
                time.sleep(2)
            real(self)
        reports.Reports.checkpoint = checkpoint
        # what rank 1 sees as it exits. Once a rank has exited the launcher stops the others with SIGTERM, and a
        # rank stopped so would not run its atexit: rank 1 blocks SIGTERM here (it is already told to stop)
        if rank == "1":
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
        atexit.register(lambda: rank == "1" and open(out + "/rank1.txt", "w").write(
            str(os.path.exists(out + "/checkpoint-1/README.md") and os.path.exists(out + "/curves.png"))))
        train_kto.main(sys.argv[1:])
    """
    script.write_text(textwrap.dedent(patch))
    job = subprocess.run(
        [*torchrun("--standalone", "--nproc_per_node", "2"), str(script), *TINY, "--output_dir", str(out)],
        cwd=HERE,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "preempted: SIGTERM at step 1" in job.stderr, job.stderr[-3000:]
    assert (out / "rank1.txt").read_text() == "True"


@pytest.mark.slow
def test_preemption_saves_the_step_and_the_relaunch_resumes_exactly(tmp_path):
    out, script = tmp_path / "out", tmp_path / "slow.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\nimport train_kto\n"
        + textwrap.dedent(SLOW_STEPS)
        + "train_kto.main(sys.argv[1:])\n"
    )
    argv = ["--learning_rate", "1e-3", "--checkpointing_steps", "100", "--resume", "latest"]
    job = subprocess.Popen(
        [*torchrun("--standalone", "--nproc_per_node", "2"), str(script), *TINY, "--output_dir", str(out)]
        + [*argv, "--max_train_steps", "100"],
        cwd=HERE,
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    while job.poll() is None and not (
        (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2
    ):
        time.sleep(0.05)
    # what SLURM or a cloud scheduler does before it kills a job: SIGTERM to the launcher, which passes it on
    job.send_signal(signal.SIGTERM)
    err = job.communicate(timeout=120)[1]
    [ckpt] = checkpoints.list_checkpoints(out)
    step = int(ckpt.name.split("-")[1])
    assert f"preempted: SIGTERM at step {step}: the step was finished and saved." in err, err[-3000:]
    assert "Traceback" not in err.split("preempted:")[0] and len(metrics(out)) == step
    # the relaunch goes on from the saved step and ends where an uninterrupted run ends, bit for bit
    end = ["--max_train_steps", str(step + 2)]
    for name in ("out", "whole"):
        done = subprocess.run(
            [*torchrun("--standalone", "--nproc_per_node", "2"), "train_kto.py", *TINY, "--output_dir"]
            + [str(tmp_path / name), *argv, *end],
            cwd=HERE,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert metrics(out) == metrics(tmp_path / "whole")
    assert same_weights(out / f"checkpoint-{step + 2}", tmp_path / f"whole/checkpoint-{step + 2}")


@pytest.mark.slow
def test_a_full_disk_keeps_the_last_checkpoint_and_says_what_is_needed(tmp_path):
    out = tmp_path / "out"
    argv = [*TINY, "--output_dir", str(out), "--checkpointing_steps", "2", "--learning_rate", "1e-3"]
    run = lambda steps, **kw: subprocess.run(
        [sys.executable, "train_kto.py", *argv, "--max_train_steps", str(steps), "--resume", "latest"],
        cwd=HERE,
        env=ENV,
        capture_output=True,
        text=True,
        **kw,
        timeout=600,
    )
    assert run(2).returncode == 0
    before = unet(out / "checkpoint-2")
    # the kernel refuses to grow any file of this process past 1 MB: the UNet's weights and optimizer state cannot be
    # written (a real EFBIG, as ENOSPC on a full disk), while the logs and run.json still can
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
    full = run(4, preexec_fn=limit)
    assert full.returncode == 3 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert f"no space left writing {out / 'checkpoint-4'}" in full.stderr and " GB there" in full.stderr
    # the previous checkpoint intact and loadable, no partial files left
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-2"]
    after = unet(out / "checkpoint-2")
    assert all(torch.equal(before[k], after[k]) for k in before)
    # resumed with space again: every step exactly once in the metrics
    assert run(4).returncode == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_full_disk_while_caching_latents_stops_with_what_is_needed(tmp_path):
    cache = tmp_path / "cache"
    argv = [*TINY, "--output_dir", str(tmp_path / "out"), "--cache_latents", "--cache_dir", str(cache)]
    # 64 kB per file: the captions' embeddings (0.5 MB a chunk) cannot be written
    full = subprocess.run(
        [sys.executable, "train_kto.py", *argv, "--max_train_steps", "1"],
        cwd=HERE,
        env=ENV,
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, 2**16)),
        timeout=600,
    )
    assert full.returncode == 3 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert f"no space left writing {cache}" in full.stderr and "the latent cache needs about" in full.stderr
    assert not list(cache.glob("*.tmp"))
