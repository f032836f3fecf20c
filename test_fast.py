"""Tests of train_kto.py's fast paths: each option runs on the tiny model (CPU) and is checked against the plain path.

Tolerances (on loss, z, rewards, errors and gradient norm of every step of a 3-step run), each from an argument:
  --gradient_checkpointing, --compile (backend eager): 1e-5, headroom only: the same kernels on the same shapes
  (measured bit for bit); --cache_latents: at lr 0 (nothing for Adam to amplify), the errors and gradient norm within
  the float32 rounding of inputs that the VAE / text encoder computed on other batches (E_TOL), the rest exact;
  --mixed_precision bf16 / fp16: 5e-2 on the denoising errors; --optimizer adamw8bit is tested with a stand-in module
  (bitsandbytes is not a dependency) that runs torch's fused AdamW, so exactly, and for its error.
Run: HF_HUB_OFFLINE=1 python -m pytest -q test_fast.py
"""

import json
import os
import shutil
import sys
import types

import pytest
import torch

import checkpoints
import fixtures
import profiling
import train_kto
import utils

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = [
    "--tiny",
    "--pretrained_model",
    str(fixtures.tiny_model_path()),
    "--dataset",
    str(fixtures.tiny_dataset_path()),
    "--max_train_steps",
    "3",
    "--validation_steps",
    "0",
]
KEYS = ("loss", "z", "reward_desirable", "reward_undesirable", "policy_err", "ref_err", "grad_norm")
PHASES = {"data", "encode", "forward_backward", "clip", "optimizer"}


def run(out, *args):
    policy = train_kto.main([*TINY, "--output_dir", str(out), *args])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, {k: v.detach().clone() for k, v in policy.state_dict().items()}


def assert_close(a, b, rtol, keys=KEYS):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for k in keys:
            # a class absent from a step's batch has no mean reward (null): then absent from both runs' steps
            if ra[k] is None or rb[k] is None:
                assert ra[k] is rb[k] is None, (k, ra[k], rb[k])
                continue
            assert abs(ra[k] - rb[k]) <= rtol * max(1.0, abs(rb[k])), (k, ra[k], rb[k])


# The relative float32 rounding of a sample's denoising error e (~1) when the UNets see inputs rounded differently
# (latents and caption embeddings computed on other batches): U = 2**-24 is float32's unit roundoff; the UNet's
# roundings add up like a random walk over its matrix products, sqrt(sum of their lengths) U = 133 U per run, two
# runs: 300 U (derived in full in test_train.py's test_gradient_accumulation_equals_the_whole_batch)
E_TOL = 300 * 2.0**-24


def assert_same_inputs(rows, want):
    """Two runs at learning rate 0 whose inputs come from different code paths: the same data at every step."""
    # lr 0: the policy stays the reference, so in each run r = z = 0 and the loss is lambda / 2, exactly
    assert_close(rows, want, 0.0, keys=("loss", "z", "reward_desirable", "reward_undesirable"))
    # the errors move with their inputs' rounding; the gradient is a sum of the errors' gradients with the same
    # weight sigmoid'(0) / B (exact), so its norm moves by as much again
    assert_close(rows, want, E_TOL, keys=("policy_err", "ref_err"))
    assert_close(rows, want, 2 * E_TOL, keys=("grad_norm",))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return run(tmp_path_factory.mktemp("plain") / "out")


@pytest.fixture(scope="module")
def still(tmp_path_factory):
    """The plain run at learning rate 0: Adam cannot amplify rounding differences between two runs' steps. The
    held-out images are scored at its last step."""
    return run(tmp_path_factory.mktemp("still") / "out", "--learning_rate", "0", "--heldout_steps", "3")


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_run(tmp_path, plain):
    rows, weights = run(tmp_path / "out", "--gradient_checkpointing")
    # the recomputed forward runs the same kernels on the same shapes: equal bit for bit (1e-5 and 1e-6: headroom)
    assert_close(rows, plain[0], 1e-5)
    assert max((weights[k] - plain[1][k]).abs().max().item() for k in weights) < 1e-6


