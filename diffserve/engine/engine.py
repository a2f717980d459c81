"""The in-process engine: loads one model and runs generation requests through its pipeline.

`LocalEngine` knows nothing of multi-process runs: the rank processes of a `ParallelEngine` each build one
(`diffserve.engine.ranks`), and the public `Engine` (`diffserve.engine.entry`), which picks between the two,
is a `LocalEngine` itself.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, overload

import numpy as np
import torch

from diffserve.config import EngineConfig, GenerationRequest, ModelDefaults, default_device, parse_device
from diffserve.errors import InvalidRequestError
from diffserve.layers.attention import AttentionOp, default_backend
from diffserve.lora.registry import LoraRegistry
from diffserve.lora.spec import LoraSet, LoraSpec
from diffserve.models.loader import read_model_index, resolve_model_path
from diffserve.pipelines.base import ComposedPipeline, PipelineState, StepCallback
from diffserve.pipelines.registry import build_pipeline

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from PIL import Image

StopCheck = Callable[[], bool]


@dataclass
class GenerationResult:
    """The outputs of one request, with the seed used, per-stage timings and peak memory."""

    request: GenerationRequest  # with every default filled in
    images: list = field(default_factory=list)  # PIL images (image models)
    videos: list[np.ndarray] = field(default_factory=list)  # (F, H, W, 3) uint8 per video (video models)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, plus "total"
    peak_memory_bytes: int | None = None  # CUDA peak allocated on GPU; peak RSS of the process on CPU
    cache_hit_fraction: float | None = None  # model calls that reused the step cache (None: cache off)
    model: str | None = None  # the model's name (hub id or folder name), recorded by `save`
    lora: str | None = None  # the LoRA set it ran with ("name:scale,..."; None: no LoRA), recorded by `save`

    @property
    def seed(self) -> int:
        return int(self.request.seed)  # type: ignore[arg-type]

    @property
    def fps(self) -> int | None:
        return self.request.fps

    @property
    def metadata(self) -> dict[str, str]:
        """What `save` writes into the files: prompt, negative prompt, seed, steps, guidance, size, model
        (frames and fps for videos), and the LoRA set when there was one."""
        from diffserve.media import generation_metadata

        meta = generation_metadata(self.request, self.model)
        return meta | {"lora": self.lora} if self.lora else meta

    def save(self, path: str | os.PathLike[str], *, format: str | None = None, metadata: bool = True,
             quality: int = 95) -> list[Path]:
        """Write the outputs to `path`, in the format its extension names (images: .png .jpg .webp; videos:
        .mp4 .gif .webp; `format="frames"`: a folder of PNGs per video). Several outputs go to NAME_0.EXT,
        NAME_1.EXT ... beside it; a missing folder is created. With `metadata` the generation parameters
        (`self.metadata`) are written into the files (PNG text chunks, MP4 tags, JPEG/GIF comment). Returns
        the paths written (raises OutputError / InvalidRequestError with a one-line message)."""
        from diffserve.media import resolve_format, write_images, write_videos

        target = Path(path).expanduser()
        meta = self.metadata if metadata else None
        if self.videos:
            fmt = resolve_format(format, target, "video")
            return write_videos(self.videos, fmt=fmt, fps=int(self.fps or 16), output_path=target, metadata=meta)
        fmt = resolve_format(format, target, "image")
        return write_images(self.images, fmt=fmt, output_path=target, quality=quality, metadata=meta)


def _as_image(source: object) -> object:
    """A PIL image as is; a path, URL or data URI loaded (`diffserve.media.load_image`)."""
    if isinstance(source, (str, os.PathLike)):
        from diffserve.media import load_image

        return load_image(os.fspath(source))
    return source


class ProgressBar:
    """A tqdm bar over denoising steps, made at the first step (when the total is known); an `on_step`."""

    def __init__(self, desc: str = "denoising") -> None:
        self.desc, self.bar = desc, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class GenerateAPI:
    """`generate` with typed keyword arguments over an engine's `generate_batch`."""

    def generate_batch(self, requests: list[GenerationRequest], *, on_step: StepCallback | None = None,
                       should_stop: StopCheck | None = None) -> list[GenerationResult]:
        raise NotImplementedError

    @overload
    def generate(self, prompt: str, *, negative_prompt: str | None = ..., height: int | None = ...,
                 width: int | None = ..., num_inference_steps: int | None = ..., guidance_scale: float | None = ...,
                 true_cfg_scale: float | None = ..., seed: int | None = ..., num_outputs: int = ...,
                 num_frames: int | None = ..., fps: int | None = ...,
                 image: object | None = ..., max_sequence_length: int | None = ..., lora: object | None = ...,
                 cache_threshold: float | None = ..., progress: bool = ...,
                 on_step: StepCallback | None = ..., should_stop: StopCheck | None = ...) -> GenerationResult: ...

    @overload
    def generate(self, prompt: Sequence[str], *, negative_prompt: str | None = ..., height: int | None = ...,
                 width: int | None = ..., num_inference_steps: int | None = ..., guidance_scale: float | None = ...,
                 true_cfg_scale: float | None = ..., seed: int | None = ..., num_outputs: int = ...,
                 num_frames: int | None = ..., fps: int | None = ...,
                 image: object | None = ..., max_sequence_length: int | None = ..., lora: object | None = ...,
                 cache_threshold: float | None = ..., progress: bool = ...,
                 on_step: StepCallback | None = ...,
                 should_stop: StopCheck | None = ...) -> list[GenerationResult]: ...

    def generate(self, prompt: str | Sequence[str], *, negative_prompt: str | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, true_cfg_scale: float | None = None,
                 seed: int | None = None, num_outputs: int = 1,
                 num_frames: int | None = None, fps: int | None = None,
                 image: Image.Image | str | os.PathLike[str] | Sequence[Image.Image | str] | None = None,
                 max_sequence_length: int | None = None, lora: object | None = None,
                 cache_threshold: float | None = None, progress: bool = True,
                 on_step: StepCallback | None = None,
                 should_stop: StopCheck | None = None) -> GenerationResult | list[GenerationResult]:
        """Generate images or videos; a field left as None gets the model's default (`engine.defaults`).

        prompt: the text, or a list of texts denoised together as one batch (one result each).
        negative_prompt: what to steer away from (models with classifier-free guidance).
        height, width: output size in pixels (a multiple of `defaults.size_multiple`); image-conditioned
            models whose size follows the input image fill what is left out from its aspect ratio.
        num_inference_steps, guidance_scale: denoising steps (1-1000) and guidance (0-100).
        true_cfg_scale: true CFG against negative_prompt (1-100, 1: off), diffusers' name. HunyuanVideo: a
            scale of its own on top of its embedded guidance_scale (two transformer passes per step when > 1,
            with a negative prompt); Qwen-Image: another name of its guidance_scale; other models refuse it.
        seed: the random seed (None or -1: random; the one used is `result.seed`). With a list of prompts,
            prompt i gets seed + i.
        num_outputs: outputs per prompt (1-16), drawn from the one seed as diffusers' num_images_per_prompt.
        num_frames, fps: video models only (frames 4k+1).
        image: the input image of image-to-video and edit models: a PIL image, a file path, an http(s) URL
            or a data URI (a list for models that take several).
        max_sequence_length: text tokens (at most the model's).
        lora: LoRA adapters by name ("name", "name:0.8", a list of those, or a LoraSet; engines with
            lora_mode="unmerged"); None: the engine's start-up LoRAs, []: none.
        cache_threshold: the step-cache threshold for this request (engines started with `step_cache`; 0: off,
            None: the engine's). Lossy: higher is faster and further from the uncached output;
            `result.cache_hit_fraction` says how many model calls reused the cache.
        progress: show a tqdm bar of the denoising steps on stderr.
        on_step: called as on_step(steps_done, total_steps); should_stop: polled, True cancels.

        Returns a `GenerationResult` (`.images` or `.videos`, `.seed`, `.timings`, `.save(path)`), or a list of
        them for a list of prompts. Bad input raises InvalidRequestError naming the field."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        images = [_as_image(im) for im in image] if isinstance(image, (list, tuple)) else None
        loaded = images if images is not None else (_as_image(image) if image is not None else None)
        base = GenerationRequest(
            prompt="", negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            true_cfg_scale=true_cfg_scale, seed=seed,
            num_outputs=num_outputs, num_frames=num_frames, fps=fps, image=loaded,
            max_sequence_length=max_sequence_length, lora=lora, cache_threshold=cache_threshold)
        step_seed = seed is not None and seed != -1 and len(prompts) > 1
        requests = [base.replace(prompt=p, seed=seed + i if step_seed else seed)  # type: ignore[operator]
                    for i, p in enumerate(prompts)]
        bar = ProgressBar() if progress else None

        def steps(done: int, total: int) -> None:
            if bar is not None:
                bar(done, total)
            if on_step is not None:
                on_step(done, total)

        try:
            results = self.generate_batch(requests, on_step=steps, should_stop=should_stop)
        finally:
            if bar is not None:
                bar.close()
        return results[0] if isinstance(prompt, str) else results


class LocalEngine(GenerateAPI):
    """One model in this process: load once, generate many times. Users hold it as its subclass
    `diffserve.Engine`; the ranks of a multi-process engine use it directly."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        """With no config, loads diffserve's embedded image model on the default device."""
        if config is None:
            from diffserve.embedded import resolve_model_arg

            dev = default_device()
            config = EngineConfig(model_path=resolve_model_arg(None, "image"), device=dev,
                                  dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
        parse_device(config.device)  # a device that is not there: one line, before anything loads
        self.config = config
        root = resolve_model_path(config.model_path)
        self.model_root = root
        # what saved outputs name as their model: the hub id as given, else the folder's name
        self.model_name = root.name if Path(config.model_path).expanduser().exists() else config.model_path
        self.index = read_model_index(root)
        if config.offload.max_gpu_memory is not None:  # --max-gpu-memory: the offloads that fit, before loading
            from diffserve.engine.memory_plan import resolve_offload

            config = self.config = resolve_offload(config, self.index)
        from diffserve.engine.offload import apply_offload, check_offload

        check_offload(config)
        backend = config.attention_backend or default_backend(config.device)
        if config.fp8 != "off":
            from diffserve.layers.fp8 import check_fp8

            check_fp8(config.fp8, config.device, config.dtype, backend, config.lora_mode, config.offload.dit)
        self.attention = AttentionOp(backend, fp8=config.fp8 in ("attention", "all"))
        self.pipeline: ComposedPipeline = build_pipeline(self.index, config, self.attention)
        transformer = self.pipeline.components.transformer  # type: ignore[union-attr]
        # LoRAs (`diffserve.lora`): merged into the weights before the fusions, so fused projections include
        # the updates; unmerged adapters wrap the layers after them (a fused projection carries its parts').
        self.loras = LoraRegistry(transformer, config.lora_mode)
        if config.loras and config.lora_mode == "merged":
            self.loras.load_startup(config.loras)
        if config.fusions_enabled:
            from diffserve.engine.optimize import fuse_kernels

            fuse_kernels(transformer)
        if config.loras and config.lora_mode == "unmerged":
            self.loras.load_startup(config.loras)
        if config.fp8 in ("linear", "all"):  # lossy; after the fusions (a fused q/k/v is one FP8 GEMM)
            from diffserve.layers.fp8 import quantize_fp8

            quantize_fp8(transformer)
        self.compiled_blocks = 0
        if config.compile:
            from diffserve.engine.optimize import compile_blocks

            self.compiled_blocks = compile_blocks(self.pipeline.components.transformer)  # type: ignore[union-attr]
        # CPU offload (`diffserve.engine.offload`): after compile (streamed blocks keep their compiled forward)
        self.offloaded = apply_offload(self.pipeline, config)
        from diffserve.accel.step_cache import install_step_cache

        self.step_cache = install_step_cache(self.pipeline, config.step_cache)  # lossy, opt-in; after compile

    @property
    def defaults(self) -> ModelDefaults:
        return self.pipeline.defaults

    @property
    def pipeline_class(self) -> str:
        return self.index.pipeline_class

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """Fill defaults and validate without running the model (raises InvalidRequestError)."""
        request = self.pipeline.validate([request])[0]
        self.loras.resolve(request.lora)
        self.check_cache_requests([request])
        return request

    def check_cache_requests(self, requests: list[GenerationRequest]) -> None:
        """InvalidRequestError for a request that asks for step caching (cache_threshold > 0) from an engine
        started without a step cache."""
        if self.step_cache is None and any(r.cache_threshold for r in requests):
            raise InvalidRequestError("cache_threshold: this engine was started without a step cache; start it "
                                      "with --step-cache fbcache (step_cache=\"fbcache\") or leave the field out",
                                      param="cache_threshold")

    def batch_lora(self, requests: list[GenerationRequest]) -> LoraSet:
        """The one LoRA set a batch runs with (the engine's start-up set for requests that leave `lora` out);
        InvalidRequestError when its requests ask for different sets."""
        sets = {self.loras.resolve(r.lora) for r in requests}
        if len(sets) > 1:
            raise InvalidRequestError("requests batched together must ask for the same LoRA set; got "
                                      + ", ".join(sorted(map(str, sets))), param="lora")
        return sets.pop() if sets else self.loras.default_set

    def load_lora(self, path: str, name: str | None = None, replace: bool = False) -> dict[str, object]:
        """Load a LoRA file while running (lora_mode "unmerged"); requests select it by `name` (default:
        the file's name) with `lora="name:scale"`. Returns its `list_loras` entry."""
        item = self.loras.load(LoraSpec(path=path, name=name or ""), replace=replace)
        return item.info(self.loras.mode, default=False)

    def list_loras(self) -> list[dict[str, object]]:
        """The loaded LoRAs: name, path, scale, mode, layout, sizes, whether requests get it by default."""
        return self.loras.list()

    def generate_batch(self, requests: list[GenerationRequest], *, on_step: StepCallback | None = None,
                       should_stop=None) -> list[GenerationResult]:
        """Denoise compatible requests together as one batch; each keeps its own seed and outputs."""
        from diffserve.media import to_pil_images, to_video_frames

        dev = self.config.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        lora_set = self.batch_lora(list(requests))
        self.loras.activate(lora_set)
        self.check_cache_requests(requests)
        planned = self.config.offload.plan_size  # set by --max-gpu-memory
        if planned is not None:
            from diffserve.engine.memory_plan import beyond_plan

            if warning := beyond_plan(planned, self.defaults, list(requests)):
                log.warning(warning)
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
            res = GenerationResult(request=req, timings=dict(timings), peak_memory_bytes=peak, model=self.model_name,
                                   cache_hit_fraction=state.cache_hit_fraction,
                                   lora=str(lora_set) if lora_set else None)
            if px.ndim == 5:
                res.videos = to_video_frames(px)
            else:
                res.images = to_pil_images(px)
            results.append(res)
        return results
