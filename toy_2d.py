"""The paper's 2-D toy (Sec. 6, Fig. 6): Diffusion-KTO under three utilities, and SFT, on points in the plane.

A small MLP diffusion model is pretrained on a Gaussian at (0.5, 0.8), std 0.2. Feedback: 3,500 points, half
desirable from a Gaussian at (0.3, 0.8), half undesirable from one at (0.3, 0.6), both std 0.1. From the
pretrained model we fine-tune with `train_kto.kto_loss` under each utility (Kahneman-Tversky, loss-averse,
risk-seeking) and with SFT (the plain denoising loss on the desirable points), sample from each, and count
how many samples land near each centre.

Launch:
    python toy_2d.py                                   # 5 seeds, all methods, ~80 s on 2 CPU cores
    python toy_2d.py --seeds 1 --steps 300 --out /tmp/toy.png
Prints a markdown table (mean +- std over seeds) and writes the figure (seed 0) to --out.

Where the paper is silent we chose (see docs/toy_2d.md): DDPM with 100 steps and the squaredcos_cap_v2
schedule, epsilon prediction, an MLP of 3 x 128 SiLU units on (x, sinusoidal embedding of t); feedback split
50/50 and batches drawn uniformly from it; z = reference_point(r of the batch) (the released code's
batch_mean estimator, as there are no captions to mismatch); beta = 10 (beta * |r| is O(1)); the same
Adam steps and lr for every method; "near" = within one feedback std (0.1) of a centre.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from train_kto import denoising_error, kto_loss, reference_point

METHODS = ("pretrained", "sft", "kahneman_tversky", "loss_averse", "risk_seeking")
LABELS = {
    "pretrained": "pretrained",
    "sft": "SFT",
    "kahneman_tversky": "Kahneman-Tversky",
    "loss_averse": "loss-averse",
    "risk_seeking": "risk-seeking",
}


@dataclass
class Config:
    pretrain_mean: tuple = (0.5, 0.8)  # paper: pretraining Gaussian, variance 0.04
    pretrain_std: float = 0.2
    desirable_mean: tuple = (0.3, 0.8)  # paper: desirable Gaussian, variance 0.01
    undesirable_mean: tuple = (0.3, 0.6)  # paper: undesirable Gaussian, variance 0.01
    feedback_std: float = 0.1
    n_feedback: int = 3500  # paper: 3,500 samples (ours: half desirable, half undesirable)
    timesteps: int = 100  # DDPM train timesteps (not stated in the paper)
    hidden: int = 128
    pretrain_steps: int = 3000
    pretrain_lr: float = 1e-3
    steps: int = 1000  # fine-tuning steps, the same for every method
    lr: float = 1e-4  # fine-tuning lr, the same for every method
    batch_size: int = 256
    beta: float = 10.0  # beta * |r| ~ 0.5-2 at the end of fine-tuning: O(1)
    n_samples: int = 2000
    radius: float = 0.1  # "near a centre": within one feedback std


class MLP(nn.Module):
    """Epsilon prediction eps(x_t, t) for 2-D points: an MLP on (x_t, sinusoidal embedding of t)."""

    def __init__(self, hidden: int, timesteps: int, t_dim: int = 32):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(timesteps), t_dim // 2)))
        self.timesteps = timesteps
        self.net = nn.Sequential(
            nn.Linear(2 + t_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angle = t[:, None].float() / self.timesteps * self.freqs[None]
        return self.net(torch.cat([x, angle.sin(), angle.cos()], dim=1))


def gaussian(n: int, mean, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.tensor(mean) + std * torch.randn(n, 2, generator=gen)


def noised(scheduler, x0: torch.Tensor, gen: torch.Generator):
    """One DDPM training draw: t ~ U{0..T-1}, eps ~ N(0, I), x_t = add_noise(x0, eps, t); returns (x_t, t, eps)."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    return scheduler.add_noise(x0, eps, t), t, eps


