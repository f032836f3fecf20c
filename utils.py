"""The run time shared by train_kto.py and eval.py: flags from a config dataclass, torchrun-aware distributed
set-up and tear-down, errors and signals (one line, no traceback; Ctrl-C, SIGTERM as preemption), the checks
that every rank sees the output folder and that no other run writes there, hub ids and local folders, paths
made absolute, derived seeds, files written atomically and a cache of things built once, a full disk. The
training checkpoints are checkpoints.py's."""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import errno
import fcntl
import inspect
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def init_distributed():
    """(rank, world_size, device). Under torchrun also the process group: nccl on CUDA, gloo on CPU; plain
    `python script.py` runs as rank 0 of 1 with no process group."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if "RANK" in os.environ:  # launched by torchrun
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # torchrun --max-restarts reuses one key-value store across restarts: a per-restart prefix keeps a
        # restarted group from reading the dead group's addresses (pytorch/pytorch#167288)
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world_size,
            is_master=rank == 0 and not agent_store,
        )
        store = dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            device_id=device if device.type == "cuda" else None,
        )
    return rank, world_size, device


class DataError(ValueError):
    """Bad user input (a dataset, a path, a flag). The scripts print the message and exit, no traceback."""

    exit_code = 2


class TrainingError(RuntimeError):
    """Training cannot go on (repeated non-finite losses, a full disk); the message says what to try."""

    exit_code = 3


class Preempted(Exception):
    """SIGTERM during training: the step was finished and a checkpoint saved; --resume latest goes on."""

    # EX_TEMPFAIL: a temporary failure, to be tried again
    exit_code = 75


class StopRequest:
    """SIGTERM (what SLURM and cloud schedulers send before they kill a job) as a request, not an exception: the
    training loop reads `requested` once per step (all ranks together), finishes the step, saves and stops."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        self.requested = True


