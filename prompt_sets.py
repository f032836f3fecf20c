"""The evaluation prompts: the paper's sets (Pick-a-Pic v2 test, the HPS v2 benchmark, PartiPrompts; fetched once,
then cached), the tiny world's held-out captions, or a file of your own; and the evenly spaced subset that
--num_prompts takes. Prompt ids are indices in the full set: eval.py's seeds follow them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd

import scorers
import tiny_world
import utils
from utils import DataError

NAMED_PROMPTS = ("pickapic_test", "hps", "parti")
PROMPT_COLUMNS = ("prompt", "Prompt", "caption")
PARTI_URL = "https://raw.githubusercontent.com/google-research/parti/main/PartiPrompts.tsv"
HPS_FILES = ("anime.json", "concept-art.json", "paintings.json", "photo.json")  # 800 prompts each


def read_prompt_file(path: Path) -> list[str]:
    """Prompts from .txt (one per line) or a table with a column prompt, Prompt or caption; empty ones
    dropped. A .csv's fields may be quoted; a .tsv's are read as they are, quotes included."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        return [line.strip() for line in lines if line.strip()]
    if suffix == ".csv":
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif suffix == ".tsv":
        # tabs alone separate fields: a prompt that starts with a quote (PartiPrompts' '"G I G G L E" painted
        # ...') keeps it
        table = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)
    elif suffix == ".jsonl":
        table = pd.read_json(path, lines=True, dtype=False)
    elif suffix == ".parquet":
        table = pd.read_parquet(path)
    else:
        raise DataError(
            f"--prompts {path}: unsupported file type '{suffix}'. Use .txt (one prompt per line) or a "
            f".csv/.tsv/.jsonl/.parquet table with a column named {', '.join(PROMPT_COLUMNS)}."
        )
    column = next((c for c in PROMPT_COLUMNS if c in table.columns), None)
    if column is None:
        raise DataError(
            f"--prompts {path}: no column named {', '.join(PROMPT_COLUMNS)}. Found columns: "
            f"{', '.join(map(str, table.columns))}."
        )
    texts = [
        "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip() for v in table[column]
    ]
    return [t for t in texts if t]


def download_named_prompts(name: str) -> list[str]:
    """The paper's prompt sets; they need the network once (then the usual hub / datasets caches)."""
    how = "No network? Fetch the set once elsewhere and pass it as a local file: --prompts prompts.txt"
    try:
        if name == "pickapic_test":
            import datasets

            ds = datasets.load_dataset(
                "yuvalkirstain/pickapic_v2",
                split="test_unique",
                data_files={"test_unique": "data/test_unique-*"},
            )
            return list(dict.fromkeys(str(c).strip() for c in ds["caption"]))  # unique, in order
        if name == "parti":
            dest = utils.cache_dir() / "prompts" / "PartiPrompts.tsv"
            if not dest.exists():
                scorers.download(PARTI_URL, dest)
            return read_prompt_file(dest)
        from huggingface_hub import hf_hub_download

        prompts = []
        # HPS v2 benchmark: the same files the hpsv2 package downloads
        for f in HPS_FILES:
            path = hf_hub_download("zhwang/HPDv2", f"benchmark/{f}", repo_type="dataset")
            prompts += json.loads(Path(path).read_text())
        return prompts
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"--prompts {name}: could not download the prompt set ({type(e).__name__}: {e}). {how}"
        ) from e


def load_prompts(spec: str) -> list[str]:
    if spec == "tiny":
        return tiny_world.eval_prompts()
    if spec in NAMED_PROMPTS:
        prompts = download_named_prompts(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(
                f"--prompts {spec}: not a named set ({', '.join(NAMED_PROMPTS)}) and no such file. "
                f"Pass a named set or a .txt/.csv/.tsv/.jsonl/.parquet file."
            )
        prompts = read_prompt_file(path)
    if not prompts:
        raise DataError(f"--prompts {spec}: no (non-empty) prompts found.")
    return prompts


def subset_indices(prompts: list[str], k: int) -> list[int]:
    """k prompt ids spread evenly over the set (all of them when k is 0 or >= its size): deterministic, covers every
    style. Every distinct text comes before a repeat of any: a set of repeated prompts (the tiny one: 8 captions x 32)
    would otherwise give the same caption k times."""
    n = len(prompts)
    if k <= 0 or k >= n:
        return list(range(n))
    # each prompt's repeat number: 0 for its text's first appearance, 1 for the second, ...
    counts: dict[str, int] = {}
    repeat = []
    for p in prompts:
        repeat.append(counts.get(p, 0))
        counts[p] = repeat[-1] + 1
    # whole rounds of repeats while they fit, then the next round's prompts evenly spaced
    chosen: list[int] = []
    for r in range(max(repeat) + 1):
        group, left = [i for i in range(n) if repeat[i] == r], k - len(chosen)
        chosen += group if left >= len(group) else [group[(j * len(group)) // left] for j in range(left)]
    return sorted(chosen)
