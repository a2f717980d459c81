"""Multi-GPU scaling on one host: per-step latency and end-to-end time at several parallel layouts.

    python benchmarks/bench_scaling.py WORKLOAD --repo DIR --layouts "1;cfg2xu4;u8;u4xr2" [--steps 2]
        [--out F.json] [--ref-dir DIR] [--chart F.png] [--markdown F.md] [--device cuda] [--dtype bf16]
    python benchmarks/bench_scaling.py --report F.json [--serve LABEL=SERVE.json ...] [--chart F.png]
        [--markdown F.md]

A layout is "1" (one GPU) or a product of u<N> (Ulysses), r<N> (Ring), cfg2 (CFG parallel), optionally with
"+compile" (regional torch.compile; the warm-up compiles): e.g. "u4+compile", "u8",
"cfg2xu4", "u4xr2", "u2xr2xcfg2". Each layout starts its own worker processes, warms up on a short clip
(5 frames; one step), times `--steps` steps of the full workload (per-step time and fixed costs; end to
end extrapolated as fixed + the workload's step count x per step), and compares its output with the
one-GPU output (mean |difference| on the 0-255 scale).

One invocation need not run every layout: with `--out`, rows are merged into the file by workload and
layout (a layout run again replaces its row), and the one-GPU output is kept in `--ref-dir` (default: a
`ref` folder next to `--out`) so that later invocations compare against it. Speed-ups and efficiencies
are recomputed against the workload's "1" row after every merge. A layout that fails (out of memory, a
layout the model does not support) gets a row with its error and the other layouts still run.

Without WORKLOAD only the report is read: `--chart` draws the speed-ups of every workload's layouts (and
the throughput gain of the data-parallel servers of `--serve`, files written by
benchmarks/bench_server_batching.py) as a bar chart with PIL, and `--markdown` writes table rows for
BENCHMARKS.md. With `--device cpu --dtype fp32` and a `tiny-*` workload the same code runs on tiny models
on the CPU (gloo; its times mean nothing).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from benchmarks.bench_e2e import WORKLOADS, Workload, conditioning
except ImportError:  # run as a script: python benchmarks/bench_scaling.py
    from bench_e2e import WORKLOADS, Workload, conditioning  # type: ignore[no-redef]

SCALING_WORKLOADS: dict[str, Workload] = {
    **WORKLOADS,
    # HunyuanVideo's reference defaults; its guidance (6.0) is embedded: one transformer call per step
    "hunyuan-720p": Workload("hunyuan-video", 720, 1280, 50, 6.0, num_frames=129),
    "tiny-hunyuan": Workload("hunyuan-video", 16, 48, 3, 6.0, num_frames=9, scale="tiny"),
}
WARMUP_FRAMES = 5

Row = dict[str, Any]
Report = dict[str, list[Row]]


def parse_layout(text: str):
    """("1" or e.g. "cfg2xu4", either with "+compile" for a compiled engine) -> (ParallelConfig or None for one
    GPU, number of GPUs)."""
    from diffserve.parallel import ParallelConfig

    text = text.removesuffix("+compile")
    if text == "1":
        return None, 1
    u = r = 1
    cfg = False
    for part in text.split("x"):
        if part == "cfg2":
            cfg = True
        elif part.startswith("u") and part[1:].isdigit():
            u = int(part[1:])
        elif part.startswith("r") and part[1:].isdigit():
            r = int(part[1:])
        else:
            raise SystemExit(f"bad layout part {part!r} in {text!r} (use u<N>, r<N>, cfg2 joined by 'x')")
    n = u * r * (2 if cfg else 1)
    return ParallelConfig(num_gpus=n, ulysses_degree=u, ring_degree=r, cfg_parallel=cfg), n


def layout_label(text: str) -> str:
    """"cfg2xu4" -> "CFG2 x U4" (the notation of BENCHMARKS.md); "u4+compile" -> "U4 --compile"."""
    base = text.removesuffix("+compile")
    label = " x ".join(part.upper() for part in base.split("x")) if base != "1" else "1"
    return label + (" --compile" if base != text else "")


def workload_label(name: str) -> str:
    w = SCALING_WORKLOADS.get(name)
    if w is None:
        return name
    frames = f"x{w.num_frames}" if w.num_frames else ""
    return f"{name} {w.height}x{w.width}{frames}, {w.steps} steps"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "CPU"


def run_layout(repo: Path, layout: str, w: Workload, steps: int, device: str = "cuda",
               dtype: str = "bf16") -> tuple[Row, np.ndarray]:
    """Time one layout: (its row, its first output as uint8 pixels)."""
    from diffserve import Engine

    parallel, n = parse_layout(layout)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(str(repo), dtype=dtype, device=device, parallel=parallel,
                                    compile=layout.endswith("+compile") and torch.device(device).type == "cuda")
    try:
        load_s = time.perf_counter() - t0
        params: dict[str, Any] = dict(height=w.height, width=w.width, guidance_scale=w.guidance, seed=0)
        params.update(conditioning(w))  # Qwen-Image: true CFG's negative prompt; editing: the input image
        warm = dict(params, num_frames=WARMUP_FRAMES) if w.num_frames else params
        engine.generate(w.prompt, num_inference_steps=w.min_steps, **warm)  # Qwen-Image: 2 steps at least
        if w.num_frames:
            params["num_frames"] = w.num_frames
        res = engine.generate(w.prompt, num_inference_steps=steps, **params)
    finally:
        if hasattr(engine, "close"):
            engine.close()
    t = res.timings
    per_step = t["denoising"] / steps
    fixed = t["total"] - t["denoising"]
    out = np.asarray(res.videos[0] if res.videos else res.images[0])
    row = {"layout": layout, "gpus": n, "device": device_name(device), "steps_timed": steps,
           "load_s": round(load_s, 1), "per_step_s": round(per_step, 4), "fixed_s": round(fixed, 3),
           "e2e_full_s": round(fixed + per_step * w.steps, 2), "stages": {k: round(v, 3) for k, v in t.items()}}
    return row, out


# ----------------------------------------------------------------------------------------------------------
# Report bookkeeping (pure)


def merge_rows(old: Sequence[Row], new: Sequence[Row]) -> list[Row]:
    """`old` with every row whose layout is in `new` replaced in place; new layouts appended."""
    fresh = {r["layout"]: r for r in new}
    merged = [fresh.pop(r["layout"], r) for r in old]
    return merged + [r for r in new if r["layout"] in fresh]


def summarize(rows: Sequence[Row]) -> list[Row]:
    """Speed-ups and efficiencies of every timed row against the "1" row (none without one)."""
    base = next((r for r in rows if r["layout"] == "1" and "per_step_s" in r), None)
    out = []
    for r in rows:
        r = dict(r)
        if base is not None and "per_step_s" in r:
            r["speedup_per_step"] = round(base["per_step_s"] / r["per_step_s"], 3)
            r["speedup_e2e"] = round(base["e2e_full_s"] / r["e2e_full_s"], 3)
            r["efficiency_per_step"] = round(r["speedup_per_step"] / r["gpus"], 3)
            r["efficiency_e2e"] = round(r["speedup_e2e"] / r["gpus"], 3)
        out.append(r)
    return out


def mean_abs_diff_255(out: np.ndarray, ref: np.ndarray | None) -> float | None:
    """Mean |out - ref| on the 0-255 scale; None without a reference of the same shape."""
    if ref is None or ref.shape != out.shape:
        return None
    return float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).mean())


def ref_path(ref_dir: Path, workload: str) -> Path:
    return ref_dir / f"{workload}-1gpu.npy"


def run_layouts(repo: Path, workload: str, layouts: Sequence[str], steps: int, device: str, dtype: str,
                ref_dir: Path | None, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Run the layouts in order; the one-GPU output is the reference (saved to / read from `ref_dir`).
    `on_row` sees every row as soon as it is done (a run killed by a timeout keeps the finished ones)."""
    w = SCALING_WORKLOADS[workload]
    for layout in layouts:  # a misspelt layout stops the run before anything loads
        parse_layout(layout)
    ref = None
    if ref_dir is not None and ref_path(ref_dir, workload).exists():
        ref = np.load(ref_path(ref_dir, workload))
    rows = []
    for layout in layouts:
        try:
            row, out = run_layout(repo, layout, w, steps, device, dtype)
        except Exception as e:  # noqa: BLE001 - one failing layout must not cost the others
            row = {"layout": layout, "gpus": parse_layout(layout)[1], "error": f"{type(e).__name__}: {e}"}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            if layout == "1":
                ref = out
                if ref_dir is not None:
                    ref_dir.mkdir(parents=True, exist_ok=True)
                    np.save(ref_path(ref_dir, workload), out)
            row["mean_abs_diff_255_vs_1gpu"] = mean_abs_diff_255(out, ref)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if on_row is not None:
            on_row(row)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Data-parallel serving (files of benchmarks/bench_server_batching.py)


