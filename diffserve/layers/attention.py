"""The one attention seam.

Every DiT calls an `AttentionOp` with q, k, v laid out (B, L, H, D) and gets (B, L, H, D) back.
Which kernel runs (torch SDPA and its cuDNN / flash / memory-efficient variants, FlashAttention 3 when
installed) is decided once when the engine starts, and a parallel wrapper (Ulysses, Ring) can be put
in front of the local kernel. A model file never imports a kernel library.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Protocol

import torch
import torch.nn.functional as F

# (B, L, H, D) x3 -> (B, L, H, D)
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

BACKENDS = ("sdpa", "cudnn", "flash", "efficient", "math", "fa3")


class ParallelAttention(Protocol):
    """A wrapper that distributes attention over ranks and calls `local` on each rank's share."""

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local: AttentionFn
    ) -> torch.Tensor: ...


def _sdpa_kernel_context(backend: str):
    if backend == "sdpa":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend]
    return sdpa_kernel([kind])


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Scaled dot-product attention, (B, L, H, D) in and out, through torch SDPA."""
    with _sdpa_kernel_context(backend):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import flash_attn_interface  # FlashAttention 3 (Hopper); optional

    out = flash_attn_interface.flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out


def fa3_available() -> bool:
    """Whether FlashAttention 3's `flash_attn_interface.flash_attn_func` imports. (A package of that name
    on PyPI, flash-attn-interface 0.0.1, is an empty placeholder: having the module is not enough.)"""
    try:
        import flash_attn_interface
    except ImportError:
        return False
    return callable(getattr(flash_attn_interface, "flash_attn_func", None))


def default_backend(device: torch.device) -> str:
    """The fastest backend known to be right on `device` (cuDNN SDPA on Hopper; FA3 when installed)."""
    if device.type != "cuda":
        return "sdpa"
    if fa3_available() and torch.cuda.get_device_capability(device)[0] == 9:
        return "fa3"
    if torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(device)[0] >= 9:
        return "cudnn"
    return "sdpa"


def fused_kernel_fits(backend: str, q: torch.Tensor) -> bool:
    """Whether the half-precision fused kernels (cuDNN, flash, FA3) take these inputs; otherwise the
    caller falls back to torch's own SDPA choice (fp32 runs, odd head sizes, CPU tensors)."""
    if backend in ("sdpa", "math", "efficient"):
        return True
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= (128 if backend == "cudnn" else 256))


class AttentionOp:
    """Callable attention shared by all blocks of one model.

    One instance per model; `configure` changes the kernel or installs a parallel wrapper for every
    block at once (it is called by engine-level transforms, never by model code).
    """

    def __init__(self, backend: str = "sdpa") -> None:
        self.backend = "sdpa"
        self.parallel: ParallelAttention | None = None
        self.configure(backend=backend)

    def configure(self, backend: str | None = None, parallel: ParallelAttention | None = None) -> None:
        if backend is not None:
            if backend not in BACKENDS:
                raise ValueError(f"unknown attention backend {backend!r}; accepted: {', '.join(BACKENDS)}")
            if backend == "fa3" and not fa3_available():
                raise ValueError("attention backend 'fa3' needs the flash_attn_interface package (FlashAttention 3)")
            self.backend = backend
        if parallel is not None:
            self.parallel = parallel

    def local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention on this rank's tensors only. (B, L, H, D) -> (B, L, H, D)."""
        backend = self.backend if fused_kernel_fits(self.backend, q) else "sdpa"
        if backend == "fa3":
            return _fa3_attention(q, k, v)
        return sdpa_attention(q, k, v, backend)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.parallel is not None:
            return self.parallel(q, k, v, self.local)
        return self.local(q, k, v)
