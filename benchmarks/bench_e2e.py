"""End-to-end GPU benchmark: diffserve vs diffusers on the same full-size random-weight checkpoint.

Usage (on a GPU machine):
    python benchmarks/bench_e2e.py WORKLOAD --repo DIR [--steps N] [--engines LIST] [--out FILE.json]
        [--benchmarks BENCHMARKS.md] [--text-layers N] [--merge] [--outputs DIR] [--no-sync-count]

WORKLOAD is one of WORKLOADS below. The repo is built with random weights from the real configs
(diffserve.testing.fixtures, scale="full", seed 0, in --dtype on --device) when DIR does not exist yet;
`--text-layers N` builds its big text encoder (LLaMA, Qwen2.5-VL, T5) with N decoder layers instead of the
real count (same widths, vocabulary and output shape, so the transformer gets the same inputs) to fit a disk
or time budget; the report gives the depth of every text encoder of the repo next to the real one.

Every engine loads that one folder through its own loader, runs a warm-up (at the full shape when it
compiles, so compilation is never timed), then one timed generation; per-step time is measured around the
denoising loop only (from the first transformer call to the last step's end), and fixed costs (text
encoding, VAE decode, the rest) are the difference to the end-to-end wall time; end to end at the
workload's step count is extrapolated as fixed + steps x per-step. Every engine gets the same prompt (and
negative prompt), input image, seed, size, frames, guidance, dtype and steps; the report states them
("fairness") and lists each engine's transformer inputs in the first timed step, text lengths included.

Engines: diffserve with options joined by "+" (compile, fuse, nofuse, vaebf16; lossy: fp8 = the blocks' GEMMs
in FP8, fp8attn = FA3's FP8 attention, fbcacheT[wW][mM] = the step cache at threshold T, warm-up W steps, at most
M cached steps in a row) and "[BACKEND]" for the attention kernel, e.g. "diffserve+compile[fa3]",
"diffserve+compile+fp8[fa3]", "diffserve+compile+fbcache0.08[fa3]"; "diffusers", "diffusers+compile"
(`torch.compile(transformer, fullgraph=True)`) and "diffusers+regional" (diffusers'
`compile_repeated_blocks(fullgraph=True)`). An engine that fails gets an error entry and the next one runs;
a SIGTERM (e.g. from `timeout`) stops the engine in progress and the report is finished with the engines
done so far; `--out` is also rewritten after every engine. `--merge` starts from the runs of the report at
`--out` (an engine run again replaces its run; speed-ups recomputed; outputs compared when `--outputs` holds
them), so one workload can be measured over several calls on a warm machine. `--reference ENGINE` adds PSNR and
SSIM (`diffserve.accel.fidelity`) of every engine's output against that engine's (the lossless path, same seed)
to the report and its table; a step-cache engine's row also records its cache-hit fraction. A step cache's
per-step time depends on the schedule, so time such engines at the full step count.

Roofline (benchmarks/roofline.py): the FLOPs of one denoising step are counted on diffserve's transformer
(matmuls with torch's flop counter, attention at the attention seam) by replaying the first timed step's
transformer calls on a weightless (meta-device) copy of the model; a model that hoists work out of its
steps (FLUX's modulations) is counted on an eager engine's own one-step generation instead, when one runs.
The card's matmul and attention ceilings are measured in the same process (attention at the workload's own
shape, best of the FA3 / cuDNN / flash / default SDPA kernels), and each engine's achieved TFLOP/s (the
counted FLOPs over its step time) and the floor (matmul FLOPs / matmul ceiling + attention FLOPs / attention
ceiling) are reported. `--benchmarks FILE` appends one row per engine of this invocation to FILE's harness
table. The `tiny-*` workloads run the same code on tiny random models (CPU tests of the harness; their
times mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import inspect
import json
import math
import re
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from benchmarks import roofline
except ImportError:  # run as a script: python benchmarks/bench_e2e.py
    import roofline  # type: ignore[no-redef]

PROMPT = "a red fox jumping over a frozen river at sunrise, detailed, photorealistic"
# HunyuanVideo: 40 real LLaMA tokens of the 256 the text is padded to (with the fixtures' tokenizer), the text
# length of the diffusers anchor in NOTES (a short prompt)
HUNYUAN_PROMPT = PROMPT + ", slow motion, cinematic lighting"
# Qwen-Image's reference example: true CFG runs only with a negative prompt, and " " is enough
QWEN_NEGATIVE_PROMPT = " "


@dataclass(frozen=True)
class Workload:
    fixture: str
    height: int
    width: int
    steps: int
    guidance: float  # guidance_scale (FLUX, Wan, HunyuanVideo) or true_cfg_scale (Qwen-Image)
    num_frames: int | None = None
    scale: str = "full"  # fixture scale of the random-weight repo
    prompt: str = PROMPT
    negative_prompt: str | None = None  # None: the engines' default
    image_size: tuple[int, int] | None = None  # (width, height) of the input image (editing)
    min_steps: int = 1  # fewest steps a generation may have (Qwen-Image's shift_terminal schedule: 2)
    warmup_steps: int = 2
    warmup_frames: int | None = None  # eager engines warm up on this many frames (compiled: the full clip)
    warmup_decode: bool = True  # False: warm-ups skip the VAE decode (a short clip warms the VAE instead)
    vae_tiling: bool | None = None  # both engines decode tiled (True), untiled (False), as they choose (None)


WORKLOADS = {
    "flux-dev-1024": Workload("flux-dev", 1024, 1024, 28, 3.5),
    "wan-1.3b-480p": Workload("wan-t2v", 480, 832, 50, 5.0, num_frames=81),
    "wan-14b-720p": Workload("wan-t2v-14b", 720, 1280, 50, 5.0, num_frames=81),
    "qwen-image-1328": Workload("qwen-image", 1328, 1328, 50, 4.0, negative_prompt=QWEN_NEGATIVE_PROMPT,
                                min_steps=2),
    "qwen-edit-1024": Workload("qwen-image-edit", 1024, 1024, 50, 4.0, negative_prompt=QWEN_NEGATIVE_PROMPT,
                               image_size=(1024, 1024), min_steps=2),
    "hunyuan-720p": Workload("hunyuan-video", 720, 1280, 50, 6.0, num_frames=129, prompt=HUNYUAN_PROMPT,
                             warmup_steps=1, warmup_frames=5, warmup_decode=False, vae_tiling=True),
    "tiny-flux": Workload("flux-dev", 64, 64, 3, 3.5, scale="tiny"),
    "tiny-wan": Workload("wan-t2v", 32, 32, 3, 5.0, num_frames=5, scale="tiny"),
    "tiny-qwen": Workload("qwen-image", 64, 64, 3, 4.0, scale="tiny", negative_prompt=QWEN_NEGATIVE_PROMPT,
                          min_steps=2),
    "tiny-qwen-edit": Workload("qwen-image-edit", 64, 64, 3, 4.0, scale="tiny",
                               negative_prompt=QWEN_NEGATIVE_PROMPT, image_size=(64, 64), min_steps=2),
    "tiny-hunyuan": Workload("hunyuan-video", 16, 48, 3, 6.0, num_frames=9, scale="tiny",
                             prompt=HUNYUAN_PROMPT, warmup_steps=1, warmup_frames=5, warmup_decode=False,
                             vae_tiling=True),
}


@dataclass
class Run:
    engine: str
    steps: int
    total_s: float
    denoise_s: float
    per_step_s: float
    fixed_s: float
    stages: dict
    peak_gib: float


@dataclass(frozen=True)
class EngineSpec:
    """What an engine name asks for: "diffserve" plus options ("+compile", "+fuse" / "+nofuse" (with /
    without the lossless kernel fusions, which by default follow "+compile"), "+vaebf16", "[BACKEND]" for
    the attention kernel), or "diffusers" ("+compile": the whole transformer with fullgraph=True;
    "+regional": its repeated blocks)."""

    library: str
    compile: bool = False
    regional: bool = False
    fuse: bool | None = None
    vae_bf16: bool = False
    backend: str | None = None
    fp8: str = "off"  # "+fp8": the blocks' GEMMs in FP8; "+fp8attn": FA3's FP8 attention; both: "all"
    cache: tuple[float, int | None, int | None] | None = None  # "+fbcacheT[wW][mM]": (threshold, warm-up, cap)


ENGINE_OPTIONS = {"diffserve": {"compile", "fuse", "nofuse", "vaebf16", "fp8", "fp8attn"},
                  "diffusers": {"compile", "regional"}}
FP8_OPTIONS = {(False, False): "off", (True, False): "linear", (False, True): "attention", (True, True): "all"}
CACHE_OPTION = re.compile(r"fbcache(\d*\.?\d+)(?:w(\d+))?(?:m(\d+))?")  # fbcache0.08, fbcache0.1w2m3


def parse_cache(options: list[str]) -> tuple[list[str], tuple[float, int | None, int | None] | None]:
    """The options other than "fbcache...", and that one's (threshold, warm-up, cap) or None."""
    found = [m for o in options if (m := CACHE_OPTION.fullmatch(o))]
    if len(found) > 1:
        raise SystemExit(f"one fbcache option per engine, got {[m.group(0) for m in found]}")
    rest = [o for o in options if not CACHE_OPTION.fullmatch(o)]
    if not found:
        return rest, None
    t, w, m = found[0].groups()
    return rest, (float(t), int(w) if w else None, int(m) if m else None)


