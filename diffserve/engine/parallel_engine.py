"""`ParallelEngine`: the `Engine` API over several processes (sequence, CFG and data parallelism).

The caller's side of a multi-process engine: the object the user holds, named after the class it
defines. What runs inside each rank process (process groups, the layout, the request protocol) is in
`diffserve.engine.ranks`; this module only starts or joins those ranks and talks to rank 0.

On one node it spawns its ranks itself (torch.multiprocessing) and talks to rank 0 over a pipe; this
process loads no model. Under torchrun (several nodes, or one) every process calls `from_pretrained`:
rank 0 gets the engine, and on the other ranks the call serves rank 0 and ends the process
(`SystemExit(0)`) when rank 0 closes the engine.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffserve.accel.cache_config import StepCacheConfig
from diffserve.config import (
    EngineConfig,
    GenerationRequest,
    ModelDefaults,
    OffloadConfig,
    default_device,
    parse_dtype,
)
from diffserve.engine.engine import GenerateAPI, GenerationResult
from diffserve.engine.offload import check_offload
from diffserve.engine.ranks import (
    Front,
    RankRuntime,
    WorkerSpec,
    WorldInfo,
    free_port,
    init_distributed,
    rank_device,
    spawned_worker,
    split_requests,
    torchrun_env,
    world_info,
)
from diffserve.layers.attention import check_ring_backend
from diffserve.layers.fp8 import check_fp8
from diffserve.lora.spec import LoraSpec
from diffserve.models.loader import resolve_model_path
from diffserve.parallel.mesh import ParallelConfig, ParallelConfigError
from diffserve.pipelines.base import StepCallback

StopCheck = Callable[[], bool]


def needs_parallel_engine(parallel: ParallelConfig | None) -> bool:
    """Whether `Engine.from_pretrained` should hand over: more than one process asked for, or this
    process is one rank of a torchrun world of several."""
    env = torchrun_env()
    return (parallel is not None and parallel.world_size > 1) or (env is not None and env.world_size > 1)


def model_heads(model_path: str) -> int | None:
    """The transformer's attention head count from its config.json (None when not readable), so layout
    errors are reported before any process starts."""
    import json

    try:
        cfg = json.loads((Path(resolve_model_path(model_path)) / "transformer" / "config.json").read_text())
        return int(cfg["num_attention_heads"])
    except Exception:  # noqa: BLE001 - the workers report the real problem
        return None


@dataclass(frozen=True)
class AttentionInfo:
    backend: str


class _SpawnedWorld:
    """The ranks of one node, started here; rank 0 answers over a pipe."""

    def __init__(self, spec: WorkerSpec) -> None:
        if mp.current_process().daemon:
            raise RuntimeError("a ParallelEngine cannot start its worker processes from a daemonic process "
                               "(multiprocessing forbids it); create it in a non-daemonic process")
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.cancel = ctx.Event()
        init = f"tcp://127.0.0.1:{free_port()}"
        self.procs = mp.start_processes(spawned_worker, args=(spec, init, child, self.cancel),
                                        nprocs=spec.parallel.world_size, join=False, daemon=True,
                                        start_method="spawn")
        child.close()
        self.closed = False
        try:
            self.info: WorldInfo = self._wait("ready")
        except BaseException:
            self.close(graceful=False)
            raise

    def _check_world(self) -> None:
        """Raise if a worker has died or left; rank 0's own report of why (if it sent one) wins."""
        failure: BaseException | None = None
        try:
            self.procs.join(timeout=0)  # raises (and ends the others) when a worker failed
        except Exception as e:  # noqa: BLE001 - re-raised below
            failure = e
        exited = [i for i, p in enumerate(self.procs.processes) if p.exitcode is not None]
        if failure is None and not exited:
            return
        self.closed = True
        if self.conn.poll(5):
            msg = self.conn.recv()
            if msg[0] == "error":
                raise msg[1] from failure
        raise failure or RuntimeError(f"parallel engine worker rank(s) {exited} exited unexpectedly")

    def _wait(self, expect: str, on_step: StepCallback | None = None, should_stop: StopCheck | None = None):
        """Messages from rank 0 until `expect` (or "ok") arrives; worker failures raise here."""
        while True:
            if self.conn.poll(0.05):
                msg = self.conn.recv()
                if msg[0] == "step":
                    if on_step is not None:
                        on_step(msg[1], msg[2])
                    continue
                if msg[0] == "error":
                    raise msg[1]
                return msg[1] if len(msg) > 1 else None
            if should_stop is not None and should_stop():
                self.cancel.set()
            self._check_world()

    def request(self, msg: tuple, on_step: StepCallback | None = None, should_stop: StopCheck | None = None):
        if self.closed:
            raise RuntimeError("the parallel engine is closed")
        self.cancel.clear()
        if should_stop is not None and should_stop():
            self.cancel.set()
        self.conn.send(msg)
        return self._wait("ok", on_step, should_stop)

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        return self.request(("validate", request))

    def run(self, batches: list[list[GenerationRequest]], on_step: StepCallback | None,
            should_stop: StopCheck | None) -> list[list[GenerationResult]]:
        return self.request(("run", batches, should_stop is not None), on_step, should_stop)

    def list_loras(self) -> list[dict[str, object]]:
        return self.request(("loras",))

    def load_lora(self, spec: LoraSpec, replace: bool) -> dict[str, object]:
        return self.request(("load_lora", spec, replace))

    def close(self, graceful: bool = True) -> None:
        if graceful and not self.closed:
            deadline = time.monotonic() + 60
            with contextlib.suppress(Exception):  # a dead or failed world is terminated below
                self.conn.send(("stop",))
                while not self.procs.join(timeout=1) and time.monotonic() < deadline:
                    pass
        self.closed = True
        for p in self.procs.processes:
            if p.is_alive():
                p.terminate()
        for p in self.procs.processes:
            p.join(timeout=10)
        self.conn.close()


