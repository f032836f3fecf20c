"""The like/dislike data: tables of (image, caption, label) or Pick-a-Pic v2 (labels from pickapic.py), their
fingerprint, the rows held out of training (heldout.split), and the dataset that decodes the images into the
[-1, 1] tensors a Stable Diffusion VAE expects (PIL + torch, no torchvision) with each image's size and crop
(SDXL's size conditioning). What the UNet sees of them (VAE latents, caption embeddings) is encoders.py's.
Everything is checked before any model loads: a bad file or column stops with a message that says what and how to
fix (utils.DataError)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps

import heldout
from pickapic import LABEL_POLICIES, is_hub_dataset, is_pickapic_parquet, load_pickapic, read_schema
from utils import DataError

# ----------------------------------------------------------------------------------------------------
# Images


def load_image(source, base_dir: Path | None = None) -> Image.Image:
    """An RGB PIL image from a path (relative to base_dir) or from encoded bytes (PNG, JPEG, ...), turned upright
    as its EXIF orientation says (phone photos are often stored sideways with such a tag): to_rgb."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return to_rgb(Image.open(io.BytesIO(bytes(source))))
    path = Path(source)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return to_rgb(Image.open(path))


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright (EXIF orientation) and RGB; 16-bit greyscale (a 16-bit PNG) scaled to 8 bits, which convert("RGB")
    would clip at 255 instead. 32-bit integer or float greyscale (TIFF modes "I", "F") has no range to scale
    from: refused (ValueError), where convert("RGB") would clip or blacken it."""
    if image.mode in ("I", "F"):
        raise ValueError(
            f"a 32-bit {'integer' if image.mode == 'I' else 'float'} greyscale image (mode {image.mode}) "
            "has no fixed range of values to map to 8 bits; convert it to an 8-bit image"
        )
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    return image.convert("RGB")


def crop_box(w: int, h: int, resolution: int) -> tuple[int, int, int, int]:
    """Where image_to_tensor crops an image of w x h: (resized width, resized height, left, top)."""
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    return new_w, new_h, (new_w - resolution) // 2, (new_h - resolution) // 2


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, center-crop a square, scale to [-1, 1]; returns [3, H, W]."""
    new_w, new_h, left, top = crop_box(*image.size, resolution)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------------------------------
# Like/dislike datasets: a table with columns image, caption, label

LABEL_VALUES = {
    "1": True,
    "1.0": True,
    "true": True,
    "desirable": True,
    "0": False,
    "0.0": False,
    "false": False,
    "undesirable": False,
}


REQUIRED_COLUMNS = ("image", "caption", "label")


TABLE_KINDS = {
    ".csv": "a comma-separated UTF-8 text file whose first line is image,caption,label",
    ".jsonl": "UTF-8 text, one JSON object per line with keys image, caption, label",
    ".json": "a UTF-8 JSON table with keys image, caption, label",
    ".parquet": "a parquet table with columns image, caption, label",
}
# The first bytes of binary files that are sometimes given a table's name
MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"PAR1": "a parquet file",
    b"PK\x03\x04": "a zip archive (an .xlsx spreadsheet is one)",
    b"\x1f\x8b": "a gzip archive",
    b"\xd0\xcf\x11\xe0": "an old Excel/Office file",
}
# Delimiters that leave a comma-separated reader with the whole header as one column
OTHER_DELIMITERS = {";": "semicolon", "\t": "tab", "|": "pipe"}


def unreadable(path: Path, problem: str) -> DataError:
    """The DataError for a table file that cannot be read: the file, what is wrong, what is expected."""
    expected = TABLE_KINDS[path.suffix.lower()]
    return DataError(f"--dataset {path}: {problem}. Expected {expected}.")


def check_text_file(path: Path):
    """Refuse an empty file, a binary file and UTF-16/32 text before a text reader sees them (a reader would
    fail with its own error, or worse, read garbage). Text that is not UTF-8 is caught when read."""
    with open(path, "rb") as f:
        head = f.read(8192)
    if not head.strip():
        raise unreadable(path, "the file is empty" + (" (0 bytes)" if not head else " (only blank lines)"))
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise unreadable(path, "the file is UTF-16 (or UTF-32) text; save it as UTF-8")
    kind = next((k for magic, k in MAGIC.items() if head.startswith(magic)), None)
    if kind:
        raise unreadable(path, f"not a text file: its first bytes are those of {kind}")
    if b"\x00" in head:
        # UTF-16 text without a byte order mark: ASCII characters with a zero byte before or after each
        zeros = max(head[0::2].count(0), head[1::2].count(0))
        if zeros > 0.4 * len(head) / 2:
            raise unreadable(
                path, "the file looks like UTF-16 text (a zero byte beside each character); save it as UTF-8"
            )
        raise unreadable(path, "not a text file: it holds zero bytes, as binary files do")


