"""What the UNet is conditioned on: the frozen VAE and text encoder(s), and the one place where model families
differ. A model folder says what it is by its own configs, never by a flag:
  - a UNet with `addition_embed_type: text_time` is SDXL-shaped: two text encoders (the penultimate hidden states
    of both, concatenated), the pooled embedding of the second, and each image's size conditioning (time ids:
    original size, crop corner, target size); any other UNet is SD v1-5 / SD 2.1-shaped (one text encoder, its
    last hidden states);
  - `force_zeros_for_empty_prompt` in model_index.json (SDXL's pipelines): the unconditional input is zeros, so a
    dropped caption is zeros too; otherwise it is the embedding of the empty caption, as SD's pipelines use;
  - the VAE's `force_upcast` (SDXL's VAE overflows in fp16): the VAE runs in float32 under fp16; bf16 has
    float32's range and keeps it in bf16. The scheduler's `prediction_type` is read by the objective itself.
Inputs turns a loader batch into the objective's inputs: x0 ~ q(x0 | image) after a random flip (scaled latents),
`cond`, the UNet's keyword inputs for each image's own caption after caption dropout, and `cond_mismatched`, the
same for the caption of the sample each image is paired with (kl_mismatched only): every caption-dependent input
rolled together, while the size conditioning, a property of the image, stays. The training step indexes them by
sample and calls unet(x_t, t, **cond): it never asks which family it trains. Inputs also builds and reads the
--cache_latents files (latent_cache.py) and makes the DataLoader of the training batches (Inputs.loader, its
workers deaf to SIGTERM: ignore_sigterm)."""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path

import torch

import latent_cache


def augment_draws(b: int, gen: torch.Generator, random_flip: bool, caption_dropout: float):
    """Bool masks [b]: flip horizontally (p = 0.5, or never) and drop the caption (p = caption_dropout)."""
    flip = (
        torch.rand(b, generator=gen, device=gen.device) < 0.5
        if random_flip
        else torch.zeros(b, dtype=torch.bool, device=gen.device)
    )
    return flip, torch.rand(b, generator=gen, device=gen.device) < caption_dropout


def augment(
    pixels: torch.Tensor, captions: list[str], gen: torch.Generator, random_flip: bool, caption_dropout: float
):
    """Random horizontal flip (p = 0.5; never without random_flip) and caption dropout (caption -> "" with
    p = caption_dropout); returns the pixels, the captions and the dropout mask."""
    flip, drop = augment_draws(pixels.shape[0], gen, random_flip, caption_dropout)
    pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
    return pixels, ["" if d else c for c, d in zip(captions, drop.tolist())], drop


def is_sdxl(path: str) -> bool:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.load_config(path, subfolder="unet").get("addition_embed_type") == "text_time"


def zeros_for_empty_caption(path: str) -> bool:
    from diffusers import DiffusionPipeline

    return bool(DiffusionPipeline.load_config(path).get("force_zeros_for_empty_prompt", False))


def vae_source(path: str, vae_path: str) -> dict:
    """Where the VAE is: the replacement `vae_path` (--pretrained_vae), else the base model's vae/ folder."""
    return (
        dict(pretrained_model_name_or_path=vae_path)
        if vae_path
        else dict(pretrained_model_name_or_path=path, subfolder="vae")
    )


