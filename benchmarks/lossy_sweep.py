"""Lossy modes against the lossless engine, one load per engine: speed, cache hits and fidelity (issue 15).

`bench_e2e.py` loads a model once per engine name, which makes a threshold sweep cost one load and one
compilation per threshold. Here each engine is loaded once with the step cache installed and the requests
change its threshold (`cache_threshold`, 0 = every block runs), so one device call covers:

    plain    diffserve --compile, no cache installed: the lossless reference output and time
    +cache   the same engine with the step cache, at each threshold (0 first: the cache's own overhead)
    +fp8     --fp8 linear with the step cache, at each threshold (0: FP8 alone)
    sage     --attention-backend sage, no cache

Every output is compared with the reference (PSNR, SSIM: `diffserve.accel.fidelity`); times are one timed
generation of the workload's full schedule after a warm-up (compilation untimed). The diffusers eager
baseline comes from `bench_e2e.py` in the same call (its JSON, `--baseline`), so each row carries its ratio.

    python benchmarks/lossy_sweep.py flux-dev-1024 --repo /tmp/flux-dev --thresholds 0.05,0.1,0.15,0.25 \
        --engines plain,cache,fp8,sage --baseline $OUT/base.json --out $OUT/sweep.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import WORKLOADS, request_params

from diffserve import Engine
from diffserve.accel.cache_config import StepCacheConfig
from diffserve.accel.fidelity import psnr, ssim
from diffserve.config import EngineConfig

ENGINES = {  # name -> (attention backend, fp8 mode, step cache installed)
    "plain": ("fa3", "off", False),
    "cache": ("fa3", "off", True),
    "fp8": ("fa3", "linear", True),
    "fp8attn": ("fa3", "all", True),
    "sage": ("sage", "off", False),
}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def output_array(res) -> np.ndarray:
    return np.asarray(res.images[0]) if res.images else res.videos[0]


def baseline_row(path: Path | None) -> dict | None:
    """diffusers eager's run from a bench_e2e.py report: per step, fixed and full-schedule e2e seconds."""
    if path is None or not path.exists():
        return None
    report = json.loads(path.read_text())
    for run in report.get("runs", []):
        if run["engine"] == "diffusers":
            return run
    return None


def run_engine(name: str, args: argparse.Namespace, reference: np.ndarray | None) -> tuple[list[dict], np.ndarray]:
    backend, fp8, cached = ENGINES[name]
    backend = args.backend or backend
    dev = torch.device(args.device)
    w = WORKLOADS[args.workload]
    steps = args.steps or w.steps
    cache = (StepCacheConfig(mode="fbcache", threshold=0.1, max_skip=args.max_skip) if cached
             else StepCacheConfig())
    t0 = time.perf_counter()
    engine = Engine(EngineConfig(model_path=str(args.repo), dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                                 device=dev, attention_backend=backend, compile=dev.type == "cuda", fp8=fp8,
                                 step_cache=cache,
                                 vae_dtype=torch.bfloat16 if w.num_frames else None))
    load_s = time.perf_counter() - t0
    params = request_params(w)
    t0 = time.perf_counter()
    engine.generate(w.prompt, num_inference_steps=2, progress=False, **params)  # compiles
    sync(dev)
    warm_s = time.perf_counter() - t0
    rows = []
    zero = [] if name == "cache" and args.skip_zero_cache else [0.0]  # 0: FP8 alone / the cache's overhead
    thresholds = zero + args.thresholds if cached else [None]
    for t in thresholds:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        extra = {} if t is None else {"cache_threshold": t}
        res = engine.generate(w.prompt, num_inference_steps=steps, progress=False, **params, **extra)
        out = output_array(res)
        if reference is None:
            reference = out
        row = dict(engine=name, backend=backend, fp8=fp8, threshold=t, steps=steps,
                   total_s=round(res.timings["total"], 3), denoise_s=round(res.timings["denoising"], 3),
                   per_step_s=round(res.timings["denoising"] / steps, 4),
                   hit_fraction=res.cache_hit_fraction, peak_gib=round((res.peak_memory_bytes or 0) / 2**30, 1),
                   psnr=round(psnr(reference, out), 2), ssim=round(ssim(reference, out), 4),
                   load_s=round(load_s, 1), warmup_s=round(warm_s, 1))
        print(json.dumps(row), flush=True)
        rows.append(row)
    del engine
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows, reference


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--engines", default="plain,cache,fp8,sage")
    ap.add_argument("--thresholds", type=lambda s: [float(x) for x in s.split(",")], default=[0.05, 0.1, 0.2])
    ap.add_argument("--steps", type=int, default=None, help="default: the workload's full schedule")
    ap.add_argument("--baseline", type=Path, default=None, help="bench_e2e.py report with a diffusers run")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-skip", type=int, default=3, help="the cache's cap on cached steps in a row")
    ap.add_argument("--skip-zero-cache", action="store_true", help="no threshold-0 run on the cache engine")
    ap.add_argument("--backend", default=None, help="override every engine's attention backend (CPU: sdpa)")
    args = ap.parse_args()
    names = args.engines.split(",")
    if names[0] != "plain":
        raise SystemExit("the first engine must be plain (the lossless reference)")
    rows: list[dict] = []
    reference = None
    for name in names:
        try:
            got, reference = run_engine(name, args, reference)
            rows += got
        except Exception as e:  # noqa: BLE001 - one failing mode must not cost the others
            print(f"engine {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                  flush=True)
        args.out.write_text(json.dumps(dict(workload=args.workload, rows=rows), indent=1))
    base = baseline_row(args.baseline)
    w = WORKLOADS[args.workload]
    full = args.steps or w.steps
    base_e2e = base["fixed_s"] + full * base["per_step_s"] if base else None
    print(f"\n{args.workload}, {full} steps; diffusers eager: "
          + (f"{base['per_step_s']:.4f} s/step, e2e {base_e2e:.2f} s" if base else "not measured"))
    print(f"{'engine':8s} {'thr':>5s} {'s/step':>8s} {'e2e s':>7s} {'hits':>5s} {'x step':>7s} {'x e2e':>6s} "
          f"{'PSNR':>6s} {'SSIM':>6s} {'peak':>5s}")
    for r in rows:
        xs = f"{base['per_step_s'] / r['per_step_s']:.2f}" if base else "-"
        xe = f"{base_e2e / r['total_s']:.2f}" if base else "-"
        hits = "-" if r["hit_fraction"] is None else f"{r['hit_fraction']:.2f}"
        thr = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        print(f"{r['engine']:8s} {thr:>5s} {r['per_step_s']:8.4f} {r['total_s']:7.2f} {hits:>5s} {xs:>7s} {xe:>6s} "
              f"{r['psnr']:6.2f} {r['ssim']:6.4f} {r['peak_gib']:5.1f}")
    args.out.write_text(json.dumps(dict(workload=args.workload, baseline=base, baseline_e2e=base_e2e, rows=rows),
                                   indent=1))


if __name__ == "__main__":
    main()
