"""FP8 and SageAttention micro-benchmarks on one Hopper GPU (issue 15 items 3b/3c): speed and error in one run.

1. Linear layers at FLUX.1 1024^2 (4096 image + 512 text tokens, width 3072) and Wan2.1-1.3B 480p (32,760
   tokens, width 1536) shapes: bf16 `F.linear` against `torch._scaled_mm` rowwise (fast accumulation on and
   off) and tensorwise on pre-quantized inputs (the GEMM alone), diffserve's `Fp8Linear` under torch.compile
   (activation quantization fused in, the layer as the engine runs it, rowwise and tensorwise), and torchao's
   float8 dynamic-activation PerRow layer under torch.compile when torchao imports. Relative error of each
   against a float32 product of the unquantized operands.
2. Attention at the FLUX and Wan self-attention shapes: cuDNN SDPA, FA3 bf16, FA3 FP8 (the kernel on
   pre-quantized inputs, and diffserve's whole FP8 path compiled: key centring + quantization + kernel),
   SageAttention (the package's own call, and diffserve's backend compiled). Relative error against FA3 bf16
   (itself within bf16 rounding of float32; see fa3_check.py). Inputs: q, k, v ~ N(0, 1) with a shared
   per-head offset N(0, 1) added to the keys (DiT keys carry one; it is what key centring is for).

Run by benchmarks/gpu/fp8_run.sh micro; prints a table last and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fa3_check import median_ms

from diffserve.layers.attention import (
    fa3_attention,
    fa3_fp8_attention,
    fa3_fp8_attention_raw,
    load_fa3,
    load_sage,
    sage_attention,
    sdpa_attention,
)
from diffserve.layers.fp8 import (
    Fp8Linear,
    quantize_heads,
    quantize_rows,
    quantize_tensor,
    scaled_matmul,
    smooth_keys,
)

DEV = torch.device("cuda")
# (name, tokens M, in K, out N)
LINEARS = [("FLUX qkv fused", 4608, 3072, 9216), ("FLUX mlp up", 4608, 3072, 12288),
           ("FLUX mlp down", 4608, 12288, 3072), ("Wan1.3B ffn up", 32760, 1536, 8960),
           ("Wan1.3B ffn down", 32760, 8960, 1536)]
# (name, B, L, H, D)
ATTENTION = [("FLUX.1 1024^2", 1, 4608, 24, 128), ("Wan2.1-1.3B 480p", 1, 32760, 12, 128)]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:240]}"


def try_variant(rows: dict, name: str, make: Callable[[], Callable[[], torch.Tensor]], flops: float,
                ref: torch.Tensor | None) -> None:
    """Time `make()`'s function and its error against `ref`; an error entry when it fails."""
    try:
        fn = make()
        out = fn()
        ms = median_ms(fn)
        rows[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1),
                      "rel_err": round(rel_err(out, ref), 5) if ref is not None else None}
    except Exception as e:  # noqa: BLE001 - one failing variant must not cost the others
        rows[name] = {"error": first_line(e)}
    torch.cuda.empty_cache()