def not_utf8(path: Path) -> DataError:
    """The DataError for text that is not UTF-8, naming the first bad byte (a reader's error counts from the
    start of its chunk, not of the file)."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
        where = ""
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        where = f" (byte 0x{raw[e.start]:02x} on line {line}, offset {e.start}, is not valid UTF-8)"
    return unreadable(
        path,
        f"the file is not UTF-8 text{where}; Latin-1 or Windows-1252, as some spreadsheet programs write, "
        "looks like this: save it as UTF-8",
    )


def wrong_delimiter(path: Path, header: str) -> DataError | None:
    """A DataError if the header line looks separated by something other than commas, else None."""
    for delimiter, name in OTHER_DELIMITERS.items():
        if delimiter in header and "," not in header:
            return unreadable(
                path,
                f"the header came out as one column {header!r}: the delimiter looks wrong (the file seems "
                f"{name}-separated, the reader expects commas); save it comma-separated",
            )
    return None


def read_csv(path: Path) -> pd.DataFrame:
    check_text_file(path)
    try:
        table = pd.read_csv(path, keep_default_na=False, dtype={"image": str, "caption": str, "label": str})
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except pd.errors.ParserError as e:
        with open(path, encoding="utf-8", errors="replace") as f:
            header = f.readline().rstrip("\r\n")
        raise wrong_delimiter(path, header) or unreadable(
            path, f"not a well-formed CSV file ({' '.join(str(e).split())})"
        ) from None
    if len(table.columns) == 1 and not set(REQUIRED_COLUMNS) <= set(table.columns):
        problem = wrong_delimiter(path, str(table.columns[0]))
        if problem:
            raise problem
    check_csv_quotes(path, table)
    return table


def check_csv_quotes(path: Path, table: pd.DataFrame):
    """pandas reads a stray double quote without a word: a caption that begins with a quoted phrase loses its
    quotes, and an unclosed quote merges the lines after it into one cell (their rows lost, the last one's label
    kept). Python's strict CSV reader refuses the first; a line break in a cell shows the second."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, strict=True)
        try:
            for _ in reader:
                pass
        except csv.Error as e:
            raise unreadable(
                path,
                f"line {reader.line_num}: {e}: a field that begins with a double quote must end with one. "
                "Quote a caption that begins with a quote whole, doubling the quotes inside: "
                '"""Starry Night"" painting"',
            ) from None
    for column in (c for c in ("image", "caption", "label") if c in table):
        broken = np.flatnonzero(table[column].astype(str).str.contains("[\r\n]", regex=True).to_numpy())
        if len(broken):
            raise unreadable(
                path,
                f"column {column!r}, row {broken[0]} (0-based) holds a line break ({len(broken)} such "
                "cells): a double quote opened in that row and closed rows later merges those lines into this "
                "cell. Close or double the quote (one caption per line; line breaks within a caption: replace "
                "them by spaces)",
            )


def read_json(path: Path, lines: bool) -> pd.DataFrame:
    check_text_file(path)
    try:
        return pd.read_json(path, lines=lines, dtype=False, encoding="utf-8-sig")  # with or without a BOM
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except ValueError as e:
        problem = f"not valid JSON ({e})"
    if lines:
        # name the first line that is not JSON
        text = path.read_text(encoding="utf-8-sig").splitlines()
        for n, line in enumerate(text, 1):
            try:
                json.loads(line or "{}")
            except json.JSONDecodeError as e:
                problem = f"line {n} is not valid JSON at column {e.colno} ({e.msg})"
                if n == len(text) and not path.read_bytes().endswith(b"\n"):
                    problem += ": the file looks truncated (its last line stops mid-record)"
                break
    raise unreadable(path, problem)


def read_parquet_schema(path: Path) -> list[str]:
    """The column names of a parquet file; a DataError for an empty, truncated or non-parquet file."""
    if path.stat().st_size == 0:
        raise unreadable(path, "the file is empty (0 bytes)")
    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise unreadable(
            path,
            f"not a readable parquet file ({e}); it may be truncated (an interrupted download or copy) or "
            "another format under a .parquet name",
        ) from None


