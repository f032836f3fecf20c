"""Helpers shared by train_kto.py and eval.py.

- torchrun-aware setup of the process group (init_distributed);
- reading a like/dislike dataset (CSV, JSONL or parquet, or Pick-a-Pic v2 pairs turned into per-image labels)
  and checking it before any training starts;
- turning images into the [-1, 1] tensors a Stable Diffusion VAE expects (PIL + torch, no torchvision);
- files written atomically (atomic_path) and a cache of things built once (build_once).

Nothing here knows about KTO (the method lives in train_kto.py) or builds synthetic data (fixtures.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image


def init_distributed():
    """(rank, world_size, device). Under torchrun also the process group: nccl on CUDA, gloo on CPU; plain
    `python script.py` runs as rank 0 of 1 with no process group."""
    import torch.distributed as dist

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if "RANK" in os.environ:  # launched by torchrun
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # torchrun --max-restarts reuses one key-value store across restarts: a per-restart prefix keeps a
        # restarted group from reading the dead group's addresses (pytorch/pytorch#167288)
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=rank == 0 and not agent_store)
        store = dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world_size, device_id=device if device.type == "cuda" else None)
    return rank, world_size, device


class DataError(ValueError):
    """Bad user input (a dataset, a path, a flag). The scripts print the message and exit, no traceback."""
    exit_code = 2


def arg(default, help: str):
    """A Config field with its --help line."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_config(config_cls, argv, doc: str, choices: dict, tiny: dict, tiny_extra=None):
    """Build argparse from a Config dataclass, parse argv, return a Config.

    --tiny only changes defaults (`tiny`, plus `tiny_extra()` computed only when --tiny is given, e.g. paths of
    things built on first use); flags given explicitly always win. --help shows both defaults."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0], argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=doc.split("\n\n", 1)[1])
    for f in dataclasses.fields(config_cls):
        kind = dict(action=argparse.BooleanOptionalAction) if f.type == "bool" else dict(type=eval(f.type))
        default = f" (default: {f.default!r}" + (f"; --tiny: {tiny[f.name]!r})" if f.name in tiny else ")")
        parser.add_argument(f"--{f.name}", help=f.metadata["help"] + default, choices=choices.get(f.name), **kind)
    given = vars(parser.parse_args(argv))
    cfg = config_cls()
    if given.get("tiny"):
        cfg = dataclasses.replace(cfg, **tiny, **(tiny_extra(given) if tiny_extra else {}))
    return dataclasses.replace(cfg, **given), parser


def run_main(work, cfg, errors: tuple):
    """init_distributed, work(cfg, rank, world_size, device), then tear down on every rank. An error of a type in
    `errors` (bad input or a run that cannot go on: the message says what and how to fix) is printed by rank 0
    alone (every rank checks the same things), without a traceback; the exit code is the error's exit_code."""
    import torch.distributed as dist

    rank, world_size, device = init_distributed()
    try:
        result = work(cfg, rank, world_size, device)
        if dist.is_initialized():
            dist.barrier()  # rank 0 finishes writing before any rank tears down its connections
        return result
    except errors as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        if "TORCHELASTIC_ERROR_FILE" in os.environ:  # torchrun: its failure summary then carries the message
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
            ErrorHandler().record_exception(e)
        raise SystemExit(getattr(e, "exit_code", 2)) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
        raise DataError(f"{what}: no such local file or folder, and {filename} of the hub repo {spec} could not be "
                        f"fetched ({type(e).__name__}). With a network: `hf download {spec}` once; without one: pass "
                        "a local copy, or set HF_HUB_OFFLINE=1 to use what the hub cache holds.") from e


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


def check_pretrained(spec: str, flag: str, parts=("unet", "scheduler", "vae", "text_encoder", "tokenizer")) -> str:
    """A diffusers pipeline: a local folder holding `parts`, or a hub id whose model_index.json can be fetched (its
    weights follow in from_pretrained). Else a DataError saying what is missing, where, and how to fix it."""
    path = Path(spec).expanduser()
    if not path.exists():
        from_hub(spec, "model_index.json", f"{flag} {spec}")
        return spec
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        raise DataError(f"{flag} {spec}: not a diffusers pipeline folder: no {', '.join(f'{p}/' for p in missing)} "
                        f"in {path}. Pass the folder that holds model_index.json and those subfolders.")
    return str(path)


def derive_seed(*keys: int) -> int:
    """A 32-bit seed that depends on `keys` only (numpy's SeedSequence: well mixed, no collisions by addition):
    (seed, rank) for a rank's training stream, (seed, prompt, image) for an evaluation image."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def drop_torchvision_notice(record) -> bool:
    return "requires torchvision" not in record.getMessage()


def quiet_libraries():
    """No output a user cannot act on. Importing diffusers makes transformers announce that its image processors
    want torchvision; eval.py uses none of them (each scorer's preprocessing is above), so that notice is dropped.
    The per-file loading bars of diffusers and transformers are off: eval.py reports its own progress."""
    import diffusers
    import transformers

    logging.getLogger("transformers.utils.import_utils").addFilter(drop_torchvision_notice)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()



# ----------------------------------------------------------------------------------------------------
# Images


def load_image(source, base_dir: Path | None = None) -> Image.Image:
    """An RGB PIL image from a path (relative to base_dir) or from encoded bytes (PNG, JPEG, ...)."""
    if isinstance(source, dict) and "bytes" in source:  # datasets' Image feature stored in parquet
        source = source["bytes"]
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source))).convert("RGB")
    path = Path(source)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return Image.open(path).convert("RGB")


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, center-crop a square, scale to [-1, 1]; returns [3, H, W]."""
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float().div(127.5).sub(1.0)



# ----------------------------------------------------------------------------------------------------
# Like/dislike datasets: a table with columns image, caption, label

LABEL_VALUES = {
    "1": True, "1.0": True, "true": True, "desirable": True,
    "0": False, "0.0": False, "false": False, "undesirable": False,
}
REQUIRED_COLUMNS = ("image", "caption", "label")


def read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path, keep_default_na=False, dtype={"caption": str, "label": str})
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise DataError(
        f"--dataset {path}: unsupported file type '{suffix}'. Expected a .csv, .jsonl or .parquet file "
        f"with columns {', '.join(REQUIRED_COLUMNS)}."
    )


