"""`diffserve serve` on the tiny FLUX.1-dev fixture: the Images API through the official openai client, the
error cases through raw HTTP, batching, a failing generation, and a bounded mixed load test.

One real server (subprocess, free loopback port) serves the whole module."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from diffserve.server.testing import RawRequest, assert_error, metric_value, start_server, wait_health

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks its Videos API deprecated

KEY = "sk-test-images"
FAST = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, flux_dev_repo):
    srv = start_server(
        flux_dev_repo, tmp_path_factory.mktemp("server-images"), api_key=KEY,
        args=("--dtype", "fp32", "--device", "cpu", "--max-batch-size", "4", "--max-queue", "48",
              "--max-upload-mb", "1", "--batch-wait-ms", "20", "--log-level", "warning"),
        env={"DIFFSERVE_SERVER_FAULT_INJECTION": "1"})
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as c:
        yield c


def _png(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def _generate(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/v1/images/generations", json={"prompt": "a red cube", "size": "32x32", **FAST, **body})


def _blocker(server) -> RawRequest:
    """A request (of its own batch key) that keeps the worker busy until its client goes away (`close`)."""
    req = RawRequest(server, "/v1/images/generations",
                     {"prompt": "blocker", "size": "32x32", "num_inference_steps": 1000})
    wait_health(server, lambda _, b: b["worker"]["running"] == 1, "the blocker to start")
    return req


def _wait_queue(server, depth: int) -> None:
    wait_health(server, lambda _, b: b["queue_depth"] >= depth, f"{depth} queued requests", timeout=30)


def test_models_health_metrics(server, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [server.health()[1]["model"]]
    status, health = server.health()
    assert status == 200 and health["status"] == "ready" and health["worker"]["pid"] > 0
    page = httpx.get(f"{server.url}/metrics").text  # no key needed
    for name in ("diffserve_queue_depth", "diffserve_http_requests_total", "diffserve_batch_size",
                 "diffserve_http_request_duration_seconds", "diffserve_worker_up"):
        assert f"# TYPE {name} " in page
    assert metric_value(page, "diffserve_worker_up") == 1


def test_generate_b64(client: openai.OpenAI) -> None:
    res = client.images.generate(prompt="a red cube", n=2, size="32x32", response_format="b64_json",
                                 extra_body={**FAST, "seed": 7})
    assert res.data is not None and len(res.data) == 2
    for d in res.data:
        im = _png(d.b64_json)
        assert im.format == "PNG" and im.size == (32, 32)
    assert res.output_format == "png" and res.size == "32x32" and res.seed == 7  # type: ignore[attr-defined]


@pytest.mark.parametrize("fmt,pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_generate_url_formats(client: openai.OpenAI, server, fmt: str, pil_format: str) -> None:
    res = client.images.generate(prompt="a blue ball", size="32x32", response_format="url", output_format=fmt,
                                 extra_body=FAST)
    assert res.data is not None and len(res.data) == 1 and res.data[0].url
    r = httpx.get(res.data[0].url)  # served by the server itself, no key needed
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/")
    im = Image.open(io.BytesIO(r.content))
    assert im.format == pil_format and im.size == (32, 32)
    assert httpx.get(f"{server.url}/outputs/images/../server.log").status_code == 404


def test_seed_reproducible(http: httpx.Client) -> None:
    a, b, c = (_generate(http, seed=s).json()["data"][0]["b64_json"] for s in (11, 11, 12))
    assert a == b and a != c


def test_compatible_requests_batch_with_own_seeds(http: httpx.Client, server) -> None:
    alone = {s: np.asarray(_png(_generate(http, seed=s).json()["data"][0]["b64_json"]), dtype=np.int16)
             for s in (1, 2)}
    before = httpx.get(f"{server.url}/metrics").text
    blocker = _blocker(server)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_generate, http, seed=s) for s in (1, 2, 3, 4)]
        _wait_queue(server, 4)
        blocker.close()  # cancels the blocker: the worker moves on to the queued four
        results = [f.result() for f in futures]
    after = httpx.get(f"{server.url}/metrics").text
    full = [metric_value(p, "diffserve_batch_size_bucket", 'le="4"') - metric_value(p, "diffserve_batch_size_bucket",
                                                                                      'le="3"') for p in (before, after)]
    assert full[1] - full[0] == 1, "the four queued requests were not denoised as one batch"
    assert [r.json()["seed"] for r in results] == [1, 2, 3, 4]
    images = [np.asarray(_png(r.json()["data"][0]["b64_json"]), dtype=np.int16) for r in results]
    for s in (1, 2):  # same seed: the same image alone or batched (up to float rounding)
        assert np.abs(images[s - 1] - alone[s]).max() <= 3
    assert np.abs(images[0] - images[1]).max() > 10


def test_edit_refused_for_text_to_image_model(client: openai.OpenAI) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=("in.png", buf.getvalue(), "image/png"), prompt="make it blue", size="32x32")
    assert "does not take an input image" in e.value.message
    assert e.value.body["param"] == "image"  # type: ignore[index]


def test_videos_refused_on_image_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(prompt="a cat", size="32x32")  # type: ignore[arg-type]
    assert "makes images" in e.value.message


def test_api_key_required(server, client: openai.OpenAI) -> None:
    body = {"prompt": "x", "size": "32x32"}
    assert_error(httpx.post(f"{server.url}/v1/images/generations", json=body), 401, code="invalid_api_key")
    assert_error(httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(f"{server.url}/v1/videos", headers={"Authorization": f"Basic {KEY}"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    assert client.models.list().data


LONG_PROMPT = "x" * 20_001

INVALID = [
    ({"size": "33x32"}, "size"),
    ({"size": "big"}, "size"),
    ({"size": "8192x8192"}, "size"),
    ({"n": 0}, "n"),
    ({"n": 5}, "n"),  # over --max-batch-size 4
    ({"n": "2"}, "n"),  # wrong JSON type
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 5000}, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"true_cfg_scale": 2.0}, "true_cfg_scale"),  # the served model has no true CFG
    ({"seed": -3}, "seed"),
    ({"prompt": LONG_PROMPT}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"response_format": "gif"}, "response_format"),
    ({"output_format": "gif"}, "output_format"),
    ({"output_compression": 101}, "output_compression"),
    ({"stream": True}, "stream"),
    ({"bogus_field": 1}, "bogus_field"),
]


@pytest.mark.parametrize("override,param", INVALID, ids=[p + str(i) for i, (_, p) in enumerate(INVALID)])
def test_invalid_requests_are_400(http: httpx.Client, override: dict, param: str) -> None:
    assert_error(_generate(http, **override), 400, param=param)


def test_malformed_bodies(http: httpx.Client) -> None:
    assert_error(http.post("/v1/images/generations", json={"size": "32x32"}), 400, param="prompt")
    assert_error(http.post("/v1/images/generations", content=b"{not json",
                           headers={"content-type": "application/json"}), 400)
    assert_error(http.post("/v1/images/generations", json=[1, 2]), 400)
    assert_error(http.post("/v1/images/edits", json={"prompt": "x"}), 400)


def test_upload_over_limit_is_413(http: httpx.Client) -> None:
    big = "y" * (2 * 2**20)
    assert_error(http.post("/v1/images/generations", json={"prompt": big}), 413, code="request_too_large")
    files = {"image": ("big.png", b"\x89PNG" + b"0" * (2 * 2**20), "image/png")}
    assert_error(http.post("/v1/images/edits", data={"prompt": "x"}, files=files), 413)

    def chunks():  # no Content-Length: refused while streaming
        for _ in range(40):
            yield b" " * 65536

    assert_error(http.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"}),
                 413)


def test_unknown_ids_routes_and_models(http: httpx.Client) -> None:
    assert_error(http.get("/v1/videos/video_nope"), 404, code="not_found")
    assert_error(http.delete("/v1/videos/video_nope"), 404)
    assert_error(http.get("/v1/videos/video_nope/content"), 404)
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(_generate(http, model="dall-e-3"), 404, param="model", code="model_not_found")


def test_failing_generation_fails_only_that_request(http: httpx.Client, server) -> None:
    blocker = _blocker(server)
    with ThreadPoolExecutor(4) as pool:  # one batch of 4: the OOM fails the batch, each is retried alone
        futures = [pool.submit(_generate, http, prompt=p, seed=i)
                   for i, p in enumerate(["__fault_oom__ cube", "a cube", "__fault_error__ cube", "a cone"])]
        _wait_queue(server, 4)
        blocker.close()
        oom, ok1, err, ok2 = (f.result() for f in futures)
    assert_error(oom, 503, code="out_of_memory")
    assert_error(err, 500, code="generation_failed")
    assert ok1.status_code == 200 and ok2.status_code == 200
    assert _generate(http).status_code == 200  # still serving, same worker
    assert server.health()[1]["worker"]["restarts"] == 0


def _load_request(i: int) -> tuple[dict, int, str | None]:
    """Request i of the load test: (body, expected status, expected error param)."""
    invalid = [({"size": "31x31"}, 400, "size"), ({"n": 9}, 400, "n"), ({"num_inference_steps": -1}, 400,
               "num_inference_steps"), ({"prompt": None}, 400, "prompt"), ({"extra": True}, 400, "extra"),
               ({"prompt": "z" * (2 * 2**20)}, 413, None)]
    if i % 3 == 2:
        body, status, param = invalid[(i // 3) % len(invalid)]
        return {"prompt": "load", "size": "32x32", **FAST, **body}, status, param
    return {"prompt": f"load {i}", "size": "32x32", "n": 1 + i % 2, "seed": i, **FAST}, 200, None


def test_load_mixed_valid_and_invalid(server) -> None:
    total = 60
    before = httpx.get(f"{server.url}/metrics").text

    def send(i: int) -> tuple[int, httpx.Response]:
        body, _, _ = _load_request(i)
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as c:
            return i, c.post("/v1/images/generations", json=body)

    start = time.monotonic()
    with ThreadPoolExecutor(total) as pool:
        responses = list(pool.map(send, range(total)))
    elapsed = time.monotonic() - start
    valid = 0
    for i, r in responses:
        _, status, param = _load_request(i)
        if status == 200:
            valid += 1
            assert r.status_code == 200, r.text
            data = r.json()["data"]
            assert len(data) == 1 + i % 2 and all(_png(d["b64_json"]).size == (32, 32) for d in data)
            assert r.json()["seed"] == i
        else:
            assert_error(r, status, param=param)
    after = httpx.get(f"{server.url}/metrics").text
    ok = 'kind="image",outcome="ok"'
    assert metric_value(after, "diffserve_generations_total", ok) - metric_value(
        before, "diffserve_generations_total", ok) == valid == 40
    assert metric_value(after, "diffserve_queue_depth") == 0
    assert metric_value(after, "diffserve_running_requests") == 0
    assert elapsed < 120
