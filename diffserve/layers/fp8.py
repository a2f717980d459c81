"""FP8 (float8 e4m3) matrix multiplies for the DiT blocks: an opt-in lossy speed mode (`--fp8`).

Weights are quantized once, when the transform runs after loading (and after the lossless fusions), to
float8_e4m3fn with one float32 scale per output row (`granularity="row"`) or one per tensor ("tensor").
Activations are quantized on every call with the same granularity: one scale per token row (or one for the
whole input), from the row's absolute maximum, so the largest value maps to e4m3's 448. The product runs in
`torch._scaled_mm` (Hopper/Ada FP8 tensor cores on CUDA; torch also runs it on the CPU, where it computes the
same dequantized product in float), with the bias added in the kernel and a bf16 output.

What it trades: e4m3 keeps 3 mantissa bits, so each operand carries a relative rounding error of up to 1/16;
a layer's output is off by ~3.7% (relative, Frobenius) on Gaussian operands, measured at 96x80, 3072x3072 and
1536x8960, and a whole tiny FLUX by ~1.3% (`tests/test_fp8.py` states the bounds); in exchange the GEMM runs at
twice the bf16 tensor-core rate and reads half the weight bytes.

Which layers (`fp8_targets`): every linear layer of the repeated transformer blocks (`REPEATED_BLOCKS`: the
attention projections, fused or not, and the MLPs, including `GeluLinear` and the pieces of a split
`ConcatLinear`), except the modulation (adaLN) layers, any layer under a submodule whose name contains
"norm" or ends in "mod" (FLUX/HunyuanVideo `norm1`/`norm1_context`/`norm`, Qwen-Image `img_mod`/`txt_mod`).
Outside the blocks everything stays in the model's dtype: the embedders (a handful of rows, or in_features
of 64: no GEMM worth speeding up), the modulation layers (one row per sample, so no compute to save, while
their scale/shift/gate multiply every token of the residual stream: an error there is an error everywhere)
and the final projection (its output is the predicted velocity itself, with nothing after it to absorb the
error, and only 64 output channels). Layers whose widths are not multiples of `min_align` (16: cuBLASLt's
FP8 rule) stay too.

Order: `quantize_fp8` runs after `diffserve.engine.optimize.fuse_kernels` (a fused q/k/v projection is then
one FP8 GEMM with one activation quantization) and after merging LoRAs; it refuses unmerged LoRA adapters.
Nothing may cast the model's dtype afterwards (`model.to(torch.bfloat16)` would cast the FP8 weights too).

FP8 attention (FlashAttention 3's e4m3 kernels, `--fp8 attention`): q, k, v quantized per (sample, head)
with float32 descales; keys are first centred on their mean over the sequence (softmax is unchanged by a
shift shared by all keys, and the shared component no longer eats e4m3's range); the log-sum-exp, when asked
for, is corrected back by the shift. The math is here (`quantize_heads`, `fp8_attention_reference`); the
kernel call is in `diffserve.layers.attention`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from diffserve.errors import UserError
from diffserve.layers.linear import ConcatLinear, GeluLinear
from diffserve.lora.targets import AdaptedLayer

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
SCALE_FLOOR = 1e-12  # an all-zero row gets this amax, not a division by zero
FP8_MODES = ("off", "linear", "attention", "all")
Granularity = Literal["row", "tensor"]


# ----------------------------------------------------------------------------------------------------------
# The math (pure functions)


def scale_of(amax: torch.Tensor) -> torch.Tensor:
    """The float32 scale that maps `amax` to e4m3's largest value (x = x8 * scale)."""
    return amax.float().clamp(min=SCALE_FLOOR) / FP8_MAX


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to e4m3 (saturated at +-448). `scale` broadcasts against x."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (x8 (M, K) e4m3, scale (M, 1) float32), one scale per row."""
    scale = scale_of(x.abs().amax(dim=-1, keepdim=True))
    return to_fp8(x, scale), scale


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape) -> (x8 e4m3, scale () float32), one scale for the whole tensor."""
    scale = scale_of(x.abs().amax())
    return to_fp8(x, scale), scale


def quantize(x: torch.Tensor, granularity: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) at `granularity` ("row": scale (M, 1); "tensor": scale ())."""
    if granularity == "row":
        return quantize_rows(x)
    if granularity == "tensor":
        return quantize_tensor(x)
    raise ValueError(f"unknown FP8 granularity {granularity!r}; accepted: row, tensor")


