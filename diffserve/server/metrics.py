"""Prometheus metrics of the server, rendered in the text exposition format (version 0.0.4) for
`GET /metrics`. A few thread-safe counters, gauges and histograms; no client library needed.

Label values come from closed sets, so the page cannot grow with what clients send: HTTP methods outside
`HTTP_METHODS` are counted as ``other``, routes are the app's route templates (``unmatched`` for any other
path), statuses are three-digit codes. As a second guard every family holds at most `MAX_SERIES` label
sets; further ones are folded into one series whose labels are all ``other``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

LabelValues = tuple[str, ...]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                   600.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_SERIES = 500


def method_label(method: str) -> str:
    """An HTTP method as a label value: itself if standard, else ``other``."""
    return method if method in HTTP_METHODS else "other"


def status_label(status: int) -> str:
    return str(status) if 100 <= status <= 599 else "other"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: LabelValues, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    """A named metric family with fixed label names."""

    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, known: dict, labels: LabelValues) -> LabelValues:
        """`labels`, or the overflow series once the family holds MAX_SERIES label sets (caller holds the lock)."""
        if labels in known or len(known) < MAX_SERIES:
            return labels
        return ("other",) * len(labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            labels = self._key(self._values, labels)
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read at scrape time from a callback returning {label values: value}."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], dict[LabelValues, float]],
                 labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._read = read

    def render(self) -> list[str]:
        items = sorted(self._read().items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count, per label set."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self._data: dict[LabelValues, tuple[list[int], float, int]] = {}

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            labels = self._key(self._data, labels)
            counts, total, n = self._data.get(labels) or ([0] * len(self.buckets), 0.0, 0)
            for i, b in enumerate(self.buckets):
                if value <= b:
                    counts[i] += 1
            self._data[labels] = (counts, total + value, n + 1)

    def count(self, *labels: str) -> int:
        with self._lock:
            data = self._data.get(labels)
            return data[2] if data else 0

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, (list(c), s, n)) for k, (c, s, n) in self._data.items())
        for key, (counts, total, n) in items:
            for b, c in zip(self.buckets, counts, strict=True):
                le = 'le="' + _num(b) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {c}")
            le_inf = 'le="+Inf"'
            lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le_inf)} {n}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(total)}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {n}")
        return lines


class ServerMetrics:
    """Every metric the server exports. Gauges read live state through the callbacks given."""

    def __init__(self, *, queue_depth: Callable[[], int], running: Callable[[], int],
                 worker_up: Callable[[], bool], video_jobs: Callable[[], dict[str, int]],
                 output_bytes: Callable[[], int] = lambda: 0, queued_bytes: Callable[[], int] = lambda: 0) -> None:
        self.requests = Counter("diffserve_http_requests_total", "HTTP requests answered, by route and status.",
                                ("method", "route", "status"))
        self.latency = Histogram("diffserve_http_request_duration_seconds",
                                 "Time to answer an HTTP request, by route.", LATENCY_BUCKETS, ("method", "route"))
        self.generation = Histogram("diffserve_generation_seconds",
                                    "Time from queueing to result of a generation, by kind and outcome.",
                                    LATENCY_BUCKETS, ("kind", "outcome"))
        self.queue_wait = Histogram("diffserve_queue_wait_seconds",
                                    "Time a generation waited in the queue before its batch started.",
                                    LATENCY_BUCKETS)
        self.batch_outputs = Histogram("diffserve_batch_size",
                                       "Outputs (images or videos) denoised together per batch.", BATCH_BUCKETS)
        self.batch_requests = Histogram("diffserve_batch_requests", "Requests per batch.", BATCH_BUCKETS)
        self.worker_restarts = Counter("diffserve_worker_restarts_total", "Worker processes restarted.")
        self.worker_stalls = Counter("diffserve_worker_stalls_total",
                                     "Workers killed for a missed heartbeat, a batch deadline or a cancel grace.")
        self.generations = Counter("diffserve_generations_total", "Generations finished, by kind and outcome.",
                                   ("kind", "outcome"))
        self._families: list[_Metric] = [
            Gauge("diffserve_queue_depth", "Generation requests waiting in the queue.",
                  lambda: {(): float(queue_depth())}),
            Gauge("diffserve_running_requests", "Generation requests in the batch the worker is running.",
                  lambda: {(): float(running())}),
            Gauge("diffserve_worker_up", "1 when the model worker is loaded and serving, else 0.",
                  lambda: {(): 1.0 if worker_up() else 0.0}),
            Gauge("diffserve_video_jobs", "Video jobs held by the server, by status.",
                  lambda: {(k,): float(v) for k, v in video_jobs().items()}, ("status",)),
            Gauge("diffserve_output_bytes", "Bytes of output files kept (url images and videos).",
                  lambda: {(): float(output_bytes())}),
            Gauge("diffserve_queued_bytes", "Bytes of prompts and input images held by waiting requests.",
                  lambda: {(): float(queued_bytes())}),
            self.requests, self.latency, self.generation, self.generations, self.queue_wait,
            self.batch_outputs, self.batch_requests, self.worker_restarts, self.worker_stalls,
        ]

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered HTTP request (labels from closed sets, see the module docstring)."""
        m = method_label(method)
        self.requests.inc(m, route, status_label(status))
        self.latency.observe(seconds, m, route)

    def render(self) -> str:
        lines: list[str] = []
        for family in self._families:
            lines.extend(family.render())
        return "\n".join(lines) + "\n"