def read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv(path)
    if suffix in (".jsonl", ".json"):
        return read_json(path, lines=suffix == ".jsonl")
    if suffix == ".parquet":
        read_parquet_schema(path)
        try:
            return pd.read_parquet(path)
        except (pa.ArrowException, OSError) as e:
            raise unreadable(path, f"a damaged parquet file ({e})") from None
    raise DataError(
        f"--dataset {path}: unsupported file type '{suffix}'. Expected a .csv, .jsonl, .json or .parquet file "
        f"with columns {', '.join(REQUIRED_COLUMNS)}."
    )


def image_cell(v, path: Path, row: int) -> str | bytes:
    """A table's image cell as a path (str) or encoded bytes. A datasets Image dict {"bytes", "path"} gives its
    bytes, or its path when the bytes are null. Anything else (an empty or missing cell, a number) is a DataError
    naming the row (0-based)."""
    if isinstance(v, dict) and ("bytes" in v or "path" in v):
        v = v.get("bytes") if v.get("bytes") is not None else v.get("path")
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, str) and v.strip():
        return v
    missing = v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)) or isinstance(v, str)
    what = "empty" if missing else f"a {type(v).__name__} ({str(v)[:40]!r})"
    raise DataError(
        f"--dataset {path}: column 'image', row {row} (0-based) is {what}. Expected the image's path (relative "
        f"to {path.parent}, or absolute) or its encoded bytes; fill in the cell or drop the row."
    )


def load_feedback(path: str | Path, label_policy: str = "won_once") -> pd.DataFrame:
    """Read and check a like/dislike table. Returns columns caption, desirable (bool) and where the image is.

    A .csv/.jsonl/.json/.parquet file with columns image, caption, label: `image` is a path relative to the
    table's folder (or absolute), or the image's encoded bytes (a datasets Image dict gives its bytes, or its
    path); rows are counted from 0 by position; `label` is 1/0, true/false or
    desirable/undesirable. Raises DataError naming the file, the column or row, and what was expected.
    A folder (or a single shard) with Pick-a-Pic v2 columns, or a hub dataset id: pairwise preferences turned
    into per-image labels by `label_policy`, see load_pickapic. attrs["stats"] holds the counts.
    """
    if label_policy not in LABEL_POLICIES:
        raise DataError(f"--label_policy {label_policy!r}: expected one of {', '.join(LABEL_POLICIES)}.")
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".parquet":
        # an empty or damaged file: a DataError that names it (before the Pick-a-Pic test reads its schema)
        read_parquet_schema(path)
    if (
        path.is_dir()
        or (not path.exists() and is_hub_dataset(str(path)))
        or (path.is_file() and path.suffix.lower() == ".parquet" and is_pickapic_parquet(path))
    ):
        return load_pickapic(path, label_policy)
    if not path.exists():
        raise DataError(f"--dataset {path}: no such file. Pass a .csv, .jsonl, .json or .parquet file.")
    # rows by position: a DataFrame saved filtered or shuffled (parquet, pandas' .json) keeps its index in the file
    table = read_table(path).reset_index(drop=True)
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
    images = pd.Series([image_cell(v, path, row) for row, v in enumerate(table["image"])], dtype=object)
    is_path = images.map(lambda v: isinstance(v, str)).to_numpy()
    if is_path.any():
        base = path.parent
        exists = np.ones(len(images), bool)
        # base / an absolute path is that path
        exists[is_path] = [(base / p).is_file() for p in images[is_path]]
        if not exists.all():
            row = int(np.flatnonzero(~exists)[0])
            raise DataError(
                f"--dataset {path}: column 'image', row {row}: image file {images.iloc[row]!r} does not exist "
                f"or is not a file (paths are relative to {base}). {int((~exists).sum())} image path(s) are "
                "missing in all."
            )
    # One caption per row: a list, array or dict (several captions per image) would train as its Python text
    several = np.flatnonzero([not pd.api.types.is_scalar(v) for v in table["caption"]])
    if len(several):
        row = int(several[0])
        raise DataError(
            f"--dataset {path}: column 'caption', row {row} (0-based, {len(several)} such rows) holds a "
            f"{type(table['caption'].iloc[row]).__name__}, {str(table['caption'].iloc[row])[:80]!r}, not one "
            "caption. Pick one caption per image, or put each caption in a row of its own (pandas: "
            "DataFrame.explode)."
        )
    # A missing caption (None, NaN, or pandas' NA in a nullable string column) is empty, never the text "<NA>"
    captions = table["caption"].map(lambda v: "" if pd.isna(v) else str(v))
    out = pd.DataFrame({"image": images, "caption": captions, "desirable": labels.astype(bool)})
    out.attrs["stats"] = dict(
        source=str(path),
        num_desirable=int(out["desirable"].sum()),
        num_undesirable=int((~out["desirable"]).sum()),
    )
    return out


