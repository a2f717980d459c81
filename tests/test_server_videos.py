"""`diffserve serve` on the tiny Wan T2V and I2V fixtures: the Videos API through the official openai client
(create, retrieve, download_content, list, delete), progress, cancellation of running and queued jobs,
`seconds` -> frames, input images (upload, data URL, refused URLs), errors, and a worker killed mid-job.

Two real servers (subprocesses on free loopback ports) serve the whole module: T2V without URL inputs,
I2V with --allow-url-inputs."""

from __future__ import annotations

import base64
import io
import os
import signal
import time
from collections.abc import Iterator

import av
import httpx
import openai
import pytest
from PIL import Image

from diffserve.server.testing import ServerProcess, assert_error, metric_value, start_server
from diffserve.testing.fixtures import fixture_path

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks its Videos API deprecated

TINY = {"size": "16x16", "seconds": "0.3"}  # 0.3 s at Wan's 16 fps -> 5 frames
FAST = {"num_inference_steps": 2}
SLOW = {"num_inference_steps": 1000}  # minutes on CPU: only ever cancelled


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    common = ("--dtype", "fp32", "--device", "cpu", "--max-batch-size", "2", "--log-level", "warning")
    t2v = start_server(fixture_path("wan-t2v"), tmp_path_factory.mktemp("t2v"), args=common, wait=False)
    i2v = start_server(fixture_path("wan-i2v"), tmp_path_factory.mktemp("i2v"), args=(*common, "--allow-url-inputs"),
                       wait=False)
    try:
        t2v.wait_ready()
        i2v.wait_ready()
        yield {"t2v": t2v, "i2v": i2v}
    finally:
        codes = {name: s.stop() for name, s in (("t2v", t2v), ("i2v", i2v))}
    assert codes == {"t2v": 0, "i2v": 0}


@pytest.fixture(scope="module")
def t2v(servers) -> ServerProcess:
    return servers["t2v"]


