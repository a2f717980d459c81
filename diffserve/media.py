"""Media in and out: generated pixels -> uint8 arrays, PIL images, encoded bytes and files; user-supplied
image input (path, URL, data URI, base64, bytes) -> an RGB PIL image.

Output naming rule (one rule for images and videos):

* ``output_path`` given and one output: exactly that path (an existing file there is replaced).
* ``output_path`` given and several outputs: ``{stem}_{i}{suffix}`` next to it, e.g. ``cat.png`` ->
  ``cat_0.png``, ``cat_1.png``.
* ``output_dir`` given: ``{stem}-{YYYYmmdd-HHMMSS}-{6 hex}_{i}.{ext}`` inside it, so repeated runs never
  overwrite each other (pass ``unique=False`` to use ``{stem}_{i}.{ext}`` as given).
* Format ``frames`` writes a folder of ``frame_00000.png`` ... per video; the rules above name the folder.
  An existing non-empty folder is never replaced.

Every file is written under a temporary name in its destination folder and ``os.replace``-d into place,
and a call that fails part-way removes what it already wrote, so nothing is left half-written.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import re
import secrets
import shutil
import socket
import ssl
import struct
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import unquote_to_bytes, urljoin, urlsplit
from urllib.request import url2pathname

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from diffserve.errors import InvalidRequestError, OutputError

Kind = Literal["image", "video"]

IMAGE_FORMATS = ("png", "jpeg", "webp")
VIDEO_FORMATS = ("mp4", "gif", "webp", "frames")

#: MIME type of each single-file output format.
MIME_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "mp4": "video/mp4",
}

_FORMAT_ALIASES = {"jpg": "jpeg"}
_SUFFIX_FOR_FORMAT = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "gif": ".gif", "mp4": ".mp4"}
_FORMAT_FOR_SUFFIX = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".webp": "webp",
    ".gif": "gif",
    ".mp4": "mp4",
}
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF"}

MIN_FPS, MAX_FPS = 1, 120
#: GIF and animated WebP quality knobs (quality for animated WebP only; GIF has none).
_ANIMATED_WEBP_QUALITY = 90
#: H.264 constant-rate factor: 18 is visually near-lossless at a reasonable size.
_MP4_CRF = "18"
_MP4_PRESET = "medium"

#: Decoders tried on user input; anything else is refused rather than handed to a rarely used parser.
_INPUT_PIL_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")  # JPEG also opens MPO
_ACCEPTED_INPUT_TEXT = "PNG, JPEG, WebP, GIF, BMP, TIFF or AVIF"
_ACCEPTED_SOURCES_TEXT = "a file path, an http(s) URL, a data URI (data:image/png;base64,...), base64 or raw bytes"
DEFAULT_MAX_PIXELS = 8192 * 8192
_MAX_REDIRECTS = 5
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_READ_CHUNK = 64 * 1024
_MIN_BARE_BASE64_CHARS = 64
_BASE64_RE = re.compile(r"[A-Za-z0-9+/_\-\s]+={0,2}\s*")
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------------


def formats_for(kind: Kind | None) -> tuple[str, ...]:
    """The output formats accepted for `kind` ("image", "video", or None for either)."""
    if kind is None:
        return tuple(dict.fromkeys(IMAGE_FORMATS + VIDEO_FORMATS))
    if kind == "image":
        return IMAGE_FORMATS
    if kind == "video":
        return VIDEO_FORMATS
    raise ValueError(f"kind must be 'image', 'video' or None, not {kind!r}")


def normalize_format(fmt: str, kind: Kind | None = None) -> str:
    """Canonical name of an output format ("JPG", ".jpg" -> "jpeg"), checked against what `kind` accepts."""
    accepted = formats_for(kind)
    name = fmt.strip().lower().lstrip(".") if isinstance(fmt, str) else ""
    name = _FORMAT_ALIASES.get(name, name)
    if name not in accepted:
        what = f"{kind} output format" if kind else "output format"
        raise InvalidRequestError(f"{what} {fmt!r} is not accepted; accepted: {', '.join(accepted)}",
                                  param="output_format")
    return name


def default_format(kind: Kind) -> str:
    """The format used when the user names neither a format nor a file name: png for images, mp4 for video."""
    return "png" if kind == "image" else "mp4"


def format_from_path(path: str | os.PathLike[str], *, kind: Kind | None = None) -> str:
    """The output format named by a file name's extension (cat.JPG -> "jpeg"), checked against `kind`."""
    p = Path(path)
    suffix = p.suffix.lower()
    accepted = formats_for(kind)
    fmt = _FORMAT_FOR_SUFFIX.get(suffix)
    if fmt is None or fmt not in accepted:
        exts = ", ".join(_suffixes_for(accepted))
        found = f"extension {p.suffix!r}" if suffix else "no extension"
        hint = " (or pass format 'frames' for a folder of PNGs)" if "frames" in accepted else ""
        raise InvalidRequestError(f"cannot tell the output format of {str(p)!r}: it has {found}; "
                                  f"accepted: {exts}{hint}", param="output_path")
    return fmt


