"""Throughput gain of the server's batching: the same burst of concurrent image requests against
`diffserve serve --max-batch-size B` for several B (B=1 is no batching).

Usage:
    python benchmarks/bench_server_batching.py [--model flux-dev] [--requests 32] [--size 64x64] [--steps 4]
        [--batch-sizes 1,4,8] [--repeats 3] [--threads N] [--device cpu] [--dtype fp32] [--out FILE.json]

`--model` is a tiny fixture name (diffserve.testing.fixtures) or a model folder. One server per B is started
on a free loopback port and warmed up with a burst; then `--repeats` rounds each send one burst of
`--requests` compatible requests at once (same size/steps/guidance, each its own seed, n=1, one client thread
each) to every server in turn, so drifting machine load hits every B alike. Reported per B (medians over the
rounds): wall time of a burst, images/s, the speed-up over the first B, client latency p50/p95, and the mean
batch size the server actually ran (from its /metrics). `--threads` sets OMP_NUM_THREADS for the servers
(on a shared, oversubscribed CPU, 1 avoids OpenMP spin-wait stalls that swamp the signal).
On GPU pass e.g. `--model DIR --device cuda --dtype bf16 --size 1024x1024 --steps 28 --requests 16`.
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
    walls_s: list[float]


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


def _batches(server: ServerProcess) -> tuple[float, float]:
    """(batches run, outputs denoised) so far, from the server's metrics."""
    page = httpx.get(f"{server.url}/metrics").text
    return metric_value(page, "diffserve_batch_size_count"), metric_value(page, "diffserve_batch_size_sum")


def _start(model: Path, b: int, args: argparse.Namespace, workdir: Path) -> ServerProcess:
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    return start_server(model, workdir / f"b{b}", env=env, args=(
        "--device", args.device, "--dtype", args.dtype, "--max-batch-size", str(b),
        "--max-queue", str(args.requests + 8), "--log-level", "warning"))


def run(args: argparse.Namespace) -> list[Result]:
    model = _model_path(args.model)
    body = {"prompt": "a red fox in the snow", "size": args.size, "num_inference_steps": args.steps}
    walls: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
    latencies: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        servers = {b: _start(model, b, args, Path(tmp)) for b in args.batch_sizes}
        try:
            for b, server in servers.items():
                _burst(server, args.requests, body, seed0=10_000)  # warm-up at full size, not counted
            before = {b: _batches(s) for b, s in servers.items()}
            for r in range(args.repeats):
                for b, server in servers.items():
                    wall, lat = _burst(server, args.requests, body, seed0=r * args.requests)
                    walls[b].append(wall)
                    latencies[b].extend(lat)
                    print(f"round {r}: max_batch_size={b} burst {wall:.2f} s", flush=True)
            after = {b: _batches(s) for b, s in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
    results: list[Result] = []
    for b in args.batch_sizes:
        wall = statistics.median(walls[b])
        ips = args.requests / wall
        batches, outputs = (a - z for a, z in zip(after[b], before[b], strict=True))
        results.append(Result(b, args.requests, wall, ips, ips / (results[0].images_per_s if results else ips),
                              statistics.median(latencies[b]), statistics.quantiles(latencies[b], n=20)[18],
                              outputs / batches if batches else 0.0, walls[b]))
    return results


def _row(r: Result) -> str:
    return (f"max_batch_size={r.max_batch_size:<3} {r.requests} requests in {r.wall_s:7.2f} s  "
            f"{r.images_per_s:7.2f} img/s  x{r.speedup:4.2f}  p50 {r.latency_p50_s:6.2f} s  "
            f"p95 {r.latency_p95_s:6.2f} s  mean batch {r.mean_batch:4.2f}  "
            f"(bursts: {', '.join(f'{w:.2f}' for w in r.walls_s)} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux-dev", help="fixture name or model folder (default flux-dev)")
    p.add_argument("--requests", type=int, default=32, help="concurrent requests per burst (default 32)")
    p.add_argument("--size", default="64x64", help="WxH (default 64x64)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    p.add_argument("--batch-sizes", default="1,4,8",
                   type=lambda s: [int(x) for x in s.split(",")], help="--max-batch-size values (default 1,4,8)")
    p.add_argument("--repeats", type=int, default=3, help="timed bursts per batch size (default 3)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the servers (default: unset)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    results = run(args)
    for r in results:
        print(_row(r))
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "results": [asdict(r) for r in results]}, indent=2))


if __name__ == "__main__":
    main()
