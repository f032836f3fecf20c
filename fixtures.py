"""Test and demo fixtures: stand-ins for the Hugging Face hub, built by the repository itself, offline.

Nothing here is part of the method or is needed to train on real data:
- the tiny model: tiny_world.build_tiny_model's random-weight, Stable-Diffusion-shaped pipeline, built once into
  the cache; a small labelled CSV dataset of tiny-world drawings (the fast tests); perturb_norms, which moves a
  random model's norm weights off 1 and 0 so that precision tests see their rounding;
- the tiny v-prediction model: the tiny model with SD 2.1's v-prediction scheduler config (its plumbing only);
- the tiny SDXL model: a random-weight, SDXL-shaped pipeline (two text encoders, pooled text and size
  conditioning), built once into the cache;
- the tiny scorers: the five paper scorers (scorers.py) with tiny random weights, each saved in the format of its
  real weights (eval.py --tiny);
- synthetic Pick-a-Pic v2 shards and the benchmarks of the label conversion and of the image reads;
- SD v1-5's and SDXL base 1.0's architectures with random weights (`python fixtures.py sd15-random FOLDER`,
  `python fixtures.py sdxl-random FOLDER`, for benchmarks only).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from scorers import METRICS, mlp_head
from tiny_world import TINY_VAE, WORDS, build_clip_tokenizer, build_tiny_model, sample_world
from utils import atomic_path, build_once, cache_dir, silence_torchvision_notice

# ----------------------------------------------------------------------------------------------------
# Synthetic Pick-a-Pic v2: its columns and types, tiny images (the benchmark and data tests)


def write_synthetic_pickapic(
    folder: Path,
    n_rows: int,
    rows_per_shard: int = 1500,
    seed: int = 0,
    tie_fraction: float = 0.1,
    images_per_prompt: int = 4,
) -> list[Path]:
    """Write train-*.parquet shards with Pick-a-Pic v2's columns and types (for the benchmark and tests).

    Images are grouped by prompt; each comparison pairs two images of one prompt. The image columns reuse a
    few tiny PNGs (the label conversion never reads them)."""
    rng = np.random.default_rng(seed)
    n_images = max(2 * images_per_prompt, n_rows)
    tiny = []
    for color in [(200, 30, 30), (30, 200, 30), (30, 30, 200)]:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), color).save(buf, format="PNG")
        tiny.append(buf.getvalue())
    prompt_of_first = rng.integers(0, n_images // images_per_prompt, n_rows)
    a = prompt_of_first * images_per_prompt + rng.integers(0, images_per_prompt, n_rows)
    # another image of the same prompt, never a itself
    other = (a % images_per_prompt + rng.integers(1, images_per_prompt, n_rows)) % images_per_prompt
    b = prompt_of_first * images_per_prompt + other
    win0 = rng.random(n_rows) < 0.5
    tie = rng.random(n_rows) < tie_fraction
    label_0 = np.where(tie, 0.5, win0.astype(np.float64))
    uid_of = np.array([f"{x:016x}{y:016x}" for x, y in rng.integers(0, 2**62, (n_images, 2))], dtype=object)
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = -(-n_rows // rows_per_shard)
    paths = []
    for s in range(n_shards):
        sl = slice(s * rows_per_shard, min(n_rows, (s + 1) * rows_per_shard))
        m = sl.stop - sl.start
        ua, ub = uid_of[a[sl]], uid_of[b[sl]]
        t = pa.table(
            {
                "are_different": np.ones(m, bool),
                "best_image_uid": np.where(label_0[sl] == 1, ua, np.where(label_0[sl] == 0, ub, "")),
                "caption": [
                    f"prompt {p}: a photograph of a small synthetic scene" for p in prompt_of_first[sl]
                ],
                "created_at": pa.array(np.full(m, 1_700_000_000_000_000, "datetime64[us]")),
                "has_label": np.ones(m, bool),
                "image_0_uid": ua,
                "image_0_url": [f"https://example.invalid/{u}.png" for u in ua],
                "image_1_uid": ub,
                "image_1_url": [f"https://example.invalid/{u}.png" for u in ub],
                "jpg_0": pa.array([tiny[k] for k in a[sl] % 3], pa.binary()),
                "jpg_1": pa.array([tiny[k] for k in b[sl] % 3], pa.binary()),
                "label_0": label_0[sl],
                "label_1": 1.0 - label_0[sl],
                "model_0": ["sd-1.5"] * m,
                "model_1": ["sdxl"] * m,
                "ranking_id": np.arange(sl.start, sl.stop),
                "user_id": rng.integers(0, 10_000, m),
                "num_example_per_prompt": np.ones(m, np.int64),
            }
        )
        path = folder / f"train-{s:05d}-of-{n_shards:05d}.parquet"
        pq.write_table(t, path)
        paths.append(path)
    return paths


def benchmark_image_reads(
    folder: str | Path = "/tmp/pickapic-reads", n_rows: int = 2000, kb: int = 250
) -> dict:
    """Time FeedbackDataset._source on Pick-a-Pic-like shards of n_rows comparisons with two image columns of kb KB
    of random (incompressible, as JPEG is) bytes each, written with row groups of 1,000 and of 100 rows: 400 images
    read in table order (as the latent cache is built: a comparison's jpg_0 then its jpg_1, row after row) and 400
    at random (as training draws them). Prints and returns ms per image. Command:
        python -c "import fixtures; fixtures.benchmark_image_reads()"
    """
    import data

    rng, result = np.random.default_rng(0), {}
    for group in (1000, 100):
        path = Path(folder) / f"train-00000-of-00001-rg{group}.parquet"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            images = [pa.array([rng.bytes(kb * 1024) for _ in range(n_rows)], pa.binary()) for _ in range(2)]
            pq.write_table(pa.table({"jpg_0": images[0], "jpg_1": images[1]}), path, row_group_size=group)
        table = pd.DataFrame(
            {
                "caption": "x",
                "desirable": np.arange(2 * n_rows) % 2 == 0,
                "shard": pd.Categorical([str(path)] * (2 * n_rows)),
                "row": np.arange(2 * n_rows) // 2,
                "column": pd.Categorical.from_codes(np.arange(2 * n_rows) % 2, categories=["jpg_0", "jpg_1"]),
            }
        )
        for order, items in [("table order", range(400)), ("random", rng.integers(0, 2 * n_rows, 400))]:
            dataset = data.FeedbackDataset(table, path.parent, 64)
            dataset._source(2 * n_rows - 1)  # open the file and warm up, in the last row group
            t0 = time.perf_counter()
            for i in items:
                dataset._source(int(i))
            result[f"rows per group {group}, {order}"] = ms = (time.perf_counter() - t0) / len(items) * 1000
            print(f"row groups of {group} rows, {order}: {ms:.1f} ms per image")
    return result


def benchmark_pickapic_labels(n_rows: int = 1_000_000, folder: str | Path | None = None) -> dict:
    """Time the label conversion of n_rows synthetic comparisons (real schema, 1,500 rows per shard as on the
    hub) in a fresh process; prints and returns seconds, peak RSS and the counts. Command:
        python -c "import fixtures; fixtures.benchmark_pickapic_labels(1_000_000)"
    """
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(folder or tmp) / f"pickapic-synthetic-{n_rows}"
        if not folder.exists():
            t0 = time.perf_counter()
            write_synthetic_pickapic(folder, n_rows)
            print(f"wrote {n_rows:,} comparisons to {folder} in {time.perf_counter() - t0:.1f} s")
        shutil.rmtree(folder / ".diffusion_kto", ignore_errors=True)
        code = (
            "import json, resource, time, pickapic\n"
            "t0 = time.perf_counter()\n"
            f"table = pickapic.load_pickapic({str(folder)!r})\n"
            "t1 = time.perf_counter()\n"
            f"pickapic.load_pickapic({str(folder)!r})\n"
            "t2 = time.perf_counter()\n"
            "print(json.dumps(dict(convert_s=t1 - t0, cached_s=t2 - t1,\n"
            "    peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **table.attrs['stats'])))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
    print(
        f"{n_rows:,} comparisons -> {result['num_desirable']:,} desirable / {result['num_undesirable']:,} "
        f"undesirable: {result['convert_s']:.1f} s (cached: {result['cached_s']:.2f} s), "
        f"peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    return result


# ----------------------------------------------------------------------------------------------------
# The tiny model and the small CSV dataset of the fast tests: world drawings labelled from their drawing parameters
# (tiny_world.world_utility measures the same preference on pixels, which is what generated images need)

# bump when the tiny model (tiny_world.build_tiny_model) or dataset change, so stale caches are rebuilt
TINY_VERSION = "v2"


def tiny_model_path() -> Path:
    return build_once(cache_dir() / f"tiny-model-{TINY_VERSION}", build_tiny_model)


def tiny_vpred_model_path() -> Path:
    """The tiny model with a v-prediction scheduler (as SD 2.1 at 768 px): the plumbing of v-prediction models. Its
    UNet was trained to predict noise, so its images mean nothing; the training target and sampling follow the
    scheduler config, which is what this model exercises."""

    def build(path: Path):
        shutil.copytree(tiny_model_path(), path, dirs_exist_ok=True)
        config = path / "scheduler" / "scheduler_config.json"
        config.write_text(
            json.dumps(dict(json.loads(config.read_text()), prediction_type="v_prediction"), indent=2)
        )

    return build_once(cache_dir() / f"tiny-model-vpred-{TINY_VERSION}", build)


def tiny_dataset_path() -> Path:
    return build_once(cache_dir() / f"tiny-data-{TINY_VERSION}", build_tiny_dataset) / "data.csv"


def build_tiny_dataset(path: Path, n: int = 256, resolution: int = 32, seed: int = 0) -> None:
    """Write n world images as PNGs and data.csv (image, caption, label); desirable = utility >= 0.5."""
    rng = np.random.default_rng(seed)
    (path / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        image, caption, utility = sample_world(rng, resolution)
        image.save(path / "images" / f"{i:05d}.png")
        rows.append({"image": f"images/{i:05d}.png", "caption": caption, "label": int(utility >= 0.5)})
    pd.DataFrame(rows).to_csv(path / "data.csv", index=False)


def perturb_norms(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every GroupNorm/LayerNorm weight and bias away from 1 and 0 (in place): random models hold exactly 1
    and 0 there, which bf16 and fp16 store exactly, so they hide any rounding of norm parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


# ----------------------------------------------------------------------------------------------------
# SD v1-5's architecture with RANDOM weights (benchmarks only): python fixtures.py sd15-random FOLDER

# SD v1-5's published configs, no weights
SD15_CONFIGS = Path(__file__).parent / "configs" / "sd15"


def build_sd15_random(path: Path, seed: int = 0) -> None:
    """SD v1-5's architecture (UNet, VAE, CLIP ViT-L/14 text encoder, scheduler), RANDOM weights, diffusers layout."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    # offline tiny vocabulary (ids < 49408)
    tokenizer = build_clip_tokenizer(WORDS, path / "tokenizer")
    # SD's CLIP context
    tokenizer.model_max_length = 77
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIGS / "vae")),
        text_encoder=CLIPTextModel(
            CLIPTextConfig.from_json_file(SD15_CONFIGS / "text_encoder" / "config.json")
        ),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIGS / "unet")),
        scheduler=PNDMScheduler.from_config(PNDMScheduler.load_config(SD15_CONFIGS / "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)


# ----------------------------------------------------------------------------------------------------
# SDXL base 1.0's architecture with RANDOM weights (benchmarks only): python fixtures.py sdxl-random FOLDER

# SDXL base 1.0's published configs, no weights
SDXL_CONFIGS = Path(__file__).parent / "configs" / "sdxl"


def build_sdxl_random(path: Path, seed: int = 0) -> None:
    """SDXL base 1.0's architecture (UNet, VAE, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders, scheduler),
    RANDOM weights, diffusers layout."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    # offline tiny vocabulary (ids < 49408), SD's CLIP context; tokenizer_2 pads with "!" as SDXL's
    tokenizer, tokenizer_2 = (
        build_clip_tokenizer(WORDS, path / name) for name in ("tokenizer", "tokenizer_2")
    )
    tokenizer_2.pad_token = "!"
    for name, tok in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)):
        tok.model_max_length = 77
        tok.save_pretrained(path / name)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_CONFIGS / "vae")),
        text_encoder=CLIPTextModel(
            CLIPTextConfig.from_json_file(SDXL_CONFIGS / "text_encoder" / "config.json")
        ),
        text_encoder_2=CLIPTextModelWithProjection(
            CLIPTextConfig.from_json_file(SDXL_CONFIGS / "text_encoder_2" / "config.json")
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIGS / "unet")),
        scheduler=EulerDiscreteScheduler.from_config(
            EulerDiscreteScheduler.load_config(SDXL_CONFIGS / "scheduler")
        ),
        # as SDXL base's model_index.json
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(path)


# ----------------------------------------------------------------------------------------------------
# The tiny SDXL model: SDXL base's shape (two CLIP text encoders, the UNet's "text_time" conditioning on the pooled
# text embedding and the six size numbers, the VAE's fp32 decoding and scale) at the tiny model's size

# bump when build_tiny_sdxl changes, so stale caches are rebuilt
TINY_SDXL_VERSION = "v1"


def tiny_sdxl_model_path() -> Path:
    return build_once(cache_dir() / f"tiny-sdxl-{TINY_SDXL_VERSION}", build_tiny_sdxl)


def build_tiny_sdxl(path: Path, seed: int = 0) -> None:
    """Save a random-weight, SDXL-shaped StableDiffusionXLPipeline (32 px images, 8x8x4 latents) in diffusers layout.

    The sizes differ where SDXL's may be confused: text encoder 1 is 32 wide and text encoder 2 48, so the UNet
    attends to 80-wide token embeddings (the two encoders' penultimate hidden states, concatenated); the pooled
    embedding is 24 wide; each of the 6 time ids (original size, crop corner, target size) is embedded in 8, so
    the UNet's added embedding takes 6 * 8 + 24 = 72 numbers. Norm weights are perturbed (perturb_norms)."""
    silence_torchvision_notice()
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(WORDS, path / "tokenizer")
    tokenizer_2 = build_clip_tokenizer(WORDS, path / "tokenizer_2")
    # as SDXL's tokenizer_2: it pads with "!" (id 0), tokenizer pads with <|endoftext|>
    tokenizer_2.pad_token = "!"
    tokenizer_2.save_pretrained(path / "tokenizer_2")

    def clip_config(tok, width: int, act: str, projection_dim: int):
        return CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=projection_dim,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )

    # SDXL: CLIP ViT-L/14's text tower (quick_gelu), then OpenCLIP ViT-bigG/14's with its projection (gelu)
    text_encoder = CLIPTextModel(clip_config(tokenizer, 32, "quick_gelu", 32))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer_2, 48, "gelu", 24))
    # SDXL's VAE: decoded in fp32 (it overflows in fp16), latents scaled by 0.13025
    vae = AutoencoderKL(**TINY_VAE, force_upcast=True, scaling_factor=0.13025)
    # SDXL's block layout: no attention in the first (widest) block, several transformer layers per block after it,
    # linear projections in and out of the transformers, heads given as counts in attention_head_dim
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_encoder_2.config.projection_dim,
    )
    for i, module in enumerate((unet, text_encoder, text_encoder_2)):
        perturb_norms(module, seed + i)
    scheduler = EulerDiscreteScheduler.from_config(
        EulerDiscreteScheduler.load_config(SDXL_CONFIGS / "scheduler")
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        # as SDXL base: without a negative prompt, guidance's unconditional embeddings are zeros, not those of ""
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(path)


# ----------------------------------------------------------------------------------------------------
# Tiny scorers (eval.py --tiny)
# The five paper scorers with tiny RANDOM weights, each saved in the format of its real weights, so that the real
# loading code of scorers.py runs offline. Their scores test the plumbing only and say nothing about image quality.

# bump when the tiny scorers change, so stale caches are rebuilt
TINY_SCORERS_VERSION = "v2"


def tiny_clip(tokenizer, seed: int, image_size: int = 32):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(
        CLIPConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                hidden_act="gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=image_size,
                patch_size=8,
                hidden_act="gelu",
            ),
            projection_dim=16,
        )
    ).eval()