def resolve_format(fmt: str | None, output_path: str | os.PathLike[str] | None, kind: Kind) -> str:
    """The format to write: `fmt` when given, else the one `output_path`'s extension names, else the default."""
    if fmt is not None:
        return normalize_format(fmt, kind)
    if output_path is not None:
        return format_from_path(output_path, kind=kind)
    return default_format(kind)


def mime_type(fmt: str) -> str:
    """MIME type of a single-file output format (for HTTP responses)."""
    name = normalize_format(fmt)
    if name not in MIME_TYPES:
        raise InvalidRequestError(f"format {name!r} has no single-file form; accepted: {', '.join(MIME_TYPES)}",
                                  param="output_format")
    return MIME_TYPES[name]


def _suffixes_for(formats: Sequence[str]) -> list[str]:
    """File extensions that name any of `formats`."""
    return [s for s, f in _FORMAT_FOR_SUFFIX.items() if f in formats]


# --------------------------------------------------------------------------------------------------------
# Pixels -> uint8 / PIL
# --------------------------------------------------------------------------------------------------------


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8 exactly like diffusers' VaeImageProcessor.postprocess + numpy_to_pil:
    (x.clamp(0,1) * 255).round() ; input (B,3,H,W) -> (B,H,W,3) or video (B,3,F,H,W) -> (B,F,H,W,3).

    Rounding is half-to-even in float32 (as numpy's) and runs on the tensor's device, so only uint8 crosses to
    the CPU. NaN becomes 0 (diffusers leaves it undefined). The input is never modified.
    """
    if not isinstance(pixels, torch.Tensor) or pixels.ndim not in (4, 5) or pixels.shape[1] not in (1, 3):
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"to_uint8 expects a (B,C,H,W) or (B,C,F,H,W) tensor with C in (1, 3), got {shape}")
    x = pixels.detach().to(dtype=torch.float32, copy=True)
    x.nan_to_num_(nan=0.0).clamp_(0.0, 1.0).mul_(255).round_()
    channels_last = (0, 2, 3, 1) if x.ndim == 4 else (0, 2, 3, 4, 1)
    return x.to(torch.uint8).permute(*channels_last).contiguous().cpu().numpy()


def to_pil_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Images (B,3,H,W) in [0, 1] -> one RGB PIL image each (mode "L" for single-channel input)."""
    if pixels.ndim != 4:
        raise ValueError(f"to_pil_images expects (B,C,H,W), got {tuple(pixels.shape)}")
    arr = to_uint8(pixels)
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0]) for a in arr]
    return [Image.fromarray(a) for a in arr]


def to_video_frames(pixels: torch.Tensor) -> list[np.ndarray]:
    """Videos (B,3,F,H,W) in [0, 1] -> one (F,H,W,3) uint8 array per video."""
    if pixels.ndim != 5 or pixels.shape[1] != 3:
        raise ValueError(f"to_video_frames expects (B,3,F,H,W), got {tuple(pixels.shape)}")
    return list(to_uint8(pixels))


# --------------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------------