def test_attention_is_pytorch_sdpa_and_adamw_is_fused(tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    policy = train_kto.main([*TINY, "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1"])
    assert {type(p) for p in policy.attn_processors.values()} == {
        AttnProcessor2_0
    }  # F.scaled_dot_product_attention
    state = torch.load(tmp_path / "out" / "checkpoint-1" / "optimizer.pt", weights_only=True)
    assert state["param_groups"][0]["fused"] is True


@pytest.mark.slow
def test_cache_latents_matches_the_plain_path_is_reused_and_resumed(tmp_path, still, monkeypatch, capsys):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    cache = tmp_path / "cache"
    rows, _ = run(
        tmp_path / "a",
        "--cache_latents",
        "--cache_dir",
        str(cache),
        "--learning_rate",
        "0",
        "--heldout_steps",
        "3",
    )
    assert_same_inputs(rows, still[0])
    # the held-out images' scoring reads the cache too (each image's unflipped posterior mean and own caption):
    # at lr 0 r is exactly 0 in both runs, and the policy's error is the plain path's up to the inputs' rounding
    held_out = (
        "heldout_reward_desirable",
        "heldout_reward_undesirable",
        "heldout_margin",
        "heldout_accuracy",
    )
    assert_close(rows[-1:], still[0][-1:], 0.0, keys=held_out)
    assert_close(rows[-1:], still[0][-1:], E_TOL, keys=("heldout_policy_err",))
    first = torch.load(cache / "latents-000000.pt", weights_only=True)
    # both flips
    assert first["mean"].shape == (256, 2, 4, 8, 8) and first["std"].shape == first["mean"].shape
    text = torch.load(cache / "text-000000.pt", weights_only=True)["emb"]
    assert text.shape[0] == 1 + len(
        set(__import__("pandas").read_csv(fixtures.tiny_dataset_path())["caption"])
    )

    # a complete cache: the VAE and text encoder are never loaded, and the run is the same (--label_policy,
    # which does nothing to a table, does not make the cache another's)
    def refuse(*a, **k):
        raise AssertionError("loaded the VAE or text encoder although the cache is complete")

    with monkeypatch.context() as m:
        m.setattr(AutoencoderKL, "from_pretrained", refuse)
        m.setattr(CLIPTextModel, "from_pretrained", refuse)
        again, _ = run(
            tmp_path / "b",
            *("--cache_latents", "--cache_dir", str(cache), "--learning_rate", "0"),
            *("--label_policy", "always_won"),
        )
    assert_close(again, rows, 0.0)  # the same cache files through the same computation: bit for bit

    # a missing chunk (an interrupted cache pass) is encoded again, identically
    (cache / "latents-000000.pt").unlink()
    run(tmp_path / "c", "--cache_latents", "--cache_dir", str(cache), "--learning_rate", "0")
    rebuilt = torch.load(cache / "latents-000000.pt", weights_only=True)
    # the same images, the same VAE batches: bitwise
    assert all(torch.equal(first[k], rebuilt[k]) for k in first)

    # a cache made with other settings is refused, not silently reused
    with pytest.raises(SystemExit) as e:
        run(
            tmp_path / "d",
            "--cache_latents",
            "--cache_dir",
            str(cache),
            "--learning_rate",
            "0",
            "--resolution",
            "16",
        )
    assert e.value.code == 2 and "other settings" in capsys.readouterr().err


def test_a_cache_built_by_older_code_is_refused(tmp_path, monkeypatch):
    import latent_cache

    settings = dict(pretrained_model="m", resolution=16)
    latent_cache.check_settings(tmp_path, settings, rank=0)
    latent_cache.check_settings(tmp_path, settings, rank=0)  # the same code and settings: reused
    # images decoded differently since (latent_cache.FORMAT raised): the cache holds what the data no longer gives
    monkeypatch.setattr(latent_cache, "FORMAT", latent_cache.FORMAT + 1)
    with pytest.raises(utils.DataError, match="other settings"):
        latent_cache.check_settings(tmp_path, settings, rank=0)


@pytest.mark.slow
def test_cache_latents_without_flip_with_batch_mean_and_dropout(tmp_path):
    args = [
        "--no-random_flip",
        "--reference_point",
        "batch_mean",
        "--caption_dropout",
        "0.5",
        "--learning_rate",
        "0",
    ]
    want, _ = run(tmp_path / "plain", *args)
    rows, _ = run(tmp_path / "cached", *args, "--cache_latents")  # default folder: <output_dir>/latent_cache
    assert_same_inputs(rows, want)
    part = torch.load(tmp_path / "cached" / "latent_cache" / "latents-000000.pt", weights_only=True)
    assert part["mean"].shape[1] == 1  # one view when images are not flipped


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_is_close_to_float32(tmp_path, plain, precision, monkeypatch):
    scalers = []
    real = torch.amp.GradScaler

    def record(*a, **k):
        scalers.append(real(*a, **k))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", record)
    rows, weights = run(tmp_path / "out", "--mixed_precision", precision, "--max_train_steps", "12")
    assert scalers[0].is_enabled() == (precision == "fp16")  # the loss scaler exists for fp16 only
    # bf16 keeps 8 significant bits (unit roundoff 2**-9 = 2e-3; fp16 2**-12): the UNets' inputs and weights are
    # rounded to it, their sums kept in float32, so e moves by a few such roundings; 5e-2 is 25 of bf16's
    assert_close(rows[:3], plain[0], 5e-2, keys=("policy_err", "ref_err"))
    # skipped: exactly the steps whose gradients were not finite
    assert [r["skipped"] for r in rows] == [int(r["grad_norm"] is None) for r in rows]  # inf: written null
    if (
        precision == "fp16"
    ):  # the first steps overflow at the initial scale 2**16 and are skipped by the scaler ...
        assert rows[0]["grad_norm"] is None and scalers[0].get_scale() < 2**16
        assert rows[0]["skipped"] == 1
    assert rows[-1]["grad_norm"] > 0  # ... until the scale fits; the weights then move
    from diffusers import UNet2DConditionModel

    start = UNet2DConditionModel.from_pretrained(fixtures.tiny_model_path(), subfolder="unet").state_dict()
    assert any((weights[k] - start[k]).abs().max() > 0 for k in weights)
    if precision == "fp16":  # a resume restores the loss scale reached, not the initial 2**16
        scale, loaded, load = scalers[0].get_scale(), [], checkpoints.load_checkpoint
        # the scale right after loading, before the step that follows can move it
        monkeypatch.setattr(
            checkpoints, "load_checkpoint", lambda *a: (load(*a), loaded.append(scalers[-1].get_scale()))[0]
        )
        run(tmp_path / "out", "--mixed_precision", precision, "--max_train_steps", "13", "--resume", "latest")
        assert loaded == [scale] and scale < 2**16


def test_profile_logs_every_phase(tmp_path):
    rows, _ = run(tmp_path / "out", "--profile")
    for r in rows:
        times = {k[5:]: v for k, v in r.items() if k.startswith("time_")}
        assert set(times) == PHASES and all(v >= 0 for v in times.values())
        batch = train_kto.TINY["train_batch_size"]
        assert sum(times.values()) <= batch / r["images_per_sec"]  # the phases lie inside the step
    rows, _ = run(tmp_path / "batch_mean", "--profile", "--reference_point", "batch_mean")
    assert {k[5:] for k in rows[0] if k.startswith("time_")} == PHASES


def count_flops_by_hand(unet, counts: list):
    """Hooks that add each call's FLOPs to `counts`, from the layers' shapes: 2 per multiply-add of a convolution
    or linear layer, 4 * B * Lq * Lk * inner_dim for attention (two matrix products). A call with gradients adds
    its backward: 2x for a layer whose input needs a gradient (input and weight gradients), 1x otherwise (the
    weight gradient only), 2.5x for attention (flash attention's backward recomputes the scores: 5 products)."""
    from diffusers.models.attention_processor import Attention

    def hook(m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        if isinstance(m, torch.nn.Conv2d):
            flops = 2 * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.Linear):
            flops = 2 * out.numel() * m.in_features
        else:
            context = kwargs.get("encoder_hidden_states")
            flops = 4 * x.shape[0] * x.shape[1] * (x if context is None else context).shape[1] * m.inner_dim
        backward = (
            0 if not torch.is_grad_enabled() else 2.5 if isinstance(m, Attention) else 1 + x.requires_grad
        )
        counts.append(flops * (1 + backward))

    for m in unet.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, Attention)):
            m.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("reference_point", ["kl_mismatched", "batch_mean"])
