"""The two kinds of configuration, never mixed.

`EngineConfig` is fixed when the engine starts (model, dtype, device, kernels). `GenerationRequest`
travels with each request (prompt, size, steps, seed, ...). Requests are validated against the
model's `ModelDefaults` before any model work.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from diffserve.accel.cache_config import StepCacheConfig, check_threshold
from diffserve.errors import InvalidRequestError, UserError
from diffserve.lora.spec import LoraSet, LoraSpec

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}

MAX_PROMPT_CHARS = 20_000
MAX_STEPS = 1000
MAX_OUTPUTS = 16
MAX_GUIDANCE = 100.0


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise InvalidRequestError(f"unknown dtype {name!r}; accepted: bf16, fp16, fp32", param="dtype") from None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def parse_device(name: str | torch.device) -> torch.device:
    """`name` as a torch device this process can use; a one-line UserError for a malformed name or a device
    that is not there (`cuda` on a machine or torch build without CUDA, `cuda:3` with two GPUs)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"device {name!r} is not a device name; e.g. cuda, cuda:1, cpu", param="device") from None
    if dev.type == "cpu" or dev.type == "meta":
        return dev
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else torch.backends.mps
    if backend is None or not backend.is_available():
        why = "this torch build has no CUDA" if dev.type == "cuda" and torch.version.cuda is None else "none is present"
        raise UserError(f"device {str(dev)!r} is not available ({why}); use --device cpu", param="device")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise UserError(f"device {str(dev)!r} is not available: this machine has {count} {dev.type} device(s)",
                        param="device")
    return dev


@dataclass(frozen=True)
class PlanSize:
    """The largest batch `--max-gpu-memory` must fit: `batch` outputs of height x width (x num_frames for
    video; None: the model's default frame count). `parse` reads "HEIGHTxWIDTH[xFRAMES]"."""

    height: int
    width: int
    num_frames: int | None = None
    batch: int = 1

    def __post_init__(self) -> None:
        for name in ("height", "width", "num_frames", "batch"):
            value = getattr(self, name)
            if value is None and name == "num_frames":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"plan size {name}={value!r} is not accepted: give a whole number >= 1",
                                param="plan_size")

    @classmethod
    def parse(cls, text: str) -> PlanSize:
        parts = text.lower().split("x")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3):
            raise UserError(f"--plan-size {text!r} is not accepted: give HEIGHTxWIDTH or HEIGHTxWIDTHxFRAMES "
                            "(e.g. 720x1280x81)", param="plan_size")
        return cls(*numbers)

    @classmethod
    def coerce(cls, value: PlanSize | str | tuple[int, ...] | list[int] | None) -> PlanSize | None:
        """A PlanSize from itself, "HEIGHTxWIDTH[xFRAMES]" or (height, width[, frames]); None stays None."""
        if value is None or isinstance(value, PlanSize):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, (tuple, list)) and len(value) in (2, 3):
            return cls(*value)
        raise UserError(f"plan_size={value!r} is not accepted: give (height, width[, frames]) or "
                        "\"HEIGHTxWIDTH[xFRAMES]\"", param="plan_size")

    def describe(self) -> str:
        size = f"{self.height}x{self.width}" + (f"x{self.num_frames}" if self.num_frames else "")
        return size + (f" x {self.batch} outputs" if self.batch > 1 else "")