@pytest.fixture(scope="module")
def i2v(servers) -> ServerProcess:
    return servers["i2v"]


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _png(color: tuple[int, int, int] = (220, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def _wait(client: openai.OpenAI, video_id: str, until, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        job = client.videos.retrieve(video_id)
        if until(job):
            return job
        assert time.monotonic() < deadline, f"timed out waiting on {job}"
        time.sleep(0.05)


def _completed(client: openai.OpenAI, video_id: str):
    job = _wait(client, video_id, lambda j: j.status in ("completed", "failed"))
    assert job.status == "completed", job.error
    return job


def _frames(mp4: bytes) -> list:
    assert mp4[4:8] == b"ftyp"
    with av.open(io.BytesIO(mp4)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_t2v_create_poll_download(t2v: ServerProcess) -> None:
    client = _client(t2v)
    job = client.videos.create(prompt="a cat walking", **TINY, extra_body={**FAST, "seed": 3})  # type: ignore[arg-type]
    assert job.object == "video" and job.status in ("queued", "in_progress") and 0 <= job.progress < 100
    assert job.size == "16x16" and job.seconds == "0.3"
    assert job.model_dump()["num_frames"] == 5 and job.model_dump()["seed"] == 3
    done = _completed(client, job.id)
    assert done.progress == 100 and done.completed_at is not None and done.completed_at >= done.created_at
    assert done.error is None
    frames = _frames(client.videos.download_content(job.id).content)
    assert len(frames) == 5 and frames[0].shape == (16, 16, 3)


def test_t2v_list_and_delete(t2v: ServerProcess) -> None:
    client = _client(t2v)
    a = client.videos.create(prompt="first", **TINY, extra_body=FAST)  # type: ignore[arg-type]
    b = client.videos.create(prompt="second", **TINY, extra_body=FAST)  # type: ignore[arg-type]
    _completed(client, a.id)
    _completed(client, b.id)
    newest = [v.id for v in client.videos.list(limit=100).data]
    assert newest.index(b.id) < newest.index(a.id)
    oldest = [v.id for v in client.videos.list(limit=100, order="asc").data]
    assert oldest == list(reversed(newest))
    first = client.videos.list(limit=1)
    assert first.has_more and first.data[0].id == newest[0]
    assert [v.id for v in client.videos.list(limit=1)] == newest  # the SDK pages with `after`
    path = t2v.output_dir / "videos" / f"{a.id}.mp4"
    assert path.is_file()
    deleted = client.videos.delete(a.id)
    assert deleted.deleted and deleted.object == "video.deleted" and deleted.id == a.id
    assert not path.exists()
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(a.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.delete(a.id)
    assert client.videos.retrieve(b.id).status == "completed"


def test_t2v_progress_then_cancel_running(t2v: ServerProcess) -> None:
    client = _client(t2v)
    cancelled_before = metric_value(httpx.get(f"{t2v.url}/metrics").text, "diffserve_generations_total",
                                    'kind="video",outcome="cancelled"')
    job = client.videos.create(prompt="a long one", **TINY, extra_body=SLOW)  # type: ignore[arg-type]
    seen: list[int] = []
    running = _wait(client, job.id, lambda j: seen.append(j.progress) or j.progress >= 1)
    assert running.status == "in_progress" and 1 <= running.progress < 100
    assert seen == sorted(seen)
    assert client.videos.delete(job.id).deleted
    deadline = time.monotonic() + 30  # the worker stops it at its next step
    while metric_value(httpx.get(f"{t2v.url}/metrics").text, "diffserve_generations_total",
                       'kind="video",outcome="cancelled"') == cancelled_before:
        assert time.monotonic() < deadline, "the running job was not stopped"
        time.sleep(0.05)
    assert t2v.health()[1]["worker"]["running"] == 0
    after = client.videos.create(prompt="next", **TINY, extra_body=FAST)  # type: ignore[arg-type]
    _completed(client, after.id)
    assert not (t2v.output_dir / "videos" / f"{job.id}.mp4").exists()


def test_t2v_cancel_queued(t2v: ServerProcess) -> None:
    client = _client(t2v)
    blocker = client.videos.create(prompt="blocker", **TINY, extra_body=SLOW)  # type: ignore[arg-type]
    _wait(client, blocker.id, lambda j: j.status == "in_progress")
    queued = client.videos.create(prompt="waiting", **TINY, extra_body={"num_inference_steps": 3})  # type: ignore
    assert client.videos.retrieve(queued.id).status == "queued"
    assert t2v.health()[1]["queue_depth"] == 1
    assert client.videos.delete(queued.id).deleted
    assert t2v.health()[1]["queue_depth"] == 0
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(queued.id)
    assert client.videos.delete(blocker.id).deleted


@pytest.mark.parametrize("body,frames", [
    ({"seconds": "1", "fps": 4}, 5),
    ({"seconds": 0.3}, 5),
    ({"seconds": "0.75"}, 13),  # 12 frames at 16 fps -> nearest 4k+1 is 13
    ({"seconds": "0.01"}, 1),
    ({"num_frames": 9, "seconds": "4"}, 9),  # num_frames wins
    ({}, 81),  # the model's default
])
def test_seconds_map_to_frames(t2v: ServerProcess, body: dict, frames: int) -> None:
    r = httpx.post(f"{t2v.url}/v1/videos", json={"prompt": "p", "size": "16x16", **body, **SLOW})
    assert r.status_code == 200, r.text
    assert r.json()["num_frames"] == frames
    assert httpx.delete(f"{t2v.url}/v1/videos/{r.json()['id']}").status_code == 200


@pytest.mark.parametrize("body,param", [
    ({"seconds": "100"}, "seconds"),
    ({"seconds": "soon"}, "seconds"),
    ({"seconds": 0}, "seconds"),
    ({"num_frames": 6}, "num_frames"),
    ({"size": "15x16"}, "size"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"fps": 0}, "fps"),
    ({"prompt": ""}, "prompt"),
    ({"model": "sora-2"}, "model"),
    ({"input_reference": {"image_url": "http://example.com/a.png"}}, "input_reference"),
    ({"input_reference": "x"}, "input_reference"),
    ({"extra_thing": 1}, "extra_thing"),
])
def test_t2v_invalid_requests(t2v: ServerProcess, body: dict, param: str) -> None:
    r = httpx.post(f"{t2v.url}/v1/videos", json={"prompt": "p", **TINY, **FAST, **body})
    assert_error(r, 404 if param == "model" else 400, param=param)


def test_t2v_errors(t2v: ServerProcess) -> None:
    client = _client(t2v)
    for call in (client.videos.retrieve, client.videos.download_content, client.videos.delete):
        with pytest.raises(openai.NotFoundError):
            call("video_missing")
    job = client.videos.create(prompt="not yet", **TINY, extra_body=SLOW)  # type: ignore[arg-type]
    assert_error(httpx.get(f"{t2v.url}/v1/videos/{job.id}/content"), 409, code="video_not_ready")
    assert_error(httpx.get(f"{t2v.url}/v1/videos/{job.id}/content?variant=thumbnail"), 400, param="variant")
    client.videos.delete(job.id)
    with pytest.raises(openai.BadRequestError, match="makes videos"):
        client.images.generate(prompt="a cat", size="16x16")
    with pytest.raises(openai.BadRequestError, match="does not take an input image"):
        client.videos.create(prompt="x", **TINY, input_reference=("a.png", _png(), "image/png"))  # type: ignore
    with pytest.raises(openai.BadRequestError, match="without --allow-url-inputs"):
        client.videos.create(prompt="x", **TINY,  # type: ignore[arg-type]
                             extra_body={"input_reference": {"image_url": "https://example.com/cat.png"}})
    assert_error(httpx.get(f"{t2v.url}/v1/videos?limit=0"), 400, param="limit")
    assert_error(httpx.get(f"{t2v.url}/v1/videos?order=sideways"), 400, param="order")
    assert_error(httpx.get(f"{t2v.url}/v1/videos?after=video_missing"), 400, param="after")


def test_i2v_upload(i2v: ServerProcess) -> None:
    client = _client(i2v)
    job = client.videos.create(prompt="the cube spins", **TINY,  # type: ignore[arg-type]
                               input_reference=("ref.png", _png(), "image/png"), extra_body=FAST)
    _completed(client, job.id)
    frames = _frames(client.videos.download_content(job.id).content)
    assert len(frames) == 5 and frames[0].shape == (16, 16, 3)


def test_i2v_data_url_json(i2v: ServerProcess) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(_png((20, 200, 20))).decode()
    r = httpx.post(f"{i2v.url}/v1/videos", json={"prompt": "green", **TINY, **FAST,
                                                 "input_reference": {"image_url": data_url}})
    assert r.status_code == 200, r.text
    _completed(_client(i2v), r.json()["id"])


def test_i2v_input_errors(i2v: ServerProcess) -> None:
    url = f"{i2v.url}/v1/videos"
    form = {"prompt": "x", "size": "16x16", "seconds": "0.3"}
    assert_error(httpx.post(url, data=form), 400, param="input_reference")  # the model needs an image
    for name, data, ctype in (("a.png", b"definitely not an image", "image/png"), ("a.txt", b"hello", "text/plain")):
        err = assert_error(httpx.post(url, data=form, files={"input_reference": (name, data, ctype)}), 400,
                           param="input_reference")
        assert "not a recognized image" in err["message"]
    for target in (f"http://127.0.0.1:{i2v.port}/health", "http://10.1.2.3/cat.png", "http://[::1]/a.png"):
        err = assert_error(httpx.post(url, json={**form, "input_reference": {"image_url": target}}), 400,
                           param="input_reference")
        assert "127.0.0.1" in err["message"] or "10.1.2.3" in err["message"] or "::1" in err["message"], err
    assert_error(httpx.post(url, json={**form, "input_reference": {"file_id": "file_1"}}), 400,
                 param="input_reference")


def test_worker_killed_mid_job_fails_it_and_recovers(t2v: ServerProcess) -> None:
    client = _client(t2v)
    job = client.videos.create(prompt="doomed", **TINY, extra_body=SLOW)  # type: ignore[arg-type]
    _wait(client, job.id, lambda j: j.progress >= 1)
    queued = client.videos.create(prompt="survivor", **TINY, extra_body=FAST)  # type: ignore[arg-type]
    old_pid = t2v.worker_pid()
    os.kill(old_pid, signal.SIGKILL)
    failed = _wait(client, job.id, lambda j: j.status != "in_progress", timeout=30)
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "worker_died"
    assert "SIGKILL" in failed.error.message
    health = t2v.wait_ready(120, not_pid=old_pid)
    assert health["worker"]["restarts"] == 1 and health["worker"]["pid"] != old_pid
    _completed(client, queued.id)  # the queued job was kept and ran on the new worker
