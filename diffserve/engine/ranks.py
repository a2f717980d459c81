"""The rank side of a multi-process engine: what runs inside each rank process.

Process groups, worker start-up, the parallel layout of a rank's pipeline and the request protocol
between the ranks. The module is named for where its code runs; the caller's side, `ParallelEngine`,
is in `diffserve.engine.parallel_engine`.

Roles (global ranks, mesh order of `diffserve.parallel.mesh`):

* world rank 0 is the *front*: it takes requests, validates them (seeds are fixed here, once), assigns
  batches to the D replicas (`assign_batches`), sends each other replica's share to that replica's
  leader, runs replica 0's share itself, and collects the results.
* the *leader* of a replica (its first rank) broadcasts its job to the replica's ranks with
  `broadcast_object_list`; every rank of the replica runs the pipeline; the leader returns the results.
* the other ranks follow their leader until a stop job arrives.

Objects travel on gloo "ctrl" groups (also when tensors use NCCL). Device: cuda:LOCAL_RANK with NCCL when
CUDA is used, CPU with gloo otherwise. NVLink multicast (NVLS) is always switched off.

One node: `spawn_world` starts the ranks with torch.multiprocessing. Several nodes: every node runs the
same command under torchrun; `torchrun_env` reads the variables torchrun sets.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist

from diffserve.accel.cache_config import StepCacheConfig
from diffserve.accel.step_cache import set_cache_group
from diffserve.config import EngineConfig, GenerationRequest, OffloadConfig
from diffserve.engine.engine import GenerationResult, LocalEngine
from diffserve.errors import UserError
from diffserve.layers.attention import AttentionOp, check_ring_backend
from diffserve.layers.parallel import CommGroup, USPAttention, sdpa_attention_lse
from diffserve.lora.spec import LoraSpec
from diffserve.parallel.cfg import install_cfg_parallel
from diffserve.parallel.mesh import MeshGroups, ParallelConfig, ParallelConfigError, build_mesh_groups
from diffserve.parallel.sequence import sequence_parallel
from diffserve.pipelines.base import ComposedPipeline, StepCallback

# NVLink multicast stays off in NCCL, PyTorch symmetric memory and NVSHMEM (it can take shared GPUs down).
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}


def disable_multicast() -> None:
    os.environ.update(NO_MULTICAST_ENV)


# ----------------------------------------------------------------------------------------------------------
# Start-up


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
    """The ranks torchrun (or any launcher using its variables) gave this process; None outside one."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env or "MASTER_ADDR" not in env:
        return None
    world = int(env["WORLD_SIZE"])
    return TorchrunEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                       int(env.get("LOCAL_WORLD_SIZE", world)))


@dataclass(frozen=True)
class WorkerSpec:
    """What every rank needs to build its share of the engine (picklable)."""

    model_path: str
    dtype: torch.dtype
    device_type: str  # "cuda" or "cpu"
    attention_backend: str | None
    parallel: ParallelConfig  # resolved
    compile: bool = False
    timeout_s: float = 1800.0
    fuse: bool | None = None
    vae_dtype: torch.dtype | None = None
    loras: tuple[LoraSpec, ...] = ()  # loaded by every rank, the same way
    lora_mode: str = "merged"
    vae_tiling: bool | None = None
    offload: OffloadConfig = field(default_factory=OffloadConfig)  # each rank offloads its own copy
    step_cache: StepCacheConfig = field(default_factory=StepCacheConfig)  # lossy, off by default
    fp8: str = "off"  # lossy FP8 (diffserve.layers.fp8), fixed at load


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_device(device_type: str, local_rank: int, local_world: int) -> torch.device:
    """cuda:local_rank for CUDA runs (error if the node has too few GPUs), else the CPU."""
    if device_type != "cuda":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count < local_world:
        raise ParallelConfigError(f"{local_world} processes on this node need {local_world} CUDA devices, "
                                  f"but {count} are visible", param="num_gpus")
    return torch.device("cuda", local_rank)


def init_distributed(rank: int, world_size: int, init_method: str, device: torch.device,
                     timeout_s: float) -> str:
    """Join the default process group: NCCL on CUDA, gloo on CPU. Returns the backend."""
    disable_multicast()
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timeout, device_id=device)
        return "nccl"
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timeout)
    return "gloo"


