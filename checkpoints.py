"""Training checkpoints, side by side: save (atomically, durably, pruned to --checkpoints_total_limit), list, find the
one to resume (--resume latest or a path, checked against the run), load, remove what killed saves left, and the
command that resumes a stopped run."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

import data
import models
from utils import (
    HOST,
    DataError,
    TrainingError,
    agree,
    atomic_path,
    derive_seed,
    disk_full_message,
    is_disk_full,
    temp_name,
    temp_writer,
    torch_save,
)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A save in progress lives in checkpoint-<step>.*.tmp (temp_name) and is
    ignored."""
    found = [
        p
        for p in Path(output_dir).glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def is_running(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (os.kill with signal 0 only asks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stopped_saves(output_dir: Path):
    """Remove the checkpoint-<step>.*.tmp folders that saves killed before their rename left (SIGKILL, out of
    memory; each the size of a checkpoint), when their writer, named in the folder (temp_name), is no process
    on this machine, or is this process: a run saving into the same folder keeps its own. Those of other
    machines are only named: this one cannot tell whether they are still being written. Rank 0 calls this at
    start-up."""
    for tmp in sorted(Path(output_dir).glob("checkpoint-*.tmp")):
        name = tmp.name.split(".")[0]
        writer = re.fullmatch(r"checkpoint-\d+", name) and temp_writer(name, tmp.name)
        if not writer or not tmp.is_dir() or tmp.is_symlink():
            continue
        host, pid = writer
        # This process has begun no save yet: a folder named by its pid was left by a stopped writer that had
        # the same pid (a relaunch in a container, where python is pid 1 every time)
        if host in (None, HOST) and (pid == os.getpid() or not is_running(pid)):
            print(f"removing {tmp}, left by a stopped save", flush=True)
            shutil.rmtree(tmp)
        elif host not in (None, HOST):
            print(
                f"note: {tmp} is a checkpoint save of {host}, stopped or under way; if no run on {host} is "
                "saving into this folder, remove it to free its space.",
                flush=True,
            )


def fsync_tree(path: Path):
    """Flush a folder's files to disk: the rename that follows is atomic, but durable only for data on disk."""
    for p in [*path.rglob("*"), path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class State(NamedTuple):
    """What a checkpoint saves and a resume restores, besides the step and the Counters."""

    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    # fp16's loss scaler (disabled otherwise)
    scaler: torch.amp.GradScaler
    # this rank's generator: noise, timesteps, flips, caption dropout
    gen: torch.Generator


@dataclasses.dataclass
class Counters:
    """What a run counts across its steps, saved with each checkpoint: non-finite steps in a row (utils.
    check_bad_steps stops the run after --max_bad_steps), corrupt images and images read (the 1% rule), and the
    draws of the image stream used (where a resume's sampler goes on)."""

    bad_steps: int = 0
    n_corrupt: int = 0
    n_seen: int = 0
    n_drawn: int = 0

    def count(self, sums: dict[str, torch.Tensor]) -> None:
        """Add a step's sums over all ranks (reports.step_sums), the same on every rank, so every rank stops
        together: when more than 1% of the images read could not be decoded (data.check_corrupt)."""
        self.bad_steps = self.bad_steps + 1 if sums["not_finite"] > 0 else 0
        self.n_corrupt += int(sums["corrupt"])
        self.n_seen += int(sums["n"] + sums["corrupt"])
        self.n_drawn += int(sums["n"])
        data.check_corrupt(self.n_corrupt, self.n_seen, min_seen=data.MIN_IMAGES_TO_JUDGE)


def save_checkpoint(cfg, state: State, step, counters, rank, world_size, data_id, card=lambda folder: None):
    """checkpoint-<step>/: unet/ or the LoRA file (models.save_policy), optimizer.pt (newest checkpoint only),
    training_state.pt (with the run's Counters), rng_state.pt (every rank's generator), config.json, data.json
    (the data's fingerprint, `data_id`) and what card(folder) writes (the model card). Rank 0 writes it to a
    temporary folder, flushes it to disk, then renames it; a disk that refuses it (full, not writable) removes
    the partial folder and stops every rank with TrainingError. Then older checkpoints lose their
    optimizer.pt, and those beyond --checkpoints_total_limit are deleted (renamed to a temporary name first: a
    crash midway leaves no half checkpoint). All ranks call this."""
    policy, optimizer, lr_schedule, scaler, gen = state
    rng_states = [gen.get_state()]
    if world_size > 1:
        rng_states = [None] * world_size
        dist.all_gather_object(rng_states, gen.get_state())
    failed = None
    if rank == 0:
        folder = Path(cfg.output_dir) / f"checkpoint-{step}"
        try:
            with atomic_path(folder) as tmp:
                models.save_policy(policy, tmp)
                torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch_save(
                    dict(
                        lr_schedule=lr_schedule.state_dict(),
                        step=step,
                        scaler=scaler.state_dict(),
                        **dataclasses.asdict(counters),
                    ),
                    tmp / "training_state.pt",
                )
                torch_save([s.cpu() for s in rng_states], tmp / "rng_state.pt")
                (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
                (tmp / "data.json").write_text(json.dumps(data_id, indent=2))
                card(tmp)
                fsync_tree(tmp)
        except Exception as e:
            if is_disk_full(e):
                # the weights that are saved, and AdamW's two float32 moments per trainable parameter
                trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
                saved = (
                    trainable * 4
                    if models.is_lora(policy)
                    else sum(t.nbytes for t in policy.state_dict().values())
                )
                failed = disk_full_message(e, folder, saved + 8 * trainable, "a checkpoint")
            # not writable (permissions, a read-only or failing disk; safetensors words an OS error as "(os
            # error N)"): what is saved, and how to go on. Anything else is a bug, with its traceback
            elif isinstance(e, OSError) or "(os error " in str(e):
                intact = (list_checkpoints(cfg.output_dir) or ["no earlier checkpoint"])[-1]
                failed = (
                    f"could not save {folder} ({type(e).__name__}: {e}); its partial files were removed and "
                    f"{intact} is intact. Make --output_dir writable, then launch again with --resume latest."
                )
            else:
                raise
        else:
            *older, _ = list_checkpoints(cfg.output_dir)
            for old in older:  # the optimizer state (2x the UNet) is kept in the newest checkpoint only
                (old / "optimizer.pt").unlink(missing_ok=True)
            if cfg.checkpoints_total_limit > 0:
                for old in list_checkpoints(cfg.output_dir)[: -cfg.checkpoints_total_limit]:
                    # a temporary name first: what a crash midway leaves is no checkpoint, and the next start
                    # removes it (remove_stopped_saves)
                    shutil.rmtree(old.rename(old.with_name(temp_name(old.name))))
    # every rank learns whether the save worked (a barrier too)
    failed = agree(failed, world_size)
    if failed:
        raise TrainingError(failed)


def finished(cfg) -> Path | None:
    """checkpoint-<max_train_steps> when `--resume latest` relaunches a run that saved its last step (a restart or
    requeue after the end): there is nothing to train."""
    last = Path(cfg.output_dir) / f"checkpoint-{cfg.max_train_steps}"
    return last if cfg.resume == "latest" and last in list_checkpoints(Path(cfg.output_dir)) else None


def global_batch(config: dict, ranks: int) -> int:
    """Images per optimizer step over all ranks."""
    return ranks * config["train_batch_size"] * config["gradient_accumulation_steps"]


def find_resume(cfg, resumable: set[str], data_id: dict, world_size: int) -> Path | None:
    """The checkpoint to resume from, or None. Refuses to write into another run's folder without --resume or with
    a checkpoint of another folder, and to resume a checkpoint whose data (by content: `data_id`, see
    data.fingerprint), model or objective differ from this launch's (RESUMABLE may differ, and the per-rank batch
    and accumulation where the global batch over `world_size` ranks stays; paths were resolved when the flags
    were parsed)."""
    out = Path(cfg.output_dir)
    if not cfg.resume:
        if list_checkpoints(out):
            raise DataError(
                f"--output_dir {out} already holds checkpoints ({list_checkpoints(out)[-1].name}, ...) "
                "of another run. Pass --resume latest to continue it, or choose another --output_dir."
            )
        return None
    path = (list_checkpoints(out) or [None])[-1] if cfg.resume == "latest" else Path(cfg.resume)
    if path is None:
        return None
    for name, why in (
        (
            "training_state.pt",
            "not a checkpoint folder of train_kto.py (no training_state.pt). Pass a "
            "checkpoint-<step> folder or 'latest'.",
        ),
        (
            "optimizer.pt",
            "this checkpoint keeps the weights but not the optimizer state, which only the newest "
            "checkpoint of a run keeps. Resume from the newest one (--resume latest).",
        ),
        (
            "data.json",
            "this checkpoint has no data.json (the fingerprint of its training data), so it cannot "
            "be checked against this launch's data: it was saved by an older version. Start a new run.",
        ),
    ):
        if not (path / name).exists():
            raise DataError(f"--resume {path}: {why}")
    # The run saves into --output_dir: a newer checkpoint there would be overwritten or deleted, or taken by 'latest'
    step = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)["step"]
    newer = [c.name for c in list_checkpoints(out) if int(c.name.split("-")[1]) > step]
    if newer:
        raise DataError(
            f"--resume {path}: --output_dir {out} holds {newer[-1]}, newer than this checkpoint (step {step}), "
            "which the resumed run would overwrite or delete, and which --resume latest would take. Choose "
            "another --output_dir, or resume the newer checkpoint (--resume latest)."
        )
    # A checkpoint of another folder continues its run here: a different run's record there would be mixed in
    if out.resolve() not in path.resolve().parents:
        record = [
            p.name for p in (*list_checkpoints(out), out / "metrics.jsonl", out / "run.json") if p.exists()
        ]
        # unless it is this very resume, stopped before its first save and launched again as it was
        if record and not list_checkpoints(out) and (out / "run.json").exists():
            with contextlib.suppress(ValueError, AttributeError):
                earlier = json.loads((out / "run.json").read_text()).get("config", {}).get("resume")
                record = [] if earlier and Path(earlier).resolve() == path.resolve() else record
        if record:
            raise DataError(
                f"--resume {path}: --output_dir {out} already holds another run ({', '.join(record)}), whose "
                "record and checkpoints the resumed run would mix with its own. Choose an empty or new "
                "--output_dir, or copy the checkpoint's whole run folder and resume inside it."
            )
    if cfg.max_train_steps <= step:
        raise DataError(
            f"--resume {path}: this checkpoint is at step {step}, so --max_train_steps {cfg.max_train_steps} "
            "leaves no step to train. Its weights are the run's result; to train on, pass a --max_train_steps "
            f"above {step}."
        )
    saved = json.loads((path / "config.json").read_text())
    now = dataclasses.asdict(cfg)
    differ = [k for k in saved if k not in resumable and k in now and saved[k] != now[k]]
    # On another number of ranks (or after running out of memory) the same global batch may be split otherwise
    ranks = len(torch.load(path / "rng_state.pt", weights_only=True))
    if global_batch(saved, ranks) == global_batch(now, world_size):
        differ = [k for k in differ if k not in ("train_batch_size", "gradient_accumulation_steps")]
    if differ:
        raise DataError(
            f"--resume {path}: this launch differs from the checkpoint's run in "
            + ", ".join(f"--{k} ({saved[k]!r} there, {now[k]!r} here)" for k in differ)
            + ". Resuming would mix two runs in one record: pass the checkpoint's values, or start a new "
            "run with another --output_dir (and --pretrained_model pointing at the checkpoint's unet)."
        )
    then = json.loads((path / "data.json").read_text())
    changed = [k for k in ("rows", "labels", "captions", "images") if then.get(k) != data_id[k]]
    if changed:
        counts = lambda d: f"{d['rows']} rows, {d['desirable']} desirable"
        raise DataError(
            f"--resume {path}: the data of --dataset {cfg.dataset} differ from the data the checkpoint was "
            f"trained on: changed {', '.join(changed)} ({counts(then)} there, {counts(data_id)} here). "
            "Resuming would mix two datasets in one run: restore the checkpoint's data, or start a new run "
            "with another --output_dir."
        )
    return path


def resume_command(cfg, script: str, argv: list[str]) -> str:
    """What was saved last in cfg.output_dir, and the command that goes on from it (argv with --resume latest)."""
    last = list_checkpoints(cfg.output_dir)
    if not last:
        return f"No checkpoint was saved in {cfg.output_dir}: run the same command to start again."
    kept = [a for i, a in enumerate(argv) if not a.startswith("--resume") and argv[i - 1 : i] != ["--resume"]]
    command = shlex.join([script, *kept, "--resume", "latest"])
    # torchrun's: all processes, those of this node, the nodes
    ranks = int(os.environ.get("WORLD_SIZE", 1))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", ranks))
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", ranks // per_node))
    if ranks == 1:
        return f"The last checkpoint is {last[-1]}. To resume: python {command}"
    if nodes == 1:
        return f"The last checkpoint is {last[-1]}. To resume: torchrun --nproc_per_node {per_node} {command}"
    return (
        f"The last checkpoint is {last[-1]}. To resume, relaunch with the same launcher (e.g. the same SLURM script) "
        f"on {nodes} nodes: on each, torchrun --nnodes {nodes} --nproc_per_node {per_node} with the first launch's "
        f"rendezvous flags (--rdzv_endpoint ...), then {command}"
    )


def load_checkpoint(
    path: Path | None, state: State, cfg, rank: int, world_size: int, device
) -> tuple[int, Counters]:
    """Restore what save_checkpoint wrote into `state`: the policy's weights, the optimizer, the learning-rate
    schedule, the fp16 loss scale and this rank's generator. Returns (step, Counters): a count the checkpoint
    lacks is 0 (older versions saved bad_steps only); (0, all 0) without a path."""
    if path is None:
        return 0, Counters()
    policy, optimizer, lr_schedule, scaler, gen = state
    models.load_policy(policy, path)
    saved = torch.load(path / "training_state.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    lr_schedule.load_state_dict(saved["lr_schedule"])
    if saved.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(saved["scaler"])
    rng_states = torch.load(path / "rng_state.pt", weights_only=True)
    if len(rng_states) == world_size:
        gen.set_state(rng_states[rank])
    else:  # a different number of ranks: same weights and optimizer, new per-rank noise streams
        gen.manual_seed(derive_seed(cfg.seed + saved["step"], rank))
    # The batch split otherwise (find_resume allows it): said once, with the global batch before and now
    then, now = json.loads((path / "config.json").read_text()), dataclasses.asdict(cfg)
    split = lambda c, ranks: f"{ranks} rank(s) x {c['train_batch_size']} x {c['gradient_accumulation_steps']}"
    if rank == 0 and split(then, len(rng_states)) != split(now, world_size):
        print(
            f"warning: {path} was saved by {split(then, len(rng_states))} = global batch "
            f"{global_batch(then, len(rng_states))}, resuming as {split(now, world_size)} = global batch "
            f"{global_batch(now, world_size)} (at the same learning rate): the images go on in the same "
            "stream (none again, none skipped), the noise, timesteps, flips and caption dropout otherwise, so the "
            "run will not match an uninterrupted one"
        )
    counts = {field.name: saved.get(field.name, 0) for field in dataclasses.fields(Counters)}
    # saved before n_drawn was: every step drew the checkpoint's global batch
    counts["n_drawn"] = saved.get("n_drawn", saved["step"] * global_batch(then, len(rng_states)))
    return saved["step"], Counters(**counts)
