"""The held-out reward margin: progress a user can read during training.

A training step scores each image at one random timestep with one noise draw, so the per-step reward is far noisier
than what training changes. Here a few hundred images are set aside (never trained on, in none of their rows:
split) and scored every --heldout_steps with FIXED draws: K timesteps stratified over [0, T) (the middle of each K-th of the range) and K
noises drawn from the seed alone, the same for every image (so what they add to the liked and the disliked images
alike cancels in the margin), at every evaluation, on every rank and after a resume. The image is the VAE posterior's mean of the unflipped image, with its own caption. For each
(image, draw) the implicit reward r = ref_err - policy_err is as in training; per image it is averaged over the K
draws. Reported: the mean r of liked and of disliked images, their difference (the margin; None for a class without
held-out images, and then the margin too), the implicit accuracy (the fraction of images with w * r > 0, a tie
half) and the policy's mean error. The cost: 2 x K forwards without gradient per held-out image and evaluation
(docs/outputs.md)."""

from __future__ import annotations

import numpy as np
import torch

import utils

# Draws per held-out image: with 4, the spread of the draws was as large as the tiny world's effect (docs/tiny_world.md)
DRAWS = 16


def split(desirable: np.ndarray, n: int, seed: int, keys=None) -> np.ndarray:
    """A bool mask of the held-out rows: at most n images and a tenth of them, half liked and half disliked where
    each class can spare it, chosen by `seed` (the same for every rank and every launch). A class gives at most a
    tenth of its images (rounded up; none of a class under 10), so training always keeps both classes.

    keys (one per row, equal for rows of the same image; None: every row is its own image): an image in several
    rows (several raters, duplicates) is one image, of the class of its first row, and all its rows are held out
    together, so no training row shares an image with a held-out one. Where every image is in one row only, the
    mask is the same as without keys."""
    desirable = np.asarray(desirable, bool)
    image = first = np.arange(len(desirable))  # each row's image, each image's first row
    if keys is not None:  # images numbered in order of first appearance
        _, first, inverse = np.unique(np.asarray(keys, dtype=object), return_index=True, return_inverse=True)
        order = np.argsort(first)
        image, first = np.argsort(order)[inverse.ravel()], first[order]
    liked_image = desirable[first]
    n = min(n, len(liked_image) // 10)
    rng = np.random.default_rng([seed, 20_240_404])
    liked, disliked = np.flatnonzero(liked_image), np.flatnonzero(~liked_image)
    spare = lambda k: -(-k // 10) if k >= 10 else 0  # noqa: E731
    n_liked = min(spare(len(liked)), max(n - spare(len(disliked)), n // 2))
    n_disliked = min(spare(len(disliked)), n - n_liked)
    chosen = [rng.choice(liked, n_liked, replace=False), rng.choice(disliked, n_disliked, replace=False)]
    mask = np.isin(image, np.concatenate(chosen).astype(int))
    for c in (True, False):  # rows of a class only in held-out images of the other class: give those back
        if (desirable == c).any() and not (desirable[~mask] == c).any():
            mask &= ~np.isin(image, image[desirable == c])
    return mask


class HeldOut:
    """Scores the held-out images (mask) with fixed draws; each rank a share, the sums all-reduced."""

    def __init__(self, mask, inputs, scheduler, autocast, error, seed: int, rank: int, world_size: int):
        # error(pred, target): the training step's denoising error (train_kto.denoising_error)
        self.items = np.flatnonzero(mask)[rank::world_size].tolist()
        self.inputs, self.scheduler, self.autocast, self.error = inputs, scheduler, autocast, error
        self.seed = seed

    def draws(self, shape) -> tuple[torch.Tensor, torch.Tensor]:
        """The K fixed draws, shared by every image (common random numbers: what is common to the liked and the
        disliked images cancels in the margin): timesteps at the middle of each K-th of [0, T), noises from the
        seed."""
        steps = self.scheduler.config.num_train_timesteps
        t = ((torch.arange(DRAWS) + 0.5) * steps / DRAWS).long()
        gen = torch.Generator().manual_seed(utils.derive_seed(self.seed, DRAWS))
        return t, torch.randn((DRAWS, *shape), generator=gen)

    @torch.no_grad()
    def __call__(self, policy, ref, batch_size: int) -> dict:
        device = self.inputs.device
        sums = dict(r_desirable=0.0, n_desirable=0.0, r_undesirable=0.0, n=0.0, won=0.0, policy_err=0.0)
        sums = {k: torch.zeros((), device=device) for k in sums}
        data = torch.utils.data.Subset(self.inputs.dataset, self.items)
        for batch in torch.utils.data.DataLoader(data, batch_size=batch_size):
            b = len(batch["desirable"])
            with self.autocast:
                x0, cond = self.inputs.fixed(batch)
            steps, noises = self.draws(x0.shape[1:])
            r, policy_err = torch.zeros(b, device=device), torch.zeros(b, device=device)
            for t, eps in zip(steps.tolist(), noises):
                t, eps = torch.full((b,), t, device=device), eps.to(device).expand_as(x0)
                x_t = self.scheduler.add_noise(x0, eps, t)
                v = self.scheduler.config.prediction_type == "v_prediction"
                target = self.scheduler.get_velocity(x0, eps, t) if v else eps
                with self.autocast:
                    err = [self.error(unet(x_t, t, **cond).sample, target) for unet in (policy, ref)]
                r += (err[1] - err[0]) / DRAWS
                policy_err += err[0] / DRAWS
            d = batch["desirable"].to(device).float()
            sums["r_desirable"] += (r * d).sum()
            sums["n_desirable"] += d.sum()
            sums["r_undesirable"] += (r * (1 - d)).sum()
            sums["n"] += b
            # w * r > 0; a tie (r = 0, as at step 0) counts half
            sums["won"] += ((2 * d - 1) * r > 0).float().sum() + 0.5 * (r == 0).float().sum()
            sums["policy_err"] += policy_err.sum()
        s = {k: v.item() for k, v in utils.global_sums(sums).items()}
        # a class with no held-out image (split spares none of a class under 10) has no mean: None (null in
        # metrics.jsonl), and so has the margin, rather than 0 and a margin that is the other class's reward
        n_liked, n_disliked = s["n_desirable"], s["n"] - s["n_desirable"]
        liked = s["r_desirable"] / n_liked if n_liked else None
        disliked = s["r_undesirable"] / n_disliked if n_disliked else None
        return dict(
            heldout_reward_desirable=liked,
            heldout_reward_undesirable=disliked,
            heldout_margin=None if liked is None or disliked is None else liked - disliked,
            heldout_accuracy=s["won"] / max(s["n"], 1),
            heldout_policy_err=s["policy_err"] / max(s["n"], 1),
        )
