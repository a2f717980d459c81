"""The web playground (`GET /`, diffserve.server.playground) in a real headless browser: Debian's Chromium
driven by Playwright. Two real servers on the embedded models (image and video, with an API key) serve the
module: the page generates an image and a video through the public API and shows them, the progress bar
reaches 100%, the result is downloadable, the history keeps settings (thumbnails of images only), and the
API's error messages are shown (wrong key, a request over the cost ceiling). Image-input models (edits,
image-to-video) are driven against the real app over a stub worker (`stub_app`) served in a thread."""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from diffserve.config import ModelDefaults, size_for_aspect
from diffserve.server.cli import add_serve_parser
from diffserve.server.messages import ItemDone
from diffserve.server.testing import ServerProcess, ThreadedServer, launch_chromium, start_server, stub_app

pytestmark = pytest.mark.timeout(180)

KEY = "sk-playground"
PROMPT = "a large red circle in the top left on a white background"
HISTORY = "diffserve.playground.history"
STORED_KEY = "diffserve.playground.key"
HISTORY_SIZE = 12  # entries the page keeps (app.js)
expect.set_options(timeout=30_000)  # generous: CI machines are slow and shared


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """The embedded image and video models, each in a real server with an API key (started together)."""
    common = ("--device", "cpu", "--log-level", "warning", "--max-batch-size", "2")
    root = tmp_path_factory.mktemp("playground")
    image = start_server("embedded:image", root / "image", api_key=KEY, args=common, wait=False)
    video = start_server("embedded:video", root / "video", api_key=KEY, args=common, wait=False)
    try:
        image.wait_ready()
        video.wait_ready()
        yield {"image": image, "video": video}
    finally:
        codes = (image.stop(), video.stop())
    assert codes == (0, 0)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page (its own localStorage) that fails the test on any script error."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert errors == []


def _connect(page: Page, server: ServerProcess | ThreadedServer, key: str = KEY) -> None:
    page.goto(server.url)
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Connect").click()


def _stored(page: Page, name: str) -> str | None:
    return page.evaluate("(name) => localStorage.getItem(name)", name)


def _history(page: Page) -> list[dict[str, Any]] | None:
    text = _stored(page, HISTORY)
    return None if text is None else json.loads(text)


def _download(page: Page) -> tuple[str, bytes]:
    """Click Download: the suggested file name and the bytes saved."""
    with page.expect_download() as download:
        page.get_by_role("link", name="Download").click()
    return download.value.suggested_filename, Path(download.value.path()).read_bytes()


def test_page_and_assets_need_no_key_and_are_cached(servers: dict[str, ServerProcess], tmp_path: Path) -> None:
    url = servers["image"].url
    page = httpx.get(url + "/")  # no key
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache" and "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(url + "/", headers={"if-none-match": page.headers["etag"]}).status_code == 304
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from another origin (no CDN)
    for name, media_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
        link = page.text.split(f'"/playground/{name}?v=')[1].split('"')[0]
        asset = httpx.get(f"{url}/playground/{name}", params={"v": link})
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type)
        assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert httpx.get(f"{url}/playground/{name}", params={"v": "old"}).headers["cache-control"] == "no-cache"
    for other in ("index.html", "..%2Fplayground.py", "%2E%2E%2F%2E%2E%2Fapp.py"):  # only the two assets
        assert httpx.get(f"{url}/playground/{other}").status_code == 404
    assert httpx.get(url + "/v1/models").status_code == 401  # the API still needs the key
    # --no-playground reaches the app: no page.
    args = add_serve_parser(_subparsers()).parse_args(["--no-playground"])
    assert args.playground is False
    off, _, _ = stub_app(tmp_path, ModelDefaults(kind="image", height=64, width=64, num_inference_steps=4,
                                                 guidance_scale=0.0), playground=False)
    assert off.get("/").status_code == 404 and off.get("/playground/app.js").status_code == 404


def _subparsers() -> Any:
    return argparse.ArgumentParser().add_subparsers()


