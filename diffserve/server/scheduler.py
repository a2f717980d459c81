"""The request queue of the front process, and how batches are cut from it.

Requests wait in FIFO order. When the worker is free, the oldest request starts a batch, and every waiting
request with the same batch key (``diffserve.pipelines.base.batch_key``: size, frames, steps, guidance,
sequence length, negative prompt or not; plus its number of input images and its LoRA set) joins it,
oldest first, while the batch holds at most ``max_batch_size`` outputs (the sum of ``n``). If the batch is
not full, the scheduler waits until the oldest request has waited ``batch_wait_s`` for more to arrive. Each
request keeps its own seed and result. Requests that do not fit or do not match keep their place for the next
batch.

The queue is bounded twice: in requests (``max_queue``) and in memory (``max_queue_bytes``: the prompts and
the compressed input images of the waiting requests); either answers 429 ``queue_full``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from diffserve.config import GenerationRequest
from diffserve.pipelines.base import batch_key
from diffserve.server.messages import EncodedImage, ItemDone, OutputSpec, TaskItem
from diffserve.server.protocol import APIError


@dataclass(eq=False)
class WorkItem:
    """One generation request on its way through the queue and the worker."""

    id: str
    kind: str  # "image" or "video"
    request: GenerationRequest  # validated, every default filled
    output: OutputSpec
    on_start: Callable[[], None] | None = None
    on_progress: Callable[[int, int], None] | None = None
    future: Future = field(default_factory=Future)  # ItemDone, or an APIError
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    cancelled: bool = False
    cancelled_at: float | None = None

    @property
    def n(self) -> int:
        return self.request.num_outputs

    @property
    def nbytes(self) -> int:
        """Memory the request holds while it waits: its text and its compressed input images."""
        text = len(self.request.prompt) + len(self.request.negative_prompt or "")
        return 4 * text + sum(len(im.data) for im in self.request.images if isinstance(im, EncodedImage)) + 1024

    @property
    def key(self) -> tuple:
        """Requests of equal keys may be denoised together: same shapes and steps, and the same LoRA set (the
        front fills `request.lora` with the resolved `LoraSet`, the default set included)."""
        return batch_key(self.request) + (len(self.request.images), self.request.lora)

    def task_item(self) -> TaskItem:
        return TaskItem(self.id, self.request, self.output)

    def resolve(self, done: ItemDone) -> None:
        """Finish with the worker's outcome (an error becomes an APIError); later calls are ignored."""
        if self.future.done():
            return
        if done.error is None:
            self.future.set_result(done)
        else:
            e = done.error
            self.future.set_exception(APIError(e.status, e.message, type=e.type, param=e.param, code=e.code))

    def fail(self, error: APIError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


def shutting_down_error() -> APIError:
    return APIError(503, "the server is shutting down; this request was not completed", type="server_error",
                    code="shutting_down")


class Scheduler:
    """Bounded FIFO queue of WorkItems that hands out batches of compatible items (thread-safe)."""

    def __init__(self, *, max_queue: int, max_batch_size: int, batch_wait_s: float = 0.005,
                 max_queue_bytes: int = 2**62) -> None:
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queue_bytes = max_queue_bytes
        self._bytes = 0
        self._pending: deque[WorkItem] = deque()
        self._cond = threading.Condition()
        self._closed = False

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def queued_bytes(self) -> int:
        with self._cond:
            return self._bytes

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, item: WorkItem) -> None:
        """Queue `item`; 429 when the queue is full, 503 once closed for shutdown."""
        with self._cond:
            if self._closed:
                raise shutting_down_error()
            if len(self._pending) >= self.max_queue:
                raise APIError(429, f"the server's queue is full ({self.max_queue} requests waiting); retry later",
                               type="rate_limit_error", code="queue_full")
            if self._pending and self._bytes + item.nbytes > self.max_queue_bytes:
                raise APIError(429, f"the server's queue is full (its waiting requests hold {self._bytes} bytes of "
                                    f"prompts and input images; the limit is {self.max_queue_bytes}); retry later",
                               type="rate_limit_error", code="queue_full")
            self._pending.append(item)
            self._bytes += item.nbytes
            self._cond.notify_all()

    def remove(self, item_id: str) -> WorkItem | None:
        """Take a waiting item out of the queue (None when it is not waiting)."""
        with self._cond:
            for item in self._pending:
                if item.id == item_id:
                    self._pending.remove(item)
                    self._bytes -= item.nbytes
                    self._cond.notify_all()
                    return item
        return None

    def requeue_front(self, items: list[WorkItem]) -> None:
        """Put items taken for a batch that never started back at the head of the queue, in order."""
        with self._cond:
            self._pending.extendleft(reversed(items))
            self._bytes += sum(it.nbytes for it in items)
            self._cond.notify_all()

    def close(self) -> list[WorkItem]:
        """Refuse new work and return (and forget) every waiting item."""
        with self._cond:
            self._closed = True
            items = list(self._pending)
            self._pending.clear()
            self._bytes = 0
            self._cond.notify_all()
        return items

    def drain(self) -> list[WorkItem]:
        """Return and forget every waiting item, staying open (used when the worker is dead)."""
        with self._cond:
            items = list(self._pending)
            self._pending.clear()
            self._bytes = 0
        return items

    def next_batch(self, timeout: float) -> list[WorkItem] | None:
        """The next batch, waiting up to `timeout` seconds for a first item (None if none came)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if not self._pending:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._closed:
                        return None
                    self._cond.wait(remaining)
                    continue
                head = self._pending[0]
                wait_until = head.enqueued_at + self.batch_wait_s
                now = time.monotonic()
                if now < wait_until and self._fill(head.key) < self.max_batch_size:
                    self._cond.wait(wait_until - now)
                    continue  # the head may have been cancelled meanwhile: look again
                return self._take(head.key)

    def _fill(self, key: tuple) -> int:
        """Outputs that waiting items of batch key `key` would put in one batch."""
        return sum(it.n for it in self._pending if it.key == key)

    def _take(self, key: tuple) -> list[WorkItem]:
        batch: list[WorkItem] = []
        total = 0
        for item in self._pending:
            if item.key != key or (batch and total + item.n > self.max_batch_size):
                continue
            batch.append(item)
            total += item.n
            if total >= self.max_batch_size:
                break
        for item in batch:
            self._pending.remove(item)
            self._bytes -= item.nbytes
        return batch
