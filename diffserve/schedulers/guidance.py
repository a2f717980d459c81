"""Guidance: how one step's model predictions become the one prediction the sampler steps with.

The math is pure functions; a recipe picks one small object for its denoising stage:

- `NoGuidance`: distilled models (FLUX.1-schnell, FastWan); one branch, used as is.
- `EmbeddedGuidance`: guidance-distilled models (FLUX.1-dev, HunyuanVideo); the scale is a model input
  (the recipe's predictor passes it), so there is one branch, used as is.
- `ClassifierFreeGuidance`: uncond + s * (cond - uncond) (Wan2.1).
- `NormRescaledCfg`: Qwen-Image's true CFG, the CFG combination rescaled to the conditional prediction's
  norm along the last (channel) dimension.
- `TrueCfgOverEmbedded`: HunyuanVideo's true CFG: both branches carry the embedded guidance (the predictor
  passes guidance_scale), combined as plain CFG with the request's separate `true_cfg_scale`.

Each choice says which request field is its combine scale (`scale(request)`): `guidance_scale`, except for
`TrueCfgOverEmbedded`.

A combine that takes an unconditional branch still gets none when the request asks for no guidance (the
text stage then makes no unconditional conditioning): the conditional prediction is used as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from diffserve.config import GenerationRequest


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
    when an unconditional branch was run); `scale(request)`: the scale it is called with."""

    uses_uncond: ClassVar[bool]

    def scale(self, request: GenerationRequest) -> float: ...

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor: ...


class _GuidanceScale:
    def scale(self, request: GenerationRequest) -> float:
        """The combine scale: the request's guidance_scale."""
        return float(request.guidance_scale)  # type: ignore[arg-type]


class _SingleBranch(_GuidanceScale):
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
class ClassifierFreeGuidance(_GuidanceScale):
    """Plain CFG over a conditional and an unconditional branch (`cfg_combine`)."""

    uses_uncond: ClassVar[bool] = True

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        return cfg_combine(cond, uncond, scale)


@dataclass(frozen=True)
class NormRescaledCfg(_GuidanceScale):
    """Qwen-Image's true CFG: plain CFG rescaled to the conditional prediction's norm (`norm_rescaled_cfg`)."""

    uses_uncond: ClassVar[bool] = True

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        return norm_rescaled_cfg(cond, uncond, scale)


@dataclass(frozen=True)
class TrueCfgOverEmbedded:
    """True CFG on a guidance-distilled model (HunyuanVideo, as diffusers' `true_cfg_scale`): each branch
    has the embedded guidance as a model input, and the two are combined by plain CFG (`cfg_combine`) with
    the request's `true_cfg_scale`, not its guidance_scale."""

    uses_uncond: ClassVar[bool] = True

    def scale(self, request: GenerationRequest) -> float:
        if request.true_cfg_scale is None:
            raise ValueError("true CFG over embedded guidance needs the request's true_cfg_scale")
        return float(request.true_cfg_scale)

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        return cfg_combine(cond, uncond, scale)
