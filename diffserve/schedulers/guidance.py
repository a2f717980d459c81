"""Guidance: how one step's model predictions become the one prediction the sampler steps with.

The math is pure functions; a recipe picks one small object for its denoising stage:

- `NoGuidance`: distilled models (FLUX.1-schnell, FastWan); one branch, used as is.
- `EmbeddedGuidance`: guidance-distilled models (FLUX.1-dev, HunyuanVideo); the scale is a model input
  (the recipe's predictor passes it), so there is one branch, used as is.
- `ClassifierFreeGuidance`: uncond + s * (cond - uncond) (Wan2.1).
- `NormRescaledCfg`: Qwen-Image's true CFG, the CFG combination rescaled to the conditional prediction's
  norm along the last (channel) dimension.

A combine that takes an unconditional branch still gets none when the request asks for no guidance (the
text stage then makes no unconditional conditioning): the conditional prediction is used as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def norm_rescaled_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """True CFG with norm rescaling (Qwen-Image): the CFG combination, scaled per token so that its L2 norm
    over the last dimension equals the conditional prediction's: comb * (||cond|| / ||comb||)."""
    comb = cfg_combine(cond, uncond, scale)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    comb_norm = torch.norm(comb, dim=-1, keepdim=True)
    return comb * (cond_norm / comb_norm)


class Guidance(Protocol):
    """What the denoising stage asks of a guidance choice.

    `uses_uncond`: whether the model is run on an unconditional (negative-prompt) branch too.
    `combine(cond, uncond, scale)`: the guided prediction from the two branches' predictions (only called
    when an unconditional branch was run)."""

    uses_uncond: ClassVar[bool]

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor: ...


class _SingleBranch:
    uses_uncond: ClassVar[bool] = False

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} has no unconditional branch to combine")


@dataclass(frozen=True)
class NoGuidance(_SingleBranch):
    """Distilled models: one branch, no guidance scale."""


@dataclass(frozen=True)
class EmbeddedGuidance(_SingleBranch):
    """Guidance-distilled models: the scale is an input of the model (passed by the recipe's predictor),
    so the combine is a pass-through of the one branch."""


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """Plain CFG over a conditional and an unconditional branch (`cfg_combine`)."""

    uses_uncond: ClassVar[bool] = True

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        return cfg_combine(cond, uncond, scale)


@dataclass(frozen=True)
class NormRescaledCfg:
    """Qwen-Image's true CFG: plain CFG rescaled to the conditional prediction's norm (`norm_rescaled_cfg`)."""

    uses_uncond: ClassVar[bool] = True

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        return norm_rescaled_cfg(cond, uncond, scale)