def test_profile_counts_the_steps_flops_and_utilisation(tmp_path, monkeypatch, reference_point):
    counts, load = [], train_kto.load_models

    def load_counted(*args, **kwargs):
        policy, ref, *rest = load(*args, **kwargs)
        count_flops_by_hand(policy, counts)
        count_flops_by_hand(ref, counts)
        return policy, ref, *rest

    monkeypatch.setattr(train_kto, "load_models", load_counted)
    # the cache: no VAE or text encoder in the step, so the UNets' calls are all its FLOPs
    rows, _ = run(
        tmp_path / "out",
        "--profile",
        "--cache_latents",
        "--max_train_steps",
        "2",
        "--peak_tflops",
        "0.5",
        "--reference_point",
        reference_point,
    )
    # torch's counter on step 1 against the hand count of both steps (the same shapes, so the same FLOPs)
    assert rows[0]["flops_per_step"] == rows[1]["flops_per_step"] == sum(counts) / 2
    for r in rows:
        seconds = train_kto.TINY["train_batch_size"] / r["images_per_sec"]
        # float64 arithmetic on the logged numbers (images_per_sec round-trips through seconds): a few 1e-16
        assert r["tflops_per_sec"] == pytest.approx(r["flops_per_step"] / seconds / 1e12, rel=1e-9)
        assert r["utilization"] == pytest.approx(r["tflops_per_sec"] / 0.5, rel=1e-12)


