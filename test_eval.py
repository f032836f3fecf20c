"""Tests of eval.py and scorers.py: offline, on CPU, with the tiny model and tiny random-weight scorers.

HF_HUB_OFFLINE=1 python -m pytest -q -m "not slow" test_eval.py   # win rates, prompts, scorers, checks, pictures
HF_HUB_OFFLINE=1 python -m pytest -q test_eval.py                 # + end to end: generation, resume, torchrun
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as ev
import eval_report
import fixtures
import prompt_sets
import scorers
import tiny_world
import utils

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).parent
REAL_LOAD_PIPELINE = ev.load_pipeline
TITLES = {m: scorer.title for m, scorer in ev.SCORERS.items()}
FAST = [
    "--tiny",
    "--steps",
    "2",
    "--images_per_prompt",
    "2",
    "--num_prompts",
    "3",
    "--metrics",
    ",".join(scorers.METRICS),
]


# ----------------------------------------------------------------------------------------------------
# Win rates: the pure function


def test_win_rate_by_hand_uses_the_median_image():
    ckpt = np.array([[0.0, 5.0, 9.0], [1.0, 1.0, 1.0], [0.0, 0.0, 100.0]])
    base = np.array([[4.0, 4.0, 4.0], [1.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    r = ev.win_rate(ckpt, base)  # medians 5 vs 4 (win), 1 vs 1 (tie), 0 vs 1 (loss; the mean would win)
    # float64 means of a few exact values: a few 1e-16; approx's default rel 1e-6 is headroom
    assert r["win_rate"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert r["mean_ckpt"] == pytest.approx(ckpt.mean()) and r["n_prompts"] == 3
    r_all = ev.win_rate(ckpt, base, compare="all")  # prompt 0: 0 loses 3x, 5 and 9 win 3x -> 6/9
    assert r_all["win_rate"] == pytest.approx((6 / 9 + (3 * 0.5 + 3 * 1 + 0) / 9 + 3 / 9) / 3)


@pytest.mark.parametrize("compare", ["median", "all"])
def test_win_rate_invariants(compare):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 5)), rng.normal(size=(40, 5)) + 0.3
    r = ev.win_rate(a, b, compare)
    # exact: every comparison of a with its copy is a tie worth 1/2, and means of halves are exact
    assert ev.win_rate(a, a.copy(), compare)["win_rate"] == 0.5
    # every prompt ties: the Wilson interval around 0.5, symmetric
    lo, hi = ev.win_rate(a, a.copy(), compare)["ci95"]
    assert lo < 0.5 < hi and lo + hi == pytest.approx(1)
    swapped = ev.win_rate(b, a, compare)
    assert swapped["win_rate"] == pytest.approx(1 - r["win_rate"])
    assert swapped["ci95"] == pytest.approx([1 - r["ci95"][1], 1 - r["ci95"][0]])
    scaled = ev.win_rate(3.7 * a + 0.0, 3.7 * b, compare)
    # exact: a product is correctly rounded, so monotone; no two of these seeded draws lie within an ulp, so no
    # comparison changes, and the win rate and the bootstrap over the same outcomes are the same numbers
    assert scaled["win_rate"] == r["win_rate"] and scaled["ci95"] == r["ci95"]
    assert r["ci95"][0] < r["win_rate"] < r["ci95"][1]


def wilson(wins, n, z=1.959963984540054):
    """The Wilson score interval, solved from |wins / n - p| = z sqrt(p (1 - p) / n) as a quadratic in p."""
    a, b, c = n + z**2, -(2 * wins + z**2), wins**2 / n
    root = np.sqrt(b**2 - 4 * a * c)
    return [(-b - root) / (2 * a), (-b + root) / (2 * a)]


def test_win_rate_ci_is_not_a_point_when_every_prompt_has_the_same_outcome():
    """8 wins of 8: every bootstrap resample is all wins, a point at 1; the Wilson interval is reported
    instead."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(8, 3))
    r = ev.win_rate(base + 10, base)
    # the closed form and the quadratic agree to float64 rounding; approx's default rel 1e-6 is headroom
    assert r["win_rate"] == 1 and r["ci95"] == pytest.approx(wilson(8, 8))
    assert r["ci95"][0] < 0.7 and r["ci95"][1] == pytest.approx(1)
    assert ev.win_rate(base, base + 10)["ci95"] == pytest.approx(wilson(0, 8), abs=1e-12)
    # one prompt: the bootstrap has one outcome to draw
    assert ev.win_rate([[1.0, 10.0]], [[2.0, 3.0]])["ci95"] == pytest.approx(wilson(0, 1), abs=1e-12)


def test_win_rate_rejects_bad_input():
    with pytest.raises(ValueError):
        ev.win_rate(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError):
        ev.win_rate(np.full((3, 2), np.nan), np.zeros((3, 2)))


# ----------------------------------------------------------------------------------------------------
# Prompts

LONG = " ".join(["a very detailed painting of a red circle"] * 20)  # far beyond 77 CLIP tokens
PROMPTS = ["a red circle on a white background", "ein grüner Würfel — 緑の四角 🟩", LONG]


@pytest.mark.parametrize("kind", ["txt", "csv", "tsv", "jsonl", "parquet"])
def test_prompt_files_of_every_format(tmp_path, kind):
    path = tmp_path / f"p.{kind}"
    column = {"csv": "prompt", "tsv": "Prompt", "jsonl": "caption", "parquet": "prompt"}.get(kind)
    if kind == "txt":
        path.write_text(
            "\n" + PROMPTS[0] + "\n\n  \n" + PROMPTS[1] + "\n" + PROMPTS[2] + "\n\n", encoding="utf-8"
        )
    else:
        table = pd.DataFrame({column: [PROMPTS[0], "", PROMPTS[1], PROMPTS[2]], "other": [1, 2, 3, 4]})
        if kind == "csv":
            table.to_csv(path, index=False)
        elif kind == "tsv":
            table.to_csv(path, sep="\t", index=False)
        elif kind == "jsonl":
            table.to_json(path, orient="records", lines=True, force_ascii=False)
        else:
            table.to_parquet(path)
    assert prompt_sets.load_prompts(str(path)) == PROMPTS


def test_tsv_prompts_keep_their_quotes(tmp_path):
    """PartiPrompts.tsv has a prompt that starts with a quoted word; CSV quoting would strip the quotes."""
    giggle = '"G I G G L E" painted in thick colorful lettering as graffiti on a faded red brick wall'
    (tmp_path / "p.tsv").write_text(f"Prompt\tCategory\n{giggle}\tWorld Knowledge\na cat\tAnimals\n")
    assert prompt_sets.load_prompts(str(tmp_path / "p.tsv")) == [giggle, "a cat"]


