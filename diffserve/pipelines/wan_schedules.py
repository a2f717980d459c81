"""Which denoising schedule a Wan checkpoint runs, chosen from the checkpoint itself.

- Wan2.1 checkpoints ship a flow-prediction `UniPCMultistepScheduler` (flow_shift 3.0 for 480p): we run
  diffusers' implementation of it, set up fresh for every batch (it keeps multistep history).
- FastWan (few-step DMD-distilled Wan) checkpoints are recognised by their scheduler config and run the
  distilled timesteps with the DMD rule: predict x0, then re-noise to the next timestep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffserve.errors import CheckpointError
from diffserve.models.loader import ModelIndex, read_json

# FastWan2.1 (FastVideo) distilled with these denoising timesteps and flow shift 8.0.
FASTWAN_TIMESTEPS = (1000, 757, 522)
FASTWAN_SHIFT = 8.0


class DMDSampler:
    """Few-step sampler of DMD-distilled flow models: x0 = x - sigma * v, then x' = (1 - s') x0 + s' noise."""

    def __init__(self, timesteps: torch.Tensor, sigmas: torch.Tensor, seed_noise: torch.Generator) -> None:
        self.timesteps = timesteps
        self.sigmas = sigmas  # (n + 1,), last 0
        self.generator = seed_noise
        self._i = 0

    def step(self, v: torch.Tensor, t: torch.Tensor, x: torch.Tensor, return_dict: bool = False):
        sigma, sigma_next = self.sigmas[self._i], self.sigmas[self._i + 1]
        x0 = x.float() - sigma * v.float()
        noise = torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x.device)
        self._i += 1
        return ((1 - sigma_next) * x0 + sigma_next * noise).to(x.dtype), None


@dataclass(frozen=True)
class WanSchedule:
    kind: str  # "unipc" or "dmd"
    scheduler_config: dict
    default_steps: int
    default_guidance: float

    def new_sampler(self, steps: int, device: torch.device) -> object:
        if self.kind == "unipc":
            from diffusers import UniPCMultistepScheduler

            sched = UniPCMultistepScheduler.from_config(self.scheduler_config)
            sched.set_timesteps(steps, device=device)
            sched.set_begin_index(0)
            return sched
        raise CheckpointError(f"unknown Wan schedule kind {self.kind!r}")


def schedule_from_checkpoint(index: ModelIndex) -> WanSchedule:
    """The schedule the checkpoint's scheduler config asks for (no flag needed from the user)."""
    raw = read_json(index.folder("scheduler") / "scheduler_config.json")
    cls = raw.get("_class_name")
    if cls == "UniPCMultistepScheduler":
        return WanSchedule("unipc", raw, default_steps=50, default_guidance=5.0)
    raise CheckpointError(f"{index.root}: Wan scheduler {cls!r} is not supported; supported: UniPCMultistepScheduler")
