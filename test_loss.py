"""Tests of the objective in train_kto.py: the loss and the reference point by hand and by invariants, kto_step on
tiny UNets against an independent computation, the frozen reference's precision, the sampler and augmentation.

Run: python -m pytest -q test_loss.py   (offline, under a minute)
"""

import functools
import math

import numpy as np
import pytest
import torch

import fixtures
import models
import tiny_world
import train_kto
import utils
from encoders import augment
from train_kto import DesirableRatioSampler, kto_loss, mismatched_indices, reference_point

UTILITIES = ("kahneman_tversky", "loss_averse", "risk_seeking")


# ---------------------------------------------------------------------------------------------------
# The loss


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def by_hand(policy_err, ref_err, desirable, beta, z, utility, lambda_d, lambda_u):
    """An independent, scalar transcription of lambda_y * (1 - U(w * beta * (r - z)))."""
    out = []
    for p, q, d in zip(policy_err, ref_err, desirable):
        x = (1 if d else -1) * beta * ((q - p) - z)
        u = {
            "kahneman_tversky": sigmoid(x),
            "loss_averse": math.log(sigmoid(x)),
            "risk_seeking": -math.log(sigmoid(-x)),
        }[utility]
        out.append((lambda_d if d else lambda_u) * (1 - u))
    return out


def test_hand_computed_values():
    # r = [0.1, -0.1]; x = w * beta * (r - z) = [+10 * 0.05, -10 * (-0.15)] = [0.5, 1.5]
    p, q, d = torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.2]), torch.tensor([True, False])
    expected = {
        "kahneman_tversky": [1 - 1 / (1 + math.exp(-0.5)), 1 - 1 / (1 + math.exp(-1.5))],
        "loss_averse": [1 + math.log(1 + math.exp(-0.5)), 1 + math.log(1 + math.exp(-1.5))],
        "risk_seeking": [1 - math.log(1 + math.exp(0.5)), 1 - math.log(1 + math.exp(1.5))],
    }
    for utility, values in expected.items():
        got = kto_loss(p, q, d, beta=10.0, z=0.05, utility=utility, lambda_d=2.0, lambda_u=3.0)
        # float32 sigmoid / softplus of x ~ 1 against float64: a few U = 6e-8 relative; 1e-6 is 10x that
        torch.testing.assert_close(got, torch.tensor([2 * values[0], 3 * values[1]]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("utility", UTILITIES)
def test_parity_with_independent_transcription(utility):
    g = torch.Generator().manual_seed(1)
    p, q = torch.rand(64, generator=g, dtype=torch.float64), torch.rand(64, generator=g, dtype=torch.float64)
    d = torch.rand(64, generator=g) < 0.6
    got = kto_loss(p, q, d, beta=3.0, z=0.02, utility=utility, lambda_d=1.5, lambda_u=0.7)
    want = by_hand(p.tolist(), q.tolist(), d.tolist(), 3.0, 0.02, utility, 1.5, 0.7)
    # float64 on both sides: a few 1e-16 absolute; the smallest value is 3.6e-4 (risk_seeking's 1 - softplus
    # cancels), so at most 1e-12 relative
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


def test_policy_equal_to_ref_gives_half_lambda():
    err = torch.rand(6)
    d = torch.tensor([True, False, True, True, False, False])
    loss = kto_loss(err, err.clone(), d, beta=5000.0, z=0.0, lambda_d=2.0, lambda_u=0.5)
    # exact: r = 0, so x = 0 and sigmoid(0) = 1/2 (assert_close's float32 default is headroom)
    torch.testing.assert_close(loss, torch.where(d, 1.0, 0.25))


@pytest.mark.parametrize("utility", UTILITIES)
def test_gradient_signs(utility):
    """Descending the loss lowers policy_err on desirable samples and raises it on undesirable ones."""
    policy_err = torch.tensor([0.5, 0.5, 0.4, 0.6], requires_grad=True)
    ref_err = torch.tensor([0.5, 0.5, 0.45, 0.55])
    d = torch.tensor([True, False, True, False])
    kto_loss(policy_err, ref_err, d, beta=10.0, z=0.01, utility=utility).sum().backward()
    grad = policy_err.grad
    assert (grad[d] > 0).all() and (grad[~d] < 0).all(), grad  # step -lr*grad: down for d, up for u


@pytest.mark.parametrize("utility", UTILITIES)
def test_stable_in_float32_at_beta_5000(utility):
    policy_err = torch.tensor([0.0, 1.0, 0.0, 1.0], requires_grad=True)
    ref_err = torch.tensor([1.0, 0.0, 1.0, 0.0])  # beta * r = +-5000: exp() of that overflows float32
    d = torch.tensor([True, True, False, False])
    loss = kto_loss(policy_err, ref_err, d, beta=5000.0, z=0.0, utility=utility)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(policy_err.grad).all(), (loss, policy_err.grad)


def test_unknown_utility_names_the_choices():
    with pytest.raises(ValueError, match="kahneman_tversky, loss_averse, risk_seeking"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), 1.0, 0.0, utility="prospect")


# ---------------------------------------------------------------------------------------------------
# The reference point z and the mismatched pairs


def test_reference_point_is_clamped_and_detached():
    r = torch.tensor([-0.3, 0.1], requires_grad=True)
    z = reference_point(r)
    assert z.item() == 0.0 and not z.requires_grad
    r2 = torch.tensor([0.3, 0.1], requires_grad=True)
    z2 = reference_point(r2)
    # float32 mean of two numbers: half an ulp (1e-8); approx's default rel 1e-6 is headroom
    assert z2.item() == pytest.approx(0.2) and not z2.requires_grad and z2.grad_fn is None


@pytest.mark.parametrize("n", range(2, 10))
def test_mismatched_roll_never_keeps_own_caption(n):
    j = mismatched_indices(n)
    assert sorted(j.tolist()) == list(range(n))  # every caption is used once
    assert (j != torch.arange(n)).all()


def test_mismatched_needs_two_per_rank():
    with pytest.raises(utils.DataError, match="train_batch_size >= 2"):
        mismatched_indices(1)


# ---------------------------------------------------------------------------------------------------
# kto_step on tiny UNets: the objective with real models


def tiny_unets(prediction_type="epsilon"):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    policy = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=8,
        attention_head_dim=4,
    )
    scheduler = DDPMScheduler(**tiny_world.sd15_scheduler_config() | dict(prediction_type=prediction_type))
    return policy, train_kto.frozen_reference(policy, torch.float32), scheduler