def serve_rows(serve: dict) -> list[Row]:
    """Throughput of each server of a bench_server_batching report against its one-GPU server."""
    results = serve["results"]
    base = next((r for r in results if r.get("dp_size", 1) == 1), results[0])
    rows = []
    for r in results:
        dp = r.get("dp_size", 1)
        speedup = r["images_per_s"] / base["images_per_s"]
        rows.append({"dp_size": dp, "max_batch_size": r["max_batch_size"], "requests": r["requests"],
                     "wall_s": r["wall_s"], "images_per_s": r["images_per_s"], "speedup": round(speedup, 3),
                     "efficiency": round(speedup / dp, 3)})
    return rows


# ----------------------------------------------------------------------------------------------------------
# Chart (PIL: no plotting library needed) and markdown rows


def chart_bars(report: Report, serve: dict[str, dict]) -> list[tuple[str, int, list[tuple[str, float]]]]:
    """(label, GPUs, [(series, speed-up), ...]) for every multi-GPU row that has a speed-up."""
    bars = []
    for workload, rows in report.items():
        for r in summarize(rows):
            if r["gpus"] > 1 and "speedup_per_step" in r:
                bars.append((f"{workload} {layout_label(r['layout'])}", r["gpus"],
                             [("per step", r["speedup_per_step"]), ("end to end", r["speedup_e2e"])]))
    for label, data in serve.items():
        for r in serve_rows(data):
            if r["dp_size"] > 1:
                bars.append((f"{label} serve DP{r['dp_size']}", r["dp_size"], [("throughput", r["speedup"])]))
    return bars