def test_prompt_errors(tmp_path):
    pd.DataFrame({"text": ["x"]}).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(utils.DataError, match="no column named prompt"):
        prompt_sets.load_prompts(str(tmp_path / "a.csv"))
    (tmp_path / "a.xml").write_text("<x/>")
    with pytest.raises(utils.DataError, match="unsupported file type"):
        prompt_sets.load_prompts(str(tmp_path / "a.xml"))
    with pytest.raises(utils.DataError, match="not a named set"):
        prompt_sets.load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(utils.DataError, match="no \\(non-empty\\) prompts"):
        prompt_sets.load_prompts(str(tmp_path / "empty.txt"))


def test_named_prompt_set_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(utils.DataError, match="pass it as a local file"):
        prompt_sets.load_prompts("hps")


def test_subset_is_deterministic_and_spread():
    ten = [f"p{i}" for i in range(10)]
    assert prompt_sets.subset_indices(ten, 0) == list(range(10)) == prompt_sets.subset_indices(ten, 20)
    hps = [f"p{i}" for i in range(3200)]
    assert prompt_sets.subset_indices(hps, 4) == [0, 800, 1600, 2400]  # one per HPS style
    # the tiny set, 8 captions x 32: every caption before any repeats (evenly spaced ids alone gave one caption)
    tiny = tiny_world.eval_prompts()
    for k, each in ((8, 1), (32, 4), (64, 8)):
        picked = [tiny[i] for i in prompt_sets.subset_indices(tiny, k)]
        assert len(picked) == k and all(picked.count(c) == each for c in tiny_world.HELD_OUT)
    assert len(set(tiny[i] for i in prompt_sets.subset_indices(tiny, 3))) == 3


# ----------------------------------------------------------------------------------------------------
# Images and prompts prepared as each scorer's authors prepare them (upstream transforms: docs/evaluation.md)