def step_inputs(b=4):
    g = torch.Generator().manual_seed(1)
    x0, emb = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 5, 8, generator=g)
    cond = lambda e: dict(encoder_hidden_states=e)  # noqa: E731
    return x0, cond(emb), cond(emb[mismatched_indices(b)]), torch.tensor([True, False, True, False][:b])


BETA = 1e4


def step(
    policy,
    ref,
    scheduler,
    x0,
    emb,
    emb_m,
    d,
    reference_point="kl_mismatched",
    micro_batches=1,
    objective="kto",
    beta=BETA,
):
    """kto_step with lambda_D = 2, lambda_U = 0.5, the sigmoid utility (or the SFT loss) and fixed draws."""
    loss_fn = (
        train_kto.sft_loss
        if objective == "sft"
        else functools.partial(kto_loss, beta=beta, utility="kahneman_tversky", lambda_d=2.0, lambda_u=0.5)
    )
    return train_kto.kto_step(
        policy,
        ref,
        scheduler,
        x0,
        emb,
        emb_m,
        d,
        torch.Generator().manual_seed(2),
        loss_fn,
        reference_point,
        micro_batches,
    )


@pytest.mark.parametrize("reference_point", ["kl_mismatched", "batch_mean", "zero"])
def test_kto_step_policy_equal_to_ref(reference_point):
    policy, ref, scheduler = tiny_unets()
    x0, emb, emb_m, d = step_inputs()
    loss, stats = step(policy, ref, scheduler, x0, emb, emb_m, d, reference_point)
    # bitwise: policy and reference are the same weights through the same computation on the same batch
    assert torch.equal(stats["r"], torch.zeros(4)) and stats["z"].item() == 0.0
    # lambda_y / 2 for the sigmoid utility
    assert loss.item() == pytest.approx((2.0 + 0.5 + 2.0 + 0.5) / 4 / 2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_kto_step_matches_an_independent_computation(prediction_type):
    """Perturb the reference (so r > 0 and z > 0); recompute x_t, the target, both errors, z from the mismatched
    pairs and the loss here."""
    policy, ref, scheduler = tiny_unets(prediction_type)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0, emb, emb_m, d = step_inputs()
    loss, stats = step(policy, ref, scheduler, x0, emb, emb_m, d)

    g = torch.Generator().manual_seed(2)  # the same draws, in the same order: noise, then timesteps
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    target = abar.sqrt() * eps - (1 - abar).sqrt() * x0 if prediction_type == "v_prediction" else eps
    err = lambda unet, c: ((unet(x_t, t, **c).sample - target) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    with torch.no_grad():
        r = err(ref, emb) - err(policy, emb)
        z = max(0.0, (err(ref, emb_m) - err(policy, emb_m)).mean().item())
    # the same UNet calls on the same batch, x_t and the target by another formula: a few ulp of the errors (~1e-7)
    # in r and z (~0.2), so 1e-4 relative is 100x that; the loss (beta 1e4) saturates: each sample's is 0 or lambda
    assert stats["z"].item() == pytest.approx(z, rel=1e-4, abs=1e-9) and z > 0
    torch.testing.assert_close(stats["r"], r, rtol=1e-4, atol=1e-9)
    want = by_hand(
        err(policy, emb).tolist(), err(ref, emb).tolist(), d.tolist(), BETA, z, "kahneman_tversky", 2.0, 0.5
    )
    assert loss.item() == pytest.approx(np.mean(want), rel=1e-4)

    # kto_step ran the backward pass: the gradient reaches the policy only
    assert all(p.grad is not None for p in policy.parameters()) and all(
        p.grad is None for p in ref.parameters()
    )


@pytest.mark.parametrize("reference_point", ["kl_mismatched", "batch_mean", "zero"])
def test_kto_step_in_micro_batches_gives_the_same_loss_z_and_gradients(reference_point):
    policy, ref, scheduler = tiny_unets()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x0, emb, emb_m, d = step_inputs()
    out = []
    for k in (1, 2, 4):
        policy.zero_grad()
        # beta 20, not 1e4: x = w * beta * (r - z) is then ~1 here and no sample's sigmoid saturates (at 1e4 every
        # gradient is exactly 0, and comparing them could not fail)
        loss, stats = step(
            policy, ref, scheduler, x0, emb, emb_m, d, reference_point, micro_batches=k, beta=20.0
        )
        out.append((loss, stats, [p.grad.clone() for p in policy.parameters()]))
    norm = lambda grads: torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in grads])
    ).item()
    # Tolerances, derived as in test_train.py's accumulation test (U = 2**-24, float32's unit roundoff): the micro-
    # batches change only the order of float32 sums (the UNets' kernels on 2 or 1 samples instead of 4, the gradient
    # summed in parts). A sample's error e moves by at most E_TOL = 300 U relative (the budget of the tiny model's
    # UNet, larger than this one); r and z by R_TOL = 2 * E_TOL * max e; the loss by lambda_max * beta / 2 * R_TOL;
    # each sample's gradient weight sigmoid'(x) by 2 * beta * R_TOL relative, its gradient by E_TOL.
    e_tol, beta, lambda_max = 300 * 2.0**-24, 20.0, 2.0
    r_tol = 2 * e_tol * max(out[0][1]["policy_err"].max().item(), out[0][1]["ref_err"].max().item())
    g_tol = 2 * beta * r_tol + 2 * e_tol
    for loss, stats, grads in out[1:]:
        assert loss.item() == pytest.approx(out[0][0].item(), rel=0, abs=lambda_max * beta / 2 * r_tol)
        assert stats["z"].item() == pytest.approx(out[0][1]["z"].item(), rel=0, abs=r_tol)
        torch.testing.assert_close(stats["r"], out[0][1]["r"], rtol=0, atol=r_tol)
        diff = norm([g - g0 for g, g0 in zip(grads, out[0][2])])
        assert diff <= g_tol * norm(out[0][2]), (diff / norm(out[0][2]), g_tol)
    assert norm(out[0][2]) > 0  # the gradients carry the loss (none of it saturates)
    assert reference_point == "zero" or out[0][1]["z"].item() > 0