def load_feedback(path: str | Path, label_policy: str = "won_once") -> pd.DataFrame:
    """Read and check a like/dislike table. Returns columns caption, desirable (bool) and where the image is.

    A .csv/.jsonl/.parquet file with columns image, caption, label: `image` is a path relative to the
    table's folder (or absolute), or the image's encoded bytes; `label` is 1/0, true/false or
    desirable/undesirable. Raises DataError naming the file, the column or row, and what was expected.
    A folder (or a single shard) with Pick-a-Pic v2 columns, or a hub dataset id: pairwise preferences turned
    into per-image labels by `label_policy`, see load_pickapic. attrs["stats"] holds the counts.
    """
    if label_policy not in LABEL_POLICIES:
        raise DataError(f"--label_policy {label_policy!r}: expected one of {', '.join(LABEL_POLICIES)}.")
    path = Path(path)
    if path.is_dir() or (not path.exists() and _is_hub_dataset(str(path))) or (
            path.is_file() and path.suffix.lower() == ".parquet" and _is_pickapic_parquet(path)):
        return load_pickapic(path, label_policy)
    if not path.exists():
        raise DataError(f"--dataset {path}: no such file. Pass a .csv, .jsonl or .parquet file.")
    table = read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(
            f"--dataset {path}: missing column(s) {', '.join(missing)}. Found columns: "
            f"{', '.join(map(str, table.columns))}. Expected image (a path relative to the file, or image "
            f"bytes), caption (text) and label (1/0, true/false or desirable/undesirable)."
        )
    if len(table) == 0:
        raise DataError(f"--dataset {path}: the table has no rows.")
    labels = table["label"].map(lambda v: LABEL_VALUES.get(str(v).strip().lower()))
    bad = labels.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"--dataset {path}: column 'label', row {row} (0-based, {int(bad.sum())} bad rows in all) has "
            f"value {table['label'].iloc[row]!r}. Expected 1/0, true/false or desirable/undesirable."
        )
    images = table["image"]
    is_path = images.map(lambda v: isinstance(v, str))
    if is_path.any():
        base = path.parent
        exists = images[is_path].map(lambda p: Path(p).is_absolute() and Path(p).exists() or (base / p).exists())
        if not exists.all():
            row = int(exists.index[~exists.to_numpy()][0])
            raise DataError(
                f"--dataset {path}: column 'image', row {row}: image file {images.iloc[row]!r} does not exist "
                f"(paths are relative to {base}). {int((~exists).sum())} image path(s) are missing in all."
            )
    captions = table["caption"].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
    out = pd.DataFrame({"image": images, "caption": captions, "desirable": labels.astype(bool)})
    out.attrs["stats"] = dict(source=str(path), num_desirable=int(out["desirable"].sum()),
                              num_undesirable=int((~out["desirable"]).sum()))
    return out


