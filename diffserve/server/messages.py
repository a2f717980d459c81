"""What the front process and the model worker send each other over their pipes (all picklable).

Front -> worker, task pipe: `WorkerConfig` (at spawn), then one `BatchTask` or `LoadLora` at a time, `None`
to stop.
Front -> worker, cancel pipe: an item id (stop that request) or `CANCEL_ALL` (shutdown).
Worker -> front, event pipe: `Ready` or `LoadFailed` once, then per batch any number of `Progress`, one
`ItemDone` per item, and a closing `BatchDone`; per `LoadLora` one `LoraLoaded`; a `Heartbeat` every
`WorkerConfig.heartbeat_s` throughout.

Input images cross as `EncodedImage` (compressed bytes, already cut to the model's working size by the
front), never as decoded pixels; outputs come back as encoded bytes and the front writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffserve.config import GenerationRequest, ModelDefaults, PlanSize
from diffserve.lora.spec import LoraSpec

CANCEL_ALL = "*"


@dataclass(frozen=True)
class EncodedImage:
    """An input image as compressed bytes, with its pixel size (all that request validation reads of it)."""

    data: bytes
    size: tuple[int, int]  # (width, height)

    def decode(self) -> Any:
        """The RGB PIL image."""
        from diffserve.media import decode_image

        return decode_image(self.data, max_pixels=self.size[0] * self.size[1])


@dataclass(frozen=True)
class WorkerConfig:
    """How the worker builds its engine."""

    model_path: str
    dtype: str | None = None
    device: str | None = None
    attention_backend: str | None = None
    compile: bool = False
    fuse: bool | None = None
    vae_dtype: str | None = None
    fp8: str = "off"  # lossy FP8 (--fp8), fixed for the worker's engine
    parallel: object | None = None  # a diffserve.parallel.mesh.ParallelConfig for multi-GPU engines
    step_cache: object | None = None  # a diffserve.accel.cache_config.StepCacheConfig (None: off)
    heartbeat_s: float = 1.0  # how often the worker says it is alive
    fault_injection: bool = False  # test hook, see diffserve.server.worker
    fail_load_marker: str | None = None  # with fault_injection: loading fails while this file exists
    # LoRAs (`diffserve.lora`): `loras` are the start-up set (--lora-path; merged into the weights or the
    # default adapters), `lora_dir_loras` the files of --lora-dir (selectable adapters, unmerged mode); a file
    # of either that does not load fails the load. `replay_loras`: those added while serving (POST /v1/loras),
    # loaded again by a restarted worker (one that no longer loads is left out, with a warning).
    loras: tuple[LoraSpec, ...] = ()
    lora_mode: str = "merged"
    lora_dir_loras: tuple[LoraSpec, ...] = ()
    replay_loras: tuple[LoraSpec, ...] = ()
    metadata: bool = True  # write the generation parameters into the output files (--no-metadata: off)
    # Memory (`Engine.from_pretrained`'s keywords of the same names; --vae-tiling, --*-cpu-offload, --max-gpu-memory)
    vae_tiling: bool | None = None
    text_encoder_cpu_offload: bool = False
    vae_cpu_offload: bool = False
    dit_cpu_offload: bool = False
    max_gpu_memory: float | str | None = None
    plan_size: PlanSize | None = None  # --plan-size


@dataclass(frozen=True)
class OutputSpec:
    """How to encode one request's outputs (the worker sends the encoded bytes back)."""

    fmt: str
    quality: int = 95


@dataclass
class TaskItem:
    """One request of a batch."""

    item_id: str
    request: GenerationRequest  # validated, every default filled
    output: OutputSpec


@dataclass
class BatchTask:
    """Requests with equal batch keys, to be denoised together."""

    batch_id: int
    items: list[TaskItem]


@dataclass
class LoadLora:
    """Load one more LoRA adapter (unmerged mode), between batches."""

    request_id: int
    spec: LoraSpec


@dataclass
class Ready:
    """The engine is loaded; `loras` are its loaded adapters (`Engine.list_loras` entries)."""

    defaults: ModelDefaults
    pipeline_class: str
    device: str
    dtype: str
    pid: int
    loras: list[dict[str, Any]] = field(default_factory=list)
    lora_mode: str = "merged"


@dataclass
class LoraLoaded:
    """The answer to a `LoadLora`: the new adapter's entry and the full list, or why it failed."""

    request_id: int
    info: dict[str, Any] | None = None
    loras: list[dict[str, Any]] = field(default_factory=list)
    error: ItemError | None = None


@dataclass
class LoadFailed:
    """The engine could not be built; `user_error` when the model path or files are at fault."""

    message: str
    user_error: bool


@dataclass
class Progress:
    """A denoising step finished for the listed items."""

    batch_id: int
    item_ids: list[str]
    done: int
    total: int


@dataclass
class ItemError:
    """Why one item failed, in the API's error terms."""

    status: int
    message: str
    type: str = "server_error"
    code: str | None = None
    param: str | None = None


@dataclass
class ItemDone:
    """One item's outcome: encoded outputs (`blobs`), or an error."""

    batch_id: int
    item_id: str
    blobs: list[bytes] = field(default_factory=list)
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: ItemError | None = None


@dataclass
class BatchDone:
    """Every item of the batch has been reported."""

    batch_id: int
    outputs: int  # how many outputs were denoised together (for metrics)


@dataclass
class Heartbeat:
    """The worker process is alive and scheduled (sent by a thread of its own, busy or idle)."""

    pid: int
