"""The five automatic scorers of the paper's evaluation: Aesthetic, PickScore, ImageReward, CLIP and HPS v2.

Each metric has two functions: locate_<metric>(cfg) resolves every file the scorer reads (a local file or folder,
a URL downloaded once into the cache, or a hub repo; DataError if missing), and load_<metric>(cfg, device) returns
score(images: list[PIL.Image], prompts: list[str]) -> FloatTensor [N]. cfg is anything with the fields
<metric>_path (eval.Config); for clip they are locate_clip_score and load_clip_score (locate_clip and load_clip
load the CLIP models of PickScore and of the CLIP score). All five load through transformers (no open_clip, no
torchvision, no scorer packages): the weights are renamed from their released formats (openclip_to_hf,
blip_to_hf), and images and prompts are prepared as each scorer's authors prepare them (preprocess_*,
clean_openclip_text; sources in docs/evaluation.md).

eval.py is the protocol that uses them (SCORERS names each metric's title and functions); fixtures.py writes tiny
random-weight scorers in the same formats. Add a scorer: its locate/load here, a default in DEFAULT_PATHS, a line
in eval.SCORERS and an --<metric>_path flag in eval.Config.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path

import ftfy
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import utils
from utils import DataError

# the paper's five metrics, in its column order
METRICS = ("aesthetic", "pickscore", "imagereward", "clip", "hps")
AESTHETIC_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
    "sac+logos+ava1-l14-linearMSE.pth"
)
DEFAULT_PATHS = dict(
    aesthetic=AESTHETIC_URL,
    pickscore="yuvalkirstain/PickScore_v1",
    imagereward="THUDM/ImageReward",
    clip="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    hps="xswu/HPSv2",
)


# ----------------------------------------------------------------------------------------------------
# Weights: local paths, URLs and hub repos, each resolved before any image is generated


def download(url: str, dest: Path) -> Path:
    """url into the file dest, written whole or not at all."""
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=60) as r, utils.atomic_path(dest) as tmp:
        tmp.write_bytes(r.read())
    return dest


def resolve_file(spec: str, filename: str, what: str) -> Path:
    """A weights file given as the file, a folder holding it, a URL of the file (downloaded once into the cache, one
    folder per URL) or a hub repo."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise DataError(f"{what}: the folder has no {filename}.")
    if spec.startswith(("http://", "https://")):
        if spec.rsplit("/", 1)[-1] != filename:
            raise DataError(
                f"{what}: a URL must name the file {filename} itself; or pass a folder or hub repo that holds it."
            )
        # one folder per URL: two URLs of files with the same name are two files
        dest = utils.cache_dir() / "scorers" / hashlib.sha256(spec.encode()).hexdigest()[:16] / filename
        try:
            return dest if dest.exists() else download(spec, dest)
        except Exception as e:
            raise DataError(
                f"{what}: could not download {filename} ({type(e).__name__}). Offline? Download it once "
                f"and pass the file (or its folder)."
            ) from e
    return utils.from_hub(spec, filename, what)


def beside(weights: Path, default: str, what: str) -> str:
    """Where the architecture config and tokenizer come from: the weights' folder if it has a config.json
    (the tiny test scorers, local mirrors), else the canonical hub id."""
    return (
        str(weights.parent)
        if (weights.parent / "config.json").exists()
        else utils.resolve_model(default, what)
    )


def from_pretrained(cls, source: str, what: str):
    try:
        return cls.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise DataError(f"{what}: could not load a {cls.__name__} from {source} ({e}).") from e


def load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    # never unpickle arbitrary objects
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------
# Images and prompts, prepared as each scorer's authors prepare them (docs/evaluation.md lists the sources)

