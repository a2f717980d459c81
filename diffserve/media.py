"""Media in and out: generated pixels -> uint8 arrays, PIL images, encoded bytes and files; user-supplied
image input (path, URL, data URI, base64, bytes) -> an RGB PIL image.

Output naming rule (one rule for images and videos):

* ``output_path`` given and one output: exactly that path (an existing file there is replaced).
* ``output_path`` given and several outputs: ``{stem}_{i}{suffix}`` next to it, e.g. ``cat.png`` ->
  ``cat_0.png``, ``cat_1.png``. A missing parent folder is created, as ``output_dir`` is.
* ``output_dir`` given: ``{stem}-{YYYYmmdd-HHMMSS}-{6 hex}_{i}.{ext}`` inside it, so repeated runs never
  overwrite each other (pass ``unique=False`` to use ``{stem}_{i}.{ext}`` as given).
* Format ``frames`` writes a folder of ``frame_00000.png`` ... per video; the rules above name the folder.
  An existing non-empty folder is never replaced.

Every file is written under a temporary name in its destination folder and ``os.replace``-d into place,
and a call that fails part-way removes what it already wrote, so nothing is left half-written.

Outputs remember how they were made (`generation_metadata`: prompt, negative prompt, seed, steps, guidance,
size, model, frames and fps): PNG text chunks (also each PNG of a frames folder), MP4 metadata tags, the
JSON of it as the JPEG / GIF comment. WebP carries none. `read_metadata` reads it back.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from diffserve.config import GenerationRequest
from diffserve.errors import InvalidRequestError, OutputError

# Image input lives in diffserve.image_input; re-exported here for callers of diffserve.media.
from diffserve.image_input import (
    DEFAULT_MAX_PIXELS,
    as_path,
    decode_image,
    fetch_image_bytes,
    is_blocked_ip,
    load_image,
    reason,
    short,
)

__all__ = ["DEFAULT_MAX_PIXELS", "decode_image", "fetch_image_bytes", "is_blocked_ip", "load_image"]

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


_T = TypeVar("_T")

Metadata = Mapping[str, str]
"""What an output file records about its generation (`generation_metadata`)."""


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
# Metadata
# --------------------------------------------------------------------------------------------------------


def generation_metadata(request: GenerationRequest, model: str | None = None) -> dict[str, str]:
    """What an output records of the (resolved) request that made it, as strings: prompt, negative_prompt
    (when given), seed, steps, guidance_scale, true_cfg_scale (models that have one), size (WxH), model (when
    known), frames and fps (videos), and the software. Written by `encode_image` / `encode_video` /
    `write_*` when passed as `metadata`."""
    r = request
    out = {"prompt": r.prompt}
    if r.negative_prompt is not None:
        out["negative_prompt"] = r.negative_prompt
    fields = {"seed": r.seed, "steps": r.num_inference_steps, "guidance_scale": r.guidance_scale,
              "true_cfg_scale": r.true_cfg_scale,
              "size": f"{r.width}x{r.height}" if r.width is not None and r.height is not None else None,
              "model": model, "frames": r.num_frames, "fps": r.fps}
    out.update({k: str(v) for k, v in fields.items() if v is not None})
    out["software"] = _software()
    return out


def _software() -> str:
    """diffserve and its installed version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"diffserve {version('diffserve')}"
    except PackageNotFoundError:
        return "diffserve"