def _check_quality(quality: int) -> int:
    """`quality` as an int in [0, 100] (JPEG/WebP quality), else InvalidRequestError."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
        raise InvalidRequestError(f"quality={quality!r} is not accepted: it must be an integer between 0 and 100",
                                  param="quality")
    return quality


def _check_fps(fps: int) -> int:
    """`fps` as an int in [MIN_FPS, MAX_FPS], else InvalidRequestError."""
    if isinstance(fps, bool) or not isinstance(fps, int) or not MIN_FPS <= fps <= MAX_FPS:
        raise InvalidRequestError(f"fps={fps!r} is not accepted: it must be an integer between {MIN_FPS} and "
                                  f"{MAX_FPS}", param="fps")
    return fps


def encode_image(image: Image.Image, fmt: str, quality: int = 95) -> bytes:
    """One still image -> PNG (lossless; quality ignored), JPEG or WebP bytes at `quality` (0-100)."""
    name = normalize_format(fmt, "image")
    _check_quality(quality)
    buf = io.BytesIO()
    if name == "png":
        image.save(buf, format="PNG")
    elif name == "jpeg":
        rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
        # Full-resolution chroma at high quality: 4:2:0 visibly smears saturated edges.
        rgb.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        src = image if image.mode in ("RGB", "RGBA") else image.convert("RGB")
        src.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()


def _as_frames(frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """A video as a (F,H,W,3) uint8 array with at least one frame (a caller bug raises ValueError)."""
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or 0 in arr.shape:
        raise ValueError(f"video frames must be a non-empty (F,H,W,3) uint8 array, got {arr.dtype} {arr.shape}")
    return arr


def encode_video(frames: np.ndarray, fmt: str, fps: int) -> bytes:
    """A (F,H,W,3) uint8 video -> mp4 (H.264, yuv420p, BT.709; odd sizes padded by one edge pixel to even),
    GIF or animated WebP bytes, looping forever. Consecutive identical frames may be merged by the GIF/WebP
    writers (the play time stays the same). Format "frames" is a folder, not bytes: use `write_video`."""
    name = normalize_format(fmt, "video")
    if name == "frames":
        raise InvalidRequestError("format 'frames' writes a folder of PNG files and has no single-file form; "
                                  "accepted here: mp4, gif, webp", param="output_format")
    _check_fps(fps)
    arr = _as_frames(frames)
    if name == "mp4":
        return _encode_mp4(arr, fps)
    return _encode_animated(arr, fps, _PIL_FORMAT[name])


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """(F,H,W,3) frames with H and W rounded up to even by repeating the last row/column (yuv420p needs it)."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264 mp4 via PyAV, with the index ("moov") up front so browsers can start playing while downloading.

    Encoded through a temporary file because the faststart pass re-reads the output, which an in-memory
    buffer does not support."""
    import av  # deferred: PyAV loads FFmpeg, which only video output needs
    from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

    frames = pad_to_even(frames)
    _, h, w, _ = frames.shape
    with tempfile.TemporaryDirectory(prefix="diffserve-mp4-") as tmp:
        path = os.path.join(tmp, "video.mp4")
        with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": _MP4_CRF, "preset": _MP4_PRESET}
            ctx = stream.codec_context
            ctx.colorspace, ctx.color_range = Colorspace.ITU709, ColorRange.MPEG
            ctx.color_primaries, ctx.color_trc = ColorPrimaries.BT709, ColorTrc.BT709
            for rgb in frames:
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                    format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG,
                    dst_color_primaries=ColorPrimaries.BT709, dst_color_trc=ColorTrc.BT709)
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        with open(path, "rb") as f:
            return f.read()


def _encode_animated(frames: np.ndarray, fps: int, pil_format: str) -> bytes:
    """Looping GIF (per-frame 256-colour palette, 10 ms timing steps) or animated lossy WebP via Pillow.

    GIF frames are quantized with fast octree: Pillow's default (median cut) is ~200x slower on large frames
    and no closer to the original."""
    images = [Image.fromarray(f) for f in frames]
    if pil_format == "GIF":
        images = [im.quantize(256, method=Image.Quantize.FASTOCTREE) for im in images]
    duration_ms = max(1, round(1000 / fps))
    extra = {"quality": _ANIMATED_WEBP_QUALITY, "method": 4} if pil_format == "WEBP" else {}
    buf = io.BytesIO()
    images[0].save(buf, format=pil_format, save_all=True, append_images=images[1:], duration=duration_ms,
                   loop=0, **extra)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------
# Output targets and atomic writes
# --------------------------------------------------------------------------------------------------------


def _as_path(p: str | os.PathLike[str]) -> Path:
    """A user path with ~ expanded."""
    return Path(p).expanduser()


def _reason(err: OSError) -> str:
    """The human part of an OSError ("Permission denied")."""
    return err.strerror or str(err)


def _ensure_writable_dir(folder: Path, *, create: bool, param: str) -> None:
    """Make sure `folder` exists (creating it and its parents when `create`) and a file can be made in it."""
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise OutputError(f"cannot use {folder} as the output folder: it exists and is not a folder",
                              param=param) from None
        except OSError as e:
            raise OutputError(f"cannot create output folder {folder}: {_reason(e)}", param=param) from None
    if not folder.exists():
        raise OutputError(f"cannot write into {folder}: the folder does not exist", param=param)
    if not folder.is_dir():
        raise OutputError(f"cannot write into {folder}: it is not a folder", param=param)
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".diffserve-probe-"):
            pass
    except OSError as e:
        raise OutputError(f"output folder {folder} is not writable: {_reason(e)}", param=param) from None


def _check_suffix(path: Path, fmt: str) -> None:
    """Refuse an output_path whose extension disagrees with `fmt` (frames: refuse a file-like name)."""
    suffix = path.suffix.lower()
    if fmt == "frames":
        if suffix in _FORMAT_FOR_SUFFIX:
            raise InvalidRequestError(f"format 'frames' writes a folder of PNG files, but {str(path)!r} is a "
                                      f"{suffix} file name; give a folder path", param="output_path")
        return
    expected = _suffixes_for([fmt])
    if suffix not in expected:
        found = f"ends in {path.suffix!r}" if suffix else "has no extension"
        raise InvalidRequestError(f"output path {str(path)!r} {found} but the format is {fmt!r}; name it "
                                  f"with {' or '.join(expected)} or choose the matching format", param="output_path")


def _numbered_paths(output_path: Path, count: int, fmt: str) -> list[Path]:
    """Targets for `count` outputs named by one output_path (see the module docstring)."""
    if count == 1:
        return [output_path]
    if fmt == "frames":
        return [output_path.with_name(f"{output_path.name}_{i}") for i in range(count)]
    return [output_path.with_name(f"{output_path.stem}_{i}{output_path.suffix}") for i in range(count)]


def check_output_target(*, fmt: str, output_dir: Path | None, output_path: Path | None, count: int,
                        kind: Kind | None = None) -> None:
    """Validate BEFORE any model work: the format is accepted for the kind of output, the output dir is
    creatable/writable (create it), an output_path's parent exists and is writable, output_path's suffix agrees
    with fmt (see `format_from_path` to infer fmt from it), and where count > 1 output_path names
    stem_0, stem_1 ... beside it. Raise OutputError/InvalidRequestError with a one-line message.

    `kind` ("image"/"video") narrows the accepted formats; None accepts any image or video format. Giving
    neither output_dir nor output_path (bytes returned to the caller) only checks the format."""
    name = normalize_format(fmt, kind)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if output_dir is not None and output_path is not None:
        raise InvalidRequestError("give either an output folder or an output path, not both", param="output_path")
    if output_dir is not None:
        _ensure_writable_dir(_as_path(output_dir), create=True, param="output_dir")
    if output_path is not None:
        path = _as_path(output_path)
        _check_suffix(path, name)
        _ensure_writable_dir(path.parent, create=False, param="output_path")
        for target in _numbered_paths(path, count, name):
            _check_target_free(target, name)


def _check_target_free(target: Path, fmt: str) -> None:
    """Refuse targets that cannot be replaced: a folder where a file goes, or a file / non-empty folder where a
    frames folder goes (a folder of the user's files is never deleted)."""
    if fmt != "frames":
        if target.is_dir():
            raise OutputError(f"cannot write {target}: it is a folder; give a file name", param="output_path")
        return
    if target.exists() and not target.is_dir():
        raise OutputError(f"cannot write frames into {target}: it is a file", param="output_path")
    if target.is_dir() and any(target.iterdir()):
        raise OutputError(f"cannot write frames into {target}: the folder exists and is not empty",
                          param="output_path")


def unique_stem(stem: str) -> str:
    """`stem` made unique per call: stem-YYYYmmdd-HHMMSS-<6 hex>."""
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _target_paths(*, fmt: str, count: int, output_dir: Path | None, output_path: Path | None, stem: str,
                  unique: bool) -> list[Path]:
    """Where `count` outputs go (see the module docstring for the naming rule)."""
    if output_path is not None:
        return _numbered_paths(_as_path(output_path), count, fmt)
    if output_dir is None:
        raise ValueError("writing outputs needs output_dir or output_path")
    if not stem or stem in (".", "..") or Path(stem).name != stem or "\\" in stem:
        raise InvalidRequestError(f"output name {_short(stem)!r} must be a plain file name without folders",
                                  param="stem")
    folder = _as_path(output_dir)
    ext = _SUFFIX_FOR_FORMAT.get(fmt, "")
    for _ in range(100):
        base = unique_stem(stem) if unique else stem
        paths = [folder / f"{base}_{i}{ext}" for i in range(count)]
        if not unique or not any(p.exists() for p in paths):
            return paths
    raise OutputError(f"could not find unused output names in {folder}", param="output_dir")


def _temp_sibling(path: Path) -> Path:
    """A hidden, unused name in `path`'s folder, for writing before the final rename."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary sibling and os.replace: readers see the old file or the whole new
    one, never a part."""
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with suppress(OSError):
            tmp.unlink()
        raise OutputError(f"cannot write {path}: {_reason(e)}", param="output_path") from None
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


def _write_dir_atomic(path: Path, files: list[tuple[str, bytes]]) -> None:
    """Create folder `path` holding `files` (name, bytes), built under a temporary sibling and renamed into
    place; an existing empty folder is replaced, a non-empty one is refused."""
    tmp = _temp_sibling(path)
    try:
        tmp.mkdir()
        for name, data in files:
            (tmp / name).write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write frames folder {path}: {_reason(e)}", param="output_path") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove(paths: Sequence[Path]) -> None:
    """Best-effort removal of outputs this call already wrote (files or frames folders)."""
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with suppress(OSError):
                p.unlink()


def _write_all(paths: list[Path], payloads: list[_T], write: Callable[[Path, _T], None]) -> list[Path]:
    """Write every payload to its path; if one fails, remove the ones this call wrote and re-raise."""
    written: list[Path] = []
    try:
        for path, payload in zip(paths, payloads, strict=True):
            write(path, payload)
            written.append(path)
    except BaseException:
        _remove(written)
        raise
    return written


def write_images(images: list[Image.Image], *, fmt: str, output_dir: Path | None = None,
                 output_path: Path | None = None, stem: str = "image", quality: int = 95,
                 unique: bool = True) -> list[Path]:
    """Encode and write still images; returns their paths in order. All images are encoded before any file is
    written, and a write failure removes the files written so far (naming rule: module docstring)."""
    if not images:
        raise ValueError("write_images needs at least one image")
    name = normalize_format(fmt, "image")
    check_output_target(fmt=name, output_dir=output_dir, output_path=output_path, count=len(images), kind="image")
    paths = _target_paths(fmt=name, count=len(images), output_dir=output_dir, output_path=output_path,
                          stem=stem, unique=unique)
    payloads = [encode_image(im, name, quality) for im in images]
    return _write_all(paths, payloads, _write_bytes_atomic)


def _frame_files(frames: np.ndarray) -> list[tuple[str, bytes]]:
    """A video as (frame_00000.png, PNG bytes) pairs."""
    return [(f"frame_{i:05d}.png", encode_image(Image.fromarray(f), "png")) for i, f in enumerate(frames)]


def write_videos(videos: Sequence[np.ndarray], *, fmt: str, fps: int, output_dir: Path | None = None,
                 output_path: Path | None = None, stem: str = "video", unique: bool = True) -> list[Path]:
    """Encode and write several (F,H,W,3) uint8 videos; returns their paths (folders for "frames"). All are
    encoded before anything is written; a write failure removes what this call wrote."""
    if not videos:
        raise ValueError("write_videos needs at least one video")
    name = normalize_format(fmt, "video")
    _check_fps(fps)
    check_output_target(fmt=name, output_dir=output_dir, output_path=output_path, count=len(videos), kind="video")
    paths = _target_paths(fmt=name, count=len(videos), output_dir=output_dir, output_path=output_path,
                          stem=stem, unique=unique)
    if name == "frames":
        folders = [_frame_files(_as_frames(v)) for v in videos]
        return _write_all(paths, folders, _write_dir_atomic)
    blobs = [encode_video(v, name, fps) for v in videos]
    return _write_all(paths, blobs, _write_bytes_atomic)


def write_video(frames: np.ndarray, *, fmt: str, fps: int, output_dir: Path | None = None,
                output_path: Path | None = None, stem: str = "video", unique: bool = True) -> Path:
    """Encode and write one (F,H,W,3) uint8 video; fmt "frames" -> a folder of PNGs (frame_00000.png ...),
    and the folder is returned."""
    return write_videos([frames], fmt=fmt, fps=fps, output_dir=output_dir, output_path=output_path, stem=stem,
                        unique=unique)[0]


# --------------------------------------------------------------------------------------------------------
# Image input
# --------------------------------------------------------------------------------------------------------


def _bad_image(message: str) -> InvalidRequestError:
    """The error for unusable image input."""
    return InvalidRequestError(message, param="image")


def _short(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters, control characters escaped, for one-line error messages (base64 blobs
    can be megabytes)."""
    cut = text if len(text) <= limit else text[: limit - 3] + "..."
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)


def _too_large(what: str, size: int | str, max_bytes: int) -> InvalidRequestError:
    """The error for input over the size limit."""
    return _bad_image(f"{what} is too large ({size} bytes); the limit is {max_bytes} bytes")


def load_image(source: str | bytes | Path, *, allow_urls: bool = True, max_bytes: int = 20 * 2**20,
               timeout_s: float = 10.0, block_private: bool = False, allow_paths: bool = True,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Accepts: a local file path; an http(s) URL (only when allow_urls; fetched with a timeout, a size limit
    enforced while streaming, and a content-type check (image/*); when block_private, refuse hosts that resolve
    to loopback, private, link-local, multicast, reserved or unspecified addresses, checking every address the
    name resolves to, connecting only to a checked address, and re-checking each redirect); a data URI
    (data:image/png;base64,...); a bare base64 string; raw bytes. Returns an RGB PIL image (fully loaded, EXIF
    orientation applied, first frame of an animation). Anything unreadable, non-image, too large, wrong scheme
    -> InvalidRequestError(param='image') saying what was wrong and what is accepted.

    A server should pass allow_paths=False (clients must not read the server's files; file:// URLs count as
    paths) and block_private=True. `max_pixels` bounds width*height to stop decompression bombs. Proxy
    environment variables are not used; the DNS lookup itself is not bounded by timeout_s."""
    data = _read_source(source, allow_urls=allow_urls, allow_paths=allow_paths, max_bytes=max_bytes,
                        timeout_s=timeout_s, block_private=block_private)
    return decode_image(data, max_pixels=max_pixels)


def _read_source(source: str | bytes | os.PathLike[str], *, allow_urls: bool, allow_paths: bool, max_bytes: int,
                 timeout_s: float, block_private: bool) -> bytes:
    """The encoded image bytes behind any accepted kind of source."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise _too_large("the image", len(data), max_bytes)
        return data
    if isinstance(source, os.PathLike):
        if not allow_paths:
            raise _bad_image(f"local file paths are not accepted here; send {_remote_sources(allow_urls)}")
        return _read_file(_as_path(source), max_bytes)
    if not isinstance(source, str):
        raise _bad_image(f"image input of type {type(source).__name__} is not accepted; send {_ACCEPTED_SOURCES_TEXT}")
    text = source.strip()
    if not text:
        raise _bad_image(f"the image input is empty; send {_ACCEPTED_SOURCES_TEXT}")
    if text[:5].lower() == "data:":
        return _decode_data_uri(text, max_bytes)
    scheme_match = _SCHEME_RE.match(text)
    if scheme_match:
        return _read_url_like(text, scheme_match.group(1).lower(), allow_urls=allow_urls, allow_paths=allow_paths,
                              max_bytes=max_bytes, timeout_s=timeout_s, block_private=block_private)
    if allow_paths and _is_existing_path(text):
        return _read_file(_as_path(text), max_bytes)
    if len(text) >= _MIN_BARE_BASE64_CHARS and _BASE64_RE.fullmatch(text):
        invalid = ("the image input is neither an existing file nor valid base64" if allow_paths
                   else "the image input is not valid base64")
        return _decode_base64(text, max_bytes, "the base64 image", invalid=invalid)
    if allow_paths:
        raise _bad_image(f"image file not found: {_short(text)!r}; accepted: {_ACCEPTED_SOURCES_TEXT}")
    raise _bad_image(f"image input {_short(text)!r} is not a URL, data URI or base64; "
                     f"send {_remote_sources(allow_urls)}")


def _remote_sources(allow_urls: bool) -> str:
    """The kinds of image input accepted when local paths are not."""
    return ("an http(s) URL, a data URI (data:image/png;base64,...) or base64" if allow_urls
            else "a data URI (data:image/png;base64,...) or base64")


def _read_url_like(text: str, scheme: str, *, allow_urls: bool, allow_paths: bool, max_bytes: int,
                   timeout_s: float, block_private: bool) -> bytes:
    """Bytes behind a scheme://... input: http(s) is fetched, file:// is a local path, the rest is refused."""
    if scheme in ("http", "https"):
        if not allow_urls:
            raise _bad_image(f"image URLs are not accepted here; send {_remote_sources(False)}")
        return fetch_image_bytes(text, max_bytes=max_bytes, timeout_s=timeout_s, block_private=block_private)
    if scheme == "file" and allow_paths:
        return _read_file(_as_path(url2pathname(urlsplit(text).path)), max_bytes)
    accepted = _ACCEPTED_SOURCES_TEXT if allow_paths else _remote_sources(allow_urls)
    raise _bad_image(f"URL scheme {scheme!r} is not accepted; send {accepted}")


def _is_existing_path(text: str) -> bool:
    """Whether `text` names an existing file system entry (False for strings no path can be)."""
    try:
        return _as_path(text).exists()
    except (OSError, ValueError):
        return False


def _read_file(path: Path, max_bytes: int) -> bytes:
    """A local image file's bytes, size-checked before reading."""
    try:
        if not path.exists():
            raise _bad_image(f"image file not found: {str(path)!r}")
        if path.is_dir():
            raise _bad_image(f"image path {str(path)!r} is a folder; give an image file")
        size = path.stat().st_size
        if size > max_bytes:
            raise _too_large(f"image file {str(path)!r}", size, max_bytes)
        return path.read_bytes()
    except OSError as e:
        raise _bad_image(f"cannot read image file {str(path)!r}: {_reason(e)}") from None


def _decode_base64(text: str, max_bytes: int, what: str, *, invalid: str | None = None) -> bytes:
    """Standard or URL-safe base64 (whitespace and missing padding tolerated) -> bytes, size-checked first."""
    compact = "".join(text.split())
    if len(compact) * 3 // 4 > max_bytes + 2:
        raise _too_large(what, f"about {len(compact) * 3 // 4}", max_bytes)
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    compact += "=" * (-len(compact) % 4)
    try:
        data = base64.b64decode(compact, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        message = invalid or f"{what} is not valid base64"
        raise _bad_image(f"{message}; accepted: {_ACCEPTED_SOURCES_TEXT}") from None
    if len(data) > max_bytes:
        raise _too_large(what, len(data), max_bytes)
    return data


def _decode_data_uri(text: str, max_bytes: int) -> bytes:
    """data:[image/...][;base64],payload -> bytes; a non-image media type is refused."""
    header, sep, payload = text.partition(",")
    if not sep:
        raise _bad_image("malformed data URI: no ',' before the data; expected data:image/png;base64,...")
    params = [p.strip().lower() for p in header[5:].split(";")]
    media_type = params[0]
    if media_type and not media_type.startswith("image/"):
        raise _bad_image(f"data URI media type {media_type!r} is not an image; expected data:image/...;base64,...")
    if "base64" in params[1:]:
        return _decode_base64(payload, max_bytes, "the data URI image")
    data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise _too_large("the data URI image", len(data), max_bytes)
    return data


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded image bytes -> a fully loaded RGB PIL image with EXIF orientation applied."""
    if not data:
        raise _bad_image("the image data is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_INPUT_PIL_FORMATS) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise _bad_image(f"the image is {width}x{height} pixels; at most {max_pixels} pixels are "
                                     "accepted")
                im.load()
                upright = ImageOps.exif_transpose(im)
                return upright.convert("RGB")
    except UnidentifiedImageError:
        raise _bad_image(f"the data is not a recognized image; accepted formats: {_ACCEPTED_INPUT_TEXT}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bad_image(f"the image has too many pixels; at most {max_pixels} are accepted") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise _bad_image(f"the image data is corrupt or truncated ({e})") from None


# --------------------------------------------------------------------------------------------------------
# URL fetching
# --------------------------------------------------------------------------------------------------------


def is_blocked_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a URL may not reach `ip` when private hosts are blocked: loopback, private, link-local,
    multicast, reserved, unspecified or otherwise non-global, including such IPv4 addresses wrapped in IPv6
    (::ffff:a.b.c.d, 6to4, NAT64 64:ff9b::/96)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_blocked_ip(embedded)
    return (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified or not ip.is_global)


def _connect_checked(host: str, port: int, timeout: float, block_private: bool) -> socket.socket:
    """A TCP connection to `host`, made to an address checked here (not re-resolved later), so a name cannot
    pass the check and then resolve elsewhere."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise _bad_image(f"cannot resolve image URL host {host!r}: {_reason(e)}") from None
    if block_private:
        for *_, sockaddr in infos:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if is_blocked_ip(ip):
                raise _bad_image(f"image URL host {host!r} resolves to the non-public address {ip}; only public "
                                 "hosts are accepted")
    last_error: OSError = OSError(f"no address found for {host}")
    for family, type_, proto, _, sockaddr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            last_error = e
    raise last_error


class _CheckedHTTPConnection(http.client.HTTPConnection):
    """HTTP connection that connects through `_connect_checked`."""

    def __init__(self, host: str, port: int, *, timeout: float, block_private: bool) -> None:
        super().__init__(host, port, timeout=timeout)
        self.block_private = block_private
        self.raw_sock: socket.socket | None = None

    def connect(self) -> None:
        self.sock = self.raw_sock = _connect_checked(self.host, self.port, self.timeout, self.block_private)


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS connection that connects through `_connect_checked`, verifying the certificate for the host name."""

    def __init__(self, host: str, port: int, *, timeout: float, block_private: bool,
                 context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.block_private = block_private
        self.tls_context = context
        self.raw_sock: socket.socket | None = None

    def connect(self) -> None:
        sock = _connect_checked(self.host, self.port, self.timeout, self.block_private)
        try:
            self.sock = self.raw_sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _tls_context() -> ssl.SSLContext:
    """Certificate-verifying TLS context, with certifi's CA bundle when installed (as httpx uses)."""
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


def _remaining(deadline: float, url: str, timeout_s: float) -> float:
    """Seconds left before `deadline`, or the timeout error when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _bad_image(f"fetching image URL {_short(url)} timed out after {timeout_s:g} s")
    return left


def fetch_image_bytes(url: str, *, max_bytes: int = 20 * 2**20, timeout_s: float = 10.0,
                      block_private: bool = False) -> bytes:
    """GET an http(s) image URL: at most `timeout_s` overall, at most `max_bytes` (checked while streaming),
    an image/* content type, up to 5 redirects each checked like the first URL."""
    deadline = time.monotonic() + timeout_s
    current = url
    for _ in range(_MAX_REDIRECTS + 1):
        location = _fetch_once(current, url, deadline, max_bytes, timeout_s, block_private)
        if isinstance(location, bytes):
            return location
        current = location
    raise _bad_image(f"image URL {_short(url)} redirected more than {_MAX_REDIRECTS} times")


def _fetch_once(current: str, url: str, deadline: float, max_bytes: int, timeout_s: float,
                block_private: bool) -> bytes | str:
    """One request: the body, or the absolute URL a redirect points to."""
    parts = urlsplit(current)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _bad_image(f"image URL {_short(current)} is not an http(s) URL with a host name")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise _bad_image(f"image URL {_short(current)} has an invalid port") from None
    https = parts.scheme.lower() == "https"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn: _CheckedHTTPConnection | _CheckedHTTPSConnection | None = None
    try:
        timeout = _remaining(deadline, url, timeout_s)
        if https:
            conn = _CheckedHTTPSConnection(parts.hostname, port, timeout=timeout, block_private=block_private,
                                           context=_tls_context())
        else:
            conn = _CheckedHTTPConnection(parts.hostname, port, timeout=timeout, block_private=block_private)
        conn.request("GET", target, headers={"User-Agent": "diffserve", "Accept": "image/*"})
        resp = conn.getresponse()
        if resp.status in _REDIRECT_CODES:
            location = resp.getheader("Location")
            if not location:
                raise _bad_image(f"image URL {_short(current)} redirected without a Location")
            return urljoin(current, location)
        if resp.status != 200:
            raise _bad_image(f"image URL {_short(current)} answered HTTP {resp.status} {resp.reason}")
        _check_content_type(resp.getheader("Content-Type"), current)
        return _read_body(resp, conn.raw_sock, url, deadline, max_bytes, timeout_s)
    except TimeoutError:
        raise _bad_image(f"fetching image URL {_short(url)} timed out after {timeout_s:g} s") from None
    except (OSError, http.client.HTTPException) as e:
        detail = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
        raise _bad_image(f"cannot fetch image URL {_short(current)}: {detail}") from None
    finally:
        if conn is not None:
            conn.close()


def _check_content_type(content_type: str | None, url: str) -> None:
    """Refuse a response that does not say it is an image."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if not media_type.startswith("image/"):
        raise _bad_image(f"image URL {_short(url)} returned content type {media_type or 'none'!r}; an image/* "
                         "response is required")


def _read_body(resp: http.client.HTTPResponse, sock: socket.socket | None, url: str, deadline: float,
               max_bytes: int, timeout_s: float) -> bytes:
    """The response body, refused as soon as it (or its declared length) passes `max_bytes` or the deadline."""
    declared = resp.getheader("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise _too_large(f"image URL {_short(url)}", int(declared), max_bytes)
    chunks: list[bytes] = []
    total = 0
    while True:
        if sock is not None:
            sock.settimeout(_remaining(deadline, url, timeout_s))
        chunk = resp.read1(_READ_CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(f"image URL {_short(url)}", f"over {max_bytes}", max_bytes)
        chunks.append(chunk)
