"""Throughput gain of the server's batching: the same burst of concurrent image requests against
`diffserve serve --max-batch-size B` for several B (B=1 is no batching).

Usage:
    python benchmarks/bench_server_batching.py [--model flux-dev] [--requests 32] [--size 64x64] [--steps 4]
        [--batch-sizes 1,4,8] [--device cpu] [--dtype fp32] [--out FILE.json]

`--model` is a tiny fixture name (diffserve.testing.fixtures) or a model folder. For each B a fresh server is
started on a free loopback port, warmed up with two requests, then sent `--requests` compatible requests at
once (same size/steps/guidance, each its own seed, n=1) from as many client threads. Reported per B: wall
time of the burst, images/s, the speed-up over B=1, client latency p50/p95, and the mean batch size the
server actually ran (from its /metrics). On GPU pass e.g. `--model DIR --device cuda --dtype bf16 --size
1024x1024 --steps 28`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from diffserve.server.testing import ServerProcess, metric_value, start_server


@dataclass
class Result:
    max_batch_size: int
    requests: int
    wall_s: float
    images_per_s: float
    speedup: float
    latency_p50_s: float
    latency_p95_s: float
    mean_batch: float


def _model_path(name: str) -> Path:
    path = Path(name)
    if path.exists():
        return path
    from diffserve.testing.fixtures import fixture_path

    return fixture_path(name)


def _burst(server: ServerProcess, count: int, body: dict, seed0: int) -> tuple[float, list[float]]:
    """Send `count` requests at once; (wall seconds, per-request latencies)."""

    def one(i: int) -> float:
        start = time.perf_counter()
        with httpx.Client(base_url=server.url, timeout=3600) as c:
            r = c.post("/v1/images/generations", json={**body, "seed": seed0 + i})
        r.raise_for_status()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        latencies = list(pool.map(one, range(count)))
    return time.perf_counter() - start, latencies


def _mean_batch(server: ServerProcess) -> float:
    page = httpx.get(f"{server.url}/metrics").text
    total = metric_value(page, "diffserve_batch_size_sum")
    count = metric_value(page, "diffserve_batch_size_count")
    return total / count if count else 0.0


def run(args: argparse.Namespace) -> list[Result]:
    model = _model_path(args.model)
    body = {"prompt": "a red fox in the snow", "size": args.size, "num_inference_steps": args.steps}
    results: list[Result] = []
    for b in args.batch_sizes:
        with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
            server = start_server(model, Path(tmp), args=(
                "--device", args.device, "--dtype", args.dtype, "--max-batch-size", str(b),
                "--max-queue", str(args.requests + 8), "--log-level", "warning"))
            try:
                _burst(server, 2, body, seed0=10_000)  # warm-up, not counted
                before = httpx.get(f"{server.url}/metrics").text
                wall, latencies = _burst(server, args.requests, body, seed0=0)
                after = httpx.get(f"{server.url}/metrics").text
            finally:
                server.stop()
        batches = metric_value(after, "diffserve_batch_size_count") - metric_value(before, "diffserve_batch_size_count")
        outputs = metric_value(after, "diffserve_batch_size_sum") - metric_value(before, "diffserve_batch_size_sum")
        ips = args.requests / wall
        base = results[0].images_per_s if results else ips
        q = statistics.quantiles(latencies, n=20)
        results.append(Result(b, args.requests, wall, ips, ips / base, statistics.median(latencies), q[18],
                              outputs / batches if batches else 0.0))
        print(_row(results[-1]), flush=True)
    return results


def _row(r: Result) -> str:
    return (f"max_batch_size={r.max_batch_size:<3} {r.requests} requests in {r.wall_s:7.2f} s  "
            f"{r.images_per_s:7.2f} img/s  x{r.speedup:4.2f}  p50 {r.latency_p50_s:6.2f} s  "
            f"p95 {r.latency_p95_s:6.2f} s  mean batch {r.mean_batch:4.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux-dev", help="fixture name or model folder (default flux-dev)")
    p.add_argument("--requests", type=int, default=32, help="concurrent requests per burst (default 32)")
    p.add_argument("--size", default="64x64", help="WxH (default 64x64)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    p.add_argument("--batch-sizes", default="1,4,8",
                   type=lambda s: [int(x) for x in s.split(",")], help="--max-batch-size values (default 1,4,8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    results = run(args)
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "results": [asdict(r) for r in results]}, indent=2))


if __name__ == "__main__":
    main()
