"""LoRA values that travel through configs and requests: which file at which scale (`LoraSpec`), and the
set of named adapters a request asks for (`LoraSet`, hashable so batches can be grouped by it).

Pure Python (no torch), so `diffserve.config` and the server can import it cheaply.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from diffserve.errors import UserError

MAX_ABS_SCALE = 100.0
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class LoraError(UserError):
    """A LoRA that cannot be used: unreadable file, keys that match no layer, mismatched shapes, an unknown
    adapter name in a request."""


def check_scale(scale: object, what: str = "LoRA scale") -> float:
    """A finite number in [-MAX_ABS_SCALE, MAX_ABS_SCALE] as float; LoraError otherwise."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or abs(scale) > MAX_ABS_SCALE:
        raise LoraError(f"{what} must be a number between -{MAX_ABS_SCALE:g} and {MAX_ABS_SCALE:g}, got {scale!r}",
                        param="lora")
    return float(scale)


def check_name(name: object) -> str:
    """An adapter name: letters, digits, '.', '_', '-' (up to 128 characters, not starting with a symbol)."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise LoraError(f"LoRA name {name!r} is not accepted: use letters, digits, '.', '_' or '-' "
                        "(at most 128 characters)", param="lora")
    return name


def default_name(path: str | Path) -> str:
    """The adapter name a file gets when none is given: its file name without `.safetensors` (the folder's
    name for a diffusers LoRA folder or its `pytorch_lora_weights.safetensors`), with characters outside
    [A-Za-z0-9._-] replaced by '_'."""
    p = Path(path)
    stem = p.parent.name if p.name == "pytorch_lora_weights.safetensors" else p.name.removesuffix(".safetensors")
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-")[:128] or "lora"


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file to load at start-up: `path` (a .safetensors file, or a folder holding one), the
    `scale` it is applied with, and the `name` requests use for it."""

    path: str
    scale: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_scale(self.scale))
        object.__setattr__(self, "name", check_name(self.name or default_name(self.path)))

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """`PATH[:SCALE]` (the CLI's --lora-path): a trailing `:number` is the scale, default 1.0."""
        path, sep, tail = text.rpartition(":")
        if sep and path:
            try:
                return cls(path=path, scale=float(tail))
            except ValueError:
                pass
        if not text:
            raise LoraError("--lora-path needs a path (PATH or PATH:SCALE)", param="lora")
        return cls(path=text)

    @classmethod
    def coerce(cls, value: object) -> LoraSpec:
        """A LoraSpec from a LoraSpec, a `PATH[:SCALE]` string or a (path, scale) pair."""
        if isinstance(value, LoraSpec):
            return value
        if isinstance(value, (str, Path)):
            return cls.parse(str(value))
        if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], (str, Path)):
            return cls(path=str(value[0]), scale=check_scale(value[1]))
        raise LoraError(f"a LoRA is given as 'PATH[:SCALE]' or (path, scale), got {value!r}", param="lora")


@dataclass(frozen=True)
class LoraSet:
    """The adapters a request runs with: (name, scale) pairs sorted by name, scales non-zero. Frozen and
    hashable: requests with equal sets may share a batch. The empty set is the base model."""

    items: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        merged: dict[str, float] = {}
        for name, scale in self.items:
            merged[check_name(name)] = merged.get(name, 0.0) + check_scale(scale)
        object.__setattr__(self, "items", tuple(sorted((n, s) for n, s in merged.items() if s != 0.0)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __str__(self) -> str:
        return ",".join(f"{n}:{s:g}" for n, s in self.items) or "(none)"

    @classmethod
    def parse(cls, value: object) -> LoraSet:
        """The request field: a LoraSet, a name, `name:scale`, {"name": ..., "scale": ...}, {name: scale}, or a
        list of those (an empty list: no LoRA). The scale defaults to 1.0."""
        if isinstance(value, LoraSet):
            return value
        if isinstance(value, str) or (isinstance(value, Mapping) and "name" in value):
            return cls((_one_item(value),))
        if isinstance(value, Mapping):
            return cls(tuple((check_name(n), check_scale(s)) for n, s in value.items()))
        if isinstance(value, Iterable) and not isinstance(value, (bytes, bytearray)):
            return cls(tuple(_one_item(v) for v in value))
        raise LoraError(f"lora must be a name, 'name:scale', {{'name', 'scale'}} or a list of those; got {value!r}",
                        param="lora")


def _one_item(value: object) -> tuple[str, float]:
    if isinstance(value, str):
        name, sep, tail = value.rpartition(":")
        if sep:
            try:
                return check_name(name), check_scale(float(tail))
            except ValueError:
                raise LoraError(f"lora {value!r}: the part after ':' must be a number (the scale)",
                                param="lora") from None
        return check_name(value), 1.0
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"name", "scale"})
        if unknown or "name" not in value:
            raise LoraError(f"a lora entry has the keys 'name' and optionally 'scale'; got {sorted(value)}",
                            param="lora")
        return check_name(value["name"]), check_scale(value.get("scale", 1.0))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return check_name(value[0]), check_scale(value[1])
    raise LoraError(f"a lora entry is a name, 'name:scale' or {{'name', 'scale'}}; got {value!r}", param="lora")


def resolve_lora(value: object, loaded: Iterable[str], default: LoraSet, mode: str) -> LoraSet:
    """The set a request's `lora` field asks for (None: `default`, the start-up set), checked against the
    adapter names `loaded` and the mode ("merged": only the default set is possible). The engine's registry
    and a server front that validates without the engine (knowing the names from the worker) share it."""
    wanted = default if value is None else LoraSet.parse(value)
    names = list(loaded)
    unknown = [n for n in wanted.names if n not in names]
    if unknown:
        raise LoraError(f"no LoRA named {unknown[0]!r} is loaded (loaded: {', '.join(names) or 'none'})",
                        param="lora")
    if mode == "merged" and wanted != default:
        raise LoraError(f"this engine merged its LoRAs ({default}) into the weights at start-up; a request "
                        f"cannot choose others (start it with --lora-mode unmerged)", param="lora")
    return wanted