@dataclass(frozen=True)
class OffloadConfig:
    """CPU offload (`diffserve.engine.offload`): text encoders and VAE kept in host memory and put on the GPU
    for their stages; a share of the DiT's repeated blocks streamed from host memory block by block. With
    `max_gpu_memory` (GiB, or "auto": the card's memory) the engine picks the offloads that fit at start-up
    (`diffserve.engine.memory_plan`); the flags set here are then the least it offloads."""

    text_encoder: bool = False
    vae: bool = False
    dit: float = 0.0  # share of the DiT's repeated blocks streamed: 0 none, 1.0 all (--dit-cpu-offload)
    max_gpu_memory: float | str | None = None
    plan_size: PlanSize | None = None  # the largest batch max_gpu_memory plans for; None: the default request

    def __post_init__(self) -> None:
        if isinstance(self.dit, bool) or not 0.0 <= float(self.dit) <= 1.0:
            raise UserError(f"dit_cpu_offload={self.dit!r} is not accepted: give a share of the blocks between "
                            f"0 and 1 (True: all)", param="dit_cpu_offload")
        limit = self.max_gpu_memory
        if limit is not None and limit != "auto":
            try:
                ok = float(limit) > 0 and math.isfinite(float(limit))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise UserError(f"--max-gpu-memory {limit!r} is not accepted: give GiB (a number > 0) or auto",
                                param="max_gpu_memory")

    def offloads(self, component: str) -> bool:
        """Whether the component (model_index.json name) is kept in host memory."""
        if component in ("text_encoder", "text_encoder_2", "image_encoder"):
            return self.text_encoder
        if component == "vae":
            return self.vae
        return component == "transformer" and self.dit > 0


@dataclass(frozen=True)
class EngineConfig:
    """Per-process settings, fixed at start-up."""

    model_path: str
    dtype: torch.dtype = torch.bfloat16
    device: torch.device = field(default_factory=default_device)
    attention_backend: str | None = None  # None: the fastest one for the device
    compile: bool = False  # regional torch.compile of the repeated transformer blocks
    # Lossless kernel fusions (models' `fuse_projections` and `fuse_epilogues`: concatenated projections, GELU in
    # the GEMM epilogue); None = on when compiling on CUDA (they pay off once compiled; in eager FLUX was
    # measured slower with them, Wan faster). See DESIGN-NOTES 14.
    fuse: bool | None = None
    vae_dtype: torch.dtype | None = None  # None: the reference's choice (fp32 for Wan, engine dtype for FLUX)
    # Tiled VAE decoding (every family; `diffserve.pipelines.stages.vae_tiling`): True/False, or None = tiled
    # only where the untiled decode is estimated not to fit the device's free memory (never on a CPU).
    vae_tiling: bool | None = None
    # Which weights live in host memory (`diffserve.engine.offload`), and the GPU memory budget that picks them.
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    # LoRAs loaded at start-up (`diffserve.lora`), applied "merged" into the weights or as "unmerged" adapters
    # that each request may switch (`GenerationRequest.lora`).
    loras: tuple[LoraSpec, ...] = ()
    lora_mode: str = "merged"
    # Lossy FP8 (`diffserve.layers.fp8`): "off", "linear" (the blocks' GEMMs), "attention" (FA3's FP8 kernels) or
    # "all"; weights are quantized at load, so it is fixed for the engine's life (CUDA, compute capability 8.9+).
    fp8: str = "off"
    # Lossy step caching (`diffserve.accel.step_cache`), off by default; requests may change its threshold.
    step_cache: StepCacheConfig = field(default_factory=StepCacheConfig)

    @property
    def fusions_enabled(self) -> bool:
        """Whether the kernel fusions apply: `fuse` when set, else when compiling on CUDA."""
        return self.fuse if self.fuse is not None else (self.compile and self.device.type == "cuda")

    def load_device(self, component: str) -> torch.device:
        """Where a component's weights are loaded: the host for the ones offloaded (`offload`), else `device`."""
        return torch.device("cpu") if self.offload.offloads(component) else self.device