def agree(message: str | None, world_size: int) -> str | None:
    """The first rank's non-None message, the same on every rank (None: every rank is fine). A collective: an error
    seen by some ranks only then stops all of them together, instead of leaving the others waiting."""
    messages = [message]
    if world_size > 1:
        messages = [None] * world_size
        dist.all_gather_object(messages, message)
    return next((m for m in messages if m is not None), None)


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def is_disk_full(e: BaseException | None) -> bool:
    """Whether an exception, or one it arose from, is the kernel refusing a write for lack of space (ENOSPC, EFBIG
    from a file-size limit, EDQUOT), as an OSError or as safetensors words it ("(os error 28)")."""
    while e is not None:
        if (
            isinstance(e, OSError)
            and e.errno in DISK_FULL
            or any(f"(os error {n})" in str(e) for n in DISK_FULL)
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


def torch_save(obj, path: Path):
    """torch.save through a Python file, so that a failed write surfaces as the OSError it is (is_disk_full)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def disk_full_message(e: BaseException, folder: Path, need_bytes: int, what: str) -> str:
    return (
        f"no space left writing {folder} ({e}): {what} needs about {need_bytes / 1e9:.2f} GB there. "
        "Its partial files were removed and what was saved before is intact. Free some space or point "
        "--output_dir (or --cache_dir) to a larger disk, then launch again with --resume latest."
    )


def field_help(config_cls) -> dict[str, str]:
    """Each Config field's --help line: the docstring on the line below the field (as in cleanRL)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(config_cls))).body[0].body
    return {
        field.target.id: " ".join(doc.value.value.split())
        for field, doc in zip(body, body[1:])
        if isinstance(field, ast.AnnAssign)
        and isinstance(doc, ast.Expr)
        and isinstance(doc.value, ast.Constant)
    }


def parse_config(
    config_cls, argv, doc: str, choices: dict, tiny: dict, tiny_extra=None, bounds=None, check=None
):
    """Build argparse from a Config dataclass, parse argv, return a Config.

    --tiny only changes defaults (`tiny`, plus `tiny_extra(cfg, given)` computed only when --tiny is given, e.g.
    paths of things built on first use); flags given explicitly always win. --help shows both defaults. bounds:
    {field: (lowest, highest or None)}; a value outside, or a float flag that is NaN or infinite, raises DataError. Both it and check(cfg) (flags that
    contradict each other) run first: bad flags fail before anything loads or is built."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n")[0],
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[1],
    )
    helps, types = field_help(config_cls), dict(int=int, float=float, str=str)
    for f in dataclasses.fields(config_cls):
        kind = dict(action=argparse.BooleanOptionalAction) if f.type == "bool" else dict(type=types[f.type])
        default = f" (default: {f.default!r}" + (f"; --tiny: {tiny[f.name]!r})" if f.name in tiny else ")")
        # argparse formats help with %: a literal one ("+12% of a step") is %%
        text = (helps[f.name] + default).replace("%", "%%")
        parser.add_argument(f"--{f.name}", help=text, choices=choices.get(f.name), **kind)
    given = vars(parser.parse_args(argv))
    cfg = dataclasses.replace(config_cls(), **{**(tiny if given.get("tiny") else {}), **given})
    for f in dataclasses.fields(config_cls):  # NaN passes any bound (every comparison is False)
        if f.type == "float" and not np.isfinite(getattr(cfg, f.name)):
            raise DataError(f"--{f.name} {getattr(cfg, f.name)}: must be a finite number.")
    for name, (lo, hi) in (bounds or {}).items():
        value = getattr(cfg, name)
        if value < lo or (hi is not None and value > hi):
            within = f"in [{lo}, {hi}]" if hi is not None else f"at least {lo}"
            raise DataError(f"--{name} {value}: must be {within}.")
    if check:
        check(cfg)
    if given.get("tiny") and tiny_extra:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in tiny_extra(cfg, given).items() if k not in given})
    return cfg, parser


class Stopped(Exception):
    """SIGTERM (what a scheduler sends before it kills a job) as an exception, as Ctrl-C raises KeyboardInterrupt."""


def raise_stopped(signum, frame):
    raise Stopped


@contextlib.contextmanager
def reported(errors: tuple, rank: int | None = None, on_stop=lambda: ""):
    """An error of a type in `errors` (bad input, or a run that cannot go on: the message says what and how to
    fix) is printed by rank 0 alone (every rank checks the same things), without a traceback; the exit code is the
    error's exit_code. Ctrl-C and SIGTERM end with one line, on_stop()'s (what was saved, how to go on). rank: by
    default torchrun's RANK (0 without torchrun), for errors before the process group starts (the flags)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    try:
        yield
    except errors as e:
        # One raised in a DataLoader worker arrives as torch's copy, whose message is the worker's whole traceback
        # ending in "<type>: <the error's own message>": keep that message
        if str(e).startswith("Caught ") and "Original Traceback" in str(e):
            e = type(e)(str(e).rstrip().rsplit(f"{type(e).__name__}: ", 1)[-1])
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        if "TORCHELASTIC_ERROR_FILE" in os.environ:  # torchrun: its failure summary then carries the message
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(e)
        raise SystemExit(getattr(e, "exit_code", 2)) from None
    except Preempted as e:
        if rank == 0:
            print(f"preempted: {e} {on_stop()}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except (KeyboardInterrupt, Stopped) as e:
        if rank == 0:
            print(
                f"stopped by {'SIGTERM' if isinstance(e, Stopped) else 'Ctrl-C'}. {on_stop()}",
                file=sys.stderr,
            )
        # the shell's codes for death by SIGTERM and SIGINT
        raise SystemExit(143 if isinstance(e, Stopped) else 130) from None


def run_main(work, cfg, errors: tuple, on_stop=lambda cfg: "", folder: tuple[str, Path] | None = None):
    """init_distributed, work(cfg, rank, world_size, device), then tear down on every rank; errors, Ctrl-C and
    SIGTERM as `reported` says (on_stop(cfg): the line that says what was saved). folder: (flag, path) of an
    output folder that this run holds (hold_folder) until it ends."""
    rank, world_size, device = init_distributed()
    signal.signal(signal.SIGTERM, raise_stopped)
    try:
        with reported(errors, rank, lambda: on_stop(cfg)), contextlib.ExitStack() as held:
            if folder:
                hold_folder(*folder, rank, world_size, held)
            try:
                result = work(cfg, rank, world_size, device)
            except Preempted:
                # Every rank stops at the same step, after the save: rank 0 finishes writing (the model card,
                # the curves) before any rank exits and the launcher stops the others
                with contextlib.suppress(Exception):  # a rank already gone: the checkpoint is saved anyway
                    if dist.is_initialized():
                        dist.barrier()
                raise
            if dist.is_initialized():
                dist.barrier()  # rank 0 finishes writing before any rank tears down its connections
            return result
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if dist.is_initialized():
            dist.destroy_process_group()


def hold_folder(flag: str, folder: Path, rank: int, world_size: int, held: contextlib.ExitStack):
    """Rank 0 locks <folder>/.lock until `held` closes (or the process ends, however it ends), so that a
    second launch into the folder while this run writes there (a job submitted twice, a requeue while the
    first still runs) stops at once, on every rank, instead of mixing two runs' records and checkpoints."""
    problem = None
    if rank == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            problem = lock_file(held.enter_context(open(folder / ".lock", "a+")), flag, folder)
        except OSError as e:
            problem = f"{flag} {folder}: cannot be written ({e}). Pass a folder that this user can write to."
    problem = agree(problem, world_size)
    if problem:
        raise DataError(problem)


def lock_file(lock, flag: str, folder: Path) -> str | None:
    """Lock the open file `lock` (hold_folder's) and write who holds it; or say who holds it already (a
    message). A file system without locks (some Lustre mounts) gives a warning, and None."""
    what = f"{flag} {folder}"
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        return (
            f"{what}: another run is writing there ({lock.read().strip() or 'its holder unknown'}). Wait for it "
            f"to end or stop it, or pass another {flag}."
        )
    except OSError as e:
        print(f"warning: {what}: cannot be locked ({e}); a second launch into it is not refused")
        return None
    lock.truncate(0)
    lock.write(f"held by pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%F %T %Z')}\n")
    lock.flush()
    return None


TRAINING_FOLDER = ("--output_dir", "Rank 0 saves the checkpoints and every rank reads them on resume")


def check_shared_folder(folder: Path, rank: int, world_size: int, flag_and_why=TRAINING_FOLDER):
    """Every rank must see what global rank 0 writes in the output folder (training: rank 0 saves the checkpoints
    that every rank reads on resume). A node-local disk stops the run here, before any work, on every rank."""
    if world_size == 1:
        return
    token = [f"{os.uname().nodename}:{os.getpid()}:{time.time()}" if rank == 0 else None]
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".shared").write_text(token[0])
    dist.broadcast_object_list(token, src=0)
    mark = folder / ".shared"
    sees = mark.exists() and mark.read_text() == token[0]
    problem = agree(None if sees else f"rank {rank} on {os.uname().nodename}", world_size)
    if problem:
        flag, why = flag_and_why
        raise DataError(
            f"{flag} {folder}: {problem} does not see what rank 0 wrote there (a disk local to each node?). "
            f"{why}: put {flag} on a file system that every node shares (NFS, Lustre, a cluster's scratch), with "
            "the same path on every node."
        )


HUB_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]+")  # owner/name, or a legacy name such as bert-base-uncased


