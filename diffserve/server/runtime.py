"""The server's runtime: its settings and the parts the routes share (queue, worker supervisor, video jobs,
output files, metrics), with start-up, the janitor that expires old jobs and files, and the graceful
shutdown sequence.

Shutdown (SIGTERM / SIGINT, or the app's lifespan ending): stop accepting generation requests (503
``shutting_down``), fail every queued request and video job with that error, let the running batch finish
for up to ``shutdown_grace_s`` and then cancel it at its next step (its requests fail with
``shutting_down``), then stop the worker process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffserve.config import GenerationRequest, ModelDefaults
from diffserve.server.inputs import MIN_INPUT_EDGE, ImageRules, WorkingSize
from diffserve.server.jobs import JobStore
from diffserve.server.messages import WorkerConfig
from diffserve.server.metrics import ServerMetrics
from diffserve.server.outputs import LocalOutputStore, OutputStore
from diffserve.server.protocol import APIError
from diffserve.server.scheduler import Scheduler, WorkItem, shutting_down_error
from diffserve.server.supervisor import WorkerSupervisor
from diffserve.server.watchdog import WatchdogConfig, request_cost

DEFAULT_COST_FACTOR = 8  # the default cost ceiling: this many of the model's default request

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
    max_queue_bytes: int = 256 * 2**20  # prompts and compressed input images of the waiting requests
    max_request_mpx_steps: float | None = None  # cost ceiling per request; None: DEFAULT_COST_FACTOR x default
    job_ttl_s: float = 24 * 3600.0  # video jobs and output files are kept this long after they finish
    output_quota_bytes: int = 10 * 2**30  # output files beyond this: the oldest are removed
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    metrics_require_key: bool = False
    docs: bool = True
    playground: bool = True  # the web playground at GET / (diffserve.server.playground)
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no CORS headers
    lora_dir: Path | None = None  # where POST /v1/loras may load LoRA files from (routes_loras)
    output_storage: str | None = None  # s3://bucket/prefix for url images and MP4s; None: under output_dir
    s3_endpoint_url: str | None = None  # an S3-compatible service other than AWS's (None: boto3's own choice)


def make_output_store(config: ServerConfig, on_evict: Callable[[str, str], None] | None = None) -> OutputStore:
    """The store of url images and MP4s: the S3 prefix of ``output_storage``, else ``output_dir`` on disk
    (the job database stays in ``output_dir`` either way)."""
    if config.output_storage is None:
        return LocalOutputStore(config.output_dir, ttl_s=config.job_ttl_s, quota_bytes=config.output_quota_bytes,
                                on_evict=on_evict)
    from diffserve.server.storage_s3 import S3OutputStore, parse_s3_url

    return S3OutputStore(parse_s3_url(config.output_storage), endpoint_url=config.s3_endpoint_url,
                         ttl_s=config.job_ttl_s, quota_bytes=config.output_quota_bytes, on_evict=on_evict)


class Runtime:
    """Everything the routes share, created once per server."""

    def __init__(self, config: ServerConfig, on_fatal: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.created = int(time.time())
        config.output_dir.mkdir(parents=True, exist_ok=True)
        self.jobs = JobStore(config.output_dir / "jobs.sqlite3", ttl_s=config.job_ttl_s)
        self.outputs = make_output_store(config, on_evict=self._evicted)
        self.scheduler = Scheduler(max_queue=config.max_queue, max_batch_size=config.max_batch_size,
                                   batch_wait_s=config.batch_wait_s, max_queue_bytes=config.max_queue_bytes)
        self.metrics = ServerMetrics(queue_depth=lambda: self.scheduler.depth,
                                     running=lambda: self.supervisor.running_count,
                                     worker_up=lambda: self.supervisor.state == "ready",
                                     video_jobs=self.jobs.counts, output_bytes=lambda: self.outputs.total_bytes,
                                     queued_bytes=lambda: self.scheduler.queued_bytes)
        self.supervisor = WorkerSupervisor(config.worker, self.scheduler, self.metrics, on_fatal=on_fatal,
                                           watchdog=config.watchdog)
        self.decode_slots = asyncio.Semaphore(2)  # input images decoded at once (each may be megapixels)
        self._shutdown_lock = threading.Lock()
        self._stopper: threading.Thread | None = None
        self._janitor_stop = threading.Event()

    def start(self) -> None:
        self.outputs.open()
        log.info("outputs in %s (%d files)", self.outputs.describe(), len(self.outputs))
        failed = self.jobs.recover()
        if failed:
            log.warning("%d video jobs were queued or running when the server last stopped; marked failed", failed)
        self.clean()
        threading.Thread(target=self._janitor, name="diffserve-janitor", daemon=True).start()
        self.supervisor.start()

    def clean(self, now: float | None = None) -> None:
        """Forget expired video jobs and remove their files and every other expired output."""
        for job_id in self.jobs.expire(now):
            self.outputs.remove("videos", self.outputs.video_name(job_id))
        self.outputs.sweep(now)

    def _janitor(self) -> None:
        interval = max(1.0, min(60.0, self.config.job_ttl_s / 4))
        while not self._janitor_stop.wait(interval):
            try:
                self.clean()
            except Exception:  # a failed sweep is retried at the next one
                log.exception("cleaning expired outputs failed")

    def _evicted(self, kind: str, name: str) -> None:
        """An output removed early by the disk quota: a video's job goes with it."""
        if kind == "videos":
            self.jobs.remove(name.removesuffix(".mp4"))
        log.info("output quota: removed %s/%s", kind, name)

    def max_request_cost(self, defaults: ModelDefaults) -> int:
        """The largest request accepted, in pixel-steps (outputs x width x height x frames x steps)."""
        if self.config.max_request_mpx_steps is not None:
            return int(self.config.max_request_mpx_steps * 1e6)
        frames = defaults.num_frames or 1
        return DEFAULT_COST_FACTOR * defaults.width * defaults.height * frames * defaults.num_inference_steps

    def check_cost(self, req: GenerationRequest, defaults: ModelDefaults) -> None:
        """400 ``request_too_costly`` for a request over the cost ceiling."""
        cost, ceiling = request_cost(req), self.max_request_cost(defaults)
        if cost > ceiling:
            raise APIError(400, f"this request asks for {cost / 1e6:g} megapixel-steps (n x width x height x frames x "
                                f"steps); this server accepts at most {ceiling / 1e6:g} (--max-request-cost, shown "
                                "in GET /v1/models): ask for fewer or smaller outputs or fewer steps",
                           code="request_too_costly")

    def image_rules(self, defaults: ModelDefaults, width: int | None, height: int | None) -> ImageRules:
        """How input images of a request for a `width` x `height` output (None: the model's choice) are taken."""
        if width is None or height is None:  # edit models size the output from the image: cover the area only
            width, height = (0, 0) if defaults.size_from_image_area else (defaults.width, defaults.height)
        need = WorkingSize(width, height, defaults.size_from_image_area or 0)
        return ImageRules(self.max_input_pixels(defaults), need, self.decode_slots)

    @staticmethod
    def max_input_pixels(defaults: ModelDefaults) -> int:
        """The largest input image accepted: no larger than the largest output the model makes (nor than what
        an edit model looks at), since nothing beyond that is used."""
        return max(defaults.max_size ** 2, defaults.size_from_image_area or 0, MIN_INPUT_EDGE ** 2)

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
        """Queue `item` (429 with Retry-After when the queue is full)."""
        try:
            self.scheduler.submit(item)
        except APIError as e:
            if e.status == 429:
                e.headers["Retry-After"] = str(self.supervisor.retry_after_s())
            raise

    def cancel(self, item: WorkItem) -> None:
        """Stop `item`: a queued one leaves the queue, a running one stops at its next denoising step (once
        every request of its batch is cancelled; otherwise its outputs are dropped when the batch ends; a
        fully cancelled batch that runs on past the cancel grace is stopped by restarting the worker)."""
        item.cancelled = True
        item.cancelled_at = time.monotonic()
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
        self._janitor_stop.set()
        log.info("shut down")
