"""FlashAttention 3 behind diffserve's attention seam, on one Hopper GPU: correctness and speed in one run.

1. What the installed FA3 takes (head sizes, dtypes), against what the seam's `fused_kernel_fits` sends it.
2. FA3 against cuDNN SDPA at the models' self-attention shapes (bf16): max abs difference, relative error
   of each against a float32 reference, median time with CUDA events, TFLOP/s.
3. FA3's log-sum-exp against a float32 reference (small shape).
4. Ring attention's merge of two key blocks with the fa3 log-sum-exp kernel, against one-block attention.
5. torch.compile(fullgraph=True) of a small function calling the seam with the fa3 backend (graph breaks,
   output against eager).
6. A key mask with two different prefix lengths against each sample run alone.

Run by benchmarks/gpu/fa3_check.sh; prints a short table last and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial

import torch
import torch.nn.functional as F

from diffserve.layers.attention import (
    AttentionOp,
    KeySelection,
    default_backend,
    fa3_attention,
    fa3_attention_lse,
    fused_kernel_fits,
    load_fa3,
    sdpa_attention,
)
from diffserve.layers.parallel import attend_block, math_attention_lse, sdpa_attention_lse

DEV = torch.device("cuda")
# (name, B, Lq = Lk, H, D): self-attention of one sample
SHAPES = [("FLUX.1 1024^2", 1, 4608, 24, 128), ("Wan2.1-1.3B 480p", 1, 32760, 12, 128),
          ("Qwen-Image 1328^2 joint", 1, 6889 + 40, 24, 128)]


def randn(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, device=DEV, dtype=dtype)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:300]


def max_abs(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x.float() - y.float()).abs().max().item()


def fp32_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float32 attention (torch's memory-efficient kernel on upcast inputs), (B, L, H, D)."""
    return sdpa_attention(q.float(), k.float(), v.float(), "efficient")


def median_ms(fn, target_ms: float = 5.0, samples: int = 15) -> float:
    """Median milliseconds per call: samples of several back-to-back calls, each between CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    reps = max(1, int(target_ms / max(start.elapsed_time(end), 1e-3)))
    times = []
    for _ in range(samples):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def support_matrix() -> list[dict]:
    """Which inputs FA3 runs (and how close to float32), next to the seam's decision to send them."""
    rows = []
    cases = [(torch.bfloat16, d) for d in (64, 80, 96, 128, 192, 256, 260)] + [(torch.float16, 128),
                                                                             (torch.float32, 128)]
    for dtype, d in cases:
        q, k, v = (randn(2, 300, 4, d, dtype=dtype) for _ in range(3))
        row = {"dtype": str(dtype).removeprefix("torch."), "head_dim": d, "seam_sends": fused_kernel_fits("fa3", q)}
        try:
            out = fa3_attention(q, k, v)
            torch.cuda.synchronize()
        except RuntimeError as e:
            row.update(runs=False, error=first_line(e))
        else:
            row.update(runs=True, rel_err_vs_fp32=rel_err(out, math_attention_lse(q, k, v)[0].float()))
        rows.append(row)
    return rows


def shapes_check() -> list[dict]:
    rows = []
    for name, b, seq, h, d in SHAPES:
        q, k, v = (randn(b, seq, h, d) for _ in range(3))
        fa3 = fa3_attention(q, k, v)
        cudnn = sdpa_attention(q, k, v, "cudnn")
        ref = fp32_reference(q, k, v)
        flops = 4.0 * b * h * seq * seq * d
        seam = AttentionOp("fa3")
        t_fa3 = median_ms(partial(fa3_attention, q, k, v))
        t_cudnn = median_ms(partial(sdpa_attention, q, k, v, "cudnn"))
        t_seam = median_ms(partial(seam, q, k, v))
        rows.append({"shape": name, "b_l_h_d": [b, seq, h, d], "max_abs_fa3_vs_cudnn": max_abs(fa3, cudnn),
                     "rel_fa3_vs_cudnn": rel_err(fa3, cudnn), "rel_fa3_vs_fp32": rel_err(fa3, ref),
                     "rel_cudnn_vs_fp32": rel_err(cudnn, ref), "fa3_ms": t_fa3, "cudnn_ms": t_cudnn,
                     "seam_fa3_ms": t_seam, "fa3_tflops": flops / t_fa3 / 1e9, "cudnn_tflops": flops / t_cudnn / 1e9,
                     "speedup_vs_cudnn": t_cudnn / t_fa3})
        del q, k, v, fa3, cudnn, ref
        torch.cuda.empty_cache()
    return rows


def lse_check() -> dict:
    q, k, v = randn(2, 333, 4, 128), randn(2, 517, 4, 128), randn(2, 517, 4, 128)
    out, lse = fa3_attention_lse(q, k, v)
    ref_out, ref_lse = math_attention_lse(q, k, v)  # float32 math
    return {"lse_shape": list(lse.shape), "lse_dtype": str(lse.dtype), "max_abs_lse_vs_fp32": max_abs(lse, ref_lse),
            "rel_out_vs_fp32": rel_err(out, ref_out)}


