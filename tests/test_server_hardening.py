"""Issue 17 ("Server II") without a model process: the real app over a stub worker (`stub_app`) and the
server's parts alone. Each test names the defect it guards against.

1 metrics labels / scrape on the loop / key; 2 huge input images; 3 invalid Unicode; 5 cost ceiling;
6 key before body, offline docs; 7 TTL, quota, pagination; 8 readiness vs liveness; 9 small ones;
10 jobs across restarts; 12 CORS. Stalls, deadlines and exit codes need a real worker: test_server_lifecycle.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import sqlite3
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from diffserve.config import GenerationRequest, ModelDefaults
from diffserve.server.inputs import WorkingSize
from diffserve.server.jobs import JobStore, VideoJob
from diffserve.server.messages import EncodedImage, OutputSpec
from diffserve.server.metrics import MAX_SERIES, Counter
from diffserve.server.outputs import LocalOutputStore
from diffserve.server.protocol import APIError
from diffserve.server.scheduler import Scheduler, WorkItem
from diffserve.server.testing import assert_error, metric_value, stub_app

KEY = "sk-stub"
IMAGE = ModelDefaults(kind="image", height=64, width=64, num_inference_steps=20, guidance_scale=0.0)
I2V = ModelDefaults(kind="video", height=64, width=64, num_inference_steps=20, guidance_scale=1.0, num_frames=9,
                    fps=8, needs_image=True, accepts_image=True)
T2V = ModelDefaults(kind="video", height=64, width=64, num_inference_steps=20, guidance_scale=1.0, num_frames=9,
                    fps=8)


def _png(size: tuple[int, int], color: tuple[int, int, int] = (0, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _blank_png_header(width: int, height: int) -> bytes:
    """A PNG of `width` x `height` whose pixel data is cut off: all a server that checks sizes first reads."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 4096))


def _post_json(http: Any, path: str, body: dict) -> Any:
    """POST `body` as JSON with non-ASCII escaped (how a client sends a lone surrogate: "\\ud800")."""
    return http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def _job(job_id: str, prompt: str = "p") -> VideoJob:
    return VideoJob(id=job_id, model="m", prompt=prompt, size="64x64", seconds="1", num_frames=9, fps=8, seed=1,
                    num_inference_steps=2)


# ------------------------------------------------------------------------------------------ 1 metrics


def test_metrics_labels_stay_a_closed_set(tmp_path: Path) -> None:
    """80k requests with random methods grew /metrics to 130 MB: the raw method was a label."""
    http, _, _ = stub_app(tmp_path, IMAGE)
    rng = random.Random(0)
    for i in range(300):
        method = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(8))
        http.request(method, f"/v1/models/{i}" if i % 2 else f"/random/{i}")
    page = http.get("/metrics").text
    assert 'method="other"' in page and 'route="unmatched"' in page
    methods = {part.split('"')[1] for part in page.split('method=')[1:]}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}, methods
    assert len(page) < 20_000
    counter = Counter("c", "c", ("a",))
    for i in range(MAX_SERIES + 100):
        counter.inc(str(i))
    assert len(counter.render()) - 2 == MAX_SERIES + 1 and counter.value("other") == 100


def test_metrics_render_off_the_event_loop_and_may_need_the_key(tmp_path: Path) -> None:
    """A 4.4 s scrape stalled /health: the page was rendered inside the async route."""
    http, rt, _ = stub_app(tmp_path, IMAGE, api_key=KEY, metrics_require_key=True)
    render, threads = rt.metrics.render, []

    def spy() -> str:
        try:
            asyncio.get_running_loop()
            threads.append("event loop")
        except RuntimeError:
            threads.append("worker thread")
        return render()

    rt.metrics.render = spy  # type: ignore[method-assign]
    assert_error(http.get("/metrics"), 401, code="invalid_api_key")
    assert http.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert threads == ["worker thread"]
    open_http, _, _ = stub_app(tmp_path / "open", IMAGE, api_key=KEY)
    assert open_http.get("/metrics").status_code == 200  # open unless asked


# ------------------------------------------------------------------------------------------ 2 images


def test_huge_input_image_is_refused_before_decoding(tmp_path: Path) -> None:
    """A 62 KB blank 8000x8000 PNG was decoded (67 MP accepted) and its pixels queued and pickled."""
    http, _, items = stub_app(tmp_path, I2V)
    bomb = _blank_png_header(8000, 8000)
    start = time.monotonic()
    err = assert_error(http.post("/v1/videos", data={"prompt": "x"},
                                 files={"input_reference": ("a.png", bomb, "image/png")}), 400,
                       param="input_reference", code="invalid_image")
    assert "8000x8000" in err["message"] and time.monotonic() - start < 2.0
    assert items == [] and http.get("/v1/models").json()["data"][0]["limits"]["max_input_pixels"] == 4096**2
    edit_model = ModelDefaults(kind="image", height=64, width=64, num_inference_steps=4, guidance_scale=1.0,
                               accepts_image=True, needs_image=True, size_from_image_area=64 * 64)
    edit, _, edits = stub_app(tmp_path / "edit", edit_model)  # edits take the same path
    assert_error(edit.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", bomb, "image/png")}),
                 400, param="image", code="invalid_image")
    assert edits == []


