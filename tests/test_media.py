"""Tests for diffserve.media and diffserve.image_input: pixel conversion parity with diffusers, encoders, atomic writes, output-target
checks and image input loading (URLs against a local HTTP server only; no network)."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import ipaddress
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from diffserve import image_input, media
from diffserve.errors import InvalidRequestError, OutputError
from diffserve.media import (
    check_output_target,
    encode_image,
    encode_video,
    format_from_path,
    load_image,
    to_pil_images,
    to_uint8,
    to_video_frames,
    write_images,
    write_video,
)

VaeImageProcessor = pytest.importorskip("diffusers.image_processor").VaeImageProcessor


def _gradient(w: int = 30, h: int = 20) -> Image.Image:
    """A small RGB test image with distinct pixel values."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    return Image.fromarray(arr.astype(np.uint8))


def _png_bytes(image: Image.Image | None = None) -> bytes:
    buf = io.BytesIO()
    (image or _gradient()).save(buf, format="PNG")
    return buf.getvalue()


def _video(frames: int = 5, h: int = 32, w: int = 48, seed: int = 0) -> np.ndarray:
    """Distinct random frames (identical frames may be merged by GIF/WebP writers)."""
    return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- pixels


def test_to_uint8_matches_diffusers_numpy_to_pil() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 17, 23, generator=g)
    # exact k/255 values and near-ties
    x[0, 0, 0, :] = torch.arange(23) / 255
    x[0, 1, 0, :] = (torch.arange(23) + 0.5) / 255
    ours = to_pil_images(x)
    ref = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(x))
    for a, b in zip(ours, ref, strict=True):
        assert a.mode == b.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_to_uint8_matches_diffusers_postprocess_and_clamps() -> None:
    y = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2.4 - 1.2  # beyond [-1, 1]
    ref = VaeImageProcessor(do_normalize=True).postprocess(y, output_type="pil")
    ours = to_pil_images(y / 2 + 0.5)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_to_uint8_shapes_nan_and_no_mutation() -> None:
    x = torch.full((1, 3, 2, 4, 5), 0.5)
    x[0, 0, 0, 0, 0] = float("nan")
    before = x.clone()
    out = to_uint8(x)
    assert out.shape == (1, 2, 4, 5, 3) and out.dtype == np.uint8
    assert out[0, 0, 0, 0, 0] == 0 and out[0, 0, 0, 0, 1] == 128  # 127.5 rounds half to even
    assert torch.equal(x.nan_to_num(), before.nan_to_num())
    bf = to_uint8(torch.rand(1, 3, 4, 4).to(torch.bfloat16))
    assert bf.shape == (1, 4, 4, 3)
    with pytest.raises(ValueError):
        to_uint8(torch.rand(3, 4, 4))
    gray = to_pil_images(torch.rand(2, 1, 4, 6))
    assert [(im.mode, im.size) for im in gray] == [("L", (6, 4))] * 2


def test_to_video_frames_matches_per_frame_postprocess() -> None:
    v = torch.rand(2, 3, 4, 8, 10, generator=torch.Generator().manual_seed(2))
    frames = to_video_frames(v)
    assert len(frames) == 2 and frames[0].shape == (4, 8, 10, 3)
    for b in range(2):
        ref = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(v[b].permute(1, 0, 2, 3)))
        np.testing.assert_array_equal(frames[b], np.stack([np.asarray(im) for im in ref]))


# ---------------------------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("fmt,pil_name", [("png", "PNG"), ("jpeg", "JPEG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_encode_image_round_trip(fmt: str, pil_name: str) -> None:
    image = _gradient(31, 17)
    data = encode_image(image, fmt, quality=90)
    with Image.open(io.BytesIO(data)) as back:
        assert back.format == pil_name and back.size == (31, 17) and back.mode == "RGB"
        if fmt == "png":
            np.testing.assert_array_equal(np.asarray(back), np.asarray(image))
        else:
            assert np.abs(np.asarray(back, dtype=int) - np.asarray(image, dtype=int)).mean() < 12


def test_encode_image_bad_format_and_quality() -> None:
    with pytest.raises(InvalidRequestError, match="accepted: png, jpeg, webp"):
        encode_image(_gradient(), "bmp")
    with pytest.raises(InvalidRequestError, match="quality"):
        encode_image(_gradient(), "jpeg", quality=101)


