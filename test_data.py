"""Pick-a-Pic v2 -> per-image labels: counts hand-derived from small shards, cache, lazy images, corrupt images.

Run: HF_HUB_OFFLINE=1 python -m pytest -q test_data.py
"""

import io
import pickle
import re
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
import fixtures
import pickapic
import utils
from utils import DataError

# One colour per image uid, so a decoded image tells which uid's bytes were read.
COLOR = {u: (20 + 25 * k, 200 - 20 * k, (60 * k) % 256) for k, u in enumerate("ABCDEFGHI")}
CORRUPT = {"C"}  # C's bytes are a truncated JPEG

# (caption, image_0_uid, image_1_uid, label_0, label_1) per shard. Hand-derived outcome (ties dropped):
#   A won r0, lost r1 (both)   B lost twice       C won twice (corrupt bytes)   D tie, then lost
#   E only in a tie            F won              G tie, then lost   H only in a tie      I won
SHARDS = [
    [("a cat", "A", "B", 1.0, 0.0), ("a cat", "A", "C", 0.0, 1.0), ("a dog", "D", "E", 0.5, 0.5)],
    [
        ("a cat", "B", "C", 0.0, 1.0),
        ("a dog", "F", "D", 1.0, 0.0),
        ("the sky", "G", "H", 0.5, 0.5),
        ("the sky", "G", "I", 0.0, 1.0),
    ],
]
EXPECTED = {  # policy -> (desirable uids, undesirable uids)
    "won_once": ({"A", "C", "F", "I"}, {"B", "D", "G"}),
    "always_won": ({"C", "F", "I"}, {"B", "D", "G"}),
}
# first decisive comparison of each image: (shard, row, column)
LOCATION = {
    "A": (0, 0, "jpg_0"),
    "B": (0, 0, "jpg_1"),
    "C": (0, 1, "jpg_1"),
    "D": (1, 1, "jpg_1"),
    "F": (1, 1, "jpg_0"),
    "G": (1, 3, "jpg_0"),
    "I": (1, 3, "jpg_1"),
}
CAPTION = {
    "A": "a cat",
    "B": "a cat",
    "C": "a cat",
    "D": "a dog",
    "F": "a dog",
    "G": "the sky",
    "I": "the sky",
}


def encode(uid: str, size: int = 32) -> bytes:
    buf = io.BytesIO()
    image = Image.new("RGB", (size, size), COLOR[uid])
    if uid in CORRUPT:
        image.save(buf, format="JPEG")
        return buf.getvalue()[:40]  # a JPEG header and nothing else
    image.save(buf, format="PNG" if uid in "ACEG" else "JPEG", quality=95)
    return buf.getvalue()


def write_shard(path: Path, rows, drop_optional=False, image_structs=False):
    """One shard with Pick-a-Pic v2's columns and types (optional columns dropped if asked; the images as datasets'
    Image structs {"bytes", "path"}, as a copy saved through `datasets`, if asked)."""
    cap, u0, u1, l0, l1 = map(list, zip(*rows))
    image = lambda uids: (
        pa.array([{"bytes": encode(u), "path": f"{u}.jpg"} for u in uids])
        if image_structs
        else pa.array([encode(u) for u in uids], pa.binary())
    )
    cols = {
        "are_different": [True] * len(rows),
        "best_image_uid": [a if x == 1 else b if y == 1 else "" for a, b, x, y in zip(u0, u1, l0, l1)],
        "caption": cap,
        "created_at": pa.array(np.full(len(rows), 1_700_000_000_000_000, "datetime64[us]")),
        "has_label": [True] * len(rows),
        "image_0_uid": u0,
        "image_0_url": [f"https://x.invalid/{u}" for u in u0],
        "image_1_uid": u1,
        "image_1_url": [f"https://x.invalid/{u}" for u in u1],
        "jpg_0": image(u0),
        "jpg_1": image(u1),
        "label_0": pa.array(l0, pa.float64()),
        "label_1": pa.array(l1, pa.float64()),
        "model_0": ["sd"] * len(rows),
        "model_1": ["sdxl"] * len(rows),
        "ranking_id": list(range(len(rows))),
        "user_id": [7] * len(rows),
        "num_example_per_prompt": [1] * len(rows),
    }
    if drop_optional:
        for c in ("model_0", "model_1", "image_0_url", "image_1_url", "user_id", "created_at"):
            del cols[c]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=2)  # several row groups per shard


def make_folder(root: Path, shards=SHARDS, image_structs=False) -> Path:
    for k, rows in enumerate(shards):
        name = f"train-{k:05d}-of-{len(shards):05d}.parquet"
        write_shard(root / name, rows, drop_optional=k == 1, image_structs=image_structs)
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "pickapic")


def by_uid(table):
    return {u: row for u, row in zip(table["uid"], table.itertuples(index=False))}