# every scorer here normalises with OpenAI CLIP's mean and standard deviation
OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor: uint8 RGB [H, W, 3] -> float32 [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def normalize(pixels: list) -> torch.Tensor:
    return (torch.stack(pixels) - OPENAI_MEAN[:, None, None]) / OPENAI_STD[:, None, None]


def preprocess_hps(images, size: int) -> torch.Tensor:
    """HPS v2 (hpsv2 package: preprocess_val = ToTensor, ResizeMaxSize(size, fill=0), Normalize) and the CLIP score
    of Diffusion-DPO (utils/clip_utils.py builds the same transform from the same open_clip copy).

    The image becomes a float tensor in [0, 1] FIRST, and the float tensor is resized so that its long side is
    `size` (new side = round(side * size / long side)), bicubic with antialiasing as torchvision resizes tensors
    (torchvision >= 0.17; F.interpolate reproduces it): no rounding to uint8, no clamping, so overshoot at edges
    stays. Then zeros pad it to a square (left/top get the smaller half) and it is normalised. Upstream skips the
    resize and the padding when the long side is already `size`; a non-square image would then not fit the model,
    so here it is padded anyway."""
    out = []
    for image in images:
        x = to_tensor(image)
        h, w = x.shape[1:]
        s = size / max(h, w)
        new_h, new_w = round(h * s), round(w * s)
        if (new_h, new_w) != (h, w):
            x = F.interpolate(
                x[None], size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False
            )[0]
        pad_h, pad_w = size - new_h, size - new_w
        out.append(F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)))
    return normalize(out)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) on a PIL image, and transformers' resize to {"shortest_edge": size}: the short
    side becomes `size`, the long side int(size * long / short) (truncated); PIL bicubic."""
    w, h = image.size
    new_long = int(size * max(w, h) / min(w, h))
    return image.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)


def center_crop(image: Image.Image, size: int, offset) -> Image.Image:
    """The size x size square at (offset(width - size), offset(height - size))."""
    left, top = offset(image.width - size), offset(image.height - size)
    return image.crop((left, top, left + size, top + size))


def preprocess_openai_clip(images, size: int) -> torch.Tensor:
    """Aesthetic (improved-aesthetic-predictor feeds OpenAI CLIP's `preprocess`) and ImageReward (its `_transform`,
    the same): Resize(size, BICUBIC) on the PIL image (resize_short_side), CenterCrop(size) with torchvision's
    offset int(round(excess / 2)) (Python round: half to even), RGB, ToTensor, Normalize."""
    return normalize(
        [
            to_tensor(center_crop(resize_short_side(image, size), size, lambda d: int(round(d / 2))))
            for image in images
        ]
    )


def preprocess_pickscore(images, size: int) -> torch.Tensor:
    """PickScore (transformers' CLIPImageProcessor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, its PIL path): RGB,
    shortest edge to `size` (resize_short_side), centre crop at offset floor(excess / 2), rescale to [0, 1],
    Normalize. The crop offset differs from torchvision's by a pixel when the excess is 3 mod 4 (1216 x 832)."""
    return normalize(
        [
            to_tensor(center_crop(resize_short_side(image.convert("RGB"), size), size, lambda d: d // 2))
            for image in images
        ]
    )


def clean_openclip_text(text: str) -> str:
    """open_clip's tokenizer cleans text before BPE: ftfy.fix_text (curly quotes become straight ones, ...), HTML
    entities unescaped twice (&amp;amp; -> &), whitespace runs collapsed, stripped, lower-cased. transformers'
    CLIPTokenizer does only the last three, so HPS v2 and the CLIP score clean prompts here first."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip().lower()


def embedding(output) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features (embedding in .pooler_output); 4.x a tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


# ----------------------------------------------------------------------------------------------------
# PickScore and the CLIP score: CLIPModel folders or hub repos


def locate_clip(spec: str, flag: str) -> dict:
    """A CLIPModel folder or hub id, and its tokenizer's (PickScore's repo has none: ViT-H-14's, as its authors)."""
    what = f"{flag} {spec}"
    model = utils.resolve_model(spec, what)
    local = (Path(spec) / "tokenizer_config.json").exists()
    tokenizer = spec if local else utils.resolve_model(DEFAULT_PATHS["clip"], what)
    return dict(model=model, tokenizer=tokenizer)


def load_clip(where: dict, what: str, device):
    from transformers import CLIPModel, CLIPTokenizer

    model = from_pretrained(CLIPModel, where["model"], what).to(device).eval()
    return model, from_pretrained(CLIPTokenizer, where["tokenizer"], what)


def clip_cosine(model, tokenizer, pixels: torch.Tensor, prompts) -> torch.Tensor:
    """cos(text embedding, image embedding) per (image, prompt) pair, with the CLIP tokenizer's 77-token cut."""
    device = model.device
    tokens = tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
        max_length=model.config.text_config.max_position_embeddings,
    ).to(device)
    img = embedding(model.get_image_features(pixel_values=pixels.to(device))).float()
    txt = embedding(
        model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    ).float()
    return F.cosine_similarity(img, txt, dim=-1)


def locate_pickscore(cfg) -> dict:
    return locate_clip(cfg.pickscore_path, "--pickscore_path")


def load_pickscore(cfg, device):
    model, tokenizer = load_clip(locate_pickscore(cfg), f"--pickscore_path {cfg.pickscore_path}", device)
    size = model.config.vision_config.image_size

    # exp(logit_scale) * cos(text, image): the logit of a CLIP tuned on Pick-a-Pic, about 21
    def score(images, prompts):
        return model.logit_scale.exp().float() * clip_cosine(
            model, tokenizer, preprocess_pickscore(images, size), prompts
        )

    return score


def locate_clip_score(cfg) -> dict:
    return locate_clip(cfg.clip_path, "--clip_path")


def load_clip_score(cfg, device):
    """Diffusion-DPO's CLIP score: OpenCLIP ViT-H-14's raw cosine, images and text prepared as for HPS v2."""
    model, tokenizer = load_clip(locate_clip_score(cfg), f"--clip_path {cfg.clip_path}", device)
    size = model.config.vision_config.image_size
    return lambda images, prompts: clip_cosine(
        model, tokenizer, preprocess_hps(images, size), [clean_openclip_text(p) for p in prompts]
    )


# ----------------------------------------------------------------------------------------------------
# HPS v2: a fine-tuned OpenCLIP ViT-H-14, saved with OpenCLIP's keys


def openclip_to_hf(sd: dict) -> dict:
    """Rename an OpenCLIP (ViT) state dict to transformers' CLIPModel keys. OpenCLIP fuses q, k, v into in_proj and
    stores projections as [width, embed] (x @ proj); transformers uses separate Linear layers ([embed, width])."""
    block = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }
    top = {
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final": "text_model.final_layer_norm",
        "logit_scale": "logit_scale",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre": "vision_model.pre_layrnorm",
        "visual.ln_post": "vision_model.post_layernorm",
    }
    out = {}
    for key, v in sd.items():
        key = key.removeprefix("module.")
        if key.endswith("attn_mask"):
            continue
        if key in ("text_projection", "visual.proj"):
            out["text_projection.weight" if key == "text_projection" else "visual_projection.weight"] = v.t()
            continue
        if ".resblocks." in key:
            tower, rest = key.split(".resblocks.")
            i, name = rest.split(".", 1)
            prefix = f"{'vision_model' if tower.startswith('visual') else 'text_model'}.encoder.layers.{i}."
            if name.startswith("attn.in_proj_"):
                kind = "weight" if name.endswith("weight") else "bias"
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{proj}.{kind}"] = part
                continue
            stem, kind = name.rsplit(".", 1)
            out[prefix + block[stem] + "." + kind] = v
            continue
        stem, dot, kind = key.rpartition(".")
        if key in top:
            out[top[key]] = v
        elif stem in top:
            out[top[stem] + "." + kind] = v
        else:
            raise KeyError(f"unexpected OpenCLIP key {key}")
    return out


def locate_hps(cfg) -> dict:
    what = f"--hps_path {cfg.hps_path}"
    weights = resolve_file(cfg.hps_path, "HPS_v2_compressed.pt", what)
    # the architecture: HPS v2 is a fine-tuned OpenCLIP ViT-H-14
    return dict(weights=weights, arch=beside(weights, DEFAULT_PATHS["clip"], what))


def load_hps(cfg, device):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    where, what = locate_hps(cfg), f"--hps_path {cfg.hps_path}"
    model = CLIPModel(from_pretrained(CLIPConfig, where["arch"], what))
    tokenizer = from_pretrained(CLIPTokenizer, where["arch"], what)
    sd = load_state_dict(where["weights"])
    model.load_state_dict(openclip_to_hf(sd.get("state_dict", sd)), strict=True)
    model = model.float().to(device).eval()
    size = model.config.vision_config.image_size
    # HPS v2 is the raw cosine, as the CLIP score
    return lambda images, prompts: clip_cosine(
        model, tokenizer, preprocess_hps(images, size), [clean_openclip_text(p) for p in prompts]
    )


# ----------------------------------------------------------------------------------------------------
# Aesthetic: an MLP on OpenAI CLIP ViT-L/14's image embedding (improved-aesthetic-predictor)


def mlp_head(in_dim: int) -> torch.nn.Module:
    """The linear MLP of improved-aesthetic-predictor and ImageReward (no activations; dropout is a no-op in eval)."""
    head = torch.nn.Module()
    head.layers = torch.nn.Sequential(
        torch.nn.Linear(in_dim, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )
    head.forward = head.layers.forward
    return head


def locate_aesthetic(cfg) -> dict:
    what = f"--aesthetic_path {cfg.aesthetic_path}"
    weights = resolve_file(cfg.aesthetic_path, "sac+logos+ava1-l14-linearMSE.pth", what)
    return dict(weights=weights, clip=beside(weights, "openai/clip-vit-large-patch14", what))


def load_aesthetic(cfg, device):
    from transformers import CLIPModel

    where = locate_aesthetic(cfg)
    model = (
        from_pretrained(CLIPModel, where["clip"], f"--aesthetic_path {cfg.aesthetic_path}").to(device).eval()
    )
    head = mlp_head(model.config.projection_dim)
    head.load_state_dict(load_state_dict(where["weights"]), strict=True)
    head = head.to(device).eval()

    # aesthetic = MLP(image embedding / ||image embedding||); the prompt is not used
    def score(images, prompts):
        pixels = preprocess_openai_clip(images, model.config.vision_config.image_size).to(device)
        img = embedding(model.get_image_features(pixel_values=pixels)).float()
        return head(F.normalize(img, dim=-1)).squeeze(-1)

    return score


# ----------------------------------------------------------------------------------------------------
# ImageReward: BLIP (a ViT and a BERT text encoder that cross-attends to it) and an MLP, saved with BLIP's keys


def blip_to_hf(sd: dict) -> tuple[dict, dict, dict]:
    """Split an ImageReward state dict into transformers' BlipVisionModel, BlipTextModel and MLP-head keys.
    The BLIP ViT is timm-named (blocks.i.attn.qkv ...); the BLIP text encoder already uses BERT names."""
    vision_names = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj": "embeddings.patch_embedding",
        "norm": "post_layernorm",
    }
    block = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    vision, text, head = {}, {}, {}
    for key, v in sd.items():
        if key.startswith("blip.visual_encoder."):
            key = key.removeprefix("blip.visual_encoder.")
            if key.startswith("blocks."):
                _, i, name = key.split(".", 2)
                stem, kind = name.rsplit(".", 1)
                vision[f"encoder.layers.{i}.{block[stem]}.{kind}"] = v
            else:
                stem, _, kind = key.rpartition(".") if key not in vision_names else (key, "", "")
                vision[vision_names[stem] + (f".{kind}" if kind else "")] = v
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            text[key.removeprefix("blip.text_encoder.")] = v
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = v
    # the other keys (ITC projections, ...) are not used by the score
    return vision, text, head


def locate_imagereward(cfg) -> dict:
    what = f"--imagereward_path {cfg.imagereward_path}"
    weights = resolve_file(cfg.imagereward_path, "ImageReward.pt", what)
    # the BERT config beside the weights (a local copy), else from the same repo
    med = weights.parent / "med_config.json"
    if not med.exists() and cfg.imagereward_path.startswith(("http://", "https://")):
        raise DataError(
            f"{what}: ImageReward also needs med_config.json (its BERT's config), which a URL of the weights does "
            "not give: pass a folder or hub repo that holds ImageReward.pt and med_config.json."
        )
    # a tokenizer beside the weights: the tiny scorer's (the real repo has none: BERT's)
    local_tokenizer = (weights.parent / "tokenizer_config.json").exists()
    return dict(
        weights=weights,
        med_config=med if med.exists() else resolve_file(cfg.imagereward_path, "med_config.json", what),
        tokenizer=str(weights.parent) if local_tokenizer else utils.resolve_model("bert-base-uncased", what),
    )


def load_imagereward(cfg, device):
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    where = locate_imagereward(cfg)
    med_config = json.loads(where["med_config"].read_text())
    vision_sd, text_sd, head_sd = blip_to_hf(load_state_dict(where["weights"]))
    # BLIP ViT-L/16 (create_vit('large')): sizes read off the weights; heads = width / 64 (1024 -> 16)
    width = vision_sd["embeddings.class_embedding"].shape[-1]
    patch = vision_sd["embeddings.patch_embedding.weight"].shape[-1]
    n_pos = vision_sd["embeddings.position_embedding"].shape[1]
    vision = BlipVisionModel(
        BlipVisionConfig(
            hidden_size=width,
            intermediate_size=vision_sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=1
            + max(int(k.split(".")[2]) for k in vision_sd if k.startswith("encoder.layers.")),
            num_attention_heads=max(1, width // 64),
            patch_size=patch,
            image_size=patch * round((n_pos - 1) ** 0.5),
            layer_norm_eps=1e-6,
            hidden_act="gelu",
        )
    )
    # the BERT-base text encoder with cross-attention; BLIP_Pretrain sets encoder_width to the ViT width
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=med_config["vocab_size"],
            hidden_size=med_config["hidden_size"],
            intermediate_size=med_config["intermediate_size"],
            num_hidden_layers=med_config["num_hidden_layers"],
            num_attention_heads=med_config["num_attention_heads"],
            max_position_embeddings=med_config["max_position_embeddings"],
            layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
            encoder_hidden_size=width,
            is_decoder=True,
            pad_token_id=med_config.get("pad_token_id", 0),
            bos_token_id=med_config.get("bos_token_id", 30522),
            sep_token_id=med_config.get("sep_token_id", 102),
        ),
        add_pooling_layer=False,
    )
    head = mlp_head(med_config["hidden_size"])
    for module, sd in ((vision, vision_sd), (text, text_sd), (head, head_sd)):
        module.load_state_dict(sd, strict=True)
    tokenizer = from_pretrained(
        BertTokenizer, where["tokenizer"], f"--imagereward_path {cfg.imagereward_path}"
    )
    vision, text, head = (m.float().to(device).eval() for m in (vision, text, head))

    def score(images, prompts):
        tokens = tokenizer(
            prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        ).to(device)
        pixels = preprocess_openai_clip(images, vision.config.image_size).to(device)
        image_embeds = vision(pixel_values=pixels).last_hidden_state
        out = text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device),
        )
        # the MLP on the [CLS] token, then ImageReward's normalisation
        reward = head(out.last_hidden_state[:, 0].float()).squeeze(-1)
        return (reward - 0.16717362830052426) / 1.0333394966054072

    return score