def hf_to_openclip(sd: dict) -> dict:
    """Inverse of scorers.openclip_to_hf (only to write the tiny HPS file in OpenCLIP's format)."""
    inverse = {}
    for k, v in sd.items():
        if k in ("text_projection.weight", "visual_projection.weight"):
            inverse["text_projection" if k.startswith("text") else "visual.proj"] = v.t()
        elif ".encoder.layers." in k:
            tower, rest = k.split(".encoder.layers.")
            i, name = rest.split(".", 1)
            prefix = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{i}."
            if "self_attn." in name and "out_proj" not in name:
                kind = name.rsplit(".", 1)[1]
                proj = name.split(".")[1][0]
                inverse.setdefault(prefix + f"attn.in_proj_{kind}", {})[proj] = v
                continue
            for a, b in {
                "layer_norm1": "ln_1",
                "layer_norm2": "ln_2",
                "mlp.fc1": "mlp.c_fc",
                "mlp.fc2": "mlp.c_proj",
                "self_attn.out_proj": "attn.out_proj",
            }.items():
                name = name.replace(a, b) if name.startswith(a) else name
            inverse[prefix + name] = v
        else:
            for a, b in {
                "text_model.embeddings.token_embedding": "token_embedding",
                "text_model.embeddings.position_embedding.weight": "positional_embedding",
                "text_model.final_layer_norm": "ln_final",
                "vision_model.embeddings.class_embedding": "visual.class_embedding",
                "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
                "vision_model.embeddings.patch_embedding": "visual.conv1",
                "vision_model.pre_layrnorm": "visual.ln_pre",
                "vision_model.post_layernorm": "visual.ln_post",
            }.items():
                k = k.replace(a, b) if k.startswith(a) else k
            inverse[k] = v
    return {k: torch.cat([v["q"], v["k"], v["v"]]) if isinstance(v, dict) else v for k, v in inverse.items()}