class _LocalFront:
    """Rank 0 of a torchrun world, in this process."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.info = world_info(front.runtime)

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        return self.front.validate(request)

    def run(self, batches: list[list[GenerationRequest]], on_step: StepCallback | None,
            should_stop: StopCheck | None) -> list[list[GenerationResult]]:
        with torch.inference_mode():
            return self.front.dispatch(batches, on_step, should_stop)

    def list_loras(self) -> list[dict[str, object]]:
        return self.front.engine.list_loras()

    def load_lora(self, spec: LoraSpec, replace: bool) -> dict[str, object]:
        return self.front.load_lora(spec, replace)

    def close(self, graceful: bool = True) -> None:
        if not self.front.stopped:
            self.front.shutdown()
            dist.destroy_process_group()


class ParallelEngine(GenerateAPI):
    """Same public API as `Engine` (from_pretrained, defaults, validate, generate, generate_batch), plus
    `generate_batches` (several batches spread over the data-parallel replicas) and `close`."""

    def __init__(self, backend: _SpawnedWorld | _LocalFront, config: EngineConfig) -> None:
        self._backend = backend
        info = backend.info
        self.config = config
        self.parallel: ParallelConfig = info.parallel
        self.model_root = Path(info.model_root)
        self.attention = AttentionInfo(info.attention_backend)
        self._info = info
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, backend.close)  # also runs at interpreter exit

    @classmethod
    def from_pretrained(cls, model_path: str, *, dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, attention_backend: str | None = None,
                        compile: bool = False, parallel: ParallelConfig | None = None,
                        timeout_s: float = 1800.0, fuse: bool | None = None,
                        vae_tiling: bool | None = None, offload: OffloadConfig | None = None,
                        vae_dtype: str | torch.dtype | None = None, loras: tuple[LoraSpec, ...] = (),
                        lora_mode: str = "merged", step_cache: StepCacheConfig | None = None,
                        fp8: str = "off") -> ParallelEngine:
        """Start the ranks (or join torchrun's) and load the model on each. Layout errors are raised here
        as ParallelConfigError before any process starts. `vae_tiling` and `offload` apply on every rank: each
        offloads its own copy of the model (and resolves `offload.max_gpu_memory` against its own GPU)."""
        env = torchrun_env()
        parallel = parallel or ParallelConfig(num_gpus=env.world_size if env else None)
        if env is not None and parallel.world_size != env.world_size:
            raise ParallelConfigError(f"--num-gpus {parallel.world_size} does not match the {env.world_size} "
                                      f"processes torchrun started (WORLD_SIZE)", param="num_gpus")
        dev = torch.device(device) if device is not None else default_device()
        if dev.type not in ("cuda", "cpu"):
            raise ParallelConfigError(f"multi-process runs use CUDA (NCCL) or the CPU (gloo), not {dev.type}",
                                      param="device")
        if dtype is not None:
            dt = parse_dtype(dtype)
        else:
            dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
        resolved = parallel.resolve(model_heads(model_path))
        if fp8 != "off":
            check_fp8(fp8, dev, dt, attention_backend, lora_mode)
        if (resolved.ring_degree or 1) > 1:
            check_ring_backend(attention_backend or "", fp8 in ("attention", "all"))
        spec = WorkerSpec(model_path=model_path, dtype=dt, device_type=dev.type,
                          attention_backend=attention_backend, parallel=resolved, compile=compile,
                          timeout_s=timeout_s, fuse=fuse, loras=tuple(loras), lora_mode=lora_mode,
                          vae_tiling=vae_tiling, offload=offload or OffloadConfig(),
                          step_cache=step_cache or StepCacheConfig(),
                          fp8=fp8,
                          vae_dtype=parse_dtype(vae_dtype) if vae_dtype is not None else None)
        config = EngineConfig(model_path=model_path, dtype=dt, device=torch.device(dev.type),
                              attention_backend=attention_backend, compile=compile,
                              fuse=fuse, vae_dtype=spec.vae_dtype, loras=spec.loras, lora_mode=lora_mode,
                              vae_tiling=vae_tiling, offload=spec.offload,
                              step_cache=spec.step_cache,
                              fp8=fp8)
        check_offload(config)  # one line here, before any process starts
        if env is None:
            return cls(_SpawnedWorld(spec), config)
        return cls(_join_torchrun(spec, env), config)

    # -- properties as on Engine ----------------------------------------------------------------------------

    @property
    def defaults(self) -> ModelDefaults:
        return self._info.defaults  # type: ignore[return-value]

    @property
    def pipeline_class(self) -> str:
        return self._info.pipeline_class

    # -- generation -----------------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """Fill defaults and validate without running the model (raises InvalidRequestError)."""
        with self._lock:
            return self._backend.validate(request)

    def generate_batch(self, requests: list[GenerationRequest], *, on_step: StepCallback | None = None,
                       should_stop: StopCheck | None = None) -> list[GenerationResult]:
        """Compatible requests, as on `Engine`; with D replicas they are cut into up to D chunks that run
        at the same time. Results in request order."""
        chunks = split_requests(list(requests), self.parallel.dp_size) if requests else [[]]
        out = self.generate_batches(chunks, on_step=on_step, should_stop=should_stop)
        return [r for chunk in out for r in chunk]

    def generate_batches(self, batches: list[list[GenerationRequest]], *, on_step: StepCallback | None = None,
                         should_stop: StopCheck | None = None) -> list[list[GenerationResult]]:
        """Several independent batches, spread over the replicas (a replica runs its share in order)."""
        with self._lock:
            return self._backend.run([list(b) for b in batches], on_step, should_stop)

    def load_lora(self, path: str, name: str | None = None, replace: bool = False) -> dict[str, object]:
        """Load a LoRA on every rank while running (lora_mode "unmerged"), as `Engine.load_lora`."""
        with self._lock:
            return self._backend.load_lora(LoraSpec(path=path, name=name or ""), replace)

    def list_loras(self) -> list[dict[str, object]]:
        """The loaded LoRAs (the same on every rank), as `Engine.list_loras`."""
        with self._lock:
            return self._backend.list_loras()

    def close(self) -> None:
        """Stop the worker ranks (idempotent)."""
        self._finalizer()

    def __enter__(self) -> ParallelEngine:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _join_torchrun(spec: WorkerSpec, env) -> _LocalFront:
    """This process is one rank of a torchrun world: rank 0 returns the front; the others serve until rank
    0 closes the engine, then exit."""
    device = rank_device(spec.device_type, env.local_rank, env.local_world_size)
    init_distributed(env.rank, env.world_size, "env://", device, spec.timeout_s)
    runtime = RankRuntime.build(spec, device)
    if env.rank == 0:
        return _LocalFront(Front(runtime))
    runtime.serve_forever()
    dist.destroy_process_group()
    raise SystemExit(0)