def is_hub_id(spec: str) -> bool:
    """owner/name that is not a file or folder here: a hub repo (a model card's base_model, a dataset id)."""
    return bool(HUB_ID.fullmatch(spec)) and "/" in spec and not Path(spec).expanduser().exists()


def from_hub(spec: str, filename: str, what: str) -> Path:
    """`filename` of the hub repo `spec`, from the hub cache or downloaded now. A spec that can only be a local
    path (not owner/name, or its folder exists here as in runs/checkpoint-20) is reported missing instead."""
    if not HUB_ID.fullmatch(spec) or ("/" in spec and Path(spec).parent.is_dir()):
        raise DataError(f"{what}: no such file or folder.")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(spec, filename))
    except Exception as e:  # offline and not cached, no such repo, no network, ...
        raise DataError(
            f"{what}: no such local file or folder, and {filename} of the hub repo {spec} could not be "
            f"fetched ({type(e).__name__}). With a network: `hf download {spec}` once; without one: pass "
            "a local copy, or set HF_HUB_OFFLINE=1 to use what the hub cache holds."
        ) from e


def resolve_model(spec: str, what: str, marker: str = "config.json") -> str:
    """A model folder holding `marker`, or a hub repo whose `marker` can be fetched (the weights follow at load)."""
    path = Path(spec)
    if path.is_dir() and not (path / marker).is_file():
        raise DataError(f"{what}: the folder has no {marker}.")
    if path.is_file():
        raise DataError(f"{what}: a file; expected a model folder (with {marker}) or a hub id.")
    if not path.exists():
        from_hub(spec, marker, what)
    return spec


