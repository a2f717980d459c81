"""Flow-prediction UniPC (Wan2.1's scheduler) behind the `Sampler` protocol.

UniPC's multistep predictor-corrector bookkeeping is long and already right in diffusers, so this wraps
diffusers' `UniPCMultistepScheduler`, built from the checkpoint's own scheduler config. It keeps the history
of previous predictions, so a sampler is made fresh for every batch.
"""

from __future__ import annotations

import torch


class UniPCSampler:
    """diffusers' `UniPCMultistepScheduler` for one batch of `num_steps` steps (a `Sampler`)."""

    def __init__(self, scheduler_config: dict, num_steps: int, device: torch.device) -> None:
        from diffusers import UniPCMultistepScheduler

        self._scheduler = UniPCMultistepScheduler.from_config(scheduler_config)
        self._scheduler.set_timesteps(num_steps, device=device)
        self._scheduler.set_begin_index(0)
        self.timesteps: torch.Tensor = self._scheduler.timesteps
        self._next = 0

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        if i != self._next:
            raise ValueError(f"UniPC steps must be taken in order: expected step {self._next}, got {i}")
        self._next += 1
        return self._scheduler.step(v, self.timesteps[i], x, return_dict=False)[0]
