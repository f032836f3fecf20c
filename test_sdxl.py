"""SDXL-shaped models (fixtures.tiny_sdxl_model_path: two text encoders of different widths, a pooled embedding, size
conditioning, zeros for a dropped caption) through the same training, cache and evaluation code as SD v1-5's.
Run: python -m pytest -q test_sdxl.py   (offline; the fast layer: -m "not slow")"""

import json
import os
import shutil
import types

import pandas as pd
import pytest
import torch
from PIL import Image

import encoders
import eval as ev
import fixtures
import train_kto
from test_fast import assert_close, assert_same_inputs
from test_train import TORCHRUN, run_script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = str(fixtures.tiny_sdxl_model_path())
SDXL = ["--tiny", "--pretrained_model", MODEL, "--dataset", str(fixtures.tiny_dataset_path())]
SDXL += ["--validation_steps", "0", "--train_batch_size", "4"]


def run(out, *args):
    policy = train_kto.main([*SDXL, "--output_dir", str(out), *args])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows], policy


def sized_batch(tmp_path, captions):
    """Images of different sizes (so that each has its own size conditioning), as the loader batches them."""
    import data

    sizes = [(40, 32), (32, 56), (64, 48), (33, 33)]
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i, 200, 90)).save(tmp_path / f"{i}.png")
    table = pd.DataFrame(dict(image=[f"{i}.png" for i in range(4)], caption=captions, label=[1, 0, 1, 0]))
    table.to_csv(tmp_path / "data.csv", index=False)
    table = data.load_feedback(tmp_path / "data.csv")
    dataset = data.FeedbackDataset(table, tmp_path, 32)
    return next(iter(torch.utils.data.DataLoader(dataset, batch_size=4))), sizes


def inputs(tmp_path, caption_dropout, model=MODEL):
    cfg = types.SimpleNamespace(
        pretrained_vae="", cache_latents=False, cache_dir="", output_dir=str(tmp_path), random_flip=True
    )
    cfg.caption_dropout, cfg.resolution = caption_dropout, 32
    off = torch.autocast("cpu", enabled=False)
    roll = train_kto.mismatched_indices
    return encoders.Inputs(cfg, model, [0] * 4, [], None, off, torch.device("cpu"), 0, 1, roll)