@dataclass(frozen=True)
class ModelDefaults:
    """What a model accepts and uses when the request leaves a field out."""

    kind: Literal["image", "video"]
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    size_multiple: int = 16
    min_size: int = 16
    max_size: int = 4096
    max_sequence_length: int = 512
    max_sequence_length_limit: int | None = None  # the most a request may ask for (None: the default)
    num_frames: int | None = None  # video models only
    min_frames: int = 1
    max_frames: int = 257
    fps: int | None = None
    needs_image: bool = False
    accepts_image: bool = False
    uses_negative_prompt: bool = False
    fixed_steps: int | None = None  # few-step distilled models run exactly their distilled schedule
    # Image-conditioned models whose output size follows the input image (Qwen-Image-Edit): a size the request
    # leaves out keeps the input image's aspect ratio at about this many pixels (`size_for_aspect`).
    size_from_image_area: int | None = None
    # How that size is rounded: "nearest32" (each side to the nearest multiple of 32, then down to
    # `size_multiple`: the Qwen edit pipelines) or "floor" (each side rounded to a whole pixel, then down to
    # `size_multiple`: Wan's image-to-video examples).
    size_from_image_rounding: Literal["nearest32", "floor"] = "nearest32"
    max_images: int = 1  # input images a request may give (a list when more than one; Qwen-Image-Edit-2509)
    # What guidance_scale means, shown by GET /v1/models: "cfg" (classifier-free guidance against the negative
    # prompt), "true_cfg" (Qwen-Image's norm-rescaled CFG, run only when a negative prompt is given),
    # "embedded" (a model input, e.g. FLUX.1-dev) or "none"; None: not declared.
    guidance: str | None = None
    # Models that take a `true_cfg_scale` of their own, true CFG against the negative prompt on top of their
    # embedded guidance (HunyuanVideo): its default (1.0: off). None: no such field (Qwen-Image takes
    # true_cfg_scale as another name of its guidance_scale; other models refuse it).
    true_cfg_scale: float | None = None


@dataclass
class GenerationRequest:
    """Per-request sampling parameters. None means: the model's default."""

    prompt: str
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    # True CFG against the negative prompt, a scale of its own beside an embedded guidance_scale (HunyuanVideo:
    # diffusers' true_cfg_scale, 1-100, runs above 1 with a negative prompt); Qwen-Image: its guidance_scale.
    true_cfg_scale: float | None = None
    seed: int | None = None
    num_outputs: int = 1
    num_frames: int | None = None
    fps: int | None = None
    image: object | None = None  # PIL image for image-conditioned models (a list for multi-image models)
    max_sequence_length: int | None = None
    # LoRA adapters by name (a LoraSet, or what `LoraSet.parse` takes: "name", "name:0.8", a list, ...);
    # None: the engine's start-up set, an empty list: none.
    lora: object | None = None
    # Step-cache threshold for this request (0: cache off; engines started with a step cache only);
    # None: the engine's. Lossy: higher is faster and further from the uncached output.
    cache_threshold: float | None = None

    def replace(self, **changes: object) -> GenerationRequest:
        return dataclasses.replace(self, **changes)

    @property
    def images(self) -> list:
        """The input images as a list (empty without one)."""
        if self.image is None:
            return []
        return list(self.image) if isinstance(self.image, (list, tuple)) else [self.image]


def size_for_aspect(area: int, aspect: float, multiple: int) -> tuple[int, int]:
    """(width, height) of about `area` pixels with width/height = `aspect`, each rounded to the nearest
    multiple of 32 (halves to even, as Python's round) and then down to a multiple of `multiple`; the
    reference edit pipelines' output size for an input image."""
    width = math.sqrt(area * aspect)
    height = width / aspect
    width, height = round(width / 32) * 32, round(height / 32) * 32
    return width // multiple * multiple, height // multiple * multiple


def size_for_aspect_floor(area: int, aspect: float, multiple: int) -> tuple[int, int]:
    """(width, height) of about `area` pixels with width/height = `aspect`, each rounded to a whole pixel and
    then down to a multiple of `multiple` (at least one multiple); Wan's image-to-video output size."""
    width = round(math.sqrt(area * aspect)) // multiple * multiple
    height = round(math.sqrt(area / aspect)) // multiple * multiple
    return max(width, multiple), max(height, multiple)


def _size_from_image(req: GenerationRequest, defaults: ModelDefaults) -> GenerationRequest:
    """Fill the size the request leaves out from its (last) input image's aspect ratio (models with
    `size_from_image_area`); other requests unchanged."""
    if defaults.size_from_image_area is None or not req.images or None not in (req.height, req.width):
        return req
    w, h = req.images[-1].size
    rule = size_for_aspect_floor if defaults.size_from_image_rounding == "floor" else size_for_aspect
    width, height = rule(defaults.size_from_image_area, w / h, defaults.size_multiple)
    return req.replace(height=req.height if req.height is not None else height,
                       width=req.width if req.width is not None else width)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", param=name)
    return value