def pretrain(cfg: Config, scheduler, gen: torch.Generator) -> MLP:
    model = MLP(cfg.hidden, cfg.timesteps)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
    for _ in range(cfg.pretrain_steps):
        x0 = gaussian(cfg.batch_size, cfg.pretrain_mean, cfg.pretrain_std, gen)
        x_t, t, eps = noised(scheduler, x0, gen)
        loss = denoising_error(model(x_t, t), eps).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def finetune(
    method: str,
    base: MLP,
    x: torch.Tensor,
    desirable: torch.Tensor,
    cfg: Config,
    scheduler,
    gen: torch.Generator,
) -> tuple[MLP, float]:
    """Fine-tune a copy of `base` on the feedback (x, desirable); returns the policy and beta * |r| of the last
    100 steps, averaged (r = ref_err - policy_err, the implicit reward)."""
    policy, ref = copy.deepcopy(base), copy.deepcopy(base).requires_grad_(False)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    pool = desirable.nonzero().squeeze(1) if method == "sft" else torch.arange(len(x))  # SFT: desirable only
    beta_r = []
    for _ in range(cfg.steps):
        idx = pool[torch.randint(0, len(pool), (cfg.batch_size,), generator=gen)]
        x_t, t, eps = noised(scheduler, x[idx], gen)  # same x0, eps, t for policy and ref
        policy_err = denoising_error(policy(x_t, t), eps)
        with torch.no_grad():
            ref_err = denoising_error(ref(x_t, t), eps)
        r = ref_err - policy_err
        if method == "sft":
            loss = policy_err.mean()
        else:
            z = reference_point(r)  # z = max(0, mean r), no gradient
            loss = kto_loss(policy_err, ref_err, desirable[idx], cfg.beta, z, utility=method).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        beta_r.append(cfg.beta * r.detach().abs().mean().item())
    return policy, float(np.mean(beta_r[-100:]))


@torch.no_grad()
def sample(model: MLP, scheduler, n: int, gen: torch.Generator) -> torch.Tensor:
    """Ancestral DDPM sampling over all T steps."""
    scheduler.set_timesteps(scheduler.config.num_train_timesteps)
    x = torch.randn(n, 2, generator=gen)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(n)), t, x, generator=gen).prev_sample
    return x


def metrics(x: torch.Tensor, cfg: Config) -> dict:
    """Fraction of samples within cfg.radius of each centre, mean distance to it (nan if any sample is not finite),
    and the fraction of finite samples."""
    d_des = (x - torch.tensor(cfg.desirable_mean)).norm(dim=1)
    d_und = (x - torch.tensor(cfg.undesirable_mean)).norm(dim=1)
    return {
        "near_desirable": (d_des < cfg.radius).float().mean().item(),
        "near_undesirable": (d_und < cfg.radius).float().mean().item(),
        "dist_desirable": d_des.mean().item(),
        "dist_undesirable": d_und.mean().item(),
        "finite": x.isfinite().all(dim=1).float().mean().item(),
    }


def run_seed(seed: int, cfg: Config) -> tuple[dict, dict, tuple]:
    """Pretrain, draw feedback, fine-tune every method; returns per-method metrics, samples, and the feedback."""
    from diffusers import DDPMScheduler

    # points live outside [-1, 1]: no clipping
    scheduler = DDPMScheduler(
        num_train_timesteps=cfg.timesteps, beta_schedule="squaredcos_cap_v2", clip_sample=False
    )
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # MLP initialisation
    base = pretrain(cfg, scheduler, gen)
    n_d = cfg.n_feedback // 2
    x = torch.cat(
        [
            gaussian(n_d, cfg.desirable_mean, cfg.feedback_std, gen),
            gaussian(cfg.n_feedback - n_d, cfg.undesirable_mean, cfg.feedback_std, gen),
        ]
    )
    desirable = torch.arange(cfg.n_feedback) < n_d
    results, samples = {}, {}
    for method in METHODS:
        model, beta_r = (
            (base, 0.0)
            if method == "pretrained"
            else finetune(method, base, x, desirable, cfg, scheduler, gen)
        )
        samples[method] = sample(
            model, scheduler, cfg.n_samples, torch.Generator().manual_seed(10_000 + seed)
        )
        results[method] = {**metrics(samples[method], cfg), "beta_r": beta_r}
    return results, samples, (x, desirable)