@pytest.mark.parametrize("policy", list(EXPECTED))
def test_counts_per_policy_match_hand_derived(folder, policy):
    table = data.load_feedback(folder, label_policy=policy)
    desirable, undesirable = EXPECTED[policy]
    assert set(table["uid"][table["desirable"]]) == desirable
    assert set(table["uid"][~table["desirable"]]) == undesirable
    assert table["uid"].is_unique
    stats = table.attrs["stats"]
    assert (stats["num_desirable"], stats["num_undesirable"]) == (len(desirable), len(undesirable))
    assert (stats["comparisons"], stats["ties"], stats["images"], stats["images_only_in_ties"]) == (
        7,
        2,
        7,
        2,
    )
    assert stats["images_won_and_lost"] == 1 and stats["images_dropped"] == (
        1 if policy == "always_won" else 0
    )
    assert stats["label_policy"] == policy


@pytest.mark.parametrize("image_structs", [False, True])
def test_caption_and_location_carried_over(tmp_path, image_structs):
    folder = make_folder(tmp_path / "pickapic", image_structs=image_structs)
    table = data.load_feedback(folder)
    rows = by_uid(table)
    for uid, (shard, row, column) in LOCATION.items():
        assert rows[uid].caption == CAPTION[uid]
        assert Path(rows[uid].shard).name == f"train-{shard:05d}-of-00002.parquet"
        assert (rows[uid].row, rows[uid].column) == (row, column)
    # the bytes at that location are the image's: decode through the dataset and compare colours
    dataset = data.FeedbackDataset(table, folder, 32)
    for i, uid in enumerate(table["uid"]):
        if uid in CORRUPT:
            continue
        sample = dataset[i]
        assert sample["corrupt"] == 0 and sample["caption"] == CAPTION[uid]
        rgb = (sample["pixel_values"].mean(dim=(1, 2)) + 1) * 127.5
        # JPEG at quality 95 (half the images) moves a flat colour by a level or two; colours differ by >= 20
        assert torch.allclose(rgb, torch.tensor(COLOR[uid], dtype=torch.float32), atol=3), uid


def test_parity_with_a_python_loop(tmp_path):
    """The vectorised conversion equals a plain transcription of the rules, on random synthetic data."""
    root = tmp_path / "synthetic"
    fixtures.write_synthetic_pickapic(
        root, 3000, rows_per_shard=700, seed=1, tie_fraction=0.2, images_per_prompt=3
    )
    won, lost, seen = defaultdict(int), defaultdict(int), {}
    for f in sorted(root.glob("*.parquet")):
        t = pq.read_table(f, columns=list(pickapic.PICKAPIC_LABEL_COLUMNS)).to_pylist()
        for r in t:
            if r["label_0"] == r["label_1"]:
                continue
            sides = (
                (r["image_0_uid"], r["label_0"] > r["label_1"]),
                (r["image_1_uid"], r["label_1"] > r["label_0"]),
            )
            for uid, w in sides:
                won[uid] += w
                lost[uid] += not w
                seen.setdefault(uid, r["caption"])
    reference = {
        "won_once": {u: won[u] > 0 for u in seen},
        "always_won": {u: won[u] > 0 for u in seen if not (won[u] and lost[u])},
    }
    for policy, expected in reference.items():
        table = data.load_feedback(root, label_policy=policy)
        assert dict(zip(table["uid"], table["desirable"])) == expected
        assert dict(zip(table["uid"], table["caption"])) == {u: seen[u] for u in expected}
        assert {u: (w, lo) for u, w, lo in zip(table["uid"], table["n_won"], table["n_lost"])} == {
            u: (won[u], lost[u]) for u in expected
        }