def _metadata_json(metadata: Metadata) -> str:
    return json.dumps(dict(metadata), ensure_ascii=False, sort_keys=True)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The generation metadata of an output file (PNG text chunks, MP4 tags, JPEG/GIF comment); empty when
    it has none."""
    p = Path(path)
    if p.suffix.lower() == ".mp4":
        import av

        with av.open(str(p)) as container:
            tags = dict(container.metadata)
        return {k: v for k, v in tags.items() if k not in _CONTAINER_TAGS}
    with Image.open(p) as im:
        if im.format == "PNG":
            return dict(im.text)  # type: ignore[attr-defined]
        comment = im.info.get("comment")
    if not comment:
        return {}
    try:
        parsed = json.loads(comment.decode() if isinstance(comment, bytes) else comment)
    except (ValueError, UnicodeDecodeError):
        return {}
    return {str(k): str(v) for k, v in parsed.items()} if isinstance(parsed, dict) else {}


_CONTAINER_TAGS = ("major_brand", "minor_version", "compatible_brands", "encoder")  # written by the muxer


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


def encode_image(image: Image.Image, fmt: str, quality: int = 95, metadata: Metadata | None = None) -> bytes:
    """One still image -> PNG (lossless; quality ignored), JPEG or WebP bytes at `quality` (0-100);
    `metadata` goes into PNG text chunks or the JPEG comment (WebP: not written)."""
    name = normalize_format(fmt, "image")
    _check_quality(quality)
    buf = io.BytesIO()
    if name == "png":
        info = None
        if metadata:
            info = PngImagePlugin.PngInfo()
            for key, value in metadata.items():
                info.add_text(key, value)  # iTXt (UTF-8) where the value is not Latin-1
        image.save(buf, format="PNG", pnginfo=info)
    elif name == "jpeg":
        rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
        extra = {"comment": _metadata_json(metadata).encode()} if metadata else {}
        # Full-resolution chroma at high quality: 4:2:0 visibly smears saturated edges.
        rgb.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, **extra)
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


def encode_video(frames: np.ndarray, fmt: str, fps: int, metadata: Metadata | None = None) -> bytes:
    """A (F,H,W,3) uint8 video -> mp4 (H.264, yuv420p, BT.709; odd sizes padded by one edge pixel to even),
    GIF or animated WebP bytes, looping forever. Consecutive identical frames may be merged by the GIF/WebP
    writers (the play time stays the same). `metadata`: MP4 tags, or the GIF comment (WebP: not written).
    Format "frames" is a folder, not bytes: use `write_video`."""
    name = normalize_format(fmt, "video")
    if name == "frames":
        raise InvalidRequestError("format 'frames' writes a folder of PNG files and has no single-file form; "
                                  "accepted here: mp4, gif, webp", param="output_format")
    _check_fps(fps)
    arr = _as_frames(frames)
    if name == "mp4":
        return _encode_mp4(arr, fps, metadata)
    return _encode_animated(arr, fps, _PIL_FORMAT[name], metadata)


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """(F,H,W,3) frames with H and W rounded up to even by repeating the last row/column (yuv420p needs it)."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _encode_mp4(frames: np.ndarray, fps: int, metadata: Metadata | None = None) -> bytes:
    """H.264 mp4 via PyAV, with the index ("moov") up front so browsers can start playing while downloading.

    Encoded through a temporary file because the faststart pass re-reads the output, which an in-memory
    buffer does not support."""
    import av  # deferred: PyAV loads FFmpeg, which only video output needs
    from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

    frames = pad_to_even(frames)
    _, h, w, _ = frames.shape
    with tempfile.TemporaryDirectory(prefix="diffserve-mp4-") as tmp:
        path = os.path.join(tmp, "video.mp4")
        # use_metadata_tags: any key is written (as an mdta tag), not only the iTunes ones
        flags = "+faststart+use_metadata_tags" if metadata else "+faststart"
        with av.open(path, mode="w", format="mp4", options={"movflags": flags}) as container:
            container.metadata.update(metadata or {})
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


def _encode_animated(frames: np.ndarray, fps: int, pil_format: str, metadata: Metadata | None = None) -> bytes:
    """Looping GIF (per-frame 256-colour palette, 10 ms timing steps) or animated lossy WebP via Pillow.

    GIF frames are quantized with fast octree: Pillow's default (median cut) is ~200x slower on large frames
    and no closer to the original."""
    images = [Image.fromarray(f) for f in frames]
    if pil_format == "GIF":
        images = [im.quantize(256, method=Image.Quantize.FASTOCTREE) for im in images]
    duration_ms = max(1, round(1000 / fps))
    extra: dict[str, object] = {"quality": _ANIMATED_WEBP_QUALITY, "method": 4} if pil_format == "WEBP" else {}
    if pil_format == "GIF" and metadata:
        extra["comment"] = _metadata_json(metadata).encode()
    buf = io.BytesIO()
    images[0].save(buf, format=pil_format, save_all=True, append_images=images[1:], duration=duration_ms,
                   loop=0, **extra)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------
# Output targets and atomic writes
# --------------------------------------------------------------------------------------------------------


def _ensure_writable_dir(folder: Path, *, create: bool, param: str) -> None:
    """Make sure `folder` exists (creating it and its parents when `create`) and a file can be made in it."""
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise OutputError(f"cannot use {folder} as the output folder: it exists and is not a folder",
                              param=param) from None
        except OSError as e:
            raise OutputError(f"cannot create output folder {folder}: {reason(e)}", param=param) from None
    if not folder.exists():
        raise OutputError(f"cannot write into {folder}: the folder does not exist", param=param)
    if not folder.is_dir():
        raise OutputError(f"cannot write into {folder}: it is not a folder", param=param)
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".diffserve-probe-"):
            pass
    except OSError as e:
        raise OutputError(f"output folder {folder} is not writable: {reason(e)}", param=param) from None


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


def numbered_paths(output_path: Path, count: int, fmt: str) -> list[Path]:
    """Targets for `count` outputs named by one output_path: itself for one, else stem_0, stem_1 ... beside
    it (see the module docstring)."""
    if count == 1:
        return [output_path]
    if fmt == "frames":
        return [output_path.with_name(f"{output_path.name}_{i}") for i in range(count)]
    return [output_path.with_name(f"{output_path.stem}_{i}{output_path.suffix}") for i in range(count)]


