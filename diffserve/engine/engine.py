"""The in-process engine: loads one model and runs generation requests through its pipeline.

`LocalEngine` knows nothing of multi-process runs: the rank processes of a `ParallelEngine` each build one
(`diffserve.engine.ranks`), and the public `Engine` (`diffserve.engine.entry`), which picks between the two,
is a `LocalEngine` itself.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from diffserve.config import EngineConfig, GenerationRequest, ModelDefaults, default_device
from diffserve.layers.attention import AttentionOp, default_backend
from diffserve.models.loader import read_model_index, resolve_model_path
from diffserve.pipelines.base import ComposedPipeline, PipelineState, StepCallback
from diffserve.pipelines.registry import build_pipeline


@dataclass
class GenerationResult:
    """The outputs of one request, with the seed used, per-stage timings and peak memory."""

    request: GenerationRequest  # with every default filled in
    images: list = field(default_factory=list)  # PIL images (image models)
    videos: list[np.ndarray] = field(default_factory=list)  # (F, H, W, 3) uint8 per video (video models)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, plus "total"
    peak_memory_bytes: int | None = None  # CUDA peak allocated on GPU; peak RSS of the process on CPU

    @property
    def seed(self) -> int:
        return int(self.request.seed)  # type: ignore[arg-type]

    @property
    def fps(self) -> int | None:
        return self.request.fps


class LocalEngine:
    """One model in this process: load once, generate many times. Users hold it as its subclass
    `diffserve.Engine`; the ranks of a multi-process engine use it directly."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        """With no config, loads diffserve's embedded image model on the default device."""
        if config is None:
            from diffserve.embedded import resolve_model_arg

            dev = default_device()
            config = EngineConfig(model_path=resolve_model_arg(None, "image"), device=dev,
                                  dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
        self.config = config
        root = resolve_model_path(config.model_path)
        self.model_root = root
        self.index = read_model_index(root)
        backend = config.attention_backend or default_backend(config.device)
        self.attention = AttentionOp(backend)
        self.pipeline: ComposedPipeline = build_pipeline(self.index, config, self.attention)
        transformer = self.pipeline.components.transformer  # type: ignore[union-attr]
        if config.fusions_enabled:
            from diffserve.engine.optimize import fuse_kernels

            fuse_kernels(transformer)
        self.compiled_blocks = 0
        if config.compile:
            from diffserve.engine.optimize import compile_blocks

            self.compiled_blocks = compile_blocks(self.pipeline.components.transformer)  # type: ignore[union-attr]

    @property
    def defaults(self) -> ModelDefaults:
        return self.pipeline.defaults

    @property
    def pipeline_class(self) -> str:
        return self.index.pipeline_class

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """Fill defaults and validate without running the model (raises InvalidRequestError)."""
        return self.pipeline.validate([request])[0]

    def generate(self, prompt: str | None = None, *, on_step: StepCallback | None = None,
                 should_stop=None, **params: object) -> GenerationResult:
        """Generate from keyword sampling parameters (see GenerationRequest)."""
        request = GenerationRequest(prompt=prompt if prompt is not None else "", **params)  # type: ignore[arg-type]
        return self.generate_batch([request], on_step=on_step, should_stop=should_stop)[0]

    def generate_batch(self, requests: list[GenerationRequest], *, on_step: StepCallback | None = None,
                       should_stop=None) -> list[GenerationResult]:
        """Denoise compatible requests together as one batch; each keeps its own seed and outputs."""
        from diffserve.media import to_pil_images, to_video_frames

        dev = self.config.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        state = PipelineState(requests=list(requests), device=dev, dtype=self.config.dtype,
                              on_step=on_step, should_stop=should_stop)
        start = time.perf_counter()
        timings = self.pipeline(state)
        timings["total"] = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        assert state.pixels is not None
        results, offset = [], 0
        for req in state.requests:
            px = state.pixels[offset: offset + req.num_outputs]
            offset += req.num_outputs
            res = GenerationResult(request=req, timings=dict(timings), peak_memory_bytes=peak)
            if px.ndim == 5:
                res.videos = to_video_frames(px)
            else:
                res.images = to_pil_images(px)
            results.append(res)
        return results
