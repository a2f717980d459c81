"""Building a DiT's frozen config dataclass from a checkpoint's `transformer/config.json`."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], raw: dict[str, Any], tuple_fields: tuple[str, ...] = ()) -> T:
    """`cls(**raw)` for a config dataclass: keys starting with "_" are metadata and skipped, any other
    unknown key is an error (a checkpoint we would misread), and JSON lists in `tuple_fields` become tuples."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
    kw = {k: (tuple(v) if k in tuple_fields and v is not None else v) for k, v in raw.items() if k in known}
    return cls(**kw)


def config_from_json(cls: type[T], path: str | Path, tuple_fields: tuple[str, ...] = ()) -> T:
    return config_from_dict(cls, json.loads(Path(path).read_text()), tuple_fields)
