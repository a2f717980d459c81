"""Few-step sampling of DMD-distilled flow models (FastWan), as pure schedule math and a `Sampler`.

The distilled model was trained on a handful of "denoising steps" read as positions in a shifted
num_train_timesteps-step flow-match table; each step predicts the clean latents x0 = x - sigma * v and
re-noises them to the next step's sigma with fresh Gaussian noise; the last step returns x0. Which steps
and shift a checkpoint was distilled for is its recipe's knowledge (`pipelines/wan.py` for FastWan).
"""

from __future__ import annotations

import numpy as np
import torch


def dmd_schedule(steps: tuple[int, ...], shift: float,
                 num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Warped DMD steps -> (model timesteps (n,), sigmas (n + 1,) ending in 0), float32.

    Step s picks row num_train_timesteps - s of the shifted num_train_timesteps-step flow-match table."""
    base = np.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps)
    table = shift * base / (1 + (shift - 1) * base)  # sigmas of the full table, 1 -> ~0
    rows = num_train_timesteps - np.asarray(steps)
    if rows.min() < 0 or rows.max() >= num_train_timesteps:
        raise ValueError(f"DMD steps must lie in (0, {num_train_timesteps}], got {steps}")
    sigmas = torch.tensor(np.append(table[rows], 0.0), dtype=torch.float32)
    return sigmas[:-1] * num_train_timesteps, sigmas


class DMDSampler:
    """x0 = x - sigma * v, then x' = (1 - s') x0 + s' noise (the last step returns x0); a `Sampler`.

    `noise_seeds`: (seed, number of samples) per request, in batch order. Each request's re-noising draws
    come from its own CPU generator with that seed, so a seed gives the same result on any device and in
    any batch."""

    def __init__(self, timesteps: torch.Tensor, sigmas: torch.Tensor, noise_seeds: list[tuple[int, int]]) -> None:
        self.timesteps = timesteps
        self.sigmas: list[float] = sigmas.tolist()
        self._generators = [(torch.Generator("cpu").manual_seed(seed), n) for seed, n in noise_seeds]
        self._next = 0

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        parts = [torch.randn((n, *like.shape[1:]), generator=g, dtype=torch.float32) for g, n in self._generators]
        return torch.cat(parts).to(like.device)

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        if i != self._next:  # the noise draws must follow the step order
            raise ValueError(f"DMD steps must be taken in order: expected step {self._next}, got {i}")
        self._next += 1
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = x.float() - sigma * v.float()
        if sigma_next == 0.0:
            return x0.to(x.dtype)
        return ((1 - sigma_next) * x0 + sigma_next * self._noise(x0)).to(x.dtype)