def test_large_input_image_is_shrunk_and_queued_compressed(tmp_path: Path) -> None:
    """Images under the limit reached the worker at full resolution, as decoded arrays."""
    http, rt, items = stub_app(tmp_path, I2V, answer=False)
    big = _png((3000, 2000), (200, 30, 30))
    r = http.post("/v1/videos", data={"prompt": "x", "size": "64x64"},
                  files={"input_reference": ("a.png", big, "image/png")})
    assert r.status_code == 200, r.text
    image = items[0].request.image
    assert isinstance(image, EncodedImage) and image.size == (768, 512)  # the short side kept at 512
    decoded = image.decode()
    assert decoded.size == (768, 512) and decoded.getpixel((10, 10)) == (200, 30, 30)
    assert rt.scheduler.queued_bytes < 100_000
    small = _png((40, 24))
    http.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("a.png", small, "image/png")})
    assert items[1].request.image.data == small  # no shrinking needed: the upload's own bytes


def test_working_size_covers_what_the_model_uses() -> None:
    assert WorkingSize(832, 480).scale((8000, 8000)) == pytest.approx(832 / 8000)
    assert WorkingSize(area=1024 * 1024).scale((4096, 4096)) == pytest.approx((1024 + 32) / 4096)
    assert WorkingSize(64, 64).scale((1000, 500)) == 1.0  # never below a 512 short side
    assert WorkingSize(64, 64).scale((2048, 1024)) == 0.5


def test_queue_memory_budget_answers_429() -> None:
    s = Scheduler(max_queue=100, max_batch_size=4, max_queue_bytes=2_500_000)
    image = EncodedImage(b"x" * 1_000_000, (10, 10))

    def item(i: int) -> WorkItem:
        req = GenerationRequest(prompt="p", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                                image=image, max_sequence_length=32)
        return WorkItem(id=str(i), kind="image", request=req, output=OutputSpec("png"))

    s.submit(item(0))
    s.submit(item(1))
    with pytest.raises(APIError) as e:
        s.submit(item(2))
    assert e.value.status == 429 and "bytes" in e.value.message
    s.next_batch(0)
    assert s.queued_bytes == 0
    s.submit(item(3))


# ------------------------------------------------------------------------------------------ 3 text


@pytest.mark.parametrize("prompt,what", [("a \ud800", "surrogate"), ("a\x00b", "U+0000"), ("a\x1bb", "U+001B")])
def test_invalid_text_is_400_and_nothing_is_stored(tmp_path: Path, prompt: str, what: str) -> None:
    """A lone surrogate was stored as a job that broke GET /v1/videos for everyone (and images gave 500)."""
    video, _, items = stub_app(tmp_path / "v", T2V)
    err = assert_error(_post_json(video, "/v1/videos", {"prompt": prompt}), 400, param="prompt", code="invalid_text")
    assert what in err["message"]
    assert video.get("/v1/videos").json()["data"] == [] and items == []
    image, _, _ = stub_app(tmp_path / "i", IMAGE)
    assert_error(_post_json(image, "/v1/images/generations", {"prompt": prompt}), 400, param="prompt",
                 code="invalid_text")
    assert_error(_post_json(image, "/v1/images/generations", {"prompt": "ok", "model": "m\ud800"}), 400,
                 param="model")
    assert image.post("/v1/images/generations", json={"prompt": "tab\tand\nlines, é, 中文"}).status_code == 200


