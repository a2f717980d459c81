"""Multi-GPU scaling on one host: per-step latency and end-to-end time at several parallel layouts.

    python benchmarks/bench_scaling.py WORKLOAD --repo DIR --layouts "1;cfg2;cfg2xu2" [--steps 2] [--out F.json]

A layout is "1" (one GPU) or a product of u<N> (Ulysses), r<N> (Ring), cfg2 (CFG parallel): e.g. "u4",
"cfg2xu2", "u2xr2". Each layout starts its own worker processes, warms up on a short clip, times a few
steps of the full workload (per-step time and fixed costs; end to end extrapolated to the workload's
step count), and compares its output with the one-GPU output.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_e2e import PROMPT, WORKLOADS


def parse_layout(text: str):
    from diffserve.parallel import ParallelConfig

    if text == "1":
        return None, 1
    u = r = 1
    cfg = False
    for part in text.split("x"):
        if part == "cfg2":
            cfg = True
        elif part.startswith("u"):
            u = int(part[1:])
        elif part.startswith("r"):
            r = int(part[1:])
        else:
            raise SystemExit(f"bad layout part {part!r}")
    n = u * r * (2 if cfg else 1)
    return ParallelConfig(num_gpus=n, ulysses_degree=u, ring_degree=r, cfg_parallel=cfg), n


def run_layout(repo: Path, layout: str, w, steps: int) -> tuple[dict, np.ndarray]:
    from diffserve import Engine

    parallel, n = parse_layout(layout)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(str(repo), dtype="bf16", device="cuda", parallel=parallel)
    load_s = time.perf_counter() - t0
    params = dict(height=w.height, width=w.width, guidance_scale=w.guidance, seed=0)
    warm = dict(params, num_frames=5) if w.num_frames else params
    engine.generate(PROMPT, num_inference_steps=1, **warm)
    if w.num_frames:
        params["num_frames"] = w.num_frames
    res = engine.generate(PROMPT, num_inference_steps=steps, **params)
    if hasattr(engine, "close"):
        engine.close()
    t = res.timings
    per_step = t["denoising"] / steps
    fixed = t["total"] - t["denoising"]
    out = res.videos[0] if res.videos else np.asarray(res.images[0])
    row = {"layout": layout, "gpus": n, "load_s": round(load_s, 1), "per_step_s": round(per_step, 4),
           "fixed_s": round(fixed, 3), "e2e_full_s": round(fixed + per_step * w.steps, 2),
           "stages": {k: round(v, 3) for k, v in t.items()}}
    return row, out


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for wl, rows in report.items():
        base = rows[0]["per_step_s"]
        xs = [r["gpus"] for r in rows]
        ax.plot(xs, [base / r["per_step_s"] for r in rows], marker="o", label=f"{wl} per step")
        base_e = rows[0]["e2e_full_s"]
        ax.plot(xs, [base_e / r["e2e_full_s"] for r in rows], marker="x", linestyle="--", label=f"{wl} end to end")
    top = max(max(r["gpus"] for r in rows) for rows in report.values())
    ax.plot([1, top], [1, top], color="grey", linewidth=0.8, label="linear")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("speedup over 1 GPU")
    ax.set_title(f"diffserve scaling ({torch.cuda.get_device_name()})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--layouts", default="1;cfg2;cfg2xu2")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--chart", type=Path, default=None)
    args = ap.parse_args()
    w = WORKLOADS[args.workload]
    if not args.repo.exists():
        from diffserve.testing.fixtures import build_repo

        build_repo(w.fixture, args.repo, scale="full", device="cuda", dtype=torch.bfloat16)
        torch.cuda.empty_cache()
    rows, ref = [], None
    for layout in args.layouts.split(";"):
        row, out = run_layout(args.repo, layout, w, args.steps)
        if ref is None:
            ref = out.astype(float)
        row["mean_abs_diff_255_vs_1gpu"] = float(np.abs(out.astype(float) - ref).mean())
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    for r in rows:
        r["speedup_per_step"] = round(base["per_step_s"] / r["per_step_s"], 3)
        r["speedup_e2e"] = round(base["e2e_full_s"] / r["e2e_full_s"], 3)
        r["efficiency_per_step"] = round(r["speedup_per_step"] / r["gpus"], 3) if not math.isnan(r["gpus"]) else None
    report = {args.workload: rows}
    if args.out:
        prev = json.loads(args.out.read_text()) if args.out.exists() else {}
        prev.update(report)
        args.out.write_text(json.dumps(prev, indent=1))
        report = prev
    if args.chart:
        chart(report, args.chart)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