def edge_image(w, h, seed=0):
    """Noise with a hard black/white edge: bicubic resizing overshoots below 0 and above 1 next to it."""
    x = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    x[:, : w // 2] = 0
    x[:, w // 2 : w // 2 + 8] = 255
    return Image.fromarray(x)


def unnormalize(pixels):
    return pixels * scorers.OPENAI_STD[:, None, None] + scorers.OPENAI_MEAN[:, None, None]


def test_hps_resizes_the_float_tensor_then_pads_with_zeros():
    """hpsv2's preprocess_val: ToTensor, then ResizeMaxSize on the float tensor (bicubic, antialiased, not rounded
    to uint8, not clamped), zero padding to a square, Normalize. 360 x 320 -> 224 x 199, 12 rows above, 13 below."""
    image = edge_image(360, 320)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    resized = F.interpolate(x, size=(199, 224), mode="bicubic", antialias=True, align_corners=False)[0]
    got = unnormalize(scorers.preprocess_hps([image], 224)[0])
    assert got.shape == (3, 224, 224)
    # the same interpolation, then Normalize and its inverse: a few U (6e-8) on values in [-0.1, 1.1]; 1e-5 is 100x
    torch.testing.assert_close(got[:, 12:211], resized, atol=1e-5, rtol=0)
    assert (got[:, :12].abs() < 1e-6).all() and (
        got[:, 211:].abs() < 1e-6
    ).all()  # padding: zeros before Normalize
    assert got.min() < -0.005 and got.max() > 1.005  # the overshoot a uint8 image cannot hold
    noise = Image.fromarray(np.random.default_rng(1).integers(1, 256, (360, 320, 3), dtype=np.uint8))
    tall = unnormalize(scorers.preprocess_hps([noise], 224)[0])  # padding split: left 12, right 13
    assert (tall[:, :, :12].abs() < 1e-6).all() and (tall[:, :, 211:].abs() < 1e-6).all()
    assert (tall[:, :, 12].abs() > 1e-3).any() and (tall[:, :, 210].abs() > 1e-3).any()


def test_pickscore_pixels_equal_transformers_clip_image_processor():
    """PickScore's processor (CLIPImageProcessor, PIL path): crop offset floor((327 - 224) / 2) = 51 for 1216 x 832;
    torchvision's round() would take 52."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    for w, h in ((1216, 832), (832, 1216), (360, 320), (512, 512)):
        image = edge_image(w, h)
        expected = processor(images=image, return_tensors="pt").pixel_values
        # the same PIL resize and crop; only the float32 normalisation's order may differ: a few U on values < 3
        torch.testing.assert_close(scorers.preprocess_pickscore([image], 224), expected, atol=1e-5, rtol=0)


def test_openai_clip_and_blip_resize_the_short_side_then_crop_with_torchvision_offsets():
    """OpenAI CLIP's / ImageReward's transform: Resize(224) makes the long side int(224 * long / short) (360 x 320
    -> 252 x 224, not 251), CenterCrop offsets int(round(excess / 2)) (1216 x 832: round(51.5) = 52)."""
    for (w, h), size, (left, top) in (
        ((360, 320), (252, 224), (14, 0)),
        ((320, 360), (224, 252), (0, 14)),
        ((1216, 832), (327, 224), (52, 0)),
        ((832, 1216), (224, 327), (0, 52)),
    ):
        image = edge_image(w, h)
        crop = image.resize(size, Image.BICUBIC).crop((left, top, left + 224, top + 224))
        expected = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255).permute(2, 0, 1)
        # Normalize and its inverse in float32: a few U on values in [0, 1]; 1e-5 is 100x that
        torch.testing.assert_close(
            unnormalize(scorers.preprocess_openai_clip([image], 224)[0]), expected, atol=1e-5, rtol=0
        )


def test_openclip_text_cleaning():
    messy = "A  \u201cRed\u201d circle &amp;amp; a\tblue square\u2019s EDGE "
    assert scorers.clean_openclip_text(messy) == 'a "red" circle & a blue square\'s edge'
    assert scorers.clean_openclip_text(PROMPTS[0]) == PROMPTS[0]


# ----------------------------------------------------------------------------------------------------
# Scorers: tiny random weights, saved in the real formats, loaded by the real code paths


@pytest.fixture(scope="module")
def scorer_cfg():
    paths = fixtures.tiny_scorer_paths()
    return ev.Config(**{f"{m}_path": str(p) for m, p in paths.items()}), paths


def sample_images(n=3):
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (32, 48 if i == 0 else 32, 3), dtype=np.uint8)) for i in range(n)
    ]


def test_every_scorer_loads_from_its_format_and_scores(scorer_cfg):
    cfg, paths = scorer_cfg
    assert (paths["hps"] / "HPS_v2_compressed.pt").exists() and (
        paths["imagereward"] / "med_config.json"
    ).exists()
    assert (paths["aesthetic"] / "sac+logos+ava1-l14-linearMSE.pth").exists()
    assert (paths["pickscore"] / "config.json").exists() and (paths["clip"] / "config.json").exists()
    images, prompts = sample_images(), [PROMPTS[0], PROMPTS[1], LONG]
    for m in scorers.METRICS:
        s = ev.SCORERS[m].load(cfg, torch.device("cpu"))(images, prompts)
        assert s.shape == (3,) and torch.isfinite(s).all(), m
        assert len(set(s.tolist())) == 3, m  # the images differ, so do their scores


def test_hps_key_mapping_matches_an_openclip_forward(scorer_cfg):
    """Independent transcription of OpenCLIP's ViT (torch's MultiheadAttention on the fused in_proj weights)."""
    cfg, paths = scorer_cfg
    sd = torch.load(paths["hps"] / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]
    heads = 4

    def blocks(x, prefix, causal):
        n = 1 + max(int(k.split("resblocks.")[1].split(".")[0]) for k in sd if k.startswith(prefix))
        mask = torch.full((x.shape[1],) * 2, float("-inf")).triu(1) if causal else None
        for i in range(n):
            p = f"{prefix}{i}."
            attn = torch.nn.MultiheadAttention(x.shape[-1], heads, batch_first=True)
            names = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
            attn.load_state_dict({k: sd[p + "attn." + k] for k in names})
            h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
            x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
            h = F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
            x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        return x

    images, prompts = sample_images(), [PROMPTS[0], "a blue square", LONG]
    px = scorers.preprocess_hps(images, 32)
    x = F.conv2d(px, sd["visual.conv1.weight"], stride=8).flatten(2).transpose(1, 2)
    x = (
        torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1)
        + sd["visual.positional_embedding"]
    )
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = blocks(x, "visual.transformer.resblocks.", False)
    img = F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    img = img @ sd["visual.proj"]
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(paths["hps"])
    ids = tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    t = blocks(sd["token_embedding.weight"][ids] + sd["positional_embedding"], "transformer.resblocks.", True)
    t = F.layer_norm(t, t.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])
    txt = t[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]
    expected = F.cosine_similarity(img, txt, dim=-1)
    got = scorers.load_hps(cfg, torch.device("cpu"))(images, prompts)
    # another implementation of the same ViT (other kernels, other summation orders) on a tiny model: float32
    # rounding of ~1e-6 on cosines <= 1; atol 1e-5 / rtol 1e-4 are 10x that
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_pickscore_clip_and_aesthetic_match_independent_formulas(scorer_cfg):
    from transformers import CLIPModel, CLIPTokenizer

    cfg, paths = scorer_cfg
    images, prompts = sample_images(), [PROMPTS[0], "a blue square", LONG]
    for m in ("pickscore", "clip"):
        model, tok = CLIPModel.from_pretrained(paths[m]).eval(), CLIPTokenizer.from_pretrained(paths[m])
        inputs = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        pixels = (scorers.preprocess_pickscore if m == "pickscore" else scorers.preprocess_hps)(images, 32)
        with torch.no_grad():
            logits = model(input_ids=inputs.input_ids, pixel_values=pixels).logits_per_image.diagonal()
            got = ev.SCORERS[m].load(cfg, torch.device("cpu"))(images, prompts)
        expected = logits if m == "pickscore" else logits / model.logit_scale.exp()  # scale * cos, or cos
        # the same model through transformers' forward: float32 rounding of ~1e-6 relative; 1e-4 is 100x that
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    model = CLIPModel.from_pretrained(paths["aesthetic"]).eval()
    head = torch.load(paths["aesthetic"] / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    with torch.no_grad():
        pixels = scorers.preprocess_openai_clip(images, 32)
        e = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        x = e / e.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            x = x @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]
        got = scorers.load_aesthetic(cfg, torch.device("cpu"))(images, ["ignored"] * 3)
    # as above: the same layers in another order of calls, ~1e-6 relative
    torch.testing.assert_close(got, x.squeeze(-1), atol=1e-5, rtol=1e-4)


PREPROCESS = dict(
    aesthetic="preprocess_openai_clip",
    imagereward="preprocess_openai_clip",
    pickscore="preprocess_pickscore",
    clip="preprocess_hps",
    hps="preprocess_hps",
)


@pytest.mark.parametrize("metric", scorers.METRICS)
def test_each_scorer_prepares_images_and_prompts_as_its_authors(scorer_cfg, monkeypatch, metric):
    """Each scorer calls its own preprocessing (and no other); HPS v2 and CLIP (OpenCLIP) clean the prompt first,
    so HTML entities and curly quotes give the tokens of the clean text."""
    cfg, _ = scorer_cfg
    calls = []
    for name in set(PREPROCESS.values()):
        real = getattr(scorers, name)
        monkeypatch.setattr(
            scorers, name, lambda images, size, real=real, name=name: calls.append(name) or real(images, size)
        )
    score = ev.SCORERS[metric].load(cfg, torch.device("cpu"))
    images = sample_images(2)
    clean, messy = ["a red circle & a dog's square"] * 2, ["a  red circle &amp; a dog\u2019s square"] * 2
    # bitwise where the cleaned prompts give the same tokens: the identical computation on the same shapes
    same = torch.equal(score(images, clean), score(images, messy))
    assert set(calls) == {PREPROCESS[metric]}
    assert same == (metric in ("hps", "clip", "aesthetic")), metric  # aesthetic ignores the prompt


def test_imagereward_mapping_fills_every_weight_and_uses_the_prompt(scorer_cfg):
    cfg, paths = scorer_cfg
    sd = torch.load(paths["imagereward"] / "ImageReward.pt", weights_only=True)
    vision, text, head = scorers.blip_to_hf(sd)
    assert torch.equal(vision["embeddings.class_embedding"], sd["blip.visual_encoder.cls_token"])
    assert torch.equal(
        vision["encoder.layers.1.self_attn.qkv.weight"], sd["blip.visual_encoder.blocks.1.attn.qkv.weight"]
    )
    assert torch.equal(
        text["encoder.layer.0.crossattention.self.key.weight"],
        sd["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"],
    )
    assert set(head) == {f"layers.{i}.{k}" for i in (0, 2, 4, 6, 7) for k in ("weight", "bias")}
    # loads with strict=True: every weight is mapped
    score = scorers.load_imagereward(cfg, torch.device("cpu"))
    images = sample_images(2)
    a, b = score(images, ["a red circle", "a red circle"]), score(images, ["a blue square", "a blue square"])
    assert not torch.allclose(a, b)  # the text (35-token BERT) cross-attends to the image
    # cut at 35 tokens: the same tokens, the identical computation (bit for bit; the default tolerance: headroom)
    torch.testing.assert_close(score(images[:1], [LONG]), score(images[:1], [LONG + " more words"]))


# ----------------------------------------------------------------------------------------------------
# Inputs checked before any image is generated (a checkpoint folder that is never loaded)


@pytest.fixture
def fake_ckpt(tmp_path):
    """A train_kto.py checkpoint as eval.py first sees it: unet/config.json, and run.json naming the base model."""
    ckpt = tmp_path / "run" / "checkpoint-1"
    (ckpt / "unet").mkdir(parents=True)
    (ckpt / "unet" / "config.json").write_text("{}")
    run = {"config": {"pretrained_model": str(fixtures.tiny_model_path())}}
    (ckpt.parent / "run.json").write_text(json.dumps(run))
    return ckpt


@pytest.fixture
def no_generation(monkeypatch):
    def refuse(model, device):
        raise AssertionError("a model was loaded for generation before the inputs were checked")

    monkeypatch.setattr(ev, "load_pipeline", refuse)


def fails_before_generating(args, capsys, *expected):
    with pytest.raises(SystemExit) as e:
        ev.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: "), err
    for text in expected:
        assert text in err, (text, err)
    return err


def test_missing_models_are_named_before_anything_runs(fake_ckpt, tmp_path, capsys, no_generation):
    out = ["--tiny", "--out", str(tmp_path / "o")]
    for typo in (str(fake_ckpt) + "0", str(tmp_path / "runs" / "kto" / "checkpoint-1")):
        err = fails_before_generating(
            ["--ckpt", typo, *out], capsys, f"--ckpt {typo}: no such file or folder"
        )
        assert "--baseline" not in err
    typo = str(tmp_path / "sd15")
    fails_before_generating(
        ["--ckpt", str(fake_ckpt), "--baseline", typo, *out],
        capsys,
        f"--baseline {typo}: no such file or folder",
    )
    fails_before_generating(
        ["--ckpt", str(fake_ckpt), "--baseline", "nobody/no-such-model", *out],
        capsys,
        "--baseline nobody/no-such-model: no such local file or folder",
        "model_index.json of the hub repo nobody/no-such-model could not be fetched",
    )
    run = json.loads((fake_ckpt.parent / "run.json").read_text())
    run["config"]["pretrained_model"] = str(tmp_path / "moved-base")
    (fake_ckpt.parent / "run.json").write_text(json.dumps(run))
    fails_before_generating(
        ["--ckpt", str(fake_ckpt), *out], capsys, "its base model", "no such file or folder"
    )
    # a checkpoint moved away from its run's run.json; a folder that is neither a checkpoint nor a pipeline
    (fake_ckpt.parent / "run.json").unlink()
    fails_before_generating(["--ckpt", str(fake_ckpt), *out], capsys, "so its base model is unknown")
    fails_before_generating(["--ckpt", str(tmp_path), *out], capsys, "neither a checkpoint-<step> folder")
    (tmp_path / "model.safetensors").write_bytes(b"")
    fails_before_generating(
        ["--ckpt", str(tmp_path / "model.safetensors"), *out], capsys, "a file; expected a model folder"
    )
    assert not (tmp_path / "o").exists()


def test_default_baseline_has_the_checkpoints_vae(fake_ckpt, tmp_path):
    """A run trained with --pretrained_vae decodes with that VAE; the default baseline (its base model) does
    too, so the two models differ only in the UNet."""
    vae = str(fixtures.tiny_model_path() / "vae")
    run = json.loads((fake_ckpt.parent / "run.json").read_text())
    run["config"]["pretrained_vae"] = vae
    (fake_ckpt.parent / "run.json").write_text(json.dumps(run))
    cfg, _, pair, _, _ = ev.check_inputs(ev.parse_config(["--ckpt", str(fake_ckpt), "--tiny"]))
    assert pair["checkpoint"]["vae"] == vae and pair["baseline"]["vae"] == vae
    assert pair["baseline"]["base"] == cfg.baseline == str(fixtures.tiny_model_path())
    assert pair["baseline"]["unet"] is None and pair["baseline"]["lora"] is None
    # a baseline given by name is that model as it is
    cfg = ev.parse_config(["--ckpt", str(fake_ckpt), "--tiny", "--baseline", str(fixtures.tiny_model_path())])
    assert "vae" not in ev.check_inputs(cfg)[2]["baseline"]


def test_random_weight_note_names_only_the_metrics_scored_with_random_weights(fake_ckpt, tmp_path):
    """--tiny swaps in random-weight scorers for the paper metrics whose path is not given; a given one is
    real."""
    common = ["--ckpt", str(fake_ckpt), "--tiny"]
    note = ev.tiny_note(
        ev.parse_config([*common, "--metrics", "utility,clip,hps", "--hps_path", str(tmp_path)])
    )
    assert "RANDOM-WEIGHT" in note and "CLIP" in note and "HPS" not in note
    assert ev.tiny_note(ev.parse_config([*common, "--metrics", "hps", "--hps_path", str(tmp_path)])) == ""
    assert ev.tiny_note(ev.parse_config(common)) == ""  # utility alone


def test_model_card_keeps_one_section_per_generation_setting(fake_ckpt, tmp_path):
    """Two evaluations that differ only in --guidance measure different things: both stay in the card."""
    results = {"utility": dict(win_rate=0.75, ci95=[0.5, 0.9], mean_ckpt=0.8, mean_baseline=0.7, n_prompts=8)}
    plain = dict(base=str(fixtures.tiny_model_path()), unet=None, lora=None)
    for guidance in (3.0, 1.0, 3.0):
        cfg = ev.parse_config(["--ckpt", str(fake_ckpt), "--tiny", "--guidance", str(guidance)])
        cfg = dataclasses.replace(cfg, baseline=plain["base"])
        pair = dict(checkpoint=plain, baseline=plain)
        eval_report.write_markdown(results, tmp_path / "results.md", cfg, pair, TITLES)
        card = eval_report.add_to_model_card(cfg, tmp_path / "results.md", results).read_text()
    # the third evaluation replaced the first, whose settings it repeats
    headings = [line for line in card.splitlines() if line.startswith("## Evaluation")]
    assert len(headings) == 2 and len(set(headings)) == 2, headings
    assert any("guidance 3," in h for h in headings) and any("guidance 1," in h for h in headings)


def test_every_scorer_is_found_before_any_image_is_generated(fake_ckpt, tmp_path, capsys, no_generation):
    (tmp_path / "p.txt").write_text("a red circle on a white background\n")
    common = ["--ckpt", str(fake_ckpt), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]
    for m in scorers.METRICS:  # a local path that is not there
        flag = f"--{m}_path"
        fails_before_generating(
            [*common, "--tiny", "--metrics", m, flag, str(tmp_path / "nowhere")],
            capsys,
            f"{flag} {tmp_path / 'nowhere'}: no such file or folder",
        )
        folder = tmp_path / f"empty-{m}"  # a folder without the weights
        folder.mkdir()
        fails_before_generating(
            [*common, "--tiny", "--metrics", m, flag, str(folder)], capsys, f"{flag} {folder}"
        )
    # offline without --tiny: the canonical weights (hub repos, a GitHub URL) are neither cached nor reachable
    for m in scorers.METRICS:
        fails_before_generating(
            [*common, "--metrics", m],
            capsys,
            f"--{m}_path {scorers.DEFAULT_PATHS[m]}",
            "Download it once" if m == "aesthetic" else "hf download",
        )
    fails_before_generating(common, capsys, "--aesthetic_path")  # all five: the first missing one is named
    assert not (tmp_path / "o").exists()


def test_weights_from_a_url_are_cached_per_url(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_KTO_CACHE", str(tmp_path / "cache"))
    fetched = []

    def download(url, dest):  # stands in for the network: the file's bytes are its URL
        fetched.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(url)
        return dest

    monkeypatch.setattr(scorers, "download", download)
    a, b = "https://a.example/x/head.pth", "https://b.example/y/head.pth"
    for url in (a, b, a):
        assert scorers.resolve_file(url, "head.pth", "--aesthetic_path").read_text() == url
    assert fetched == [a, b]  # each URL once; the same name from another URL is another file
    with pytest.raises(utils.DataError, match="a URL must name the file med_config.json"):
        scorers.resolve_file("https://a.example/ImageReward.pt", "med_config.json", "--imagereward_path")
    cfg = types.SimpleNamespace(imagereward_path="https://a.example/ImageReward.pt")
    with pytest.raises(utils.DataError, match="also needs med_config.json"):
        scorers.locate_imagereward(cfg)


def test_utility_is_refused_for_prompts_outside_the_tiny_world(fake_ckpt, tmp_path, capsys, no_generation):
    """The world's utility scores colour and size against the world's own captions; any other prompt has none."""
    (tmp_path / "mine.txt").write_text("a portrait of a cat\na red circle on a white background\n")
    common = ["--ckpt", str(fake_ckpt), "--tiny", "--out", str(tmp_path / "o")]
    fails_before_generating(
        [*common, "--prompts", str(tmp_path / "mine.txt")],
        capsys,
        "--metrics utility",
        "'a portrait of a cat'",
        "--prompts tiny",
    )
    (tmp_path / "world.txt").write_text(
        "a red circle on a white background\na blue square on a black background\n"
    )
    for prompts in ("tiny", str(tmp_path / "world.txt")):
        cfg = ev.parse_config(["--ckpt", str(fake_ckpt), "--tiny", "--prompts", prompts])
        assert ev.check_inputs(cfg)[1] == ["utility"]
    cfg = ev.parse_config([*common, "--prompts", str(tmp_path / "mine.txt"), "--metrics", "clip"])
    assert ev.check_inputs(cfg)[1] == ["clip"]  # the other metrics take any prompt


def test_cli_errors_and_help(fake_ckpt, tmp_path, capsys, no_generation):
    bad_flags = (
        ["--metrics", "fid"],
        ["--images_per_prompt", "0"],
        ["--steps", "0"],
        ["--batch_size", "0"],
        ["--num_prompts", "-3"],
        ["--seed", "-1"],
        ["--prompts", "nope.txt"],
        # diffusers samples without guidance at any scale up to 1: 0.5 would only look like another setting
        ["--guidance", "0.5"],
    )
    for bad in bad_flags:
        err = fails_before_generating(
            ["--ckpt", str(fake_ckpt), "--tiny", "--out", str(tmp_path / "o"), *bad], capsys
        )
        assert bad[0] in err, err
    # no --ckpt: argparse's usage and error
    with pytest.raises(SystemExit) as e:
        ev.main(["--tiny", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "error: --ckpt is required" in capsys.readouterr().err
    # no recorded base
    fails_before_generating(
        ["--ckpt", str(fixtures.tiny_model_path()), "--tiny", "--out", str(tmp_path / "o")],
        capsys,
        "is a full model",
        "pass --baseline",
    )
    out = subprocess.run([sys.executable, "-c", "import eval"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
    # no import cycle: neither the scorers nor the fixtures load eval.py (which --tiny would then load twice)
    out = subprocess.run(
        [sys.executable, "-c", "import sys, scorers, fixtures; print('eval' in sys.modules)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "False", out.stdout + out.stderr
    out = subprocess.run([sys.executable, "eval.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for f in ev.Config.__dataclass_fields__:
        assert f"--{f}" in out.stdout
    help_text = "".join(out.stdout.split())
    for flag, value in ev.TINY.items():  # what --tiny changes is in the help
        assert "".join(f"--tiny: {value!r})".split()) in help_text, flag


# ----------------------------------------------------------------------------------------------------
# Pictures: each readable on its own (full prompt, model names, each image's scores)


def figure_text(fig):
    import matplotlib.text

    return " ".join(" ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text)).split())


def test_pictures_name_the_models_and_show_full_prompts_and_scores(tmp_path):
    cfg = ev.Config(
        ckpt="runs/kto-long-name/checkpoint-10000",
        baseline="stable-diffusion-v1-5/stable-diffusion-v1-5",
        prompts="pickapic_test",
        images_per_prompt=3,
    )
    results = {
        "pickscore": dict(win_rate=0.625, ci95=[0.5, 0.75], mean_ckpt=21.2, mean_baseline=20.7, n_prompts=8)
    }
    fig = eval_report.draw_win_rates(results, tmp_path / "w.png", cfg, TITLES)
    text = figure_text(fig)
    assert cfg.ckpt in text.replace(" ", "") and cfg.baseline in text.replace(" ", "")
    assert "62.5%" in text and "PickScore" in text and "8 prompts of pickapic_test" in text
    assert Image.open(tmp_path / "w.png").width >= 600  # one metric: still room for the title
    assert "8 prompts of pickapic_test, 3 images per prompt" in text
    # one of each: singular, in the figure and in results.md
    one = dataclasses.replace(cfg, images_per_prompt=1)
    results["pickscore"]["n_prompts"] = 1
    assert "1 prompt of pickapic_test, 1 image per prompt" in figure_text(
        eval_report.draw_win_rates(results, tmp_path / "w1.png", one, TITLES)
    )
    plain = dict(base=cfg.baseline, unet=None, lora=None)
    eval_report.write_markdown(
        results, tmp_path / "results.md", one, dict(checkpoint=plain, baseline=plain), TITLES
    )
    text = (tmp_path / "results.md").read_text()
    assert (
        "on 1 prompt of `pickapic_test`, 1 image per prompt, compare = median, 50 steps, guidance 7.5, "
        "seed 0." in text
    )
    assert "VAE" not in text
    # a VAE that replaces the base model's is named, on each side that has one
    vae = dict(plain, vae="madebyollin/sdxl-vae-fp16-fix")
    eval_report.write_markdown(
        results, tmp_path / "results.md", one, dict(checkpoint=vae, baseline=vae), TITLES
    )
    text = (tmp_path / "results.md").read_text()
    assert "checkpoint `madebyollin/sdxl-vae-fp16-fix`, baseline `madebyollin/sdxl-vae-fp16-fix`" in text

    prompt = (
        "a yellow triangle on a black background, in the style of a very detailed oil painting, golden hour"
    )
    images = {
        tag: [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
        for tag in ("baseline", "checkpoint")
    }
    scores = {
        "baseline": {"pickscore": np.array([20.5, 21.25, 19.0]), "hps": np.array([0.25, 0.5, 0.75])},
        "checkpoint": {"pickscore": np.array([22.0, 21.0, 23.5]), "hps": np.array([0.3, 0.1, 0.2])},
    }
    fig = eval_report.draw_grid(prompt, images, scores, cfg, tmp_path / "g.png", TITLES)
    text = figure_text(fig)
    assert prompt in text and cfg.baseline in text.replace(" ", "") and cfg.ckpt in text.replace(" ", "")
    for value in (
        "PickScore 20.5 *",
        "PickScore 21.25 HPS",
        "PickScore 19 HPS",
        "HPS v2 0.5 *",
        "PickScore 22 *",
        "PickScore 21 HPS",
        "HPS v2 0.2 *",
        "PickScore 23.5 HPS",
    ):  # * = each model's median image
        assert value in text, value
    assert Image.open(tmp_path / "g.png").width >= 400
    # long model names break after a "/", not inside a name
    assert eval_report.wrap("stable-diffusion-v1-5/stable-diffusion-v1-5", 28, path=True) == (
        "stable-diffusion-v1-5/\nstable-diffusion-v1-5"
    )


# ----------------------------------------------------------------------------------------------------
# End to end (tiny model; a real train_kto.py checkpoint)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import train_kto

    out = tmp_path_factory.mktemp("kto")
    train_kto.main(
        [
            "--tiny",
            "--pretrained_model",
            str(fixtures.tiny_model_path()),
            "--dataset",
            str(fixtures.tiny_dataset_path()),
            "--max_train_steps",
            "2",
            "--output_dir",
            str(out),
            "--learning_rate",
            "1e-3",
        ]
    )
    return out / "checkpoint-2"


class Interrupted(RuntimeError):
    pass


class SpyPipe:
    """Wraps a pipeline: records every call (batch size and kwargs); raises after `fail_after` calls."""

    def __init__(self, pipe, log, fail_after=None):
        self.pipe, self.log, self.fail_after = pipe, log, fail_after

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompts, **kw):
        if self.fail_after is not None and len(self.log) >= self.fail_after:
            raise Interrupted("simulated interruption (a killed job)")
        self.log.append((len(prompts), kw))
        return self.pipe(prompts, **kw)


def interrupted(model, device):
    """load_pipeline of a run killed as it starts to generate."""
    raise Interrupted("simulated interruption (a killed job)")


def spy(monkeypatch, fail_after=None):
    log = []
    monkeypatch.setattr(
        ev, "load_pipeline", lambda model, device: SpyPipe(REAL_LOAD_PIPELINE(model, device), log, fail_after)
    )
    return log


def pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*.png"))}


@pytest.mark.slow
def test_tiny_run_writes_every_output(ckpt, tmp_path, monkeypatch, capsys):
    log = spy(monkeypatch)
    out = tmp_path / "e"
    report = ev.main(
        ["--ckpt", str(ckpt), *FAST, "--guidance", "5.0", "--batch_size", "4", "--out", str(out)]
    )
    r = json.loads((out / "results.json").read_text())
    assert set(r["metrics"]) == set(scorers.METRICS) and r == json.loads(json.dumps(report))
    for m in r["metrics"].values():
        assert (
            set(m) == {"win_rate", "ci95", "mean_ckpt", "mean_baseline", "n_prompts"} and m["n_prompts"] == 3
        )
    assert "RANDOM-WEIGHT" in r["note"] and "RANDOM-WEIGHT" in (out / "results.md").read_text()
    assert r["settings"]["baseline"] == str(fixtures.tiny_model_path())  # default: the base model in run.json
    assert Image.open(out / "win_rates.png").size[0] > 600 and len(list(out.glob("grid_*.png"))) == 3
    index = pd.read_csv(out / "images" / "index.csv")
    assert len(index) == 2 * 3 * 2 and all((out / "images" / p).exists() for p in index["path"])
    # --guidance 5.0 (not the --tiny default 3.0) reached the pipeline, the record and the images
    assert {kw["num_inference_steps"] for _, kw in log} == {2} and {
        kw["guidance_scale"] for _, kw in log
    } == {5.0}
    assert r["settings"]["guidance"] == 5.0
    assert json.loads((out / "images/generation.json").read_text())["guidance"] == 5.0
    assert max(n for n, _ in log) <= 4 and sum(n for n, _ in log) == 12
    seeds = index.pivot_table(index=["prompt_id", "image_index"], columns="model", values="seed")
    assert (seeds["checkpoint"] == seeds["baseline"]).all() and seeds[
        "checkpoint"
    ].nunique() == 6  # same per (p, k)
    printed = capsys.readouterr().out  # where everything went
    for name in ("results.json", "results.md", "win_rates.png", "grid_00000.png", "images/index.csv"):
        assert str(out / name) in printed, name
    ev.main(["--ckpt", str(ckpt), *FAST, "--metrics", "clip", "--out", str(tmp_path / "default-guidance")])
    default = pixels(tmp_path / "default-guidance/images/checkpoint")
    assert not any(np.array_equal(v, default[k]) for k, v in pixels(out / "images/checkpoint").items())
    # a rerun on fewer prompts leaves the grids of its own prompts only
    ev.main(["--ckpt", str(ckpt), *FAST, "--guidance", "5.0", "--num_prompts", "2", "--out", str(out)])
    assert sorted(p.name for p in out.glob("grid_*.png")) == ["grid_00000.png", "grid_00004.png"]


@pytest.mark.slow
def test_same_model_gives_exactly_half_and_swap_gives_complement(ckpt, tmp_path):
    twin = tmp_path / "twin" / "checkpoint-2"  # same weights under another path: generated separately
    shutil.copytree(ckpt.parent, twin.parent)
    same = ev.main(["--ckpt", str(ckpt), "--baseline", str(twin), *FAST, "--out", str(tmp_path / "same")])
    # exact: both models' images are generated by the identical computation (same weights, seeds and batches), so
    # they are the same files, which are scored once (score_images): every comparison is a tie
    assert all(m["win_rate"] == 0.5 for m in same["metrics"].values())
    a, b = pixels(tmp_path / "same/images/checkpoint"), pixels(tmp_path / "same/images/baseline")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    a = ev.main(["--ckpt", str(ckpt), *FAST, "--compare", "all", "--out", str(tmp_path / "a")])
    b = ev.main(
        [
            "--ckpt",
            str(fixtures.tiny_model_path()),
            "--baseline",
            str(ckpt),
            *FAST,
            "--compare",
            "all",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert a["settings"]["compare"] == "all"
    # the same images (generated identically under either role) scored in the same batches: float64 arithmetic on
    # the same scores, a few 1e-16; approx's default rel 1e-6 is headroom
    for m in scorers.METRICS:
        assert b["metrics"][m]["win_rate"] == pytest.approx(1 - a["metrics"][m]["win_rate"])
        assert b["metrics"][m]["mean_ckpt"] == pytest.approx(a["metrics"][m]["mean_baseline"])
    assert any(m["win_rate"] != 0.5 for m in a["metrics"].values())  # the checkpoint differs from its base


@pytest.mark.slow
def test_interrupted_run_resumes_without_regenerating(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    args = ["--ckpt", str(ckpt), *FAST, "--batch_size", "1", "--metrics", "clip", "--out", str(out)]
    spy(monkeypatch, fail_after=4)
    with pytest.raises(Interrupted):
        ev.main(args)
    done = pixels(out / "images" / "checkpoint")
    assert len(done) == 4 and not list((out / "images" / "checkpoint").glob("*.tmp"))  # no half-written file
    log = spy(monkeypatch)
    ev.main(args)
    assert sum(n for n, _ in log) == 12 - 4  # only the missing images were generated
    again = pixels(out / "images" / "checkpoint")
    assert all(np.array_equal(again[k], v) for k, v in done.items())
    log.clear()
    ev.main(args)
    assert log == []  # nothing left to generate
    # a different batch size gives the same images: noise depends on (seed, prompt, image index) only
    fresh = tmp_path / "fresh"
    ev.main(["--ckpt", str(ckpt), *FAST, "--batch_size", "5", "--metrics", "clip", "--out", str(fresh)])
    other = pixels(fresh / "images" / "checkpoint")
    assert other.keys() == again.keys()
    # batches of 5 instead of 1 reorder the UNet's float32 sums (~1e-6 relative on pixels in [0, 255]): a pixel can
    # round to the neighbouring level, no further
    assert all(np.abs(other[k].astype(int) - again[k].astype(int)).max() <= 1 for k in other)
    with pytest.raises(SystemExit):  # other generation settings in the same --out are refused
        ev.main(args + ["--steps", "3"])
    # ... and so are other prompt texts under the same --prompts (an edited file)
    (tmp_path / "p.txt").write_text("a red circle\n")
    mine = ["--ckpt", str(ckpt), *FAST, "--prompts", str(tmp_path / "p.txt"), "--metrics", "clip"]
    ev.main([*mine, "--num_prompts", "1", "--images_per_prompt", "1", "--out", str(tmp_path / "p")])
    (tmp_path / "p.txt").write_text("a blue square\n")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        ev.main([*mine, "--num_prompts", "1", "--images_per_prompt", "1", "--out", str(tmp_path / "p")])
    assert "other settings or prompt texts" in capsys.readouterr().err


def nudge_unet_in_place(ckpt: Path):
    """Retrain in place, as far as the files show: every UNet weight moved by 5% of its tensor's spread."""
    from safetensors.torch import load_file, save_file

    file = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    g = torch.Generator().manual_seed(0)
    weights = load_file(file)
    save_file(
        {k: v + 0.05 * v.std().nan_to_num() * torch.randn(v.shape, generator=g) for k, v in weights.items()},
        file,
    )


@pytest.mark.slow
def test_a_rerun_reuses_images_of_the_same_weights_only(tmp_path, monkeypatch, capsys):
    """A checkpoint retrained in place has the same path: the images already in --out are another model's."""
    ckpt = tmp_path / "run" / "checkpoint-1"
    shutil.copytree(fixtures.tiny_model_path() / "unet", ckpt / "unet")
    run = {"config": {"pretrained_model": str(fixtures.tiny_model_path())}}
    (ckpt.parent / "run.json").write_text(json.dumps(run))
    out = tmp_path / "o"
    args = ["--ckpt", str(ckpt), "--tiny", "--steps", "1", "--num_prompts", "2", "--out", str(out)]
    ev.main(args)
    capsys.readouterr()
    ev.main(args)
    assert f"reusing 2 images already in {out / 'images' / 'checkpoint'}\n" in capsys.readouterr().out
    # a rerun that stops early leaves no results.json or results.md: the earlier run's would read as its own
    monkeypatch.setattr(ev, "load_pipeline", interrupted)
    with pytest.raises(Interrupted):
        ev.main([*args, "--num_prompts", "3"])
    assert not (out / "results.json").exists() and not (out / "results.md").exists()
    nudge_unet_in_place(ckpt)
    with pytest.raises(SystemExit):
        ev.main(args)
    assert "other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_scaling_a_scorer_changes_no_win_rate(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "s"
    args = ["--ckpt", str(ckpt), *FAST, "--metrics", "pickscore,hps", "--out", str(out)]
    before = ev.main(args)
    for m in ("pickscore", "hps"):
        load = ev.SCORERS[m].load
        scaled = lambda cfg, device, load=load: lambda i, p, s=load(cfg, device): 7.5 * s(i, p)  # noqa: E731
        monkeypatch.setitem(ev.SCORERS, m, ev.SCORERS[m]._replace(load=scaled))
    after = ev.main(args)  # the images are on disk: only the scores change
    # the same images through the same scorer and batches give the same scores; 7.5 * s is correctly rounded, so
    # monotone: no comparison changes (none is within an ulp), so the win rates and bootstraps are exact; the
    # means differ by the float rounding of the product: a few 1e-8, so rel 1e-5 is headroom
    for m in ("pickscore", "hps"):
        assert after["metrics"][m]["win_rate"] == before["metrics"][m]["win_rate"]
        assert after["metrics"][m]["ci95"] == before["metrics"][m]["ci95"]
        assert after["metrics"][m]["mean_ckpt"] == pytest.approx(
            7.5 * before["metrics"][m]["mean_ckpt"], rel=1e-5
        )
    assert set(after["metrics"]) == {"pickscore", "hps"}


def shifted_copy(folder: Path, dest: Path, weights: str, key: str, shift: float) -> Path:
    """A copy of a tiny scorer whose final bias is moved by `shift`: its scores move by a known amount."""
    shutil.copytree(folder, dest)
    sd = torch.load(dest / weights, weights_only=True)
    sd[key] = sd[key] + shift
    torch.save(sd, dest / weights)
    return dest


@pytest.mark.slow
def test_prompts_file_seed_and_paths(ckpt, tmp_path, scorer_cfg):
    _, paths = scorer_cfg
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    common = [
        "--ckpt",
        str(ckpt),
        "--tiny",
        "--steps",
        "1",
        "--images_per_prompt",
        "1",
        "--prompts",
        str(tmp_path / "p.txt"),
        "--metrics",
        "aesthetic,imagereward",
    ]
    r = ev.main(common + ["--num_prompts", "2", "--seed", "1", "--out", str(tmp_path / "x")])
    assert r["metrics"]["aesthetic"]["n_prompts"] == 2
    assert pd.read_csv(tmp_path / "x/images/index.csv")["prompt"].tolist()[:2] == [PROMPTS[0], PROMPTS[1]]
    r0 = ev.main(common + ["--seed", "0", "--out", str(tmp_path / "y")])
    a, b = pixels(tmp_path / "x/images/checkpoint"), pixels(tmp_path / "y/images/checkpoint")
    assert r0["metrics"]["aesthetic"]["n_prompts"] == 3 and not np.array_equal(
        a["00000_00.png"], b["00000_00.png"]
    )
    # scorer paths other than the --tiny defaults are used: scores moved by exactly the shift of the copies' bias
    aesthetic = shifted_copy(
        paths["aesthetic"], tmp_path / "aesthetic", "sac+logos+ava1-l14-linearMSE.pth", "layers.7.bias", 1.0
    )
    # ImageReward divides by this: +1 after normalisation
    imagereward = shifted_copy(
        paths["imagereward"],
        tmp_path / "imagereward",
        "ImageReward.pt",
        "mlp.layers.7.bias",
        1.0333394966054072,
    )
    moved = ev.main(
        common
        + [
            "--num_prompts",
            "2",
            "--seed",
            "1",
            "--aesthetic_path",
            str(aesthetic),
            "--imagereward_path",
            str(imagereward / "ImageReward.pt"),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert moved["settings"]["aesthetic_path"] == str(aesthetic)
    assert moved["settings"]["imagereward_path"] == str(imagereward / "ImageReward.pt")
    for m in ("aesthetic", "imagereward"):
        for side in ("mean_ckpt", "mean_baseline"):
            # the same images and batches; the shift enters once through the last bias (and ImageReward's float32
            # division): a few ulp of scores ~1, abs 1e-5 is 100x that
            assert moved["metrics"][m][side] == pytest.approx(r["metrics"][m][side] + 1.0, abs=1e-5), (
                m,
                side,
            )


@pytest.mark.slow
def test_cli_output_reads_well_in_a_log_file(ckpt, tmp_path):
    """As a user runs it, stderr to a file: progress as plain lines, no notice a user cannot act on (such as
    transformers' 'requires torchvision'), no loading bars; stdout ends with where the results are."""
    out = tmp_path / "cli"
    run = subprocess.run(
        [sys.executable, "eval.py", "--ckpt", str(ckpt), *FAST, "--metrics", "clip,hps", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\r" not in run.stderr and "torchvision" not in run.stderr and "arning" not in run.stderr, (
        run.stderr
    )
    lines = run.stderr.splitlines()
    assert lines and all(
        re.fullmatch(r"\w+ rank 0: \d+/\d+ images, .* s each, \d+ s left", x) for x in lines
    ), lines
    assert "checkpoint rank 0: 6/6 images" in run.stderr and "hps rank 0: 12/12 images" in run.stderr
    assert run.stdout.rstrip().endswith(str(out / "images" / "index.csv"))
    assert f"Wrote:\n  {out / 'results.json'}\n" in run.stdout


@pytest.mark.slow
def test_torchrun_two_ranks_gloo(ckpt, tmp_path):
    """Two CPU ranks share the images; rank 0 alone writes the results, equal to a one-process run."""
    # one image per generation and scorer call and one thread, in both runs: each image and score is then the
    # identical computation whichever rank makes it, so the results are equal bit for bit (with batches of
    # several images, the ranks' batches would differ from the single run's and round differently)
    args = ["eval.py", "--ckpt", str(ckpt), *FAST, "--metrics", "clip,hps", "--batch_size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for launcher, out in ((torchrun, tmp_path / "ddp"), ([sys.executable], tmp_path / "one")):
        run = subprocess.run(
            [*launcher, *args, "--out", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
    ddp, single = (json.loads((tmp_path / out / "results.json").read_text()) for out in ("ddp", "one"))
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["metrics"] == single["metrics"]


def test_utility_metric_reads_the_world_off_the_pixels(tmp_path):
    """The tiny world's metric: the asked colour earns 0.5, size earns up to 0.5; no weights involved."""
    score = ev.SCORERS["utility"].load(None, "cpu")
    big_red = tiny_world.draw_shape("circle", "red", "white", 0.45, (0.5, 0.5), 32)
    small_red = tiny_world.draw_shape("circle", "red", "white", 0.12, (0.5, 0.5), 32)
    big_blue = tiny_world.draw_shape("circle", "blue", "white", 0.45, (0.5, 0.5), 32)
    s = score([big_red, small_red, big_blue], ["a red circle on a white background"] * 3).tolist()
    # colour terms are 0 or 0.5 exactly and the two big circles cover the same pixels (same size term): approx's
    # default only absorbs float64 rounding
    assert s[0] > s[1] >= 0.5 > s[2] and s[0] - s[2] == pytest.approx(0.5)
    assert tiny_world.world_utility(big_red, "a red circle on a white background") == pytest.approx(s[0])
