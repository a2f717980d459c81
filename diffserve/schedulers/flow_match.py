"""Flow-matching Euler sampling: the sigma schedule and the step as pure functions, and the sampler that
drives them (FLUX, Qwen-Image, HunyuanVideo: any FlowMatchEulerDiscreteScheduler checkpoint).

The schedule reproduces diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=..., mu=...)` bit
for bit (float32): base sigmas (the pipeline's, or the default `np.linspace(1, 1/n, n)`), then either the
static shift or the resolution-dependent time shift `mu` (exponential or linear), then the optional stretch
to `shift_terminal`, then a final 0. Which base sigmas and mu a model uses is its recipe's choice:
FLUX and Qwen-Image pass the default base sigmas and `resolution_mu(image_seq_len)`; HunyuanVideo passes
`np.linspace(1, 0, n + 1)[:-1]` and a static shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch

TimeShiftType = Literal["exponential", "linear"]
TIME_SHIFT_TYPES = ("exponential", "linear")

# config keys of FlowMatchEulerDiscreteScheduler that must keep their neutral value for us to be exact
_UNSUPPORTED = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "invert_sigmas": False, "stochastic_sampling": False}


@dataclass(frozen=True)
class FlowMatchConfig:
    """The fields of a checkpoint's `scheduler/scheduler_config.json` the schedule depends on.

    `shift_terminal`: when set (non-zero), the shifted sigmas are stretched so that the last one equals it.
    `time_shift_type`: the form of the dynamic shift, exp(mu) / (exp(mu) + 1/s - 1) or mu / (mu + 1/s - 1)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: TimeShiftType = "exponential"

    @classmethod
    def from_dict(cls, raw: dict) -> FlowMatchConfig:
        """From a scheduler config; options diffserve does not implement are a ValueError."""
        for key, neutral in _UNSUPPORTED.items():
            if raw.get(key, neutral) not in (neutral, None):
                raise ValueError(f"scheduler option {key}={raw[key]!r} is not supported by diffserve")
        if raw.get("time_shift_type", "exponential") not in TIME_SHIFT_TYPES:
            raise ValueError(f"scheduler option time_shift_type={raw['time_shift_type']!r} is not supported; "
                             f"supported: {', '.join(TIME_SHIFT_TYPES)}")
        terminal = raw.get("shift_terminal")
        if terminal is not None and not 0.0 <= terminal < 1.0:
            raise ValueError(f"scheduler option shift_terminal={terminal!r} must lie in [0, 1)")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def resolution_mu(image_seq_len: int, cfg: FlowMatchConfig) -> float:
    """Linear interpolation of the shift between (base_seq_len, base_shift) and (max_seq_len, max_shift)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    b = cfg.base_shift - m * cfg.base_image_seq_len
    return image_seq_len * m + b


def default_base_sigmas(num_steps: int) -> np.ndarray:
    """(num_steps,) the pipelines' default unshifted sigmas: linspace(1, 1/n, n)."""
    return np.linspace(1.0, 1 / num_steps, num_steps)


def static_shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """shift * s / (1 + (shift - 1) * s): the resolution-independent shift."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(sigmas: np.ndarray, mu: float, kind: TimeShiftType) -> np.ndarray:
    """The resolution-dependent shift: exp(mu) / (exp(mu) + 1/s - 1), or mu / (mu + 1/s - 1) if linear."""
    if kind == "exponential":
        e = math.exp(mu)
        return e / (e + (1 / sigmas - 1))
    if kind == "linear":
        return mu / (mu + (1 / sigmas - 1))
    raise ValueError(f"time shift type {kind!r} is not one of {TIME_SHIFT_TYPES}")


def stretch_to_terminal(sigmas: np.ndarray, terminal: float) -> np.ndarray:
    """Stretch 1 - s so that the last sigma becomes `terminal` (the first keeps its distance from 1)."""
    one_minus = 1 - sigmas
    if one_minus[-1] == 0:
        raise ValueError("shift_terminal cannot stretch a schedule whose last sigma is 1 (use 2 or more steps)")
    scale = one_minus[-1] / (1 - terminal)
    return 1 - one_minus / scale


def shifted_sigmas(base_sigmas: np.ndarray, cfg: FlowMatchConfig, mu: float | None) -> np.ndarray:
    """(n,) float32: base sigmas with the config's static or dynamic shift, then its terminal stretch."""
    sigmas = np.asarray(base_sigmas).astype(np.float32)
    if cfg.use_dynamic_shifting:
        if mu is None:
            raise ValueError("this scheduler uses dynamic shifting: pass mu (e.g. resolution_mu(image_seq_len))")
        sigmas = time_shift(sigmas, mu, cfg.time_shift_type)
    else:
        sigmas = static_shift(sigmas, cfg.shift)
    if cfg.shift_terminal:
        sigmas = stretch_to_terminal(sigmas, cfg.shift_terminal)
    return sigmas


def flow_match_sigmas(num_steps: int, cfg: FlowMatchConfig, image_seq_len: int | None = None, *,
                      base_sigmas: np.ndarray | None = None, mu: float | None = None) -> torch.Tensor:
    """(num_steps + 1,) float32 sigmas from ~1 towards 0, shifted, with a final 0.

    `base_sigmas` default to `default_base_sigmas(num_steps)`; with dynamic shifting, `mu` defaults to
    `resolution_mu(image_seq_len)`."""
    base = default_base_sigmas(num_steps) if base_sigmas is None else np.asarray(base_sigmas)
    if len(base) != num_steps:
        raise ValueError(f"{len(base)} base sigmas given for {num_steps} steps")
    if cfg.use_dynamic_shifting and mu is None:
        if image_seq_len is None:
            raise ValueError("dynamic shifting needs mu or the image sequence length")
        mu = resolution_mu(image_seq_len, cfg)
    out = torch.from_numpy(np.asarray(shifted_sigmas(base, cfg, mu))).to(torch.float32)
    return torch.cat([out, torch.zeros(1)])


def sigmas_to_timesteps(sigmas: torch.Tensor, cfg: FlowMatchConfig) -> torch.Tensor:
    """Model timesteps (0..num_train_timesteps) for each step: drops the final 0 sigma."""
    return sigmas[:-1] * cfg.num_train_timesteps


def euler_step(sample: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    """x_{next} = x + (sigma_next - sigma) * v, accumulated in float32, returned in v's dtype."""
    return (sample.float() + (sigma_next - sigma) * velocity).to(velocity.dtype)


@dataclass(frozen=True)
class FlowMatchEulerSampler:
    """Flow-match Euler over a fixed schedule (a `schedulers.sampler.Sampler`; it keeps no history).

    sigmas (n + 1,) float32 ending in 0 and timesteps (n,) = sigmas[:-1] * num_train_timesteps, on the
    device."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @classmethod
    def create(cls, num_steps: int, cfg: FlowMatchConfig, device: torch.device, image_seq_len: int | None = None,
               *, base_sigmas: np.ndarray | None = None, mu: float | None = None) -> FlowMatchEulerSampler:
        """The sampler of one batch: `flow_match_sigmas(...)` (same arguments) moved to `device`."""
        sigmas = flow_match_sigmas(num_steps, cfg, image_seq_len, base_sigmas=base_sigmas, mu=mu)
        return cls(sigmas.to(device), sigmas_to_timesteps(sigmas, cfg).to(device))

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        return euler_step(x, v, self.sigmas[i], self.sigmas[i + 1])
