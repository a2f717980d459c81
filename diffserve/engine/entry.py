"""The public `Engine`: one model in this process, or the same API over several processes.

This module sits above both engines so that neither imports the other: `LocalEngine`
(`diffserve.engine.engine`) runs a model in this process and knows nothing of multi-process runs;
`ParallelEngine` (`diffserve.engine.parallel_engine`) starts ranks that each build a `LocalEngine`.
`Engine.from_pretrained` picks one of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffserve.accel.cache_config import StepCacheConfig, parse_step_cache
from diffserve.config import EngineConfig, OffloadConfig, PlanSize, default_device, parse_device, parse_dtype
from diffserve.embedded import resolve_model_arg
from diffserve.engine.engine import LocalEngine
from diffserve.engine.parallel_engine import ParallelEngine, needs_parallel_engine
from diffserve.lora.spec import LoraSpec
from diffserve.parallel.mesh import ParallelConfig


class Engine(LocalEngine):
    """Load a model once; generate many times. `Engine.from_pretrained(path)` is the usual entry;
    `Engine(config)` loads in this process (no config: the embedded image model)."""

    @classmethod
    def from_pretrained(cls, model_path: str | None = None, *, dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, attention_backend: str | None = None,
                        compile: bool = False, parallel: ParallelConfig | None = None,
                        fuse: bool | None = None,
                        vae_dtype: str | torch.dtype | None = None,
                        vae_tiling: bool | None = None, text_encoder_cpu_offload: bool = False,
                        vae_cpu_offload: bool = False, dit_cpu_offload: bool | float = False,
                        max_gpu_memory: float | str | None = None,
                        plan_size: PlanSize | str | tuple[int, ...] | None = None,
                        loras: Sequence[LoraSpec | str | tuple[str, float]] = (),
                        lora_mode: str = "merged",
                        step_cache: StepCacheConfig | str | None = None,
                        fp8: str = "off") -> Engine | ParallelEngine:
        """Load a model (no `model_path`: the embedded image model). With `parallel` asking for more than
        one process (or in a torchrun world of several) the engine is a `ParallelEngine` with the same API
        (docs/PARALLEL.md); otherwise an `Engine` in this process on `device` (default: CUDA if present),
        in `dtype` (default: bf16 on CUDA, fp32 elsewhere).

        Memory (README "Running big models on small cards"): `vae_tiling` True/False, None = tiled where the
        untiled decode would not fit; `text_encoder_cpu_offload` / `vae_cpu_offload` keep those in host memory
        and put them on the GPU for their stage; `dit_cpu_offload` streams the DiT's blocks from host memory
        (True: all; a number: that share of them); `max_gpu_memory` (GiB, or "auto": the card's memory) picks
        the cheapest of these that fits the default request, or `plan_size` (the largest batch to fit:
        `PlanSize`, "HEIGHTxWIDTH[xFRAMES]" or a (height, width[, frames]) tuple). See `diffserve.engine.offload`.

        `loras`: LoRA files to load, each a (path, scale) pair, `"PATH[:SCALE]"` or a `LoraSpec`;
        `lora_mode`: "merged" (into the weights, fixed) or "unmerged" (adapters each request may switch with
        `lora=`; more can be loaded with `load_lora`). See `diffserve.lora`.

        `step_cache`: lossy step caching, off by default: "fbcache" (default settings) or a `StepCacheConfig`
        (threshold, warm-up, cap on cached steps in a row); requests may change the threshold
        (`generate(..., cache_threshold=)`). See `diffserve.accel.step_cache`.

        `fp8`: lossy FP8, off by default: "linear" (the transformer blocks' GEMMs), "attention" (FlashAttention
        3's FP8 kernels) or "all"; weights are quantized at load, so it is fixed for the engine's life (CUDA
        with compute capability 8.9+, bf16). See `diffserve.layers.fp8`."""
        model_path = resolve_model_arg(model_path, "image")
        specs = tuple(LoraSpec.coerce(item) for item in loras)
        offload = OffloadConfig(text_encoder=text_encoder_cpu_offload, vae=vae_cpu_offload,
                                dit=float(dit_cpu_offload), max_gpu_memory=max_gpu_memory,
                                plan_size=PlanSize.coerce(plan_size))
        cache = parse_step_cache(step_cache)
        if needs_parallel_engine(parallel):
            return ParallelEngine.from_pretrained(model_path, dtype=dtype, device=device, compile=compile,
                                                  attention_backend=attention_backend, parallel=parallel,
                                                  fuse=fuse, vae_dtype=vae_dtype, loras=specs, lora_mode=lora_mode,
                                                  vae_tiling=vae_tiling, offload=offload,
                                                  step_cache=cache,
                                                  fp8=fp8)
        dev = parse_device(device) if device is not None else default_device()
        dt = parse_dtype(dtype) if dtype is not None else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        return cls(EngineConfig(model_path=model_path, dtype=dt, device=dev, attention_backend=attention_backend,
                                compile=compile, fuse=fuse, loras=specs, lora_mode=lora_mode, step_cache=cache,
                                fp8=fp8,
                                vae_dtype=parse_dtype(vae_dtype) if vae_dtype is not None else None,
                                vae_tiling=vae_tiling, offload=offload))
