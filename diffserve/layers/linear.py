"""Shared linear layers that the engine's lossless kernel fusions know how to rewrite.

A DiT gets the fusions by building its projections from these layers; its own file never mentions them.
`diffserve.engine.optimize.fuse_kernels` walks a loaded model and rewrites, in place:

* `Projections` (a base for attention modules): each declared group of Linear layers that read the same
  input (q/k/v of a stream, the k/v of a cross-attention) becomes one Linear of the summed width, one GEMM
  instead of several narrow ones. The module calls `self.project(x, "to_q", "to_k", "to_v")` either way.
* `GeluLinear`: Linear + GELU; with the epilogue on, a tanh GELU runs inside the GEMM
  (`diffserve.layers.fused.linear_gelu_tanh`), so the pre-activation is never written to memory.
* `ConcatLinear`: a Linear over the concatenation of several inputs (FLUX's single-block [attention, MLP]
  output projection); split, it adds one GEMM per input instead of writing the concatenation first.

All three keep the checkpoint's parameter names until rewritten (rewrites happen after loading). The
function computed is unchanged; in bf16 results differ by rounding only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffserve.layers.fused import concat_linears, linear_gelu_tanh


class Projections(nn.Module):
    """Base of modules owning Linear layers that read one input. `groups` names the sets that may be
    fused (each used together through `project`)."""

    def __init__(self, groups: Sequence[Sequence[str]] = ()) -> None:
        super().__init__()
        self.projection_groups: tuple[tuple[str, ...], ...] = tuple(tuple(g) for g in groups)
        self.fused = nn.ModuleDict()  # "+".join(group) -> concatenated Linear (empty until fused)
        self.fused_sizes: dict[str, tuple[int, ...]] = {}

    def project(self, x: torch.Tensor, *names: str) -> tuple[torch.Tensor, ...]:
        """The outputs of the named Linear layers on x (B, L, C_in), in the order named."""
        key = "+".join(names)
        if key in self.fused:
            return self.fused[key](x).split(self.fused_sizes[key], dim=-1)
        return tuple(getattr(self, n)(x) for n in names)

    @torch.no_grad()
    def fuse_projections(self) -> int:
        """Concatenate every declared group into one Linear (the originals are removed). Returns the number
        of groups fused."""
        done = 0
        for group in self.projection_groups:
            key = "+".join(group)
            parts = [getattr(self, n) for n in group]
            if key in self.fused or not all(isinstance(p, nn.Linear) for p in parts):
                continue
            if len({p.bias is None for p in parts}) != 1:
                continue
            self.fused[key] = concat_linears(*parts)
            self.fused_sizes[key] = tuple(p.out_features for p in parts)
            for n in group:
                delattr(self, n)
            done += 1
        return done


class GeluLinear(nn.Linear):
    """Linear followed by GELU (`approximate` "tanh" or "none"). `epilogue` (set by the engine's fusion)
    runs a tanh GELU inside the GEMM."""

    def __init__(self, in_features: int, out_features: int, approximate: str = "tanh", bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.approximate = approximate
        self.epilogue = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.epilogue and self.approximate == "tanh" and self.bias is not None:
            return linear_gelu_tanh(x, self.weight, self.bias)
        return F.gelu(F.linear(x, self.weight, self.bias), approximate=self.approximate)


class ConcatLinear(nn.Module):
    """Linear over the concatenation of inputs of widths `in_parts` (parameters `weight` (out, sum in_parts)
    and `bias`, as the checkpoint names them). `split` replaces it by one Linear per input, summed."""

    def __init__(self, in_parts: Sequence[int], out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_parts = tuple(in_parts)
        self.weight = nn.Parameter(torch.empty(out_features, sum(self.in_parts)))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.pieces: nn.ModuleList | None = None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, *parts: torch.Tensor) -> torch.Tensor:
        """parts (..., in_parts[i]) -> (..., out_features)."""
        if self.pieces is None:
            return F.linear(torch.cat(parts, dim=-1), self.weight, self.bias)
        out = self.pieces[0](parts[0])
        for piece, x in zip(self.pieces[1:], parts[1:], strict=True):
            out = out + piece(x)
        return out

    @torch.no_grad()
    def split(self) -> None:
        """One Linear per input column block (the first keeps the bias); the joined weight is removed."""
        if self.pieces is not None:
            return
        w, b = self.weight, self.bias
        pieces, start = [], 0
        for i, width in enumerate(self.in_parts):
            piece = nn.Linear(width, w.shape[0], bias=(i == 0 and b is not None), device=w.device, dtype=w.dtype)
            piece.weight.copy_(w[:, start:start + width])
            if piece.bias is not None:
                piece.bias.copy_(b)
            pieces.append(piece.requires_grad_(False))
            start += width
        self.pieces = nn.ModuleList(pieces)
        del self.weight
        del self.bias
