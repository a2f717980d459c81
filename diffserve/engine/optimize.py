"""Speed transforms applied to a built model, once, at engine start-up (model files stay free of them)."""

from __future__ import annotations

import time

import torch
from torch import nn


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated transformer blocks, as the model declares them in `REPEATED_BLOCKS`."""
    names = getattr(type(model), "REPEATED_BLOCKS", None)
    if not names:
        raise ValueError(f"{type(model).__name__} declares no REPEATED_BLOCKS; cannot compile it regionally")
    return [block for name in names for block in getattr(model, name)]


def compile_blocks(model: nn.Module, mode: str | None = None) -> int:
    """Regional torch.compile: compile each repeated block in place (one graph is shared by all blocks of a
    class, so compile time does not grow with depth). Returns the number of blocks compiled. Compiled
    kernels are cached on disk by inductor's FX graph cache, so later runs start faster."""
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile(fullgraph=False, dynamic=False, mode=mode)
    return len(blocks)


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    """Run fn and return (result, seconds), synchronising CUDA so the time is the device's."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start