def test_kto_step_sft_is_the_denoising_loss():
    policy, ref, scheduler = tiny_unets()
    x0, emb, emb_m, d = step_inputs()
    loss, stats = step(policy, ref, scheduler, x0, emb, emb_m, d, objective="sft")
    # a float32 sum of the same 4 errors (mean() may add them in another order: 3 U = 2e-7 at most): 1e-6 is 5x
    assert loss.item() == pytest.approx(stats["policy_err"].mean().item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_reference_keeps_norms_exact(dtype):
    policy, _, _ = tiny_unets()
    fixtures.perturb_norms(policy)
    ref = train_kto.frozen_reference(policy, dtype)
    for (name, p), q in zip(ref.named_parameters(), policy.parameters()):
        is_norm = "norm" in name and "attn" not in name and p.ndim == 1
        assert p.dtype == (torch.float32 if is_norm else dtype) and not p.requires_grad, name
        if is_norm:
            assert torch.equal(p, q), name


@pytest.mark.slow
def test_compiled_unets_keep_the_reward_exactly_zero_at_step_0():
    """--compile with real inductor kernels (a C++ build: about 40 s), bf16 autocast, norms that are not 1 and 0:
    the policy's training graph and the reference's inference graph must round alike, so that r is exactly 0 while
    policy == reference (without inductor's emulate_precision_casts beta * max|r| was 4 to 5.5 here)."""
    policy, _, scheduler = tiny_unets()
    fixtures.perturb_norms(policy)
    ref = train_kto.frozen_reference(policy, torch.bfloat16)
    models.compile_blocks(policy, ref)
    x0, emb, emb_m, d = step_inputs()
    for seed in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, stats = train_kto.kto_step(
                policy,
                ref,
                scheduler,
                x0,
                emb,
                emb_m,
                d,
                torch.Generator().manual_seed(seed),
                functools.partial(
                    kto_loss, beta=BETA, utility="kahneman_tversky", lambda_d=1.0, lambda_u=1.0
                ),
            )
        policy.zero_grad()
        assert stats["policy_err"].abs().min() > 0 and torch.equal(
            stats["r"], torch.zeros_like(stats["r"])
        ), seed


# ---------------------------------------------------------------------------------------------------
# Data helpers


def test_sampler_ratio_resume_and_seeds():
    desirable = np.array([True] * 10 + [False] * 90)
    draws = [i for _, i in zip(range(5000), DesirableRatioSampler(desirable, 0.8, seed=0))]
    frac = np.mean(desirable[draws])
    assert abs(frac - 0.8) < 0.03  # gamma, whatever the class sizes
    # resumed after 4000 draws: on across the stream's 4096-draw chunks
    resumed = DesirableRatioSampler(desirable, 0.8, seed=0, start=4000)
    assert [i for _, i in zip(range(300), resumed)] == draws[4000:4300]
    other_seed = DesirableRatioSampler(desirable, 0.8, seed=1)
    assert [i for _, i in zip(range(50), other_seed)] != draws[:50]
    never_d = DesirableRatioSampler(np.array([True, False, True]), 0.0, seed=0)
    assert {i for _, i in zip(range(50), never_d)} == {1}
    only_u = DesirableRatioSampler(np.zeros(4, bool), 0.8, seed=0)  # one class: every draw from it
    assert {i for _, i in zip(range(200), only_u)} == {0, 1, 2, 3}


def test_the_sampler_draws_the_same_images_on_any_split_of_the_global_batch():
    desirable = np.arange(1000) % 3 == 0

    def steps(world_size, per_rank, start, n):
        """The images of n steps after `start` draws, each step's ranks in rank order."""
        streams = [
            iter(DesirableRatioSampler(desirable, 0.8, 7, rank, world_size, per_rank, start))
            for rank in range(world_size)
        ]
        return sum(([next(s) for _ in range(per_rank)] for _ in range(n) for s in streams), [])

    whole = steps(1, 8, 0, 900)  # 7200 draws: past the stream's first 4096-draw chunk
    assert steps(4, 2, 0, 900) == whole and steps(2, 4, 0, 900) == whole
    # saved at step 500 by 1 rank x 8 (4000 draws), resumed on 2 x 4 or 4 x 2: the whole run's images, none again
    assert steps(2, 4, 4000, 400) == whole[4000:] == steps(4, 2, 4000, 400)
    # ... or on 2 x 2, a smaller global batch: still the stream's next draws
    assert steps(2, 2, 4000, 800) == whole[4000:]
    # the ranks of a step take different draws: rank 1's first images are not rank 0's
    assert steps(2, 4, 0, 1)[:4] != steps(2, 4, 0, 1)[4:]


def test_augment_flip_and_caption_dropout():
    pixels = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    caps = ["a", "b"]
    g = torch.Generator().manual_seed(0)
    same, kept, none = augment(pixels, caps, g, random_flip=False, caption_dropout=0.0)
    assert torch.equal(same, pixels) and kept == caps and not none.any()
    _, dropped, drop = augment(pixels, caps, g, random_flip=False, caption_dropout=1.0)
    assert dropped == ["", ""] and drop.all()
    flips = [augment(pixels, caps, g, random_flip=True, caption_dropout=0.0)[0] for _ in range(40)]
    flipped = [bool(torch.equal(f[0], pixels[0].flip(-1))) for f in flips]
    assert 5 < sum(flipped) < 35 and all(torch.equal(f[0], pixels[0]) or fl for f, fl in zip(flips, flipped))
