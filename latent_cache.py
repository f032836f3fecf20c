"""--cache_latents: every image's VAE posterior (both flips with --random_flip) and size, and every caption's text
embeddings (SDXL: with the pooled one), encoded once into <cache>/latents-*.pt and text-*.pt, shared out over ranks
chunk by chunk, each chunk written atomically (a killed run resumes the build where it stopped), and read back
memory-mapped. A cache is reused only with the settings it was built with (settings.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from utils import DataError, TrainingError, agree, atomic_path, disk_full_message, is_disk_full, torch_save

# How images and captions become cache entries (data.FeedbackDataset's decoding, the encoders); raised whenever that
# code changes what a cache holds, so a cache built by older code is refused, not reused.
# 2: EXIF orientation applied, 16-bit PNGs scaled to 8 bits (2026-12-06); 3: 32-bit images (modes I, F)
# refused as corrupt, not clipped; --label_policy no longer in the settings: the data's fingerprint has the
# labels (2026-12-07)
FORMAT = 3

CACHE_CHUNK = (
    256  # images (or captions) per cache file: the unit of work shared out over ranks and of resuming
)


def cache_files(n_images: int, n_captions: int) -> list[str]:
    return [f"text-{k:06d}.pt" for k in range(math.ceil(n_captions / CACHE_CHUNK))] + [
        f"latents-{k:06d}.pt" for k in range(math.ceil(n_images / CACHE_CHUNK))
    ]


def check_settings(folder: Path, settings: dict, rank: int):
    """A cache is reused only for the same model, data, resolution, flips, dtype and FORMAT; rank 0 records them,
    atomically (another rank reading at that moment sees no file or the whole one)."""
    settings = dict(settings, format=FORMAT)
    file = folder / "settings.json"
    if file.exists() and json.loads(file.read_text()) != settings:
        raise DataError(
            f"--cache_dir {folder} holds a latent cache made with other settings ({file}); "
            f"delete it or choose another --cache_dir. Wanted: {settings}"
        )
    if rank == 0 and not file.exists():
        with atomic_path(file) as tmp:
            tmp.write_text(json.dumps(settings, indent=2))


class CachedLatents(torch.utils.data.Dataset):
    """--cache_latents: per image the VAE posterior's mean and std [views, 4, h, w] (view 1 = flipped image), its
    size (as data.FeedbackDataset's) and its caption's text embeddings (emb, and SDXL's pooled), memory-mapped from
    <cache>/latents-*.pt and text-*.pt.

    A corrupt image's row is never read: its stand-in is chosen now, as `images` (the data.FeedbackDataset)
    chooses it for this run's held-out split, which may not be the split of the run that built the cache
    (another --seed)."""

    def __init__(self, folder: Path, images):
        self.desirable, self.images = images.desirable, images
        self.latents = [
            torch.load(f, mmap=True, weights_only=True) for f in sorted(folder.glob("latents-*.pt"))
        ]
        self.text = [torch.load(f, mmap=True, weights_only=True) for f in sorted(folder.glob("text-*.pt"))]
        # Caption 0 is "" (caption dropout)
        self.empty = {k: v[0] for k, v in self.text[0].items()}

    def __len__(self):
        return len(self.desirable)

    def __getitem__(self, i: int) -> dict:
        corrupt = 0
        # A row whose own image was corrupt holds the stand-in of the split it was built with: skip it
        while int(self.latents[i // CACHE_CHUNK]["corrupt"][i % CACHE_CHUNK]):
            corrupt += 1
            i = self.images.stand_in(i, corrupt)
        part, j = self.latents[i // CACHE_CHUNK], i % CACHE_CHUNK
        c = int(part["caption_id"][j])
        text = self.text[c // CACHE_CHUNK]
        return dict(
            mean=part["mean"][j],
            std=part["std"][j],
            size=part["size"][j],
            **{k: v[c % CACHE_CHUNK] for k, v in text.items()},
            desirable=self.desirable[i],
            corrupt=corrupt,
        )


def build(folder: Path, dataset, captions: list[str], inputs, cfg, rank, world_size):
    """Encode the chunks of CACHE_CHUNK images / captions not yet on disk, chunk k on rank k % world_size, each
    written atomically (a killed run resumes where it stopped). Images are encoded in both flips (view 1 flipped)
    with --random_flip, else unflipped only."""
    caption_id, failed = {c: i for i, c in enumerate(captions)}, None
    for name in cache_files(len(dataset), len(captions))[rank::world_size]:
        file, k = folder / name, int(name[-9:-3])
        if file.exists():
            continue
        rows = range(
            k * CACHE_CHUNK, min((k + 1) * CACHE_CHUNK, len(captions if name.startswith("text") else dataset))
        )
        with torch.no_grad(), inputs.autocast:
            if name.startswith("text"):
                parts = [
                    inputs.text([captions[i] for i in rows[n : n + 64]]) for n in range(0, len(rows), 64)
                ]
                part = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
            else:
                part = dict(mean=[], std=[], size=[], caption_id=[], corrupt=[])
                for batch in torch.utils.data.DataLoader(
                    torch.utils.data.Subset(dataset, rows),
                    batch_size=cfg.train_batch_size,
                    num_workers=cfg.dataloader_workers,
                ):
                    pixels = batch["pixel_values"]
                    views = [
                        inputs.posterior(p)
                        for p in ([pixels, pixels.flip(-1)] if cfg.random_flip else [pixels])
                    ]
                    part["mean"].append(torch.stack([m for m, _ in views], 1))
                    part["std"].append(torch.stack([s for _, s in views], 1))
                    part["size"].append(batch["size"])
                    part["caption_id"].append(torch.tensor([caption_id[c] for c in batch["caption"]]))
                    part["corrupt"].append(batch["corrupt"])
                part = {key: torch.cat(v) for key, v in part.items()}
        part = {key: v.cpu().contiguous() for key, v in part.items()}
        try:
            with atomic_path(file) as tmp:
                torch_save(part, tmp)
        except Exception as e:
            if not is_disk_full(e):
                raise
            # a chunk's size, times the chunks not on disk yet
            missing = sum(not (folder / f).exists() for f in cache_files(len(dataset), len(captions)))
            failed = disk_full_message(
                e, folder, missing * sum(v.nbytes for v in part.values()), "the latent cache"
            )
            break
    # every rank learns whether every chunk was written (a barrier too)
    failed = agree(failed, world_size)
    if failed:
        raise TrainingError(failed)
