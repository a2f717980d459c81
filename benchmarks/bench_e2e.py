"""End-to-end GPU benchmark: diffserve vs diffusers on the same full-size random-weight checkpoint.

Usage (on a GPU machine):
    python benchmarks/bench_e2e.py WORKLOAD --repo DIR [--steps N] [--out FILE.json] [--benchmarks BENCHMARKS.md]

WORKLOAD is one of WORKLOADS below. The repo is built with random weights from the real configs
(diffserve.testing.fixtures.build_repo, scale="full") when DIR does not exist yet. Each engine loads
the repo from disk, runs one short warm-up, then one timed generation; per-step time is measured
around the denoising loop only (from the first transformer call to the last step's end), and fixed
costs (text encoding, VAE decode, the rest) are the difference to the end-to-end wall time.

Roofline (benchmarks/roofline.py): the FLOPs of one denoising step are counted on the plain diffserve
engine (matmuls with torch's flop counter, attention at the attention seam), the card's matmul and
attention ceilings are measured in the same process (attention at the workload's own shape, best of the
cuDNN / flash / default SDPA kernels), and each engine's achieved TFLOP/s and the floor (matmul FLOPs /
matmul ceiling + attention FLOPs / attention ceiling) are reported. `--benchmarks FILE` appends one row
per engine to FILE's harness table. The `tiny-*` workloads run the same code on tiny random models (CPU
tests of the harness; their times mean nothing).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

try:
    from benchmarks import roofline
except ImportError:  # run as a script: python benchmarks/bench_e2e.py
    import roofline  # type: ignore[no-redef]

PROMPT = "a red fox jumping over a frozen river at sunrise, detailed, photorealistic"


@dataclass(frozen=True)
class Workload:
    fixture: str
    height: int
    width: int
    steps: int
    guidance: float
    num_frames: int | None = None
    scale: str = "full"  # fixture scale of the random-weight repo


WORKLOADS = {
    "flux-dev-1024": Workload("flux-dev", 1024, 1024, 28, 3.5),
    "wan-1.3b-480p": Workload("wan-t2v", 480, 832, 50, 5.0, num_frames=81),
    "wan-14b-720p": Workload("wan-t2v-14b", 720, 1280, 50, 5.0, num_frames=81),
    "tiny-flux": Workload("flux-dev", 64, 64, 3, 3.5, scale="tiny"),
    "tiny-wan": Workload("wan-t2v", 32, 32, 3, 5.0, num_frames=5, scale="tiny"),
}


@dataclass
class Run:
    engine: str
    steps: int
    total_s: float
    denoise_s: float
    per_step_s: float
    fixed_s: float
    stages: dict
    peak_gib: float


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_one_step(fn, path: Path | None, title: str = "") -> None:
    """Append a per-kernel CUDA time table of fn() (one denoising step) to `path`."""
    if path is None:
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    with path.open("a") as f:
        f.write(f"\n===== {title} =====\n{table}\n")


def count_host_syncs(stage) -> list[int]:
    """Wrap a pipeline stage so each of its runs counts the CUDA host synchronisations inside it (torch's
    sync debug mode); returns the list the counts are appended to (empty off CUDA)."""
    import warnings

    counts: list[int] = []
    if not torch.cuda.is_available():
        return counts
    run = stage.run

    def counted(state):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return run(state)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                counts.append(sum("synchroniz" in str(w.message) for w in caught))
    stage.run = counted
    return counts


def run_diffserve(repo: Path, w: Workload, steps: int, name: str, profile_path: Path | None = None,
                  device: str = "cuda", dtype: str = "bf16",
                  count_flops: bool = False) -> tuple[Run, np.ndarray, roofline.StepFlops | None]:
    """`name` is "diffserve" plus options: "+compile", "+nofuse" / "+fuse" (without / with the lossless
    kernel fusions, which by default follow "+compile"), "+vaebf16", "[BACKEND]" (attention backend).
    With `count_flops`, also the FLOPs of one denoising step."""
    from diffserve import Engine

    backend = name.split("[")[1].rstrip("]") if "[" in name else None
    engine = Engine.from_pretrained(str(repo), dtype=dtype, device=device, compile="+compile" in name,
                                    attention_backend=backend,
                                    fuse=False if "+nofuse" in name else (True if "+fuse" in name else None),
                                    vae_dtype="bf16" if "+vaebf16" in name else None)
    params = dict(height=w.height, width=w.width, guidance_scale=w.guidance, seed=0)
    if w.num_frames:
        params["num_frames"] = w.num_frames
    t0 = time.perf_counter()
    engine.generate(PROMPT, num_inference_steps=2, **params)  # warm-up (and compile)
    _sync()
    warm = time.perf_counter() - t0
    res = engine.generate(PROMPT, num_inference_steps=steps, **params)
    denoise = next(st for st in engine.pipeline.stages if st.name == "denoising")
    syncs = count_host_syncs(denoise)  # one more generation, to count syncs in its denoising loop
    if "run" in vars(denoise):
        engine.generate(PROMPT, num_inference_steps=steps, **params)
        del denoise.run  # back to the class's method
    one_step = functools.partial(engine.generate, PROMPT, num_inference_steps=1, **params)
    profile_one_step(one_step, profile_path, name)
    flops = None
    if count_flops:
        flops = roofline.count_step_flops(engine.pipeline.components.transformer, engine.attention, one_step)
    t = res.timings
    out = np.asarray(res.images[0]) if res.images else res.videos[0]
    stages = {k: round(v, 4) for k, v in t.items()}
    stages["warmup_s"] = round(warm, 2)
    stages["attention"] = engine.attention.backend
    if syncs:
        stages["host_syncs_in_denoising"] = syncs[0]
    run = Run(name, steps, t["total"], t["denoising"], t["denoising"] / steps,
              t["total"] - t["denoising"], stages, (res.peak_memory_bytes or 0) / 2**30)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return run, out, flops


def run_diffusers(repo: Path, w: Workload, steps: int, compile_transformer: bool = False,
                  profile_path: Path | None = None, device: str = "cuda",
                  dtype: str = "bf16") -> tuple[Run, np.ndarray]:
    import diffusers

    from diffserve.config import parse_dtype

    dt = parse_dtype(dtype)
    if w.num_frames:
        vae = diffusers.AutoencoderKLWan.from_pretrained(repo, subfolder="vae", torch_dtype=torch.float32)
        pipe = diffusers.DiffusionPipeline.from_pretrained(repo, vae=vae, torch_dtype=dt).to(device)
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(repo, torch_dtype=dt).to(device)
    pipe.set_progress_bar_config(disable=True)
    if compile_transformer:
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
    marks: dict[str, float] = {}

    def pre_hook(_m, _a):
        if "start" not in marks:
            _sync()
            marks["start"] = time.perf_counter()

    def on_step(p, i, t, kw):
        if i == steps - 1:
            _sync()
            marks["end"] = time.perf_counter()
        return {}

    kw = dict(height=w.height, width=w.width, guidance_scale=w.guidance,
              generator=torch.Generator("cpu").manual_seed(0))
    if w.num_frames:
        kw["num_frames"] = w.num_frames
    t_warm = time.perf_counter()
    pipe(PROMPT, num_inference_steps=2, **kw)  # warm-up (and compile)
    warm = time.perf_counter() - t_warm
    handle = pipe.transformer.register_forward_pre_hook(pre_hook)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    kw["generator"] = torch.Generator("cpu").manual_seed(0)
    _sync()
    t0 = time.perf_counter()
    out = pipe(PROMPT, num_inference_steps=steps, callback_on_step_end=on_step, output_type="np", **kw)
    _sync()
    total = time.perf_counter() - t0
    handle.remove()
    denoise = marks["end"] - marks["start"]
    profile_one_step(functools.partial(pipe, PROMPT, num_inference_steps=1, output_type="latent", **kw), profile_path,
                     "diffusers+compile" if compile_transformer else "diffusers")
    arr = out.images[0] if hasattr(out, "images") else out.frames[0]
    arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    name = "diffusers+compile" if compile_transformer else "diffusers"
    run = Run(name, steps, total, denoise, denoise / steps, total - denoise, {"warmup_s": round(warm, 2)},
              torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)
    del pipe
    gc.collect()
    torch.cuda.empty_cache()
    return run, arr


def _tflops(flop_per_s: float) -> float:
    return float(f"{flop_per_s / 1e12:.4g}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: the workload's)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--engines", default="diffserve,diffusers",
                    help="comma list of: diffserve (options joined by +: compile, fuse, nofuse, vaebf16; "
                         "[BACKEND] for the attention kernel), diffusers, diffusers+compile")
    ap.add_argument("--profile", type=Path, default=None, help="append one-step kernel tables to this file")
    ap.add_argument("--benchmarks", type=Path, default=None,
                    help="append one row per engine to this file's harness table (BENCHMARKS.md)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--no-roofline", action="store_true", help="skip the FLOP count and the ceilings")
    args = ap.parse_args(argv)
    command = "python benchmarks/bench_e2e.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    w = WORKLOADS[args.workload]
    steps = args.steps or w.steps
    from diffserve.config import parse_dtype

    dt = parse_dtype(args.dtype)
    if not args.repo.exists():
        from diffserve.testing.fixtures import build_repo

        t0 = time.perf_counter()
        build_repo(w.fixture, args.repo, scale=w.scale, device=args.device, dtype=dt)
        print(f"built {w.fixture} {w.scale}-size repo in {time.perf_counter() - t0:.1f}s", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    runs, outs, flops = [], {}, None
    for name in args.engines.split(","):
        prof, dev = args.profile, dict(device=args.device, dtype=args.dtype)
        if name.startswith("diffserve"):
            count = not args.no_roofline and flops is None and "+compile" not in name
            r, o, f = run_diffserve(args.repo, w, steps, name, profile_path=prof, count_flops=count, **dev)
            flops = f or flops
        elif name in ("diffusers", "diffusers+compile"):
            r, o = run_diffusers(args.repo, w, steps, compile_transformer=name.endswith("+compile"),
                                 profile_path=prof, **dev)
        else:
            raise SystemExit(f"unknown engine {name}")
        runs.append(r)
        outs[r.engine] = o
        print(json.dumps(asdict(r)), flush=True)
    base = next((r for r in runs if r.engine == "diffusers"), None)
    card = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else f"CPU ({args.device})"
    report = {"workload": args.workload, "card": card, "torch": torch.__version__, "dtype": args.dtype,
              "steps_timed": steps, "full_steps": w.steps, "command": command, "runs": [asdict(r) for r in runs]}
    for r in runs:
        # end-to-end at the workload's full step count, extrapolated from the per-step and fixed costs
        r_e2e = r.fixed_s + r.per_step_s * w.steps
        report.setdefault("e2e_full_s", {})[r.engine] = round(r_e2e, 3)
        if base is not None:
            report.setdefault("speedup_vs_diffusers", {})[r.engine] = {
                "per_step": round(base.per_step_s / r.per_step_s, 3),
                "e2e": round((base.fixed_s + base.per_step_s * w.steps) / r_e2e, 3),
            }
    if flops is not None:
        ceil = roofline.measure_ceilings(torch.device(args.device), dt, flops)
        report["step_flops"] = {"matmul": flops.matmul, "attention": flops.attention,
                                "attention_shapes_BLqLkHD": {str(k): n for k, n in flops.attention_shapes.items()}}
        report["ceilings_tflops"] = {"matmul": _tflops(ceil.matmul),
                                     "attention": {k: _tflops(v) for k, v in ceil.attention_by_backend.items()},
                                     "attention_shape_BLqLkHD": list(ceil.attention_shape)}
        report["roofline"] = {r.engine: roofline.roofline_fields(r.per_step_s, flops, ceil) for r in runs}
    plain_name = next((n for n in ("diffserve+nofuse", "diffserve") if n in outs), None)
    if plain_name:  # lossless check: every variant against the unoptimised diffserve path
        plain = outs[plain_name].astype(float)
        report["lossless_reference"] = plain_name
        report["output_mean_abs_diff_255_vs_diffserve"] = {
            k: float(np.abs(v.astype(float) - plain).mean()) for k, v in outs.items() if k != plain_name}
    if "diffusers" in outs:
        ref = outs["diffusers"].astype(float)
        report["output_mean_abs_diff_255_vs_diffusers"] = {
            k: float(np.abs(v.astype(float) - ref).mean()) for k, v in outs.items() if k != "diffusers"}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if args.benchmarks:
        roofline.append_rows(args.benchmarks, roofline.benchmark_rows(report, command))
    return report


if __name__ == "__main__":
    main()
