"""Video jobs of the Videos API: what `POST /v1/videos` creates and `GET /v1/videos/{id}` reports.

A job is ``queued`` until its batch starts, ``in_progress`` while the worker denoises it (``progress`` is
the share of denoising steps done, held at 99 until the MP4 is written), then ``completed`` (its file is in
the output store) or ``failed`` (``error`` says why). A finished job expires ``ttl_s`` after it finished
(``expires_at``): `expire` forgets it (the caller removes its file). Deleting a job forgets it; the
scheduler and worker are told separately to stop it.

Jobs are kept in SQLite (``jobs.sqlite3`` in the output folder), so they survive a restart: finished jobs
are listed and downloadable again, and jobs that were queued or running when the server stopped are marked
failed (``server_restarted``) when it starts. Each row holds the job's API object as JSON; a record that
cannot be written as UTF-8 JSON is refused before it is stored. Pages are read by the row's sequence number
(an index), so listing costs O(log n + page) whatever the number of jobs. Live progress of running jobs is
kept in memory only.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffserve.server.protocol import APIError
from diffserve.server.scheduler import WorkItem

STATUSES = ("queued", "in_progress", "completed", "failed")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    expires_at INTEGER,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
"""


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
    item: WorkItem | None = None
    created_at: int = 0
    status: str = "queued"
    progress: int = 0

    def to_api(self) -> dict[str, Any]:
        """The OpenAI Video object, plus the extensions num_frames, fps, seed and num_inference_steps."""
        return {
            "id": self.id, "object": "video", "model": self.model, "status": self.status,
            "progress": self.progress, "created_at": self.created_at, "completed_at": None,
            "expires_at": None, "error": None, "prompt": self.prompt, "seconds": self.seconds,
            "size": self.size, "remixed_from_video_id": None, "num_frames": self.num_frames, "fps": self.fps,
            "seed": self.seed, "num_inference_steps": self.num_inference_steps,
        }


