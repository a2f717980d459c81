"""Speed transforms applied to a built model, once, at engine start-up.

They are layer-level rewrites: they walk the model and rewrite the shared layers of `diffserve.layers.linear`
(and compile the blocks a model lists in `REPEATED_BLOCKS`), so a model file holds no optimisation code; a
model gets a fusion by building its projections from those layers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from diffserve.layers.linear import ConcatLinear, GeluLinear, Projections


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated transformer blocks, as the model declares them in `REPEATED_BLOCKS`."""
    names = getattr(type(model), "REPEATED_BLOCKS", None)
    if not names:
        raise ValueError(f"{type(model).__name__} declares no REPEATED_BLOCKS; cannot compile it regionally")
    return [block for name in names for block in getattr(model, name)]


def fuse_projections(model: nn.Module) -> int:
    """Every `Projections` module's declared groups of Linear layers reading one input become one Linear
    (one GEMM). Returns the number of groups fused."""
    return sum(m.fuse_projections() for m in list(model.modules()) if isinstance(m, Projections))


def fuse_epilogues(model: nn.Module) -> int:
    """Every tanh `GeluLinear` runs its GELU in the GEMM epilogue, and every `ConcatLinear` is split into one
    GEMM per input (the concatenation is never written). Returns the number of layers rewritten."""
    count = 0
    for m in list(model.modules()):
        if isinstance(m, GeluLinear) and m.approximate == "tanh":
            m.epilogue = True
            count += 1
        elif isinstance(m, ConcatLinear):
            m.split()
            count += 1
    return count


def fuse_kernels(model: nn.Module) -> None:
    """The lossless kernel fusions, in place: `fuse_projections` then `fuse_epilogues`. The function is
    unchanged; bf16 outputs differ by rounding."""
    fuse_projections(model)
    fuse_epilogues(model)


def compile_cache_dir() -> Path:
    """Where inductor keeps compiled kernels across runs: $TORCHINDUCTOR_CACHE_DIR when set, else
    diffserve's own cache folder ($XDG_CACHE_HOME or ~/.cache, then diffserve/inductor) instead of inductor's
    default under /tmp, which does not survive a reboot. Sets the variable for this process (inductor itself
    writes its default there once imported, so that value counts as unset)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not current or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "diffserve" / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_blocks(model: nn.Module, mode: str | None = None) -> int:
    """Regional torch.compile: compile each repeated block in place (one graph is shared by all blocks of a
    class, so compile time does not grow with depth). Returns the number of blocks compiled. Compilation
    happens on the first call; its kernels are cached on disk (:func:`compile_cache_dir`, inductor's FX
    graph cache), so later runs and processes start faster."""
    compile_cache_dir()
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