def parallelize_pipeline(pipeline: ComposedPipeline, attention: AttentionOp, groups: MeshGroups) -> None:
    """Put the layout of `groups` onto a built pipeline: the sequence-parallel transform in place of its
    transformer (attention wrapper installed in the model's AttentionOp) and the CFG-parallel hook."""
    cfg, comps = groups.config, pipeline.components
    if (cfg.ring_degree or 1) > 1:
        check_ring_backend(attention.backend, attention.fp8)  # Ring merges with the kernel's log-sum-exp
    if cfg.sp_size > 1:
        kernel = partial(sdpa_attention_lse, backend=attention.backend)
        usp = USPAttention(groups.ulysses, groups.ring, kernel)
        comps.transformer = sequence_parallel(comps.transformer, groups.sp, usp)  # type: ignore[attr-defined]
        set_cache_group(pipeline, groups.sp)  # the step cache (if any) decides alike on every shard
    if cfg.cfg_parallel:
        install_cfg_parallel(pipeline, groups.cfg, pipeline.defaults.uses_negative_prompt)


# ----------------------------------------------------------------------------------------------------------
# Scheduling (pure)


def request_cost(batch: list[GenerationRequest]) -> int:
    """Relative work of a validated batch: outputs x pixels x frames x steps."""
    return sum(r.num_outputs * int(r.height or 1) * int(r.width or 1) * int(r.num_frames or 1)
               * int(r.num_inference_steps or 1) for r in batch)


def assign_batches(costs: list[int], replicas: int) -> list[list[int]]:
    """Longest-first greedy: each batch index goes to the least-loaded replica; per replica the indices
    keep their order."""
    load = [0] * replicas
    plan: list[list[int]] = [[] for _ in range(replicas)]
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        d = min(range(replicas), key=lambda k: (load[k], k))
        load[d] += costs[i]
        plan[d].append(i)
    return [sorted(p) for p in plan]


def split_requests(requests: list[GenerationRequest], parts: int) -> list[list[GenerationRequest]]:
    """Cut one batch into at most `parts` consecutive chunks with balanced output counts."""
    total = sum(r.num_outputs for r in requests)
    chunks: list[list[GenerationRequest]] = [[]]
    done = 0
    for r in requests:
        target = total * len(chunks) / parts  # outputs done by the end of the current chunk, ideally
        if chunks[-1] and len(chunks) < parts and abs(done + r.num_outputs - target) > abs(done - target):
            chunks.append([])
        chunks[-1].append(r)
        done += r.num_outputs
    return chunks


# ----------------------------------------------------------------------------------------------------------
# Protocol


@dataclass
class Job:
    kind: str  # "run", "lora" (load `lora` on every rank) or "stop"
    batches: list[list[GenerationRequest]] = field(default_factory=list)
    cancellable: bool = False
    lora: LoraSpec | None = None
    replace: bool = False


@dataclass
class Outcome:
    results: list[list[GenerationResult]] | None = None
    error: BaseException | None = None


def portable_error(e: BaseException, rank: int) -> BaseException:
    """An exception that survives pickling, with the remote traceback attached for non-user errors."""
    if not isinstance(e, UserError):
        e.add_note(f"raised on rank {rank}:\n{''.join(traceback.format_exception(e))}")
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"rank {rank}: {type(e).__name__}: {e}")


def _broadcast(obj: object, group: CommGroup) -> object:
    if group.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=group.ranks[0], group=group.group)
    return box[0]


def _send(obj: object, dst: int, group: CommGroup) -> None:
    dist.send_object_list([obj], dst=dst, group=group.group)


def _recv(src: int, group: CommGroup) -> object:
    box = [None]
    dist.recv_object_list(box, src=src, group=group.group)
    return box[0]


