"""Throughput gain of the server's batching and of data-parallel replicas: the same burst of concurrent
image requests against `diffserve serve --max-batch-size B [--num-gpus D --dp-size D]` for several B and D
(B=1 is no batching, D=1 one GPU).

Usage:
    python benchmarks/bench_server_batching.py [--model flux-dev] [--requests 32] [--size 64x64] [--steps 4]
        [--batch-sizes 1,4,8] [--dp-sizes 1] [--repeats 3] [--warmup N] [--one-at-a-time] [--threads N]
        [--negative-prompt TEXT] [--device cpu] [--dtype fp32] [--out FILE.json]

`--model` is a tiny fixture name (diffserve.testing.fixtures) or a model folder. One server per (D, B) is
started on a free loopback port and warmed up with a burst of `--warmup` requests (default `--requests`; at
least D, so every replica runs once); then `--repeats` rounds each send one burst of `--requests` compatible
requests at once (same size/steps/guidance, each its own seed, n=1, one client thread each) to every server in
turn, so drifting machine load hits every server alike. With `--one-at-a-time` each server is started, timed
and stopped before the next one starts (servers whose GPUs overlap, e.g. D=1 and D=8 on one 8-GPU host, cannot
share the cards). Reported per server (medians over the rounds): wall time of a burst, images/s, the speed-up
over the first server, client latency p50/p95, and the mean batch size the server actually ran (from its
/metrics; with D replicas a batch is cut into up to D chunks that run at the same time). `--threads` sets OMP_NUM_THREADS for the servers
(on a shared, oversubscribed CPU, 1 avoids OpenMP spin-wait stalls that swamp the signal).
On GPU pass e.g. `--model DIR --device cuda --dtype bf16 --size 1024x1024 --steps 28 --requests 16`; 8 replicas
against one GPU: `--dp-sizes 1,8 --batch-sizes 8 --one-at-a-time` (benchmarks/gpu/scaling8_run.sh).
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
    dp_size: int
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


Server = tuple[int, int]  # (dp size, max batch size)


def server_args(dp: int, b: int, args: argparse.Namespace) -> tuple[str, ...]:
    """The `diffserve serve` flags of the server with D=`dp` replicas (one GPU each) and --max-batch-size `b`."""
    gpus = ("--num-gpus", str(dp), "--dp-size", str(dp)) if dp > 1 else ()
    return ("--device", args.device, "--dtype", args.dtype, "--max-batch-size", str(b),
            "--max-queue", str(max(args.requests, args.warmup or 0, dp) + 8), "--log-level", "warning", *gpus)


def _start(model: Path, server: Server, args: argparse.Namespace, workdir: Path) -> ServerProcess:
    dp, b = server
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    return start_server(model, workdir / f"dp{dp}-b{b}", env=env, args=server_args(dp, b, args),
                        ready_timeout=args.ready_timeout)


def warmup_count(args: argparse.Namespace, dp: int) -> int:
    """Requests of the warm-up burst: --warmup (default --requests), at least one per replica."""
    return max(args.requests if args.warmup is None else args.warmup, dp)


def _time_servers(servers: dict[Server, ServerProcess], args: argparse.Namespace, body: dict,
                  walls: dict[Server, list[float]], latencies: dict[Server, list[float]]) -> dict[Server, tuple]:
    """Warm every server up, then `--repeats` rounds of one burst each; (batches, outputs) run per server."""
    for (dp, _), server in servers.items():
        _burst(server, warmup_count(args, dp), body, seed0=10_000)  # warm-up at full size, not counted
    before = {k: _batches(s) for k, s in servers.items()}
    for r in range(args.repeats):
        for (dp, b), server in servers.items():
            wall, lat = _burst(server, args.requests, body, seed0=r * args.requests)
            walls[(dp, b)].append(wall)
            latencies[(dp, b)].extend(lat)
            print(f"round {r}: dp_size={dp} max_batch_size={b} burst {wall:.2f} s", flush=True)
    after = {k: _batches(s) for k, s in servers.items()}
    return {k: tuple(a - z for a, z in zip(after[k], before[k], strict=True)) for k in servers}


def run(args: argparse.Namespace) -> list[Result]:
    model = _model_path(args.model)
    body = {"prompt": "a red fox in the snow", "size": args.size, "num_inference_steps": args.steps}
    if args.negative_prompt is not None:  # e.g. " " for Qwen-Image's true CFG (two forwards per step)
        body["negative_prompt"] = args.negative_prompt
    configs: list[Server] = [(dp, b) for dp in args.dp_sizes for b in args.batch_sizes]
    walls: dict[Server, list[float]] = {k: [] for k in configs}
    latencies: dict[Server, list[float]] = {k: [] for k in configs}
    ran: dict[Server, tuple] = {}
    groups = [[k] for k in configs] if args.one_at_a_time else [configs]
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        for group in groups:
            servers: dict[Server, ServerProcess] = {}
            try:
                for k in group:
                    servers[k] = _start(model, k, args, Path(tmp))
                ran.update(_time_servers(servers, args, body, walls, latencies))
            finally:
                for server in servers.values():
                    server.stop()
    results: list[Result] = []
    for dp, b in configs:
        wall = statistics.median(walls[(dp, b)])
        ips = args.requests / wall
        batches, outputs = ran[(dp, b)]
        lat = latencies[(dp, b)]
        results.append(Result(dp_size=dp, max_batch_size=b, requests=args.requests, wall_s=wall, images_per_s=ips,
                              speedup=ips / (results[0].images_per_s if results else ips),
                              latency_p50_s=statistics.median(lat),
                              latency_p95_s=statistics.quantiles(lat, n=20)[18] if len(lat) > 1 else lat[0],
                              mean_batch=outputs / batches if batches else 0.0, walls_s=walls[(dp, b)]))
    return results


def _row(r: Result) -> str:
    return (f"dp_size={r.dp_size:<2} max_batch_size={r.max_batch_size:<3} {r.requests} requests in {r.wall_s:7.2f} s  "
            f"{r.images_per_s:7.2f} img/s  x{r.speedup:4.2f}  p50 {r.latency_p50_s:6.2f} s  "
            f"p95 {r.latency_p95_s:6.2f} s  mean batch {r.mean_batch:4.2f}  "
            f"(bursts: {', '.join(f'{w:.2f}' for w in r.walls_s)} s)")


def main(argv: list[str] | None = None) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux-dev", help="fixture name or model folder (default flux-dev)")
    p.add_argument("--requests", type=int, default=32, help="concurrent requests per burst (default 32)")
    p.add_argument("--size", default="64x64", help="WxH (default 64x64)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    p.add_argument("--batch-sizes", default="1,4,8",
                   type=lambda s: [int(x) for x in s.split(",")], help="--max-batch-size values (default 1,4,8)")
    p.add_argument("--dp-sizes", default=[1], type=lambda s: [int(x) for x in s.split(",")],
                   help="data-parallel replicas (--num-gpus D --dp-size D) per server (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed bursts per server (default 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="requests of the warm-up burst (default --requests; at least D)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="start, time and stop each server before the next (servers that share GPUs)")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds a server may take to load")
    p.add_argument("--negative-prompt", default=None,
                   help="sent with every request (Qwen-Image runs its true CFG only with one; default none)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the servers (default: unset)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    results = run(args)
    for r in results:
        print(_row(r))
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "results": [asdict(r) for r in results]}, indent=2))
    return results


if __name__ == "__main__":
    main()