def parse_engine(name: str) -> EngineSpec:
    """"diffserve+compile+vaebf16[fa3]" -> EngineSpec(diffserve, compile, vae_bf16, backend "fa3")."""
    base, bracket, rest = name.partition("[")
    backend = rest[:-1] if bracket and rest.endswith("]") and len(rest) > 1 else None
    library, *options = base.split("+")
    options, cache = parse_cache(options)
    known = ENGINE_OPTIONS.get(library)
    if (known is None or set(options) - known or len(set(options)) != len(options)
            or (bracket and backend is None) or (library == "diffusers" and backend)
            or {"compile", "regional"} <= set(options) or {"fuse", "nofuse"} <= set(options)
            or (cache is not None and library != "diffserve")):
        raise SystemExit(f"unknown engine {name!r}: diffserve[+compile][+fuse|+nofuse][+vaebf16][+fp8][+fp8attn]"
                         "[+fbcacheT[wW][mM]][[BACKEND]], "
                         "diffusers, diffusers+compile or diffusers+regional")
    fuse = False if "nofuse" in options else (True if "fuse" in options else None)
    return EngineSpec(library, compile="compile" in options or "regional" in options,
                      regional="regional" in options, fuse=fuse, vae_bf16="vaebf16" in options,
                      backend=backend, fp8=FP8_OPTIONS["fp8" in options, "fp8attn" in options], cache=cache)


def step_cache_config(spec: EngineSpec):
    """The engine's `StepCacheConfig` (mode "none" without an fbcache option)."""
    from diffserve.accel.cache_config import StepCacheConfig

    if spec.cache is None:
        return StepCacheConfig()
    t, w, m = spec.cache
    extra = {k: v for k, v in (("warmup_steps", w), ("max_skip", m)) if v is not None}
    return StepCacheConfig("fbcache", threshold=t, **extra)


def family(w: Workload) -> str:
    """The model family of the workload's fixture: flux, wan, hunyuan or qwen."""
    from diffserve.testing.fixtures import SPECS

    return SPECS[w.fixture].family