class RankRuntime:
    """One rank's engine (pipeline with the parallel layout applied) and its groups."""

    def __init__(self, engine: LocalEngine, groups: MeshGroups) -> None:
        self.engine, self.groups = engine, groups

    @classmethod
    def build(cls, spec: WorkerSpec, device: torch.device) -> RankRuntime:
        """Load the model on `device`, cut the process groups, apply the layout. Collective."""
        engine = LocalEngine(EngineConfig(model_path=spec.model_path, dtype=spec.dtype, device=device,
                                          attention_backend=spec.attention_backend, compile=spec.compile,
                                          fuse=spec.fuse, vae_dtype=spec.vae_dtype, loras=spec.loras,
                                          vae_tiling=spec.vae_tiling, offload=spec.offload,
                                          lora_mode=spec.lora_mode, step_cache=spec.step_cache,
                                          fp8=spec.fp8))
        heads = engine.pipeline.components.transformer.cfg.num_attention_heads  # type: ignore[attr-defined]
        groups = build_mesh_groups(spec.parallel.resolve(heads))
        parallelize_pipeline(engine.pipeline, engine.attention, groups)
        return cls(engine, groups)

    def any_flag(self, flag: bool) -> bool:
        """True on every rank of the replica when any rank passes True (same call count on all ranks)."""
        g = self.groups.replica_ctrl
        if g.size == 1:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g.group)
        return bool(t.item())

    def execute(self, job: Job, on_step: StepCallback | None, flag: Callable[[], bool] | None) -> Outcome:
        """Run a job's batches on this rank (every rank of the replica does, in step)."""
        if job.kind == "lora":
            return self.load_lora(job)
        should_stop = None
        if job.cancellable:
            local = flag if (flag is not None and self.groups.is_replica_leader) else (lambda: False)
            should_stop = lambda: self.any_flag(local())
        try:
            with torch.inference_mode():
                results = [self.engine.generate_batch(b, on_step=on_step, should_stop=should_stop)
                           for b in job.batches]
            return Outcome(results=results)
        except Exception as e:  # noqa: BLE001 - reported to the front
            return Outcome(error=portable_error(e, self.groups.rank))

    def load_lora(self, job: Job) -> Outcome:
        """Load the job's LoRA into this rank's engine (every rank does, so all hold the same adapters)."""
        assert job.lora is not None
        try:
            self.engine.load_lora(job.lora.path, job.lora.name, job.replace)
        except Exception as e:  # noqa: BLE001 - reported to the front
            return Outcome(error=portable_error(e, self.groups.rank))
        return Outcome(results=[])

    def lead(self, job: Job, on_step: StepCallback | None, flag: Callable[[], bool] | None) -> Outcome | None:
        """Leader: hand the job to the replica, then run it. None for a stop job."""
        _broadcast(job, self.groups.replica_ctrl)
        if job.kind == "stop":
            return None
        return self.execute(job, on_step, flag)

    def serve_forever(self, flag: Callable[[], bool] | None = None) -> None:
        """Every rank but the front: follow jobs until a stop job. `flag` is this rank's cancel source."""
        g = self.groups
        if g.rank == 0:
            raise RuntimeError("world rank 0 is the front; it does not serve")
        while True:
            if g.is_replica_leader:
                job = _recv(0, g.world_ctrl)
                outcome = self.lead(job, None, flag)  # type: ignore[arg-type]
                if outcome is None:
                    return
                _send(outcome, 0, g.world_ctrl)
            else:
                job = _broadcast(None, g.replica_ctrl)
                if job.kind == "stop":  # type: ignore[attr-defined]
                    return
                self.execute(job, None, None)  # type: ignore[arg-type]


