"""Where the server's outputs live: ``url`` images and video MP4s under ``--output-dir``.

Every output file is written through `OutputStore.write` (atomically: a temporary sibling, then a rename), so
a different store (object storage) replaces this one class. Files are kept for ``ttl_s`` after they are
written and removed by `sweep`; the store also holds them under a disk quota: when a write takes the total
over ``quota_bytes``, the oldest files are removed first (their video jobs with them, through `on_evict`).
The index of files is rebuilt from the folders at start-up (oldest first by modification time) and kept in
write order, so eviction and expiry look only at the oldest files.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

KINDS = ("images", "videos")
_NAMES = {"images": re.compile(r"^img_[0-9a-f]{32}\.(png|jpg|webp)$"),
          "videos": re.compile(r"^video_[0-9a-f]{24}\.mp4$")}
_SUFFIX = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "mp4": ".mp4"}


class OutputStore:
    """Output files of one server: named, written, served, expired and held under a quota (thread-safe)."""

    def __init__(self, root: Path, *, ttl_s: float, quota_bytes: int,
                 on_evict: Callable[[str, str], None] | None = None) -> None:
        self.root = root
        self.ttl_s = ttl_s
        self.quota_bytes = quota_bytes
        self.on_evict = on_evict  # (kind, name) of a file removed early by the quota
        self._files: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()  # oldest first
        self._total = 0
        self._lock = threading.Lock()

    def open(self) -> None:
        """Create the folders and index the files already there (a restart keeps its outputs)."""
        found = []
        for kind in KINDS:
            folder = self.root / kind
            folder.mkdir(parents=True, exist_ok=True)
            for entry in os.scandir(folder):
                if entry.is_file() and _NAMES[kind].match(entry.name):
                    st = entry.stat()
                    found.append((st.st_mtime, kind, entry.name, st.st_size))
        with self._lock:
            for mtime, kind, name, size in sorted(found):
                self._files[(kind, name)] = (mtime, size)
                self._total += size

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    @staticmethod
    def image_name(fmt: str) -> str:
        """A fresh, unguessable name for a ``url`` image (it is served without the API key)."""
        return f"img_{secrets.token_hex(16)}{_SUFFIX[fmt]}"

    @staticmethod
    def video_name(job_id: str) -> str:
        return f"{job_id}.mp4"

    def path(self, kind: str, name: str) -> Path | None:
        """The file of a stored output, None when there is none (unknown, expired or a name of another form)."""
        if kind not in _NAMES or not _NAMES[kind].match(name):
            return None
        with self._lock:
            known = (kind, name) in self._files
        path = self.root / kind / name
        return path if known and path.is_file() else None

    def write(self, kind: str, name: str, data: bytes) -> Path:
        """Store one output (atomically), then hold the quota by removing the oldest other files."""
        if not _NAMES[kind].match(name):
            raise ValueError(f"not an output name: {name!r}")
        path = self.root / kind / name
        tmp = path.with_name(f".{name}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        with self._lock:
            self._files[(kind, name)] = (time.time(), len(data))
            self._total += len(data)
        self._hold_quota(keep=(kind, name))
        return path

    def remove(self, kind: str, name: str) -> None:
        with self._lock:
            entry = self._files.pop((kind, name), None)
            if entry is not None:
                self._total -= entry[1]
        (self.root / kind / name).unlink(missing_ok=True)

    def sweep(self, now: float | None = None) -> int:
        """Remove the files older than the TTL; how many were removed."""
        cutoff = (time.time() if now is None else now) - self.ttl_s
        expired = []
        with self._lock:
            for key, (mtime, _) in self._files.items():
                if mtime > cutoff:
                    break  # write order: the rest are younger
                expired.append(key)
        for kind, name in expired:
            self.remove(kind, name)
        return len(expired)

    def _hold_quota(self, keep: tuple[str, str]) -> None:
        while True:
            with self._lock:
                if self._total <= self.quota_bytes:
                    return
                victim = next((k for k in self._files if k != keep), None)
            if victim is None:
                return  # only the newest file is left: it stays even over the quota
            self.remove(*victim)
            if self.on_evict is not None:
                self.on_evict(*victim)
