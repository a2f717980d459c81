"""Start a real `diffserve serve` in a subprocess on a free loopback port (for tests and benchmarks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A running server: its process, address, API key and log file."""

    proc: subprocess.Popen
    port: int
    api_key: str | None
    log_path: Path
    output_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def health(self) -> tuple[int, dict[str, Any]]:
        r = httpx.get(f"{self.url}/health", timeout=5.0)
        return r.status_code, r.json()

    def worker_pid(self) -> int:
        return int(self.health()[1]["worker"]["pid"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0, *, not_pid: int | None = None) -> dict[str, Any]:
        """Wait until /health says ready (with a worker other than `not_pid`, when given)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                status, body = self.health()
                if status == 200 and body["worker"]["pid"] != not_pid:
                    return body
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the server was not ready within {timeout} s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for the exit status (SIGKILL after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


def start_server(model_path: str | Path, workdir: Path, *, args: tuple[str, ...] = (), api_key: str | None = None,
                 env: dict[str, str] | None = None, wait: bool = True, ready_timeout: float = 180.0
                 ) -> ServerProcess:
    """`python -m diffserve.cli serve` on a free port with outputs and log under `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    output_dir = workdir / "outputs"
    log_path = workdir / "server.log"
    cmd = [sys.executable, "-m", "diffserve.cli", "serve", "--model-path", str(model_path), "--host", "127.0.0.1",
           "--port", str(port), "--output-dir", str(output_dir), *args]
    if api_key:
        cmd += ["--api-key", api_key]
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(proc=proc, port=port, api_key=api_key, log_path=log_path, output_dir=output_dir)
    if wait:
        try:
            server.wait_ready(ready_timeout)
        except BaseException:
            server.stop(10)
            raise
    return server


class RawRequest:
    """A JSON POST sent on a plain socket, so a test decides when the client goes away (`close`)."""

    def __init__(self, server: ServerProcess, path: str, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n")
        if server.api_key:
            head += f"Authorization: Bearer {server.api_key}\r\n"
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)
        self.sock.sendall(head.encode() + b"\r\n" + payload)

    def status(self) -> int:
        """Wait for the response and return its status code."""
        line = self.sock.makefile("rb").readline()
        return int(line.split()[1])

    def close(self) -> None:
        self.sock.close()


def wait_health(server: ServerProcess, predicate: Any, what: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll /health until predicate(status_code, body) holds; the body."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = server.health()
        if predicate(status, body):
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}: {body}")
        time.sleep(0.02)


def assert_error(response: httpx.Response, status: int, *, param: str | None = None,
                 code: str | None = None) -> dict[str, Any]:
    """Check `response` is an OpenAI-shaped error with this status (and param / code when given)."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of one sample of a Prometheus text page (0 when absent), e.g.
    metric_value(page, "diffserve_batch_size_bucket", 'le="4"')."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def stub_app(output_dir: Path, defaults: Any, *, answer: bool = True, **config: Any) -> tuple[Any, Any, list]:
    """The real app (FastAPI's TestClient) over a runtime whose worker is a stub: the model's `defaults`
    (a ModelDefaults) are known at once, no process is started. Submitted work items are recorded in the
    returned list and, with `answer`, answered at once with one b"img" blob per output; without it they wait
    in the real queue. `config`: ServerConfig fields. Returns (client, runtime, items)."""
    from fastapi.testclient import TestClient

    from diffserve.server.app import create_app
    from diffserve.server.messages import ItemDone, Ready, WorkerConfig
    from diffserve.server.runtime import Runtime, ServerConfig

    rt = Runtime(ServerConfig(worker=WorkerConfig("stub"), model_id="stub", output_dir=output_dir, **config))
    rt.outputs.open()
    rt.supervisor.info = Ready(defaults=defaults, pipeline_class="Stub", device="cpu", dtype="float32", pid=0)
    rt.supervisor.state = "ready"
    items: list = []
    queue = rt.submit

    def submit(item: Any) -> None:
        items.append(item)
        if not answer:
            queue(item)
            return
        item.future.set_result(ItemDone(0, item.id, blobs=[b"img"] * item.n, seed=item.request.seed))

    rt.submit = submit  # type: ignore[method-assign]
    return TestClient(create_app(rt)), rt, items


# Debian's Chromium, driven by Playwright (never `playwright install`: the browser comes from the system).
CHROMIUM_PATH = "/usr/bin/chromium"
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")


def launch_chromium(playwright: Any) -> Any:
    """A headless Chromium browser from a started `playwright.sync_api.sync_playwright()`."""
    if not os.access(CHROMIUM_PATH, os.X_OK):
        raise RuntimeError(f"{CHROMIUM_PATH} is missing: install Debian's chromium (apt-get install -y chromium)")
    return playwright.chromium.launch(executable_path=CHROMIUM_PATH, args=list(CHROMIUM_ARGS))


class ThreadedServer:
    """An ASGI app served by uvicorn in a thread of this process on a free loopback port (no lifespan: for
    `stub_app`'s runtime, whose worker is never started). A context manager; `url` is its address."""

    def __init__(self, app: Any) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, lifespan="off", log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="diffserve-test-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the threaded test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