def check_output_target(*, fmt: str, output_dir: Path | None, output_path: Path | None, count: int,
                        kind: Kind | None = None) -> None:
    """Validate BEFORE any model work: the format is accepted for the kind of output, the output dir is
    creatable/writable (create it), an output_path's parent is too (created), output_path's suffix agrees
    with fmt (see `format_from_path` to infer fmt from it), and where count > 1 output_path names
    stem_0, stem_1 ... beside it. Raise OutputError/InvalidRequestError with a one-line message.

    `kind` ("image"/"video") narrows the accepted formats; None accepts any image or video format. Giving
    neither output_dir nor output_path (bytes returned to the caller) only checks the format. A missing
    folder (output_dir, or output_path's parent) is created."""
    name = normalize_format(fmt, kind)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if output_dir is not None and output_path is not None:
        raise InvalidRequestError("give either an output folder or an output path, not both", param="output_path")
    if output_dir is not None:
        _ensure_writable_dir(as_path(output_dir), create=True, param="output_dir")
    if output_path is not None:
        path = as_path(output_path)
        _check_suffix(path, name)
        _ensure_writable_dir(path.parent, create=True, param="output_path")
        for target in numbered_paths(path, count, name):
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
        return numbered_paths(as_path(output_path), count, fmt)
    if output_dir is None:
        raise ValueError("writing outputs needs output_dir or output_path")
    if not stem or stem in (".", "..") or Path(stem).name != stem or "\\" in stem:
        raise InvalidRequestError(f"output name {short(stem)!r} must be a plain file name without folders",
                                  param="stem")
    folder = as_path(output_dir)
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
        raise OutputError(f"cannot write {path}: {reason(e)}", param="output_path") from None
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
        raise OutputError(f"cannot write frames folder {path}: {reason(e)}", param="output_path") from None
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


def _per_output(metadata: Metadata | Sequence[Metadata | None] | None, count: int) -> list[Metadata | None]:
    """`metadata` for each of `count` outputs: one mapping for all, or one (or None) per output."""
    if metadata is None or isinstance(metadata, Mapping):
        return [metadata] * count
    items = list(metadata)
    if len(items) != count:
        raise ValueError(f"metadata: {len(items)} entries for {count} outputs")
    return items


def write_images(images: list[Image.Image], *, fmt: str, output_dir: Path | None = None,
                 output_path: Path | None = None, stem: str = "image", quality: int = 95,
                 unique: bool = True, metadata: Metadata | Sequence[Metadata | None] | None = None) -> list[Path]:
    """Encode and write still images; returns their paths in order. All images are encoded before any file is
    written, and a write failure removes the files written so far (naming rule: module docstring).
    `metadata`: one mapping for every image or one per image (`generation_metadata`; see `encode_image`)."""
    if not images:
        raise ValueError("write_images needs at least one image")
    name = normalize_format(fmt, "image")
    check_output_target(fmt=name, output_dir=output_dir, output_path=output_path, count=len(images), kind="image")
    paths = _target_paths(fmt=name, count=len(images), output_dir=output_dir, output_path=output_path,
                          stem=stem, unique=unique)
    metas = _per_output(metadata, len(images))
    payloads = [encode_image(im, name, quality, meta) for im, meta in zip(images, metas, strict=True)]
    return _write_all(paths, payloads, _write_bytes_atomic)


def _frame_files(frames: np.ndarray, metadata: Metadata | None = None) -> list[tuple[str, bytes]]:
    """A video as (frame_00000.png, PNG bytes) pairs, each PNG with `metadata`."""
    return [(f"frame_{i:05d}.png", encode_image(Image.fromarray(f), "png", metadata=metadata))
            for i, f in enumerate(frames)]


def write_videos(videos: Sequence[np.ndarray], *, fmt: str, fps: int, output_dir: Path | None = None,
                 output_path: Path | None = None, stem: str = "video", unique: bool = True,
                 metadata: Metadata | Sequence[Metadata | None] | None = None) -> list[Path]:
    """Encode and write several (F,H,W,3) uint8 videos; returns their paths (folders for "frames"). All are
    encoded before anything is written; a write failure removes what this call wrote. `metadata`: one
    mapping for every video or one per video (see `encode_video`)."""
    if not videos:
        raise ValueError("write_videos needs at least one video")
    name = normalize_format(fmt, "video")
    _check_fps(fps)
    check_output_target(fmt=name, output_dir=output_dir, output_path=output_path, count=len(videos), kind="video")
    paths = _target_paths(fmt=name, count=len(videos), output_dir=output_dir, output_path=output_path,
                          stem=stem, unique=unique)
    metas = _per_output(metadata, len(videos))
    if name == "frames":
        folders = [_frame_files(_as_frames(v), meta) for v, meta in zip(videos, metas, strict=True)]
        return _write_all(paths, folders, _write_dir_atomic)
    blobs = [encode_video(v, name, fps, meta) for v, meta in zip(videos, metas, strict=True)]
    return _write_all(paths, blobs, _write_bytes_atomic)


def write_video(frames: np.ndarray, *, fmt: str, fps: int, output_dir: Path | None = None,
                output_path: Path | None = None, stem: str = "video", unique: bool = True,
                metadata: Metadata | None = None) -> Path:
    """Encode and write one (F,H,W,3) uint8 video; fmt "frames" -> a folder of PNGs (frame_00000.png ...),
    and the folder is returned."""
    return write_videos([frames], fmt=fmt, fps=fps, output_dir=output_dir, output_path=output_path, stem=stem,
                        unique=unique, metadata=metadata)[0]

