"""The issue 17 load test at a size for 2 CPU cores (benchmarks/load_test.py has the full-size command):
120 image requests and 12 video jobs at once on the embedded models (2 steps), a quarter of them bad inputs,
while the image worker is killed (SIGKILL) and the video worker stopped (SIGSTOP: its missed heartbeats get it
killed and replaced, its running job failed with ``worker_stalled``); then the video server's front is killed
mid-job and restarted on the same output folder (jobs survive, the running one is failed with a reason), and
the image server's worker is killed where it cannot be reloaded (the server exits 1 after three tries).
Loopback only; every request and the run are bounded in time."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from benchmarks.load_test import KEY, LoadConfig, run_load, start_servers
from diffserve.server.testing import ServerProcess, start_server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    image, video = start_servers(tmp_path_factory.mktemp("load"))
    yield image, video
    image.stop()
    video.stop()


def test_load_with_faults_and_bad_inputs(servers: tuple[ServerProcess, ServerProcess]) -> None:
    image, video = servers
    report = run_load(image, video, LoadConfig(images=120, videos=12, concurrency=16, time_limit_s=120))
    print("\nload report:", json.dumps(report, indent=1))
    for kind in ("images", "videos"):
        tally = report[kind]
        assert tally["lost"] == 0 and tally["broken"] == [], tally
        assert tally["sent"] == tally["answered"] + tally["429"]
    assert report["images"]["statuses"].get("200", 0) >= 60  # most of the 90 valid ones got through
    jobs = report["video_jobs"]
    assert jobs.get("unfinished", 0) == 0 and jobs.get("completed", 0) >= 5
    assert jobs.get("worker_stalled", 0) >= 1  # the job running when its worker was stopped (SIGSTOP)
    assert len(report["faults_injected"]) == 2 and all(1 <= n <= 2 for n in report["restarts"].values())
    assert report["metrics_page_bytes"]["after"] < 60_000
    for rss in report["front_rss_mb"].values():
        assert rss["after"] - rss["before"] < 300, report["front_rss_mb"]


def test_jobs_survive_a_killed_front(servers: tuple[ServerProcess, ServerProcess], tmp_path) -> None:
    """Last: it kills the video server (SIGKILL of the front, mid-job) and starts another on its folder."""
    _, video = servers
    with httpx.Client(base_url=video.url, headers=video.headers, timeout=60) as c:
        done = c.post("/v1/videos", json={"prompt": "kept", "size": "32x32", "num_inference_steps": 2}).json()
        while c.get(f"/v1/videos/{done['id']}").json()["status"] not in ("completed", "failed"):
            time.sleep(0.05)
        running = c.post("/v1/videos", json={"prompt": "cut short", "size": "32x32", "num_inference_steps": 500})
        assert running.status_code == 200, running.text
        running = running.json()
        while c.get(f"/v1/videos/{running['id']}").json()["progress"] < 1:
            time.sleep(0.05)
    os.kill(video.proc.pid, signal.SIGKILL)
    video.proc.wait(10)
    again = start_server("embedded:video", video.output_dir.parent, api_key=KEY,
                         args=("--device", "cpu", "--log-level", "warning"))
    try:
        with httpx.Client(base_url=again.url, headers=again.headers, timeout=60) as c:
            listed = {j["id"]: j for j in c.get("/v1/videos", params={"limit": 100}).json()["data"]}
            assert listed[done["id"]]["status"] == "completed"
            assert c.get(f"/v1/videos/{done['id']}/content").content[4:8] == b"ftyp"
            cut = listed[running["id"]]
            assert cut["status"] == "failed" and cut["error"]["code"] == "server_restarted", cut
    finally:
        assert again.stop() == 0


def test_worker_that_cannot_be_reloaded_exits_1(servers: tuple[ServerProcess, ServerProcess]) -> None:
    """After three failed reloads the server answered 503 forever without exiting. Last: it ends the image
    server."""
    image, _ = servers
    (image.output_dir / ".fault-fail-load").touch()  # every later load fails (fault injection is on)
    os.kill(image.worker_pid(), signal.SIGKILL)
    assert image.proc.wait(90) == 1
    assert "gave up after 3 tries" in image.log() and image.log().count("injected load failure") >= 3
