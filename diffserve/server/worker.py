"""The model worker: a separate process that builds the `Engine` once and runs the batches the front sends.

A batch runs as one `engine.generate_batch` call, its input images decoded here from the compressed bytes
the front queued. Progress goes back after every denoising step, and a thread of its own sends a
`Heartbeat` every `WorkerConfig.heartbeat_s` (the front kills a worker whose heartbeats stop). A batch
that raises is retried one request at a time, so a request that fails (CUDA out-of-memory included)
fails only itself. Cancellation arrives on its own pipe and is checked at every step boundary: the batch
stops once every request in it is cancelled (a cancelled request inside a batch that goes on is dropped
when the batch ends, never encoded). The worker also stops a batch when the front process dies. Outputs go
back encoded (PNG/JPEG/WebP/MP4 bytes) with the generation parameters written into them
(`GenerationResult.metadata`, plus the LoRA set; off with `WorkerConfig.metadata`); the front writes the files.
LoRA adapters are loaded between batches when the front sends `LoadLora`.

Fault injection (tests only, `WorkerConfig.fault_injection`; `diffserve serve` sets it when the environment
has DIFFSERVE_SERVER_FAULT_INJECTION=1): a prompt starting with ``__fault_oom__`` raises
`torch.OutOfMemoryError` at the first denoising step, ``__fault_error__`` a RuntimeError, from inside the
real denoising loop, and ``__fault_hang__`` blocks forever once the first step is reported (heartbeats go
on: a hang the batch deadline must catch); loading fails while the file `WorkerConfig.fail_load_marker`
exists (checked first thing).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from multiprocessing.connection import Connection

import torch

from diffserve.errors import CancelledError, UserError
from diffserve.server.messages import (
    CANCEL_ALL,
    BatchDone,
    BatchTask,
    EncodedImage,
    Heartbeat,
    ItemDone,
    ItemError,
    LoadFailed,
    LoadLora,
    LoraLoaded,
    Progress,
    Ready,
    TaskItem,
    WorkerConfig,
)

log = logging.getLogger("diffserve.server.worker")

CANCELLED = ItemError(499, "the request was cancelled", type="invalid_request_error", code="cancelled")


class EventPipe:
    """The event pipe to the front, shared by the main thread and the heartbeat thread."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, msg: object) -> None:
        with self._lock:
            self.conn.send(msg)


def _beat(events: EventPipe, interval_s: float) -> None:
    """Send a Heartbeat every `interval_s` until the pipe closes (daemon thread)."""
    pid = os.getpid()
    while True:
        try:
            events.send(Heartbeat(pid))
        except (BrokenPipeError, EOFError, OSError):
            return
        time.sleep(interval_s)


class CancelWatch:
    """The cancellations received so far on the cancel pipe (read without blocking)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.ids: set[str] = set()
        self.everything = False
        self.parent = os.getppid()

    def _drain(self) -> None:
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                if msg == CANCEL_ALL:
                    self.everything = True
                else:
                    self.ids.add(msg)
        except (EOFError, OSError):
            self.everything = True  # the front is gone
        if os.getppid() != self.parent:
            self.everything = True

    def cancelled(self, item_id: str) -> bool:
        self._drain()
        return self.everything or item_id in self.ids

    def all_cancelled(self, item_ids: list[str]) -> bool:
        self._drain()
        return self.everything or all(i in self.ids for i in item_ids)

    def forget(self) -> None:
        """Drop per-item cancellations once their batch is over (ids are never reused)."""
        self._drain()
        self.ids.clear()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def classify(e: BaseException) -> ItemError:
    """An exception raised while generating, as the error the client sees."""
    if isinstance(e, UserError):
        return ItemError(e.http_status, str(e), type=e.error_type, param=e.param)
    if _is_oom(e):
        return ItemError(503, f"the server ran out of memory generating this request ({type(e).__name__}); "
                              "retry later or ask for fewer or smaller outputs", code="out_of_memory")
    return ItemError(500, f"generation failed: {type(e).__name__}: {e}", code="generation_failed")


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _inject_fault(items: list[TaskItem]) -> None:
    for it in items:
        if it.request.prompt.startswith("__fault_oom__"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected fault)")
        if it.request.prompt.startswith("__fault_error__"):
            raise RuntimeError("injected fault")


def _decoded(item: TaskItem) -> object:
    """The item's request with its input images decoded (the queue carries them compressed)."""
    req = item.request
    if isinstance(req.image, EncodedImage):
        return req.replace(image=req.image.decode())
    if isinstance(req.image, (list, tuple)) and any(isinstance(im, EncodedImage) for im in req.image):
        return req.replace(image=[im.decode() if isinstance(im, EncodedImage) else im for im in req.image])
    return req