def test_generates_an_image_and_keeps_it_in_history(servers: dict[str, ServerProcess], page: Page) -> None:
    server: ServerProcess = servers["image"]
    _connect(page, server)
    expect(page.locator("#model-info")).to_contain_text("shapes-image: image model")
    expect(page.get_by_label("Width")).to_have_value("64")
    expect(page.get_by_label("Guidance")).to_be_disabled()  # the embedded model takes no guidance
    expect(page.get_by_label("Frames")).to_be_hidden()
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_label("Steps").fill("4")
    page.get_by_label("Seed").fill("7")
    page.get_by_role("button", name="Generate").click()
    image = page.get_by_role("img", name=f"generated image: {PROMPT}")
    expect(image).to_be_visible()
    expect(page.get_by_role("status")).to_contain_text("Done")
    assert page.locator("#progress").evaluate("p => p.value") == 100
    assert image.evaluate("i => [i.complete, i.naturalWidth, i.naturalHeight]") == [True, 64, 64]
    # The downloaded image is what the API makes for these settings.
    name, data = _download(page)
    assert name == "diffserve-7.png"
    shown = Image.open(io.BytesIO(data))
    api = httpx.post(server.url + "/v1/images/generations", headers=server.headers, timeout=60,
                     json={"prompt": PROMPT, "num_inference_steps": 4, "seed": 7}).json()
    made = Image.open(io.BytesIO(base64.b64decode(api["data"][0]["b64_json"])))
    assert np.array_equal(np.asarray(shown), np.asarray(made))
    assert np.asarray(shown)[8:24, 8:24].mean(axis=(0, 1))[0] > 150  # red in the top left

    history = _history(page)
    assert len(history) == 1 and history[0]["params"] == {"prompt": PROMPT, "num_inference_steps": 4, "seed": 7,
                                                          "size": "64x64"}
    assert history[0]["thumb"].startswith("data:image/")
    expect(page.get_by_role("img", name=f"thumbnail: {PROMPT}")).to_be_visible()
    assert _stored(page, STORED_KEY) is None  # not remembered unless asked

    # Remember the key: a reload connects by itself; Reuse puts the settings back.
    page.get_by_label("Remember the key in this browser").check()
    assert _stored(page, STORED_KEY) == KEY
    page.reload()
    expect(page.get_by_label("API key")).to_have_value(KEY)
    expect(page.locator("#model-info")).to_contain_text("image model")
    expect(page.get_by_label("Seed")).to_have_value("")
    page.get_by_role("button", name=f"Reuse the settings of: {PROMPT}").click()
    expect(page.get_by_label("Seed")).to_have_value("7")
    expect(page.get_by_label("Prompt", exact=True)).to_have_value(PROMPT)
    page.get_by_label("Remember the key in this browser").uncheck()
    assert _stored(page, STORED_KEY) is None
    page.get_by_role("button", name="Clear history").click()
    expect(page.locator("#history li")).to_have_count(0)
    assert _history(page) is None


def test_generates_a_video_with_progress(servers: dict[str, ServerProcess], page: Page) -> None:
    server: ServerProcess = servers["video"]
    _connect(page, server)
    expect(page.locator("#model-info")).to_contain_text("shapes-video: video model")
    expect(page.get_by_label("Frames")).to_have_value("9")
    # Every value the progress bar shows, in order.
    page.evaluate("""() => { window.progressSeen = [];
        new MutationObserver(() => window.progressSeen.push(document.getElementById('progress').value))
            .observe(document.getElementById('progress'), {attributes: true}); }""")
    page.get_by_label("Prompt", exact=True).fill("a large blue square moving to the right on a black background")
    page.get_by_label("Frames").fill("5")
    page.get_by_label("Steps").fill("3")
    page.get_by_label("Seed").fill("1")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("status")).to_contain_text("Done")
    seen = page.evaluate("window.progressSeen")
    assert seen[-1] == 100 and seen == sorted(seen), seen
    video = page.get_by_label("generated video: a large blue square moving to the right on a black background")
    expect(video).to_be_visible()
    src, ready, error, width, duration = video.evaluate(
        "v => [v.src, v.readyState, v.error, v.videoWidth, v.duration]")
    assert src.startswith("blob:") and ready >= 2 and error is None and width == 64
    assert duration == pytest.approx(5 / 8, abs=0.15)  # 5 frames at the model's 8 fps
    name, data = _download(page)
    assert name.endswith(".mp4") and data[4:8] == b"ftyp"
    expect(page.locator("#result-image")).to_be_hidden()
    entry = _history(page)[0]
    assert entry["kind"] == "video" and entry["thumb"] is None and entry["params"]["num_frames"] == 5

    # Cancel deletes the running job on the server (250 steps: under the cost ceiling, many seconds long).
    page.get_by_label("Steps").fill("250")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("status")).to_contain_text("Generating")
    page.get_by_role("button", name="Cancel").click()
    expect(page.get_by_role("status")).to_have_text("Cancelled.")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    jobs = httpx.get(server.url + "/v1/videos", headers=server.headers).json()["data"]
    assert [j["status"] for j in jobs] == ["completed"] and len(_history(page)) == 1


def test_shows_the_api_error_messages(servers: dict[str, ServerProcess], page: Page) -> None:
    server: ServerProcess = servers["image"]
    wrong = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"}).json()["error"]
    _connect(page, server, key="nope")
    expect(page.get_by_role("alert")).to_have_text(wrong["message"])
    expect(page.locator("#model-info")).to_have_text("Not connected.")
    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name="Connect").click()
    expect(page.get_by_role("alert")).to_be_hidden()
    # A request the API refuses (over the cost ceiling): the API's own message.
    body = {"prompt": "a big one", "num_inference_steps": 1000}
    refused = httpx.post(server.url + "/v1/images/generations", headers=server.headers, json=body).json()["error"]
    page.get_by_label("Prompt", exact=True).fill(body["prompt"])
    page.get_by_label("Steps").fill("1000")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("alert")).to_have_text(refused["message"])
    assert page.locator("#progress").evaluate("p => p.value") == 0 and _history(page) is None


# ----------------------------------------------------------------------------------- image-input models (stub)