def build_tiny_scorers(path: Path) -> None:
    """Write the five tiny scorers, each in the format of its real weights, under path/<metric>/."""
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    words = [*WORDS, "dog", "cat"]
    # PickScore and CLIP: CLIPModel folders, like the hub repos
    for seed, name in enumerate(("pickscore", "clip")):
        tokenizer = build_clip_tokenizer(words, path / name)
        tiny_clip(tokenizer, seed).save_pretrained(path / name)
    # HPS: a CLIP config and tokenizer, and the weights with OpenCLIP's keys under "state_dict"
    tokenizer = build_clip_tokenizer(words, path / "hps")
    model = tiny_clip(tokenizer, 2)
    model.config.save_pretrained(path / "hps")
    sd = hf_to_openclip(model.state_dict())
    torch.save({"epoch": 1, "state_dict": sd}, path / "hps" / "HPS_v2_compressed.pt")
    # aesthetic: a CLIP folder and the .pth head beside it
    tokenizer = build_clip_tokenizer(words, path / "aesthetic")
    tiny_clip(tokenizer, 3).save_pretrained(path / "aesthetic")
    torch.manual_seed(4)
    torch.save(mlp_head(16).state_dict(), path / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")
    # ImageReward: BLIP-keyed ImageReward.pt + med_config.json (+ a BERT tokenizer, which the real repo lacks)
    torch.manual_seed(5)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + words + list("abcdefghijklmnopqrstuvwxyz0123456789"))}
    tokenizer = BertTokenizer(vocab=vocab)
    tokenizer.save_pretrained(path / "imagereward")
    med = dict(
        architectures=["BertModel"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        vocab_size=len(vocab),
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        model_type="bert",
        add_cross_attention=True,
        encoder_width=32,
        pad_token_id=0,
        bos_token_id=2,
        sep_token_id=3,
    )
    (path / "imagereward" / "med_config.json").write_text(json.dumps(med, indent=2))
    vision = BlipVisionModel(
        BlipVisionConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=1,
            image_size=32,
            patch_size=8,
            layer_norm_eps=1e-6,
        )
    )
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            encoder_hidden_size=64,
            is_decoder=True,
            bos_token_id=2,
            sep_token_id=3,
        ),
        add_pooling_layer=False,
    )
    vision_names = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding": "patch_embed.proj",
        "post_layernorm": "norm",
        "layer_norm1": "norm1",
        "layer_norm2": "norm2",
        "self_attn.qkv": "attn.qkv",
        "self_attn.projection": "attn.proj",
        "encoder.layers": "blocks",
    }
    sd = {}
    for k, v in vision.state_dict().items():
        for a, b in vision_names.items():
            k = k.replace(a, b)
        sd["blip.visual_encoder." + k] = v
    sd.update({"blip.text_encoder." + k: v for k, v in text.state_dict().items()})
    sd.update({"mlp." + k: v for k, v in mlp_head(32).state_dict().items()})
    # present in the real file, unused by the score
    sd["blip.vision_proj.weight"] = torch.randn(8, 64)
    torch.save(sd, path / "imagereward" / "ImageReward.pt")