def test_adamw8bit_needs_bitsandbytes(tmp_path, plain, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as when it is not installed
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "missing", "--optimizer", "adamw8bit")
    assert e.value.code == 2 and "bitsandbytes" in capsys.readouterr().err
    made = []

    class StandIn(
        torch.optim.AdamW
    ):  # bitsandbytes' AdamW8bit signature; 32-bit states, so results match adamw
        def __init__(self, params, **kw):
            made.append(kw)
            super().__init__(params, **kw, fused=True)  # the plain run's kernel: the same arithmetic

    stand_in = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=StandIn))
    monkeypatch.setitem(sys.modules, "bitsandbytes", stand_in)
    rows, _ = run(tmp_path / "standin", "--optimizer", "adamw8bit")
    assert made == [dict(lr=train_kto.TINY["learning_rate"], weight_decay=0.0)]
    assert_close(rows, plain[0], 0.0)  # the same computation as the plain run: bit for bit


def test_each_gpu_variant_gets_its_own_peak():
    # torch.cuda.get_device_name's names; an NVL or PCIe card is not the SXM part of its family
    assert profiling.peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.0
    assert profiling.peak_tflops_of("NVIDIA H100 NVL") == 835.0
    assert profiling.peak_tflops_of("NVIDIA H100 PCIe") == 756.0
    assert profiling.peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312.0
    assert profiling.peak_tflops_of("NVIDIA GeForce RTX 4090") == 0.0


def test_sd15_configs_are_stable_diffusion_v1_5():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # no memory: parameter counts of the published SD v1-5 components
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(fixtures.SD15_CONFIGS / "unet")
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(fixtures.SD15_CONFIGS / "vae"))
        text = CLIPTextModel(
            CLIPTextConfig.from_json_file(fixtures.SD15_CONFIGS / "text_encoder" / "config.json")
        )
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert (count(unet), count(vae), count(text)) == (859_520_964, 83_653_863, 123_060_480)


