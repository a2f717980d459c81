"""Rotary position embeddings as pure functions."""

from __future__ import annotations

import torch


def rope_1d(dim: int, pos: torch.Tensor, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (L, dim) for positions (L,), each frequency repeated twice (interleaved pairs).

    Computed in float64 and returned as float32, as the reference does for FLUX.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim))
    angles = torch.outer(pos.to(torch.float32), freqs)  # (L, dim/2), float64
    cos = angles.cos().repeat_interleave(2, dim=1).float()
    sin = angles.sin().repeat_interleave(2, dim=1).float()
    return cos, sin


def rope_nd(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-axis RoPE: ids (L, n_axes) -> cos, sin (L, sum(axes_dim)), axes concatenated."""
    parts = [rope_1d(d, ids[:, i], theta) for i, d in enumerate(axes_dim)]
    return torch.cat([p[0] for p in parts], dim=-1), torch.cat([p[1] for p in parts], dim=-1)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved (real, imag) pairs. x (B, L, H, D); cos/sin (L, D) float32.

    Written as x * cos + swap_pairs(x) * (-sin, +sin, ...): element-wise with a neighbour swap, which
    torch.compile turns into one coalesced pass (the unbind/stack form of the same math compiled to a
    kernel several times slower). Bit-identical to (x0 * cos - x1 * sin, x1 * cos + x0 * sin) per pair."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    signed_sin = torch.stack([-sin[:, 0::2], sin[:, 1::2]], dim=-1).flatten(-2)  # device ops only: no host copy
    cos, sin = cos[None, :, None, :], signed_sin[None, :, None, :]
    return (x * cos + swapped * sin).to(x.dtype)  # bf16 * fp32 tables: computed in fp32, no cast copies