def test_encode_mp4_h264() -> None:
    frames = _video(7, 32, 48)
    data = encode_video(frames, "mp4", fps=12)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (48, 32)
        assert stream.average_rate == 12
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == 7 and decoded[0].shape == (32, 48, 3)
    assert data.find(b"moov") < data.find(b"mdat")  # faststart


def test_encode_mp4_pads_odd_size() -> None:
    data = encode_video(_video(3, 31, 45), "mp4", fps=8)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (46, 32)
        assert sum(1 for _ in container.decode(stream)) == 3


@pytest.mark.parametrize("fmt,pil_name", [("gif", "GIF"), ("webp", "WEBP")])
def test_encode_animated(fmt: str, pil_name: str) -> None:
    data = encode_video(_video(6, 20, 24), fmt, fps=10)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == pil_name and im.is_animated and im.n_frames == 6 and im.size == (24, 20)


def test_encode_video_rejects_frames_and_bad_fps() -> None:
    with pytest.raises(InvalidRequestError, match="folder"):
        encode_video(_video(2), "frames", fps=8)
    with pytest.raises(InvalidRequestError, match="fps"):
        encode_video(_video(2), "mp4", fps=0)
    with pytest.raises(InvalidRequestError, match="accepted: mp4, gif, webp, frames"):
        encode_video(_video(2), "avi", fps=8)


# ---------------------------------------------------------------------------------------------- writing


def test_write_images_to_dir_unique_names(tmp_path: Path) -> None:
    images = [_gradient(), _gradient(12, 12)]
    first = write_images(images, fmt="png", output_dir=tmp_path / "new" / "dir", stem="cat")
    second = write_images(images, fmt="png", output_dir=tmp_path / "new" / "dir", stem="cat")
    assert len(first) == 2 and not set(first) & set(second)
    for p in first:
        assert p.name.startswith("cat-") and p.suffix == ".png" and p.is_file()
    assert [p.name.rsplit("_", 1)[1] for p in first] == ["0.png", "1.png"]
    assert not [p for p in (tmp_path / "new" / "dir").iterdir() if p.name.startswith(".")]


def test_write_images_output_path_naming(tmp_path: Path) -> None:
    one = write_images([_gradient()], fmt="jpeg", output_path=tmp_path / "a.jpg")
    assert one == [tmp_path / "a.jpg"]
    many = write_images([_gradient(), _gradient()], fmt="webp", output_path=tmp_path / "b.webp")
    assert many == [tmp_path / "b_0.webp", tmp_path / "b_1.webp"]
    fixed = write_images([_gradient()], fmt="png", output_dir=tmp_path, stem="req1", unique=False)
    assert fixed == [tmp_path / "req1_0.png"]


def test_write_video_formats(tmp_path: Path) -> None:
    frames = _video(4, 16, 16)
    mp4 = write_video(frames, fmt="mp4", fps=8, output_path=tmp_path / "v.mp4")
    assert mp4 == tmp_path / "v.mp4" and mp4.stat().st_size > 0
    gif = write_video(frames, fmt="gif", fps=8, output_dir=tmp_path / "out")
    assert gif.suffix == ".gif" and gif.parent == tmp_path / "out"
    folder = write_video(frames, fmt="frames", fps=8, output_dir=tmp_path / "out", stem="clip")
    names = sorted(p.name for p in folder.iterdir())
    assert folder.is_dir() and names == [f"frame_{i:05d}.png" for i in range(4)]
    with Image.open(folder / "frame_00002.png") as im:
        np.testing.assert_array_equal(np.asarray(im), frames[2])
    exact = write_video(frames, fmt="frames", fps=8, output_path=tmp_path / "frames_here")
    assert exact == tmp_path / "frames_here" and len(list(exact.iterdir())) == 4
    with pytest.raises(OutputError, match="not empty"):
        write_video(frames, fmt="frames", fps=8, output_path=tmp_path / "frames_here")
    (tmp_path / "empty").mkdir()
    assert len(list(write_video(frames, fmt="frames", fps=8, output_path=tmp_path / "empty").iterdir())) == 4
    with pytest.raises(InvalidRequestError, match="plain file name"):
        write_video(frames, fmt="gif", fps=8, output_dir=tmp_path, stem="../escape")


