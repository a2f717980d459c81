"""Attack-minded load test of `diffserve serve` on the embedded models, over loopback only.

Two servers (the embedded image model and the embedded video model, started here on free 127.0.0.1 ports)
get, at once from `--concurrency` client threads: `--images` image requests (valid ones mixed with bad
inputs: broken sizes, non-ASCII digits, lone surrogates, NUL and control characters, empty and malformed
bodies, unknown fields, over-cost and over-size requests, junk methods and paths) and `--videos` video jobs
(created, then polled to the end). Faults are injected midway: the image worker is killed (SIGKILL) and the
video worker is stopped (SIGSTOP; its heartbeats stop, the server must kill and replace it).

Clients behave: a valid request answered 429 is sent again after its Retry-After (at most 2 s, while the
run's time lasts). Every request is bounded in time (`--request-timeout`) and the whole run by `--time-limit`.
Reported: sent, answered (any HTTP answer but 429), 429 (still queue-full when its client gave up), retries
after a 429, lost (no answer: connection error or timeout), answers that broke the rules (a valid request answered 4xx, a bad one not 4xx, any 5xx outside the fault windows,
a job that never finished), the /metrics page size, and the memory (RSS) of the front processes before and
after. The test suite runs a small version (tests/test_server_load.py); the full size is the default here:

    python benchmarks/load_test.py [--images 500] [--videos 50] [--concurrency 32] [--steps 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from diffserve.server.testing import ServerProcess, start_server, wait_health

KEY = "sk-load"
SLOW_STEPS = 200  # the video job that is running when its worker is stopped
FAULT_CODES = {"worker_died", "worker_stalled", "generation_timeout"}
SERVER_ARGS = ("--device", "cpu", "--max-batch-size", "8", "--batch-wait-ms", "10", "--log-level", "warning",
               "--worker-heartbeat-timeout", "3", "--max-upload-mb", "2")

# (what it tries, JSON body or raw bytes, expected status)
BAD_IMAGE_INPUTS: list[tuple[str, Any, int]] = [
    ("size not a multiple", {"prompt": "x", "size": "33x32"}, 400),
    ("non-ASCII digits in size", {"prompt": "x", "size": "\uff16\uff14x64"}, 400),
    ("n over the batch size", {"prompt": "x", "n": 99}, 400),
    ("steps below 1", {"prompt": "x", "num_inference_steps": -1}, 400),
    ("over the cost ceiling", {"prompt": "x", "size": "4096x4096", "num_inference_steps": 1000}, 400),
    ("lone surrogate", b'{"prompt": "a \\ud800"}', 400),
    ("NUL in prompt", {"prompt": "a\u0000b"}, 400),
    ("escape character in prompt", {"prompt": "a\u001b[31m"}, 400),
    ("empty body", b"", 400),
    ("malformed JSON", b"{not json", 400),
    ("unknown field", {"prompt": "x", "colour": "red"}, 400),
    ("wrong JSON type", {"prompt": "x", "n": "2"}, 400),
    ("unknown model", {"prompt": "x", "model": "dall-e-3"}, 404),
    ("body over the upload limit", {"prompt": "y" * (3 * 2**20)}, 413),
]
BAD_VIDEO_INPUTS: list[tuple[str, Any, int]] = [
    ("lone surrogate", b'{"prompt": "a \\ud800"}', 400),
    ("frames not 4k+1", {"prompt": "x", "num_frames": 6}, 400),
    ("seconds not a number", {"prompt": "x", "seconds": "soon"}, 400),
    ("over the cost ceiling", {"prompt": "x", "size": "2048x2048", "num_inference_steps": 1000}, 400),
]


@dataclass
class LoadConfig:
    images: int = 500
    videos: int = 50
    concurrency: int = 32
    steps: int = 2
    request_timeout_s: float = 120.0
    time_limit_s: float = 900.0
    kill_image_worker: bool = True
    stop_video_worker: bool = True


@dataclass
class Tally:
    """Outcomes of one kind of traffic."""

    sent: int = 0
    answered: int = 0
    rate_limited: int = 0
    retries: int = 0
    lost: int = 0
    statuses: Counter = field(default_factory=Counter)
    broken: list[str] = field(default_factory=list)  # answers that broke the rules
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, what: str, status: int | None, ok: bool) -> None:
        with self.lock:
            self.sent += 1
            if status is None:
                self.lost += 1
            elif status == 429:
                self.rate_limited += 1
            else:
                self.answered += 1
            self.statuses[str(status)] += 1
            if status is not None and not ok:
                self.broken.append(f"{what}: {status}")

    def summary(self) -> dict[str, Any]:
        return {"sent": self.sent, "answered": self.answered, "429": self.rate_limited, "lost": self.lost,
                "retries_after_429": self.retries, "statuses": dict(self.statuses), "broken": self.broken[:20]}


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _send(client: httpx.Client, method: str, path: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return client.request(method, path, content=body, headers={"content-type": "application/json"})
    return client.request(method, path, json=body)


def _send_politely(client: httpx.Client, method: str, path: str, body: Any, tally: Tally,
                   deadline: float) -> httpx.Response:
    """Send; on 429 wait its Retry-After (at most 2 s) and send again while the run's time lasts."""
    while True:
        r = _send(client, method, path, body)
        if r.status_code != 429 or time.monotonic() + 2 > deadline:
            return r
        with tally.lock:
            tally.retries += 1
        time.sleep(min(2.0, float(r.headers.get("retry-after", "1"))))


