"""Pick-a-Pic v2: pairwise preferences turned into per-image like/dislike labels (the paper's data).

A Pick-a-Pic v2 row is one comparison: a caption, two generated images (jpg_0, jpg_1: encoded bytes) with
their uids, and label_0/label_1 = 1/0 or 0/1 for the preferred image, 0.5/0.5 for a tie. Diffusion-KTO
needs one label per image. A hub id and a local folder take the same road: the hub id is resolved to
its parquet shards in the local Hugging Face cache, then both are read with pyarrow, label/uid/caption
columns only (the image columns are never read here). The per-image table is cached next to the shards
and says where each image's bytes are (shard, row, jpg_0/jpg_1); FeedbackDataset reads them lazily.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from utils import DataError, atomic_path, cache_dir, is_hub_id

PICKAPIC_LABEL_COLUMNS = ("caption", "label_0", "label_1", "image_0_uid", "image_1_uid")


PICKAPIC_IMAGE_COLUMNS = ("jpg_0", "jpg_1")


PICKAPIC_SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")


LABEL_POLICIES = ("won_once", "always_won")


PICKAPIC_LABELS_VERSION = 2  # bump when the conversion changes: cached label tables are then rebuilt


def is_hub_dataset(spec: str) -> bool:
    """A hub dataset id, not a missing table file such as likes.csv (so that one is reported as missing)."""
    return is_hub_id(spec) and Path(spec).suffix.lower() not in (".csv", ".jsonl", ".json", ".parquet")


def damaged_shard(path, e: Exception) -> DataError:
    """The DataError for a parquet shard that pyarrow cannot read (a truncated download or copy, a damaged file)."""
    return DataError(
        f"{path}: a damaged parquet shard ({type(e).__name__}: {' '.join(str(e).split())}); it may be truncated "
        "(an interrupted download or copy). Re-download this shard (or remove it from the folder) and restart."
    )


def read_schema(path) -> list[str]:
    """The column names of a shard; a DataError naming it if it cannot be read."""
    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise damaged_shard(path, e) from None


def is_pickapic_parquet(path: Path) -> bool:
    names = read_schema(path)
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
            if not is_hub_dataset(str(spec)):
                raise DataError(
                    f"--dataset {spec}: no such file or folder, and not a hub dataset id (owner/name)."
                )
            path = _hub_snapshot(str(spec), split)
        root = path
        files = sorted(
            p
            for p in root.rglob("*.parquet")
            if not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            raise DataError(
                f"--dataset {spec}: the folder {root} holds no .parquet files. Expected Pick-a-Pic v2 "
                f"parquet shards (columns {', '.join(PICKAPIC_LABEL_COLUMNS + PICKAPIC_IMAGE_COLUMNS)})."
            )
        splits = [_split_of(p, root) for p in files]
        if any(s is not None for s in splits):
            files = [p for p, s in zip(files, splits) if s == split]
            if not files:
                found = sorted({s for s in splits if s})
                raise DataError(
                    f"--dataset {spec}: the folder {root} has shards of split(s) {', '.join(found)} "
                    f"but none of split '{split}' (named {split}-*.parquet or under {split}/)."
                )
    for f in files:
        names = read_schema(f)
        missing = [c for c in PICKAPIC_LABEL_COLUMNS if c not in names]
        if missing:
            raise DataError(
                f"--dataset {spec}: {f} is not a Pick-a-Pic v2 shard: missing column(s) {', '.join(missing)}. "
                f"Found columns: {', '.join(names)}. A folder or hub id must hold parquet shards with columns "
                f"{', '.join(PICKAPIC_LABEL_COLUMNS + PICKAPIC_IMAGE_COLUMNS)}; a like/dislike table must be a "
                ".csv, .jsonl, .json or .parquet file with columns image, caption, label."
            )
    return root, files


def shard_counts(files: list[Path]) -> dict:
    """The shards read and the number their names promise: names such as train-00001-of-00645[-hash].parquet say
    645; a folder with only 600 of them is missing 45. Returns {shards, shards_expected}."""
    numbered = {}
    for f in files:
        m = re.search(r"-(\d+)-of-(\d+)", f.name)
        if m:
            numbered.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    missing = sum(max(n - len(present), 0) for n, present in numbered.items())
    return dict(shards=len(files), shards_expected=len(files) + missing)


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
            f"huggingface-cli download), or pass a local folder of Pick-a-Pic v2 parquet shards."
        ) from None


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
    types = dict(
        caption=pa.large_string(),
        label_0=pa.float64(),
        label_1=pa.float64(),
        image_0_uid=pa.large_string(),
        image_1_uid=pa.large_string(),
    )

    def read(k):
        try:
            t = pq.read_table(files[k], columns=list(PICKAPIC_LABEL_COLUMNS))
        except (pa.ArrowException, OSError) as e:
            raise damaged_shard(files[k], e) from None
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
    valid = (
        ~np.isnan(l0)
        & ~np.isnan(l1)
        & pc.is_valid(u0).to_numpy(zero_copy_only=False)
        & pc.is_valid(u1).to_numpy(zero_copy_only=False)
    )
    decisive = valid & (l0 != l1)
    idx = np.flatnonzero(decisive)
    win0 = l0[idx] > l1[idx]
    # one entry per (decisive comparison, side): the image's uid code, whether it won, and pos = 2 * comparison
    # + side, which orders entries as they appear in the data
    uids = pc.dictionary_encode(pa.chunked_array(u0.take(idx).chunks + u1.take(idx).chunks, type=u0.type))
    uid_names = uids.chunk(0).dictionary if uids.num_chunks else pa.array([], u0.type)
    code = (
        np.concatenate([c.indices.to_numpy() for c in uids.chunks])
        if uids.num_chunks
        else np.zeros(0, np.int32)
    )
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
    table = pa.table(
        {
            "uid": uid_names,
            "caption": comparisons.column("caption").fill_null("").take(i),
            "desirable": won,  # always_won: the images that also lost are filtered out below
            "shard": comparisons.column("shard").take(i),
            "row": comparisons.column("row").take(i),
            "side": (first % 2).astype(np.int8),
            "n_won": n_won.astype(np.int32),
            "n_lost": n_lost.astype(np.int32),
        }
    ).filter(keep)
    tie_uids = pc.unique(
        pa.chunked_array(
            u0.filter(valid & ~decisive).chunks + u1.filter(valid & ~decisive).chunks, type=u0.type
        )
    )
    desirable = table.column("desirable").to_numpy()
    stats = dict(
        label_policy=label_policy,
        comparisons=n,
        ties=int((valid & ~decisive).sum()),
        invalid=int((~valid).sum()),
        images=len(first),
        images_only_in_ties=len(tie_uids) - int(pc.sum(pc.is_in(tie_uids, uid_names)).as_py() or 0),
        images_won_and_lost=int((won & lost).sum()),
        # an image against itself: it wins and loses there (won_once then makes it desirable)
        self_comparisons=int(pc.sum(pc.equal(u0.take(idx), u1.take(idx))).as_py() or 0),
        images_dropped=int((~keep).sum()),
        images_with_several_captions=several_captions,
        num_desirable=int(desirable.sum()),
        num_undesirable=int((~desirable).sum()),
    )
    return table, stats


def load_pickapic(spec: str | Path, label_policy: str = "won_once", split: str = "train") -> pd.DataFrame:
    """Per-image like/dislike table of a Pick-a-Pic v2 copy (folder, shard or hub id), computed once and cached.

    Columns: uid, caption, desirable, shard (categorical: path of the parquet file), row (in that file),
    column (categorical: jpg_0 or jpg_1), n_won, n_lost. attrs["stats"]: counts (see pickapic_labels), the shards
    read and expected (shard_counts: a warning when some are missing) and the cache file. The cache is keyed by
    the policy and invalidated when any shard's size or mtime changes."""
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
        for stale in cache.parent.glob(
            cache.name.rsplit("-", 1)[0] + "-*.parquet"
        ):  # same shards, older data
            if stale != cache:
                stale.unlink(missing_ok=True)
        with atomic_path(cache) as tmp:  # concurrent ranks write the same content
            pq.write_table(table, tmp)
    df = pd.DataFrame(
        {
            "uid": table.column("uid").to_pandas(),
            "caption": table.column("caption").to_pandas(),
            "desirable": table.column("desirable").to_numpy(),
            "shard": pd.Categorical.from_codes(
                table.column("shard").to_numpy(), categories=[str(root / s) for s in meta["shards"]]
            ),
            "row": table.column("row").to_numpy(),
            "column": pd.Categorical.from_codes(
                table.column("side").to_numpy(), categories=list(PICKAPIC_IMAGE_COLUMNS)
            ),
            "n_won": table.column("n_won").to_numpy(),
            "n_lost": table.column("n_lost").to_numpy(),
        }
    )
    counts = shard_counts(files)
    missing = counts["shards_expected"] - counts["shards"]
    # a single shard is a subset on purpose; under torchrun, rank 0 alone says it
    if missing and not Path(spec).is_file() and os.environ.get("RANK", "0") == "0":
        warnings.warn(
            f"--dataset {spec}: {counts['shards']} of the {counts['shards_expected']} shards that the names "
            f"(*-NNNNN-of-NNNNN.parquet) promise are in {root}; {missing} are missing (an unfinished download?). "
            "Training uses those present; if that is not on purpose, download the rest.",
            UserWarning,
        )
    df.attrs["stats"] = dict(meta["stats"], **counts, source=str(spec), label_cache=str(cache))
    return df