class Front:
    """World rank 0: validates, schedules across replicas, runs replica 0's share, collects results."""

    def __init__(self, runtime: RankRuntime) -> None:
        if runtime.groups.rank != 0:
            raise RuntimeError("the front runs on world rank 0")
        self.runtime = runtime
        self.stopped = False

    @property
    def engine(self) -> LocalEngine:
        return self.runtime.engine

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        return self.engine.validate(request)

    def dispatch(self, batches: list[list[GenerationRequest]], on_step: StepCallback | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[list[GenerationResult]]:
        """Run each batch on some replica; results in the order of `batches`."""
        if self.stopped:
            raise RuntimeError("the parallel engine is closed")
        batches = [self.engine.pipeline.validate(b) for b in batches]  # fixes seeds once, before the ranks
        g = self.runtime.groups
        plan = assign_batches([request_cost(b) for b in batches], g.config.dp_size)
        cancellable = should_stop is not None
        for d in range(1, len(plan)):
            if plan[d]:
                job = Job("run", [batches[i] for i in plan[d]], cancellable)
                _send(job, g.replica_leader(d), g.world_ctrl)
        outcomes: dict[int, Outcome] = {}
        if plan[0]:
            outcomes[0] = self.runtime.lead(Job("run", [batches[i] for i in plan[0]], cancellable),
                                            on_step, should_stop)  # type: ignore[assignment]
        for d in range(1, len(plan)):
            if plan[d]:
                outcomes[d] = _recv(g.replica_leader(d), g.world_ctrl)  # type: ignore[assignment]
        results: list[list[GenerationResult]] = [[] for _ in batches]
        for d, outcome in sorted(outcomes.items()):
            if outcome.error is not None:
                raise outcome.error
            for i, res in zip(plan[d], outcome.results or []):
                results[i] = res
        return results

    def load_lora(self, spec: LoraSpec, replace: bool = False) -> dict[str, object]:
        """Load a LoRA on every rank of every replica (engines in lora_mode "unmerged"); its list entry."""
        if self.stopped:
            raise RuntimeError("the parallel engine is closed")
        g = self.runtime.groups
        job = Job("lora", lora=spec, replace=replace)
        for d in range(1, g.config.dp_size):
            _send(job, g.replica_leader(d), g.world_ctrl)
        outcomes = [self.runtime.lead(job, None, None)]
        outcomes += [_recv(g.replica_leader(d), g.world_ctrl) for d in range(1, g.config.dp_size)]
        for outcome in outcomes:
            if outcome.error is not None:  # type: ignore[union-attr]
                raise outcome.error  # type: ignore[union-attr]
        return next(i for i in self.engine.list_loras() if i["name"] == spec.name)

    def shutdown(self) -> None:
        """Stop every other rank (they leave their loops); the caller then destroys the process group."""
        if self.stopped:
            return
        self.stopped = True
        g = self.runtime.groups
        for d in range(1, g.config.dp_size):
            _send(Job("stop"), g.replica_leader(d), g.world_ctrl)
        self.runtime.lead(Job("stop"), None, None)


# ----------------------------------------------------------------------------------------------------------
# One node: spawned workers


@dataclass(frozen=True)
class WorldInfo:
    """What rank 0 reports once every rank is ready."""

    parallel: ParallelConfig
    defaults: object
    pipeline_class: str
    model_root: str
    attention_backend: str
    device: str


def world_info(runtime: RankRuntime) -> WorldInfo:
    e = runtime.engine
    return WorldInfo(runtime.groups.config, e.defaults, e.pipeline_class, str(e.model_root),
                     e.attention.backend, str(e.config.device.type))


def _quiet_loading() -> None:
    """Worker ranks load without progress bars and advisory warnings (one copy per rank is noise)."""
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _threads_per_rank(local_world: int) -> int:
    return max(1, (os.cpu_count() or 1) // local_world)


def spawned_worker(index: int, spec: WorkerSpec, init_method: str, conn, cancel_event) -> None:
    """Entry of a worker started by `ParallelEngine` (torch.multiprocessing, one node). Rank 0 talks to
    the parent over `conn`; the others serve. `cancel_event` is the parent's cancel flag."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the world
    world = spec.parallel.world_size
    torch.set_num_threads(_threads_per_rank(world))
    _quiet_loading()
    try:
        device = rank_device(spec.device_type, index, world)
        init_distributed(index, world, init_method, device, spec.timeout_s)
        runtime = RankRuntime.build(spec, device)
    except Exception as e:
        if index == 0:
            conn.send(("error", portable_error(e, index)))
            return
        if isinstance(e, UserError):
            return  # the same layout error on every rank: rank 0 reports it
        raise
    if index != 0:
        runtime.serve_forever(cancel_event.is_set)
        dist.destroy_process_group()
        return
    front = Front(runtime)
    conn.send(("ready", world_info(runtime)))
    _front_loop(front, conn, cancel_event)
    front.shutdown()
    dist.destroy_process_group()


def _front_loop(front: Front, conn, cancel_event) -> None:
    """Rank 0 of a spawned world: answer the parent's messages until it says stop or goes away."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        kind = msg[0]
        if kind == "stop":
            return
        try:
            if kind == "validate":
                conn.send(("ok", front.validate(msg[1])))
            elif kind == "run":
                _, batches, cancellable = msg
                out = front.dispatch(batches, on_step=lambda done, total: conn.send(("step", done, total)),
                                     should_stop=cancel_event.is_set if cancellable else None)
                conn.send(("ok", out))
            elif kind == "loras":
                conn.send(("ok", front.engine.list_loras()))
            elif kind == "load_lora":
                conn.send(("ok", front.load_lora(msg[1], msg[2])))
            else:
                conn.send(("error", RuntimeError(f"unknown message {kind!r}")))
        except Exception as e:  # noqa: BLE001 - re-raised in the parent
            conn.send(("error", portable_error(e, 0)))


# ----------------------------------------------------------------------------------------------------------
# A bare world (tests, tools)


def _world_entry(index: int, fn: Callable[..., None], world: int, init_method: str, device_type: str,
                 args: tuple) -> None:
    torch.set_num_threads(_threads_per_rank(world))
    init_distributed(index, world, init_method, rank_device(device_type, index, world), 900)
    try:
        fn(index, *args)
    finally:
        dist.destroy_process_group()


def spawn_world(fn: Callable[..., None], nprocs: int, *args: object, device_type: str = "cpu") -> None:
    """Run `fn(rank, *args)` on `nprocs` new processes joined in one default process group (gloo on CPU,
    NCCL on CUDA); returns when all are done and re-raises a worker's exception. `fn` must be importable.

    The processes are forks of multiprocessing's fork server, which imports torch, diffusers and diffserve
    once for the life of this interpreter (3-4 s of CPU a process under plain spawn: most of a small world's
    start-up). The server itself never runs torch code, so its forks are as clean as spawned processes (no
    threads, no CUDA context)."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.get_context("forkserver").set_forkserver_preload(["diffserve.engine.entry", fn.__module__])
    init = f"tcp://127.0.0.1:{free_port()}"
    mp.start_processes(_world_entry, args=(fn, nprocs, init, device_type, args), nprocs=nprocs,
                       start_method="forkserver")