class FeedbackDataset(torch.utils.data.Dataset):
    """Decodes one image at a time (in DataLoader workers); nothing is held decoded in memory.

    A Pick-a-Pic table (columns shard, row, column) holds no image bytes, only where they are: each worker
    process keeps its own few open parquet files and reads one row group of one jpg column per image, keeping the
    last row group's columns read (images read in table order, as the latent cache is built, read each once).
    A corrupt image never raises: the next image of the same class (table order, wrapping around; on the same
    side of the held-out split, see keep_apart) replaces it, and the sample's "corrupt" field counts the images
    skipped (0 almost always) so the training loop can sum them and call check_corrupt.
    """

    max_open_files = 64  # parquet files kept open per worker process
    max_corrupt_in_a_row = 100  # then the data are hopeless: raise DataError

    def __init__(self, table: pd.DataFrame, base_dir: Path, resolution: int):
        desirable = np.array(table["desirable"].to_numpy(dtype=bool))  # a writable copy
        self.desirable = torch.as_tensor(desirable, dtype=torch.bool)
        self.base_dir, self.resolution = Path(base_dir), resolution
        # for corrupt-image replacement: the groups of images that may stand in for each other
        self.keep_apart(np.zeros(len(desirable), bool))
        if (
            "shard" in table.columns
        ):  # Pick-a-Pic: numpy/arrow arrays, so forked workers copy no Python objects
            self.images = None
            self.shards = [str(s) for s in table["shard"].cat.categories]
            self.shard = table["shard"].cat.codes.to_numpy(np.int32)
            self.row = table["row"].to_numpy(np.int64)
            self.image_column = [str(c) for c in table["column"].cat.categories]
            self.column = table["column"].cat.codes.to_numpy(np.int8)
            self.captions = pa.array(table["caption"])
            for s in np.unique(self.shard):
                names = read_schema(self.shards[s])
                missing = [c for c in self.image_column if c not in names]
                if missing:
                    raise DataError(
                        f"{self.shards[s]}: no image column(s) {', '.join(missing)}. This copy of Pick-a-Pic has "
                        f"labels but no images (e.g. pickapic_v2_no_images); train on the full copy."
                    )
        else:
            self.images = table["image"].tolist()
            self.captions = table["caption"].tolist()
        self._files, self._pid, self.n_corrupt = OrderedDict(), None, 0
        self._group = (None, {})  # (shard, row group), {column name: its values} of the last row group read

    def __getstate__(self):  # open parquet files and what was read stay in the process that read them
        return {**self.__dict__, "_files": OrderedDict(), "_pid": None, "_group": (None, {})}

    def __len__(self) -> int:
        return len(self.captions)

    def _parquet(self, s: int):
        """(ParquetFile, first row of each row group + total) of shard s, opened once per process (LRU)."""
        if self._pid != os.getpid():  # a forked worker must not share the parent's file offsets
            self._files, self._pid, self._group = OrderedDict(), os.getpid(), (None, {})
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
        # a row group's column is read whole (one image costs as much as all of them): kept until the next group
        if self._group[0] != (self.shard[i], g):
            self._group = ((self.shard[i], g), {})
        columns, name = self._group[1], self.image_column[self.column[i]]
        if name not in columns:
            columns[name] = pf.read_row_group(g, columns=[name]).column(0)
        value = columns[name][row - int(starts[g])].as_py()
        # a copy saved through `datasets` with its Image feature holds {"bytes", "path"}
        return value.get("bytes") if isinstance(value, dict) else value

    def keep_apart(self, held_out: np.ndarray):
        """A corrupt image is replaced only by one of its class on its own side of `held_out` (heldout.split): a
        held-out image never stands in for a training one, nor the reverse."""
        self.group = self.desirable.numpy().astype(np.int64) + 2 * np.asarray(held_out, np.int64)
        self.groups = [np.flatnonzero(self.group == g) for g in range(4)]

    def stand_in(self, i: int, corrupt: int) -> int:
        """The image that stands in for item i, the `corrupt`-th in a row found corrupt: the next one of i's
        group (table order, wrapping around); DataError when every image of the group was tried or 100 in a
        row."""
        same = self.groups[int(self.group[i])]
        if corrupt >= min(self.max_corrupt_in_a_row, len(same)):
            raise DataError(
                f"{corrupt} corrupt images in a row (last: {self._where(i)}); the data are damaged."
            )
        return int(same[(np.searchsorted(same, i, side="right")) % len(same)])

    def _where(self, i: int) -> str:
        if self.images is not None:
            return f"row {i} ({self.images[i] if isinstance(self.images[i], str) else 'bytes'})"
        return f"{self.shards[self.shard[i]]} row {self.row[i]} {self.image_column[self.column[i]]}"

    def __getitem__(self, i: int) -> dict:
        corrupt = 0
        while True:
            # a shard gone or damaged since the start is not a corrupt image: the run stops, resumable
            try:
                source = self._source(i)
            except (OSError, pa.ArrowException) as e:
                raise DataError(
                    f"{self._where(i)}: cannot be read ({type(e).__name__}: {e}). Was the shard moved, deleted or "
                    "damaged during the run? Restore it and go on with --resume latest."
                ) from e
            try:
                if source is None:
                    raise ValueError("no image bytes (null)")
                image = load_image(source, self.base_dir)
                pixels = image_to_tensor(image, self.resolution)
                break
            except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                corrupt += 1
                self.n_corrupt += 1
                try:
                    nxt = self.stand_in(i, corrupt)
                except DataError as stop:
                    raise stop from e
                if self.n_corrupt <= 20 or self.n_corrupt % 100 == 0:
                    warnings.warn(
                        f"corrupt image #{self.n_corrupt} in this process skipped: {self._where(i)}: "
                        f"{type(e).__name__}: {e}; replaced by item {nxt} of the same class",
                        RuntimeWarning,
                    )
                i = nxt
        caption = self.captions[i] if self.images is not None else self.captions[i].as_py()
        # SDXL's size conditioning: the original height and width, the crop's top and left (the same when flipped:
        # the crop is centred, to a pixel where the margin is odd); the other families ignore it
        _, _, left, top = crop_box(*image.size, self.resolution)
        return {
            "pixel_values": pixels,
            "size": torch.tensor([image.height, image.width, top, left]),
            "caption": caption,
            "desirable": self.desirable[i],
            "corrupt": corrupt,
        }