def test_invalid_utf8_in_a_form_is_400(tmp_path: Path) -> None:
    http, _, _ = stub_app(tmp_path, T2V)
    body = (b"--B\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na \xed\xa0\x80\r\n--B--\r\n")
    r = http.post("/v1/videos", content=body, headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 400, r.text
    assert http.get("/v1/videos").status_code == 200


def test_job_store_refuses_an_unserialisable_record(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    with pytest.raises(APIError) as e:
        store.add(_job("video_bad", prompt="a \ud800"))
    assert e.value.status == 400 and store.get("video_bad") is None
    store.add(_job("video_good"))
    assert [j["id"] for j in store.page(after=None, limit=10, order="desc")[0]] == ["video_good"]


# ------------------------------------------------------------------------------------------ 5 cost


def test_cost_ceiling_is_400_and_shown_in_models(tmp_path: Path) -> None:
    """4096x4096 at 1000 steps, n up to the batch size, was accepted."""
    http, _, items = stub_app(tmp_path, IMAGE)
    limits = http.get("/v1/models").json()["data"][0]["limits"]
    assert limits["max_request_mpx_steps"] == pytest.approx(8 * 64 * 64 * 20 / 1e6)
    err = assert_error(http.post("/v1/images/generations", json={"prompt": "x", "size": "4096x4096",
                                                                 "num_inference_steps": 1000}),
                       400, code="request_too_costly")
    assert "megapixel-steps" in err["message"] and items == []
    assert http.post("/v1/images/generations", json={"prompt": "x", "n": 8}).status_code == 200  # 8x default
    strict, _, _ = stub_app(tmp_path / "strict", IMAGE, max_request_mpx_steps=0.05)
    assert_error(strict.post("/v1/images/generations", json={"prompt": "x"}), 400, code="request_too_costly")


# ------------------------------------------------------------------------------------------ 6 auth, docs


def test_key_is_checked_before_the_body_is_read(tmp_path: Path) -> None:
    """Without a key, invalid JSON got 400 and a 19 MB body was read in full before the 401."""
    http, _, _ = stub_app(tmp_path, IMAGE, api_key=KEY)
    assert_error(http.post("/v1/images/generations", content=b"{not json",
                           headers={"content-type": "application/json"}), 401, code="invalid_api_key")
    app, reads, sent = http.app, [], []

    async def receive() -> dict:
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/images/generations", "raw_path": b"/v1/images/generations",
             "query_string": b"", "root_path": "", "scheme": "http", "server": ("127.0.0.1", 1),
             "client": ("127.0.0.1", 2), "http_version": "1.1",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"19000000")]}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 401 and reads == []
    assert (b"connection", b"close") in sent[0]["headers"]


def test_docs_are_served_without_a_cdn_and_follow_the_flag(tmp_path: Path) -> None:
    http, _, _ = stub_app(tmp_path, IMAGE)
    page = http.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/images/generations" in page.text and "<script" not in page.text and "cdn" not in page.text
    assert http.get("/openapi.json").json()["info"]["title"] == "diffserve"
    off, _, _ = stub_app(tmp_path / "off", IMAGE, docs=False)
    assert off.get("/docs").status_code == 404 and off.get("/openapi.json").status_code == 404


# ------------------------------------------------------------------------------------------ 7 expiry


def test_jobs_expire_and_page_by_index(tmp_path: Path) -> None:
    """Jobs never expired (expires_at null) and listing copied every job."""
    store = JobStore(tmp_path / "jobs.sqlite3", ttl_s=100)
    for i in range(50):
        store.add(_job(f"video_{i:03d}"))
    store.finished("video_000", None)
    done = store.get("video_000")
    assert done["status"] == "completed" and done["expires_at"] == done["completed_at"] + 100
    page, more = store.page(after="video_010", limit=5, order="desc")
    assert [j["id"] for j in page] == [f"video_{i:03d}" for i in range(9, 4, -1)] and more
    page, more = store.page(after="video_045", limit=5, order="asc")
    assert [j["id"] for j in page] == [f"video_{i:03d}" for i in range(46, 50)] and not more
    with pytest.raises(APIError):
        store.page(after="video_nope", limit=5, order="asc")
    assert store.expire(time.time() + 99) == [] and store.expire(time.time() + 101) == ["video_000"]
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    plan = " ".join(str(r) for r in db.execute("EXPLAIN QUERY PLAN SELECT id, record FROM jobs WHERE seq < 5 "
                                               "ORDER BY seq DESC LIMIT 6"))
    assert "SEARCH" in plan and "SCAN" not in plan, plan


def test_outputs_expire_and_hold_the_quota(tmp_path: Path) -> None:
    evicted: list[tuple[str, str]] = []
    store = LocalOutputStore(tmp_path, ttl_s=60, quota_bytes=2500, on_evict=lambda k, n: evicted.append((k, n)))
    store.open()
    names = [store.image_name("png") for _ in range(3)]
    for name in names:
        store.write("images", name, b"x" * 1000)
    video = store.video_name("video_" + "a" * 24)
    store.write("videos", video, b"v" * 1000)
    assert evicted == [("images", names[0]), ("images", names[1])] and store.total_bytes == 2000
    assert store.path("images", names[0]) is None and store.path("images", names[2]) is not None
    assert store.path("images", "../jobs.sqlite3") is None
    again = LocalOutputStore(tmp_path, ttl_s=60, quota_bytes=2500)
    again.open()  # a restart finds its files
    assert again.total_bytes == 2000 and again.path("videos", video) is not None
    assert again.sweep(time.time() + 30) == 0 and again.sweep(time.time() + 61) == 2 and again.total_bytes == 0