def check_pretrained(
    spec: str, flag: str, parts=("unet", "scheduler", "vae", "text_encoder", "tokenizer")
) -> str:
    """A diffusers pipeline: a local folder holding `parts`, or a hub id whose model_index.json can be fetched (its
    weights follow in from_pretrained). Else a DataError saying what is missing, where, and how to fix it."""
    path = Path(spec).expanduser()
    if path.exists():
        has = {p for p in (*parts, "text_encoder_2") if (path / p).is_dir()}
    else:  # model_index.json names each part, null where the pipeline has none
        index = json.loads(from_hub(spec, "model_index.json", f"{flag} {spec}").read_text())
        has = {p for p, v in index.items() if isinstance(v, list) and any(v)}
    if "text_encoder_2" in has and "text_encoder" not in has:
        raise DataError(
            f"{flag} {spec}: a pipeline with text_encoder_2 but no text_encoder, as an SDXL refiner: not "
            "supported (the refiner denoises only the last steps of a base model's sampling). Pass an SDXL base "
            "model, such as stabilityai/stable-diffusion-xl-base-1.0."
        )
    if not path.exists():
        return spec
    missing = [p for p in parts if p not in has]
    if missing:
        raise DataError(
            f"{flag} {spec}: not a diffusers pipeline folder: no {', '.join(f'{p}/' for p in missing)} "
            f"in {path}. Pass the folder that holds model_index.json and those subfolders."
        )
    return str(path)


