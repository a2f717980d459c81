"""First-block residual cache ("FBCache"): skip most of a DiT's blocks on steps where its first blocks'
output barely changed since the last fully computed step. Lossy, opt-in.

Every DiT has the shape of `diffserve.parallel.plan` (`embed`, `blocks`, `head`, `finish`) and runs a slice
of its repeated blocks with `run_blocks(tokens, start, stop)` (`REPEATED_BLOCKS` order). On each model call
the cache runs the first `k` blocks and measures how much their residual (output minus input, on the segment
the head reads, `PLAN.output`) changed since the last step on which every block ran:

    change = sum |r1 - r1_last| / sum |r1_last|        (relative L1, over the whole batch)

Below the threshold (after the warm-up steps, and at most `max_skip` steps in a row) the remaining blocks
are skipped: their output is the first blocks' output plus the residual the remaining blocks added on that
last full step. Otherwise the remaining blocks run and both residuals are stored. The head reads only the
output segment (and `cond`), so the other segments (FLUX's text stream) are left as the first blocks made
them on a cached step.

State is per generation (reset when the denoising stage starts) and per CFG branch: the stage names the
branch ("cond" / "uncond") before each model call, so the sequential and the CFG-parallel runner keep the
same per-branch decisions. Under sequence parallelism every rank holds shards of the same branch: the two
L1 sums are all-reduced over the sequence-parallel group, so every rank takes the same decision (and runs
the same collectives); shard padding (all-zero input rows) is left out of the sums, so the decision is the
single-process one up to summation order.

`install_step_cache(pipeline, config)` is the transform: it stands a `StepCachedDiT` in for the pipeline's
transformer and hooks the `StepCache` into its denoising stages. Model files hold no cache code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffserve.accel.cache_config import StepCacheConfig
from diffserve.engine.optimize import repeated_blocks
from diffserve.layers.parallel import CommGroup
from diffserve.parallel.plan import Tokens
from diffserve.pipelines.base import ComposedPipeline, PipelineState
from diffserve.pipelines.stages.denoise import Cond, DenoisingStage, PredictFn


def l1_sums(now: torch.Tensor, before: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(sum |now - before|, sum |before|) over the rows where `real` (B, L, 1) is True, as float32 (2,)."""
    diff = ((now.float() - before.float()).abs() * real).sum()
    norm = (before.float().abs() * real).sum()
    return torch.stack([diff, norm])


def relative_change(sums: torch.Tensor) -> float:
    """sum |now - before| / sum |before| from `l1_sums` (inf when the reference is all zero)."""
    diff, norm = (float(v) for v in sums.cpu())
    return diff / norm if norm > 0 else float("inf")


@dataclass
class BranchState:
    """What one CFG branch keeps between the steps of a generation."""

    first_residual: torch.Tensor | None = None  # first blocks' residual at the last fully computed step
    rest_residual: torch.Tensor | None = None  # what the remaining blocks added at that step
    consecutive: int = 0  # cached steps since then


