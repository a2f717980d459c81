"""The front process's side of the model worker: start it, feed it batches from the scheduler, relay its
progress and results to the waiting requests, and restart it when it dies.

One thread runs the loop below; one batch is in the worker at a time (the next one is cut when it ends, so
requests that arrive meanwhile batch together). Worker states, shown on /health:

* ``starting``: the first worker is loading the model (requests get 503 until it is ready);
* ``ready``: serving;
* ``restarting``: the worker died, stalled or overran a deadline and is being replaced (`watchdog`); requests
  stay queued and run on the new worker, but the ones it was running fail at once (``worker_died``,
  ``worker_stalled``, ``generation_timeout``) instead of hanging;
* ``dead``: the model could not be loaded (or reloaded: `MAX_LOAD_FAILURES` tries in a row, 2 s then 4 s
  apart); requests get 503 and the server is told (`on_fatal`), which makes `diffserve serve` exit 1 so that
  an outside supervisor (systemd, Kubernetes) restarts it;
* ``stopped``: the server shut down.

LoRA adapters added while serving (`load_lora`, POST /v1/loras) are loaded by the worker between batches;
the supervisor remembers them and a restarted worker loads them again (`WorkerConfig.replay_loras`), so
`info.loras` (what GET /v1/loras lists) survives a restart.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing as mp
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from diffserve.config import ModelDefaults
from diffserve.lora.spec import LoraSet, LoraSpec
from diffserve.server.messages import (
    CANCEL_ALL,
    BatchDone,
    BatchTask,
    Heartbeat,
    ItemDone,
    LoadFailed,
    LoadLora,
    LoraLoaded,
    Progress,
    Ready,
    WorkerConfig,
)
from diffserve.server.metrics import ServerMetrics
from diffserve.server.protocol import APIError
from diffserve.server.scheduler import Scheduler, WorkItem, shutting_down_error
from diffserve.server.watchdog import BatchClock, WatchdogConfig, request_cost
from diffserve.server.worker import worker_main

log = logging.getLogger("diffserve.server")

MAX_LOAD_FAILURES = 3  # consecutive failed (re)loads before the worker is declared dead


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _WorkerDied(Exception):
    """The worker process ended while it was expected to answer."""


class _WorkerStalled(Exception):
    """The worker is alive but must be killed: no heartbeat, a batch past its deadline, or a cancelled batch
    that does not stop. `error` is what the requests it was running get."""

    def __init__(self, reason: str, error: APIError | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


class WorkerSupervisor:
    """Owns the worker process and the thread that serves the scheduler's batches with it."""

    def __init__(self, cfg: WorkerConfig, scheduler: Scheduler, metrics: ServerMetrics | None = None,
                 on_fatal: Callable[[str], None] | None = None, watchdog: WatchdogConfig | None = None) -> None:
        self.cfg = cfg
        self.scheduler = scheduler
        self.metrics = metrics
        self.on_fatal = on_fatal
        self.watchdog = watchdog or WatchdogConfig()
        self.clock = BatchClock(self.watchdog)
        self._last_heard = time.monotonic()
        self._serving = False  # heartbeats are required (only once the model is loaded)
        self._deadline: float | None = None
        self._steps: tuple[int, int] | None = None  # (done, total) denoising steps of the running batch
        self.load_s = 0.0  # how long the last worker took to load the model
        self.state = "starting"
        self.pid: int | None = None
        self.restarts = 0
        self.last_error: str | None = None
        self.info: Ready | None = None
        self.loaded = threading.Event()  # set once the model is loaded, or loading failed for good
        self._hopeless = False
        self._running: dict[str, WorkItem] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._batch_ids = itertools.count(1)
        self._lora_asks: deque[tuple[LoraSpec, Future]] = deque()  # LoRA loads waiting for the worker
        self._added_loras: list[LoraSpec] = []  # loaded while serving: replayed by a restarted worker
        self._lora_closed = False  # the serving loop has ended: no LoRA load will run
        self._proc: Any = None
        self._tasks: Connection | None = None
        self._events: Connection | None = None
        self._cancels: Connection | None = None
        self._thread = threading.Thread(target=self._run, name="diffserve-supervisor", daemon=True)

    # ---------------------------------------------------------------------------------------------- public

    @property
    def defaults(self) -> ModelDefaults | None:
        return self.info.defaults if self.info else None

    @property
    def lora_mode(self) -> str:
        return self.info.lora_mode if self.info else self.cfg.lora_mode

    def lora_state(self) -> tuple[list[str], LoraSet]:
        """(names of the loaded adapters, the default set a request that leaves `lora` out gets)."""
        loras = self.info.loras if self.info else []
        default = LoraSet(tuple((str(i["name"]), float(i["scale"])) for i in loras if i.get("default")))
        return [str(i["name"]) for i in loras], default

    def load_lora(self, spec: LoraSpec) -> Future:
        """Have the worker load one more adapter, between batches: a Future of its `list_loras` entry (an
        APIError when it fails). A restarted worker loads it again."""
        future: Future = Future()
        with self._lock:
            if self.state != "ready" or self._lora_closed:
                future.set_exception(APIError(503, f"the model worker is {self.state}; retry shortly (see GET "
                                                   "/health)", type="server_error", code="worker_not_ready"))
            else:
                self._lora_asks.append((spec, future))
        return future

    def worker_config(self) -> WorkerConfig:
        """What the next worker is started with: the server's settings and the LoRAs added while serving."""
        with self._lock:
            return dataclasses.replace(self.cfg, replay_loras=tuple(self._added_loras))

    @property
    def running_count(self) -> int:
        with self._lock:
            return len(self._running)

    def start(self) -> None:
        self._thread.start()

    def snapshot(self) -> dict[str, Any]:
        """Worker state for /health."""
        with self._lock:
            running = len(self._running)
        info, now, deadline = self.info, time.monotonic(), self._deadline
        return {"state": self.state, "pid": self.pid, "restarts": self.restarts, "last_error": self.last_error,
                "running": running, "pipeline": info.pipeline_class if info else None,
                "device": info.device if info else None, "dtype": info.dtype if info else None,
                "last_heartbeat_s": round(now - self._last_heard, 3) if self._serving else None,
                "batch_steps": list(self._steps) if self._steps else None, "load_s": round(self.load_s, 2),
                "batch_deadline_in_s": round(deadline - now, 3) if deadline is not None else None}

    def retry_after_s(self) -> int:
        """A guess of when a full queue will have room: its batches at the recent mean batch time (1-60 s)."""
        mean = self.clock.mean_batch_s or 1.0
        batches = self.scheduler.depth / max(1, self.scheduler.max_batch_size)
        return int(min(60, max(1, round(mean * max(1.0, batches)))))

    def cancel(self, item: WorkItem) -> bool:
        """Ask the worker to stop `item` at its next step; False when it is not running."""
        item.cancelled = True
        item.cancelled_at = item.cancelled_at or time.monotonic()
        with self._lock:
            if item.id not in self._running:
                return False
            self._send_cancel(item.id)
        return True

    def stop(self, grace_s: float) -> None:
        """Shut down: let the running batch finish for up to `grace_s`, then cancel it, then stop the worker."""
        self._stopping.set()  # the loop ends once the batch in hand (if any) is over
        if self._thread.is_alive():
            self._thread.join(timeout=grace_s)
        if self._thread.is_alive():
            with self._lock:
                self._send_cancel(CANCEL_ALL)  # stop the batch at its next step
            self._thread.join(timeout=15.0)
        if self._thread.is_alive():  # the worker does not answer: kill it, the loop then fails what it ran
            proc = self._proc
            if proc is not None:
                proc.kill()
            self._thread.join(timeout=5.0)
        self._stop_process()
        self._set_state("stopped")

    # ------------------------------------------------------------------------------------------ main loop

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stopping.is_set():
                if not self._launch():
                    if self._stopping.is_set():
                        break
                    failures += 1
                    if self.info is None or self._hopeless or failures >= MAX_LOAD_FAILURES:
                        self._give_up()
                        return
                    self._set_state("restarting")
                    self._stopping.wait(min(30.0, 2.0**failures))
                    continue
                failures = 0
                self._serve()
                self._stop_process()
        finally:
            self._stop_process()
            self._fail_lora_asks(shutting_down_error(), final=True)

    def _worker_lost(self, reason: str) -> None:
        """Record that the worker died (before anyone waiting is told, so /health already says so)."""
        self.last_error = reason
        if self._stopping.is_set():
            return
        with self._lock:
            self.state = "restarting"
            self.restarts += 1
        log.warning("%s; restarting it (restart %d)", reason, self.restarts)
        if self.metrics:
            self.metrics.worker_restarts.inc()

    def _set_state(self, state: str) -> None:
        with self._lock:
            self.state = state

    def _give_up(self) -> None:
        """The model cannot be served: fail what waits and anything queued later, and tell the server."""
        self._set_state("dead")
        self.loaded.set()
        log.error("giving up on the worker: %s", self.last_error)
        error = APIError(503, f"the model worker is not available: {self.last_error}", type="server_error",
                         code="worker_dead")
        if self.on_fatal is not None:
            self.on_fatal(self.last_error or "the model could not be loaded")
        self._fail_lora_asks(error)
        while not self._stopping.is_set():
            for item in self.scheduler.drain():
                item.fail(error)
            self._stopping.wait(0.2)

    def _launch(self) -> bool:
        """Start a worker process and wait until its model is loaded."""
        ctx = mp.get_context("spawn")
        task_r, task_w = ctx.Pipe(duplex=False)
        ev_r, ev_w = ctx.Pipe(duplex=False)
        cancel_r, cancel_w = ctx.Pipe(duplex=False)
        # A multi-GPU engine starts rank processes, which a daemonic process may not; the single-process
        # worker stays daemonic so it cannot outlive a front that exits without stopping it.
        proc = ctx.Process(target=worker_main, args=(self.worker_config(), task_r, ev_w, cancel_r),
                           name="diffserve-worker", daemon=self.cfg.parallel is None)
        launched = time.monotonic()
        proc.start()
        for end in (task_r, ev_w, cancel_r):
            end.close()
        with self._lock:
            self._proc, self._tasks, self._events, self._cancels = proc, task_w, ev_r, cancel_w
            self.pid = proc.pid
            self._serving = False
        try:
            msg = self._wait_ready()
        except _WorkerDied:
            self.last_error = f"the worker process died while loading the model ({_exit_text(proc.exitcode)})"
            log.error("%s", self.last_error)
            return False
        if isinstance(msg, LoadFailed):
            self.last_error = msg.message
            log.error("the worker could not load the model: %s", msg.message)
            self._hopeless = msg.user_error  # a bad model path or checkpoint will not load on retry either
            return False
        if msg is None:
            return False
        self.info = msg
        names = {str(i["name"]) for i in msg.loras}
        self._added_loras = [s for s in self._added_loras if s.name in names]  # one that failed is dropped
        self.load_s = time.monotonic() - launched
        self._last_heard = time.monotonic()
        self._serving = True
        self._set_state("ready")
        log.info("worker %d ready: %s on %s (%s)", msg.pid, msg.pipeline_class, msg.device, msg.dtype)
        self.loaded.set()
        return True

    def _wait_ready(self) -> Ready | LoadFailed | None:
        while not self._stopping.is_set():
            msg = self._recv(timeout=0.5)
            if isinstance(msg, (Ready, LoadFailed)):
                return msg
        return None

    def _recv(self, timeout: float) -> object | None:
        """The next event from the worker other than a heartbeat, None after `timeout`; _WorkerDied when it
        is gone, _WorkerStalled when a serving worker has not been heard from for too long."""
        assert self._events is not None
        try:
            if self._events.poll(timeout):
                msg = self._events.recv()
                self._last_heard = time.monotonic()
                return None if isinstance(msg, Heartbeat) else msg
            if self._proc.is_alive():
                self._check_heartbeat()
                return None
            if self._events.poll(0):  # it wrote before exiting
                return self._events.recv()
        except (EOFError, OSError):
            pass
        self._proc.join(timeout=2.0)
        raise _WorkerDied()

    def _check_heartbeat(self) -> None:
        silent = time.monotonic() - self._last_heard
        if self._serving and silent > self.watchdog.heartbeat_timeout_s:
            reason = (f"the worker process stopped answering (no heartbeat for {silent:.1f} s; stopped or frozen)"
                      "; it was killed")
            raise _WorkerStalled(reason, APIError(
                500, f"{reason} while running this request and is being restarted; retry the request",
                type="server_error", code="worker_stalled"))

    def _serve(self) -> None:
        """Feed batches to a ready worker until it dies, stalls or the server stops."""
        while not self._stopping.is_set():
            if self._lora_asks and not self._load_loras():
                return
            batch = self.scheduler.next_batch(timeout=0.2)
            try:
                if not batch:
                    self._recv(0)  # heartbeats while idle
                    continue
            except _WorkerStalled as e:
                self._kill(e.reason)
                return
            except _WorkerDied:
                pass
            if not self._proc.is_alive():
                if batch:
                    self.scheduler.requeue_front(batch)
                self._proc.join(timeout=1.0)
                self._worker_lost(f"the worker process died while idle ({_exit_text(self._proc.exitcode)})")
                return
            if not self._execute(batch):
                return

    # ------------------------------------------------------------------------------------------- LoRAs

    def _load_loras(self) -> bool:
        """Run the LoRA loads asked for, one at a time; False when the worker died or stalled meanwhile."""
        while True:
            with self._lock:
                if not self._lora_asks:
                    return True
                spec, future = self._lora_asks.popleft()
            request_id = next(self._batch_ids)
            lost = APIError(503, "the model worker stopped while loading the LoRA; it is being restarted, retry",
                            type="server_error", code="worker_died")
            try:
                assert self._tasks is not None
                try:
                    self._tasks.send(LoadLora(request_id, spec))
                except (BrokenPipeError, OSError):
                    raise _WorkerDied() from None
                msg = None
                while not (isinstance(msg, LoraLoaded) and msg.request_id == request_id):
                    msg = self._recv(timeout=0.2)
            except _WorkerDied:
                future.set_exception(lost)
                self._worker_lost(f"the worker process died while loading a LoRA ({_exit_text(self._proc.exitcode)})")
                return False
            except _WorkerStalled as e:
                future.set_exception(lost)
                self._kill(e.reason)
                return False
            if msg.error is not None:
                e = msg.error
                future.set_exception(APIError(e.status, e.message, type=e.type, param="path", code=e.code))
                continue
            with self._lock:
                self._added_loras.append(spec)
                if self.info is not None:
                    self.info = dataclasses.replace(self.info, loras=msg.loras)
            future.set_result(msg.info)

    def _fail_lora_asks(self, error: APIError, *, final: bool = False) -> None:
        """Fail the LoRA loads still waiting (`final`: and every later one: the loop is over)."""
        with self._lock:
            asks = list(self._lora_asks)
            self._lora_asks.clear()
            self._lora_closed = self._lora_closed or final
        for _, future in asks:
            future.set_exception(error)

    # ------------------------------------------------------------------------------------------- batches

    def _execute(self, batch: list[WorkItem]) -> bool:
        """Run one batch; False when the worker died or was killed during it (its items have then failed)."""
        now = time.monotonic()
        with self._lock:
            for it in batch:
                it.started_at = now
                self._running[it.id] = it
        try:
            self._begin(batch, now)
            assert self._tasks is not None
            try:
                self._tasks.send(BatchTask(next(self._batch_ids), [it.task_item() for it in batch]))
            except (BrokenPipeError, OSError):
                self._proc.join(timeout=2.0)
                raise _WorkerDied() from None
            self._pump(sum(request_cost(it.request) for it in batch), now)
            return True
        except _WorkerDied:
            self._fail_running(self._death_error())
            return False
        except _WorkerStalled as e:
            self._kill(e.reason)
            if e.error is None:  # every request of the batch had been cancelled
                self._fail_running(APIError(409, "the request was cancelled", code="cancelled"), "cancelled")
            else:
                self._fail_running(shutting_down_error() if self._stopping.is_set() else e.error)
            return False
        finally:
            self._deadline = self._steps = None
            with self._lock:
                self._running.clear()

    def _begin(self, batch: list[WorkItem], now: float) -> None:
        """Mark items started, record queue waits and the batch size, forward cancels that came early."""
        if self.metrics:
            self.metrics.batch_outputs.observe(sum(it.n for it in batch))
            self.metrics.batch_requests.observe(len(batch))
        for it in batch:
            if self.metrics:
                self.metrics.queue_wait.observe(now - it.enqueued_at)
            if it.cancelled:
                it.cancelled_at = it.cancelled_at or now
                with self._lock:
                    self._send_cancel(it.id)
            if it.on_start is not None:
                it.on_start()

    def _pump(self, cost: int, started: float) -> None:
        """Relay the worker's events for the running batch until it is done, holding it to its deadline."""
        self._deadline = self.clock.deadline(started, cost, started)
        while True:
            msg = self._recv(timeout=0.2)
            if isinstance(msg, Progress):
                self._steps = (msg.done, msg.total)
                self._deadline = self.clock.deadline(started, cost, time.monotonic(), msg.done, msg.total)
                for item_id in msg.item_ids:
                    item = self._running.get(item_id)
                    if item is not None and item.on_progress is not None:
                        item.on_progress(msg.done, msg.total)
            elif isinstance(msg, ItemDone):
                with self._lock:
                    item = self._running.pop(msg.item_id, None)
                if item is not None:
                    self._finish(item, msg)
            elif isinstance(msg, BatchDone):
                self.clock.learn(cost, time.monotonic() - started)
                return
            self._check_time(started)

    def _check_time(self, started: float) -> None:
        """_WorkerStalled when the batch is past its deadline, or every request of it was cancelled more than
        the cancel grace ago and it still runs (a long step, or preprocessing that never reaches a step); a
        fully cancelled batch killed for either reason has its requests reported cancelled."""
        now = time.monotonic()
        late = self._deadline is not None and now > self._deadline
        with self._lock:
            items = list(self._running.values())
        if items and all(it.cancelled for it in items):
            since = max(it.cancelled_at or now for it in items)
            grace = max(self.watchdog.cancel_grace_s, self.load_s)  # a restart frees the worker no sooner
            if late or now - since > grace:
                raise _WorkerStalled(f"a cancelled batch did not stop within {now - since:.0f} s; the worker was "
                                     "killed", None)
        elif late:
            limit = self._deadline - started  # type: ignore[operator]
            reason = f"a batch ran past its deadline of {limit:.0f} s (from its size and steps); the worker was killed"
            raise _WorkerStalled(reason, APIError(
                504, f"this request did not finish within its deadline of {limit:.0f} s, set from its size and "
                     "steps; the worker was restarted", type="server_error", code="generation_timeout"))

    def _finish(self, item: WorkItem, done: ItemDone) -> None:
        """Hand the outcome to the request; outputs of a cancelled request are deleted."""
        outcome = "ok" if done.error is None else ("cancelled" if done.error.code == "cancelled" else "error")
        if self.metrics:
            self.metrics.generations.inc(item.kind, outcome)
            self.metrics.generation.observe(time.monotonic() - item.enqueued_at, item.kind, outcome)
        if item.cancelled:
            item.fail(APIError(409, "the request was cancelled", code="cancelled"))
        elif outcome == "cancelled":  # stopped by shutdown
            item.fail(shutting_down_error())
        else:
            item.resolve(done)

    def _death_error(self) -> APIError:
        code = self._proc.exitcode if self._proc is not None else None
        self._worker_lost(f"the worker process died while running a batch ({_exit_text(code)})")
        if self._stopping.is_set():
            return shutting_down_error()
        return APIError(500, f"the model worker process died while running this request ({_exit_text(code)}); "
                             "it is being restarted, retry the request", type="server_error", code="worker_died")

    def _fail_running(self, error: APIError, outcome: str = "error") -> None:
        with self._lock:
            items = list(self._running.values())
            self._running.clear()
        for item in items:
            if self.metrics:
                self.metrics.generations.inc(item.kind, outcome)
            item.fail(error)

    # ------------------------------------------------------------------------------------------- process

    def _kill(self, reason: str) -> None:
        """Kill a stalled worker (SIGKILL reaches a stopped process too) and record why."""
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(timeout=5.0)
        if self.metrics:
            self.metrics.worker_stalls.inc()
        self._worker_lost(reason)

    def _send_cancel(self, msg: str) -> None:
        """Write to the cancel pipe (caller holds the lock); a dead worker needs no message."""
        if self._cancels is None:
            return
        try:
            self._cancels.send(msg)
        except (BrokenPipeError, OSError):
            pass

    def _stop_process(self) -> None:
        """Ask the worker to exit, then terminate / kill it if it does not."""
        with self._lock:
            proc, tasks = self._proc, self._tasks
            conns = (self._tasks, self._events, self._cancels)
            self._proc = self._tasks = self._events = self._cancels = None
        if proc is None:
            return
        if proc.is_alive() and tasks is not None:
            try:
                tasks.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=5.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=3.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=3.0)
        for conn in conns:
            if conn is not None:
                conn.close()