def test_labels_never_read_the_image_columns(folder):
    """Overwrite the jpg column chunks on disk with junk: labels still compute, the jpg columns can't be read."""
    for f in folder.glob("*.parquet"):
        meta = pq.ParquetFile(f).metadata
        raw = bytearray(f.read_bytes())
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                if col.path_in_schema in pickapic.PICKAPIC_IMAGE_COLUMNS:
                    start = col.dictionary_page_offset or col.data_page_offset
                    raw[start : start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
        f.write_bytes(bytes(raw))
        with pytest.raises(Exception):
            pq.read_table(f, columns=["jpg_0"])
    table = data.load_feedback(folder)
    assert set(table["uid"][table["desirable"]]) == EXPECTED["won_once"][0]


def test_cache_reused_keyed_by_policy_and_invalidated_by_changes(folder, monkeypatch):
    calls = []
    real = pickapic._read_label_columns
    monkeypatch.setattr(pickapic, "_read_label_columns", lambda files: calls.append(1) or real(files))
    first = data.load_feedback(folder)
    assert len(calls) == 1 and Path(first.attrs["stats"]["label_cache"]).exists()
    second = data.load_feedback(folder)
    assert len(calls) == 1  # served from the cache
    assert second[["uid", "desirable", "caption", "row"]].equals(
        first[["uid", "desirable", "caption", "row"]]
    )
    assert second.attrs["stats"]["num_desirable"] == first.attrs["stats"]["num_desirable"]
    other = data.load_feedback(folder, label_policy="always_won")
    assert len(calls) == 2 and set(other["uid"][other["desirable"]]) == EXPECTED["always_won"][0]
    # change the data: H now beats E in a new comparison, so both get labels
    write_shard(folder / "train-00001-of-00002.parquet", SHARDS[1] + [("the sky", "H", "E", 1.0, 0.0)])
    third = data.load_feedback(folder)
    assert len(calls) == 3
    assert set(third["uid"][third["desirable"]]) == EXPECTED["won_once"][0] | {"H"}
    assert set(third["uid"][~third["desirable"]]) == EXPECTED["won_once"][1] | {"E"}
    cached = sorted(p.name.split("-")[2] for p in (folder / ".diffusion_kto").glob("*.parquet"))
    assert cached == ["always_won", "won_once"]


def test_dataset_holds_no_decoded_images(folder):
    table = data.load_feedback(folder)
    dataset = data.FeedbackDataset(table, folder, 32)
    image_bytes = sum(len(encode(u)) for rows in SHARDS for r in rows for u in r[1:3])

    def held():  # everything the dataset object would carry into a worker
        return pickle.dumps(dataset)

    assert not any(isinstance(v, (Image.Image, bytes)) for v in vars(dataset).values())
    size = len(held())
    assert size < image_bytes
    for i in range(len(dataset)):
        dataset[i]
    assert len(held()) <= size  # reading images caches nothing decoded (open files are dropped when pickled)
    assert not any(isinstance(v, torch.Tensor) and v.numel() > len(dataset) for v in vars(dataset).values())


def test_corrupt_image_is_replaced_counted_and_warned(folder):
    table = data.load_feedback(folder)
    dataset = data.FeedbackDataset(table, folder, 32)
    uids = list(table["uid"])
    i = uids.index("C")
    desirable_order = [k for k in range(len(uids)) if table["desirable"].iloc[k]]
    # the next image of the same class, wrapping around
    replacement = desirable_order[(desirable_order.index(i) + 1) % len(desirable_order)]
    with pytest.warns(RuntimeWarning, match="corrupt image #1"):
        sample = dataset[i]
    assert sample["corrupt"] == 1 and bool(sample["desirable"]) and uids[replacement] == "F"
    assert sample["caption"] == CAPTION[uids[replacement]]
    rgb = (sample["pixel_values"].mean(dim=(1, 2)) + 1) * 127.5
    # as above: JPEG moves a flat colour by a level or two, the colours differ by >= 20
    assert torch.allclose(rgb, torch.tensor(COLOR[uids[replacement]], dtype=torch.float32), atol=3)
    # through a DataLoader with worker processes, one pass over every image sees exactly one corrupt image
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert sum(int(b["corrupt"].sum()) for b in batches) == len(CORRUPT)
    assert sum(len(b["caption"]) for b in batches) == len(dataset)
    assert batches[0]["pixel_values"].shape == (3, 3, 32, 32)
    # held out (heldout.split), F is not a stand-in for C: the next desirable image on C's side is
    dataset.keep_apart(np.array(uids) == "F")
    with pytest.warns(RuntimeWarning, match="corrupt image"):
        sample = dataset[i]
    others = [k for k in desirable_order if uids[k] != "F"]
    assert sample["caption"] == CAPTION[uids[others[(others.index(i) + 1) % len(others)]]] != CAPTION["F"]


def test_the_latent_cache_chooses_a_corrupt_images_stand_in_for_this_runs_split(folder, tmp_path):
    import contextlib
    import types

    import latent_cache

    table = data.load_feedback(folder)
    dataset = data.FeedbackDataset(table, folder, 32)
    uids = list(table["uid"])
    # "Encoders" that keep a pixel's colour as the latent, so that a cached row tells whose image it holds
    inputs = types.SimpleNamespace(
        autocast=contextlib.nullcontext(),
        posterior=lambda pixels: (pixels[:, :, :1, :1], pixels[:, :, :1, :1]),
        text=lambda captions: dict(emb=torch.tensor([[float(len(c))] for c in captions])),
    )
    cfg = types.SimpleNamespace(train_batch_size=2, dataloader_workers=0, random_flip=False)
    captions = list(dict.fromkeys(["", *table["caption"]]))
    # built by a run that holds nothing out: F stands in for the corrupt C
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        latent_cache.build(tmp_path, dataset, captions, inputs, cfg, rank=0, world_size=1)
    cached = latent_cache.CachedLatents(tmp_path, dataset)
    # reused by a run whose split holds F out (another --seed): C's stand-in is then another training image,
    # as without the cache, never the held-out F
    for held_out in (np.zeros(len(uids), bool), np.array(uids) == "F"):
        dataset.keep_apart(held_out)
        for i in range(len(uids)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                want = dataset[i]
            got = cached[i]
            assert torch.equal(got["mean"][0], want["pixel_values"][:, :1, :1]), (uids[i], held_out)
            assert got["emb"].item() == len(want["caption"]) and got["corrupt"] == want["corrupt"]
            assert torch.equal(got["size"], want["size"]) and got["desirable"] == want["desirable"]
    i = uids.index("C")
    assert cached[i]["corrupt"] == 1 and not torch.equal(cached[i]["mean"], cached[uids.index("F")]["mean"])


def test_a_shard_gone_during_the_run_stops_with_a_data_error(folder):
    table = data.load_feedback(folder)
    dataset = data.FeedbackDataset(table, folder, 32)
    shard = Path(dataset.shards[int(dataset.shard[0])])
    shard.rename(shard.with_suffix(".moved"))
    # not a corrupt image replaced by another: the shard is named, and how to go on
    with pytest.raises(DataError, match=rf"{shard.name} row .*cannot be read.*--resume latest"):
        dataset[0]


def test_all_corrupt_class_raises(tmp_path):
    CORRUPT.add("F")
    try:
        folder = make_folder(tmp_path / "bad")
        table = data.load_feedback(folder, label_policy="always_won")  # desirable: C, F, I
        table = table[table["uid"].isin(["C", "F", "B"])]
        dataset = data.FeedbackDataset(table, folder, 32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(DataError, match="corrupt images in a row"):
                dataset[list(table["uid"]).index("F")]
    finally:
        CORRUPT.discard("F")


def test_check_corrupt():
    data.check_corrupt(0, 0)
    data.check_corrupt(1, 100)  # exactly 1% is allowed
    data.check_corrupt(5, 99, min_seen=100)  # too few images read to judge yet
    with pytest.raises(utils.DataError):
        data.check_corrupt(5, 100, min_seen=100)
    data.check_corrupt(5, 100, limit=0.05)
    with pytest.raises(DataError, match="2 of the 100 images"):
        data.check_corrupt(2, 100)
    with pytest.raises(DataError, match="more than the 1%"):
        data.check_corrupt(1, 50)


def test_folder_without_pickapic_columns(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(pa.table({"image": ["a.png"], "caption": ["x"], "label": [1]}), other / "part-0.parquet")
    missing = r"not a Pick-a-Pic v2 shard: missing column\(s\) label_0, label_1, image_0_uid"
    with pytest.raises(DataError, match=missing):
        data.load_feedback(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .parquet files"):
        data.load_feedback(empty)
    with pytest.raises(DataError, match="--label_policy"):
        data.load_feedback(tmp_path, label_policy="majority")


def test_split_filter_and_single_shard(folder):
    # must be ignored for train
    write_shard(folder / "test-00000-of-00001.parquet", [("a cat", "A", "B", 0.0, 1.0)])
    assert set(data.load_feedback(folder)["uid"]) == EXPECTED["won_once"][0] | EXPECTED["won_once"][1]
    # one shard, recognised by its columns
    single = data.load_feedback(folder / "train-00000-of-00002.parquet")
    assert dict(zip(single["uid"], single["desirable"])) == {"A": True, "B": False, "C": True}


def test_labels_only_copy_cannot_train(tmp_path):
    root = make_folder(tmp_path / "noimg")
    for f in root.glob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(["jpg_0", "jpg_1"]), f)
    table = data.load_feedback(root)
    assert table.attrs["stats"]["num_desirable"] == len(EXPECTED["won_once"][0])
    with pytest.raises(DataError, match="labels but no images"):
        data.FeedbackDataset(table, root, 32)


def test_hub_id_reads_the_cached_shards(tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub's cache to the same folder code (offline: a hand-made cache)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "datasets--someone--pickapic_tiny"
    make_folder(repo / "snapshots" / commit / "data")
    write_shard(
        repo / "snapshots" / commit / "data" / "validation-00000-of-00001.parquet",
        [("a cat", "A", "B", 0.0, 1.0)],
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    table = data.load_feedback("someone/pickapic_tiny")
    assert set(table["uid"][table["desirable"]]) == EXPECTED["won_once"][0]
    assert set(table["uid"][~table["desirable"]]) == EXPECTED["won_once"][1]
    assert Path(table.attrs["stats"]["label_cache"]).exists()
    with pytest.raises(DataError, match="hf download someone/not_cached"):
        data.load_feedback("someone/not_cached")


def test_csv_path_unchanged(tmp_path):
    (tmp_path / "likes.csv").write_text("image,caption,label\nmissing.png,x,1\n")
    with pytest.raises(DataError, match="does not exist"):
        data.load_feedback(tmp_path / "likes.csv")
    with pytest.raises(DataError, match="no such file. Pass a .csv"):
        data.load_feedback(tmp_path / "nope.csv")


def test_a_missing_relative_table_is_missing_not_a_hub_dataset(tmp_path, monkeypatch):
    """data/likes.csv has the shape of owner/name; a table suffix says it is a file that is not there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no such file. Pass a .csv"):
        data.load_feedback("data/likes.csv")


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


def parquet_bytes() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": ["a.png"] * 50, "caption": ["x"] * 50, "label": [1] * 50}), buf)
    return buf.getvalue()


def damaged_parquet_bytes() -> bytes:
    """A parquet file whose footer (the schema) reads, but whose first data page is overwritten."""
    raw = bytearray(parquet_bytes())
    raw[4:34] = b"\xff" * 30
    return bytes(raw)


ROWS = "image,caption,label\na.png,a café,1\nb.png,a dog,0\n"
JSONL = '{"image": "a.png", "caption": "x", "label": 1}\n{"image": "b.png", "caption": "y", "label": 0}\n'


def test_every_table_format_reads_the_same_rows(tmp_path):
    """The four table formats load_feedback reads (.csv, .jsonl, .json, .parquet) give the same table."""
    import pandas as pd

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    rows = pd.DataFrame(
        {
            "image": ["a.png", "b.png", "a.png"],
            "caption": ["a café", "a dog", "x"],
            "label": [1, 0, "desirable"],
        }
    )
    rows.astype({"label": str}).to_csv(tmp_path / "t.csv", index=False)
    rows.to_json(tmp_path / "t.jsonl", orient="records", lines=True, force_ascii=False)
    rows.to_json(tmp_path / "t.json", orient="records", force_ascii=False)
    rows.astype({"label": str}).to_parquet(tmp_path / "t.parquet")
    tables = [data.load_feedback(tmp_path / f"t.{kind}") for kind in ("csv", "jsonl", "json", "parquet")]
    for table in tables:
        assert table["caption"].tolist() == ["a café", "a dog", "x"]
        assert table["desirable"].tolist() == [True, False, True]
        assert [Path(str(v)).name for v in table["image"]] == ["a.png", "b.png", "a.png"]


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("empty.csv", b"", r"the file is empty \(0 bytes\)"),
        ("empty.jsonl", b"", r"the file is empty \(0 bytes\)"),
        ("empty.parquet", b"", r"the file is empty \(0 bytes\)"),
        ("image.csv", png_bytes(), r"not a text file: its first bytes are those of a PNG image"),
        ("utf16.csv", ROWS.encode("utf-16"), r"UTF-16 .*save it as UTF-8"),
        ("utf16le.csv", ROWS.encode("utf-16-le"), r"looks like UTF-16 text.*save it as UTF-8"),
        (
            "latin1.csv",
            ROWS.encode("latin-1"),
            r"not UTF-8 text \(byte 0xe9 on line 2, offset 31,.*save it as UTF-8",
        ),
        (
            "semicolon.csv",
            ROWS.replace(",", ";").encode(),
            r"one column 'image;caption;label'.*delimiter looks wrong.*semicolon",
        ),
        ("tab.csv", ROWS.replace(",", "\t").encode(), r"delimiter looks wrong.*tab-separated"),
        ("truncated.jsonl", JSONL.encode()[:-20], r"line 2 is not valid JSON.*looks truncated"),
        ("invalid.jsonl", JSONL.replace("{", "[", 1).encode(), r"line 1 is not valid JSON"),
        ("truncated.parquet", parquet_bytes()[:300], r"not a readable parquet file.*truncated"),
        ("damaged.parquet", damaged_parquet_bytes(), r"a damaged parquet file"),
        ("ragged.csv", (ROWS + "c.png,x,1,extra,more\n").encode(), r"not a well-formed CSV file \(.*line 4"),
        (
            "latin1.jsonl",
            JSONL.replace('"x"', '"café"').encode("latin-1"),
            r"not UTF-8 text \(byte 0xe9 on line 1",
        ),
    ],
)
def test_malformed_table_files_are_refused_with_what_is_wrong(tmp_path, capsys, name, content, problem):
    """A table file that cannot be read says which file, what is wrong and what was expected: a DataError, and
    through train_kto.main a message and exit code 2, no traceback."""
    import train_kto

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        data.load_feedback(path)
    message = str(e.value)
    assert message.startswith(f"--dataset {path}: ") and "Expected " in message, message
    assert re.search(problem, message), message
    args = ["--tiny", "--pretrained_model", str(fixtures.tiny_model_path()), "--dataset", str(path)]
    with pytest.raises(SystemExit) as e:
        train_kto.main([*args, "--validation_steps", "0", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err


def test_a_table_with_a_header_and_no_rows_is_refused(tmp_path):
    (tmp_path / "t.csv").write_text("image,caption,label\n")
    with pytest.raises(DataError, match="the table has no rows"):
        data.load_feedback(tmp_path / "t.csv")


def test_first_caption_wins_and_conflicts_are_counted():
    comparisons = pa.table(
        {
            "caption": ["first", "second", "other"],
            "label_0": [1.0, 0.0, 0.5],
            "label_1": [0.0, 1.0, 0.5],
            "image_0_uid": ["A", "A", "B"],
            "image_1_uid": ["B", "C", "C"],
            "shard": np.zeros(3, np.int32),
            "row": np.arange(3, dtype=np.int64),
        }
    )
    table, stats = pickapic.pickapic_labels(comparisons, "won_once")
    assert table.column("uid").to_pylist() == ["A", "B", "C"]
    assert table.column("caption").to_pylist() == ["first", "first", "second"]
    # A: "first" and "second"; the tie's caption is not counted
    assert stats["images_with_several_captions"] == 1


def test_train_kto_on_a_pickapic_folder(tmp_path):
    """The issue's end-to-end check: --tiny training on a Pick-a-Pic folder records the won_once counts."""
    import json

    import train_kto

    folder = tmp_path / "pickapic"
    folder.mkdir()
    make_folder(folder)
    expected = data.load_feedback(folder, label_policy="always_won")
    train_kto.main(
        [
            "--tiny",
            "--pretrained_model",
            str(fixtures.tiny_model_path()),
            "--dataset",
            str(folder),
            "--label_policy",
            "always_won",
            "--max_train_steps",
            "2",
            "--validation_steps",
            "0",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["label_policy"] == "always_won" and run["data"]["num_desirable"] == run["num_desirable"]
    counts = (int(expected.desirable.sum()), int((~expected.desirable).sum()))
    assert (run["num_desirable"], run["num_undesirable"]) == counts
    assert (tmp_path / "out" / "checkpoint-2" / "unet").is_dir()


def test_image_cells_datasets_dicts_and_bad_cells(tmp_path):
    """A parquet column of datasets' Image dicts reads as the bytes (or the path when the bytes are null), and the
    table's fingerprint and dataset work on it; a missing, empty or numeric image cell is a DataError naming the
    row, not a TypeError when the data are fingerprinted."""
    import pandas as pd

    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "red.png")
    cells = [{"bytes": png_bytes(), "path": None}, {"bytes": None, "path": "red.png"}]
    pd.DataFrame({"image": cells, "caption": ["a", "b"], "label": ["1", "0"]}).to_parquet(
        tmp_path / "t.parquet"
    )
    table = data.load_feedback(tmp_path / "t.parquet")
    assert table["image"].tolist() == [png_bytes(), "red.png"]
    assert data.fingerprint(table, tmp_path)["rows"] == 2
    dataset = data.FeedbackDataset(table, tmp_path, 8)
    assert dataset[1]["pixel_values"][0].mean() > 0.5  # the red file
    for n, (rows, problem) in enumerate(
        [
            ('{"caption": "x", "label": 1}\n', "row 1 .* is empty"),  # no "image" key: NaN
            ('{"image": null, "caption": "x", "label": 1}\n', "row 1 .* is empty"),
            ('{"image": "", "caption": "x", "label": 1}\n', "row 1 .* is empty"),
            ('{"image": 7, "caption": "x", "label": 1}\n', r"row 1 .* is a int \('7'\)"),
        ]
    ):
        path = tmp_path / f"bad{n}.jsonl"
        path.write_text('{"image": "red.png", "caption": "x", "label": 0}\n' + rows)
        with pytest.raises(DataError, match=f"column 'image', {problem}.*fill in the cell or drop the row"):
            data.load_feedback(path)


def test_csv_image_names_are_paths_and_must_be_files(tmp_path):
    """A CSV's image column is text: files named 0 and 1 are paths (not numbers taken for bytes); an empty cell
    or a folder is refused with the row."""
    for name in ("0", "1"):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG")
    (tmp_path / "t.csv").write_text("image,caption,label\n0,a,1\n1,b,0\n")
    table = data.load_feedback(tmp_path / "t.csv")
    assert table["image"].tolist() == ["0", "1"]
    assert data.fingerprint(table, tmp_path)["rows"] == 2
    (tmp_path / "folder").mkdir()
    for rows, problem in [
        ("0,a,1\n,b,0\n", "row 1 .* is empty"),
        ("0,a,1\nfolder,b,0\n", "row 1: .*not a file"),
    ]:
        (tmp_path / "t.csv").write_text("image,caption,label\n" + rows)
        with pytest.raises(DataError, match=f"column 'image', {problem}"):
            data.load_feedback(tmp_path / "t.csv")


@pytest.mark.parametrize("suffix", [".parquet", ".json"])
def test_a_table_saved_with_a_shuffled_index_is_read_by_position(tmp_path, suffix):
    """A parquet or pandas .json written from a filtered or shuffled DataFrame keeps its index; rows are still
    counted by position, and each image keeps its own caption and label."""
    import pandas as pd

    save = lambda t: (
        t.to_parquet(tmp_path / f"t{suffix}") if suffix == ".parquet" else t.to_json(tmp_path / "t.json")
    )
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    rows = pd.DataFrame(
        {
            "image": ["a.png", "b.png", "missing.png"],
            "caption": ["of a", "of b", "x"],
            "label": ["1", "0", "1"],
        }
    )
    rows.index = [40, 7, 12]
    save(rows)
    with pytest.raises(DataError, match=r"column 'image', row 2: image file 'missing.png' does not exist"):
        data.load_feedback(tmp_path / f"t{suffix}")
    shuffled = pd.DataFrame(
        {"image": ["c.png", "a.png", "b.png"], "caption": ["of c", "of a", "of b"], "label": [0, 1, 0]}
    )
    save(shuffled.sample(frac=1, random_state=1))  # index 2, 0, 1 (or another order): saved with the rows
    table = data.load_feedback(tmp_path / f"t{suffix}")
    pairs = {(i, c, d) for i, c, d in zip(table["image"], table["caption"], table["desirable"])}
    assert pairs == {("c.png", "of c", False), ("a.png", "of a", True), ("b.png", "of b", False)}


def test_json_tables_with_a_byte_order_mark(tmp_path):
    """Windows tools write UTF-8 with a BOM; .jsonl and .json read like .csv does, with or without one."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    bom = b"\xef\xbb\xbf"
    (tmp_path / "t.jsonl").write_bytes(bom + JSONL.encode())
    (tmp_path / "t.json").write_bytes(bom + b"[" + b",".join(JSONL.encode().splitlines()) + b"]")
    for name in ("t.jsonl", "t.json"):
        table = data.load_feedback(tmp_path / name)
        assert table["caption"].tolist() == ["x", "y"] and table["desirable"].tolist() == [True, False]


def test_exif_orientation_is_applied(tmp_path):
    """A photo stored sideways with an EXIF orientation tag (6: rotate 90 degrees clockwise) is turned upright."""
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # stored: blue left half, red right half
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=95)
    buf.seek(0)
    (tmp_path / "photo.jpg").write_bytes(buf.getvalue())
    for source in (buf.getvalue(), "photo.jpg"):
        upright = data.load_image(source, tmp_path)
        assert upright.size == (20, 40)  # portrait
        top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
        assert top[0] < 50 < top[2] and bottom[0] > 200  # blue on top after a clockwise turn, red below


def test_a_damaged_shard_is_named_with_what_to_do(folder):
    """A truncated shard, or one whose label columns are damaged, stops with a DataError naming the shard and
    saying to re-download it (not pyarrow's bare ArrowInvalid); so does a shard damaged after the labels were read."""
    shard = folder / "train-00001-of-00002.parquet"
    whole = shard.read_bytes()
    table = data.load_feedback(folder)
    expected = rf"{re.escape(str(shard))}: a damaged parquet shard .*Re-download this shard"
    shard.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=expected):
        data.FeedbackDataset(table, folder, 32)
    with pytest.raises(DataError, match=expected):
        data.load_feedback(folder)
    # the footer intact, the caption column's bytes overwritten
    raw, meta = bytearray(whole), pq.ParquetFile(io.BytesIO(whole)).metadata
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            if col.path_in_schema == "caption":
                start = col.dictionary_page_offset or col.data_page_offset
                raw[start : start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=expected):
        data.load_feedback(folder)


def test_a_folder_missing_shards_warns_and_counts_them(tmp_path, monkeypatch):
    """A folder with 2 of the 3 shards its names promise (train-*-of-00003) trains on those (a subset may be on
    purpose) with a warning that says how many are missing (rank 0's); the stats record both counts. No warning when
    all are there, nor for a single shard given on purpose."""
    shards = SHARDS + [[("a fox", "H", "E", 1.0, 0.0)]]
    for k in (0, 2):
        write_shard(tmp_path / f"train-{k:05d}-of-00003-abc.parquet", shards[k])
    with pytest.warns(UserWarning, match=r"2 of the 3 shards .* 1 are missing.*download the rest"):
        table = data.load_feedback(tmp_path)
    assert (table.attrs["stats"]["shards"], table.attrs["stats"]["shards_expected"]) == (2, 3)
    assert set(table["uid"]) == {"A", "B", "C", "H", "E"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with monkeypatch.context() as m:  # under torchrun only rank 0 says it, not once per rank
            m.setenv("RANK", "1")
            assert data.load_feedback(tmp_path).attrs["stats"]["shards_expected"] == 3
        data.load_feedback(tmp_path / "train-00000-of-00003-abc.parquet")
        write_shard(tmp_path / "train-00001-of-00003-abc.parquet", shards[1])
        stats = data.load_feedback(tmp_path).attrs["stats"]
    assert (stats["shards"], stats["shards_expected"]) == (3, 3)


def test_images_in_table_order_read_each_row_group_column_once(folder, monkeypatch):
    """Read in table order (as the latent cache is built), each (shard, row group, jpg column) is read from the
    file once, not once per image; every image is still its own (its colour), and a pickled dataset (a worker's
    copy) carries nothing that was read."""
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_group",
        lambda pf, g, columns: reads.append((g, *columns)) or real(pf, g, columns),
    )
    table = data.load_feedback(folder)
    dataset = data.FeedbackDataset(table, folder, 32)
    for i, uid in enumerate(table["uid"]):
        source = dataset._source(i)
        if uid not in CORRUPT:
            assert data.load_image(source).getpixel((5, 5)) == pytest.approx(COLOR[uid], abs=3)
    wanted = {
        (s, r // 2, c) for s, r, c in zip(table["shard"], table["row"], table["column"])
    }  # groups of 2 rows
    assert len(reads) == len(wanted) < len(table)
    assert pickle.loads(pickle.dumps(dataset))._group == (None, {})


def test_a_16_bit_png_keeps_its_greys_and_32_bit_images_are_refused(tmp_path):
    """A 16-bit greyscale PNG is scaled to 8 bits (value >> 8), not clipped at 255 by convert("RGB")."""
    values = np.arange(0, 65536, 4096, dtype=np.uint16).reshape(1, 16).repeat(4, 0)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    rgb = np.asarray(data.load_image("deep.png", tmp_path))
    assert (rgb[..., 0] == values >> 8).all() and (rgb[..., 0] == rgb[..., 2]).all()
    # 32-bit greyscale has no known range (convert("RGB") would clip the integers, blacken floats in [0, 1]):
    # the image is refused, so training counts it as a corrupt one and says why
    for name, deep in (("int", values.astype(np.int32) * 1000), ("float", values.astype(np.float32) / 65536)):
        Image.fromarray(deep).save(tmp_path / f"{name}.tif")
        with pytest.raises(ValueError, match=f"32-bit {name}.*convert it to an 8-bit image"):
            data.load_image(f"{name}.tif", tmp_path)


def test_a_missing_caption_is_empty_in_every_column_type(tmp_path):
    import pandas as pd

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    rows = pd.DataFrame(
        dict(image=[png.getvalue()] * 3, caption=["a cat", None, float("nan")], label=[1, 0, 1])
    )
    # object columns keep None and NaN; convert_dtypes() makes a nullable string column, whose missing value
    # is NA
    for name, table in (("object", rows), ("nullable", rows.convert_dtypes())):
        table.to_parquet(tmp_path / f"{name}.parquet")
        read = data.load_feedback(tmp_path / f"{name}.parquet")
        assert read["caption"].tolist() == ["a cat", "", ""], name


def test_a_caption_cell_that_holds_several_captions_is_refused(tmp_path):
    import pandas as pd

    rows = pd.DataFrame(dict(image=[png_bytes()] * 4, caption=["a cat"] * 4, label=[1, 0, 1, 0]))
    # a parquet list column comes back as numpy arrays; JSON Lines lists as lists; a struct as a dict
    several = (
        ("list.parquet", ["a cat", "a red cat"]),
        ("struct.parquet", {"en": "a red cat"}),
        ("list.jsonl", ["a cat", "a red cat"]),
    )
    for name, cell in several:
        table = rows.assign(caption=[cell] * 4)
        table.caption = table.caption.astype(object)
        if name.endswith(".parquet"):
            table.to_parquet(tmp_path / name)
        else:
            table.assign(image=[f"{i}.png" for i in range(4)]).to_json(
                tmp_path / name, orient="records", lines=True
            )
            for i in range(4):
                Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        with pytest.raises(DataError, match="column 'caption', row 0 .*4 such rows.* not one caption"):
            data.load_feedback(tmp_path / name)


def test_a_csv_quote_that_pandas_would_read_leniently_is_refused(tmp_path):
    for i in range(12):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    lines = [f"{i}.png,a cat {i},{i % 2}" for i in range(12)]
    (tmp_path / "ok.csv").write_text("image,caption,label\n" + "\n".join(lines) + "\n")
    assert len(data.load_feedback(tmp_path / "ok.csv")) == 12
    # an unclosed quote in row 4, closed in row 8: pandas merged rows 4-8 into one cell, with row 8's label
    unclosed = lines[:4] + ['4.png,"a cat 4,0'] + lines[5:8] + ['8.png,a dog",1'] + lines[9:]
    (tmp_path / "unclosed.csv").write_text("image,caption,label\n" + "\n".join(unclosed) + "\n")
    with pytest.raises(DataError, match="column 'caption', row 4 .0-based. holds a line break"):
        data.load_feedback(tmp_path / "unclosed.csv")
    # a caption that begins with a quoted phrase: pandas dropped the quotes
    quoted = lines[:2] + ['2.png,"Starry Night" painting of a cat,0'] + lines[3:]
    (tmp_path / "quoted.csv").write_text("image,caption,label\n" + "\n".join(quoted) + "\n")
    with pytest.raises(DataError, match="line 4: .*must end with one"):
        data.load_feedback(tmp_path / "quoted.csv")
    # quoted whole, with the quotes inside doubled: read as written
    fixed = lines[:2] + ['2.png,"""Starry Night"" painting of a cat",0'] + lines[3:]
    (tmp_path / "fixed.csv").write_text("image,caption,label\n" + "\n".join(fixed) + "\n")
    assert data.load_feedback(tmp_path / "fixed.csv")["caption"][2] == '"Starry Night" painting of a cat'


def test_an_image_compared_with_itself_is_counted():
    comparisons = pa.table(
        dict(
            caption=pa.array(["a cat", "a dog", "a dog"], pa.large_string()),
            label_0=[1.0, 0.0, 0.5],
            label_1=[0.0, 1.0, 0.5],
            image_0_uid=pa.array(["A", "B", "A"], pa.large_string()),
            image_1_uid=pa.array(["A", "C", "A"], pa.large_string()),  # a tie of A with itself: no preference
            shard=np.zeros(3, np.int32),
            row=np.arange(3),
        )
    )
    table, stats = pickapic.pickapic_labels(comparisons, "won_once")
    assert stats["self_comparisons"] == 1
    # it won there (and lost): desirable under the paper's rule
    assert dict(zip(table["uid"].to_pylist(), table["desirable"].to_pylist())) == {
        "A": True,
        "B": False,
        "C": True,
    }