def torchao_call(lin: torch.nn.Linear, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """torchao's float8 dynamic-activation PerRow layer of `lin` (quantized in place: use it last), compiled."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    holder = torch.nn.Sequential(lin)
    quantize_(holder, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    compiled = torch.compile(holder, dynamic=False)
    return lambda: compiled(x)


def bench_linear(name: str, m: int, k: int, n: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    lin = torch.nn.Linear(k, n, device=DEV, dtype=torch.bfloat16).requires_grad_(False)
    ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
    flops = 2.0 * m * k * n
    rows: dict = {}
    with torch.no_grad():
        try_variant(rows, "bf16 F.linear", lambda: lambda: F.linear(x, lin.weight, lin.bias), flops, ref)
        x8r, xsr = quantize_rows(x)
        x8t, xst = quantize_tensor(x)
        row = Fp8Linear.from_linear(lin, "row")
        ten = Fp8Linear.from_linear(lin, "tensor")
        for label, fast in (("fp8 rowwise GEMM (fast accum)", True), ("fp8 rowwise GEMM (exact accum)", False)):
            try_variant(rows, label, lambda fast=fast: lambda: scaled_matmul(
                x8r, xsr, row.weight, row.weight_scale, row.bias, torch.bfloat16, fast), flops, ref)
        try_variant(rows, "fp8 tensorwise GEMM", lambda: lambda: scaled_matmul(
            x8t, xst, ten.weight, ten.weight_scale, ten.bias, torch.bfloat16, True), flops, ref)
        row_c, ten_c = torch.compile(row, dynamic=False), torch.compile(ten, dynamic=False)
        try_variant(rows, "Fp8Linear row, compiled", lambda: lambda: row_c(x), flops, ref)
        try_variant(rows, "Fp8Linear tensor, compiled", lambda: lambda: ten_c(x), flops, ref)
        try_variant(rows, "torchao PerRow, compiled (last: quantizes lin)", lambda: torchao_call(lin, x), flops, ref)
    return {"shape": [m, k, n], "rows": rows}


def bench_attention(name: str, b: int, length: int, h: int, d: int) -> dict:
    torch.manual_seed(0)
    q, v = (torch.randn(b, length, h, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    k = torch.randn(b, length, h, d, device=DEV, dtype=torch.bfloat16) + torch.randn(1, 1, h, d, device=DEV,
                                                                                     dtype=torch.bfloat16)
    flops = 4.0 * b * h * length * length * d
    rows: dict = {}
    ref = fa3_attention(q, k, v) if load_fa3() is not None else sdpa_attention(q, k, v, "cudnn")
    ks = smooth_keys(k)[0]
    with torch.no_grad():
        try_variant(rows, "cuDNN SDPA bf16", lambda: lambda: sdpa_attention(q, k, v, "cudnn"), flops, ref)
        if load_fa3() is not None:
            try_variant(rows, "FA3 bf16", lambda: lambda: fa3_attention(q, k, v), flops, ref)
            (q8, qd), (k8, kd), (v8, vd) = quantize_heads(q), quantize_heads(ks), quantize_heads(v)
            try_variant(rows, "FA3 fp8 kernel (pre-quantized)",
                        lambda: lambda: fa3_fp8_attention_raw(q8, k8, v8, qd, kd, vd)[0], flops, ref)
            fp8_c = torch.compile(fa3_fp8_attention, dynamic=False)
            try_variant(rows, "FA3 fp8 path, compiled (centre+quantize+kernel)", lambda: lambda: fp8_c(q, k, v),
                        flops, ref)
        sage = load_sage()
        if sage is not None:
            try_variant(rows, "SageAttention sageattn (centred keys given)", lambda: lambda: sage(
                q, ks, v, tensor_layout="NHD", is_causal=False, smooth_k=False), flops, ref)
            sage_c = torch.compile(sage_attention, dynamic=False)
            try_variant(rows, "sage backend, compiled", lambda: lambda: sage_c(q, k, v), flops, ref)
        else:
            rows["SageAttention"] = {"error": "sageattention does not import"}
    return {"shape": [b, length, h, d], "rows": rows}


def table(report: dict) -> str:
    lines = [f"{report['card']}, torch {report['torch']}"]
    for section in ("linear", "attention"):
        for name, res in report[section].items():
            lines.append(f"{section} {name} {tuple(res['shape'])}")
            for label, r in res["rows"].items():
                if "error" in r:
                    lines.append(f"  {label:48s} FAILED {r['error']}")
                else:
                    err = f"{r['rel_err']:.2e}" if r["rel_err"] is not None else "-"
                    lines.append(f"  {label:48s} {r['ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s  rel err {err}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for knob in ("cache_size_limit", "recompile_limit"):  # one compiled variant per shape and layer kind
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    report: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "capability": list(torch.cuda.get_device_capability()), "linear": {}, "attention": {}}
    try:
        import torchao

        report["torchao"] = torchao.__version__
    except Exception as e:  # noqa: BLE001
        report["torchao"] = f"not available: {first_line(e)}"
    work = [("attention", name, bench_attention, shape) for name, *shape in ATTENTION]
    work += [("linear", name, bench_linear, shape) for name, *shape in LINEARS]
    for section, name, fn, shape in work:  # attention first: its kernels are what a timeout must not cut
        report[section][name] = fn(name, *shape)
        print(section, name, json.dumps(report[section][name]["rows"]), flush=True)
        if args.out:  # after every shape, so a timeout keeps what was measured
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    print(table(report))


if __name__ == "__main__":
    main()
