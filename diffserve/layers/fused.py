"""Fusions for the hot path: GEMM epilogues as torch custom ops (opaque to torch.compile, so inductor calls
them as one kernel instead of splitting the GEMM from its activation), and concatenated projections.

`linear_gelu_tanh(x, w, b)` = gelu_tanh(x @ w.T + b). On CUDA it is one cuBLASLt GEMM whose epilogue adds
the bias and applies GELU (cuBLASLt's GELU epilogue is the tanh approximation) before the result is
rounded to the output dtype: the (tokens x hidden) pre-activation is never written to memory and read
back. Elsewhere it is the same math in three ops. Same function as `F.gelu(F.linear(x, w, b),
approximate="tanh")`; in bf16 the fused result differs only by one rounding fewer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula


@torch.library.custom_op("diffserve::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (..., K), weight (N, K), bias (N,) -> (..., N)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.is_cuda and x2.shape[0] > 1 and x2.shape[1] > 1 and weight.shape[0] > 1:
        y = torch._addmm_activation(bias, x2, weight.t(), use_gelu=True)
    else:  # CPU (whose _addmm_activation applies the exact erf GELU) and degenerate shapes
        y = F.gelu(F.linear(x2, weight, bias), approximate="tanh")
    return y.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@register_flop_formula(torch.ops.diffserve.linear_gelu_tanh)
def _linear_gelu_tanh_flops(x_shape, w_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """The GEMM's FLOPs (as torch's counter counts a linear), so benchmarks count fused models right."""
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return 2 * rows * w_shape[1] * w_shape[0]


@torch.no_grad()
def concat_linears(*parts: nn.Linear) -> nn.Linear:
    """One Linear computing the concatenation of `parts`' outputs (all read the same input): one GEMM
    instead of several narrower ones."""
    w = torch.cat([p.weight for p in parts], dim=0)
    fused = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
    fused.weight.copy_(w)
    fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused.requires_grad_(False)