def table(per_seed: list[dict]) -> str:
    """Markdown table: mean +- std over seeds (ddof 1) of each metric, one row per method."""

    def cell(method, key, fmt, scale=1):
        v = np.array([r[method][key] for r in per_seed]) * scale
        return (
            "n/a"
            if not np.isfinite(v).all()
            else f"{v.mean():{fmt}} ± {v.std(ddof=1) if len(v) > 1 else 0:{fmt}}"
        )

    cols = [
        ("near desirable (%)", "near_desirable", ".1f", 100),
        ("near undesirable (%)", "near_undesirable", ".1f", 100),
        ("mean dist. to desirable", "dist_desirable", ".3f", 1),
        ("mean dist. to undesirable", "dist_undesirable", ".3f", 1),
        ("finite samples (%)", "finite", ".0f", 100),
        ("beta·\\|r\\|, last 100 steps", "beta_r", ".3g", 1),
    ]
    lines = ["| method | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {LABELS[m]} | " + " | ".join(cell(m, *c[1:]) for c in cols) + " |" for m in METHODS]
    return "\n".join(lines)


def figure(results: dict, samples: dict, feedback: tuple, cfg: Config, path: str) -> None:
    """The paper's layout: one scatter panel per method on the same axes, both centres marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, desirable = feedback
    fig, axes = plt.subplots(2, 3, figsize=(9, 7.4), sharex=True, sharey=True, layout="constrained")
    axes = axes.ravel()
    axes[0].scatter(*x[desirable].T, s=2, c="tab:green", alpha=0.3, rasterized=True)
    axes[0].scatter(*x[~desirable].T, s=2, c="tab:red", alpha=0.3, rasterized=True)
    axes[0].set_title(
        f"feedback: {cfg.n_feedback:,} points\ndesirable (green), undesirable (red)", fontsize=10
    )
    for ax, m in zip(axes[1:], METHODS):
        ax.scatter(*samples[m].T, s=2, c="tab:blue", alpha=0.3, rasterized=True)
        ax.set_title(
            f"{LABELS[m]}\nnear desirable {100 * results[m]['near_desirable']:.0f}%, "
            f"undesirable {100 * results[m]['near_undesirable']:.0f}%",
            fontsize=10,
        )
        if results[m]["finite"] < 1:  # a diverged model samples inf / nan
            ax.text(
                0.5,
                0.15,
                f"diverged: {100 * (1 - results[m]['finite']):.0f}% of samples not finite",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
    for ax in axes:
        for centre, colour in ((cfg.desirable_mean, "tab:green"), (cfg.undesirable_mean, "tab:red")):
            ax.add_patch(plt.Circle(centre, cfg.radius, fill=False, color=colour, lw=1.5))
            ax.plot(*centre, marker="x", color=colour, ms=6)
        ax.set_xlim(-0.2, 1.2)
        ax.set_ylim(0.1, 1.5)
        ax.set_aspect("equal")
    fig.suptitle(
        f"2-D toy (paper Sec. 6): {cfg.n_samples:,} samples per model; circles: radius {cfg.radius} around "
        "the desirable (green) and undesirable (red) centres",
        fontsize=9,
    )
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--seeds",
        type=int,
        default=5,
        help="number of seeds (0..seeds-1, at least 1); the table is over seeds",
    )
    p.add_argument(
        "--steps", type=int, default=Config.steps, help="fine-tuning steps, the same for every method"
    )
    p.add_argument("--out", default="assets/toy_2d.png", help="where to write the figure (seed 0)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: must be at least 1")
    torch.set_num_threads(1)  # a 128-wide MLP gains ~10% from a 2nd thread: leave it to others
    cfg = Config(steps=args.steps)
    start, per_seed = time.time(), []
    for seed in range(args.seeds):
        results, samples, feedback = run_seed(seed, cfg)
        per_seed.append(results)
        if seed == 0:
            figure(results, samples, feedback, cfg, args.out)
        print(f"seed {seed} done, {time.time() - start:.0f} s")
    md = table(per_seed)
    print(md)
    print(f"wall time {time.time() - start:.0f} s; figure: {args.out}")
    return {"per_seed": per_seed, "table": md}


if __name__ == "__main__":
    main()
