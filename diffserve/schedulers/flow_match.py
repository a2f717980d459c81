"""Flow-matching Euler sampling as pure functions (FLUX, and any FlowMatchEulerDiscrete checkpoint).

The sigma schedule reproduces diffusers' `FlowMatchEulerDiscreteScheduler` with the pipeline's
`np.linspace(1, 1/n, n)` sigmas and the resolution-dependent shift `mu` bit for bit (float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

# config keys of FlowMatchEulerDiscreteScheduler that must keep their neutral value for us to be exact
_UNSUPPORTED = {"shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                "use_beta_sigmas": False, "invert_sigmas": False, "stochastic_sampling": False,
                "time_shift_type": "exponential"}


@dataclass(frozen=True)
class FlowMatchConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    @classmethod
    def from_dict(cls, raw: dict) -> FlowMatchConfig:
        for key, neutral in _UNSUPPORTED.items():
            if raw.get(key, neutral) not in (neutral, None):
                raise ValueError(f"scheduler option {key}={raw[key]!r} is not supported by diffserve")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def resolution_mu(image_seq_len: int, cfg: FlowMatchConfig) -> float:
    """Linear interpolation of the shift between (base_seq_len, base_shift) and (max_seq_len, max_shift)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    b = cfg.base_shift - m * cfg.base_image_seq_len
    return image_seq_len * m + b


def flow_match_sigmas(num_steps: int, cfg: FlowMatchConfig, image_seq_len: int) -> torch.Tensor:
    """(num_steps + 1,) float32 sigmas from 1 towards 0, shifted, with a final 0."""
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    if cfg.use_dynamic_shifting:
        e = math.exp(resolution_mu(image_seq_len, cfg))
        sigmas = e / (e + (1 / sigmas - 1) ** 1.0)
    else:
        sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
    out = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    return torch.cat([out, torch.zeros(1)])


def sigmas_to_timesteps(sigmas: torch.Tensor, cfg: FlowMatchConfig) -> torch.Tensor:
    """Model timesteps (0..num_train_timesteps) for each step: drops the final 0 sigma."""
    return sigmas[:-1] * cfg.num_train_timesteps


def euler_step(sample: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    """x_{next} = x + (sigma_next - sigma) * v, accumulated in float32, returned in v's dtype."""
    return (sample.float() + (sigma_next - sigma) * velocity).to(velocity.dtype)