class FeedbackDataset(torch.utils.data.Dataset):
    """Decodes one image at a time (in DataLoader workers); nothing is held decoded in memory.

    A Pick-a-Pic table (columns shard, row, column) holds no image bytes, only where they are: each worker
    process keeps its own few open parquet files and reads one row group of one jpg column per image.
    A corrupt image never raises: the next image of the same class (table order, wrapping around) replaces
    it, and the sample's "corrupt" field counts the images skipped (0 almost always) so the training loop
    can sum them and call check_corrupt.
    """

    max_open_files = 64      # parquet files kept open per worker process
    max_corrupt_in_a_row = 100  # then the data are hopeless: raise DataError

    def __init__(self, table: pd.DataFrame, base_dir: Path, resolution: int):
        desirable = np.array(table["desirable"].to_numpy(dtype=bool))  # a writable copy
        self.desirable = torch.as_tensor(desirable, dtype=torch.bool)
        self.base_dir, self.resolution = Path(base_dir), resolution
        self.by_class = (np.flatnonzero(~desirable), np.flatnonzero(desirable))  # for corrupt-image replacement
        if "shard" in table.columns:  # Pick-a-Pic: numpy/arrow arrays, so forked workers copy no Python objects
            self.images = None
            self.shards = [str(s) for s in table["shard"].cat.categories]
            self.shard = table["shard"].cat.codes.to_numpy(np.int32)
            self.row = table["row"].to_numpy(np.int64)
            self.image_column = [str(c) for c in table["column"].cat.categories]
            self.column = table["column"].cat.codes.to_numpy(np.int8)
            self.captions = pa.array(table["caption"])
            for s in np.unique(self.shard):
                names = pq.read_schema(self.shards[s]).names
                missing = [c for c in self.image_column if c not in names]
                if missing:
                    raise DataError(
                        f"{self.shards[s]}: no image column(s) {', '.join(missing)}. This copy of Pick-a-Pic has "
                        f"labels but no images (e.g. pickapic_v2_no_images); train on the full copy.")
        else:
            self.images = table["image"].tolist()
            self.captions = table["caption"].tolist()
        self._files, self._pid, self.n_corrupt = OrderedDict(), None, 0

    def __getstate__(self):  # open parquet files stay in the process that opened them
        return {**self.__dict__, "_files": OrderedDict(), "_pid": None}

    def __len__(self) -> int:
        return len(self.captions)

    def _parquet(self, s: int):
        """(ParquetFile, first row of each row group + total) of shard s, opened once per process (LRU)."""
        if self._pid != os.getpid():  # a forked worker must not share the parent's file offsets
            self._files, self._pid = OrderedDict(), os.getpid()
        if s in self._files:
            self._files.move_to_end(s)
            return self._files[s]
        pf = pq.ParquetFile(self.shards[s], pre_buffer=False)
        starts = np.cumsum([0] + [pf.metadata.row_group(k).num_rows for k in range(pf.num_row_groups)])
        self._files[s] = (pf, starts)
        if len(self._files) > self.max_open_files:
            self._files.popitem(last=False)[1][0].close()
        return pf, starts

    def _source(self, i: int):
        """Image i as stored: a path or bytes (CSV/JSONL/parquet tables), or bytes read from a Pick-a-Pic shard."""
        if self.images is not None:
            return self.images[i]
        pf, starts = self._parquet(int(self.shard[i]))
        row = int(self.row[i])
        g = int(np.searchsorted(starts, row, side="right")) - 1
        column = pf.read_row_group(g, columns=[self.image_column[self.column[i]]]).column(0)
        return column[row - int(starts[g])].as_py()

    def _where(self, i: int) -> str:
        if self.images is not None:
            return f"row {i} ({self.images[i] if isinstance(self.images[i], str) else 'bytes'})"
        return f"{self.shards[self.shard[i]]} row {self.row[i]} {self.image_column[self.column[i]]}"

    def __getitem__(self, i: int) -> dict:
        corrupt = 0
        while True:
            source = self._source(i)  # a missing shard or unreadable parquet raises: that is not a corrupt image
            try:
                if source is None:
                    raise ValueError("no image bytes (null)")
                pixels = image_to_tensor(load_image(source, self.base_dir), self.resolution)
                break
            except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                corrupt += 1
                self.n_corrupt += 1
                same = self.by_class[int(self.desirable[i])]
                nxt = int(same[(np.searchsorted(same, i, side="right")) % len(same)])
                if self.n_corrupt <= 20 or self.n_corrupt % 100 == 0:
                    warnings.warn(f"corrupt image #{self.n_corrupt} in this process skipped: {self._where(i)}: "
                                  f"{type(e).__name__}: {e}; replaced by item {nxt} of the same class", RuntimeWarning)
                if corrupt >= min(self.max_corrupt_in_a_row, len(same)):
                    raise DataError(f"{corrupt} corrupt images in a row (last: {self._where(i)}); the data are "
                                    "damaged.") from e
                i = nxt
        caption = self.captions[i] if self.images is not None else self.captions[i].as_py()
        return {"pixel_values": pixels, "caption": caption, "desirable": self.desirable[i], "corrupt": corrupt}


# ----------------------------------------------------------------------------------------------------
# Pick-a-Pic v2: pairwise preferences -> per-image like/dislike labels
#
# A Pick-a-Pic v2 row is one comparison: a caption, two generated images (jpg_0, jpg_1: encoded bytes) with
# their uids, and label_0/label_1 = 1/0 or 0/1 for the preferred image, 0.5/0.5 for a tie. Diffusion-KTO
# needs one label per image. A hub id and a local folder take the same road: the hub id is resolved to
# its parquet shards in the local Hugging Face cache, then both are read with pyarrow, label/uid/caption
# columns only (the image columns are never read here). The per-image table is cached next to the shards
# and says where each image's bytes are (shard, row, jpg_0/jpg_1); FeedbackDataset reads them lazily.

PICKAPIC_HUB_ID = "yuvalkirstain/pickapic_v2"
PICKAPIC_LABEL_COLUMNS = ("caption", "label_0", "label_1", "image_0_uid", "image_1_uid")
PICKAPIC_IMAGE_COLUMNS = ("jpg_0", "jpg_1")
PICKAPIC_SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")
LABEL_POLICIES = ("won_once", "always_won")
LABEL_POLICY_HELP = (
    "how Pick-a-Pic pairs become per-image labels (ties dropped, each image uid counted once): won_once = "
    "preferred in at least one comparison is desirable, never preferred is undesirable (paper); always_won = "
    "desirable only if never the loser, images that both won and lost are dropped")
PICKAPIC_LABELS_VERSION = 1  # bump when the conversion changes: cached label tables are then rebuilt


def _is_hub_dataset(spec: str) -> bool:
    """A hub dataset id, not a missing table file such as likes.csv (so that one is reported as missing)."""
    return is_hub_id(spec) and Path(spec).suffix.lower() not in (".csv", ".jsonl", ".json", ".parquet")


def _is_pickapic_parquet(path: Path) -> bool:
    names = pq.read_schema(path).names
    return "label" not in names and all(c in names for c in PICKAPIC_LABEL_COLUMNS)


