"""Pure pieces of the server, without a server: how the scheduler cuts batches, `seconds` -> frames, size
strings, OpenAI error shaping, and the Prometheus page."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from diffserve.config import GenerationRequest, ModelDefaults
from diffserve.server.messages import EncodedImage, OutputSpec
from diffserve.server.metrics import ServerMetrics
from diffserve.server.protocol import (
    APIError,
    ImageGenerationBody,
    frames_for_seconds,
    from_validation_error,
    parse_size,
)
from diffserve.server.scheduler import Scheduler, WorkItem
from diffserve.server.testing import metric_value, stub_app

WAN = ModelDefaults(kind="video", height=480, width=832, num_inference_steps=50, guidance_scale=5.0,
                    num_frames=81, fps=16)


def _item(name: str, *, n: int = 1, steps: int = 2, size: int = 32) -> WorkItem:
    req = GenerationRequest(prompt=name, height=size, width=size, num_inference_steps=steps, guidance_scale=3.5,
                            num_outputs=n, max_sequence_length=512)
    return WorkItem(id=name, kind="image", request=req, output=OutputSpec("png"))


def _ids(batch: list[WorkItem] | None) -> list[str]:
    return [it.id for it in batch or []]


def test_compatible_requests_batch_up_to_the_limit_in_fifo_order() -> None:
    s = Scheduler(max_queue=10, max_batch_size=4, batch_wait_s=0)
    for item in (_item("a"), _item("x", steps=9), _item("b", n=2), _item("c", n=2), _item("d")):
        s.submit(item)
    assert _ids(s.next_batch(0)) == ["a", "b", "d"]  # c (n=2) does not fit beside a+b; d (n=1) does
    assert _ids(s.next_batch(0)) == ["x"]  # incompatible: kept its place, first next time
    assert _ids(s.next_batch(0)) == ["c"]
    assert s.next_batch(0) is None and s.depth == 0


def test_oversized_head_runs_alone() -> None:
    s = Scheduler(max_queue=10, max_batch_size=2, batch_wait_s=0)
    s.submit(_item("big", n=3))
    s.submit(_item("small"))
    assert _ids(s.next_batch(0)) == ["big"]
    assert _ids(s.next_batch(0)) == ["small"]


def test_queue_limit_remove_and_close() -> None:
    s = Scheduler(max_queue=2, max_batch_size=4, batch_wait_s=0)
    s.submit(_item("a"))
    s.submit(_item("b"))
    with pytest.raises(APIError) as e:
        s.submit(_item("c"))
    assert e.value.status == 429 and e.value.code == "queue_full"
    assert s.remove("a") is not None and s.remove("a") is None
    assert _ids(s.close()) == ["b"]
    with pytest.raises(APIError) as e:
        s.submit(_item("d"))
    assert e.value.status == 503 and e.value.code == "shutting_down"


def test_head_waits_briefly_for_compatible_requests() -> None:
    s = Scheduler(max_queue=10, max_batch_size=4, batch_wait_s=0.3)
    s.submit(_item("a"))
    threading.Timer(0.05, lambda: s.submit(_item("b"))).start()
    start = time.monotonic()
    assert _ids(s.next_batch(1.0)) == ["a", "b"]
    assert time.monotonic() - start < 0.3 + 0.2
    s.submit(_item("c", n=4))  # full at once: no wait
    start = time.monotonic()
    assert _ids(s.next_batch(1.0)) == ["c"]
    assert time.monotonic() - start < 0.1


@pytest.mark.parametrize("seconds,fps,frames", [(5, 16, 81), (4, 16, 65), (0.3, 16, 5), (0.01, 16, 1),
                                                (1, 4, 5), (0.75, 16, 13), (16, 16, 257)])
def test_seconds_to_frames(seconds: float, fps: int, frames: int) -> None:
    assert frames_for_seconds(seconds, WAN, fps) == frames


def test_too_many_seconds_names_the_maximum() -> None:
    with pytest.raises(APIError) as e:
        frames_for_seconds(20, WAN, 16)
    assert e.value.param == "seconds" and "257 frames (16.06 s at 16 fps)" in e.value.message


def test_size_strings() -> None:
    assert parse_size("1024x768") == (1024, 768)
    assert parse_size(" 64 X 32 ") == (64, 32)
    assert parse_size("auto") == (None, None) and parse_size(None) == (None, None)
    with pytest.raises(APIError):
        parse_size("1024")


def test_validation_errors_in_openai_shape() -> None:
    with pytest.raises(APIError) as e:
        ImageGenerationBody.parse({"prompt": "x", "n": "2"})
    assert e.value.param == "n" and e.value.status == 400
    assert ImageGenerationBody.parse({"prompt": "x", "n": "2"}, lax=True).n == 2  # multipart forms are text
    with pytest.raises(APIError) as e:
        ImageGenerationBody.parse({"prompt": "x", "colour": "red"})
    assert e.value.message == "Unrecognized request argument supplied: colour"
    err = from_validation_error([{"loc": ("query", "limit"), "msg": "too small", "type": "greater_than_equal"}])
    assert err.param == "limit" and err.body()["error"]["type"] == "invalid_request_error"


def test_prometheus_page() -> None:
    m = ServerMetrics(queue_depth=lambda: 3, running=lambda: 1, worker_up=lambda: True,
                      video_jobs=lambda: {"queued": 2})
    for size in (1, 4, 4, 8):
        m.batch_outputs.observe(size)
    m.requests.inc("POST", "/v1/images/generations", "200")
    page = m.render()
    assert metric_value(page, "diffserve_queue_depth") == 3
    assert metric_value(page, "diffserve_video_jobs", 'status="queued"') == 2
    assert metric_value(page, "diffserve_batch_size_bucket", 'le="3"') == 1
    assert metric_value(page, "diffserve_batch_size_bucket", 'le="4"') == 3
    assert metric_value(page, "diffserve_batch_size_bucket", 'le="+Inf"') == 4
    assert metric_value(page, "diffserve_batch_size_sum") == 17
    labels = 'method="POST",route="/v1/images/generations",status="200"'
    assert metric_value(page, "diffserve_http_requests_total", labels) == 1


def _stub_app(tmp_path: Path, accepts_image: bool) -> tuple[object, list[WorkItem]]:
    """The real app over a stub worker that takes input images and answers every request at once."""
    defaults = ModelDefaults(kind="image", height=64, width=64, num_inference_steps=4, guidance_scale=2.5,
                             accepts_image=accepts_image, size_multiple=8)
    http, _, items = stub_app(tmp_path, defaults)
    return http, items


def _as_worker_sees(item: WorkItem) -> GenerationRequest:
    """The request of a queued item with its input image decoded, as the worker gets it."""
    req = item.request
    return req.replace(image=req.image.decode()) if isinstance(req.image, EncodedImage) else req


def _png_bytes(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_edit_through_the_sdk_reaches_the_model_with_its_image(tmp_path: Path) -> None:
    import openai

    http, seen = _stub_app(tmp_path, accepts_image=True)
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http, max_retries=0)
    res = client.images.edit(image=("cat.png", _png_bytes((40, 24), (10, 200, 30)), "image/png"),
                             prompt="make it blue", n=2, size="32x16",
                             extra_body={"num_inference_steps": 3, "seed": 9, "negative_prompt": "blur"})
    assert res.data is not None and len(res.data) == 2 and res.seed == 9  # type: ignore[attr-defined]
    req = _as_worker_sees(seen[-1])
    assert (req.width, req.height, req.num_outputs, req.num_inference_steps) == (32, 16, 2, 3)
    assert req.negative_prompt == "blur" and req.image.size == (40, 24)  # type: ignore[union-attr]
    assert req.image.getpixel((0, 0)) == (10, 200, 30)  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError, match="one input image"):
        client.images.edit(image=[("a.png", _png_bytes((8, 8), (0, 0, 0)), "image/png")] * 2, prompt="x")
    with pytest.raises(openai.BadRequestError, match="masks"):
        client.images.edit(image=("a.png", _png_bytes((8, 8), (0, 0, 0)), "image/png"), prompt="x",
                           mask=("m.png", _png_bytes((8, 8), (0, 0, 0)), "image/png"))
    with pytest.raises(openai.BadRequestError, match="not a recognized image"):
        client.images.edit(image=("a.png", b"nope", "image/png"), prompt="x")
    r = http.post("/v1/images/edits", files={"image": ("a.png", b"x", "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_image_edit_refused_when_the_model_takes_no_image(tmp_path: Path) -> None:
    http, seen = _stub_app(tmp_path, accepts_image=False)
    r = http.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", b"x", "image/png")})
    assert r.status_code == 400 and "does not take an input image" in r.json()["error"]["message"]
    assert seen == []
