"""Which denoising schedule a Wan checkpoint runs, chosen from the checkpoint itself (no user flag).

- Wan2.1 checkpoints (`WanPipeline`, `WanImageToVideoPipeline`) ship a flow-prediction
  `UniPCMultistepScheduler` (flow_shift 3.0): we run diffusers' implementation of it, created fresh for
  every batch (it keeps multistep history).
- FastWan checkpoints (FastVideo's few-step DMD-distilled Wan2.1, `model_index.json` class
  `WanDMDPipeline`; their `scheduler/` folder is the base model's UniPC config, which is *not* what they
  were distilled for) run the distilled schedule: denoising steps (1000, 757, 522) read as positions in a
  1000-step flow-match table with shift 8.0 ("warped" steps: model timesteps 1000, 961.4, 897.3), each
  step predicting x0 = x - sigma * v and re-noising it to the next step's sigma with fresh Gaussian noise;
  no classifier-free guidance. Source: FastVideo's Wan DMD pipeline config (dmd_denoising_steps, flow
  shift 8, warp_denoising_step) and its `pred_noise_to_pred_video` / `add_noise`; defaults 3 steps at
  61 x 448 x 832.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffserve.config import GenerationRequest
from diffserve.errors import CheckpointError, InvalidRequestError
from diffserve.models.loader import ModelIndex, read_json

FASTWAN_DMD_STEPS = (1000, 757, 522)
FASTWAN_SHIFT = 8.0


def dmd_schedule(steps: tuple[int, ...] = FASTWAN_DMD_STEPS, shift: float = FASTWAN_SHIFT,
                 num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Warped DMD steps -> (model timesteps (n,), sigmas (n + 1,) ending in 0), float32.

    Step s picks row num_train_timesteps - s of the shifted 1000-step flow-match table."""
    base = np.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps)
    table = shift * base / (1 + (shift - 1) * base)  # sigmas of the full table, 1 -> ~0
    rows = num_train_timesteps - np.asarray(steps)
    if rows.min() < 0 or rows.max() >= num_train_timesteps:
        raise ValueError(f"DMD steps must lie in (0, {num_train_timesteps}], got {steps}")
    sigmas = torch.tensor(np.append(table[rows], 0.0), dtype=torch.float32)
    return sigmas[:-1] * num_train_timesteps, sigmas


class DMDSampler:
    """Few-step sampler of DMD-distilled flow models: x0 = x - sigma * v, then x' = (1 - s') x0 + s' noise
    (the last step returns x0). The re-noising draws come from one CPU generator per request, seeded with
    the request's seed + 1, so a seed gives the same video on any device and in any batch."""

    def __init__(self, timesteps: torch.Tensor, sigmas: torch.Tensor, requests: list[GenerationRequest]) -> None:
        self.timesteps = timesteps
        self.sigmas = sigmas.tolist()
        self.generators = [(torch.Generator("cpu").manual_seed(int(r.seed) + 1), r.num_outputs) for r in requests]
        self._i = 0

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        parts = [torch.randn((n, *like.shape[1:]), generator=g, dtype=torch.float32) for g, n in self.generators]
        return torch.cat(parts).to(like.device)

    def step(self, v: torch.Tensor, t: torch.Tensor, x: torch.Tensor, return_dict: bool = False):
        sigma, sigma_next = self.sigmas[self._i], self.sigmas[self._i + 1]
        self._i += 1
        x0 = x.float() - sigma * v.float()
        if sigma_next == 0.0:
            return x0.to(x.dtype), None
        return ((1 - sigma_next) * x0 + sigma_next * self._noise(x0)).to(x.dtype), None


@dataclass(frozen=True)
class WanSchedule:
    kind: str  # "unipc" or "dmd"
    scheduler_config: dict
    default_steps: int
    default_guidance: float
    default_size: tuple[int, int, int] = (480, 832, 81)  # height, width, frames

    def new_sampler(self, steps: int, device: torch.device, requests: list[GenerationRequest]) -> object:
        """A fresh sampler for one batch; it exposes `.timesteps` and `.step(v, t, x)`."""
        if self.kind == "unipc":
            from diffusers import UniPCMultistepScheduler

            sched = UniPCMultistepScheduler.from_config(self.scheduler_config)
            sched.set_timesteps(steps, device=device)
            sched.set_begin_index(0)
            return sched
        if self.kind == "dmd":
            if steps != len(FASTWAN_DMD_STEPS):
                raise InvalidRequestError(
                    f"num_inference_steps={steps} is not accepted: this few-step distilled (FastWan) model runs "
                    f"its {len(FASTWAN_DMD_STEPS)}-step schedule; use {len(FASTWAN_DMD_STEPS)}",
                    param="num_inference_steps")
            timesteps, sigmas = dmd_schedule()
            return DMDSampler(timesteps.to(device), sigmas, requests)
        raise CheckpointError(f"unknown Wan schedule kind {self.kind!r}")


def schedule_from_checkpoint(index: ModelIndex) -> WanSchedule:
    """The schedule the checkpoint asks for: its pipeline class first (FastWan), then its scheduler."""
    raw = read_json(index.folder("scheduler") / "scheduler_config.json")
    if index.pipeline_class == "WanDMDPipeline":
        return WanSchedule("dmd", raw, default_steps=len(FASTWAN_DMD_STEPS), default_guidance=1.0,
                           default_size=(448, 832, 61))
    cls = raw.get("_class_name")
    if cls == "UniPCMultistepScheduler":
        return WanSchedule("unipc", raw, default_steps=50, default_guidance=5.0)
    raise CheckpointError(f"{index.root}: Wan scheduler {cls!r} is not supported; supported: UniPCMultistepScheduler "
                          f"(Wan2.1) or a WanDMDPipeline (FastWan) checkpoint")
