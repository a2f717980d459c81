"""Where the server's outputs live: ``url`` images and video MP4s, on local disk or in object storage.

`OutputStore` holds what every store does the same way: output names, an index of the stored files (kind,
name -> write time, size; oldest first), the disk quota (when a write takes the total over ``quota_bytes``,
the oldest other files are removed first, their video jobs with them through `on_evict`) and expiry
(`sweep` removes files older than ``ttl_s``). A store implements four primitives: `_scan` (what is stored,
read at start-up so that a restart keeps its outputs), `_put`, `_delete` and `_locate` (where a client gets
a file: a local path the server sends, or a URL it redirects to).

Two stores: `LocalOutputStore` (files under ``--output-dir``, the default) and
`diffserve.server.storage_s3.S3OutputStore` (``--output-storage s3://bucket/prefix``). A store that
cannot write raises `OutputStoreError` (an OSError) with a one-line reason.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from starlette.responses import FileResponse, RedirectResponse, Response

KINDS = ("images", "videos")
NAMES = {"images": re.compile(r"^img_[0-9a-f]{32}\.(png|jpg|webp)$"),
         "videos": re.compile(r"^video_[0-9a-f]{24}\.mp4$")}
_SUFFIX = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "mp4": ".mp4"}
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "mp4": "video/mp4"}

Location = Path | str  # a local file the server sends, or a URL the client is redirected to
Found = tuple[float, str, str, int]  # (write time, kind, name, size) of a stored file


class OutputStoreError(OSError):
    """An output could not be stored (the message says where and why)."""


def media_type(name: str) -> str:
    return MEDIA_TYPES[name.rsplit(".", 1)[1]]


def output_response(location: Location, name: str, filename: str | None = None) -> Response:
    """The answer for a stored output: the file itself, or a 307 redirect to where it can be fetched."""
    if isinstance(location, str):
        return RedirectResponse(location, status_code=307, headers={"Cache-Control": "no-store"})
    return FileResponse(location, media_type=media_type(name), filename=filename)


class OutputStore(ABC):
    """Output files of one server: named, written, located, expired and held under a quota (thread-safe)."""

    def __init__(self, *, ttl_s: float, quota_bytes: int,
                 on_evict: Callable[[str, str], None] | None = None) -> None:
        self.ttl_s = ttl_s
        self.quota_bytes = quota_bytes
        self.on_evict = on_evict  # (kind, name) of a file removed early by the quota
        self._files: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()  # oldest first
        self._total = 0
        self._lock = threading.Lock()

    @abstractmethod
    def describe(self) -> str:
        """Where the outputs go, for logs (a folder, or s3://bucket/prefix)."""

    def check(self) -> None:
        """Fail now (UserError, one line) when the store cannot be used; called once before serving."""

    @abstractmethod
    def _scan(self) -> list[Found]:
        """The output files already stored (any order)."""

    @abstractmethod
    def _put(self, kind: str, name: str, data: bytes) -> None:
        """Store one file whole (OutputStoreError when it cannot be)."""

    @abstractmethod
    def _delete(self, kind: str, name: str) -> None:
        """Delete one file (no error when it is already gone)."""

    @abstractmethod
    def _locate(self, kind: str, name: str, filename: str | None) -> Location | None:
        """Where a client gets a stored file (`filename`: the name it is downloaded as, when one is set)."""

    def open(self) -> None:
        """Index the files already stored (a restart keeps its outputs), oldest first."""
        found = sorted(self._scan())
        with self._lock:
            for mtime, kind, name, size in found:
                if (kind, name) not in self._files:
                    self._files[(kind, name)] = (mtime, size)
                    self._total += size

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

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

    def known(self, kind: str, name: str) -> bool:
        """Whether the output is stored (False for unknown, expired, or a name of another form)."""
        if kind not in NAMES or not NAMES[kind].match(name):
            return False
        with self._lock:
            return (kind, name) in self._files

    def locate(self, kind: str, name: str, filename: str | None = None) -> Location | None:
        """Where a client gets a stored output; None when there is none."""
        return self._locate(kind, name, filename) if self.known(kind, name) else None

    def write(self, kind: str, name: str, data: bytes) -> None:
        """Store one output, then hold the quota by removing the oldest other files."""
        if kind not in NAMES or not NAMES[kind].match(name):
            raise ValueError(f"not an output name: {kind}/{name}")
        self._put(kind, name, data)
        with self._lock:
            old = self._files.pop((kind, name), None)
            self._total += len(data) - (old[1] if old else 0)
            self._files[(kind, name)] = (time.time(), len(data))
        self._hold_quota(keep=(kind, name))

    def remove(self, kind: str, name: str) -> None:
        self._forget(kind, name)
        self._delete(kind, name)

    def _forget(self, kind: str, name: str) -> None:
        with self._lock:
            entry = self._files.pop((kind, name), None)
            if entry is not None:
                self._total -= entry[1]

    def _expired(self, cutoff: float) -> list[tuple[str, str]]:
        """Indexed files written at or before `cutoff` (write order: stops at the first younger one)."""
        expired = []
        with self._lock:
            for key, (mtime, _) in self._files.items():
                if mtime > cutoff:
                    break
                expired.append(key)
        return expired

    def sweep(self, now: float | None = None) -> int:
        """Remove the files older than the TTL; how many were removed."""
        expired = self._expired((time.time() if now is None else now) - self.ttl_s)
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


class LocalOutputStore(OutputStore):
    """Files under ``root/images`` and ``root/videos``, written atomically (a temporary sibling, then a
    rename) and sent by the server itself."""

    def __init__(self, root: Path, *, ttl_s: float, quota_bytes: int,
                 on_evict: Callable[[str, str], None] | None = None) -> None:
        super().__init__(ttl_s=ttl_s, quota_bytes=quota_bytes, on_evict=on_evict)
        self.root = root

    def describe(self) -> str:
        return str(self.root)

    def _scan(self) -> list[Found]:
        found = []
        for kind in KINDS:
            folder = self.root / kind
            folder.mkdir(parents=True, exist_ok=True)
            for entry in os.scandir(folder):
                if entry.is_file() and NAMES[kind].match(entry.name):
                    st = entry.stat()
                    found.append((st.st_mtime, kind, entry.name, st.st_size))
        return found

    def _put(self, kind: str, name: str, data: bytes) -> None:
        path = self.root / kind / name
        tmp = path.with_name(f".{name}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _delete(self, kind: str, name: str) -> None:
        (self.root / kind / name).unlink(missing_ok=True)

    def _locate(self, kind: str, name: str, filename: str | None) -> Location | None:
        return self.path(kind, name)

    def path(self, kind: str, name: str) -> Path | None:
        """The file of a stored output, None when there is none (unknown, expired or a name of another form)."""
        if not self.known(kind, name):
            return None
        path = self.root / kind / name
        return path if path.is_file() else None