def test_sdxl_inputs_are_its_pipelines_and_mismatched_pairs_roll_every_caption_input(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    captions = ["a red circle", "a blue square on a white background", "a green triangle", "a yellow circle"]
    batch, sizes = sized_batch(tmp_path, captions)
    x0, cond, mismatched = inputs(tmp_path, 0.0)(batch, torch.Generator().manual_seed(0))
    # The caption embeddings are the SDXL pipeline's own: both encoders' penultimate states, concatenated, and the
    # pooled embedding of the second
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    emb, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    extra = cond["added_cond_kwargs"]
    assert torch.equal(cond["encoder_hidden_states"], emb) and torch.equal(extra["text_embeds"], pooled)
    # Each image's size conditioning: original (height, width), the centre crop's (top, left), the target size
    for (w, h), ids in zip(sizes, extra["time_ids"].tolist()):
        s = 32 / min(w, h)
        assert ids == [h, w, (max(32, round(h * s)) - 32) // 2, (max(32, round(w * s)) - 32) // 2, 32, 32]
    # Mismatched pairs: image i with caption i+1, every caption input rolled together; the sizes stay the image's
    roll = [1, 2, 3, 0]
    other = mismatched["added_cond_kwargs"]
    assert torch.equal(mismatched["encoder_hidden_states"], emb[roll])
    assert torch.equal(other["text_embeds"], pooled[roll]) and torch.equal(
        other["time_ids"], extra["time_ids"]
    )
    assert x0.shape == (4, 4, 8, 8)
    # A dropped caption is the pipeline's unconditional input: zeros (model_index.json: force_zeros_for_empty_prompt)
    _, dropped, _ = inputs(tmp_path, 1.0)(batch, torch.Generator().manual_seed(0))
    assert (
        not dropped["encoder_hidden_states"].any() and not dropped["added_cond_kwargs"]["text_embeds"].any()
    )
    # ... and the empty caption's embeddings where the model says so
    index = json.loads((fixtures.tiny_sdxl_model_path() / "model_index.json").read_text())
    copy = tmp_path / "model"
    shutil.copytree(fixtures.tiny_sdxl_model_path(), copy)
    (copy / "model_index.json").write_text(json.dumps(dict(index, force_zeros_for_empty_prompt=False)))
    _, empty, _ = inputs(tmp_path, 1.0, str(copy))(batch, torch.Generator().manual_seed(0))
    want, _, want_pooled, _ = pipe.encode_prompt([""] * 4, do_classifier_free_guidance=False)
    assert torch.equal(empty["encoder_hidden_states"], want)
    assert torch.equal(empty["added_cond_kwargs"]["text_embeds"], want_pooled)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_sdxl_reward_is_exactly_zero_at_learning_rate_0(tmp_path, precision):
    rows, _ = run(tmp_path, "--max_train_steps", "2", "--learning_rate", "0", "--mixed_precision", precision)
    # policy == reference: the two UNets run the same code on the same inputs (bf16 autocast included)
    # (80% desirable: a step's batch may hold no undesirable image, whose mean reward is then null)
    assert all(r["reward_desirable"] == r["z"] == 0 and r["reward_undesirable"] in (0, None) for r in rows)
    assert all(r["policy_err"] == r["ref_err"] > 0 for r in rows)


@pytest.mark.slow
def test_sdxl_trains_resumes_exactly_and_caches_latents(tmp_path):
    whole, policy = run(tmp_path / "whole", "--max_train_steps", "4", "--checkpointing_steps", "2")
    run(tmp_path / "split", "--max_train_steps", "2", "--checkpointing_steps", "2")
    split, resumed = run(tmp_path / "split", "--max_train_steps", "4", "--resume", "latest")
    # the resumed steps are the identical computation: bit for bit
    assert split == whole and whole[-1]["z"] > 0
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), resumed.state_dict().values()))
    # The latent cache holds what SDXL needs (pooled embeddings, image sizes) and gives the plain path's run
    still, _ = run(tmp_path / "still", "--max_train_steps", "3", "--learning_rate", "0")
    cache = tmp_path / "cache"
    cached_run = lambda out: run(  # noqa: E731
        tmp_path / out,
        "--max_train_steps",
        "3",
        "--learning_rate",
        "0",
        "--cache_latents",
        "--cache_dir",
        str(cache),
    )[0]
    cached = cached_run("cached")
    assert_same_inputs(cached, still)
    text = torch.load(cache / "text-000000.pt", weights_only=True)
    assert text["emb"].shape[-1] == 80 and text["pooled"].shape[-1] == 24
    # a complete cache: read, not rebuilt, the same run bit for bit
    again = cached_run("again")
    assert_close(again, cached, 0.0)


@pytest.mark.slow
def test_sdxl_two_ranks_stay_in_sync_and_eval_generates_and_scores(tmp_path):
    dump = """
        real_main = train_kto.main
        def main(argv):
            policy = real_main(argv)
            out = os.path.join(argv[argv.index("--output_dir") + 1], "rank%s.json" % os.environ["RANK"])
            json.dump([p.double().sum().item() for p in policy.parameters()], open(out, "w"))
        train_kto.main = main
    """
    args = [*SDXL[1:], "--max_train_steps", "3", "--output_dir", str(tmp_path / "two")]
    run_script(tmp_path, dump, *args, torchrun=TORCHRUN)
    r0, r1 = (json.loads((tmp_path / f"two/rank{r}.json").read_text()) for r in (0, 1))
    rows = [json.loads(line) for line in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert r0 == r1 and json.loads((tmp_path / "two/run.json").read_text())["world_size"] == 2
    assert len(rows) == 3 and rows[-1]["z"] > 0
    # eval.py: the SDXL pipeline with the same-noise protocol; a checkpoint of the base's weights ties exactly
    run(tmp_path / "still", "--max_train_steps", "1", "--learning_rate", "0")
    out = tmp_path / "eval"
    report = ev.main(
        ["--ckpt", str(tmp_path / "still" / "checkpoint-1"), "--tiny", "--steps", "2", "--num_prompts", "2"]
        + ["--metrics", "utility,clip", "--out", str(out)]
    )
    assert report["baseline_model"]["base"] == MODEL
    assert report["metrics"]["utility"]["win_rate"] == report["metrics"]["clip"]["win_rate"] == 0.5
    images = sorted((out / "images" / "checkpoint").glob("*.png"))
    assert len(images) == 2 and Image.open(images[0]).size == (32, 32)


def test_pretrained_vae_replaces_the_base_models_and_upcasts_only_where_its_config_says(tmp_path):
    from diffusers import AutoencoderKL

    # fp16: SDXL's VAE (force_upcast) stays float32; a VAE whose config says it does not overflow runs in fp16
    assert encoders.load_vae(MODEL, "", torch.float16).dtype == torch.float32
    assert encoders.load_vae(MODEL, "", torch.bfloat16).dtype == torch.bfloat16
    fixed = tmp_path / "vae-fp16-fix"
    vae = AutoencoderKL.from_pretrained(MODEL, subfolder="vae")
    vae.register_to_config(force_upcast=False)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.5)
    vae.save_pretrained(fixed)
    assert encoders.load_vae(MODEL, str(fixed), torch.float16).dtype == torch.float16
    # --pretrained_vae: the base model's own VAE gives the same run, bit for bit; another VAE other latents
    args = ["--max_train_steps", "1", "--learning_rate", "0"]
    same, _ = run(tmp_path / "a", *args)
    again, _ = run(tmp_path / "b", *args, "--pretrained_vae", str(fixtures.tiny_sdxl_model_path() / "vae"))
    other, _ = run(tmp_path / "c", *args, "--pretrained_vae", str(fixed))
    assert again == same and other[0]["policy_err"] != same[0]["policy_err"]
    assert json.loads((tmp_path / "c" / "run.json").read_text())["config"]["pretrained_vae"] == str(fixed)
    # With a built latent cache the training VAE is gone: validation's pipeline gets --pretrained_vae's, not the base's
    cached = inputs(tmp_path, 0.0)
    cached.cfg.pretrained_vae = str(fixed)
    del cached.vae, cached.text
    assert torch.equal(cached.components()["vae"].encoder.conv_in.weight, vae.encoder.conv_in.weight)