class BatchRunner:
    """Runs batches on the engine and reports each item's outcome on the event pipe."""

    def __init__(self, engine: object, events: EventPipe, cancels: CancelWatch, fault_injection: bool,
                 metadata: bool = True) -> None:
        self.engine = engine
        self.events = events
        self.cancels = cancels
        self.fault_injection = fault_injection
        self.metadata = metadata

    def run(self, task: BatchTask) -> None:
        try:
            self._run_items(task, task.items, allow_split=True)
            self.events.send(BatchDone(task.batch_id, sum(it.request.num_outputs for it in task.items)))
        finally:
            self.cancels.forget()

    def _fail(self, task: BatchTask, it: TaskItem, error: ItemError) -> None:
        self.events.send(ItemDone(task.batch_id, it.item_id, error=error))

    def _run_items(self, task: BatchTask, items: list[TaskItem], *, allow_split: bool) -> None:
        live = []
        for it in items:
            if self.cancels.cancelled(it.item_id):
                self._fail(task, it, CANCELLED)
            else:
                live.append(it)
        if not live:
            return
        ids = [it.item_id for it in live]

        def on_step(done: int, total: int) -> None:
            if self.fault_injection and done == 1:
                _inject_fault(live)
            self.events.send(Progress(task.batch_id, ids, done, total))
            if self.fault_injection and done == 1 and any(it.request.prompt.startswith("__fault_hang__")
                                                          for it in live):
                threading.Event().wait()  # forever, after the first step was reported: only a kill ends it

        try:
            requests = [_decoded(it) for it in live]
            with torch.inference_mode():
                results = self.engine.generate_batch(  # type: ignore[attr-defined]
                    requests, on_step=on_step, should_stop=lambda: self.cancels.all_cancelled(ids))
        except CancelledError:
            for it in live:
                self._fail(task, it, CANCELLED)
            return
        except Exception as e:  # noqa: BLE001 - any failure is reported per request, the worker lives on
            _free_memory()
            if allow_split and len(live) > 1:
                for it in live:
                    self._run_items(task, [it], allow_split=False)
                return
            for it in live:
                self._fail(task, it, classify(e))
            return
        for it, res in zip(live, results, strict=True):
            self._deliver(task, it, res)

    def _deliver(self, task: BatchTask, it: TaskItem, res: object) -> None:
        """Encode one item's outputs and report them."""
        from diffserve.media import encode_image, encode_video

        if self.cancels.cancelled(it.item_id):
            self._fail(task, it, CANCELLED)
            return
        spec = it.output
        done = ItemDone(task.batch_id, it.item_id, seed=res.seed, timings=dict(res.timings))  # type: ignore
        try:
            videos, images = res.videos, res.images  # type: ignore[attr-defined]
            fps = int(res.fps or 16)  # type: ignore[attr-defined]
            meta = output_metadata(res) if self.metadata else None
            if videos:
                done.blobs = [encode_video(v, spec.fmt, fps, metadata=meta) for v in videos]
            else:
                done.blobs = [encode_image(im, spec.fmt, spec.quality, metadata=meta) for im in images]
        except Exception as e:  # noqa: BLE001
            self._fail(task, it, classify(e))
            return
        self.events.send(done)


def output_metadata(res: object) -> dict[str, str]:
    """What the server writes into an output file: the result's generation metadata, as `diffserve generate`
    writes it (the LoRA set it ran with included, "name:scale,...")."""
    return dict(res.metadata)  # type: ignore[attr-defined]