def _split_of(path: Path, root: Path) -> str | None:
    """The Pick-a-Pic split a shard belongs to by its name (train-00000-of-00645-....parquet, or a train/ folder)."""
    m = re.match(r"(" + "|".join(sorted(PICKAPIC_SPLITS, key=len, reverse=True)) + r")-", path.name)
    if m:
        return m.group(1)
    return next((p for p in path.relative_to(root).parts[:-1] if p in PICKAPIC_SPLITS), None)


def pickapic_shards(spec: str | Path, split: str = "train") -> tuple[Path, list[Path]]:
    """(root folder, sorted parquet shards) of one split of a Pick-a-Pic v2 copy: a local folder, a single
    shard, or a hub id resolved to its files in the local Hugging Face cache (downloaded when online).

    In a folder, shards named by a split (the hub's layout: data/train-*.parquet) are filtered to `split`;
    a folder whose shards carry no split name is used whole. Hidden folders (our label cache) are skipped.
    Raises DataError when there is nothing to read or a shard lacks the label columns."""
    path = Path(spec)
    if path.is_file():
        root, files = path.parent, [path]
    else:
        if not path.exists():
            if not _is_hub_dataset(str(spec)):
                raise DataError(f"--dataset {spec}: no such file or folder, and not a hub dataset id (owner/name).")
            path = _hub_snapshot(str(spec), split)
        root = path
        files = sorted(p for p in root.rglob("*.parquet")
                       if not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            raise DataError(f"--dataset {spec}: the folder {root} holds no .parquet files. Expected Pick-a-Pic v2 "
                            f"parquet shards (columns {', '.join(PICKAPIC_LABEL_COLUMNS + PICKAPIC_IMAGE_COLUMNS)}).")
        splits = [_split_of(p, root) for p in files]
        if any(s is not None for s in splits):
            files = [p for p, s in zip(files, splits) if s == split]
            if not files:
                found = sorted({s for s in splits if s})
                raise DataError(f"--dataset {spec}: the folder {root} has shards of split(s) {', '.join(found)} "
                                f"but none of split '{split}' (named {split}-*.parquet or under {split}/).")
    for f in files:
        names = pq.read_schema(f).names
        missing = [c for c in PICKAPIC_LABEL_COLUMNS if c not in names]
        if missing:
            raise DataError(
                f"--dataset {spec}: {f} is not a Pick-a-Pic v2 shard: missing column(s) {', '.join(missing)}. "
                f"Found columns: {', '.join(names)}. A folder or hub id must hold parquet shards with columns "
                f"{', '.join(PICKAPIC_LABEL_COLUMNS + PICKAPIC_IMAGE_COLUMNS)}; a like/dislike table must be a "
                f".csv, .jsonl or .parquet file with columns {', '.join(REQUIRED_COLUMNS)}.")
    return root, files


def _hub_snapshot(repo_id: str, split: str) -> Path:
    """The local folder of a hub dataset's parquet shards of `split` (from the cache; downloaded when online)."""
    from huggingface_hub import snapshot_download

    patterns = [f"{split}-*.parquet", f"*/{split}-*.parquet", f"{split}/*.parquet", f"*/{split}/*.parquet"]
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns))
    except Exception as e:  # offline and not cached, unknown repo, no network, ...
        raise DataError(
            f"--dataset {repo_id}: could not get the '{split}' parquet shards of this hub dataset "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Download them first, e.g. "
            f"`hf download {repo_id} --repo-type dataset --include 'data/{split}-*'` (older clients: "
            f"huggingface-cli download), or pass a local folder of Pick-a-Pic v2 parquet shards.") from None


def _pickapic_cache_path(root: Path, files: list[Path], split: str, label_policy: str) -> Path:
    """labels-<split>-<policy>-<fingerprint>.parquet in <root>/.diffusion_kto (or the user cache if read-only).

    The fingerprint covers the conversion version, split, policy and every shard's path, size and mtime."""
    which = hashlib.sha1("|".join(str(f.relative_to(root)) for f in files).encode())  # the set of shards
    state = hashlib.sha1(f"v{PICKAPIC_LABELS_VERSION}|{split}|{label_policy}".encode())  # and their content
    for f in files:
        st = f.stat()
        state.update(f"|{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}".encode())
    name = f"labels-{split}-{label_policy}-{which.hexdigest()[:8]}-{state.hexdigest()[:16]}.parquet"
    folder = root / ".diffusion_kto"
    if not os.access(root, os.W_OK) and not os.access(folder, os.W_OK):
        folder = cache_dir() / "pickapic-labels" / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return folder / name


def _read_label_columns(files: list[Path]) -> pa.Table:
    """All comparisons, label/uid/caption columns only (parquet projection), plus shard index and row."""
    types = dict(caption=pa.large_string(), label_0=pa.float64(), label_1=pa.float64(),
                 image_0_uid=pa.large_string(), image_1_uid=pa.large_string())

    def read(k):
        t = pq.read_table(files[k], columns=list(PICKAPIC_LABEL_COLUMNS))
        n = t.num_rows
        cols = {c: t.column(c).cast(types[c]) for c in PICKAPIC_LABEL_COLUMNS}
        return pa.table({**cols, "shard": np.full(n, k, np.int32), "row": np.arange(n, dtype=np.int64)})

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return pa.concat_tables(pool.map(read, range(len(files))))