def test_write_several_videos_to_one_output_path(tmp_path: Path) -> None:
    paths = media.write_videos([_video(2, seed=1), _video(2, seed=2)], fmt="webp", fps=8,
                               output_path=tmp_path / "clip.webp")
    assert paths == [tmp_path / "clip_0.webp", tmp_path / "clip_1.webp"]
    assert all(p.is_file() for p in paths)


def test_encoder_failure_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = media.encode_image

    def flaky(image: Image.Image, fmt: str, quality: int = 95, metadata: dict | None = None) -> bytes:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("encoder exploded")
        return real(image, fmt, quality, metadata)

    monkeypatch.setattr(media, "encode_image", flaky)
    with pytest.raises(RuntimeError):
        write_images([_gradient(), _gradient()], fmt="png", output_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        write_video(_video(3), fmt="frames", fps=8, output_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []

    def broken_video(frames: np.ndarray, fmt: str, fps: int, metadata: dict | None = None) -> bytes:
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(media, "encode_video", broken_video)
    with pytest.raises(RuntimeError):
        write_video(_video(3), fmt="mp4", fps=8, output_path=tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []


def test_write_failure_removes_earlier_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = media._write_bytes_atomic
    calls = {"n": 0}

    def fail_second(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OutputError(f"cannot write {path}: No space left on device")
        real(path, data)

    monkeypatch.setattr(media, "_write_bytes_atomic", fail_second)
    with pytest.raises(OutputError, match="No space"):
        write_images([_gradient(), _gradient(), _gradient()], fmt="png", output_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "keep.png"
    target.write_bytes(b"old")

    def no_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(media.os, "replace", no_replace)
    with pytest.raises(OutputError, match="No space left"):
        write_images([_gradient()], fmt="png", output_path=target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


# ---------------------------------------------------------------------------------------------- targets


def test_check_output_target_errors(tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="cannot create output folder"):
        check_output_target(fmt="png", output_dir=a_file / "sub", output_path=None, count=1)
    with pytest.raises(OutputError, match="not a folder"):
        check_output_target(fmt="png", output_dir=a_file, output_path=None, count=1)
    with pytest.raises(InvalidRequestError, match="accepted: png, jpeg, webp"):
        check_output_target(fmt="mp4", output_dir=tmp_path, output_path=None, count=1, kind="image")
    with pytest.raises(InvalidRequestError, match="accepted"):
        check_output_target(fmt="tiff", output_dir=tmp_path, output_path=None, count=1)
    with pytest.raises(InvalidRequestError, match="'.jpg'"):
        check_output_target(fmt="png", output_dir=None, output_path=tmp_path / "x.jpg", count=1)
    with pytest.raises(InvalidRequestError, match="no extension"):
        check_output_target(fmt="png", output_dir=None, output_path=tmp_path / "x", count=1)
    check_output_target(fmt="png", output_dir=None, output_path=tmp_path / "missing" / "x.png", count=1)
    assert (tmp_path / "missing").is_dir()  # a missing parent is created, as an output folder is
    with pytest.raises(OutputError, match="not a folder"):
        check_output_target(fmt="png", output_dir=None, output_path=a_file / "x.png", count=1)
    with pytest.raises(InvalidRequestError, match="not both"):
        check_output_target(fmt="png", output_dir=tmp_path, output_path=tmp_path / "x.png", count=1)
    with pytest.raises(InvalidRequestError, match="folder of PNG"):
        check_output_target(fmt="frames", output_dir=None, output_path=tmp_path / "x.mp4", count=1)
    (tmp_path / "d.png").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_output_target(fmt="png", output_dir=None, output_path=tmp_path / "d.png", count=1)


def test_check_output_target_ok_and_creates_dir(tmp_path: Path) -> None:
    check_output_target(fmt="JPG", output_dir=tmp_path / "a" / "b", output_path=None, count=3, kind="image")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    check_output_target(fmt="jpeg", output_dir=None, output_path=tmp_path / "x.JPEG", count=2)
    check_output_target(fmt="webp", output_dir=None, output_path=None, count=1, kind="video")


def test_check_output_target_unwritable_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An output folder that cannot be written (the probe file cannot be created; the same check as a
    read-only folder, also when running as root, which folder permissions do not stop)."""

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(media.tempfile, "TemporaryFile", denied)
    with pytest.raises(OutputError, match="not writable: Permission denied"):
        check_output_target(fmt="png", output_dir=tmp_path, output_path=None, count=1)
    with pytest.raises(OutputError, match="not writable"):
        check_output_target(fmt="png", output_dir=None, output_path=tmp_path / "x.png", count=1)


def test_format_from_path() -> None:
    assert format_from_path("a/b.JPG") == "jpeg"
    assert format_from_path("v.webp", kind="video") == "webp"
    assert media.resolve_format(None, "clip.gif", "video") == "gif"
    assert media.resolve_format(None, None, "image") == "png"
    with pytest.raises(InvalidRequestError, match="accepted"):
        format_from_path("v.mp4", kind="image")
    with pytest.raises(InvalidRequestError, match="no extension"):
        format_from_path("out")


# ---------------------------------------------------------------------------------------------- load_image


def _assert_gradient(im: Image.Image, w: int = 30, h: int = 20) -> None:
    assert im.mode == "RGB" and im.size == (w, h)
    np.testing.assert_array_equal(np.asarray(im), np.asarray(_gradient(w, h)))


def test_load_image_sources(tmp_path: Path) -> None:
    data = _png_bytes()
    path = tmp_path / "in.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    _assert_gradient(load_image(path))
    _assert_gradient(load_image(str(path)))
    _assert_gradient(load_image(path.as_uri()))
    _assert_gradient(load_image(data))
    _assert_gradient(load_image(b64))
    _assert_gradient(load_image(base64.urlsafe_b64encode(data).decode().rstrip("=")))
    _assert_gradient(load_image(f"data:image/png;base64,{b64}"))
    _assert_gradient(load_image(f"  data:image/png;base64,{b64[:40]}\n{b64[40:]}  "))
    _assert_gradient(load_image("data:image/png," + "".join(f"%{b:02X}" for b in data)))


def test_load_image_converts_mode_and_applies_exif_orientation() -> None:
    rgba = Image.new("RGBA", (4, 6), (10, 20, 30, 128))
    assert load_image(_png_bytes(rgba)).mode == "RGB"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    _gradient(30, 20).save(buf, format="JPEG", exif=exif.tobytes())
    assert load_image(buf.getvalue()).size == (20, 30)


def test_load_image_errors(tmp_path: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    cases: list[tuple[object, str]] = [
        (tmp_path / "missing.png", "not found"),
        (str(tmp_path / "missing.png"), "not found"),
        (text_file, "not a recognized image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "corrupt|not a recognized"),
        (tmp_path, "is a folder"),
        ("ftp://example.com/cat.png", "scheme 'ftp'"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("", "empty"),
        (12345, "type int"),
    ]
    for source, pattern in cases:
        with pytest.raises(InvalidRequestError, match=pattern) as info:
            load_image(source)  # type: ignore[arg-type]
        assert info.value.param == "image"
    with pytest.raises(InvalidRequestError, match="too large"):
        load_image(_png_bytes(), max_bytes=10)
    with pytest.raises(InvalidRequestError, match="too large"):
        load_image(base64.b64encode(_png_bytes()).decode(), max_bytes=10)
    with pytest.raises(InvalidRequestError, match="pixels"):
        load_image(_png_bytes(), max_pixels=100)
    good = tmp_path / "ok.png"
    good.write_bytes(_png_bytes())
    with pytest.raises(InvalidRequestError, match="paths are not accepted"):
        load_image(good, allow_paths=False)
    with pytest.raises(InvalidRequestError, match="not a URL, data URI or base64"):
        load_image(str(good), allow_paths=False)


# ---------------------------------------------------------------------------------------------- URLs

_BIG = 5000


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes for URL tests; HTTP/1.0, so a body without Content-Length ends at close."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, ctype: str | None, body: bytes, length: bool = True,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        if length:
            self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _slow(self) -> None:
        """Answers after 1 s."""
        time.sleep(1.0)
        self._send(200, "image/png", _png_bytes())

    def _drip(self) -> None:
        """Sends headers at once, then one body byte every 50 ms for up to 2 s."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(40):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.05)

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        routes = {
            "/img.png": lambda: self._send(200, "image/png", _png_bytes()),
            "/page": lambda: self._send(200, "text/html; charset=utf-8", b"<html></html>"),
            "/big": lambda: self._send(200, "image/png", b"\0" * _BIG),
            "/stream": lambda: self._send(200, "image/png", b"\0" * _BIG, length=False),
            "/redirect": lambda: self._send(302, None, b"", headers={"Location": "/img.png"}),
            "/to-private": lambda: self._send(
                302, None, b"", headers={"Location": f"http://127.0.0.2:{port}/img.png"}),
            "/loop": lambda: self._send(302, None, b"", headers={"Location": "/loop"}),
            "/slow": self._slow,
            "/drip": self._drip,
        }
        route = routes.get(self.path)
        if route is None:
            self._send(404, "text/plain", b"nope")
        else:
            route()


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_load_image_url(server_url: str) -> None:
    _assert_gradient(load_image(f"{server_url}/img.png"))
    _assert_gradient(load_image(f"{server_url}/redirect"))


def test_load_image_url_errors(server_url: str) -> None:
    cases = [
        (f"{server_url}/page", {}, "content type 'text/html'"),
        (f"{server_url}/big", {"max_bytes": _BIG - 1}, "too large"),
        (f"{server_url}/stream", {"max_bytes": _BIG - 1}, "too large"),
        (f"{server_url}/missing", {}, "HTTP 404"),
        (f"{server_url}/loop", {}, "redirected more than"),
        (f"{server_url}/img.png", {"allow_urls": False}, "URLs are not accepted"),
        (f"{server_url}/img.png", {"block_private": True}, "non-public address 127.0.0.1"),
        (server_url.replace("127.0.0.1", "localhost") + "/img.png", {"block_private": True}, "non-public"),
    ]
    for url, kwargs, pattern in cases:
        with pytest.raises(InvalidRequestError, match=pattern) as info:
            load_image(url, **kwargs)  # type: ignore[arg-type]
        assert info.value.param == "image"


@pytest.mark.parametrize("route", ["/slow", "/drip"])
def test_load_image_url_timeout(server_url: str, route: str) -> None:
    start = time.monotonic()
    with pytest.raises(InvalidRequestError, match="timed out after 0.3 s"):
        load_image(f"{server_url}{route}", timeout_s=0.3)
    assert time.monotonic() - start < 1.5  # the drip would last 2 s without the overall deadline


def test_load_image_refuses_redirect_to_private(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Treat 127.0.0.1 as public so the first hop is allowed; the redirect goes to 127.0.0.2.
    real = image_input.is_blocked_ip
    monkeypatch.setattr(image_input, "is_blocked_ip", lambda ip: str(ip) != "127.0.0.1" and real(ip))
    _assert_gradient(load_image(f"{server_url}/img.png", block_private=True))
    with pytest.raises(InvalidRequestError, match="non-public address 127.0.0.2"):
        load_image(f"{server_url}/to-private", block_private=True)


def test_load_image_url_connection_refused() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(InvalidRequestError, match="cannot fetch"):
        load_image(f"http://127.0.0.1:{port}/img.png", timeout_s=2)


@pytest.mark.parametrize("address,blocked", [
    ("127.0.0.1", True), ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.1.1", True),
    ("169.254.169.254", True), ("0.0.0.0", True), ("224.0.0.1", True), ("100.64.0.1", True),
    ("240.0.0.1", True), ("::1", True), ("::", True), ("fe80::1", True), ("fc00::1", True),
    ("::ffff:127.0.0.1", True), ("64:ff9b::a00:1", True), ("2002:7f00:1::", True),
    ("8.8.8.8", False), ("2606:4700:4700::1111", False), ("::ffff:8.8.8.8", False),
])
def test_is_blocked_ip(address: str, blocked: bool) -> None:
    assert media.is_blocked_ip(ipaddress.ip_address(address)) is blocked