def load_lora(engine: object, msg: LoadLora) -> LoraLoaded:
    """Load the adapter `msg` asks for; the answer for the front (the error when it failed)."""
    try:
        info = engine.load_lora(msg.spec.path, name=msg.spec.name)  # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001 - a bad file fails this load only
        return LoraLoaded(msg.request_id, error=classify(e))
    return LoraLoaded(msg.request_id, info=info, loras=engine.list_loras())  # type: ignore[attr-defined]


def _load_extra_loras(engine: object, cfg: WorkerConfig) -> None:
    """Load the --lora-dir files (a failure is the caller's) and replay the adapters added while serving
    (one that no longer loads is left out with a warning)."""
    for spec in cfg.lora_dir_loras:
        engine.load_lora(spec.path, name=spec.name)  # type: ignore[attr-defined]
    for spec in cfg.replay_loras:
        try:
            engine.load_lora(spec.path, name=spec.name)  # type: ignore[attr-defined]
        except UserError as e:
            log.warning("LoRA %r added while serving no longer loads; left out: %s", spec.name, e)


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def load_engine(cfg: WorkerConfig, events: EventPipe) -> object | None:
    """Build the engine and announce it (Ready), or report why it could not be built (LoadFailed)."""
    from diffserve.engine.entry import Engine

    try:
        engine = Engine.from_pretrained(cfg.model_path, dtype=cfg.dtype, device=cfg.device,
                                        step_cache=cfg.step_cache,  # type: ignore[arg-type]
                                        attention_backend=cfg.attention_backend, compile=cfg.compile,
                                        fuse=cfg.fuse, vae_dtype=cfg.vae_dtype, fp8=cfg.fp8,
                                        parallel=cfg.parallel,  # type: ignore[arg-type]
                                        loras=cfg.loras, lora_mode=cfg.lora_mode, vae_tiling=cfg.vae_tiling,
                                        text_encoder_cpu_offload=cfg.text_encoder_cpu_offload,
                                        vae_cpu_offload=cfg.vae_cpu_offload, dit_cpu_offload=cfg.dit_cpu_offload,
                                        max_gpu_memory=cfg.max_gpu_memory, plan_size=cfg.plan_size)
        try:
            _load_extra_loras(engine, cfg)
        except BaseException:
            close = getattr(engine, "close", None)  # a multi-GPU engine stops its rank processes
            if close is not None:
                close()
            raise
    except UserError as e:
        events.send(LoadFailed(str(e), user_error=True))
        return None
    except Exception as e:  # noqa: BLE001
        events.send(LoadFailed(f"{type(e).__name__}: {e}", user_error=False))
        return None
    cfg_e = engine.config
    events.send(Ready(defaults=engine.defaults, pipeline_class=engine.pipeline_class, device=str(cfg_e.device),
                      dtype=str(cfg_e.dtype).removeprefix("torch."), pid=os.getpid(),
                      loras=engine.list_loras(), lora_mode=cfg.lora_mode))
    return engine


def worker_main(cfg: WorkerConfig, tasks: Connection, events: Connection, cancels: Connection) -> None:
    """Entry point of the worker process (multiprocessing spawn target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the front decides
    pipe = EventPipe(events)
    if cfg.fault_injection and cfg.fail_load_marker and os.path.exists(cfg.fail_load_marker):
        pipe.send(LoadFailed("injected load failure", user_error=False))
        return
    threading.Thread(target=_beat, args=(pipe, cfg.heartbeat_s), name="diffserve-heartbeat", daemon=True).start()
    _quiet_libraries()
    engine = load_engine(cfg, pipe)
    if engine is None:
        return
    _serve(BatchRunner(engine, pipe, CancelWatch(cancels), cfg.fault_injection, cfg.metadata), tasks)
    close = getattr(engine, "close", None)  # a multi-GPU engine stops its rank processes
    if close is not None:
        close()
    # Every result has been sent: skip the interpreter's teardown of torch and the model, which takes seconds.
    os._exit(0)


def _serve(runner: BatchRunner, tasks: Connection) -> None:
    """Run tasks until told to stop (None) or the front is gone."""
    while True:
        try:
            task = tasks.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            if isinstance(task, LoadLora):
                runner.events.send(load_lora(runner.engine, task))
                continue
            runner.run(task)
        except (BrokenPipeError, EOFError, OSError):
            return
