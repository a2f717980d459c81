"""The one denoising loop every recipe uses.

    predict = predictor.prepare(state)                      # once per generation
    for each step i of state.sampler:
        v_cond[, v_uncond] = branches(predict at (x, i, t), state.cond[, state.uncond])
        v = guidance.combine(v_cond, v_uncond, scale)       # or v_cond alone without an uncond branch;
                                                            # scale = guidance.scale(request)
        x = sampler.step(v, i, x)

What is model-specific comes from the recipe: the `Predictor` (its model call, in the recipe's own file),
the `Guidance` (schedulers/guidance.py) and the sampler (made per batch by the recipe's timestep stage,
schedulers/sampler.py). How the two CFG branches are evaluated is a `BranchRunner`: one after the other by
default; `diffserve.parallel.cfg.CfgParallel` runs one per rank instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from diffserve.pipelines.base import PipelineStage, PipelineState
from diffserve.schedulers.guidance import Guidance

Cond = dict[str, torch.Tensor]
# (latents x, step index i, model timestep t (0-d), one branch's conditioning) -> the model's prediction
PredictFn = Callable[[torch.Tensor, int, torch.Tensor, Cond], torch.Tensor]
Branch = Callable[[Cond], torch.Tensor]  # one step's model call, given a branch's conditioning


class Predictor(Protocol):
    """A recipe's model call. `prepare` runs once per generation, before the first step (what depends only
    on the batch is computed there, e.g. FLUX's modulations of every step), and returns the per-step call.
    It reads the recipe's components when called, so a transform that replaced the transformer (sequence
    parallelism) is honoured."""

    def prepare(self, state: PipelineState) -> PredictFn: ...


class BranchRunner(Protocol):
    """Evaluates one step's conditional and unconditional branches; returns (cond, uncond) predictions,
    identical on every process that runs the stage."""

    def __call__(self, branch: Branch, cond: Cond, uncond: Cond) -> tuple[torch.Tensor, torch.Tensor]: ...


def sequential_branches(branch: Branch, cond: Cond, uncond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
    """The single-process runner: the conditional branch, then the unconditional one."""
    return branch(cond), branch(uncond)


class StepHook(Protocol):
    """Something that follows the model calls of a generation (the step cache, `diffserve.accel.step_cache`):
    `begin` runs once per generation and returns the per-step call to use (it may note each call's branch and
    step); `hit_fraction` is reported in `state.cache_hit_fraction` at the end."""

    def begin(self, state: PipelineState, predict: PredictFn) -> PredictFn: ...

    def hit_fraction(self) -> float | None: ...


class DenoisingStage(PipelineStage):
    """Runs `state.sampler`'s steps over `state.latents` with the recipe's predictor and guidance.

    `branches` is the CFG branch runner: `sequential_branches` unless a parallel layout replaces it
    (`diffserve.parallel.cfg.install_cfg_parallel`). `step_cache` is None unless the step-cache transform
    installed one (`diffserve.accel.step_cache.install_step_cache`)."""

    name = "denoising"

    def __init__(self, predictor: Predictor, guidance: Guidance,
                 branches: BranchRunner = sequential_branches) -> None:
        self.predictor = predictor
        self.guidance = guidance
        self.branches = branches
        self.step_cache: StepHook | None = None

    @property
    def uses_cfg(self) -> bool:
        """Whether this stage can run an unconditional branch (and so be split by CFG parallelism)."""
        return self.guidance.uses_uncond

    @torch.no_grad()
    def run(self, state: PipelineState) -> None:
        sampler, x = state.sampler, state.latents
        if sampler is None or x is None:
            raise RuntimeError("the denoising stage needs latents and a sampler: run the latent and timestep "
                               "stages first")
        if state.uncond is not None and not self.guidance.uses_uncond:
            raise ValueError(f"{type(self.guidance).__name__} takes no unconditional branch, but the pipeline "
                             f"made unconditional conditioning")
        predict = self.predictor.prepare(state)
        if self.step_cache is not None:
            predict = self.step_cache.begin(state, predict)
        total = len(sampler.timesteps)
        scale = self.guidance.scale(state.request) if state.uncond is not None else 1.0  # unused without uncond
        for i in range(total):
            state.check_cancelled()
            t = sampler.timesteps[i]
            if state.uncond is None:
                v = predict(x, i, t, state.cond)
            else:
                v_cond, v_uncond = self.branches(lambda c, x=x, i=i, t=t: predict(x, i, t, c), state.cond,
                                                 state.uncond)
                v = self.guidance.combine(v_cond, v_uncond, scale)
            x = sampler.step(v, i, x)
            state.step_done(i + 1, total)
        state.latents = x
        if self.step_cache is not None:
            state.cache_hit_fraction = self.step_cache.hit_fraction()