def test_sdxl_time_ids_are_exact_whatever_the_embeddings_dtype():
    # bf16 holds integers exactly only up to 256: 1023 and 1365 would become 1024 and 1368
    sizes = torch.tensor([[1023, 1365, 0, 170], [512, 683, 0, 85]])
    text = dict(
        emb=torch.zeros(2, 3, 8, dtype=torch.bfloat16), pooled=torch.zeros(2, 8, dtype=torch.bfloat16)
    )
    ids = encoders.unet_inputs(text, sizes, 1024)["added_cond_kwargs"]["time_ids"]
    assert ids.tolist() == [[1023, 1365, 0, 170, 1024, 1024], [512, 683, 0, 85, 1024, 1024]]


def test_a_vae_with_standardised_latents_trains_in_the_space_its_pipeline_decodes(tmp_path):
    """A VAE whose config has latents_mean and latents_std (Playground v2.5's): the UNet's x0 is the
    standardised latent, which the pipeline turns back into the VAE's latent before decoding
    (reports.decode_images)."""
    from diffusers import StableDiffusionXLPipeline

    import reports

    copy = tmp_path / "model"
    shutil.copytree(fixtures.tiny_sdxl_model_path(), copy)
    config = json.loads((copy / "vae" / "config.json").read_text())
    channels = config["latent_channels"]
    # per-channel statistics far from 0 and 1, so that a missing standardisation shows
    stats = dict(
        latents_mean=[0.3 * c - 0.5 for c in range(channels)],
        latents_std=[0.4 + 0.3 * c for c in range(channels)],
    )
    (copy / "vae" / "config.json").write_text(json.dumps(config | stats))
    batch, _ = sized_batch(tmp_path, ["a red circle", "a blue square", "a green triangle", "a yellow circle"])
    x0, _ = inputs(tmp_path, 0.0, str(copy)).fixed(batch)
    pipe = StableDiffusionXLPipeline.from_pretrained(copy)
    with torch.no_grad():
        latent = pipe.vae.encode(batch["pixel_values"]).latent_dist.mean
    seen = []
    pipe.vae.decode = lambda z, **k: (
        seen.append(z) or types.SimpleNamespace(sample=torch.zeros(len(z), 3, 32, 32))
    )
    reports.decode_images(pipe, x0)
    # the VAE decodes its own latent: x0's standardisation undone, up to float32 rounding of the two affine
    # maps (four roundings, each within a unit roundoff of the largest value met: the latent or a mean; 8 for
    # headroom)
    size = max(latent.abs().max().item(), max(abs(m) for m in stats["latents_mean"]))
    assert torch.allclose(seen[0], latent, rtol=0, atol=8 * 2**-24 * size)
    assert not torch.allclose(x0, latent * config["scaling_factor"], atol=0.1)