def ring_check(seq: int = 4608, cut: int = 2500) -> dict:
    """Two K/V blocks (keys [0, cut) and [cut, seq)) merged by Ring's `attend_block` with the kernel
    engine/ranks.py builds for 'fa3', against FA3 over all keys at once."""
    q, k, v = randn(1, seq, 24, 128), randn(1, seq, 24, 128), randn(1, seq, 24, 128)
    kernel = partial(sdpa_attention_lse, backend="fa3")
    acc = attend_block(None, q, k[:, :cut], v[:, :cut], KeySelection.every_key(cut), kernel)
    acc = attend_block(acc, q, k[:, cut:], v[:, cut:], KeySelection.every_key(seq - cut), kernel)
    assert acc is not None
    one_out, one_lse = fa3_attention_lse(q, k, v)
    ref = fp32_reference(q, k, v)
    merged = acc[0].to(q.dtype)
    return {"max_abs_merged_vs_one_block": max_abs(merged, one_out), "rel_merged_vs_one_block": rel_err(merged, one_out),
            "max_abs_lse_merged_vs_one_block": max_abs(acc[1], one_lse), "rel_merged_vs_fp32": rel_err(merged, ref),
            "rel_one_block_vs_fp32": rel_err(one_out, ref)}


class TinyAttentionBlock(torch.nn.Module):
    """Projections around the seam, as a DiT block calls it."""

    def __init__(self, attn: AttentionOp, dim: int = 1024, heads: int = 8) -> None:
        super().__init__()
        self.attn, self.heads = attn, heads
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(F.layer_norm(x, x.shape[-1:])).unflatten(-1, (3, self.heads, -1)).unbind(2)
        return x + self.out(self.attn(q, k, v).flatten(2))


def compile_check() -> dict:
    torch.manual_seed(0)
    block = TinyAttentionBlock(AttentionOp("fa3")).to(DEV, torch.bfloat16).eval()
    x = randn(2, 2048, 1024)
    with torch.no_grad():
        explained = torch._dynamo.explain(block)(x)
        torch._dynamo.reset()
        eager = block(x)
        compiled_fn = torch.compile(block, fullgraph=True)
        compiled = compiled_fn(x)
        t_eager, t_compiled = median_ms(lambda: block(x)), median_ms(lambda: compiled_fn(x))
    return {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
            "op_in_graph": any("diffserve.fa3_attention" in g.code for g in explained.graphs),
            "rel_compiled_vs_eager": rel_err(compiled, eager), "eager_ms": t_eager, "compiled_ms": t_compiled}


def mask_check() -> dict:
    seam = AttentionOp("fa3")
    lengths = (1200, 700)
    q, k, v = randn(2, 1024, 24, 128), randn(2, 1536, 24, 128), randn(2, 1536, 24, 128)
    mask = torch.arange(1536, device=DEV) < torch.tensor(lengths, device=DEV)[:, None]
    out = seam(q, k, v, kv_mask=mask)
    diffs = []
    for b, n in enumerate(lengths):
        alone = seam(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n])
        diffs.append(max_abs(out[b:b + 1], alone))
    ref = torch.cat([fp32_reference(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n]) for b, n in enumerate(lengths)])
    return {"prefix_lengths": list(lengths), "max_abs_vs_each_alone": max(diffs), "rel_vs_fp32": rel_err(out, ref)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fa3_check.json")
    args = parser.parse_args()
    fa3 = load_fa3()
    if fa3 is None:
        raise SystemExit("FlashAttention 3 does not import")
    report: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "fa3_module": fa3.module,
                    "fa3_lse_flag": fa3.lse_flag, "default_backend": default_backend(DEV)}
    # the probe of unsupported inputs last: a kernel failing badly there cannot spoil the other checks
    steps = [("lse", lse_check), ("ring", ring_check), ("mask", mask_check), ("compile", compile_check),
             ("shapes", shapes_check), ("support", support_matrix)]
    for key, step in steps:
        try:
            report[key] = step()
        except (RuntimeError, ValueError, TypeError, AssertionError, ImportError) as e:  # report every check
            report[key] = {"error": f"{type(e).__name__}: {first_line(e)}"}
        print(key, json.dumps(report[key]), flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print_table(report)


def print_table(r: dict) -> None:
    print(f"\ncard {r['card']}, torch {r['torch']}, FA3 module {r['fa3_module']}, default backend "
          f"{r['default_backend']}")
    if isinstance(r.get("support"), list):
        print("support (dtype/D: seam sends, runs, rel err vs fp32): " + "; ".join(
            f"{s['dtype']}/{s['head_dim']}: {'y' if s['seam_sends'] else 'n'} {'y' if s['runs'] else 'n'}"
            + (f" {s['rel_err_vs_fp32']:.1e}" if s["runs"] else "") for s in r["support"]))
    print("| shape | FA3 ms | seam ms | cuDNN ms | FA3 TFLOP/s | cuDNN TFLOP/s | speedup | max abs FA3-cuDNN | "
          "rel FA3/fp32 | rel cuDNN/fp32 |")
    for s in r["shapes"] if isinstance(r.get("shapes"), list) else []:
        print(f"| {s['shape']} {tuple(s['b_l_h_d'])} | {s['fa3_ms']:.3f} | {s['seam_fa3_ms']:.3f} | "
              f"{s['cudnn_ms']:.3f} | {s['fa3_tflops']:.0f} | {s['cudnn_tflops']:.0f} | "
              f"{s['speedup_vs_cudnn']:.2f}x | {s['max_abs_fa3_vs_cudnn']:.2e} | {s['rel_fa3_vs_fp32']:.2e} | "
              f"{s['rel_cudnn_vs_fp32']:.2e} |")
    for key in ("lse", "ring", "mask", "compile"):
        print(f"{key}: {json.dumps(r.get(key))}")


if __name__ == "__main__":
    main()
