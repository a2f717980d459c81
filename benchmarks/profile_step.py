"""One denoising step of a full-size workload, variant by variant: time, output against the plain eager
path, and where the GPU time goes (kernel categories, GEMMs by shape, GPU idle time).

    python benchmarks/profile_step.py flux-dev-1024 --variants eager,compile,compile+epilogue --out DIR

Works on the transformer alone (no text encoders, VAE or repo on disk): diffserve's transformer is built
from the real config with random weights directly on the GPU (speed does not depend on weight values), and
every variant gets the same weights (diffusers' transformer too, loaded from the same tensors). Variants:
`eager` (the plain diffserve path every other variant is compared with), `diffusers`, `diffusers+compile`,
and diffserve with "+"-joined options: `compile` (regional torch.compile), `epilogue` (the models'
`fuse_epilogues`), `fuse` (`fuse_projections`), `graph` (the whole step captured in one CUDA graph), `oldrope` (the
unbind/stack form of RoPE used before, same values), `modcache` (FLUX: modulations from a precomputed
table, as the pipeline runs it), `cfgbatch` (Wan: conditional and unconditional passes as one batch), `autotune` (compile with inductor's
max-autotune: Triton GEMM templates benchmarked against cuBLAS per shape), `lt` (GEMMs through cuBLASLt).
Writes DIR/<workload>.json and DIR/<workload>-kernels.txt.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

try:
    from benchmarks import roofline
    from benchmarks.bench_e2e import WORKLOADS
    from benchmarks.step_flops import build_step
except ImportError:  # run as a script
    import roofline  # type: ignore[no-redef]
    from bench_e2e import WORKLOADS  # type: ignore[no-redef]
    from step_flops import build_step  # type: ignore[no-redef]

CATEGORIES = (  # first match wins; matched against the kernel name
    ("triton (fused elementwise)", re.compile(r"^triton_", re.IGNORECASE)),
    ("attention", re.compile(r"sdpa|fmha|flash|attention|attn", re.IGNORECASE)),
    ("gemm", re.compile(r"gemm|nvjet|xmma|cutlass|gemv|cublas|splitk", re.IGNORECASE)),
    ("copy / cat", re.compile(r"copy|cat|memcpy|memset", re.IGNORECASE)),
    ("norm", re.compile(r"norm|moments", re.IGNORECASE)),
)
DEFAULT_BLAS = torch.backends.cuda.preferred_blas_library() if torch.cuda.is_available() else None
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::_addmm_activation", "aten::bmm")


def category(kernel: str) -> str:
    return next((name for name, rx in CATEGORIES if rx.search(kernel)), "other elementwise")


def random_master(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights for `model` (a meta-device module) on `device`, in the dtypes the loader gives them
    (`dtype`, float32 where the model keeps it): weights ~ N(0, 1/fan_in) for unit-variance activations,
    biases ~ N(0, 0.02^2), 1-D norm scales 1 + N(0, 0.02^2)."""
    gen = torch.Generator(device=device).manual_seed(0)
    keep = getattr(type(model), "keeps_fp32", lambda _n: False)
    master = {}
    for name, p in model.state_dict().items():
        r = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32 if keep(name) else dtype)
        if p.ndim >= 2:
            r /= p[0].numel() ** 0.5
        elif "norm" in name and name.endswith("weight"):
            r = 1 + 0.02 * r
        else:
            r *= 0.02
        master[name] = r
    return master


def build_variant(name: str, master: dict, cfg, workload: str, device: torch.device,
                  attention: str | None) -> torch.nn.Module:
    """The transformer of variant `name` (see the module docstring) on `master`'s weights (shared, not
    copied: no variant writes to its weights)."""
    family = "flux" if "flux" in workload else "wan"
    if name.startswith("diffusers"):
        import diffusers

        from diffserve.testing.fixtures import component_plan

        w = WORKLOADS[workload]
        raw = next(c.config for c in component_plan(w.fixture, w.scale) if c.name == "transformer")
        dcls = diffusers.FluxTransformer2DModel if family == "flux" else diffusers.WanTransformer3DModel
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built on the GPU (its buffers computed there), then
        try:                                      # its parameters replaced by the shared weights
            with torch.device(device):
                model = dcls.from_config(raw)
        finally:
            torch.set_default_dtype(default)
        model.load_state_dict(master, strict=True, assign=True)
        model.eval().requires_grad_(False)
        if name.endswith("+compile"):
            model = torch.compile(model, fullgraph=True)
        if family == "flux":
            def call(x, c, p, t, ii, ti, g):
                return model(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t,
                             img_ids=ii, txt_ids=ti, guidance=g, return_dict=False)[0]
        else:
            def call(x, t, c):
                return model(hidden_states=x, timestep=t, encoder_hidden_states=c, return_dict=False)[0]
        return call  # type: ignore[return-value]
    from diffserve.engine.optimize import compile_blocks, fuse_epilogues, fuse_projections
    from diffserve.layers.attention import AttentionOp, default_backend
    from diffserve.models.dits.flux import FluxTransformer
    from diffserve.models.dits.wan import WanTransformer

    opts = set(name.split("+")) - {"eager"}
    if unknown := opts - {"compile", "epilogue", "fuse", "graph", "oldrope", "modcache", "cfgbatch",
                                    "autotune", "lt"}:
        raise SystemExit(f"unknown variant option(s) {sorted(unknown)} in {name!r}")
    if torch.cuda.is_available():  # "lt": GEMMs through cuBLASLt's heuristics instead of cuBLAS's
        torch.backends.cuda.preferred_blas_library("cublaslt" if "lt" in opts else DEFAULT_BLAS)
    with torch.device("meta"):
        cls = FluxTransformer if family == "flux" else WanTransformer
        model = cls(cfg, AttentionOp(attention or default_backend(device)))
    model.load_state_dict(master, strict=True, assign=True)
    model.eval().requires_grad_(False)
    import diffserve.models.dits.flux as flux_module
    import diffserve.models.dits.wan as wan_module
    from diffserve.layers.rope import apply_rope_interleaved

    for module in (flux_module, wan_module):  # "oldrope": the unbind/stack RoPE this repo used before
        module.apply_rope_interleaved = _rope_unbind_stack if "oldrope" in opts else apply_rope_interleaved
    if "fuse" in opts:
        fuse_projections(model)
    if "epilogue" in opts:
        fuse_epilogues(model)
    if "compile" in opts:
        compile_blocks(model, mode="max-autotune-no-cudagraphs" if "autotune" in opts else None)
    return model