def native_resolution(path: str, vae_path: str) -> int:
    """The side in pixels of the images the base model makes by default (its pipeline's, eval.py's and the
    validation images'): the UNet's sample_size times the VAE's downsampling, 2^(its blocks - 1)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    blocks = len(AutoencoderKL.load_config(**vae_source(path, vae_path))["block_out_channels"])
    return UNet2DConditionModel.load_config(path, subfolder="unet")["sample_size"] * 2 ** (blocks - 1)


def load_vae(path: str, vae_path: str, dtype: torch.dtype):
    """The VAE (vae_source) in `dtype`, or float32 under fp16 if its config says it overflows there (force_upcast).
    A config without the key (SD v1-5's) counts as no, as in diffusers' SD training scripts."""
    from diffusers import AutoencoderKL

    upcast = dtype == torch.float16 and AutoencoderKL.load_config(**vae_source(path, vae_path)).get(
        "force_upcast"
    )
    return AutoencoderKL.from_pretrained(
        **vae_source(path, vae_path), dtype=torch.float32 if upcast else dtype
    )


def latent_scaling(path: str, vae_path: str, device) -> tuple:
    """(shift, scale) with x0 = (z - shift) * scale, z the VAE's latent: its scaling_factor, and for a VAE
    whose latents are standardised per channel (latents_mean and latents_std in its config, e.g. Playground
    v2.5's VAE; its EDM UNet is refused, models.check_noise_schedule) that standardisation too, the inverse of
    what its pipeline does before decoding (reports.decode_images)."""
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(**vae_source(path, vae_path))
    factor, mean, std = (
        config.get("scaling_factor", 0.18215),
        config.get("latents_mean"),
        config.get("latents_std"),
    )
    if mean is None or std is None:
        return 0.0, factor
    channels = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return channels(mean), factor / channels(std)


def take(inputs: dict, i) -> dict:
    """The UNet's keyword inputs of samples i: every tensor of the (nested) dict indexed along the batch."""
    return {k: take(v, i) if isinstance(v, dict) else v[i] for k, v in inputs.items()}


def unet_inputs(text: dict, sizes: torch.Tensor, resolution: int) -> dict:
    """The UNet's keyword inputs from the caption embeddings `text` (emb, and SDXL's pooled) and the images' sizes
    [B, 4] (original height and width, crop top and left): SDXL's time ids append the target size."""
    if "pooled" not in text:
        return dict(encoder_hidden_states=text["emb"])
    target = torch.tensor([resolution, resolution], dtype=sizes.dtype, device=sizes.device).expand(
        len(sizes), 2
    )
    # float32, whatever the embeddings' dtype: bf16 holds integers exactly only up to 256 (1365 would become 1368)
    time_ids = torch.cat([sizes, target], 1).float()
    return dict(
        encoder_hidden_states=text["emb"],
        added_cond_kwargs=dict(text_embeds=text["pooled"], time_ids=time_ids),
    )


class TextEncoders:
    """The tokenizer(s) and frozen text encoder(s) of a model folder: one (SD v1-5, SD 2.1) or two (SDXL)."""

    def __init__(self, path: str, dtype: torch.dtype, device: torch.device):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.sdxl = is_sdxl(path)
        # SDXL: the second encoder projects its pooled output (the UNet's text_embeds)
        kinds = (
            [("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)] if self.sdxl else [("", CLIPTextModel)]
        )
        self.tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=f"tokenizer{n}") for n, _ in kinds]
        self.encoders = [
            cls.from_pretrained(path, subfolder=f"text_encoder{n}", dtype=dtype)
            .to(device)
            .requires_grad_(False)
            .eval()
            for n, cls in kinds
        ]
        self.device = device

    def components(self) -> dict:
        """As a pipeline names them: text_encoder, tokenizer (and text_encoder_2, tokenizer_2)."""
        names = ["", "_2"][: len(self.encoders)]
        return {
            **{f"text_encoder{n}": e for n, e in zip(names, self.encoders)},
            **{f"tokenizer{n}": t for n, t in zip(names, self.tokenizers)},
        }

    def __call__(self, captions: list[str]) -> dict:
        """{emb: [B, L, D]} (SD: the last hidden states) or {emb, pooled: [B, P]} (SDXL, as its pipeline)."""
        embs, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=self.sdxl)
            embs.append(out.hidden_states[-2] if self.sdxl else out[0])
            pooled = out[0]
        return dict(emb=torch.cat(embs, -1), pooled=pooled) if self.sdxl else dict(emb=embs[0])

    def warn_truncation(self, captions: list[str], sample: int = 20_000):
        """Captions longer than the text encoder's context are cut (as in SD's own training): say how many, once
        (counted on at most `sample` distinct captions, evenly spaced)."""
        tokenizer, step = self.tokenizers[0], max(1, len(captions) // sample)
        lengths = [len(ids) for ids in tokenizer(captions[::step], verbose=False).input_ids]
        n, limit = sum(n > tokenizer.model_max_length for n in lengths), tokenizer.model_max_length
        if n:
            of = f"{n} of {len(lengths)}" + (f" sampled (of {len(captions)})" if step > 1 else "")
            print(
                f"warning: {of} distinct captions are longer than the text encoder's {limit} tokens and are "
                "truncated",
                file=sys.stderr,
            )


def ignore_sigterm(worker_id: int):
    """A DataLoader worker's start: ignore SIGTERM. torchrun and SLURM signal the whole process group on
    preemption; a worker that died of it would fail the step that the training loop finishes and saves. The loop
    stops its workers itself, on every way out (closing Inputs.loader). Module-level: picklable for the spawn start
    method."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Inputs:
    """Turns a loader batch into the objective's inputs (x0, cond, cond_mismatched; see the module docstring), from
    images through the VAE and text encoders, or from the --cache_latents files (built here on first use); both
    paths draw the same random numbers: the same run."""

    def __init__(
        self, cfg, path: str, dataset, captions, dtype, autocast, device, rank, world_size, mismatched=None
    ):
        # The distinct captions, "" first: the dropped-out caption
        captions = list(dict.fromkeys(["", *captions]))
        self.cfg, self.path, self.device, self.dtype = cfg, path, device, dtype or torch.float32
        self.autocast, self.mismatched = autocast, mismatched
        self.shift, self.scale = latent_scaling(path, cfg.pretrained_vae, device)
        self.zero_uncond = zeros_for_empty_caption(path)
        self.cache = (
            Path(cfg.cache_dir or Path(cfg.output_dir) / "latent_cache") if cfg.cache_latents else None
        )
        if not (
            self.cache
            and all((self.cache / f).exists() for f in latent_cache.cache_files(len(dataset), len(captions)))
        ):
            # The VAE and text encoders are loaded only to encode images and captions
            self.text = TextEncoders(path, self.dtype, device)
            self.vae = load_vae(path, cfg.pretrained_vae, self.dtype).to(device).requires_grad_(False).eval()
            if rank == 0:
                self.text.warn_truncation(captions)
        if self.cache:
            self.cache.mkdir(parents=True, exist_ok=True)
            latent_cache.check_settings(
                self.cache,
                dict(
                    pretrained_model=path,
                    pretrained_vae=cfg.pretrained_vae,
                    # the data by content (see data.fingerprint: rows, captions, labels, images): a moved
                    # dataset keeps its cache
                    data=dataset.fingerprint,
                    resolution=cfg.resolution,
                    random_flip=cfg.random_flip,
                    images=len(dataset),
                    captions=len(captions),
                    dtype=str(self.dtype),
                ),
                rank,
            )
            if hasattr(self, "vae"):
                latent_cache.build(self.cache, dataset, captions, self, cfg, rank, world_size)
                del self.vae, self.text
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            self.dataset = latent_cache.CachedLatents(self.cache, dataset)
            self.empty = {k: v.to(device) for k, v in self.dataset.empty.items()}
        else:
            self.dataset = dataset

    def loader(self, sampler, batch_size: int):
        """An endless iterator of batches of `batch_size` in the sampler's order (decoded in worker processes).
        Close it on every way out (contextlib.closing): that stops its workers."""
        workers = self.cfg.dataloader_workers
        batches = iter(
            torch.utils.data.DataLoader(
                self.dataset,
                batch_size=batch_size,
                sampler=sampler,
                num_workers=workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=workers > 0,
                worker_init_fn=ignore_sigterm,
            )
        )
        try:
            yield from batches
        finally:
            # What the iterator does when garbage-collected, done now: an error's traceback can keep it alive
            # until the process exits, and then multiprocessing's exit handler, whose SIGTERM the workers
            # ignore, waits for them forever
            if workers:
                batches._shutdown_workers()

    def components(self) -> dict:
        """The VAE and text encoders by their pipeline names: those loaded, or with a built latent cache the VAE alone
        (loaded now as training loads it: --pretrained_vae's, float32 where fp16 overflows; the text encoders are
        the pipeline's defaults)."""
        if hasattr(self, "vae"):
            return dict(vae=self.vae, **self.text.components())
        return dict(vae=load_vae(self.path, self.cfg.pretrained_vae, self.dtype))

    def posterior(self, pixels: torch.Tensor):
        """The VAE's q(x0 | image) as (mean, std); pixels [B, 3, H, W] in [-1, 1]."""
        # A float32 VAE (fp16 and force_upcast) runs outside autocast
        upcast = self.vae.dtype != self.dtype
        with torch.autocast(self.device.type, enabled=False) if upcast else contextlib.nullcontext():
            latent_dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return latent_dist.mean, latent_dist.std

    def uncond(self, text: dict, drop: torch.Tensor, empty: dict) -> dict:
        """Caption dropout: the dropped samples' embeddings replaced by the unconditional input (zeros for
        force_zeros_for_empty_prompt, else those of the empty caption, `empty`)."""
        return {
            k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), 0 if self.zero_uncond else empty[k], v)
            for k, v in text.items()
        }

    def fixed(self, batch: dict):
        """Inputs without random draws (heldout.py): the posterior mean of the unflipped image, its own caption."""
        sizes = batch["size"].to(self.device)
        if self.cache:
            mean = batch["mean"][:, 0].to(self.device)
            text = {k: batch[k].to(self.device) for k in self.empty}
        else:
            mean, _ = self.posterior(batch["pixel_values"].to(self.device))
            text = self.text(list(batch["caption"]))
        return self.to_x0(mean), unet_inputs(text, sizes, self.cfg.resolution)

    def __call__(self, batch: dict, gen: torch.Generator):
        """(x0 [B, 4, h, w] float32, cond, cond_mismatched or None): cond as unet_inputs."""
        cfg, device, b = self.cfg, self.device, len(batch["desirable"])
        rolled = self.mismatched(b) if self.mismatched else torch.zeros(0, dtype=torch.long)
        sizes = batch["size"].to(device)
        if self.cache:
            flip, drop = augment_draws(b, gen, cfg.random_flip, cfg.caption_dropout)
            mean, std = (
                batch[k].to(device, non_blocking=True)[torch.arange(b, device=device), flip.long()]
                for k in ("mean", "std")
            )
            text = {k: batch[k].to(device, non_blocking=True) for k in self.empty}
            own, other = (
                self.uncond(text, drop, self.empty),
                {k: v[rolled.to(device)] for k, v in text.items()},
            )
        else:
            captions = list(batch["caption"])
            pixels = batch["pixel_values"].to(device, non_blocking=True)
            pixels, captions_in, drop = augment(pixels, captions, gen, cfg.random_flip, cfg.caption_dropout)
            mean, std = self.posterior(pixels)
            # One call for both: each image's caption (dropped: ""), then the captions it is mismatched with
            text = self.text(captions_in + [captions[j] for j in rolled.tolist()])
            own, other = {k: v[:b] for k, v in text.items()}, {k: v[b:] for k, v in text.items()}
            if self.zero_uncond:
                own = self.uncond(own, drop.to(device), None)
        # As diffusers
        x0 = mean + std * torch.randn(mean.shape, generator=gen, device=device, dtype=mean.dtype)
        cond = unet_inputs(own, sizes, cfg.resolution)
        mismatched = unet_inputs(other, sizes, cfg.resolution) if len(rolled) else None
        return self.to_x0(x0), cond, mismatched

    def to_x0(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE's latent as the UNet sees it (latent_scaling), in float32."""
        return ((z - self.shift) * self.scale).float()