def test_url_images_and_video_jobs_expire_through_the_runtime(tmp_path: Path) -> None:
    http, rt, _ = stub_app(tmp_path, IMAGE, job_ttl_s=50)
    url = http.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"}).json()["data"][0]["url"]
    path = url.split("testserver", 1)[1]
    assert http.get(path).content == b"img"
    rt.clean(time.time() + 51)
    assert_error(http.get(path), 404, code="not_found")
    video, vrt, _ = stub_app(tmp_path / "v", T2V, job_ttl_s=50)
    job = video.post("/v1/videos", json={"prompt": "x"}).json()
    done = video.get(f"/v1/videos/{job['id']}").json()
    assert done["status"] == "completed" and done["expires_at"] is not None
    assert video.get(f"/v1/videos/{job['id']}/content").content == b"img"
    vrt.clean(time.time() + 51)
    assert_error(video.get(f"/v1/videos/{job['id']}"), 404)
    assert not (tmp_path / "v" / "videos" / f"{job['id']}.mp4").exists()


# ------------------------------------------------------------------------------------------ 8 health


def test_readiness_and_liveness_split(tmp_path: Path) -> None:
    """A dead worker answered 503 forever on one /health: no way to tell 'restart me' from 'wait'."""
    http, rt, _ = stub_app(tmp_path, IMAGE)
    assert http.get("/health/ready").status_code == 200 and http.get("/health/live").status_code == 200
    rt.supervisor.state = "restarting"
    assert http.get("/health/ready").status_code == 503 and http.get("/health/live").status_code == 200
    rt.supervisor.state = "dead"
    assert http.get("/health/ready").status_code == 503 and http.get("/health/live").status_code == 503


# ------------------------------------------------------------------------------------------ 9 small ones


def test_small_ones(tmp_path: Path) -> None:
    http, _, _ = stub_app(tmp_path / "i", IMAGE)
    err = assert_error(http.post("/v1/images/generations", content=b"", headers={"content-type": "application/json"}),
                       400, code="missing_body")
    assert "None" not in err["message"]
    assert_error(http.post("/v1/images/generations", json={"prompt": "x", "size": "６４x６４"}), 400, param="size")
    edit_model = ModelDefaults(kind="image", height=64, width=64, num_inference_steps=4, guidance_scale=1.0,
                               accepts_image=True, needs_image=True)
    edit, _, _ = stub_app(tmp_path / "e", edit_model)
    assert_error(edit.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", b"nope", "image/png")}),
                 400, param="image", code="invalid_image")
    queue, _, _ = stub_app(tmp_path / "q", T2V, answer=False, max_queue=1)
    assert queue.post("/v1/videos", json={"prompt": "x"}).status_code == 200
    full = queue.post("/v1/videos", json={"prompt": "y"})
    assert_error(full, 429, code="queue_full")
    assert 1 <= int(full.headers["retry-after"]) <= 60


# ------------------------------------------------------------------------------------------ 10 restart


def test_jobs_survive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    first = JobStore(db)
    for i in range(3):
        first.add(_job(f"video_{i}"))
    first.finished("video_0", None)
    first.started("video_1")
    del first  # the process ends with video_1 running and video_2 queued
    second = JobStore(db)
    assert second.recover() == 2
    jobs = {j["id"]: j for j in second.page(after=None, limit=10, order="asc")[0]}
    assert jobs["video_0"]["status"] == "completed"
    for job_id in ("video_1", "video_2"):
        assert jobs[job_id]["status"] == "failed" and jobs[job_id]["error"]["code"] == "server_restarted"
    assert json.dumps(jobs)  # every record still answers


# ------------------------------------------------------------------------------------------ 12 CORS


def test_cors_only_for_the_allowed_origins(tmp_path: Path) -> None:
    origin = "https://app.example"
    http, _, _ = stub_app(tmp_path, IMAGE, api_key=KEY, allowed_origins=(origin,))
    pre = http.options("/v1/images/generations", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin
    got = http.get("/v1/models", headers={"Origin": origin, "Authorization": f"Bearer {KEY}"})
    assert got.headers["access-control-allow-origin"] == origin
    other = http.get("/v1/models", headers={"Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"})
    assert "access-control-allow-origin" not in other.headers
    closed, _, _ = stub_app(tmp_path / "closed", IMAGE)
    assert "access-control-allow-origin" not in closed.get("/v1/models", headers={"Origin": origin}).headers


def test_metric_pages_count_stub_traffic(tmp_path: Path) -> None:
    http, _, _ = stub_app(tmp_path, IMAGE)
    http.post("/v1/images/generations", json={"prompt": "x"})
    page = http.get("/metrics").text
    labels = 'method="POST",route="/v1/images/generations",status="200"'
    assert metric_value(page, "diffserve_http_requests_total", labels) == 1