SERIES_COLOURS = {"per step": (31, 119, 180), "end to end": (158, 202, 225), "throughput": (44, 160, 44)}


def chart(report: Report, path: Path, serve: dict[str, dict] | None = None, title: str | None = None) -> Path:
    """Horizontal bars: the speed-up over one GPU of every layout (per step and end to end) and of every
    data-parallel server (throughput), with a black tick at the ideal (the GPU count)."""
    from PIL import Image, ImageDraw, ImageFont

    bars = chart_bars(report, serve or {})
    if not bars:
        raise ValueError("nothing to draw: no multi-GPU row with a one-GPU baseline")
    if title is None:
        devices = {r.get("device") for rows in report.values() for r in rows if r.get("device")}
        title = "diffserve: speed-up over 1 GPU" + (f" ({', '.join(sorted(devices))})" if devices else "")
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=11)
    bar_h, gap, left, right, top, width = 14, 12, 260, 130, 50, 1000
    most_gpus = max(g for _, g, _ in bars)
    top_x = int(np.ceil(min(max(most_gpus, max(v for _, _, s in bars for _, v in s)), 2 * most_gpus)))
    height = top + sum(len(s) * bar_h + gap for _, _, s in bars) + 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    scale = (width - left - right) / top_x
    d.text((10, 10), title, fill="black", font=font)
    axis_y = height - 45
    for k in range(top_x + 1):  # grid and x axis
        x = left + k * scale
        d.line([(x, top - 5), (x, axis_y)], fill=(225, 225, 225))
        d.text((x - 3, axis_y + 4), str(k), fill="black", font=small)
    d.text((left, axis_y + 20), "speed-up over 1 GPU (tick: ideal = number of GPUs)", fill="black", font=small)
    y = top
    for label, gpus, series in bars:
        d.text((10, y + (len(series) * bar_h) / 2 - 7), label, fill="black", font=small)
        ideal = left + gpus * scale
        d.line([(ideal, y - 2), (ideal, y + len(series) * bar_h)], fill="black", width=2)
        for name, value in series:
            end = left + min(value, top_x) * scale  # a bar past the axis (CPU noise) stops at its end
            d.rectangle([left, y, end, y + bar_h - 2], fill=SERIES_COLOURS[name])
            d.text((max(end, ideal) + 6, y), f"{value:.2f}x {name}", fill="black", font=small)
            y += bar_h
        y += gap
    d.line([(left, top - 5), (left, axis_y)], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown_rows(report: Report, serve: dict[str, dict] | None = None) -> str:
    """Tables for BENCHMARKS.md: one row per layout, one per server."""
    lines = [("| workload | layout | GPUs | per step | fixed | end to end | speedup per step / e2e | "
              "efficiency per step | output vs 1 GPU (mean /255) |"), "|---|---|---|---|---|---|---|---|---|"]
    for workload, rows in report.items():
        for i, r in enumerate(summarize(rows)):
            name = workload_label(workload) if i == 0 else ""
            if "error" in r:
                lines.append(f"| {name} | {layout_label(r['layout'])} | {r['gpus']} | failed: {r['error'][:80]} "
                             f"| | | | | |")
                continue
            speed = (f"{_fmt(r.get('speedup_per_step'))}x / {_fmt(r.get('speedup_e2e'))}x"
                     if "speedup_per_step" in r else "-")
            diff = "-" if r["layout"] == "1" else _fmt(r.get("mean_abs_diff_255_vs_1gpu"))
            lines.append(f"| {name} | {layout_label(r['layout'])} | {r['gpus']} | {r['per_step_s']:.3f} s | "
                         f"{r['fixed_s']:.2f} s | {r['e2e_full_s']:.1f} s | {speed} | "
                         f"{_fmt(r.get('efficiency_per_step'))} | {diff} |")
    if serve:
        lines += ["", ("| model (serve) | replicas | max batch | requests | burst wall | images/s | "
                       "throughput vs 1 GPU | efficiency |"), "|---|---|---|---|---|---|---|---|"]
        for label, data in serve.items():
            for r in serve_rows(data):
                lines.append(f"| {label} | {r['dp_size']} | {r['max_batch_size']} | {r['requests']} | "
                             f"{r['wall_s']:.1f} s | {r['images_per_s']:.3f} | {r['speedup']:.2f}x | "
                             f"{r['efficiency']:.2f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------


def _serve_arg(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--serve takes LABEL=FILE.json, got {text!r}")
    return label, Path(path)


def main(argv: list[str] | None = None) -> Report:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", nargs="?", choices=sorted(SCALING_WORKLOADS))
    ap.add_argument("--repo", type=Path, help="model folder (built with random weights if missing)")
    ap.add_argument("--layouts", default="1;cfg2;cfg2xu2", help='";"-separated layouts (default "1;cfg2;cfg2xu2")')
    ap.add_argument("--steps", type=int, default=2, help="timed steps per layout (default 2)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--out", type=Path, default=None, help="JSON report to merge the rows into")
    ap.add_argument("--ref-dir", type=Path, default=None, help="where the one-GPU output is kept "
                    "(default: 'ref' next to --out)")
    ap.add_argument("--report", type=Path, default=None, help="without WORKLOAD: the report to chart")
    ap.add_argument("--serve", type=_serve_arg, action="append", default=[],
                    help="LABEL=FILE.json of bench_server_batching.py (repeatable)")
    ap.add_argument("--chart", type=Path, default=None, help="write the bar chart (PNG) here")
    ap.add_argument("--markdown", type=Path, default=None, help="write BENCHMARKS.md table rows here")
    args = ap.parse_args(argv)
    report_file = args.out if args.workload else args.report
    report: Report = json.loads(report_file.read_text()) if report_file and report_file.exists() else {}
    if args.workload:
        if args.repo is None:
            ap.error("WORKLOAD needs --repo")
        w = SCALING_WORKLOADS[args.workload]
        if not args.repo.exists():
            from diffserve.testing.fixtures import build_repo

            dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype, torch.float32)
            build_repo(w.fixture, args.repo, scale=w.scale, device=args.device, dtype=dt)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        ref_dir = args.ref_dir or (args.out.parent / "ref" if args.out else None)

        def keep(row: Row) -> None:
            report[args.workload] = summarize(merge_rows(report.get(args.workload, []), [row]))
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=1))

        run_layouts(args.repo, args.workload, args.layouts.split(";"), args.steps, args.device, args.dtype,
                    ref_dir, keep)
    elif report_file is None:
        ap.error("give a WORKLOAD, or --report FILE to chart")
    report = {k: summarize(v) for k, v in report.items()}
    serve = {label: json.loads(path.read_text()) for label, path in args.serve}
    if args.chart:
        chart(report, args.chart, serve)
    if args.markdown:
        args.markdown.write_text(markdown_rows(report, serve))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