def _scale(name: str, value: object, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= MAX_GUIDANCE:
        off = " (off)" if low == 1.0 else ""
        raise InvalidRequestError(f"{name}={value!r} is not accepted: it must be a number between {low:g}{off} and "
                                  f"{MAX_GUIDANCE:g}", param=name)
    return float(value)


def guidance_scales(req: GenerationRequest, defaults: ModelDefaults) -> tuple[float, float | None]:
    """(guidance_scale, true_cfg_scale) of a request, defaults filled. `true_cfg_scale` is a field of its own
    for models with true CFG on top of embedded guidance (`defaults.true_cfg_scale` set: HunyuanVideo), where
    it and a negative prompt must come together (`_check_true_cfg_pair`); for
    Qwen-Image (guidance "true_cfg") it is another name of guidance_scale (both given: they must agree) and
    comes back as None; any other model refuses it."""
    guidance, true_cfg = req.guidance_scale, req.true_cfg_scale
    if true_cfg is not None:
        true_cfg = _scale("true_cfg_scale", true_cfg, 1.0)
        if defaults.guidance == "true_cfg":
            if guidance is not None and guidance != true_cfg:
                raise InvalidRequestError(
                    f"guidance_scale={guidance!r} and true_cfg_scale={true_cfg!r}: for this model both name its true "
                    f"CFG scale; give one of them", param="true_cfg_scale")
            guidance, true_cfg = true_cfg, None
        elif defaults.true_cfg_scale is None:
            raise InvalidRequestError(
                "true_cfg_scale is not accepted by this model: it is taken by HunyuanVideo (true CFG against the "
                "negative prompt, on top of its embedded guidance) and Qwen-Image (the same as its guidance_scale); "
                "use guidance_scale", param="true_cfg_scale")
    elif defaults.true_cfg_scale is not None:
        true_cfg = defaults.true_cfg_scale
    if defaults.true_cfg_scale is not None:  # its own switch: a negative prompt and a scale > 1 go together
        _check_true_cfg_pair(req.negative_prompt, true_cfg)  # type: ignore[arg-type]
    guidance = _scale("guidance_scale", guidance if guidance is not None else defaults.guidance_scale, 0.0)
    return guidance, true_cfg


def _check_true_cfg_pair(negative_prompt: str | None, true_cfg: float) -> None:
    """Models with true CFG on top of embedded guidance run it, as diffusers, only with a negative prompt and
    true_cfg_scale > 1; one without the other would be silently ignored there, so it is refused here."""
    if negative_prompt is not None and true_cfg <= 1.0:
        raise InvalidRequestError(
            "this model uses a negative prompt only for true CFG: give true_cfg_scale > 1 with it (its "
            "guidance_scale is embedded in the model), or leave negative_prompt out", param="negative_prompt")
    if negative_prompt is None and true_cfg > 1.0:
        raise InvalidRequestError(
            f"true_cfg_scale={true_cfg:g} needs a negative_prompt to guide against (an empty string is accepted); "
            f"or leave true_cfg_scale out", param="true_cfg_scale")


def resolve_request(req: GenerationRequest, defaults: ModelDefaults, seed: int) -> GenerationRequest:
    """Fill defaults and validate; raises InvalidRequestError naming the field and the accepted range."""
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise InvalidRequestError("prompt must be a non-empty string", param="prompt")
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(
            f"prompt is {len(req.prompt)} characters; at most {MAX_PROMPT_CHARS} accepted", param="prompt"
        )
    if req.negative_prompt is not None and not isinstance(req.negative_prompt, str):
        raise InvalidRequestError("negative_prompt must be a string", param="negative_prompt")
    req = _size_from_image(req, defaults)
    height = _check_int("height", req.height if req.height is not None else defaults.height)
    width = _check_int("width", req.width if req.width is not None else defaults.width)
    m = defaults.size_multiple
    for name, v in (("height", height), ("width", width)):
        if v % m or not defaults.min_size <= v <= defaults.max_size:
            raise InvalidRequestError(
                f"{name}={v} is not accepted: it must be a multiple of {m} "
                f"between {defaults.min_size} and {defaults.max_size}",
                param=name,
            )
    steps = _check_int(
        "num_inference_steps",
        req.num_inference_steps if req.num_inference_steps is not None else defaults.num_inference_steps,
    )
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidRequestError(
            f"num_inference_steps={steps} is not accepted: it must be between 1 and {MAX_STEPS}",
            param="num_inference_steps",
        )
    if defaults.fixed_steps is not None and steps != defaults.fixed_steps:
        raise InvalidRequestError(
            f"num_inference_steps={steps} is not accepted: this few-step distilled model runs its "
            f"{defaults.fixed_steps}-step schedule; use {defaults.fixed_steps}", param="num_inference_steps")
    guidance, true_cfg = guidance_scales(req, defaults)
    n = _check_int("num_outputs", req.num_outputs)
    if not 1 <= n <= MAX_OUTPUTS:
        raise InvalidRequestError(f"num_outputs={n} is not accepted: it must be between 1 and {MAX_OUTPUTS}",
                                  param="num_outputs")
    seed_v = _check_int("seed", req.seed if req.seed not in (None, -1) else seed)  # -1: random, as left out
    if not 0 <= seed_v < 2**63:
        raise InvalidRequestError(f"seed={seed_v} is not accepted: it must be between 0 and 2**63-1 "
                                  "(or -1: a random seed)", param="seed")
    msl = _check_int("max_sequence_length", req.max_sequence_length or defaults.max_sequence_length)
    msl_limit = defaults.max_sequence_length_limit or defaults.max_sequence_length
    if not 1 <= msl <= msl_limit:
        raise InvalidRequestError(
            f"max_sequence_length={msl} is not accepted: it must be between 1 and {msl_limit}",
            param="max_sequence_length",
        )
    frames, fps = None, None
    if defaults.kind == "video":
        frames = _check_int("num_frames", req.num_frames if req.num_frames is not None else defaults.num_frames)
        if (frames - 1) % 4 or not defaults.min_frames <= frames <= defaults.max_frames:
            raise InvalidRequestError(
                f"num_frames={frames} is not accepted: it must be 4k+1 between "
                f"{defaults.min_frames} and {defaults.max_frames} (e.g. 17, 33, 81)",
                param="num_frames",
            )
        fps = _check_int("fps", req.fps if req.fps is not None else defaults.fps)
        if not 1 <= fps <= 120:
            raise InvalidRequestError(f"fps={fps} is not accepted: it must be between 1 and 120", param="fps")
    elif req.num_frames not in (None, 1):
        raise InvalidRequestError("num_frames is only accepted by video models; this model makes images",
                                  param="num_frames")
    if req.cache_threshold is not None:
        check_threshold(req.cache_threshold)
    if defaults.needs_image and req.image is None:
        raise InvalidRequestError("this model needs an input image (--image-path / image)", param="image")
    if req.image is not None and not defaults.accepts_image:
        raise InvalidRequestError("this model does not take an input image", param="image")
    if len(req.images) > defaults.max_images or (isinstance(req.image, (list, tuple)) and not req.images):
        most = "one input image" if defaults.max_images == 1 else f"1 to {defaults.max_images} input images"
        raise InvalidRequestError(f"this model takes {most}; got {len(req.images)}", param="image")
    return req.replace(
        height=height, width=width, num_inference_steps=steps, guidance_scale=guidance, true_cfg_scale=true_cfg,
        num_outputs=n, seed=seed_v, num_frames=frames, fps=fps, max_sequence_length=msl,
        lora=LoraSet.parse(req.lora) if req.lora is not None else None,
    )
