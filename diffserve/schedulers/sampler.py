"""The one protocol every sampler follows, so that one denoising loop drives all of them.

A recipe's timestep stage makes a sampler fresh for every batch (it may hold multistep history or random
generators) and puts it on `PipelineState.sampler`; the denoising stage then asks it for the model timestep
of each step and hands it the model's (guided) prediction of each step, in order:

    for i in range(len(sampler.timesteps)):
        v = predict(x, i, sampler.timesteps[i], cond)
        x = sampler.step(v, i, x)

Implementations: `flow_match.FlowMatchEulerSampler` (FLUX, Qwen-Image, HunyuanVideo), `unipc.UniPCSampler`
(Wan2.1), `dmd.DMDSampler` (FastWan).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Sampler(Protocol):
    """One batch's sampler.

    `timesteps`: (n,) the model timestep of every step, on the device; n is the number of steps.
    `step(v, i, x)`: the latents after step i, given the model's prediction v at step i and the latents x
    before it. Steps are taken once each, in order 0..n-1 (samplers may keep history between them)."""

    timesteps: torch.Tensor

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor: ...
