"""Reading request bodies: JSON or multipart forms (OpenAI's SDK sends edits and videos as multipart), the
files uploaded with them, and input images given as uploads, data URLs or (only with --allow-url-inputs,
never to loopback or private addresses) http(s) URLs. Image decoding and URL fetching are diffserve.media's.

An input image is refused above `ImageRules.max_pixels` (checked from its header, before decoding), decoded
in a worker thread (at most `ImageRules.slots` at once), shrunk to the model's working size (`WorkingSize`:
never below what the model resizes it to), and kept as compressed bytes (`EncodedImage`) from then on: the
queue and the worker pipe never hold decoded pixels.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from diffserve.errors import UserError
from diffserve.server.messages import EncodedImage
from diffserve.server.protocol import APIError, from_user_error

MAX_FORM_FILES = 16
MAX_FORM_FIELDS = 64
MIN_INPUT_EDGE = 512  # input images keep at least this short side (image encoders such as CLIP look at 224)


@dataclass(frozen=True)
class WorkingSize:
    """The least an input image must keep for the model to see all it uses: both sides at least
    `width` x `height` (image-to-video models resize the image to the output size), about `area` pixels
    (edit models resize it to that area at its aspect ratio, rounding the sides to multiples of 32: a
    32-pixel margin covers the rounding), and a short side of MIN_INPUT_EDGE."""

    width: int = 0
    height: int = 0
    area: int = 0

    def scale(self, size: tuple[int, int]) -> float:
        """The factor an image of `size` may be shrunk by (1.0: keep it)."""
        w, h = size
        by_area = (math.sqrt(self.area) + 32) / math.sqrt(w * h) if self.area else 0.0
        need = max(self.width / w, self.height / h, by_area, MIN_INPUT_EDGE / min(w, h))
        return min(1.0, need)


@dataclass(frozen=True)
class ImageRules:
    """How this server takes input images for the model: the pixel limit, the working size, and the
    semaphore that bounds concurrent decodes."""

    max_pixels: int
    need: WorkingSize
    slots: asyncio.Semaphore


class PayloadTooLarge(HTTPException):
    """A request body over the server's upload limit (answered 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this server's limit of {limit} bytes "
                              "(--max-upload-mb)")


def is_form(request: Request) -> bool:
    ctype = request.headers.get("content-type", "").lower()
    return ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded"))


async def read_json(request: Request) -> Any:
    """The JSON body (400 when it is not JSON)."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e}). The body must be JSON, or "
                            "multipart/form-data for uploads.") from None


def _form_list(fields: dict[str, Any], name: str) -> list[Any]:
    items = fields.setdefault(name, [])
    if not isinstance(items, list):
        raise APIError(400, f"form field {name!r} is given both as a list and otherwise", param=name)
    return items


def _set_field(fields: dict[str, Any], key: str, value: str) -> None:
    """Store form field `key` in `fields`, unfolding OpenAI SDK keys ``a[b]`` (nested) and ``a[]`` (lists).
    A list of objects (``a[][b]``) is refused: the SDK groups a form's values by key, so which value belongs to
    which object is lost."""
    if key.endswith("[]"):
        _form_list(fields, key[:-2]).append(value)
    elif "[][" in key:
        outer = key.split("[", 1)[0]
        raise APIError(400, f"form field {key!r}: a list of objects cannot be sent in a multipart form (the order "
                            f"of its values is lost); give {outer} as strings (e.g. for lora \"name:scale\")",
                       param=outer)
    elif "[" in key and key.endswith("]"):
        outer, inner = key[:-1].split("[", 1)
        nested = fields.setdefault(outer, {})
        if not isinstance(nested, dict):
            raise APIError(400, f"form field {outer!r} is given both as a value and as an object", param=outer)
        nested[inner] = value
    else:
        fields[key] = value


async def read_form(request: Request, max_file_bytes: int) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """A multipart (or urlencoded) body as (fields, files): files by field name (``image[]`` -> ``image``),
    each read fully; a file over `max_file_bytes` is a 413."""
    if not is_form(request):
        raise APIError(400, "this endpoint takes multipart/form-data (or a JSON body where documented); "
                            f"got content-type {request.headers.get('content-type')!r}")
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except MultiPartException as e:
        raise APIError(400, f"malformed multipart body: {e.message}") from None
    fields: dict[str, Any] = {}
    files: dict[str, list[bytes]] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read(max_file_bytes + 1)
            await value.close()
            if len(data) > max_file_bytes:
                raise PayloadTooLarge(max_file_bytes)
            files.setdefault(key.removesuffix("[]"), []).append(data)
        else:
            _set_field(fields, key, value)
    return fields, files


def _compact(image: Any, need: WorkingSize, original: bytes | None) -> EncodedImage:
    """`image` shrunk to the working size (aspect ratio kept) as compressed bytes: the original file when it
    needs no shrinking, else a fast PNG (lossless)."""
    from PIL import Image

    scale = need.scale(image.size)
    if scale >= 1.0 and original is not None:
        return EncodedImage(original, image.size)
    if scale < 1.0:
        w, h = image.size
        image = image.resize((max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))), Image.Resampling.LANCZOS,
                             reducing_gap=3.0)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return EncodedImage(buf.getvalue(), image.size)


def _as_api_error(e: UserError, param: str) -> APIError:
    err = from_user_error(e)
    err.param = param
    return err


async def image_from_upload(data: bytes, *, param: str, rules: ImageRules) -> EncodedImage:
    """An uploaded image file, checked, decoded and shrunk for the model (400 when it is not an accepted
    image, or has more pixels than `rules.max_pixels`)."""
    from diffserve.media import decode_image

    def prepare() -> EncodedImage:
        try:
            return _compact(decode_image(data, max_pixels=rules.max_pixels), rules.need, data)
        except UserError as e:
            raise _as_api_error(e, param) from None

    async with rules.slots:
        return await asyncio.to_thread(prepare)


def check_url_allowed(url: str, *, allow_urls: bool, param: str) -> None:
    """Refuse http(s) image URLs at once when the server does not fetch URLs."""
    scheme = url.strip().split(":", 1)[0].lower()
    if scheme in ("http", "https") and not allow_urls:
        raise APIError(400, "image URLs are not fetched by this server (it was started without "
                            "--allow-url-inputs); upload the image or send a data URL", param=param)


async def image_from_url(url: str, *, allow_urls: bool, max_bytes: int, param: str,
                         rules: ImageRules) -> EncodedImage:
    """An image given as an http(s) URL (fetched only when allowed, never from loopback or private
    addresses), a data URL or base64, checked, decoded and shrunk for the model like an upload."""
    from diffserve.media import load_image

    check_url_allowed(url, allow_urls=allow_urls, param=param)

    def prepare() -> EncodedImage:
        try:
            image = load_image(url, allow_urls=allow_urls, max_bytes=max_bytes, block_private=True,
                               allow_paths=False, max_pixels=rules.max_pixels)
        except UserError as e:
            raise _as_api_error(e, param) from None
        return _compact(image, rules.need, None)

    async with rules.slots:
        return await asyncio.to_thread(prepare)
