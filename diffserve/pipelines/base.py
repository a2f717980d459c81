"""ComposedPipeline: an ordered list of PipelineStages over one small typed state.

A request batch flows through the stages in order; each stage reads and writes the fields of
`PipelineState` it needs and nothing else, and its wall time is recorded. The first stage validates
the requests, so bad input is rejected before any model work.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffserve.config import GenerationRequest, ModelDefaults, resolve_request
from diffserve.errors import CancelledError, CheckpointError, InvalidRequestError
from diffserve.models.loader import read_json
from diffserve.schedulers.sampler import Sampler

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


@dataclass
class PipelineState:
    """What flows between stages for one batch of compatible requests."""

    requests: list[GenerationRequest]
    device: torch.device
    dtype: torch.dtype
    on_step: StepCallback | None = None
    should_stop: Callable[[], bool] | None = None
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # positive-prompt conditioning
    uncond: dict[str, torch.Tensor] | None = None  # negative-prompt conditioning (CFG)
    image_cond: dict[str, torch.Tensor] = field(default_factory=dict)  # input-image conditioning
    latents: torch.Tensor | None = None
    sigmas: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    sampler: Sampler | None = None  # this batch's sampler, made by the timestep stage (may keep history)
    pixels: torch.Tensor | None = None  # decoded output in [0, 1]: (B, 3, H, W) or (B, 3, F, H, W)
    cache_hit_fraction: float | None = None  # model calls that reused the step cache (None: cache off)

    @property
    def request(self) -> GenerationRequest:
        """The sampling parameters shared by every request of the batch."""
        return self.requests[0]

    @property
    def batch_size(self) -> int:
        return sum(r.num_outputs for r in self.requests)

    def prompts(self, negative: bool = False) -> list[str]:
        """One prompt per output sample, in batch order."""
        out: list[str] = []
        for r in self.requests:
            text = (r.negative_prompt or "") if negative else r.prompt
            out.extend([text] * r.num_outputs)
        return out

    def step_done(self, done: int, total: int) -> None:
        if self.on_step is not None:
            self.on_step(done, total)

    def check_cancelled(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise CancelledError("generation cancelled")


# Fields of ModelDefaults a repo may set in its own `diffserve_defaults.json` (models diffserve ships).
REPO_DEFAULT_FIELDS = ("height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length",
                       "num_frames", "fps")


def repo_defaults(root: Path) -> dict:
    """The repo's `diffserve_defaults.json` (empty when absent); unknown keys are a CheckpointError."""
    path = root / "diffserve_defaults.json"
    if not path.is_file():
        return {}
    raw = read_json(path)
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in REPO_DEFAULT_FIELDS)
    if unknown:
        raise CheckpointError(f"{path}: unknown keys {unknown}; accepted: {', '.join(REPO_DEFAULT_FIELDS)}")
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def replace_defaults(defaults: ModelDefaults, overrides: dict) -> ModelDefaults:
    return dataclasses.replace(defaults, **overrides) if overrides else defaults


class PipelineStage:
    """One step of a pipeline. Subclasses set `name` and implement `run`."""

    name: str = "stage"

    def run(self, state: PipelineState) -> None:
        raise NotImplementedError


# Fields that must agree for requests to be denoised together in one batch.
BATCH_KEY_FIELDS = ("height", "width", "num_inference_steps", "guidance_scale", "true_cfg_scale", "num_frames",
                    "max_sequence_length")


def batch_key(req: GenerationRequest) -> tuple:
    # one step-cache threshold per batch (the cache decides for the whole batch)
    return tuple(getattr(req, f) for f in BATCH_KEY_FIELDS) + (req.negative_prompt is not None,
                                                               req.cache_threshold)


class InputValidationStage(PipelineStage):
    """Fill defaults, validate each request, and check that a batch's requests are compatible."""

    name = "input_validation"

    def __init__(self, defaults: ModelDefaults) -> None:
        self.defaults = defaults

    def run(self, state: PipelineState) -> None:
        if not state.requests:
            raise InvalidRequestError("no request given")
        state.requests = [
            resolve_request(r, self.defaults, seed=secrets.randbelow(2**31)) for r in state.requests
        ]
        keys = {batch_key(r) for r in state.requests}
        if len(keys) > 1:
            raise InvalidRequestError("requests batched together must share size, frames, steps and guidance")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ComposedPipeline:
    """Runs its stages in order and records each stage's wall time (seconds)."""

    def __init__(self, name: str, stages: list[PipelineStage], defaults: ModelDefaults,
                 components: object | None = None) -> None:
        if not stages or not isinstance(stages[0], InputValidationStage):
            raise ValueError("a pipeline's first stage must be an InputValidationStage")
        self.name = name
        self.stages = stages
        self.defaults = defaults
        self.components = components

    def validate(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """Run only the validation stage (used to reject requests before any model work or queueing)."""
        state = PipelineState(requests=list(requests), device=torch.device("cpu"), dtype=torch.float32)
        self.stages[0].run(state)
        return state.requests

    def __call__(self, state: PipelineState) -> dict[str, float]:
        timings: dict[str, float] = {}
        for stage in self.stages:
            start = time.perf_counter()
            try:
                state.check_cancelled()  # between stages too: a deleted job stops before its next stage
                stage.run(state)
            except Exception as e:  # keep the type (OOM, user errors); say which stage raised
                e.add_note(f"in pipeline stage {stage.name!r} of {self.name}")
                raise
            _sync(state.device)
            timings[stage.name] = time.perf_counter() - start
        return timings