def pickapic_labels(comparisons: pa.Table, label_policy: str) -> tuple[pa.Table, dict]:
    """Per-image labels from a table of comparisons (columns of PICKAPIC_LABEL_COLUMNS, shard, row).

    Rules: a comparison with label_0 == label_1 (a tie, 0.5/0.5) or a missing label/uid carries no
    preference and is dropped; an image (uid) only in such comparisons gets no label. Each image is counted
    once: n_won / n_lost = comparisons it won / lost. won_once: desirable iff n_won > 0. always_won:
    desirable iff n_won > 0 and n_lost == 0, undesirable iff n_won == 0, the rest dropped. Caption and
    location (shard, row, side 0 = jpg_0 / 1 = jpg_1) are those of the image's first comparison in shard
    order. Returns (table in first-appearance order, stats); vectorised, no Python loop over rows."""
    if label_policy not in LABEL_POLICIES:
        raise DataError(f"--label_policy {label_policy!r}: expected one of {', '.join(LABEL_POLICIES)}.")
    n = comparisons.num_rows
    l0 = comparisons.column("label_0").to_numpy().astype(np.float64)  # nulls become nan
    l1 = comparisons.column("label_1").to_numpy().astype(np.float64)
    u0, u1 = comparisons.column("image_0_uid"), comparisons.column("image_1_uid")
    valid = ~np.isnan(l0) & ~np.isnan(l1) & pc.is_valid(u0).to_numpy(zero_copy_only=False) \
        & pc.is_valid(u1).to_numpy(zero_copy_only=False)
    decisive = valid & (l0 != l1)
    idx = np.flatnonzero(decisive)
    win0 = l0[idx] > l1[idx]
    # one entry per (decisive comparison, side): the image's uid code, whether it won, and pos = 2 * comparison
    # + side, which orders entries as they appear in the data
    uids = pc.dictionary_encode(pa.chunked_array(u0.take(idx).chunks + u1.take(idx).chunks, type=u0.type))
    uid_names = uids.chunk(0).dictionary if uids.num_chunks else pa.array([], u0.type)
    code = np.concatenate([c.indices.to_numpy() for c in uids.chunks]) if uids.num_chunks else np.zeros(0, np.int32)
    won_slot = np.concatenate([win0, ~win0])
    pos = np.concatenate([2 * idx, 2 * idx + 1])
    k = len(uid_names)
    n_won = np.bincount(code, weights=won_slot, minlength=k).astype(np.int64)
    n_lost = np.bincount(code, minlength=k) - n_won
    first = np.full(k, np.iinfo(np.int64).max)
    np.minimum.at(first, code, pos)  # each image's first appearance
    caption_code = pc.dictionary_encode(comparisons.column("caption").fill_null("")).combine_chunks().indices
    cap = caption_code.to_numpy()[pos // 2].astype(np.int64)
    pairs = np.sort(code.astype(np.int64) * (int(cap.max(initial=0)) + 1) + cap)
    pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]] if len(pairs) else pairs  # distinct (image, caption)
    several_captions = int((np.bincount(pairs // (int(cap.max(initial=0)) + 1), minlength=k) > 1).sum())
    order = np.argsort(first, kind="stable")  # images in order of first appearance
    uid_names, first, n_won, n_lost = uid_names.take(order), first[order], n_won[order], n_lost[order]
    won, lost = n_won > 0, n_lost > 0
    keep = np.ones(len(first), bool) if label_policy == "won_once" else ~(won & lost)
    i = first // 2
    table = pa.table({
        "uid": uid_names,
        "caption": comparisons.column("caption").fill_null("").take(i),
        "desirable": won,  # always_won: the images that also lost are filtered out below
        "shard": comparisons.column("shard").take(i),
        "row": comparisons.column("row").take(i),
        "side": (first % 2).astype(np.int8),
        "n_won": n_won.astype(np.int32), "n_lost": n_lost.astype(np.int32),
    }).filter(keep)
    tie_uids = pc.unique(pa.chunked_array(u0.filter(valid & ~decisive).chunks + u1.filter(valid & ~decisive).chunks,
                                          type=u0.type))
    desirable = table.column("desirable").to_numpy()
    stats = dict(
        label_policy=label_policy, comparisons=n, ties=int((valid & ~decisive).sum()), invalid=int((~valid).sum()),
        images=len(first), images_only_in_ties=len(tie_uids) - int(pc.sum(pc.is_in(tie_uids, uid_names)).as_py() or 0),
        images_won_and_lost=int((won & lost).sum()), images_dropped=int((~keep).sum()),
        images_with_several_captions=several_captions,
        num_desirable=int(desirable.sum()), num_undesirable=int((~desirable).sum()),
    )
    return table, stats


def load_pickapic(spec: str | Path, label_policy: str = "won_once", split: str = "train") -> pd.DataFrame:
    """Per-image like/dislike table of a Pick-a-Pic v2 copy (folder, shard or hub id), computed once and cached.

    Columns: uid, caption, desirable, shard (categorical: path of the parquet file), row (in that file),
    column (categorical: jpg_0 or jpg_1), n_won, n_lost. attrs["stats"]: counts (see pickapic_labels) and the
    cache file. The cache is keyed by the policy and invalidated when any shard's size or mtime changes."""
    if label_policy not in LABEL_POLICIES:
        raise DataError(f"--label_policy {label_policy!r}: expected one of {', '.join(LABEL_POLICIES)}.")
    root, files = pickapic_shards(spec, split)
    cache = _pickapic_cache_path(root, files, split, label_policy)
    if cache.exists():
        table = pq.read_table(cache)
        meta = json.loads(table.schema.metadata[b"diffusion_kto"])
    else:
        table, stats = pickapic_labels(_read_label_columns(files), label_policy)
        meta = dict(shards=[str(f.relative_to(root)) for f in files], stats=dict(stats, split=split))
        table = table.replace_schema_metadata({"diffusion_kto": json.dumps(meta)})
        cache.parent.mkdir(parents=True, exist_ok=True)
        for stale in cache.parent.glob(cache.name.rsplit("-", 1)[0] + "-*.parquet"):  # same shards, older data
            if stale != cache:
                stale.unlink(missing_ok=True)
        with atomic_path(cache) as tmp:  # concurrent ranks write the same content
            pq.write_table(table, tmp)
    df = pd.DataFrame({
        "uid": table.column("uid").to_pandas(), "caption": table.column("caption").to_pandas(),
        "desirable": table.column("desirable").to_numpy(),
        "shard": pd.Categorical.from_codes(table.column("shard").to_numpy(),
                                           categories=[str(root / s) for s in meta["shards"]]),
        "row": table.column("row").to_numpy(),
        "column": pd.Categorical.from_codes(table.column("side").to_numpy(), categories=list(PICKAPIC_IMAGE_COLUMNS)),
        "n_won": table.column("n_won").to_numpy(), "n_lost": table.column("n_lost").to_numpy(),
    })
    df.attrs["stats"] = dict(meta["stats"], source=str(spec), label_cache=str(cache))
    return df


def check_corrupt(n_corrupt: int, n_seen: int, limit: float = 0.01, min_seen: int = 0) -> None:
    """Raise DataError when more than `limit` of the images seen were corrupt (judged once min_seen were read).

    n_corrupt: sum of the "corrupt" field of the samples drawn; n_seen: images read, corrupt ones included
    (samples drawn + n_corrupt)."""
    if n_seen >= min_seen and n_corrupt > limit * n_seen:
        raise DataError(
            f"{n_corrupt} of the {n_seen} images read so far ({n_corrupt / max(n_seen, 1):.2%}) could not be "
            f"decoded, more than the {limit:.0%} allowed: the data are damaged. The warnings above name the shards "
            f"and rows; re-download those shards (or remove them from --dataset) and restart.")


class Progress:
    """Progress of long work: a tqdm bar on a terminal; in a log file (stderr not a terminal) one plain line every
    `every` seconds and at the end, instead of a bar redrawn with carriage returns into one endless line."""

    def __init__(self, total: int, desc: str, unit: str = "steps", initial: int = 0, every: float = 60.0,
                 enabled: bool = True):
        self.total, self.desc, self.unit, self.every, self.done = total, desc, unit, every, initial
        self.start, self.shown, self.first, self.info = time.monotonic(), time.monotonic(), initial, ""
        self.enabled, self.bar = enabled, None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit.rstrip("s"), dynamic_ncols=True)

    def update(self, n: int = 1, **info):
        self.done += n
        self.info = " ".join(f"{k}={v}" for k, v in info.items())
        if self.bar is not None:
            self.bar.set_postfix_str(self.info, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and (now - self.shown >= self.every or self.done >= self.total):
            self.shown, each = now, (now - self.start) / max(self.done - self.first, 1)
            print(f"{self.desc}: {self.done}/{self.total} {self.unit}, {each:.3g} s each, "
                  f"{each * (self.total - self.done):.0f} s left {self.info}".rstrip(), file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------
# The cache of things built once (tiny models, converted labels, downloads)

def cache_dir() -> Path:
    return Path(os.environ.get("DIFFUSION_KTO_CACHE", Path.home() / ".cache" / "diffusion_kto"))


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; when the block ends without an error, rename it to `path` (a file
    or a folder, replacing an old one). A crash leaves `path` as it was and only a *.tmp beside it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
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


def build_once(path: Path, build, threads: int = 2) -> Path:
    """Run build(folder) once and keep its result at path; a no-op when path exists.

    One process builds while any others (torchrun ranks, parallel test runs) wait on a lock and then reuse it.
    Float results depend on the number of threads, so the build runs with a fixed `threads`, whatever
    OMP_NUM_THREADS or the launcher says: the same machine always builds the same thing."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with atomic_path(path) as tmp:
                    tmp.mkdir()
                    build(tmp)
            finally:
                torch.set_num_threads(previous)
    return path


# ----------------------------------------------------------------------------------------------------
# Reports: curves, image grids, trackers, model cards

def wrap(text: str, width: int, path: bool = False) -> str:
    """Lines of at most `width` characters, broken at spaces (and after a "/" too when `path`)."""
    import textwrap

    mark = "\x1f"  # a space after each "/" lets textwrap break there; the marked spaces are removed again
    lines = textwrap.wrap(text.replace("/", f"/{mark} ") if path else text, width, break_on_hyphens=False)
    return "\n".join(line.replace(f"{mark} ", "").replace(mark, "") for line in lines) or text


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib Figure as PNG, atomically. A character the font lacks draws a box, not a warning."""
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(tmp, format="png")
    return Path(path)


def show_image(ax, image: Image.Image, label: str):
    """One image on `ax`, no ticks, `label` under it; small images stay sharp (no smoothing of their pixels)."""
    ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest" if image.width < 128 else "antialiased")
    ax.set(xticks=[], yticks=[])
    ax.set_xlabel(label, fontsize=8)


# -- training curves ---------------------------------------------------------------------------------

# (metrics.jsonl keys, panel title): one panel each; the rewards of both classes share one
CURVES = ((("loss",), "loss"), (("reward_desirable", "reward_undesirable"), "implicit reward"),
          (("z",), "reference point z"), (("accuracy",), "implicit accuracy"), (("grad_norm",), "grad norm"),
          (("lr",), "learning rate"))


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, one per step (the last one written wins), in step order. A line that is not
    JSON (a run killed while writing it) is skipped."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file. Pass the --output_dir of a train_kto.py run (it holds metrics.jsonl).")
    rows = {}
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows[int(row["step"])] = row
    if not rows:
        raise DataError(f"{path}: no metrics yet (no complete line with a step).")
    return [rows[s] for s in sorted(rows)]


def ema(values: np.ndarray, span: float) -> np.ndarray:
    """Exponential moving average with weight 2 / (span + 1), debiased as TensorBoard's smoothing is (the first
    points are not pulled towards 0). NaN/inf values (skipped steps) are left out; the average carries over them."""
    alpha, avg, weight, out = 2.0 / (span + 1.0), 0.0, 0.0, np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if np.isfinite(v):
            avg, weight = (1 - alpha) * avg + alpha * v, (1 - alpha) * weight + alpha
        out[i] = avg / weight if weight > 0 else np.nan
    return out


def curves_figure(rows: list[dict], title: str):
    """The figure of plot_curves: one panel per CURVES entry, raw (thin, light) and smoothed (bold) against step."""
    from matplotlib.figure import Figure

    steps = np.array([r["step"] for r in rows])
    span = max(1.0, len(rows) / 20)  # the average covers about a twentieth of the run
    fig = Figure(figsize=(12, 8), dpi=100, layout="constrained")
    for ax, (keys, name) in zip(fig.subplots(2, 3).flat, CURVES):
        for key, color in zip(keys, ("tab:blue", "tab:red")):
            y = np.array([r.get(key, np.nan) for r in rows], dtype=np.float64)
            y[~np.isfinite(y)] = np.nan
            ax.plot(steps, y, color=color, linewidth=0.8, alpha=0.35)
            ax.plot(steps, ema(y, span), color=color, linewidth=2, label=key)
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    skipped = sum(int(r.get("skipped", 0)) for r in rows)
    note = f"; {skipped} skipped step(s)" if skipped else ""
    fig.suptitle(f"{title}: {len(rows)} steps{note} (thin: raw; bold: EMA, span {span:.0f} steps)")
    return fig


def plot_curves(run_dir: Path) -> Path:
    """<run_dir>/curves.png from <run_dir>/metrics.jsonl (see CURVES); returns its path."""
    run_dir = Path(run_dir)
    fig = curves_figure(read_metrics(run_dir / "metrics.jsonl"), run_dir.resolve().name)
    return save_figure(fig, run_dir / "curves.png")


# -- image grids -------------------------------------------------------------------------------------

def save_image_grid(images: list, labels: list[str], title: str, path: Path, columns: int | None = None) -> Path:
    """PIL `images` in rows of `columns` (default: up to 4), each with its full `label` wrapped under it, `title`
    on top; written to `path` (PNG) atomically. Returns `path`."""
    from matplotlib.figure import Figure

    if len(images) != len(labels) or not images:
        raise ValueError(f"need one label per image and at least one image; got {len(images)} images, "
                         f"{len(labels)} labels")
    columns = max(1, min(columns or 4, len(images)))
    rows = -(-len(images) // columns)
    labels = [wrap(str(label), 30) for label in labels]
    lines = max(label.count("\n") + 1 for label in labels)
    fig = Figure(figsize=(max(4.0, 2.5 * columns), rows * (2.5 + 0.15 * lines) + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat[len(images):]:
        ax.set_axis_off()
    for ax, image, label in zip(axes.flat, images, labels):
        show_image(ax, image, label)
    fig.suptitle(wrap(title, int(12 * fig.get_figwidth())), fontsize=11)
    return save_figure(fig, path)


# -- experiment trackers -----------------------------------------------------------------------------

TRACKERS = ("none", "tensorboard", "wandb")


def is_number(v) -> bool:
    """A real number a tracker can plot: int, float, numpy scalars, one-element tensors (not bools or strings)."""
    import numbers

    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


class Tracker:
    """Metrics and images to TensorBoard (<run_dir>/tensorboard) or Weights & Biases, or nowhere ("none").

    The backend is imported only when asked for. W&B runs online unless WANDB_MODE says otherwise: without a
    network, WANDB_MODE=offline keeps the run in <run_dir>/wandb for a later `wandb sync`."""

    def __init__(self, kind: str, run_dir: Path, config: dict):
        self.kind, self.writer, self.run = kind, None, None
        if kind not in TRACKERS:
            raise DataError(f"tracker {kind!r}: choose from {', '.join(TRACKERS)}.")
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise DataError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from e
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")
        elif kind == "wandb":
            try:
                import wandb
            except ImportError as e:
                raise DataError("Weights & Biases logging needs the wandb package: pip install wandb (then `wandb "
                                "login`, or WANDB_MODE=offline to keep the run on disk)") from e
            mode = os.environ.get("WANDB_MODE", "online")
            try:
                self.run = wandb.init(project="diffusion-kto", dir=str(run_dir), config=config, mode=mode)
            except Exception as e:  # not logged in, no network, ...
                raise DataError(f"wandb could not start a run in {mode} mode ({type(e).__name__}: {e}). Without a "
                                "network or a login: WANDB_MODE=offline, then `wandb sync` later.") from e

    def log(self, row: dict, step: int):
        """Every number in `row` (except the step itself) at `step`; text and other values are skipped."""
        numbers = {k: float(v) for k, v in row.items() if k != "step" and is_number(v)}
        if self.writer is not None:
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, step)
        elif self.run is not None:
            self.run.log(numbers, step=step)

    def log_image(self, name: str, path: Path, step: int):
        """An image file (a validation grid, curves.png) under `name` at `step`."""
        if self.writer is not None:
            with Image.open(path) as image:
                self.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        elif self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(str(path))}, step=step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        elif self.run is not None:
            self.run.finish()
        self.writer = self.run = None


# -- model cards -------------------------------------------------------------------------------------

CARD_TAGS = ["diffusion-kto", "text-to-image", "stable-diffusion", "diffusers"]
RECIPE = ("objective", "beta", "utility", "reference_point", "learning_rate", "lr_warmup_steps", "train_batch_size",
          "gradient_accumulation_steps", "world_size", "max_train_steps", "desirable_ratio")


def base_license(base: str) -> str:
    """creativeml-openrail-m for Stable Diffusion v1-5 (any owner's copy: the name is the model), else other."""
    return "creativeml-openrail-m" if base.rstrip("/").rsplit("/", 1)[-1].lower() == "stable-diffusion-v1-5" \
        else "other"


def write_model_card(ckpt_dir: Path, run: dict) -> Path:
    """<ckpt_dir>/README.md for a checkpoint-<step> folder: Hub metadata (huggingface_hub's ModelCardData), the
    recipe, the data, the step and how to load it. `run`: the run.json of train_kto.py. Returns the path."""
    from huggingface_hub import ModelCard, ModelCardData

    ckpt_dir, cfg = Path(ckpt_dir), run.get("config", {})
    base = str(cfg.get("pretrained_model", "?"))
    found = re.match(r"checkpoint-(\d+)", ckpt_dir.name)
    step = int(found.group(1)) if found else run.get("step", "?")
    terms = base_license(base)
    data = ModelCardData(base_model=base if is_hub_id(base) else None, tags=CARD_TAGS, library_name="diffusers",
                         license=terms, pipeline_tag="text-to-image")
    recipe = dict(cfg, world_size=run.get("world_size", "?"))
    rows = "\n".join(f"| `{k}` | {recipe.get(k, '?')} |" for k in RECIPE)
    policy = run.get("label_policy", cfg.get("label_policy", "?"))
    body = f"""
# Diffusion-KTO: {ckpt_dir.parent.name}, step {step}

The UNet of Stable Diffusion fine-tuned with Diffusion-KTO (Li et al., NeurIPS 2024) from per-image like/dislike
labels, by `train_kto.py`, for {step} steps. Base model: `{base}`{"" if is_hub_id(base) else " (a local folder)"}.

License: {terms}. The base model's license applies to these weights as to the base model itself.

## Recipe

| setting | value |
|---|---|
{rows}

## Data

`{cfg.get("dataset", "?")}`: {run.get("num_desirable", "?")} desirable and {run.get("num_undesirable", "?")} \
undesirable images (label policy `{policy}`).

## Use

This folder holds the fine-tuned UNet (`unet/`); the other parts come from the base model:

```python
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

unet = UNet2DConditionModel.from_pretrained("{ckpt_dir.name}", subfolder="unet")
pipe = StableDiffusionPipeline.from_pretrained("{base}", unet=unet)
image = pipe("a photo of an astronaut riding a horse").images[0]
```

`python eval.py --ckpt {ckpt_dir.name} --export OUT` writes a complete pipeline folder:
`StableDiffusionPipeline.from_pretrained("OUT")`.
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    with atomic_path(ckpt_dir / "README.md") as tmp:
        card.save(tmp)
    return ckpt_dir / "README.md"


def append_to_model_card(ckpt_dir: Path, section: str) -> None:
    """Add a markdown `section` to <ckpt_dir>/README.md; a section with the same first (heading) line is replaced,
    up to the next heading of the same or a higher level."""
    from huggingface_hub import ModelCard

    file = Path(ckpt_dir) / "README.md"
    if not file.is_file():
        raise DataError(f"{file}: no model card to add to (train_kto.py writes one with each checkpoint).")
    card = ModelCard.load(file)
    heading, section = section.strip().splitlines()[0].strip(), section.strip()
    level = len(heading) - len(heading.lstrip("#"))
    out, replaced, skipping, fenced = [], False, False, False
    for line in card.text.strip().splitlines():
        fenced ^= line.startswith("```")
        depth = len(line) - len(line.lstrip("#"))
        if line.strip() == heading and not replaced:
            out, replaced, skipping = out + [section, ""], True, True
        elif skipping and not fenced and 0 < depth <= level and line[depth:depth + 1] == " ":
            skipping = False
        if not skipping:
            out.append(line)
    text = "\n".join(out).strip() + ("\n" if replaced else "\n\n" + section + "\n")
    with atomic_path(file) as tmp:
        ModelCard(f"---\n{card.data.to_yaml()}\n---\n\n{text}").save(tmp)
