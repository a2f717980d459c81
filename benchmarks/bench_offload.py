"""Offload benchmark (issue 16 item 2): peak GPU memory and time of one workload on one GPU, all on the GPU and
under a memory budget, beside diffusers' CPU offloads, on the same full-size random-weight repo.

    python benchmarks/bench_offload.py flux-dev-1024 --repo /tmp/flux-dev --variants gpu,budget,model,sequential \
        --steps 8 --sequential-steps 3 --budget 24 --out flux_offload.json

Variants (one after the other in this process, memory freed between them):
  gpu         diffserve, everything on the GPU (the baseline)
  budget      diffserve --max-gpu-memory BUDGET, planned for the workload's size (--plan-size HxWxF, as
              `generate` plans for its own requests; the plan it picks is reported)
  budget-compile  the same with --compile (FlashAttention 3 on Hopper when installed); warmed up by one step
  model       diffusers enable_model_cpu_offload() (each model moved to the GPU whole when it runs)
  sequential  diffusers enable_sequential_cpu_offload() (every layer's weights moved per use; few steps: slow)
diffusers' VAE decodes tiled (vae.enable_tiling()), as it would have to on a small card; diffserve tiles when
its estimate says the decode does not fit (--vae-tiling auto, reported).

Each variant: load (timed), a warm-up of 1 step without decode for the fast ones (the first CUDA calls and
kernel choices are not timed; none for sequential, and none for video workloads, whose first timed step is
left out of the per-step figure instead), then one generation of STEPS steps, timed per step (a CUDA sync at
each step's end) and end to end. Peak GPU memory is torch.cuda.max_memory_allocated / max_memory_reserved
over that generation (stats reset just before). End to end is also extrapolated to the model's full step
count: fixed part (total - steps x per step) + full steps x per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_e2e import (
    WORKLOADS,
    Workload,
    _free_memory,
    _sync,
    build_benchmark_repo,
    diffusers_call_kwargs,
    family,
    request_params,
)

GIB = 2**30


class StepClock:
    """Step end times (synchronised), from the engines' step callbacks."""

    def __init__(self) -> None:
        self.start = 0.0
        self.marks: list[float] = []

    def begin(self) -> None:
        _sync()
        self.start, self.marks = time.perf_counter(), []

    def step(self) -> None:
        _sync()
        self.marks.append(time.perf_counter())

    def per_step(self, skip_first: bool) -> float:
        """Median step time (after the first step when `skip_first`, else from the first step's end on; the
        first step also carries text encoding and latent set-up)."""
        gaps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        if skip_first and len(gaps) > 1:
            gaps = gaps[1:]
        return statistics.median(gaps) if gaps else float("nan")


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _memory() -> dict[str, float]:
    if not torch.cuda.is_available():  # a CPU dry run
        return {"peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2)}


def _report(name: str, w: Workload, steps: int, clock: StepClock, total: float, load_s: float,
            extra: dict[str, Any]) -> dict[str, Any]:
    per_step = clock.per_step(skip_first=bool(w.num_frames))
    fixed = total - steps * per_step
    row = {"variant": name, "steps": steps, "per_step_s": round(per_step, 3), "total_s": round(total, 2),
           "e2e_full_s": round(fixed + w.steps * per_step, 1), "full_steps": w.steps, "load_s": round(load_s, 1),
           **_memory(), **extra}
    print(json.dumps(row), flush=True)
    return row


def run_diffserve(repo: Path, w: Workload, steps: int, budget: float | None,
                  device: str = "cuda", compile: bool = False) -> tuple[dict[str, Any], np.ndarray]:
    from diffserve import Engine

    t0 = time.perf_counter()
    engine = Engine.from_pretrained(str(repo), dtype="bf16" if device == "cuda" else "fp32", device=device,
                                    max_gpu_memory=budget, compile=compile and device == "cuda",
                                    plan_size=(w.height, w.width, *([w.num_frames] if w.num_frames else []))
                                    if budget is not None else None)
    _sync()
    load_s = time.perf_counter() - t0
    params = request_params(w)
    vae = engine.pipeline.components.vae
    tiled: list[bool] = []
    decode = vae.decode

    def probe(*a: Any, **k: Any) -> Any:  # records whether the decode ran tiled
        tiled.append(bool(vae.use_tiling))
        return decode(*a, **k)

    vae.decode = probe
    if not w.num_frames or compile:  # warm-up: one step and its decode (compiles the blocks)
        engine.generate(w.prompt, num_inference_steps=1, progress=False, **params)
    resident = torch.cuda.memory_allocated() / GIB if torch.cuda.is_available() else 0.0
    clock = StepClock()
    _reset_peak()
    clock.begin()
    res = engine.generate(w.prompt, num_inference_steps=steps, progress=False, on_step=lambda d, t: clock.step(),
                          **params)
    _sync()
    total = time.perf_counter() - clock.start
    off = engine.config.offload
    extra = {"resident_gib": round(resident, 2), "vae_tiled": tiled[-1] if tiled else None,
             "offload": {"text_encoder": off.text_encoder, "vae": off.vae, "dit_share": off.dit},
             "plan": engine.offloaded.describe(), "stages_s": {k: round(v, 2) for k, v in res.timings.items()},
             "attention": engine.attention.backend, "plan_size": off.plan_size.describe() if off.plan_size else None}
    name = "diffserve" + (f" --max-gpu-memory {budget:g}" if budget is not None else " (all on GPU)")
    row = _report(name + (" --compile" if compile else ""), w, steps, clock, total, load_s, extra)
    out = np.asarray(res.images[0]) if res.images else res.videos[0]
    vae.decode = decode
    del engine, res
    _free_memory()
    return row, out


def run_diffusers(repo: Path, w: Workload, steps: int, mode: str) -> dict[str, Any]:
    import diffusers

    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if family(w) == "wan":  # the model card's float32 VAE
        extra["vae"] = diffusers.AutoencoderKLWan.from_pretrained(repo, subfolder="vae", torch_dtype=torch.float32)
    pipe = diffusers.DiffusionPipeline.from_pretrained(repo, torch_dtype=torch.bfloat16, **extra)
    pipe.set_progress_bar_config(disable=True)
    if mode == "model":
        pipe.enable_model_cpu_offload()
    else:
        pipe.enable_sequential_cpu_offload()
    pipe.vae.enable_tiling()
    load_s = time.perf_counter() - t0
    kw = diffusers_call_kwargs(w)
    clock = StepClock()

    def on_step(p, i, t, kwargs):
        clock.step()
        return {}

    if mode == "model" and not w.num_frames:
        pipe(prompt=w.prompt, num_inference_steps=1, output_type="latent",
             generator=torch.Generator("cpu").manual_seed(0), **kw)
    _reset_peak()
    clock.begin()
    pipe(prompt=w.prompt, num_inference_steps=steps, callback_on_step_end=on_step, output_type="np",
         generator=torch.Generator("cpu").manual_seed(0), **kw)
    _sync()
    total = time.perf_counter() - clock.start
    name = f"diffusers enable_{mode}_cpu_offload"
    row = _report(name, w, steps, clock, total, load_s, {"vae_tiled": True,
                                                         "warmup": mode == "model" and not w.num_frames})
    del pipe
    _free_memory()
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows, with each row's speed against the sequential-offload row."""
    seq = next((r for r in rows if "sequential" in r["variant"]), None)
    head = ("| variant | peak alloc GiB | peak reserved GiB | s/step | e2e s (full steps, extrapolated) | "
            "e2e vs sequential |")
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{seq['e2e_full_s'] / r['e2e_full_s']:.2f}x" if seq else "-"
        lines.append(f"| {r['variant']} | {r['peak_allocated_gib']} | {r['peak_reserved_gib']} | {r['per_step_s']} | "
                     f"{r['e2e_full_s']} ({r['full_steps']}) | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--variants", default="gpu,budget,model,sequential")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--sequential-steps", type=int, default=2)
    ap.add_argument("--budget", type=float, default=24.0, help="GiB for the budget variant")
    ap.add_argument("--text-layers", type=int, default=None, help="build the big text encoder this deep")
    ap.add_argument("--out", type=Path, required=True, help="JSON rows; rows already there are kept (merged)")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the diffserve variants on a tiny workload")
    args = ap.parse_args(argv)
    w = WORKLOADS[args.workload]
    if not args.repo.is_dir():
        t0 = time.perf_counter()
        build_benchmark_repo(w, args.repo, args.device, torch.bfloat16 if args.device == "cuda" else torch.float32,
                             args.text_layers)
        print(f"built {args.repo} in {time.perf_counter() - t0:.0f} s", flush=True)
    rows: list[dict[str, Any]] = json.loads(args.out.read_text()) if args.out.is_file() else []
    outputs: dict[str, np.ndarray] = {}
    for variant in args.variants.split(","):
        try:
            if variant in ("gpu", "budget", "budget-compile"):
                row, outputs[variant] = run_diffserve(args.repo, w, args.steps,
                                                      args.budget if variant.startswith("budget") else None,
                                                      args.device, compile=variant.endswith("compile"))
            elif variant in ("model", "sequential"):
                row = run_diffusers(args.repo, w, args.sequential_steps if variant == "sequential" else args.steps,
                                    variant)
            else:
                raise SystemExit(f"unknown variant {variant!r}: gpu, budget, budget-compile, model, sequential")
        except torch.OutOfMemoryError as e:
            row = {"variant": variant, "error": f"OutOfMemoryError: {str(e).splitlines()[0]}"}
            print(json.dumps(row), flush=True)
            _free_memory()
        rows = [r for r in rows if r["variant"] != row["variant"]] + [row]
        args.out.write_text(json.dumps(rows, indent=1))
    if "gpu" in outputs and "budget" in outputs:
        diff = np.abs(outputs["gpu"].astype(int) - outputs["budget"].astype(int)).max()
        print(f"diffserve budget vs all-on-GPU output: max |uint8 diff| = {diff}", flush=True)
    ok = [r for r in rows if "error" not in r]
    print(table(ok), flush=True)
    return rows


if __name__ == "__main__":
    main()