def _rope_unbind_stack(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The earlier form of diffserve.layers.rope.apply_rope_interleaved (same values), for comparison."""
    x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(-2)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def step_fn(model, calls: list[tuple], modcache: bool = False, cfgbatch: bool = False):
    """One denoising step. `modcache` (FLUX): the modulations come from a table computed once for a
    28-step run, as the pipeline does (not timed: once per generation). `cfgbatch` (Wan): the step's
    calls (conditional, unconditional) as one call of twice the batch; its output split back."""
    if cfgbatch:
        joined = tuple(torch.cat(parts) if parts[0] is not None else None for parts in zip(*calls, strict=True))

        def batched():
            return list(model(*joined).chunk(len(calls)))
        return batched
    if modcache:
        x, _, p, t, _, _, g = calls[0]
        with torch.no_grad():
            rows = model.step_modulations(t.repeat(28), p, g).rows(0, x.shape[0])

        def cached():
            return [model(*calls[0], modulation=rows)]
        return cached

    def step():
        return [model(*c) for c in calls]
    return step


def cuda_graphed(step, warmup: int = 3):
    """Capture `step` (fixed input tensors) in one CUDA graph; returns a function replaying it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()

    def replay():
        graph.replay()
        return outs
    return replay


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_step(step, iters: int) -> list[float]:
    """Seconds per call of step(), each timed alone (CUDA events on a GPU)."""
    times = []
    for _ in range(iters):
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return times


def profile_step(step) -> dict:
    """Kernel time by category, top kernels, GEMMs by shape, and GPU idle time inside one step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        _sync()
    kernels = [e for e in prof.events()  # GPU kernels, not the compiled regions' annotations on the GPU row
               if e.device_type == DeviceType.CUDA and not e.name.startswith(("## Call", "Torch-Compiled"))]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    span = (spans[-1][1] - spans[0][0]) if spans else 0.0
    by_cat: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_cat[category(e.name)] += e.time_range.elapsed_us()
        k = by_kernel[e.name]
        k[0] += 1
        k[1] += e.time_range.elapsed_us()
    gemms = []
    for avg in prof.key_averages(group_by_input_shape=True):
        if avg.key not in GEMM_OPS or not avg.input_shapes:
            continue
        shapes = [s for s in avg.input_shapes if len(s) >= 2]
        if len(shapes) < 2:
            continue
        (m, k), n = shapes[0][-2:], shapes[1][-1]
        batch = shapes[0][0] if len(shapes[0]) == 3 else 1
        us = avg.device_time_total
        flop = 2.0 * batch * m * k * n * avg.count
        gemms.append({"op": avg.key, "M": m, "K": k, "N": n, "batch": batch, "calls": avg.count,
                      "ms": round(us / 1e3, 3), "tflops": round(flop / (us * 1e-6) / 1e12, 1) if us else None})
    gemms.sort(key=lambda g: -g["ms"])
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:25]
    return {"kernel_ms": round(sum(by_cat.values()) / 1e3, 3), "span_ms": round(span / 1e3, 3),
            "gpu_idle_ms": round((span - busy) / 1e3, 3),
            "by_category_ms": {k: round(v / 1e3, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:120], "calls": c, "ms": round(us / 1e3, 3)} for n, (c, us) in top],
            "gemms_by_shape": gemms[:30]}


def compare(outs: list[torch.Tensor], ref: list[torch.Tensor]) -> dict:
    diff = max((o.float() - r.float()).abs().max().item() for o, r in zip(outs, ref))
    scale = max(r.float().abs().max().item() for r in ref)
    mean = sum((o.float() - r.float()).abs().mean().item() for o, r in zip(outs, ref)) / len(ref)
    mean_scale = sum(r.float().abs().mean().item() for r in ref) / len(ref)
    return {"max_abs_diff_rel": diff / scale, "mean_abs_diff_rel": mean / mean_scale}


def epilogue_check(device: torch.device, dtype: torch.dtype) -> dict:
    """The GEMM+GELU epilogue op against linear then tanh-GELU, at FLUX's and Wan's MLP shapes: time and
    error against a float32 reference (the tanh and the exact GELU)."""
    import torch.nn.functional as F

    from diffserve.layers.fused import linear_gelu_tanh

    def linear_then_gelu(x, w, b):
        return F.gelu(F.linear(x, w, b), approximate="tanh")

    out = {}
    for m, k, n in ((4608, 3072, 12288), (4096, 3072, 12288), (32760, 1536, 8960)):
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
        b = torch.randn(n, device=device, dtype=dtype) * 0.1
        ref = F.linear(x.float(), w.float(), b.float())
        fused = linear_gelu_tanh(x, w, b).float()
        plain = linear_then_gelu(x, w, b).float()
        t_fused = roofline.time_call(functools.partial(linear_gelu_tanh, x, w, b), device, iters=20)
        t_plain = roofline.time_call(functools.partial(linear_then_gelu, x, w, b), device, iters=20)
        t_gemm = roofline.time_call(functools.partial(F.linear, x, w, b), device, iters=20)
        out[f"{m}x{k}x{n}"] = {
            "fused_ms": round(t_fused * 1e3, 4), "linear_then_gelu_ms": round(t_plain * 1e3, 4),
            "gemm_alone_ms": round(t_gemm * 1e3, 4),
            "fused_max_err_vs_fp32_tanh": (fused - F.gelu(ref, approximate="tanh")).abs().max().item(),
            "plain_max_err_vs_fp32_tanh": (plain - F.gelu(ref, approximate="tanh")).abs().max().item(),
            "fused_max_err_vs_fp32_erf": (fused - F.gelu(ref)).abs().max().item(),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=sorted(WORKLOADS), help="tiny-* run the same code on the CPU (a test)")
    ap.add_argument("--variants", default="eager,compile,compile+epilogue")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--attention", default=None, help="diffserve attention backend (default: the device's)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epilogue-check", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    meta_model, calls = build_step(WORKLOADS[args.workload], dev)
    master = random_master(meta_model, dev, dt)
    calls = [tuple(a.to(dt) if a is not None and a.ndim > 1 else a for a in c) for c in calls]
    report: dict = {"workload": args.workload, "card": torch.cuda.get_device_name() if dev.type == "cuda" else "CPU", "torch": torch.__version__,
                    "build_s": round(time.perf_counter() - t0, 1), "variants": {}}
    if args.epilogue_check and dev.type == "cuda":
        report["epilogue_check"] = epilogue_check(dev, dt)
        print(json.dumps(report["epilogue_check"], indent=1), flush=True)
    ref = None
    text = []
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        entry: dict = {}
        try:
            model = build_variant(name, master, meta_model.cfg, args.workload, dev, args.attention)
            step = step_fn(model, calls, modcache="modcache" in name.split("+"),
                           cfgbatch="cfgbatch" in name.split("+"))
            with torch.no_grad():
                outs = [o.clone() for o in step()]
                _sync()
                entry["first_call_s"] = round(time.perf_counter() - t0, 2)
                if "graph" in name.split("+"):
                    step = cuda_graphed(step)
                for _ in range(2):
                    step()
                times = time_step(step, args.iters)
                entry["step_ms_median"] = round(sorted(times)[len(times) // 2] * 1e3, 2)
                entry["step_ms_min"] = round(min(times) * 1e3, 2)
                if dev.type == "cuda":
                    entry["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if ref is None:
                    ref = outs
                    entry["reference"] = True
                else:
                    entry.update(compare(outs, ref))
                entry["profile"] = profile_step(step)
        except Exception as e:  # noqa: BLE001 -- one variant failing must not lose the others
            entry["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        report["variants"][name] = entry
        summary = {k: v for k, v in entry.items() if k != "profile"}
        if "profile" in entry:
            p = entry["profile"]
            summary.update(kernel_ms=p["kernel_ms"], idle_ms=p["gpu_idle_ms"], by_category=p["by_category_ms"])
            text.append(f"===== {args.workload} {name}: {summary} =====")
            text += [f"  {k['ms']:9.3f} ms {k['calls']:5d}x  {k['name']}" for k in p["top_kernels"]]
            text.append("  GEMMs by shape (M K N batch: calls, ms, TFLOP/s):")
            text += [f"    {g['op']:24s} {g['M']:6d} {g['K']:6d} {g['N']:6d} {g['batch']:3d}: {g['calls']:4d} "
                     f"{g['ms']:9.3f} ms {g['tflops']}" for g in p["gemms_by_shape"]]
        print(json.dumps({name: summary}), flush=True)
        model = step = outs = None
        torch._dynamo.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    (args.out / f"{args.workload}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{args.workload}-kernels.txt").write_text("\n".join(text) + "\n")
    return report


if __name__ == "__main__":
    main()