def _code(r: httpx.Response) -> str | None:
    try:
        return r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


class Faults:
    """Which faults were injected, and whether one is under way (5xx from the hit requests are expected)."""

    def __init__(self) -> None:
        self.injected: list[str] = []
        self.survived: list[str] = []

    def expected(self, r: httpx.Response) -> bool:
        return r.status_code >= 500 and _code(r) in FAULT_CODES | {"model_loading", "shutting_down"}


def _image_request(i: int, steps: int) -> tuple[str, str, str, Any, int]:
    """Request i of the image traffic: (label, method, path, body, expected status); every 4th is bad."""
    if i % 4 == 3:
        bad = i // 4
        if bad % 8 == 7:  # junk methods and paths: they must not grow /metrics
            return "junk method", f"X{bad:05d}", f"/v1/junk/{bad}", None, 405 if bad % 2 else 404
        label, body, status = BAD_IMAGE_INPUTS[bad % len(BAD_IMAGE_INPUTS)]
        return label, "POST", "/v1/images/generations", body, status
    size = "32x32" if i % 2 else "64x64"
    body = {"prompt": f"a red circle {i}", "size": size, "n": 1 + i % 2, "seed": i, "num_inference_steps": steps}
    return "valid", "POST", "/v1/images/generations", body, 200


def run_images(server: ServerProcess, cfg: LoadConfig, faults: Faults, deadline: float) -> Tally:
    tally = Tally()
    kill_at = cfg.images // 3 if cfg.kill_image_worker else -1

    def one(i: int) -> None:
        if time.monotonic() > deadline:
            return
        if i == kill_at:
            pid = server.worker_pid()
            os.kill(pid, signal.SIGKILL)
            faults.injected.append(f"image worker SIGKILL (pid {pid})")
        label, method, path, body, expected = _image_request(i, cfg.steps)
        try:
            with httpx.Client(base_url=server.url, headers=server.headers, timeout=cfg.request_timeout_s) as c:
                r = _send_politely(c, method, path, body, tally, deadline) if expected == 200 else _send(
                    c, method, path, body)
        except httpx.HTTPError:
            tally.record(label, None, False)
            return
        ok = r.status_code in (expected, 429) or (label == "junk method" and r.status_code in (404, 405))
        ok = ok or faults.expected(r) or (expected == 200 and r.status_code == 503 and _code(r) == "model_loading")
        tally.record(label, r.status_code, ok)

    with ThreadPoolExecutor(cfg.concurrency) as pool:
        list(pool.map(one, range(cfg.images)))
    return tally