def input_image(w: Workload):
    """The edit workloads' input image: deterministic noise over a colour gradient (PIL), or None."""
    if w.image_size is None:
        return None
    from PIL import Image

    width, height = w.image_size
    ys, xs = np.mgrid[0:height, 0:width]
    ramp_x, ramp_y = 255 * xs / max(width - 1, 1), 255 * ys / max(height - 1, 1)
    base = np.stack([ramp_x, ramp_y, np.full_like(ramp_x, 128.0)], -1)
    noise = np.random.default_rng(0).normal(0, 24, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def profile_one_step(fn, path: Path | None, title: str = "") -> None:
    """Append a per-kernel CUDA time table of fn() (one denoising step) to `path`."""
    if path is None:
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    with path.open("a") as f:
        f.write(f"\n===== {title} =====\n{table}\n")


def count_host_syncs(stage) -> list[int]:
    """Wrap a pipeline stage so each of its runs counts the CUDA host synchronisations inside it (torch's
    sync debug mode); returns the list the counts are appended to (empty off CUDA)."""
    import warnings

    counts: list[int] = []
    if not torch.cuda.is_available():
        return counts
    run = stage.run

    def counted(state):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return run(state)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                counts.append(sum("synchroniz" in str(w.message) for w in caught))
    stage.run = counted
    return counts


# ----------------------------------------------------------------------------------------------------------
# What the transformer is given: shapes for the report, meta copies to replay the calls


# the text inputs and their masks of the transformers' forward(), diffusers' and diffserve's
TEXT_INPUTS = ("encoder_hidden_states", "context", "text")
TEXT_MASKS = ("encoder_attention_mask", "encoder_hidden_states_mask", "context_mask", "text_mask")


def _describe(v: object, mask: bool = False) -> object:
    """A JSON-able summary of one transformer input: a tensor's shape; a mask's (`mask`, or any bool tensor)
    shape and number of real (non-zero) positions."""
    if isinstance(v, torch.Tensor):
        if mask or v.dtype == torch.bool:
            return {"shape": list(v.shape), "real": int((v != 0).sum())}
        return list(v.shape)
    if isinstance(v, (list, tuple)):
        return [_describe(x) for x in v[:8]]
    if isinstance(v, dict):
        return {str(k): _describe(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return type(v).__name__


def _to_meta(v: object) -> object:
    if isinstance(v, torch.Tensor):
        if v.dtype == torch.bool or (not v.is_floating_point() and v.ndim >= 2):
            raise ValueError("a call with a key mask cannot be replayed on the meta device (its real "
                             "positions decide the attention work)")
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    if isinstance(v, (list, tuple)):
        return type(v)(_to_meta(x) for x in v)
    if isinstance(v, dict):
        return {k: _to_meta(x) for k, x in v.items()}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):  # e.g. FLUX's per-step modulations
        return dataclasses.replace(v, **{f.name: _to_meta(getattr(v, f.name)) for f in dataclasses.fields(v)
                                         if f.init})
    return v


class CallRecorder:
    """Counts the calls of `module` while active (a forward pre-hook) and keeps the inputs of the first `keep`
    of them. Only references are taken during the run (no host sync); `summary` and `meta_calls` read them
    afterwards."""

    def __init__(self, module: torch.nn.Module, keep: int = 8) -> None:
        self.module, self.keep = module, keep
        self.signature = inspect.signature(getattr(module, "_orig_mod", module).forward)
        self.calls: list[tuple[tuple, dict]] = []
        self.count = 0
        self._handle = None

    @contextlib.contextmanager
    def active(self) -> Iterator[CallRecorder]:
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            yield self
        finally:
            self._handle.remove()

    def _hook(self, _module, args, kwargs):
        self.count += 1
        if len(self.calls) < self.keep:
            self.calls.append((args, kwargs))

    def per_step(self, steps: int) -> int:
        """Calls per denoising step, for a generation of `steps` steps (at most `keep`)."""
        return min(max(self.count // steps, 1), self.keep)

    def summary(self, n: int) -> list[dict[str, object]]:
        """The first `n` calls' inputs by parameter name."""
        out = []
        for args, kwargs in self.calls[:n]:
            bound = self.signature.bind_partial(*args, **kwargs).arguments
            out.append({k: _describe(v, mask=k in TEXT_MASKS) for k, v in bound.items()})
        return out

    def meta_calls(self, n: int) -> list[tuple[tuple, dict]]:
        """The first `n` calls with every tensor replaced by an empty one on the meta device."""
        return [(_to_meta(a), _to_meta(k)) for a, k in self.calls[:n]]  # type: ignore[misc]


def text_tokens(call: dict[str, object]) -> str | None:
    """"T" text positions a transformer call got, or "R of T" when a mask marks R of them real."""
    length = next((call[k][1] for k in TEXT_INPUTS if isinstance(call.get(k), list)), None)  # type: ignore[index]
    if length is None:
        return None
    mask = next((call[k] for k in TEXT_MASKS if isinstance(call.get(k), dict)), None)
    return f"{mask['real']} of {length}" if isinstance(mask, dict) else str(length)


def meta_twin(transformer: torch.nn.Module, attention) -> torch.nn.Module:
    """diffserve's transformer of the same class and config on the meta device (no weights, unfused),
    with its own attention seam: a DiT is built as Model(cfg, attention)."""
    dtype = next(transformer.parameters()).dtype  # the recorded inputs are in it (a conv checks its bias's)
    with torch.device("meta"):
        return type(transformer)(transformer.cfg, attention).to(dtype)


def replayed_step_flops(transformer: torch.nn.Module, calls: list[tuple[tuple, dict]]) -> roofline.StepFlops:
    """FLOPs of one step's transformer calls (meta copies of their inputs) on a weightless copy of
    `transformer`. Work a model hoists out of its steps (FLUX's modulations) is not in these calls."""
    from diffserve.layers.attention import AttentionOp

    attention = AttentionOp("sdpa")
    model = meta_twin(transformer, attention)

    def step() -> None:
        with torch.no_grad():
            for args, kwargs in calls:
                model(*args, **kwargs)

    return roofline.count_step_flops(model, attention, step)


# ----------------------------------------------------------------------------------------------------------
# Engines


@contextlib.contextmanager
def no_decode(pipeline, video: bool) -> Iterator[None]:
    """diffserve warm-ups without the VAE decode: the decoding stage leaves small blank pixels instead."""
    stage = next(st for st in pipeline.stages if st.name == "decoding")

    def blank(state) -> None:
        b = state.latents.shape[0]
        state.pixels = torch.zeros((b, 3, 1, 8, 8) if video else (b, 3, 8, 8))

    stage.run = blank
    try:
        yield
    finally:
        del stage.run  # back to the class's method


@torch.no_grad()
def warm_vae(vae, w: Workload, device: str) -> None:
    """Decode a 2-latent-frame clip at the workload's resolution (the kernels of the timed decode, when the
    warm-up skipped it), tiled as the timed decode will be."""
    if w.vae_tiling:
        vae.enable_tiling()
    f = int(vae.config.spatial_compression_ratio)
    z = torch.randn(1, vae.config.latent_channels, 2, w.height // f, w.width // f, generator=torch.Generator()
                    .manual_seed(0)).to(device, vae.dtype)
    vae.decode(z, return_dict=False)
    _sync()


def conditioning(w: Workload) -> dict[str, Any]:
    """diffserve's generate() parameters beyond size, steps and guidance: the negative prompt (Qwen-Image's
    true CFG runs only with one) and the input image (editing)."""
    params: dict[str, Any] = {}
    if w.negative_prompt is not None:
        params["negative_prompt"] = w.negative_prompt
    if w.image_size is not None:
        params["image"] = input_image(w)
    return params


def request_params(w: Workload) -> dict[str, Any]:
    """diffserve's generate() parameters of the workload (prompt and steps aside)."""
    params: dict[str, Any] = dict(height=w.height, width=w.width, guidance_scale=w.guidance, seed=0)
    if w.num_frames:
        params["num_frames"] = w.num_frames
    return params | conditioning(w)


@dataclass
class EngineResult:
    run: Run
    output: np.ndarray
    inputs: list[dict[str, object]]  # the first timed step's transformer calls
    flops: roofline.StepFlops | None = None
    flops_source: str | None = None
    flops_complete: bool = False  # False: replayed calls of a model that hoists work out of its steps


def warmup_request(w: Workload, params: dict[str, Any], compiled: bool) -> dict[str, Any]:
    """The warm-up's parameters: the full shape when the engine compiles (compilation is then never timed),
    else `warmup_frames` frames when the workload sets it."""
    return dict(params, num_frames=w.warmup_frames) if w.warmup_frames and not compiled else dict(params)


def one_step_flops(name: str, transformer: torch.nn.Module, attention, recorder: CallRecorder, per_step: int,
               probe, min_steps: int, compiled: bool) -> tuple[roofline.StepFlops | None, str | None, bool]:
    """FLOPs of one denoising step: the first timed step's transformer calls replayed on a weightless copy,
    or, for a model that hoists work out of its steps (FLUX's modulations) on an eager engine, counted on a
    `min_steps` generation (`probe`). -> (flops or None when they cannot be counted, source, complete)."""
    hoists = hasattr(transformer, "step_modulations")
    if hoists and not compiled:
        counted = roofline.count_step_flops(transformer, attention, probe)
        return roofline.per_step(counted, min_steps), f"{name}: a {min_steps}-step generation", True
    try:
        flops = replayed_step_flops(transformer, recorder.meta_calls(per_step))
    except (RuntimeError, ValueError, NotImplementedError) as e:  # no roofline rather than no run
        print(f"FLOPs not counted ({name}): {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        return None, None, False
    source = f"{name}: the first timed step's {per_step} transformer call(s) replayed on the meta device"
    return flops, source, not hoists


def run_diffserve(repo: Path, w: Workload, steps: int, name: str, profile_path: Path | None = None,
                  device: str = "cuda", dtype: str = "bf16", count_flops: bool = False,
                  count_syncs: bool = True, warmup: bool = True) -> EngineResult:
    """One diffserve engine (`name`, see EngineSpec): warm-up, one timed generation of `steps` steps, then
    (on CUDA, with `count_syncs`) one more that counts host syncs in its denoising loop. With `count_flops`,
    also the FLOPs of one denoising step (`one_step_flops`)."""
    from diffserve import Engine
    from diffserve.config import EngineConfig, parse_dtype

    spec = parse_engine(name)
    resident = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0  # left by earlier engines
    engine = Engine(EngineConfig(model_path=str(repo), dtype=parse_dtype(dtype), device=torch.device(device),
                                 attention_backend=spec.backend, compile=spec.compile, fuse=spec.fuse,
                                 vae_dtype=torch.bfloat16 if spec.vae_bf16 else None,
                                 vae_tiling=w.vae_tiling, fp8=spec.fp8, step_cache=step_cache_config(spec)))
    params = request_params(w)
    t0 = time.perf_counter()
    if warmup:
        with contextlib.nullcontext() if w.warmup_decode else no_decode(engine.pipeline, bool(w.num_frames)):
            engine.generate(w.prompt, num_inference_steps=max(w.warmup_steps, w.min_steps),
                            **warmup_request(w, params, spec.compile))  # (and compile)
        if not w.warmup_decode:
            warm_vae(engine.pipeline.components.vae, w, device)
        _sync()
    warm_s = time.perf_counter() - t0
    transformer = engine.pipeline.components.transformer
    recorder = CallRecorder(transformer)
    with recorder.active():
        res = engine.generate(w.prompt, num_inference_steps=steps, **params)
    per_step = recorder.per_step(steps)
    denoise = next(st for st in engine.pipeline.stages if st.name == "denoising")
    syncs = count_host_syncs(denoise) if count_syncs else []  # one more generation, to count its syncs
    if "run" in vars(denoise):
        engine.generate(w.prompt, num_inference_steps=steps, **params)
        del denoise.run  # back to the class's method
    probe = functools.partial(engine.generate, w.prompt, num_inference_steps=w.min_steps, **params)
    profile_one_step(probe, profile_path, name)
    flops, source, complete = (one_step_flops(name, transformer, engine.attention, recorder, per_step, probe,
                                          w.min_steps, spec.compile) if count_flops else (None, None, False))
    t = res.timings
    out = np.asarray(res.images[0]) if res.images else res.videos[0]
    stages: dict[str, object] = {k: round(v, 4) for k, v in t.items()}
    stages["warmup_s"] = round(warm_s, 2)
    stages["attention"] = engine.attention.backend
    stages["resident_before_gib"] = round(resident / 2**30, 2)
    if res.cache_hit_fraction is not None:
        stages["cache_hit_fraction"] = round(res.cache_hit_fraction, 4)
    if syncs:
        stages["host_syncs_in_denoising"] = syncs[0]
    run = Run(name, steps, t["total"], t["denoising"], t["denoising"] / steps,
              t["total"] - t["denoising"], stages, (res.peak_memory_bytes or 0) / 2**30)
    inputs = recorder.summary(per_step)
    del engine, transformer, recorder, denoise, res, probe
    _free_memory()
    return EngineResult(run, out, inputs, flops, source, complete)


def load_diffusers(repo: Path, w: Workload, dtype: torch.dtype, device: str):
    """The diffusers pipeline of the repo, as its model card loads it: Wan's VAE in float32 (diffusers'
    examples), everything else in `dtype`; VAE tiling as the workload asks."""
    import importlib.util

    import diffusers

    extra: dict[str, Any] = {}
    fam = family(w)
    if fam == "wan":
        extra["vae"] = diffusers.AutoencoderKLWan.from_pretrained(repo, subfolder="vae",
                                                                  torch_dtype=torch.float32)
    if (repo / "processor").is_dir() and importlib.util.find_spec("torchvision") is None:
        # transformers' Qwen2VLProcessor loader needs torchvision (for a video processor no pipeline uses);
        # where it is missing, the processor is built from the repo's own tokenizer and image processor
        from diffserve.pipelines.qwen_image import load_processor

        extra["processor"] = load_processor(repo / "processor")
    pipe = diffusers.DiffusionPipeline.from_pretrained(repo, torch_dtype=dtype, **extra).to(device)
    pipe.set_progress_bar_config(disable=True)
    if w.vae_tiling:
        pipe.vae.enable_tiling()
    elif w.vae_tiling is False and hasattr(pipe.vae, "disable_tiling"):
        pipe.vae.disable_tiling()
    return pipe


def diffusers_call_kwargs(w: Workload) -> dict[str, Any]:
    """diffusers' pipeline arguments for the workload (prompt, steps and generator aside): Qwen-Image's
    guidance is `true_cfg_scale` with a negative prompt; FLUX's and HunyuanVideo's `guidance_scale` is
    embedded, Wan's is CFG."""
    kw: dict[str, Any] = dict(height=w.height, width=w.width)
    if family(w) == "qwen":
        kw["true_cfg_scale"] = w.guidance
    else:
        kw["guidance_scale"] = w.guidance
    if w.negative_prompt is not None:
        kw["negative_prompt"] = w.negative_prompt
    if w.num_frames:
        kw["num_frames"] = w.num_frames
    if w.image_size is not None:
        kw["image"] = input_image(w)
    return kw


def run_diffusers(repo: Path, w: Workload, steps: int, name: str = "diffusers",
                  profile_path: Path | None = None, device: str = "cuda", dtype: str = "bf16",
                  warmup: bool = True) -> EngineResult:
    """One diffusers engine (`name`, see EngineSpec): warm-up, then one timed generation of `steps` steps."""
    from diffserve.config import parse_dtype

    spec = parse_engine(name)
    pipe = load_diffusers(repo, w, parse_dtype(dtype), device)
    if spec.regional:
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    elif spec.compile:
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
    marks: dict[str, float] = {}

    def pre_hook(_m, _a):
        if "start" not in marks:
            _sync()
            marks["start"] = time.perf_counter()

    def on_step(p, i, t, kw):
        if i == steps - 1:
            _sync()
            marks["end"] = time.perf_counter()
        return {}

    kw = diffusers_call_kwargs(w)
    warm = warmup_request(w, kw, spec.compile)
    if not w.warmup_decode:
        warm["output_type"] = "latent"
    t_warm = time.perf_counter()
    if warmup:
        pipe(prompt=w.prompt, num_inference_steps=max(w.warmup_steps, w.min_steps),
             generator=torch.Generator("cpu").manual_seed(0), **warm)  # (and compile)
        if not w.warmup_decode:
            warm_vae(pipe.vae, w, device)
        _sync()
    warm_s = time.perf_counter() - t_warm
    handle = pipe.transformer.register_forward_pre_hook(pre_hook)
    recorder = CallRecorder(pipe.transformer)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _sync()
    t0 = time.perf_counter()
    with recorder.active():
        out = pipe(prompt=w.prompt, num_inference_steps=steps, callback_on_step_end=on_step,
                   generator=torch.Generator("cpu").manual_seed(0), output_type="np", **kw)
    _sync()
    total = time.perf_counter() - t0
    handle.remove()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    denoise = marks["end"] - marks["start"]
    one_step = functools.partial(pipe, prompt=w.prompt, num_inference_steps=w.min_steps, output_type="latent",
                                 generator=torch.Generator("cpu").manual_seed(0), **kw)
    profile_one_step(one_step, profile_path, name)
    arr = out.images[0] if hasattr(out, "images") else out.frames[0]
    arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    run = Run(name, steps, total, denoise, denoise / steps, total - denoise, {"warmup_s": round(warm_s, 2)},
              peak)
    inputs = recorder.summary(recorder.per_step(steps))
    del pipe, out, recorder
    _free_memory()
    return EngineResult(run, arr, inputs)


# ----------------------------------------------------------------------------------------------------------
# The repo


def with_text_layers(component, layers: int):
    """A fixture component of a big text encoder (LLaMA, Qwen2.5-VL's language model, T5 / UMT5 encoder)
    with `layers` decoder layers instead of the real count; any other component unchanged."""
    import copy

    cfg = copy.deepcopy(component.config)
    if component.kind == "llama":
        cfg["num_hidden_layers"] = layers
    elif component.kind == "qwen2_5_vl":
        for c in (cfg, cfg["text_config"]):
            c["num_hidden_layers"] = layers
            c["max_window_layers"] = min(c.get("max_window_layers", layers), layers)
        types = cfg["text_config"]["layer_types"]
        cfg["text_config"]["layer_types"] = (types + types[-1:] * layers)[:layers]
    elif component.kind in ("t5", "umt5"):
        cfg["num_layers"] = layers
    else:
        return component
    return dataclasses.replace(component, config=cfg)


def build_benchmark_repo(w: Workload, out: Path, device: str, dtype: torch.dtype,
                         text_layers: int | None) -> None:
    """The workload's random-weight repo (fixtures.build_repo, seed 0), its big text encoder `text_layers`
    deep when given (the same loop as build_repo, with with_text_layers applied to the plan). Built in a
    sibling folder renamed into place at the end: a build cut short never leaves a repo that looks whole."""
    import os
    import shutil

    from diffserve.testing import fixtures

    if text_layers is not None and text_layers < 3:
        raise SystemExit("--text-layers must be at least 3 (HunyuanVideo reads the third hidden state from "
                         "the end)")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if not text_layers:
        fixtures.build_repo(w.fixture, partial, scale=w.scale, device=device, dtype=dtype)  # type: ignore[arg-type]
    else:
        partial.mkdir(parents=True)
        for component in fixtures.component_plan(w.fixture, w.scale):  # type: ignore[arg-type]
            fixtures.save_component(with_text_layers(component, text_layers), partial / component.name,
                                    scale=w.scale, device=device, dtype=dtype)  # type: ignore[arg-type]
            _free_memory()
        index = fixtures._model_index(fixtures.SPECS[w.fixture])
        (partial / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(partial, out)


def _layers(cfg: dict) -> int | None:
    text = cfg.get("text_config") or {}
    return text.get("num_hidden_layers") or cfg.get("num_hidden_layers") or cfg.get("num_layers")


def text_encoder_depths(repo: Path, w: Workload, dtype: torch.dtype) -> dict[str, dict[str, Any]]:
    """Decoder layers of every text encoder in the repo next to the real checkpoint's and, for a full-size
    repo built shallower (--text-layers), the GiB of weights the real encoder has beyond it (resident on the
    GPU in a real run: the peaks reported are lower by that much, for every engine)."""
    from diffserve.testing.fixtures import SPECS, component_plan, construct_model, read_config

    out: dict[str, dict[str, Any]] = {}
    for folder in sorted(repo.glob("text_encoder*")):
        if not (folder / "config.json").is_file():
            continue
        layers = _layers(json.loads((folder / "config.json").read_text()))
        real = _layers(read_config(SPECS[w.fixture].config_repo, folder.name))
        out[folder.name] = {"layers": layers, "real_layers": real}
        if w.scale == "full" and layers and real and layers < real:
            component = next(c for c in component_plan(w.fixture, "full") if c.name == folder.name)
            sizes = [sum(p.numel() for p in construct_model(c, device="meta").parameters())
                     for c in (component, with_text_layers(component, layers))]
            missing = sizes[0] - sizes[1]
            out[folder.name]["gib_not_built"] = round(missing * torch.finfo(dtype).bits / 8 / 2**30, 2)
    return out


# ----------------------------------------------------------------------------------------------------------
# The report


class Interrupted(Exception):
    """SIGTERM arrived: finish the report with the engines done so far."""


_stop: list[str] = []  # set by the SIGTERM handler


def _on_sigterm(signum: int, _frame: object) -> None:
    _stop.append(f"signal {signum}")
    raise Interrupted(_stop[-1])


def _tflops(flop_per_s: float) -> float:
    return float(f"{flop_per_s / 1e12:.4g}")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def make_report(meta: dict[str, Any], w: Workload, runs: list[Run], outs: dict[str, np.ndarray],
                inputs: dict[str, list], compare: bool = True, reference: str | None = None) -> dict[str, Any]:
    """Runs, end to end at the full step count, speed-ups against diffusers eager, the transformer inputs per
    engine and, with `compare`, the output differences (against the plain diffserve path and against
    diffusers)."""
    report = dict(meta, runs=[asdict(r) for r in runs], transformer_inputs_first_step=inputs)
    report["text_tokens_per_call"] = {k: [text_tokens(c) for c in v] for k, v in inputs.items()}
    base = next((r for r in runs if r.engine == "diffusers"), None)
    for r in runs:
        r_e2e = r.fixed_s + r.per_step_s * w.steps
        report.setdefault("e2e_full_s", {})[r.engine] = round(r_e2e, 3)
        if base is not None:
            report.setdefault("speedup_vs_diffusers", {})[r.engine] = {
                "per_step": round(base.per_step_s / r.per_step_s, 3),
                "e2e": round((base.fixed_s + base.per_step_s * w.steps) / r_e2e, 3),
            }
    if not compare:
        return report
    plain_name = next((n for n in ("diffserve+nofuse", "diffserve") if n in outs), None)
    if plain_name:  # lossless check: every variant against the unoptimised diffserve path
        plain = outs[plain_name].astype(float)
        report["lossless_reference"] = plain_name
        report["output_mean_abs_diff_255_vs_diffserve"] = {
            k: float(np.abs(v.astype(float) - plain).mean()) for k, v in outs.items() if k != plain_name}
    if "diffusers" in outs:
        ref = outs["diffusers"].astype(float)
        report["output_mean_abs_diff_255_vs_diffusers"] = {
            k: float(np.abs(v.astype(float) - ref).mean()) for k, v in outs.items() if k != "diffusers"}
    if reference is not None and reference in outs:  # outputs of the same step count as the reference's
        steps = {r.engine: r.steps for r in runs}
        same = {k: v for k, v in outs.items() if steps.get(k) == steps.get(reference)}
        report["fidelity_reference"] = reference
        report["fidelity_vs_reference"] = fidelity_vs(same, reference)
    return report


def fidelity_vs(outs: dict[str, np.ndarray], reference: str) -> dict[str, dict[str, float]]:
    """{engine: {"psnr_db", "ssim"}} of every output against `reference`'s (same shape; PSNR inf: identical)."""
    from diffserve.accel.fidelity import psnr, ssim

    ref, out = outs[reference], {}
    for name, x in outs.items():
        if name != reference and x.shape == ref.shape:
            p = psnr(x, ref)
            out[name] = {"psnr_db": round(p, 2) if math.isfinite(p) else math.inf, "ssim": round(ssim(x, ref), 4)}
    return out


def fairness(w: Workload, steps: int, dtype: str, repo: Path, warmup: bool = True) -> dict[str, Any]:
    """What every engine of the report shares, stated."""
    from diffserve.config import parse_dtype

    warm = (f"{max(w.warmup_steps, w.min_steps)} step(s) at the full shape for compiled engines"
            + (f", {w.warmup_frames} frames for eager ones" if w.warmup_frames else "")
            + ("" if w.warmup_decode else "; warm-ups skip the VAE decode, a 2-latent-frame decode at the "
               "full resolution warms the VAE")) if warmup else "none (--no-warmup)"
    return {
        "weights": f"one random-weight repo at {repo} (diffserve.testing.fixtures, scale={w.scale!r}, "
                   f"seed 0, {dtype}), loaded from disk by every engine through its own loader",
        "text_encoders": text_encoder_depths(repo, w, parse_dtype(dtype)),
        "prompt": w.prompt, "negative_prompt": w.negative_prompt, "guidance": w.guidance,
        "input_image_wh": list(w.image_size) if w.image_size else None, "seed": 0,
        "height": w.height, "width": w.width, "num_frames": w.num_frames, "dtype": dtype,
        "vae_tiling": w.vae_tiling, "steps_timed": steps, "full_steps": w.steps,
        "warmup": warm,
        "same_text": "text tokens per transformer call: text_tokens_per_call (from "
                     "transformer_inputs_first_step)",
    }


def table(report: dict[str, Any]) -> str:
    """A short text table of a report: one line per engine (the scripts print it last)."""
    head = (f"{report['workload']} on {report['card']} ({report['dtype']}, {report['steps_timed']} steps "
            f"timed, end to end at {report['full_steps']} steps)")
    columns = (f"{'engine':30s} {'s/step':>8s} {'fixed s':>8s} {'e2e s':>8s} {'vs diffusers step/e2e':>22s} "
               f"{'peak GiB':>8s} {'warm-up s':>9s} {'floor':>6s}  text tokens per call")
    lines = [head, columns]
    for r in report["runs"]:
        name = r["engine"]
        speed = report.get("speedup_vs_diffusers", {}).get(name)
        roof = report.get("roofline", {}).get(name)
        vs = f"{speed['per_step']:.2f}x / {speed['e2e']:.2f}x" if speed else "-"
        floor = f"{100 * roof['floor_fraction']:.0f}%" if roof else "-"
        tokens = ",".join(t or "?" for t in report.get("text_tokens_per_call", {}).get(name, []))
        e2e = report["e2e_full_s"][name]
        lines.append(f"{name:30s} {r['per_step_s']:8.4f} {r['fixed_s']:8.2f} {e2e:8.2f} {vs:>22s} "
                     f"{r['peak_gib']:8.1f} {r['stages'].get('warmup_s', 0):9.1f} {floor:>6s}  {tokens}")
    lines += [f"{name:30s} FAILED: {err}" for name, err in report.get("errors", {}).items()]
    lines += [f"note: {n}" for n in report.get("notes", [])]
    for name, f in report.get("fidelity_vs_reference", {}).items():
        run = next((r for r in report["runs"] if r["engine"] == name), None)
        hits = run["stages"].get("cache_hit_fraction") if run else None
        lines.append(f"fidelity vs {report['fidelity_reference']}: {name:30s} PSNR {f['psnr_db']:6.2f} dB  "
                     f"SSIM {f['ssim']:.4f}" + (f"  cache hits {hits:.0%}" if hits is not None else ""))
    if "output_mean_abs_diff_255_vs_diffusers" in report:
        diffs = ", ".join(f"{k} {v:.2f}" for k, v in report["output_mean_abs_diff_255_vs_diffusers"].items())
        lines.append(f"output vs diffusers (mean |diff| /255): {diffs}")
    return "\n".join(lines)


@dataclass
class RunState:
    """What the engines of one invocation have produced so far (earlier calls' runs included with --merge)."""

    runs: list[Run]
    outs: dict[str, np.ndarray]
    inputs: dict[str, list]
    flops: roofline.StepFlops | None = None
    flops_source: str | None = None
    flops_complete: bool = False
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    done: list[str] = dataclasses.field(default_factory=list)  # the engines this invocation ran to the end


def run_engines(args: argparse.Namespace, w: Workload, steps: int, specs: dict[str, EngineSpec],
                meta: dict[str, Any], state: RunState) -> None:
    """Run the engines in order into `state`. An engine that raises gets an error entry and the next one runs;
    SIGTERM (see `_on_sigterm`, installed by `main`) stops the engine in progress and skips the rest. FLOPs
    are counted on the first diffserve engine (replayed calls when it compiles) and again on a later eager
    one."""
    for name, spec in specs.items():
        if _stop:
            state.notes.append(f"not run: {name} (stopped by {_stop[0]})")
            continue
        try:
            dev = dict(device=args.device, dtype=args.dtype)
            if spec.library == "diffserve":
                count = not args.no_roofline and not state.flops_complete and spec.cache is None
                res = run_diffserve(args.repo, w, steps, name, profile_path=args.profile, count_flops=count,
                                    count_syncs=not args.no_sync_count, warmup=not args.no_warmup, **dev)
                if res.flops is not None and (state.flops is None or res.flops_complete):
                    state.flops, state.flops_source = res.flops, res.flops_source
                    state.flops_complete = res.flops_complete
            else:
                res = run_diffusers(args.repo, w, steps, name, profile_path=args.profile,
                                    warmup=not args.no_warmup, **dev)
        except Interrupted as e:
            state.notes.append(f"stopped by {e} during {name}; the engines before it are reported")
            print(state.notes[-1], flush=True)
            continue
        except Exception as e:  # noqa: BLE001 - one failing engine (OOM, a missing kernel) must not cost the others
            state.errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"engine {name} failed: {state.errors[name]}", flush=True)
            continue
        finally:
            _free_memory()
        state.runs = [r for r in state.runs if r.engine != name] + [res.run]
        state.done.append(name)
        state.outs[name], state.inputs[name] = res.output, res.inputs
        if args.outputs:
            args.outputs.mkdir(parents=True, exist_ok=True)
            np.save(args.outputs / f"{_safe(name)}.npy", res.output)
        print(json.dumps(asdict(res.run)), flush=True)
        del res
        if args.out:  # a partial report after every engine
            partial = make_report(meta, w, state.runs, state.outs, state.inputs, compare=False)
            args.out.write_text(json.dumps(dict(partial, errors=state.errors, notes=state.notes), indent=1))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: the workload's)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--engines", default="diffserve,diffusers",
                    help="comma list of: diffserve (options joined by +: compile, fuse, nofuse, vaebf16; "
                         "[BACKEND] for the attention kernel), diffusers, diffusers+compile, "
                         "diffusers+regional")
    ap.add_argument("--profile", type=Path, default=None, help="append one-step kernel tables to this file")
    ap.add_argument("--benchmarks", type=Path, default=None,
                    help="append one row per engine to this file's harness table (BENCHMARKS.md)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--no-roofline", action="store_true", help="skip the FLOP count and the ceilings")
    ap.add_argument("--no-sync-count", action="store_true",
                    help="skip the extra generation that counts host syncs in diffserve's denoising loop")
    ap.add_argument("--no-warmup", action="store_true",
                    help="no warm-up generation (quick CPU checks; times then include first-call costs)")
    ap.add_argument("--text-layers", type=int, default=None,
                    help="when building the repo: its big text encoder with this many layers (default: real)")
    ap.add_argument("--build-only", action="store_true", help="build the repo (when missing) and stop")
    ap.add_argument("--merge", action="store_true",
                    help="start from the runs of the report at --out (an engine run again replaces its run)")
    ap.add_argument("--outputs", type=Path, default=None,
                    help="keep every engine's output here (.npy), to compare outputs across --merge calls")
    ap.add_argument("--reference", default=None, metavar="ENGINE",
                    help="report PSNR/SSIM of every engine's output against this engine's (e.g. the lossless "
                         "diffserve+compile[fa3]); with --merge, earlier calls' outputs count when --outputs kept them")
    args = ap.parse_args(argv)
    command = "python benchmarks/bench_e2e.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    w = WORKLOADS[args.workload]
    steps = args.steps or w.steps
    if steps < w.min_steps:
        ap.error(f"{args.workload} needs at least {w.min_steps} steps")
    names = args.engines.split(",")
    specs = {n: parse_engine(n) for n in names}  # a misspelt engine stops the run before anything loads
    from diffserve.config import parse_dtype

    dt = parse_dtype(args.dtype)
    if not args.repo.exists():
        t0 = time.perf_counter()
        build_benchmark_repo(w, args.repo, args.device, dt, args.text_layers)
        print(f"built {w.fixture} {w.scale}-size repo in {time.perf_counter() - t0:.1f}s", flush=True)
        _free_memory()
    if args.build_only:
        return {"repo": str(args.repo), "text_encoders": text_encoder_depths(args.repo, w, dt)}
    cuda = torch.device(args.device).type == "cuda"
    card = torch.cuda.get_device_name() if cuda else f"CPU ({args.device})"
    meta = {"workload": args.workload, "card": card, "torch": torch.__version__, "dtype": args.dtype,
            "steps_timed": steps, "full_steps": w.steps, "command": command,
            "fairness": fairness(w, steps, args.dtype, args.repo, not args.no_warmup)}
    old = json.loads(args.out.read_text()) if args.merge and args.out and args.out.exists() else {}
    runs = [Run(**r) for r in old.get("runs", [])]  # replaced one by one as this invocation's engines finish
    inputs = dict(old.get("transformer_inputs_first_step", {}))
    outs: dict[str, np.ndarray] = {}
    for r in runs:  # earlier calls' outputs, when kept
        path = args.outputs / f"{_safe(r.engine)}.npy" if args.outputs else None
        if path is not None and path.exists():
            outs[r.engine] = np.load(path)
    state = RunState(runs, outs, inputs)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _stop.clear()
    try:
        try:
            run_engines(args, w, steps, specs, meta, state)
        except Interrupted as e:  # between two engines
            state.notes.append(f"stopped by {e}")
        # from here on a SIGTERM is only noted: the report is finished (`timeout -k` kills for good)
        signal.signal(signal.SIGTERM, lambda signum, _f: _stop.append(f"signal {signum}"))
        return finish(args, w, meta, state, old, command, dt)
    finally:
        signal.signal(signal.SIGTERM, previous)


def finish(args: argparse.Namespace, w: Workload, meta: dict[str, Any], state: RunState, old: dict[str, Any],
           command: str, dt: torch.dtype) -> dict[str, Any]:
    """The final report: runs, output comparisons, roofline (ceilings measured now; the FLOPs of an earlier
    report when this invocation counted none); written to --out, rows appended to --benchmarks for the
    engines this invocation ran."""
    flops, flops_source = state.flops, state.flops_source
    runs = state.runs
    report = make_report(meta, w, runs, state.outs, state.inputs, reference=args.reference)
    if state.errors:
        report["errors"] = state.errors
    if state.notes:
        report["notes"] = state.notes
    if flops is None and old.get("step_flops") and not args.no_roofline:
        flops_source = old.get("flops_source")
        shapes = {tuple(json.loads(k.replace("(", "[").replace(")", "]"))): n
                  for k, n in old["step_flops"]["attention_shapes_BLqLkHD"].items()}
        flops = roofline.StepFlops(old["step_flops"]["matmul"], old["step_flops"]["attention"], shapes)
    if flops is not None and runs:
        ceil = roofline.measure_ceilings(torch.device(args.device), dt, flops)
        report["flops_source"] = flops_source
        shapes = {str(k): n for k, n in flops.attention_shapes.items()}
        report["step_flops"] = {"matmul": flops.matmul, "attention": flops.attention,
                                "attention_shapes_BLqLkHD": shapes}
        by_backend = {k: _tflops(v) for k, v in ceil.attention_by_backend.items()}
        report["ceilings_tflops"] = {"matmul": _tflops(ceil.matmul), "attention": by_backend,
                                     "attention_shape_BLqLkHD": list(ceil.attention_shape)}
        report["roofline"] = {r.engine: roofline.roofline_fields(r.per_step_s, flops, ceil) for r in runs}
    print(json.dumps({k: v for k, v in report.items() if k != "transformer_inputs_first_step"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if args.benchmarks:
        fresh = dict(report, runs=[r for r in report["runs"] if r["engine"] in state.done])
        roofline.append_rows(args.benchmarks, roofline.benchmark_rows(fresh, command))
    return report


if __name__ == "__main__":
    main()
