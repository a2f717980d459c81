"""Test and benchmark helpers: random-weight model repos built from the real model configs.

See :mod:`diffserve.testing.fixtures` (``fixture_path``, ``build_repo``) and
:mod:`diffserve.testing.tiny_tokenizers`. Attributes are imported lazily so that importing this package
stays cheap and ``python -m diffserve.testing.fixtures`` runs without a double import.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FIXTURES", "build_repo", "fixture_path"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import fixtures

        return getattr(fixtures, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