def _encode(record: dict[str, Any]) -> str:
    """The record as JSON that is valid UTF-8 (400 ``invalid_text`` otherwise: it could never be answered)."""
    try:
        text = json.dumps(record, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except (ValueError, TypeError) as e:  # UnicodeEncodeError is a ValueError
        raise APIError(400, f"the video job cannot be stored: {e}", code="invalid_text") from None
    return text


def error_record(error: BaseException) -> dict[str, Any]:
    """A failure as the Video object's ``error``."""
    if isinstance(error, APIError):
        return {"code": error.code, "message": error.message, "param": error.param, "type": error.type}
    return {"code": "server_error", "message": f"{type(error).__name__}: {error}", "param": None,
            "type": "server_error"}


class JobStore:
    """Thread-safe, persistent video jobs. Updates come from the supervisor thread."""

    def __init__(self, path: Path | None, *, ttl_s: float = 24 * 3600.0) -> None:
        """`path`: the SQLite file (None: in memory, nothing survives the process)."""
        self.ttl_s = ttl_s
        self._db = sqlite3.connect(str(path) if path is not None else ":memory:", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._live: dict[str, VideoJob] = {}  # queued and running jobs: their progress
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def recover(self) -> int:
        """Mark the jobs a previous run left queued or running as failed (``server_restarted``); how many."""
        now = int(time.time())
        error = {"code": "server_restarted", "message": "the server stopped before this job finished; create it "
                 "again", "param": None, "type": "server_error"}
        with self._lock:
            rows = self._db.execute(
                "SELECT id, record FROM jobs WHERE status IN ('queued', 'in_progress')").fetchall()
            for job_id, text in rows:
                record = json.loads(text)
                record.update(status="failed", error=error, completed_at=now, expires_at=now + int(self.ttl_s))
                self._db.execute("UPDATE jobs SET status='failed', expires_at=?, record=? WHERE id=?",
                                 (record["expires_at"], _encode(record), job_id))
        return len(rows)

    def add(self, job: VideoJob) -> None:
        """Store a new job (400 when its record cannot be stored)."""
        job.created_at = job.created_at or int(time.time())
        text = _encode(job.to_api())
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, status, record) VALUES (?, 'queued', ?)", (job.id, text))
            self._live[job.id] = job

    def _record(self, job_id: str, text: str) -> dict[str, Any]:
        record = json.loads(text)
        live = self._live.get(job_id)
        if live is not None:
            record["status"], record["progress"] = live.status, live.progress
        return record

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM jobs WHERE id=?", (job_id,)).fetchone()
            return self._record(job_id, row[0]) if row else None

    def status(self, job_id: str) -> str | None:
        """A job's status, None when unknown."""
        record = self.get(job_id)
        return record["status"] if record else None

    def remove(self, job_id: str) -> VideoJob | dict[str, Any] | None:
        """Forget a job: its live entry (with the work item to cancel) if it is running, else its record."""
        with self._lock:
            row = self._db.execute("SELECT record FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return None
            self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            return self._live.pop(job_id, None) or json.loads(row[0])

    def started(self, job_id: str) -> None:
        with self._lock:
            job = self._live.get(job_id)
            if job and job.status == "queued":
                job.status = "in_progress"

    def progressed(self, job_id: str, done: int, total: int) -> None:
        with self._lock:
            job = self._live.get(job_id)
            if job and job.status in ("queued", "in_progress"):
                job.status = "in_progress"
                job.progress = max(job.progress, min(99, done * 100 // max(total, 1)))

    def finished(self, job_id: str, error: BaseException | None) -> bool:
        """Record a job's outcome (completed when `error` is None); False when the job was deleted meanwhile
        (it stays deleted)."""
        now = int(time.time())
        with self._lock:
            job = self._live.pop(job_id, None)
            row = self._db.execute("SELECT record FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return False
            record = json.loads(row[0])
            status = "completed" if error is None else "failed"
            record.update(status=status, progress=100 if error is None else (job.progress if job else 0),
                          completed_at=now, expires_at=now + int(self.ttl_s),
                          error=None if error is None else error_record(error))
            self._db.execute("UPDATE jobs SET status=?, expires_at=?, record=? WHERE id=?",
                             (status, record["expires_at"], _encode(record), job_id))
        return True

    def page(self, *, after: str | None, limit: int, order: str) -> tuple[list[dict[str, Any]], bool]:
        """A page of jobs ordered by creation ("asc" or "desc"), starting after job id `after`."""
        desc = order == "desc"
        with self._lock:
            start = None
            if after is not None:
                row = self._db.execute("SELECT seq FROM jobs WHERE id=?", (after,)).fetchone()
                if row is None:
                    raise APIError(400, f"after={after!r} is not a known video id", param="after")
                start = row[0]
            where = "" if start is None else ("WHERE seq < ?" if desc else "WHERE seq > ?")
            sql = f"SELECT id, record FROM jobs {where} ORDER BY seq {'DESC' if desc else 'ASC'} LIMIT ?"
            args = ((start,) if start is not None else ()) + (limit + 1,)
            rows = self._db.execute(sql, args).fetchall()
            records = [self._record(job_id, text) for job_id, text in rows[:limit]]
        return records, len(rows) > limit

    def expire(self, now: float | None = None) -> list[str]:
        """Forget the jobs whose ``expires_at`` has passed; their ids (their files are the caller's)."""
        cutoff = int(time.time() if now is None else now)
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                "SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (cutoff,)).fetchall()]
            self._db.executemany("DELETE FROM jobs WHERE id=?", [(i,) for i in ids])
        return ids

    def counts(self) -> dict[str, int]:
        with self._lock:
            counts = dict.fromkeys(STATUSES, 0)
            for status, n in self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
                counts[status] = n
            for job in self._live.values():  # queued ones that started are in_progress in memory only
                if job.status == "in_progress":
                    counts["queued"] -= 1
                    counts["in_progress"] += 1
            return counts