EDIT = ModelDefaults(kind="image", height=64, width=64, num_inference_steps=8, guidance_scale=2.5,
                     accepts_image=True, size_from_image_area=64 * 64, uses_negative_prompt=True, guidance="true_cfg")
I2V = ModelDefaults(kind="video", height=64, width=64, num_inference_steps=20, guidance_scale=1.0, num_frames=9,
                    fps=8, needs_image=True, accepts_image=True, size_from_image_area=64 * 64,
                    size_from_image_rounding="floor")


def _stub_server(tmp_path: Path, defaults: ModelDefaults) -> tuple[ThreadedServer, Any, list]:
    """The real app over a stub worker that answers a green PNG (images) or a 3-frame MP4 (videos)."""
    from diffserve.media import encode_image, encode_video

    _, rt, items = stub_app(tmp_path, defaults, api_key=KEY)
    png = encode_image(Image.new("RGB", (64, 32), (0, 200, 0)), "png")
    mp4 = encode_video(np.zeros((3, 32, 64, 3), np.uint8), "mp4", fps=8)

    def submit(item: Any) -> None:
        items.append(item)
        if item.kind == "video":
            item.on_start()
            item.on_progress(1, 2)
        blob = mp4 if item.kind == "video" else png
        item.future.set_result(ItemDone(0, item.id, blobs=[blob] * item.n, seed=item.request.seed))

    rt.submit = submit  # type: ignore[method-assign]
    from diffserve.server.app import create_app

    return ThreadedServer(create_app(rt)), rt, items


def test_waits_for_a_loading_model_and_caps_the_history(page: Page, tmp_path: Path) -> None:
    server, rt, _ = _stub_server(tmp_path, EDIT)
    info, rt.supervisor.info, rt.supervisor.state = rt.supervisor.info, None, "loading"
    with server:
        page.goto(server.url)
        old = [{"kind": "image", "model": "old", "created": i, "params": {"prompt": f"old {i}", "seed": i},
                "thumb": None} for i in range(HISTORY_SIZE)]
        page.evaluate("([name, entries]) => localStorage.setItem(name, JSON.stringify(entries))", [HISTORY, old])
        _connect(page, server)
        expect(page.locator("#model-info")).to_contain_text("the model is loading")
        expect(page.get_by_role("button", name="Generate")).to_be_disabled()
        expect(page.locator("#history li")).to_have_count(HISTORY_SIZE)
        rt.supervisor.info, rt.supervisor.state = info, "ready"
        expect(page.locator("#model-info")).to_contain_text("image editing model")  # retried by itself
        page.get_by_label("Prompt", exact=True).fill("new")
        _upload(page, tmp_path)
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("status")).to_contain_text("Done")
    history = _history(page)
    assert len(history) == HISTORY_SIZE and history[0]["params"]["prompt"] == "new"
    assert [e["params"]["prompt"] for e in history[1:]] == [f"old {i}" for i in range(HISTORY_SIZE - 1)]


def _upload(page: Page, tmp_path: Path) -> None:
    path = tmp_path / "input.png"
    Image.new("RGB", (96, 48), (30, 60, 220)).save(path)
    page.get_by_label("Input image").set_input_files(path)


def test_edit_and_image_to_video_upload_the_input_image(page: Page, tmp_path: Path) -> None:
    server, _, items = _stub_server(tmp_path / "edit", EDIT)
    with server:
        _connect(page, server)
        expect(page.locator("#model-info")).to_contain_text("image editing model")
        expect(page.get_by_label("Width")).to_have_value("")  # the size follows the input image
        page.get_by_label("Prompt", exact=True).fill("make it green")
        page.get_by_label("Negative prompt").fill("blurry")
        page.get_by_label("Guidance").fill("4")
        _upload(page, tmp_path)
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("img", name="generated image: make it green")).to_be_visible()
    (item,) = items
    request = item.request
    assert (request.prompt, request.negative_prompt, request.guidance_scale) == ("make it green", "blurry", 4.0)
    image = request.image.decode()
    assert image.width == 2 * image.height and image.getpixel((4, 4)) == (30, 60, 220)
    # No size sent: the model's size for the input's aspect ratio.
    assert (request.width, request.height) == size_for_aspect(EDIT.size_from_image_area, 2.0, EDIT.size_multiple)

    server, _, items = _stub_server(tmp_path / "i2v", I2V)
    with server:
        _connect(page, server)
        expect(page.locator("#model-info")).to_contain_text("video model")
        page.get_by_label("Prompt", exact=True).fill("the square moves")
        page.get_by_role("button", name="Generate").click()
        assert page.get_by_label("Input image").evaluate("i => i.validity.valueMissing")  # required here
        assert items == []
        _upload(page, tmp_path)
        page.get_by_label("Frames").fill("5")
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("status")).to_contain_text("Done")
        expect(page.locator("#result-video")).to_have_attribute("src", re.compile("^blob:"))
    (item,) = items
    assert item.request.image.decode().getpixel((4, 4)) == (30, 60, 220) and item.request.num_frames == 5