# ----------------------------------------------------------------------------------------------------
# Checks while reading


def check_corrupt(n_corrupt: int, n_seen: int, limit: float = 0.01, min_seen: int = 0) -> None:
    """Raise DataError when more than `limit` of the images seen were corrupt (judged once min_seen were read).

    n_corrupt: sum of the "corrupt" field of the samples drawn; n_seen: images read, corrupt ones included
    (samples drawn + n_corrupt)."""
    if n_seen >= min_seen and n_corrupt > limit * n_seen:
        raise DataError(
            f"{n_corrupt} of the {n_seen} images read so far ({n_corrupt / max(n_seen, 1):.2%}) could not be "
            f"decoded, more than the {limit:.0%} allowed: the data are damaged. The warnings above name the shards "
            f"and rows; re-download those shards (or remove them from --dataset) and restart."
        )


# ----------------------------------------------------------------------------------------------------
# The training data: loaded and checked, its fingerprint, the held-out rows

MIN_IMAGES_TO_JUDGE = 1000  # corrupt images: the 1% limit applies once this many were read


MAX_EMPTY_CAPTIONS = 0.05  # more empty captions than this in a dataset is taken for a broken caption column


def fingerprint(table: pd.DataFrame, base_dir: Path) -> dict:
    """What identifies the training data by content, not by where it lies: the number of rows and a hash of each
    column that training reads (captions, labels, images). Images are hashed by reference: the path as written in
    the table (relative to its folder) or the bytes it holds, plus each image file's size (for Pick-a-Pic, each
    parquet shard's name and size): a stat per file, cheap for a million files, where hashing their contents
    would read the whole dataset. Modification times are left out on purpose: a copied or moved dataset is the
    same data. So an image rewritten in place with the same size goes unnoticed; a changed label, caption, row
    or image file size does not."""

    def digest(columns: dict) -> str:
        rows = pd.util.hash_pandas_object(pd.DataFrame(columns), index=False).to_numpy()
        return hashlib.sha256(rows.tobytes()).hexdigest()[:16]

    if "shard" in table.columns:
        shard = table["shard"].cat
        sizes = [f"{Path(s).name}:{Path(s).stat().st_size}" for s in shard.categories]
        images = dict(
            shard=np.asarray(sizes)[shard.codes], row=table["row"], column=table["column"].astype(str)
        )
    else:
        size = lambda v: (Path(v) if Path(v).is_absolute() else base_dir / v).stat().st_size
        ref = lambda v: f"{v}:{size(v)}" if isinstance(v, str) else hashlib.sha256(v).hexdigest()
        images = dict(image=table["image"].map(ref))
    return dict(
        rows=len(table),
        desirable=int(table["desirable"].sum()),
        labels=digest(dict(desirable=table["desirable"])),
        captions=digest(dict(caption=table["caption"])),
        images=digest(images),
    )