def dequantize(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 x8 * scale."""
    return x8.float() * scale


def scaled_matmul(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype, fast_accum: bool = True) -> torch.Tensor:
    """(x8 * x_scale) @ (w8 * w_scale)^T + bias in `out_dtype`: x8 (M, K), w8 (N, K) e4m3; scales (M, 1) and
    (N,) (rowwise) or () and () (tensorwise). `fast_accum`: Hopper's faster FP8 accumulation (CUDA only)."""
    ws = w_scale.unsqueeze(0) if w_scale.ndim == 1 else w_scale  # rowwise wants (1, N)
    return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=ws, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def fp8_linear_reference(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                         granularity: Granularity) -> torch.Tensor:
    """What `Fp8Linear` computes, through dequantized float32 tensors: x (..., K), w8 (N, K) -> (..., N)
    float32 (the tests' reference for `torch._scaled_mm`)."""
    x8, xs = quantize(x.reshape(-1, x.shape[-1]), granularity)
    ws = w_scale.unsqueeze(1) if w_scale.ndim == 1 else w_scale
    out = dequantize(x8, xs) @ dequantize(w8, ws).t()
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], -1)


# ----------------------------------------------------------------------------------------------------------
# Layers


class Fp8Linear(nn.Module):
    """A Linear whose weight is held in e4m3 with float32 scales, multiplied in FP8 (`torch._scaled_mm`).

    Buffers (the state_dict): `weight` (out, in) float8_e4m3fn, `weight_scale` (out,) float32 ("row") or
    () ("tensor"), `bias` (out,) in `out_dtype` (absent without bias). `activation`: "gelu_tanh" or "gelu"
    applied to the output (a `GeluLinear`'s), else None."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, granularity: Granularity = "row",
                 activation: str | None = None, out_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if granularity not in ("row", "tensor"):
            raise ValueError(f"unknown FP8 granularity {granularity!r}; accepted: row, tensor")
        if activation not in (None, "gelu", "gelu_tanh"):
            raise ValueError(f"unknown activation {activation!r}; accepted: gelu, gelu_tanh or None")
        self.in_features, self.out_features = in_features, out_features
        self.granularity: Granularity = granularity
        self.activation = activation
        self.out_dtype = out_dtype
        self.fast_accum = fast_accum
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8, device=device))
        scale_shape = (out_features,) if granularity == "row" else ()
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=out_dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, granularity: Granularity = "row", activation: str | None = None,
                    fast_accum: bool = True) -> Fp8Linear:
        """Quantize `linear`'s weight (on its device); the output dtype is the weight's."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, granularity=granularity,
                    activation=activation, out_dtype=w.dtype, fast_accum=fast_accum, device=w.device)
        w8, scale = quantize(w.detach(), granularity)
        layer.weight.copy_(w8)
        layer.weight_scale.copy_(scale.reshape(layer.weight_scale.shape))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in `out_dtype`."""
        lead = x.shape[:-1]
        x8, xs = quantize(x.reshape(-1, self.in_features).contiguous(), self.granularity)  # row-major for the GEMM
        out = scaled_matmul(x8, xs, self.weight, self.weight_scale, self.bias, self.out_dtype, self.fast_accum)
        out = out.reshape(*lead, self.out_features)
        if self.activation is not None:
            out = F.gelu(out, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"granularity={self.granularity}, activation={self.activation}")


class Fp8ConcatLinear(Fp8Linear):
    """An unsplit `ConcatLinear` in FP8: the inputs are concatenated, then one FP8 GEMM."""

    def forward(self, *parts: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """parts (..., in_parts[i]) -> (..., out_features)."""
        return super().forward(torch.cat(parts, dim=-1))


# ----------------------------------------------------------------------------------------------------------
# The transform


def is_modulation(path: str) -> bool:
    """Whether a layer at `path` (dotted, inside a block) belongs to a modulation (adaLN) module: a part of
    the path contains "norm" or ends in "mod"."""
    return any("norm" in part or part.endswith("mod") for part in path.split("."))


def _linears(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
    """(path, layer, parent, attribute) for every quantizable layer under `module`: plain nn.Linear,
    GeluLinear and unsplit ConcatLinear (a split one's pieces are plain Linears)."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if type(child) in (nn.Linear, GeluLinear) or (isinstance(child, ConcatLinear) and child.pieces is None):
            yield path, child, module, name
        elif isinstance(child, Fp8Linear):
            continue
        else:
            if isinstance(child, AdaptedLayer):
                raise ValueError(f"FP8 cannot quantize {path}: it holds unmerged LoRA adapters (use lora_mode "
                                 "'merged' with FP8)")
            yield from _linears(child, path)


def _widths(layer: nn.Module) -> tuple[int, int]:
    w = layer.weight
    return w.shape[1], w.shape[0]


def fp8_targets(model: nn.Module, min_align: int = 16) -> list[str]:
    """Qualified names of the layers `quantize_fp8` replaces (see the module docstring for the rule)."""
    return [name for name, *_ in _block_targets(model, min_align)]


def _block_targets(model: nn.Module, min_align: int) -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
    from diffserve.engine.optimize import repeated_blocks

    names = {id(block): f"{group}.{i}" for group in type(model).REPEATED_BLOCKS  # type: ignore[attr-defined]
             for i, block in enumerate(getattr(model, group))}
    for block in repeated_blocks(model):
        for path, layer, parent, attr in _linears(block):
            k, n = _widths(layer)
            if not is_modulation(path) and k % min_align == 0 and n % min_align == 0:
                yield f"{names[id(block)]}.{path}", layer, parent, attr


@torch.no_grad()
def quantize_fp8(model: nn.Module, granularity: Granularity = "row", fast_accum: bool = True,
                 min_align: int = 16) -> int:
    """Replace the blocks' big linear layers (`fp8_targets`) by `Fp8Linear`s, in place; returns how many.
    Run it after `fuse_kernels` and LoRA merging, before `compile_blocks`."""
    places = [(parent, attr) for _, _, parent, attr in _block_targets(model, min_align)]
    for parent, attr in places:  # one layer at a time: its bf16 weight is freed as its FP8 copy goes in
        layer = getattr(parent, attr)
        if isinstance(layer, ConcatLinear):
            q = Fp8ConcatLinear(*_widths(layer), bias=layer.bias is not None, granularity=granularity,
                                out_dtype=layer.weight.dtype, fast_accum=fast_accum, device=layer.weight.device)
            w8, scale = quantize(layer.weight, granularity)
            q.weight.copy_(w8)
            q.weight_scale.copy_(scale.reshape(q.weight_scale.shape))
            if layer.bias is not None:
                q.bias.copy_(layer.bias)
        else:
            act = None
            if isinstance(layer, GeluLinear):
                act = "gelu_tanh" if layer.approximate == "tanh" else "gelu"
            q = Fp8Linear.from_linear(layer, granularity, act, fast_accum)
        setattr(parent, attr, q)
        del layer
    return len(places)


# ----------------------------------------------------------------------------------------------------------
# Device check


def fp8_supported(device: torch.device) -> bool:
    """Whether `device` has FP8 tensor cores (CUDA compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_fp8(mode: str, device: torch.device, dtype: torch.dtype, backend: str | None = None,
              lora_mode: str = "merged", dit_offload: float = 0.0) -> None:
    """One-line UserError unless `mode` is off, or the engine runs in bf16 on a GPU with FP8 (and, for FP8
    attention, on the 'fa3' backend; LoRAs merged, not unmerged adapters; FP8 weights not streamed from host
    memory: `dit_offload` is the share of blocks --dit-cpu-offload streams)."""
    if mode not in FP8_MODES:
        raise UserError(f"unknown fp8 mode {mode!r}; accepted: {', '.join(FP8_MODES)}", param="fp8")
    if mode == "off":
        return
    device = torch.device(device)
    if device.type != "cuda":
        raise UserError(f"--fp8 {mode} needs a CUDA GPU with FP8 (compute capability 8.9+: Ada, Hopper); the "
                        f"device is {device}", param="fp8")
    if not fp8_supported(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(f"--fp8 {mode} needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper); "
                        f"{torch.cuda.get_device_name(device)} is {major}.{minor}", param="fp8")
    if dtype != torch.bfloat16:
        raise UserError(f"--fp8 {mode} runs with bf16 activations; use --dtype bf16 (got {dtype})", param="fp8")
    if mode in ("attention", "all") and backend is not None and backend != "fa3":
        raise UserError(f"--fp8 {mode} runs attention on FlashAttention 3's FP8 kernels: it needs "
                        f"--attention-backend fa3 (Hopper, pip install \"diffserve[fa3]\"), not {backend}; or "
                        "use --fp8 linear", param="fp8")
    if mode in ("linear", "all") and dit_offload:
        raise UserError(f"--fp8 {mode} does not combine with --dit-cpu-offload (the blocks' FP8 weights are not "
                        "streamed from host memory); FP8 halves the blocks' weight memory instead: drop one of "
                        "them (--fp8 attention does combine)", param="fp8")
    if lora_mode == "unmerged":
        raise UserError(f"--fp8 {mode} quantizes the weights at load: unmerged LoRA adapters cannot ride on them; "
                        "use --lora-mode merged", param="fp8")


# ----------------------------------------------------------------------------------------------------------
# FP8 attention math


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, L, H, D) -> (x8 (B, L, H, D) e4m3, descale (B, H) float32), one scale per (sample, head):
    FlashAttention 3's q/k/v_descale layout."""
    scale = scale_of(x.abs().amax(dim=(1, 3)))  # (B, H)
    return to_fp8(x, scale[:, None, :, None]), scale


def smooth_keys(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k (B, Lk, H, D) -> (k - mean, mean (B, 1, H, D)): the keys centred over the sequence. Softmax over
    keys is unchanged (every score of a query moves by the same q . mean); the log-sum-exp moves by that."""
    kf = k.to(torch.promote_types(k.dtype, torch.float32))
    mean = kf.mean(dim=1, keepdim=True)
    return (kf - mean).to(k.dtype), mean


def lse_shift(q: torch.Tensor, k_mean: torch.Tensor, softmax_scale: float | None = None) -> torch.Tensor:
    """The log-sum-exp that centring the keys took away: softmax_scale * q . mean, q (B, Lq, H, D),
    k_mean (B, 1, H, D) -> (B, H, Lq) float32."""
    s = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return s * torch.einsum("blhd,bhd->bhl", q.float(), k_mean[:, 0].float())


def fp8_attention_reference(q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 attention path's math through dequantized float32 tensors: keys centred, q/k/v quantized
    per (sample, head), exact softmax; returns out (B, Lq, H, D) in q's dtype and the (corrected) lse
    (B, H, Lq) float32. The tests' reference; FA3 computes the same from the e4m3 tensors."""
    ks, mean = smooth_keys(k)
    (q8, qd), (k8, kd), (v8, vd) = quantize_heads(q), quantize_heads(ks), quantize_heads(v)
    qf, kf, vf = (dequantize(t8, d[:, None, :, None]) for t8, d in ((q8, qd), (k8, kd), (v8, vd)))
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Lq)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse.unsqueeze(-1)), vf)
    return out.to(q.dtype), lse + lse_shift(q, mean)
