"""flash-attn-4 (CuTe DSL, `flash_attn.cute`) against FlashAttention 3 (fa3-fwd) and cuDNN SDPA on one Hopper GPU,
at the self-attention shapes of the models diffserve serves (bf16, one sample, head dim 128): median time with
CUDA events, TFLOP/s, and the largest difference from cuDNN's output (and, for the smaller shapes, each
kernel's relative error against a float32 reference). FA4 also with its log-sum-exp returned (what Ring
attention needs). Run by benchmarks/gpu/fa4_check.sh; prints one JSON line per shape, then a table.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch

from benchmarks.gpu.fa3_check import fp32_reference, max_abs, median_ms, randn, rel_err
from diffserve.layers.attention import fa3_attention, sdpa_attention

# (name, tokens, heads): B = 1, head dim 128
SHAPES = [("FLUX.1 1024^2", 4608, 24), ("Qwen-Image 1328^2", 6929, 24), ("Wan2.1-1.3B 480p", 32760, 12),
          ("Wan2.1-14B 720p", 75600, 40), ("HunyuanVideo 720p x 129", 118840, 24)]
FP32_REFERENCE_UP_TO = 40000  # tokens: the float32 reference is slow beyond


def fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool = False) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v, return_lse=lse)
    return out[0] if isinstance(out, tuple) else out


def measure(name: str, seq: int, heads: int) -> dict[str, object]:
    q, k, v = (randn(1, seq, heads, 128) for _ in range(3))
    flops = 4.0 * heads * seq * seq * 128
    row: dict[str, object] = {"shape": name, "tokens": seq, "heads": heads}
    cudnn = sdpa_attention(q, k, v, "cudnn")
    row["cudnn_ms"] = median_ms(partial(sdpa_attention, q, k, v, "cudnn"))
    row["fa3_ms"] = median_ms(partial(fa3_attention, q, k, v))
    row["max_abs_fa3_vs_cudnn"] = max_abs(fa3_attention(q, k, v), cudnn)
    try:
        t0 = time.perf_counter()
        out4 = fa4(q, k, v)
        torch.cuda.synchronize()
        row["fa4_first_call_s"] = round(time.perf_counter() - t0, 1)  # includes the JIT compile
        row["fa4_ms"] = median_ms(partial(fa4, q, k, v))
        row["fa4_lse_ms"] = median_ms(partial(fa4, q, k, v, lse=True))
        row["max_abs_fa4_vs_cudnn"] = max_abs(out4, cudnn)
        if seq <= FP32_REFERENCE_UP_TO:
            ref = fp32_reference(q, k, v)
            row.update(rel_fa4_vs_fp32=rel_err(out4, ref), rel_fa3_vs_fp32=rel_err(fa3_attention(q, k, v), ref),
                       rel_cudnn_vs_fp32=rel_err(cudnn, ref))
    except (RuntimeError, ValueError, AssertionError, ImportError, TypeError) as e:  # reported, next shape
        row["fa4_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    for kernel in ("cudnn", "fa3", "fa4"):
        if f"{kernel}_ms" in row:
            row[f"{kernel}_tflops"] = round(flops / float(row[f"{kernel}_ms"]) / 1e9, 1)  # type: ignore[arg-type]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for name, seq, heads in SHAPES:
        row = measure(name, seq, heads)
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print("| shape | tokens x heads | cuDNN ms | FA3 ms | FA4 ms (with LSE) | FA4 vs FA3 | TFLOP/s cuDNN / FA3 / FA4 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        fa3_ms, cudnn_ms = float(r["fa3_ms"]), float(r["cudnn_ms"])  # type: ignore[arg-type]
        if "fa4_ms" in r:
            fa4_ms, lse_ms = float(r["fa4_ms"]), float(r["fa4_lse_ms"])  # type: ignore[arg-type]
            fa4_cell, ratio = f"{fa4_ms:.3f} ({lse_ms:.3f})", f"{fa3_ms / fa4_ms:.3f}x"
        else:
            fa4_cell, ratio = "-", str(r.get("fa4_error"))
        tflops = f"{r.get('cudnn_tflops')} / {r.get('fa3_tflops')} / {r.get('fa4_tflops', '-')}"
        print(f"| {r['shape']} | {r['tokens']} x {r['heads']} | {cudnn_ms:.3f} | {fa3_ms:.3f} | {fa4_cell} | {ratio} | "
              f"{tflops} |")

if __name__ == "__main__":
    main()