def run_videos(server: ServerProcess, cfg: LoadConfig, faults: Faults, deadline: float) -> tuple[Tally, Counter]:
    tally, outcomes, ids = Tally(), Counter(), []
    lock = threading.Lock()

    def create(i: int) -> None:
        if i % 5 == 4:
            label, body, expected = BAD_VIDEO_INPUTS[(i // 5) % len(BAD_VIDEO_INPUTS)]
        else:
            label, expected = "valid", 200
            body = {"prompt": f"a blue square moving right {i}", "size": "32x32", "seed": i,
                    "num_inference_steps": SLOW_STEPS if i == 0 else cfg.steps}  # job 0 runs while stopped
        try:
            with httpx.Client(base_url=server.url, headers=server.headers, timeout=cfg.request_timeout_s) as c:
                r = _send_politely(c, "POST", "/v1/videos", body, tally, deadline)
        except httpx.HTTPError:
            tally.record(label, None, False)
            return
        tally.record(label, r.status_code, r.status_code in (expected, 429))
        if r.status_code == 200:
            with lock:
                ids.append(r.json()["id"])

    with ThreadPoolExecutor(min(cfg.concurrency, 16) + 1) as pool:
        if cfg.stop_video_worker:
            pool.submit(_stop_video_worker, server, faults)
        list(pool.map(create, range(cfg.videos)))
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=cfg.request_timeout_s) as c:
        pending = list(ids)
        while pending and time.monotonic() < deadline:
            job = c.get(f"/v1/videos/{pending[0]}").json()
            if job["status"] in ("completed", "failed"):
                outcomes[job["status"] if job["status"] == "completed" else job["error"]["code"]] += 1
                if job["status"] == "completed":
                    assert c.get(f"/v1/videos/{job['id']}/content").content[4:8] == b"ftyp"
                pending.pop(0)
            else:
                time.sleep(0.05)
        outcomes["unfinished"] += len(pending)
    return tally, outcomes


def _stop_video_worker(server: ServerProcess, faults: Faults) -> None:
    """SIGSTOP the video worker while it runs the slow job; the server must notice the silence and replace it."""
    def slow_job_running(_: int, health: dict) -> bool:
        steps = health["worker"]["batch_steps"]
        return bool(steps) and steps[1] == SLOW_STEPS and steps[0] >= 1

    try:
        wait_health(server, slow_job_running, "the slow video job to run", timeout=60)
    except TimeoutError:
        return
    pid = server.worker_pid()
    os.kill(pid, signal.SIGSTOP)
    faults.injected.append(f"video worker SIGSTOP (pid {pid})")


def run_load(image: ServerProcess, video: ServerProcess, cfg: LoadConfig) -> dict[str, Any]:
    """Send the mixed traffic to two running servers; the report (see the module docstring)."""
    start = time.monotonic()
    deadline = start + cfg.time_limit_s
    faults = Faults()
    front_before = {"image": rss_mb(image.proc.pid), "video": rss_mb(video.proc.pid)}
    metrics_before = len(httpx.get(f"{image.url}/metrics").content)
    with ThreadPoolExecutor(2) as both:
        images = both.submit(run_images, image, cfg, faults, deadline)
        videos = both.submit(run_videos, video, cfg, faults, deadline)
        image_tally, (video_tally, jobs) = images.result(), videos.result()
    for name, server in (("image", image), ("video", video)):
        server.wait_ready(120)  # every fault was survived: a worker is serving again
        faults.survived.append(f"{name} server ready again")
    report = {
        "config": asdict(cfg), "elapsed_s": round(time.monotonic() - start, 1),
        "images": image_tally.summary(), "videos": video_tally.summary(), "video_jobs": dict(jobs),
        "faults_injected": faults.injected, "faults_survived": faults.survived,
        "bad_inputs_tried": sorted({b[0] for b in BAD_IMAGE_INPUTS} | {"junk method"}
                                   | {"video: " + b[0] for b in BAD_VIDEO_INPUTS}),
        "metrics_page_bytes": {"before": metrics_before, "after": len(httpx.get(f"{image.url}/metrics").content)},
        "front_rss_mb": {k: {"before": round(v, 1), "after": round(rss_mb(s.proc.pid), 1)}
                         for (k, v), s in zip(front_before.items(), (image, video), strict=True)},
        "restarts": {"image": image.health()[1]["worker"]["restarts"],
                     "video": video.health()[1]["worker"]["restarts"]},
    }
    return report


def start_servers(workdir: Path, extra: tuple[str, ...] = ()) -> tuple[ServerProcess, ServerProcess]:
    """The embedded image and video models, each on its own loopback port (started side by side)."""
    env = {"DIFFSERVE_SERVER_FAULT_INJECTION": "1"}
    image = start_server("embedded:image", workdir / "image", api_key=KEY, env=env, wait=False,
                         args=(*SERVER_ARGS, "--max-queue", "24", *extra))
    video = start_server("embedded:video", workdir / "video", api_key=KEY, env=env, wait=False,
                         args=(*SERVER_ARGS, "--max-queue", "64", *extra))
    try:
        image.wait_ready()
        video.wait_ready()
    except BaseException:
        image.stop(10)
        video.stop(10)
        raise
    return image, video


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--videos", type=int, default=50)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=900.0)
    p.add_argument("--no-faults", action="store_true", help="no SIGKILL / SIGSTOP of the workers")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here too")
    args = p.parse_args()
    cfg = LoadConfig(images=args.images, videos=args.videos, concurrency=args.concurrency, steps=args.steps,
                     time_limit_s=args.time_limit, kill_image_worker=not args.no_faults,
                     stop_video_worker=not args.no_faults)
    with tempfile.TemporaryDirectory(prefix="diffserve-load-") as tmp:
        image, video = start_servers(Path(tmp))
        try:
            report = run_load(image, video, cfg)
        finally:
            codes = [image.stop(), video.stop()]
    report["exit_codes"] = codes
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    bad = report["images"]["lost"] + report["videos"]["lost"] + len(report["images"]["broken"])
    return 1 if bad or report["video_jobs"].get("unfinished") or codes != [0, 0] else 0


if __name__ == "__main__":
    raise SystemExit(main())