def image_keys(table: pd.DataFrame, base_dir: Path) -> list[str] | None:
    """One key per row, the same for rows of the same image (heldout.split keeps them on one side): the resolved
    path of a path cell, the sha256 of the bytes of a bytes cell. None for Pick-a-Pic: one row per image uid."""
    if "shard" in table.columns:
        return None
    key = lambda v: str((base_dir / v).resolve()) if isinstance(v, str) else hashlib.sha256(v).hexdigest()
    return [key(v) for v in table["image"]]


def load_data(cfg):
    """The feedback table and its FeedbackDataset (with its .fingerprint), checked before any model is loaded, and
    the held-out rows (--heldout_images; none with --heldout_steps 0), kept apart in the dataset. Returns (table,
    dataset, desirable: bool array per row, held_out: bool array per row, counts for run.json: classes,
    held-out images, label policy (Pick-a-Pic only), stats, fingerprint)."""
    table = check_feedback(load_feedback(cfg.dataset, label_policy=cfg.label_policy), cfg)
    dataset = FeedbackDataset(table, Path(cfg.dataset).parent, cfg.resolution)
    dataset.fingerprint = fingerprint(table, Path(cfg.dataset).parent)
    desirable = table["desirable"].to_numpy()
    # Images never trained on (heldout.py); an image in several rows is held out in all of them or in none
    n_held_out = cfg.heldout_images if cfg.heldout_steps else 0
    keys = image_keys(table, Path(cfg.dataset).parent) if n_held_out else None
    held_out = heldout.split(desirable, n_held_out, cfg.seed, keys)
    dataset.keep_apart(held_out)
    counts = dict(
        num_desirable=int(desirable.sum()),
        num_undesirable=int((~desirable).sum()),
        # Images never trained on (counted in the two classes above)
        num_heldout=int(held_out.sum()),
        # Pick-a-Pic's pairs become labels by it; a table has its labels already
        label_policy=cfg.label_policy if "shard" in table.columns else None,
        data=table.attrs.get("stats"),
        fingerprint=dataset.fingerprint,
    )
    return table, dataset, desirable, held_out, counts


def check_feedback(table, cfg):
    """What a readable table can still get wrong for this run: one class only, no desirable sample for SFT, too many
    empty captions. Returns the table."""
    n_d = int(table["desirable"].sum())
    n_u = len(table) - n_d
    if min(n_d, n_u) == 0 and not cfg.allow_one_class and cfg.objective == "kto":
        raise DataError(
            f"--dataset {cfg.dataset}: {n_d} desirable and {n_u} undesirable samples. KTO can learn "
            "from one kind alone, but this is often a labelling mistake: check the label column, or "
            "pass --allow_one_class to train anyway."
        )
    # One class only: every sample drawn is of it, so its loss weight alone decides whether anything trains
    weight = cfg.lambda_u if n_d == 0 else cfg.lambda_d
    if min(n_d, n_u) == 0 and cfg.objective == "kto" and weight == 0:
        raise DataError(
            f"--dataset {cfg.dataset}: only {'undesirable' if n_d == 0 else 'desirable'} samples, and their "
            f"loss weight (--lambda_{'u' if n_d == 0 else 'd'}) is 0: nothing would train."
        )
    if cfg.objective == "sft" and n_d == 0:
        raise DataError(
            f"--dataset {cfg.dataset}: --objective sft trains on desirable samples, and there are none."
        )
    empty = float((table["caption"].str.strip() == "").mean())
    if empty > MAX_EMPTY_CAPTIONS:
        raise DataError(
            f"--dataset {cfg.dataset}: {empty:.0%} of the captions are empty (at most "
            f"{MAX_EMPTY_CAPTIONS:.0%} allowed; caption dropout already trains the unconditional case). "
            "Fill in the caption column or drop those rows."
        )
    return table