def test_sd15_random_is_a_folder_built_by_a_command(tmp_path, monkeypatch, capsys):
    def small_stand_in(path):  # the real build writes 4 GB; the command's plumbing is what is tested here
        shutil.copytree(fixtures.tiny_model_path(), path, dirs_exist_ok=True)

    monkeypatch.setattr(fixtures, "build_sd15_random", small_stand_in)
    fixtures.main(["sd15-random", str(tmp_path / "sd15-random")])
    assert "RANDOM weights" in capsys.readouterr().out
    run(tmp_path / "out", "--pretrained_model", str(tmp_path / "sd15-random"), "--max_train_steps", "1")
    with pytest.raises(SystemExit):  # never over an existing folder
        fixtures.main(["sd15-random", str(tmp_path / "sd15-random")])


@pytest.mark.slow
def test_compile_compiles_both_unets_in_place(tmp_path, plain, monkeypatch):
    """Dynamo traces the UNets' repeated blocks (backend "eager": inductor's C++ build takes minutes on a CPU)."""
    compiled, real = [], torch.nn.Module.compile

    def eager(self, **kw):
        compiled.append(type(self).__name__)
        real(self, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", eager)
    rows, weights = run(tmp_path / "out", "--compile")
    blocks = [
        type(m).__name__
        for m in train_kto.load_models(
            train_kto.parse_config(TINY), str(fixtures.tiny_model_path()), torch.device("cpu")
        )[0].modules()
        if type(m).__name__ == "BasicTransformerBlock"
    ]
    # regional compilation: every transformer block of the policy and of the reference, nothing else
    assert len(blocks) > 0 and compiled == blocks * 2
    # backend eager runs the traced blocks with the same kernels on the same shapes: bit for bit (1e-5: headroom)
    assert_close(rows, plain[0], 1e-5)
    assert set(weights) == set(plain[1])  # in place: the saved state_dict keys are unchanged


@pytest.mark.slow
def test_profile_with_compile_counts_eagerly_then_compiles(tmp_path, plain, monkeypatch):
    """The FLOP count of step 1 runs eager: a step traced under the counter was never compiled afterwards (seen on
    an H200: --compile --profile ran at the eager speed)."""
    graphs, real = [], torch.nn.Module.compile

    def counting(self, **kw):  # dynamo traces; the "compiled" graph runs as traced
        real(self, backend=lambda gm, inputs: graphs.append(gm) or gm.forward)

    monkeypatch.setattr(torch.nn.Module, "compile", counting)
    rows, _ = run(tmp_path / "out", "--compile", "--profile")
    assert len(graphs) > 0
    assert_close(rows, plain[0], 1e-5)
    eager, _ = run(tmp_path / "eager", "--profile")
    assert rows[0]["flops_per_step"] == eager[0]["flops_per_step"] > 0


@pytest.fixture(scope="module")
def uneven_norms(tmp_path_factory):
    """The tiny model with GroupNorm/LayerNorm weights and biases that bf16 and fp16 cannot store exactly (the
    random tiny model's are exactly 1 and 0, which hides any rounding of the reference's norms)."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("uneven") / "model"
    shutil.copytree(fixtures.tiny_model_path(), folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    fixtures.perturb_norms(unet)
    unet.save_pretrained(folder / "unet")
    return folder


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("reference_point", ["kl_mismatched", "batch_mean"])
def test_reference_equals_policy_at_step_one(tmp_path, uneven_norms, precision, reference_point):
    rows, _ = run(
        tmp_path / "out",
        "--pretrained_model",
        str(uneven_norms),
        "--mixed_precision",
        precision,
        "--reference_point",
        reference_point,
        "--learning_rate",
        "0",
        "--max_train_steps",
        "2",
    )
    for r in rows:  # lr 0: the policy never moves, so every implicit reward, and so z, is exactly 0
        # bitwise: the reference is the policy's computation (norms in float32, the rest rounded as autocast
        # rounds the policy's), on the same batch
        assert (r["reward_desirable"], r["reward_undesirable"], r["z"]) == (0.0, 0.0, 0.0), (precision, r)
