"""`diffserve serve` under stress of its own process layout, on the tiny FLUX.1-dev fixture: a full queue
(429), the worker killed with SIGKILL mid-request (the request fails at once with a clear error, queued
requests survive, the worker is restarted), a batch that hangs (its deadline; a worker stopped with SIGSTOP,
caught by its missed heartbeats, is in test_server_load), a cancelled batch that cannot reach a step boundary (the cancel grace), SIGTERM with
requests in flight (every request answered, exit 0, worker gone), and a model that cannot be loaded (exit 1;
a worker that cannot be reloaded after dying is in test_server_load).

The module's server runs with --max-queue 2 --max-batch-size 1 --shutdown-grace 1 and a short watchdog
(heartbeat 3 s, batch base 8 s, cancel grace 2 s); the SIGTERM test ends it, so it comes last."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import openai
import pytest

from diffserve.server.testing import (
    RawRequest,
    ServerProcess,
    assert_error,
    metric_value,
    start_server,
    wait_health,
)

BLOCKING_STEPS = 1000  # far longer than any test waits: such requests end by disconnect, kill or shutdown
WATCHDOG = ("--worker-heartbeat-timeout", "3", "--batch-timeout-base", "8", "--cancel-grace", "2")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, flux_dev_repo):
    srv = start_server(flux_dev_repo, tmp_path_factory.mktemp("server-lifecycle"),
                       args=("--dtype", "fp32", "--device", "cpu", "--max-queue", "2", "--max-batch-size", "1",
                             "--shutdown-grace", "1", "--log-level", "info", *WATCHDOG),
                       env={"DIFFSERVE_SERVER_FAULT_INJECTION": "1"})
    yield srv
    srv.stop()


def _post(server: ServerProcess, steps: int = 2, seed: int = 0, prompt: str = "a cube") -> httpx.Response:
    body = {"prompt": prompt, "size": "32x32", "num_inference_steps": steps, "seed": seed}
    return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=120)


def _start_blocker(pool: ThreadPoolExecutor, server: ServerProcess) -> Future:
    fut = pool.submit(_post, server, BLOCKING_STEPS)
    wait_health(server, lambda _, b: b["worker"]["running"] == 1, "the blocking request to start")
    return fut


def _cancelled(server: ServerProcess) -> float:
    page = httpx.get(f"{server.url}/metrics").text
    return metric_value(page, "diffserve_generations_total", 'kind="image",outcome="cancelled"')


def test_full_queue_answers_429(server: ServerProcess) -> None:
    blocker = RawRequest(server, "/v1/images/generations",
                         {"prompt": "blocker", "size": "32x32", "num_inference_steps": BLOCKING_STEPS})
    wait_health(server, lambda _, b: b["worker"]["running"] == 1, "the blocking request to start")
    with ThreadPoolExecutor(2) as pool:
        queued = [pool.submit(_post, server, 2, seed) for seed in (1, 2)]
        wait_health(server, lambda _, b: b["queue_depth"] == 2, "two queued requests")
        assert_error(_post(server), 429, code="queue_full")
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.images.generate(prompt="one too many", size="32x32")
        blocker.close()
        assert [f.result().status_code for f in queued] == [200, 200]


def test_client_disconnect_cancels_its_request(server: ServerProcess) -> None:
    before = _cancelled(server)
    running = RawRequest(server, "/v1/images/generations",
                         {"prompt": "abandoned", "size": "32x32", "num_inference_steps": BLOCKING_STEPS})
    wait_health(server, lambda _, b: b["worker"]["running"] == 1, "the request to start")
    queued = RawRequest(server, "/v1/images/generations",
                        {"prompt": "abandoned too", "size": "32x32", "num_inference_steps": 3})
    wait_health(server, lambda _, b: b["queue_depth"] == 1, "a queued request")
    queued.close()  # leaves the queue
    wait_health(server, lambda _, b: b["queue_depth"] == 0, "the queue to empty", timeout=10)
    running.close()  # stops at its next step
    wait_health(server, lambda _, b: b["worker"]["running"] == 0, "the worker to stop", timeout=30)
    assert _cancelled(server) == before + 1
    assert _post(server).status_code == 200


def test_worker_killed_mid_request_recovers(server: ServerProcess) -> None:
    with ThreadPoolExecutor(2) as pool:
        doomed = _start_blocker(pool, server)
        survivor = pool.submit(_post, server, 2, 5)
        wait_health(server, lambda _, b: b["queue_depth"] == 1, "a queued request")
        old_pid = server.worker_pid()
        t0 = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        err = assert_error(doomed.result(timeout=30), 500, code="worker_died")
        assert time.monotonic() - t0 < 10 and "SIGKILL" in err["message"] and err["type"] == "server_error"
        status, health = server.health()
        assert status == 503 and health["status"] == "restarting", health
        assert health["worker"]["restarts"] == 1 and "SIGKILL" in health["worker"]["last_error"]
        health = server.wait_ready(120, not_pid=old_pid)
        assert survivor.result(timeout=60).status_code == 200  # queued work was kept for the new worker
    assert health["worker"]["pid"] != old_pid
    assert _post(server).status_code == 200
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)


def _restarted(server: ServerProcess, old_pid: int, restarts: int) -> dict:
    """Wait for a new worker; check the old one is gone and the restart was counted."""
    health = server.wait_ready(120, not_pid=old_pid)
    assert health["worker"]["restarts"] == restarts, health
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)
    return health


def test_hung_batch_fails_at_its_deadline(server: ServerProcess) -> None:
    """A batch that never ends (heartbeats still coming) hung its request: it has a deadline now."""
    restarts = server.health()[1]["worker"]["restarts"]
    old_pid = server.worker_pid()
    t0 = time.monotonic()
    err = assert_error(_post(server, prompt="__fault_hang__ forever"), 504, code="generation_timeout")
    assert 7 < time.monotonic() - t0 < 90 and "deadline" in err["message"]
    assert "deadline" in server.health()[1]["worker"]["last_error"]
    _restarted(server, old_pid, restarts + 1)


def test_cancelled_batch_that_cannot_stop_is_ended(server: ServerProcess) -> None:
    """A cancelled request whose step does not end kept the worker busy (195 s for a 2048² step)."""
    restarts, before = server.health()[1]["worker"]["restarts"], _cancelled(server)
    stuck = RawRequest(server, "/v1/images/generations",
                       {"prompt": "__fault_hang__ abandoned", "size": "32x32", "num_inference_steps": 2})
    health = wait_health(server, lambda _, b: (b["worker"]["batch_steps"] or [0])[0] >= 1, "the request to hang")
    old_pid, grace = health["worker"]["pid"], max(2.0, health["worker"]["load_s"])  # at least a model load
    t0 = time.monotonic()
    stuck.close()
    wait_health(server, lambda _, b: b["worker"]["pid"] != old_pid or b["status"] != "ready",
                "the worker to be replaced", timeout=20)
    assert grace - 0.5 < time.monotonic() - t0 < grace + 6  # the cancel grace, not the batch's deadline
    assert _cancelled(server) == before + 1
    _restarted(server, old_pid, restarts + 1)
    assert _post(server).status_code == 200


def test_unloadable_model_exits_1(tmp_path) -> None:
    srv = start_server(tmp_path / "no-such-model", tmp_path, args=("--device", "cpu"), wait=False)
    try:
        assert srv.proc.wait(120) == 1
    finally:
        srv.stop(5)
    assert "could not be loaded" in srv.log()


def test_sigterm_with_requests_in_flight_ends_cleanly(server: ServerProcess) -> None:
    """Last: it stops the module's server."""
    worker_pid = server.worker_pid()
    with ThreadPoolExecutor(3) as pool:
        running = _start_blocker(pool, server)
        queued = [pool.submit(_post, server, 2, seed) for seed in (7, 8)]
        wait_health(server, lambda _, b: b["queue_depth"] == 2, "two queued requests")
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for fut in (running, *queued):  # every request is answered, none hangs or is reset
            assert_error(fut.result(timeout=60), 503, code="shutting_down")
        assert server.proc.wait(60) == 0
    assert time.monotonic() - t0 < 30
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)
    with pytest.raises(httpx.ConnectError):
        server.health()
    assert "shutting down" in server.log()

