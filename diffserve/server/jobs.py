"""Video jobs of the Videos API: what `POST /v1/videos` creates and `GET /v1/videos/{id}` reports.

A job is ``queued`` until its batch starts, ``in_progress`` while the worker denoises it (``progress`` is
the share of denoising steps done, held at 99 until the MP4 is written), then ``completed`` (its file is in
the output folder) or ``failed`` (``error`` says why). Deleting a job forgets it and removes its file; the
scheduler and worker are told separately to stop it. Jobs live in memory for the life of the server.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffserve.server.protocol import APIError
from diffserve.server.scheduler import WorkItem

STATUSES = ("queued", "in_progress", "completed", "failed")


@dataclass
class VideoJob:
    """One video generation job and what the API shows of it."""

    id: str
    model: str
    prompt: str
    size: str
    seconds: str
    num_frames: int
    fps: int
    seed: int
    num_inference_steps: int
    path: Path
    item: WorkItem | None = None
    created_at: int = 0
    status: str = "queued"
    progress: int = 0
    completed_at: int | None = None
    error: dict[str, Any] | None = None

    def to_api(self) -> dict[str, Any]:
        """The OpenAI Video object, plus the extensions num_frames, fps, seed and num_inference_steps."""
        return {
            "id": self.id, "object": "video", "model": self.model, "status": self.status,
            "progress": self.progress, "created_at": self.created_at, "completed_at": self.completed_at,
            "expires_at": None, "error": self.error, "prompt": self.prompt, "seconds": self.seconds,
            "size": self.size, "remixed_from_video_id": None, "num_frames": self.num_frames, "fps": self.fps,
            "seed": self.seed, "num_inference_steps": self.num_inference_steps,
        }


class JobStore:
    """Thread-safe, insertion-ordered video jobs. Updates come from the supervisor thread."""

    def __init__(self) -> None:
        self._jobs: dict[str, VideoJob] = {}
        self._lock = threading.Lock()

    def add(self, job: VideoJob) -> None:
        with self._lock:
            job.created_at = job.created_at or int(time.time())
            self._jobs[job.id] = job

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return job.to_api() if job else None

    def content(self, job_id: str) -> tuple[str, Path] | None:
        """(status, file path) of a job, None when unknown."""
        with self._lock:
            job = self._jobs.get(job_id)
            return (job.status, job.path) if job else None

    def remove(self, job_id: str) -> VideoJob | None:
        with self._lock:
            return self._jobs.pop(job_id, None)

    def started(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job and job.status == "queued":
                job.status = "in_progress"

    def progressed(self, job_id: str, done: int, total: int) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job and job.status in ("queued", "in_progress"):
                job.status = "in_progress"
                job.progress = max(job.progress, min(99, done * 100 // max(total, 1)))

    def finished(self, job_id: str, future: Future) -> None:
        """Record the outcome of a job's work item (a done-callback of its future)."""
        error = future.exception()
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return
            job.completed_at = int(time.time())
            job.item = None
            if error is None:
                job.status, job.progress = "completed", 100
                return
            job.status = "failed"
            if isinstance(error, APIError):
                job.error = {"code": error.code or error.type, "message": error.message, "param": error.param,
                             "type": error.type}
            else:
                job.error = {"code": "server_error", "message": f"{type(error).__name__}: {error}",
                             "param": None, "type": "server_error"}

    def page(self, *, after: str | None, limit: int, order: str) -> tuple[list[dict[str, Any]], bool]:
        """A page of jobs ordered by creation ("asc" or "desc"), starting after job id `after`."""
        with self._lock:
            jobs = [j.to_api() for j in self._jobs.values()]
        if order == "desc":
            jobs.reverse()
        if after is not None:
            ids = [j["id"] for j in jobs]
            if after not in ids:
                raise APIError(400, f"after={after!r} is not a known video id", param="after")
            jobs = jobs[ids.index(after) + 1:]
        return jobs[:limit], len(jobs) > limit

    def counts(self) -> dict[str, int]:
        with self._lock:
            counts = dict.fromkeys(STATUSES, 0)
            for job in self._jobs.values():
                counts[job.status] += 1
            return counts
