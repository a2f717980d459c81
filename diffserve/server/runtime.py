"""The server's runtime: its settings and the parts the routes share (queue, worker supervisor, video jobs,
metrics), with start-up and the graceful shutdown sequence.

Shutdown (SIGTERM / SIGINT, or the app's lifespan ending): stop accepting generation requests (503
``shutting_down``), fail every queued request and video job with that error, let the running batch finish
for up to ``shutdown_grace_s`` and then cancel it at its next step (its requests fail with
``shutting_down``), then stop the worker process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffserve.config import ModelDefaults
from diffserve.server.jobs import JobStore
from diffserve.server.messages import WorkerConfig
from diffserve.server.metrics import ServerMetrics
from diffserve.server.protocol import APIError
from diffserve.server.scheduler import Scheduler, WorkItem, shutting_down_error
from diffserve.server.supervisor import WorkerSupervisor

log = logging.getLogger("diffserve.server")


@dataclass
class ServerConfig:
    """Settings of one `diffserve serve` process."""

    worker: WorkerConfig
    model_id: str  # the name clients give as `model` (any value is refused with 404 unless it is this)
    api_key: str | None = None
    max_queue: int = 256
    max_batch_size: int = 8
    batch_wait_s: float = 0.005
    output_dir: Path = field(default_factory=lambda: Path("outputs") / "server")
    allow_url_inputs: bool = False
    max_upload_bytes: int = 20 * 2**20
    shutdown_grace_s: float = 30.0


class Runtime:
    """Everything the routes share, created once per server."""

    def __init__(self, config: ServerConfig, on_fatal: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.created = int(time.time())
        self.jobs = JobStore()
        self.scheduler = Scheduler(max_queue=config.max_queue, max_batch_size=config.max_batch_size,
                                   batch_wait_s=config.batch_wait_s)
        self.metrics = ServerMetrics(queue_depth=lambda: self.scheduler.depth,
                                     running=lambda: self.supervisor.running_count,
                                     worker_up=lambda: self.supervisor.state == "ready",
                                     video_jobs=self.jobs.counts)
        self.supervisor = WorkerSupervisor(config.worker, self.scheduler, self.metrics, on_fatal=on_fatal)
        self.image_dir = config.output_dir / "images"
        self.video_dir = config.output_dir / "videos"
        self._shutdown_lock = threading.Lock()
        self._stopper: threading.Thread | None = None

    def start(self) -> None:
        for folder in (self.image_dir, self.video_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.supervisor.start()

    def defaults(self) -> ModelDefaults:
        """The model's defaults, or 503 while it is not loaded / not loadable / shutting down."""
        if self.scheduler.closed:
            raise shutting_down_error()
        defaults = self.supervisor.defaults
        if self.supervisor.state == "dead":
            raise APIError(503, f"the model worker is not available: {self.supervisor.last_error}",
                           type="server_error", code="worker_dead")
        if defaults is None:
            raise APIError(503, "the model is still loading; retry shortly (see GET /health)", type="server_error",
                           code="model_loading")
        return defaults

    def check_model(self, name: str | None) -> None:
        """404 unless `name` is None, this server's model id, or the model path it was started with."""
        if name is None or name in (self.config.model_id, self.config.worker.model_path):
            return
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.config.model_id}' "
                            "(see GET /v1/models)", param="model", code="model_not_found")

    def submit(self, item: WorkItem) -> None:
        self.scheduler.submit(item)

    def cancel(self, item: WorkItem) -> None:
        """Stop `item`: a queued one leaves the queue, a running one stops at its next denoising step (once
        every request of its batch is cancelled; otherwise its outputs are dropped when the batch ends)."""
        item.cancelled = True
        if self.scheduler.remove(item.id) is not None:
            item.fail(APIError(409, "the request was cancelled", code="cancelled"))
        else:
            self.supervisor.cancel(item)

    def begin_shutdown(self) -> None:
        """Start the shutdown sequence (module docstring) without waiting for it; idempotent."""
        with self._shutdown_lock:
            if self._stopper is not None:
                return
            log.info("shutting down: refusing new requests, failing %d queued", self.scheduler.depth)
            for item in self.scheduler.close():
                item.fail(shutting_down_error())
            self._stopper = threading.Thread(target=self.supervisor.stop, args=(self.config.shutdown_grace_s,),
                                             name="diffserve-shutdown", daemon=True)
            self._stopper.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Run the shutdown sequence to the end (the worker process is gone when this returns)."""
        self.begin_shutdown()
        assert self._stopper is not None
        self._stopper.join(timeout)
        log.info("shut down")
