"""models.py: LoRA policies, their reference (the same UNet with its adapters off) and their checkpoints."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import encoders
import eval as ev
import fixtures
import models
import prompt_sets
import train_kto

TINY = ["--tiny", "--pretrained_model", str(fixtures.tiny_model_path()), "--dataset"]
TINY += [str(fixtures.tiny_dataset_path()), "--validation_steps", "0"]


# SD v1-5- and SDXL-shaped
MODELS = dict(sd=fixtures.tiny_model_path(), sdxl=fixtures.tiny_sdxl_model_path())


def unet(path=fixtures.tiny_model_path()):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    return (
        UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
    )


def inputs(policy, n=4):
    g = torch.Generator().manual_seed(0)
    c = policy.config
    x0 = torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=g)
    emb = torch.randn(n, 16, c.cross_attention_dim, generator=g)
    # SDXL: the pooled embedding (its width: what the added embedding takes beside the 6 time ids) and sizes
    pooled = torch.randn(
        n, (c.projection_class_embeddings_input_dim or 0) - 6 * (c.addition_time_embed_dim or 0)
    )
    sizes = torch.tensor([[32, 40, 0, 4]] * n)
    cond = lambda e, p: encoders.unet_inputs(  # noqa: E731
        dict(emb=e, **(dict(pooled=p) if c.addition_embed_type else {})), sizes, 32
    )
    rolled = cond(torch.roll(emb, 1, 0), torch.roll(pooled, 1, 0))
    return x0, cond(emb, pooled), rolled, torch.tensor([True, False] * (n // 2)), g


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_reference_is_the_base_unet_and_r_is_zero_at_step_0(dtype, model):
    policy, scheduler = unet(MODELS[model])
    # the reference of full fine-tuning, stored as LoRA stores the base: what AdaptersOff must compute
    base = train_kto.frozen_reference(policy, dtype)
    ref = models.AdaptersOff(models.add_lora(policy, 4, dtype, seed=0))
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n and p.dtype == torch.float32 for n, p in trainable.items())
    # lora_A drawn as diffusers' LoRA scripts draw it, N(0, 1/rank^2): the sample std of n values is within 5
    # standard errors (about 1/sqrt(2n) relative) of 1/rank; peft's default would be several times smaller
    a = torch.cat([p.detach().flatten() for n, p in trainable.items() if "lora_A" in n])
    assert (
        abs(a.std().item() * 4 - 1) < 5 / (2 * a.numel()) ** 0.5
        and abs(a.mean().item()) < 5 / 4 / a.numel() ** 0.5
    )
    x0, emb, emb_mismatched, desirable, g = inputs(policy)
    loss_fn = lambda policy_err, ref_err, desirable, z: train_kto.kto_loss(
        policy_err, ref_err, desirable, 200.0, z
    )
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with autocast:
        # lora_B starts at 0: the adapters add exactly 0, so r is exactly 0 (bf16 autocast included)
        _, stats = train_kto.kto_step(policy, ref, scheduler, x0, emb, emb_mismatched, desirable, g, loss_fn)
    assert torch.equal(stats["r"], torch.zeros(4)) and stats["z"] == 0
    # Trained adapters (set outside autocast, which caches its casts of the weights until it exits): the policy
    # moves, the reference stays the base UNet, bit for bit
    for n, p in trainable.items():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    t = torch.tensor([10, 300, 600, 900])
    x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    with autocast, torch.no_grad():
        want, got = base(x_t, t, **emb).sample, ref(x_t, t, **emb).sample
        assert torch.equal(got, want) and not torch.equal(policy(x_t, t, **emb).sample, want)
    # and the adapters are on again after the reference's call
    assert all(m.disable_adapters is False for m in policy.modules() if hasattr(m, "lora_A"))


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_lora_trains_resumes_exactly_and_loads_into_a_pipeline(tmp_path, model):
    args = [
        *TINY,
        "--pretrained_model",
        str(MODELS[model]),
        "--lora_rank",
        "4",
        "--learning_rate",
        "1e-3",
        "--checkpointing_steps",
        "2",
    ]
    run = lambda out, steps, *a: train_kto.main(
        [*args, "--output_dir", str(tmp_path / out), "--max_train_steps", str(steps), *a]
    )
    rows = lambda out: [
        {k: v for k, v in json.loads(line).items() if k != "images_per_sec"}
        for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()
    ]
    policy, _ = run("whole", 4), run("split", 2)
    resumed = run("split", 4, "--resume", "latest")
    # the resumed steps are the identical computation (restored adapters, optimizer and generators): bit for bit
    assert rows("split") == rows("whole")
    for a, b in zip(policy.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # Only the adapters trained, in float32, also after the resume; the base weights are the base model's
    base, _ = unet(MODELS[model])
    kept = {k.replace(".base_layer", ""): v for k, v in resumed.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(kept[k], v) for k, v in base.state_dict().items())
    assert all(p.dtype == torch.float32 for p in resumed.parameters() if p.requires_grad)
    ckpt = tmp_path / "whole" / "checkpoint-4"
    assert (ckpt / models.LORA_FILE).exists() and not (ckpt / "unet").exists()
    assert "LoRA" in (ckpt / "README.md").read_text()
    # eval.py takes the LoRA checkpoint; diffusers' own load_lora_weights gives the very same images
    out = tmp_path / "eval"
    ev.main(
        [
            "--ckpt",
            str(ckpt),
            "--tiny",
            "--steps",
            "2",
            "--num_prompts",
            "2",
            "--batch_size",
            "1",
            "--out",
            str(out),
        ]
    )
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(MODELS[model])
    pipe.load_lora_weights(ckpt, weight_name=models.LORA_FILE)
    pipe.set_progress_bar_config(disable=True)
    for image in sorted((out / "images" / "checkpoint").glob("*.png")):
        p, k = map(int, image.stem.split("_"))
        prompt = prompt_sets.load_prompts("tiny")[p]
        g = torch.Generator().manual_seed(ev.utils.derive_seed(0, p, k))
        c, h = pipe.unet.config.in_channels, pipe.unet.config.sample_size
        latents = torch.randn((c, h, h), generator=g)[None]
        mine = pipe(
            [prompt], num_inference_steps=2, guidance_scale=3.0, latents=latents, generator=[g]
        ).images[0]
        assert np.array_equal(np.asarray(mine), np.asarray(Image.open(image)))
    # --export fuses the adapters into the UNet's weights: a complete pipeline that denoises as the adapted
    # model
    exported = DiffusionPipeline.from_pretrained(
        ev.main(["--ckpt", str(ckpt), "--export", str(tmp_path / "x")])
    )
    c, h = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    draw = lambda p: (
        p(
            ["a red circle"],
            num_inference_steps=2,
            guidance_scale=3.0,
            output_type="latent",
            latents=torch.randn((1, c, h, h), generator=torch.Generator().manual_seed(0)),
            generator=torch.Generator().manual_seed(1),
        ).images
    )
    adapted, base = draw(pipe), draw(DiffusionPipeline.from_pretrained(MODELS[model]))
    # fused and separate products round differently in float32, and two sampling steps carry it: bounded here
    # by 300 unit roundoffs of the latents' size (test_fast's E_TOL; measured about 10); the adapters move the
    # latents ~1e4 times more
    tol = 300 * 2.0**-24 * adapted.abs().max()
    assert (draw(exported) - adapted).abs().max() <= tol < (base - adapted).abs().max()


@pytest.mark.slow
def test_a_v_prediction_model_trains_and_evaluates(tmp_path):
    args = ["--tiny", "--dataset", str(fixtures.tiny_dataset_path()), "--validation_steps", "0"]
    args += ["--max_train_steps", "2", "--learning_rate", "0"]
    rows = {}
    for name, model in (("eps", fixtures.tiny_model_path()), ("v", fixtures.tiny_vpred_model_path())):
        train_kto.main([*args, "--pretrained_model", str(model), "--output_dir", str(tmp_path / name)])
        rows[name] = [
            json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
    # lr 0: the policy stays the reference, so r is exactly 0 at every step, whatever the target
    assert all(r["reward_desirable"] == r["reward_undesirable"] == r["z"] == 0 for r in rows["v"])
    # the same images, noise and timesteps: only the target differs (the velocity, read from the scheduler config)
    assert all(a["policy_err"] != b["policy_err"] for a, b in zip(rows["eps"], rows["v"], strict=True))
    # eval.py samples it with its own (v-prediction) scheduler; identical weights tie with the base exactly
    report = ev.main(
        ["--ckpt", str(tmp_path / "v" / "checkpoint-2"), "--tiny", "--steps", "2"]
        + ["--num_prompts", "2", "--out", str(tmp_path / "eval")]
    )
    assert report["baseline_model"]["base"] == str(fixtures.tiny_vpred_model_path())
    assert report["metrics"]["utility"]["win_rate"] == 0.5


@pytest.mark.parametrize(
    "scheduler, message",
    [
        # Playground v2.5's (EDM): no betas; DDPMScheduler would fall back to its default linear schedule
        (
            dict(
                _class_name="EDMDPMSolverMultistepScheduler", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5
            ),
            "no discrete beta schedule",
        ),
        # an x0-predicting model: its target is not the noise
        (
            dict(_class_name="DDPMScheduler", beta_schedule="scaled_linear", prediction_type="sample"),
            "'sample'",
        ),
    ],
)
def test_a_model_trained_with_another_noise_or_target_is_refused(tmp_path, capsys, scheduler, message):
    base = fixtures.tiny_model_path()
    model = tmp_path / "model"
    model.mkdir()
    for part in base.iterdir():
        (model / part.name).symlink_to(part)
    (model / "scheduler").unlink()
    (model / "scheduler").mkdir()
    (model / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(dict(num_train_timesteps=1000, prediction_type="epsilon") | scheduler)
    )
    with pytest.raises(SystemExit) as e:
        train_kto.main(
            [
                *TINY,
                "--pretrained_model",
                str(model),
                "--max_train_steps",
                "1",
                "--output_dir",
                str(tmp_path / "run"),
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "scheduler_config.json" in err, err[-2000:]
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_a_lora_checkpoint_that_does_not_fit_the_adapters_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    def lora(seed):
        return models.add_lora(unet()[0], 4, torch.float32, seed)

    saved = lora(0)
    for name, p in saved.named_parameters():
        if "lora_B" in name:  # trained-looking adapters: not the zeros a fresh policy starts from
            p.data.normal_(generator=torch.Generator().manual_seed(len(name)))
    models.save_policy(saved, tmp_path)
    loaded = lora(1)
    models.load_policy(loaded, tmp_path)
    for a, b in zip(saved.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    file = tmp_path / models.LORA_FILE
    state = load_file(file)
    first = next(iter(state))
    # An adapter missing from the file would keep its initial weights; a key the policy lacks would be dropped
    for tampered in (
        {k: v for k, v in state.items() if k != first},
        {**state, first.replace("blocks.0", "blocks.9"): state[first].clone()},
    ):
        save_file(tampered, file)
        with pytest.raises(ValueError, match="does not fit the policy's adapters"):
            models.load_policy(lora(1), tmp_path)


def test_a_lora_checkpoints_weights_digest_covers_the_base_unet_it_loads_into(tmp_path):
    """eval.py's record of the weights: base UNet retrained in place under the adapters = another model."""
    import hashlib

    (tmp_path / "base" / "unet").mkdir(parents=True)
    (tmp_path / "ckpt").mkdir()
    base_file = tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    base_file.write_bytes(b"base weights")
    (tmp_path / "ckpt" / models.LORA_FILE).write_bytes(b"adapters")
    model = dict(base=str(tmp_path / "base"), unet=None, lora=str(tmp_path / "ckpt"))
    before = models.weights_digest(model)
    base_file.write_bytes(b"base weights, retrained")
    assert models.weights_digest(model) != before
    # a hub base is named by its id: the adapters alone
    on_the_hub = dict(model, base="someone/base")
    assert models.weights_digest(on_the_hub) == hashlib.sha256(b"adapters").hexdigest()