def tiny_scorer_paths() -> dict:
    """{metric: folder} of the five tiny scorers, built once into the cache."""
    root = build_once(cache_dir() / f"tiny-scorers-{TINY_SCORERS_VERSION}", build_tiny_scorers)
    return {m: root / m for m in METRICS}


# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    """python fixtures.py {sd15-random,sdxl-random} FOLDER: the folder to pass as --pretrained_model in benchmarks."""
    import argparse

    models = {
        "sd15-random": ("SD v1-5's architecture", build_sd15_random),
        "sdxl-random": ("SDXL base 1.0's architecture", build_sdxl_random),
    }
    parser = argparse.ArgumentParser(
        description="Build Stable Diffusion v1-5's (configs/sd15) or SDXL base 1.0's (configs/sdxl) architecture "
        "with RANDOM weights into a folder, for speed and memory benchmarks: "
        "python train_kto.py --pretrained_model FOLDER ..."
    )
    parser.add_argument("what", choices=list(models), help="the model to build")
    parser.add_argument(
        "folder",
        type=Path,
        help="where to write it (diffusers layout; about 4.3 GB for sd15, 13.9 GB for sdxl)",
    )
    args = parser.parse_args(argv)
    if args.folder.exists():
        parser.error(f"{args.folder} exists; choose a new folder")
    name, build = models[args.what]
    args.folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.folder) as tmp:
        tmp.mkdir()
        build(tmp)
    print(
        f"wrote {args.folder}: {name} with RANDOM weights; a model trained from it is "
        "meaningless (benchmarks and memory checks only)"
    )


if __name__ == "__main__":
    main()