class StepCache:
    """The cache's state for one pipeline. The denoising stage calls `begin` once per generation (it
    returns the per-step model call, which names the branch before each call); `StepCachedDiT.blocks`
    calls `run`."""

    def __init__(self, config: StepCacheConfig, output: str, num_blocks: int,
                 group: CommGroup | None = None) -> None:
        self.config = config  # the engine's settings; a request may change the threshold
        self.output = output  # the segment the head reads
        self.num_blocks = num_blocks
        self.group = group or CommGroup.single()  # ranks sharing one sequence (sequence parallelism)
        self.active: StepCacheConfig | None = None
        self.states: dict[str, BranchState] = {}
        self.branch, self.step = "cond", 0
        self.calls = self.hits = 0
        self.decisions: list[tuple[str, int, bool]] = []  # (branch, step, reused) of this generation
        self.changes: list[float] = []  # the relative changes measured in this generation, in call order

    def start(self, config: StepCacheConfig) -> None:
        """A new generation with `config`: every branch's state and the counts are cleared."""
        self.active, self.states = config, {}
        self.calls = self.hits = 0
        self.decisions, self.changes = [], []

    def begin(self, state: PipelineState, predict: PredictFn) -> PredictFn:
        """Start a generation for the batch in `state` (its requests' threshold, else the engine's) and wrap
        the per-step model call so that each call names its branch and step."""
        self.start(self.config.for_request(state.request.cache_threshold))

        def predict_cached(x: torch.Tensor, i: int, t: torch.Tensor, cond: Cond) -> torch.Tensor:
            self.branch = "uncond" if (state.uncond is not None and cond is state.uncond) else "cond"
            self.step = i
            return predict(x, i, t, cond)

        return predict_cached

    def hit_fraction(self) -> float | None:
        """Model calls of this generation that reused the cache, as a fraction (None: cache off)."""
        if self.active is None or not self.active.enabled or not self.calls:
            return None
        return self.hits / self.calls

    def _reusable(self, state: BranchState, cfg: StepCacheConfig, residual: torch.Tensor) -> bool:
        return (self.step >= cfg.warmup_steps and state.first_residual is not None
                and state.consecutive < cfg.max_skip and state.first_residual.shape == residual.shape)

    def _change(self, residual: torch.Tensor, last: torch.Tensor, x: torch.Tensor) -> float:
        """Relative L1 change over every rank of the group (rows that are zero in the input, i.e. shard
        padding, left out)."""
        real = x.ne(0).any(dim=-1, keepdim=True)
        sums = l1_sums(residual, last, real)
        if self.group.size > 1:
            dist.all_reduce(sums, group=self.group.group)
        return relative_change(sums)

    def run(self, model: torch.nn.Module, tokens: Tokens) -> Tokens:
        """The blocks of `model` on `tokens`, the remaining ones skipped when the cache allows."""
        cfg = self.active
        k = cfg.first_blocks if cfg is not None else 0
        if cfg is None or not cfg.enabled or k >= self.num_blocks:
            return model.blocks(tokens)  # type: ignore[operator]
        state = self.states.setdefault(self.branch, BranchState())
        x = tokens.segments[self.output]
        first = model.run_blocks(tokens, 0, k)  # type: ignore[operator]
        y = first.segments[self.output]
        residual = y - x
        self.calls += 1
        if self._reusable(state, cfg, residual):
            assert state.first_residual is not None and state.rest_residual is not None
            change = self._change(residual, state.first_residual, x)
            self.changes.append(change)
            if change < cfg.threshold:
                state.consecutive += 1
                self.hits += 1
                self.decisions.append((self.branch, self.step, True))
                return first.with_segments(**{self.output: y + state.rest_residual})
        rest = model.run_blocks(first, k, None)  # type: ignore[operator]
        state.first_residual, state.rest_residual = residual, rest.segments[self.output] - y
        state.consecutive = 0
        self.decisions.append((self.branch, self.step, False))
        return rest


class StepCachedDiT:
    """Stands in for a DiT: `blocks` goes through the `StepCache`; calling it runs
    finish(head(blocks(embed(...)))) as the model's forward does; every other attribute is the model's."""

    def __init__(self, model: torch.nn.Module, cache: StepCache) -> None:
        self.model, self.cache = model, cache

    def __getattr__(self, name: str):  # only reached for names this object does not have
        model = self.__dict__.get("model")
        if model is None:
            raise AttributeError(name)
        return getattr(model, name)

    def blocks(self, tokens: Tokens) -> Tokens:
        return self.cache.run(self.model, tokens)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        model = self.model
        tokens = model.embed(*args, **kwargs)  # type: ignore[operator]
        return model.finish(model.head(self.blocks(tokens)), tokens)  # type: ignore[operator]


def _denoising_stages(pipeline: ComposedPipeline) -> list[DenoisingStage]:
    return [s for s in pipeline.stages if isinstance(s, DenoisingStage)]


def install_step_cache(pipeline: ComposedPipeline, config: StepCacheConfig) -> StepCache | None:
    """The step-cache transform: when `config.mode` is not "none", the pipeline's transformer becomes a
    `StepCachedDiT` and its denoising stages get the `StepCache` (returned); otherwise nothing changes and
    None is returned. Apply it after the other transforms of the model (fusions, compile) and before the
    parallel layout (`set_cache_group`)."""
    if config.mode == "none":
        return None
    comps = pipeline.components
    model = comps.transformer  # type: ignore[union-attr]
    plan = getattr(type(model), "PLAN", None)
    if plan is None or not hasattr(model, "run_blocks"):
        raise ValueError(f"{type(model).__name__} has no PLAN / run_blocks; the step cache needs the DiT shape of "
                         f"diffserve/parallel/plan.py")
    cache = StepCache(config, plan.output, len(repeated_blocks(model)))
    comps.transformer = StepCachedDiT(model, cache)  # type: ignore[union-attr]
    for stage in _denoising_stages(pipeline):
        stage.step_cache = cache
    return cache


def set_cache_group(pipeline: ComposedPipeline, group: CommGroup) -> None:
    """Make the pipeline's step cache (if any) all-reduce its decision sums over `group` (the ranks that
    share one sequence under sequence parallelism)."""
    for stage in _denoising_stages(pipeline):
        if stage.step_cache is not None:
            stage.step_cache.group = group  # type: ignore[attr-defined]