def global_sums(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each named scalar over ALL ranks (one all-reduce); without a process group, the values themselves."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in named.values()])
    if dist.is_initialized():
        dist.all_reduce(stacked)
    return dict(zip(named, stacked))


def check_bad_steps(bad_steps: int, limit: int, step: int):
    """Stop (TrainingError) after `limit` consecutive steps with a non-finite loss or gradient."""
    if bad_steps >= limit:
        raise TrainingError(
            f"{bad_steps} consecutive steps had a non-finite loss or gradient (step {step}); "
            "the last good weights are in the latest checkpoint. Try a lower --learning_rate or "
            "--beta, check the data for broken images, or raise --max_bad_steps."
        )


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that depends on `keys` only (numpy's SeedSequence: well mixed, no collisions by
    addition): (seed, rank) for a rank's training stream, (seed, prompt, image) for an evaluation image.
    SeedSequence drops trailing zero keys, so (s, 0), (s, 0, 0) and (s,) give one seed: rank 0's training
    noise, eval's first image and validation's first prompt at one --seed start from the same numbers
    (different uses in different processes; left so that earlier runs reproduce)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def drop_torchvision_notice(record) -> bool:
    return "requires torchvision" not in record.getMessage()


def silence_torchvision_notice():
    """Drop transformers' notice that CLIPImageProcessor and SiglipImageProcessor want torchvision and fall back to
    their PIL classes: diffusers' pipelines import them (as a feature extractor's type) and nothing here uses them
    (each scorer's preprocessing is in scorers.py). Only that notice; call before the import (idempotent)."""
    logging.getLogger("transformers.utils.import_utils").addFilter(drop_torchvision_notice)


def quiet_libraries():
    """No output a user cannot act on: the torchvision notice is dropped (silence_torchvision_notice), and the
    per-file loading bars of diffusers and transformers are off: the scripts report their own progress."""
    silence_torchvision_notice()
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


# ----------------------------------------------------------------------------------------------------
# The cache of things built once (tiny models, converted labels, downloads)


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFUSION_KTO_CACHE", Path.home() / ".cache" / "diffusion_kto"))


# This machine's name in temporary names: letters, digits and '-' only, so that the names parse back
HOST = re.sub(r"[^A-Za-z0-9-]", "-", os.uname().nodename) or "host"


def temp_name(name: str) -> str:
    """<name>.<host>.<pid>.<8 random hex digits>.tmp: unique per write, also across the nodes of a shared file
    system whose containers reuse pids (every rank may write the same cache file)."""
    return f"{name}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def temp_writer(name: str, candidate: str) -> tuple[str | None, int] | None:
    """(host, pid) of the process that named `candidate` with temp_name(name); host None for the <name>.<pid>.tmp
    of older versions; None if `candidate` is no temporary name of `name`."""
    m = re.fullmatch(
        re.escape(name) + r"\.(?:(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}|(?P<old_pid>\d+))\.tmp",
        candidate,
    )
    return m and (m["host"], int(m["pid"] or m["old_pid"]))


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path` (temp_name); when the block ends without an error, rename it to `path`
    (a file or a folder, replacing an old one). A crash leaves `path` as it was and only a *.tmp beside it."""
    path = Path(path)
    tmp = path.with_name(temp_name(path.name))
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def remove_stopped_builds(path: Path):
    """Remove the temporary folders (or files, temp_name) that builds of `path` stopped before their rename left
    (killed, out of memory, the machine rebooted). Call with the build lock held: then no build is under way."""
    for stale in path.parent.iterdir():
        if temp_writer(path.name, stale.name):
            print(f"removing {stale}, left by a stopped build", flush=True)
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()


def build_once(path: Path, build, threads: int = 2) -> Path:
    """Run build(folder) once and keep its result at path; a no-op when path exists.

    One process builds while any others (torchrun ranks, parallel test runs) wait on a lock and then reuse it;
    the builder first removes what stopped builds of `path` left (remove_stopped_builds).
    Float results depend on the number of threads, so the build runs with a fixed `threads`, whatever
    OMP_NUM_THREADS or the launcher says: the same machine always builds the same thing."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            remove_stopped_builds(path)
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with atomic_path(path) as tmp:
                    tmp.mkdir()
                    build(tmp)
            finally:
                torch.set_num_threads(previous)
    return path


def resolve_paths(cfg, local: tuple[str, ...], maybe_local: tuple[str, ...]):
    """cfg with absolute paths: `local` fields always name local paths, `maybe_local` ones only when a file or
    folder of that name exists here (otherwise they are hub ids). So that a run is compared and resumed by what
    its paths point at, whatever the working directory."""
    absolute = lambda v: str(Path(v).expanduser().resolve())
    return dataclasses.replace(
        cfg,
        **{k: absolute(getattr(cfg, k)) for k in local if getattr(cfg, k)},
        **{
            k: absolute(getattr(cfg, k))
            for k in maybe_local
            if getattr(cfg, k) and Path(getattr(cfg, k)).expanduser().exists()
        },
    )
