"""Roofline pieces of the benchmark harness: FLOPs of one denoising step, the card's measured matmul and
attention ceilings, the floor they imply, and the rows the harness appends to BENCHMARKS.md.

FLOPs are counted on diffserve's engine, whose math is the same as diffusers' (parity tests): matmuls
(linear, bmm, conv) with ``torch.utils.flop_counter`` inside every transformer call of a one-step
generation, minus whatever the counter sees inside the attention seam (a kernel it has a formula for, or
the matmuls of a decomposed attention on the meta device); attention analytically at the engine's one
attention seam (``AttentionOp.local``: 4 * B * H * Lq * Lk * D per call, QK^T and PV, over the real keys
only when the call carries a key mask), which also records the attention shapes the ceiling is then
measured at.
"""

from __future__ import annotations

import datetime
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

BENCH_HEADING = "## bench_e2e.py runs (rows appended by the harness)"
BENCH_HEADER = ("| date | card | torch | workload | engine | s/step | e2e s (full steps) | peak GiB | TFLOP/s | "
                "floor s/step | floor / time | vs diffusers step / e2e | command |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def attention_flops(q_shape: tuple[int, ...], k_shape: tuple[int, ...]) -> float:
    """FLOPs of softmax(QK^T)V for (B, Lq, H, D) queries and (B, Lk, H, D) keys: two matmuls of 2*Lq*Lk*D
    per head (the softmax is not counted, as in flop_counter's SDPA formula)."""
    b, lq, h, d = q_shape
    return 4.0 * b * h * lq * k_shape[1] * d


def masked_call_shapes(q_shape: tuple[int, ...], kv_mask: torch.Tensor) -> list[tuple[int, int, int, int, int]]:
    """The (B, Lq, Lk, H, D) kernel calls the seam makes for queries (B, Lq, H, D) over keys whose real
    positions are kv_mask (B, Lk) bool: one call over the shared count of real keys when every sample has
    the same count, else one call per sample over its own."""
    b, lq, h, d = q_shape
    counts = kv_mask.sum(-1).tolist()
    if len(set(counts)) == 1:
        return [(b, lq, counts[0], h, d)]
    return [(1, lq, n, h, d) for n in counts if n]


@dataclass
class StepFlops:
    matmul: float = 0.0
    attention: float = 0.0
    attention_shapes: dict[tuple[int, int, int, int, int], int] = field(default_factory=dict)  # (B,Lq,Lk,H,D)

    @property
    def total(self) -> float:
        return self.matmul + self.attention

    def main_attention_shape(self) -> tuple[int, int, int, int, int]:
        """The shape that carries the most attention FLOPs."""
        return max(self.attention_shapes, key=lambda s: self.attention_shapes[s] * s[0] * s[1] * s[2] * s[3] * s[4])


def per_step(flops: StepFlops, steps: int) -> StepFlops:
    """The FLOPs of a `steps`-step generation as one step's share (attention calls per shape divided too)."""
    if steps == 1:
        return flops
    shapes = {s: max(n // steps, 1) for s, n in flops.attention_shapes.items()}
    return StepFlops(flops.matmul / steps, flops.attention / steps, shapes)


def count_step_flops(transformer: torch.nn.Module, attention, generate: Callable[[], object]) -> StepFlops:
    """FLOPs of the calls of `transformer` (whose attention seam is `attention`, an ``AttentionOp``) made by
    `generate()`: one denoising step's worth, e.g. a one-step generation. Work a model hoists out of its
    steps (FLUX's `step_modulations`, computed once per generation) is counted too: in a one-step
    generation it is exactly that step's share."""
    from torch.utils.flop_counter import FlopCounterMode

    tally = StepFlops()
    orig_forward, orig_local = transformer.forward, attention.local
    active: list = []  # the counter of the transformer call in progress
    inside_attention = [0.0]  # what that counter saw inside the seam (a kernel it knows, or a decomposition)

    def forward(*args, **kwargs):
        with FlopCounterMode(display=False) as counter:
            active.append(counter)
            try:
                out = orig_forward(*args, **kwargs)
            finally:
                active.pop()
        tally.matmul += counter.get_total_flops() - inside_attention[0]
        inside_attention[0] = 0.0
        return out

    def local(q, k, v, kv_mask=None):
        shapes = ([(q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3])] if kv_mask is None
                  else masked_call_shapes(tuple(q.shape), kv_mask))
        for b, lq, lk, h, d in shapes:
            tally.attention_shapes[(b, lq, lk, h, d)] = tally.attention_shapes.get((b, lq, lk, h, d), 0) + 1
            tally.attention += attention_flops((b, lq, h, d), (b, lk, h, d))
        before = active[-1].get_total_flops() if active else 0
        out = orig_local(q, k, v) if kv_mask is None else orig_local(q, k, v, kv_mask=kv_mask)
        if active:
            inside_attention[0] += active[-1].get_total_flops() - before
        return out

    hoisted = [name for name in ("step_modulations",) if hasattr(transformer, name)]
    originals = {name: getattr(transformer, name) for name in hoisted}

    def counted(fn):
        def call(*args, **kwargs):
            with FlopCounterMode(display=False) as counter:
                out = fn(*args, **kwargs)
            tally.matmul += counter.get_total_flops()
            return out
        return call

    transformer.forward, attention.local = forward, local
    for name, fn in originals.items():
        setattr(transformer, name, counted(fn))
    try:
        generate()
    finally:
        del transformer.forward, attention.local  # back to the class attributes
        for name in originals:
            delattr(transformer, name)
    return tally


def time_call(fn: Callable[[], object], device: torch.device, iters: int = 10, warmup: int = 3) -> float:
    """Mean seconds per fn() call (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Measured FLOP/s of an n x n x n matmul (8192 on a GPU, 512 on a CPU)."""
    n = n or (8192 if device.type == "cuda" else 512)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2.0 * n**3 / time_call(lambda: a @ b, device)


def attention_ceiling(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int, int, int],
                      backends: tuple[str, ...]) -> dict[str, float]:
    """Measured FLOP/s of the seam's attention kernels at (B, Lq, Lk, H, D), per backend that runs."""
    from diffserve.layers.attention import fa3_attention, sdpa_attention

    b, lq, lk, h, d = shape
    q = torch.randn(b, lq, h, d, device=device, dtype=dtype)
    k, v = torch.randn(b, lk, h, d, device=device, dtype=dtype), torch.randn(b, lk, h, d, device=device, dtype=dtype)
    flops = attention_flops(tuple(q.shape), tuple(k.shape))
    out: dict[str, float] = {}
    iters = 5 if device.type == "cuda" else 2
    for backend in backends:
        try:
            call = (functools.partial(fa3_attention, q, k, v) if backend == "fa3"
                    else functools.partial(sdpa_attention, q, k, v, backend))
            out[backend] = flops / time_call(call, device, iters, warmup=2)
        except RuntimeError as e:  # a kernel that does not take this shape / dtype on this card
            print(f"attention ceiling: backend {backend} skipped ({str(e).splitlines()[0][:120]})")
    return out


@dataclass(frozen=True)
class Ceilings:
    matmul: float  # FLOP/s
    attention: float  # FLOP/s, the best backend at the workload's main attention shape
    attention_by_backend: dict[str, float]
    attention_shape: tuple[int, int, int, int, int]


def measure_ceilings(device: torch.device, dtype: torch.dtype, flops: StepFlops) -> Ceilings:
    shape = flops.main_attention_shape()
    from diffserve.layers.attention import FA3_DTYPES, fa3_available

    backends = ("cudnn", "flash", "sdpa") if device.type == "cuda" else ("sdpa",)
    if device.type == "cuda" and dtype in FA3_DTYPES and fa3_available():
        backends = ("fa3", *backends)
    by_backend = attention_ceiling(device, dtype, shape, backends)
    return Ceilings(matmul_ceiling(device, dtype), max(by_backend.values()), by_backend, shape)


def floor_seconds(flops: StepFlops, ceilings: Ceilings) -> float:
    """The step time if every matmul ran at the matmul ceiling and every attention at the attention one."""
    return flops.matmul / ceilings.matmul + flops.attention / ceilings.attention


def roofline_fields(per_step_s: float, flops: StepFlops, ceilings: Ceilings) -> dict[str, float]:
    floor = floor_seconds(flops, ceilings)
    return {"tflops": float(f"{flops.total / per_step_s / 1e12:.4g}"), "floor_s": float(f"{floor:.4g}"),
            "floor_fraction": float(f"{floor / per_step_s:.4g}")}


def benchmark_rows(report: dict, command: str, date: datetime.date | None = None) -> list[str]:
    """One BENCHMARKS.md table row per engine of a harness report."""
    date = date or datetime.date.today()
    rows = []
    for run in report["runs"]:
        name = run["engine"]
        roof = report.get("roofline", {}).get(name, {})
        speed = report.get("speedup_vs_diffusers", {}).get(name)
        cells = [date.isoformat(), report["card"], report["torch"], report["workload"], name,
                 f"{run['per_step_s']:.4f}", f"{report['e2e_full_s'][name]:.2f}", f"{run['peak_gib']:.1f}",
                 f"{roof['tflops']:.3g}" if roof else "-", f"{roof['floor_s']:.4g}" if roof else "-",
                 f"{100 * roof['floor_fraction']:.0f}%" if roof else "-",
                 f"{speed['per_step']:.2f}x / {speed['e2e']:.2f}x" if speed else "-", f"`{command}`"]
        rows.append("| " + " | ".join(cells) + " |\n")
    return rows


def append_rows(path: Path, rows: list[str]) -> None:
    """Add rows at the end of the harness table of BENCHMARKS.md at `path` (its section is created at the
    end of the file when missing); the rest of the file is kept as it is."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    if BENCH_HEADING + "\n" not in lines:
        lines += (["\n"] if lines else []) + [BENCH_HEADING + "\n", "\n"] + BENCH_HEADER.splitlines(keepends=True)
    at = lines.index(BENCH_HEADING + "\n") + 1
    while at < len(lines) and not lines[at].startswith("|"):
        at += 1
    while at < len(lines) and lines[at].startswith("|"):
        at += 1
    path.write_text("".join(lines[:at] + rows + lines[at:]))
