"""Request bodies of the HTTP API, OpenAI's error shape, and the rules that turn API fields into a
`GenerationRequest` (size strings, Videos API `seconds` -> frames).

Bodies are strict pydantic models: a wrong JSON type is a 400, never silently coerced (multipart forms,
where every value is text, are validated in lax mode instead). Unknown fields are refused, except the
OpenAI fields that mean nothing for a diffusion model, which are accepted and ignored (listed per body).

Extensions accepted in the same body as OpenAI's fields (all optional; the model's default when left out):
``negative_prompt``, ``num_inference_steps``, ``guidance_scale``, ``true_cfg_scale`` (HunyuanVideo's true CFG;
Qwen-Image's guidance_scale under diffusers' name; other models answer 400), ``seed``; videos also
``num_frames`` (4k+1, overrides ``seconds``) and ``fps``.
``lora`` (every body): the LoRA adapters to run with (`LORA_FIELD_HELP`). ``cache_threshold`` (every body): the
step-cache threshold of this request, 0-10 (0: off), on servers started with ``--step-cache``.
"""

from __future__ import annotations

import math
import re
import secrets
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from diffserve.config import GenerationRequest, ModelDefaults, resolve_request
from diffserve.errors import UserError

# Parameters of GenerationRequest named differently in the API (errors name the API field).
_PARAM_ALIASES = {"height": "size", "width": "size", "num_outputs": "n"}
_SIZE_RE = re.compile(r"^\s*([0-9]{1,6})\s*[xX]\s*([0-9]{1,6})\s*$", re.ASCII)  # ASCII digits only
# The `code` of an error that does not name one, by HTTP status.
_DEFAULT_CODES = {400: "invalid_value", 401: "invalid_api_key", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 409: "conflict", 413: "request_too_large", 429: "rate_limit_exceeded",
                  499: "cancelled", 500: "server_error", 503: "service_unavailable", 504: "timeout"}
# Text fields a tokenizer reads: control characters other than tab and newlines are refused in them.
_PROMPT_FIELDS = frozenset({"prompt", "negative_prompt"})
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_NUL = re.compile("\x00")


class APIError(Exception):
    """An error answered to the client as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        # Every error names a code; one not given is the status's generic code.
        self.code = code or _DEFAULT_CODES.get(status, "server_error" if status >= 500 else "invalid_request")
        self.headers = headers or {}  # e.g. Retry-After on a 429

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def __reduce__(self) -> tuple:  # picklable, so errors can cross the worker pipe
        return (_rebuild_api_error, (self.status, self.message, self.type, self.param, self.code, self.headers))


def _rebuild_api_error(status: int, message: str, type_: str, param: str | None, code: str | None,
                       headers: dict[str, str] | None = None) -> APIError:
    return APIError(status, message, type=type_, param=param, code=code, headers=headers)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's JSON error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_user_error(e: UserError) -> APIError:
    """A `UserError` from the engine or media helpers as an APIError (API field names in `param`; image input
    errors have code ``invalid_image``)."""
    code = "invalid_image" if e.param == "image" and e.http_status == 400 else None
    return APIError(e.http_status, str(e), type=e.error_type, param=_PARAM_ALIASES.get(e.param or "", e.param),
                    code=code)


def from_validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The first pydantic / FastAPI validation error as a 400 in OpenAI's wording."""
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header"):  # FastAPI's location prefix (no body field
        loc = loc[1:]  # of ours has one of these names)
    param = ".".join(loc) or None
    kind = first.get("type", "")
    code = "invalid_value"
    if kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif kind == "missing" and param is None:  # the whole body is missing
        message = "The request body is empty; send a JSON object (e.g. {\"prompt\": \"...\"})."
        code = "missing_body"
    elif kind == "missing":
        message = f"Missing required parameter: '{param}'."
        code = "missing_required_parameter"
    elif kind == "invalid_text":
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid text')}"
        code = "invalid_text"
    elif kind.startswith("json"):
        message = ("We could not parse the JSON body of your request. The body must be valid JSON "
                   f"({first.get('msg', 'invalid JSON')}).")
        param = None
    elif param is None:
        message = f"Invalid request body: {first.get('msg', 'invalid value')}"
    else:
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid value')}"
    return APIError(400, message, param=param, code=code)


def text_problem(text: str, *, prompt: bool) -> str | None:
    """Why `text` cannot be accepted, or None: it must be valid Unicode (no lone UTF-16 surrogates, which no
    encoder can write) and hold no NUL; a prompt, read by a tokenizer, no control characters besides tab and
    line breaks either."""
    bad = _SURROGATE.search(text)
    if bad is not None:
        return f"it is not valid Unicode text (a lone surrogate U+{ord(bad.group()):04X} at character {bad.start()})"
    bad = (_CONTROL if prompt else _NUL).search(text)
    if bad is not None:
        return f"it contains the control character U+{ord(bad.group()):04X} at character {bad.start()}"
    return None


class _Body(BaseModel):
    """Strict, closed request body."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_text(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse text that could not be stored or echoed (invalid Unicode) or would upset a tokenizer."""
        if isinstance(value, str):
            problem = text_problem(value, prompt=info.field_name in _PROMPT_FIELDS)
            if problem is not None:
                raise PydanticCustomError("invalid_text", problem)
        return value

    @classmethod
    def parse(cls, data: Any, *, lax: bool = False) -> Any:
        """Validate `data` (lax for multipart forms, whose values are all text); 400 APIError on failure."""
        try:
            return cls.model_validate(data, strict=not lax)
        except ValidationError as e:
            raise from_validation_error(e.errors(include_url=False)) from None


LORA_FIELD_HELP = (
    "LoRA adapters to run with, from those the server has loaded (GET /v1/loras): a list of "
    '{"name": NAME, "scale": SCALE} objects (scale optional, default 1.0) or "NAME[:SCALE]" strings, e.g. '
    '[{"name": "style", "scale": 0.8}] or ["style:0.8", "detail"]; or one string, several comma-separated '
    '("style:0.8,detail"). Multipart bodies (edits, video uploads) take the strings only. Left out: the '
    'server\'s start-up set (--lora-path); [] or "": none. With --lora-mode merged only the start-up set can '
    'be asked for.')


class LoraEntry(_Body):
    """One adapter of a request's `lora` list."""

    name: str
    scale: float = 1.0


class SamplingExtensions(_Body):
    """Sampling fields beyond OpenAI's, accepted in every generation body."""

    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    # step-cache threshold of this request, 0-10 (0: off); servers started with --step-cache only
    cache_threshold: float | None = None
    true_cfg_scale: float | None = None  # diffusers' name; per model, `diffserve.config.guidance_scales`
    seed: int | None = None
    lora: str | list[str | LoraEntry] | None = Field(default=None, description=LORA_FIELD_HELP)

    @field_validator("lora", mode="wrap")
    @classmethod
    def _lora_shape(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """One message for a `lora` of the wrong shape (not one per branch of the union)."""
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("lora_type", 'give a list of {"name", "scale"} objects or "NAME[:SCALE]" '
                                                   "strings, or one such string") from None

    def lora_value(self) -> list[Any] | None:
        """`lora` as `LoraSet.parse` takes it (None: left out); a string may hold several, comma-separated."""
        if self.lora is None:
            return None
        out: list[Any] = []
        for item in [self.lora] if isinstance(self.lora, str) else self.lora:
            if isinstance(item, str):
                out += [part.strip() for part in item.split(",") if part.strip()]
            else:
                out.append({"name": item.name, "scale": item.scale})
        return out


class ImageGenerationBody(SamplingExtensions):
    """`POST /v1/images/generations`. `quality`, `style`, `user`, `moderation` and `background` ("auto" or
    "opaque") are accepted for compatibility and ignored; `stream` must be false."""

    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: str | None = None
    output_compression: int | None = None  # JPEG / WebP quality 0-100
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    moderation: str | None = None
    background: Literal["auto", "opaque"] | None = None
    stream: bool | None = None  # true is refused: no streaming


class ImageReference(_Body):
    """An input image given by reference rather than uploaded: an http(s) or data URL."""

    image_url: str | None = None
    file_id: str | None = None


class ImageEditBody(ImageGenerationBody):
    """`POST /v1/images/edits`: multipart form fields besides the `image` file(s), or a JSON body whose
    input image is `images: [{"image_url": ...}]` (OpenAI's JSON form). `input_fidelity` is ignored; a
    `mask` file is refused (inpainting masks are not supported)."""

    input_fidelity: str | None = None
    images: list[ImageReference] | None = None


class VideoCreateBody(SamplingExtensions):
    """`POST /v1/videos`. `seconds` maps to frames (see `frames_for_seconds`); `num_frames` overrides it."""

    prompt: str
    model: str | None = None
    seconds: str | int | float | None = None
    size: str | None = None
    input_reference: ImageReference | None = None
    num_frames: int | None = None
    fps: int | None = None


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's "WxH" size string -> (width, height); None or "auto" -> the model's default."""
    if size is None or size.strip().lower() == "auto":
        return None, None
    m = _SIZE_RE.match(size)
    if not m:
        raise APIError(400, f"size {size!r} is not accepted: give it as WIDTHxHEIGHT in pixels, e.g. 1024x1024",
                       param="size")
    return int(m.group(1)), int(m.group(2))


def parse_seconds(value: str | float | None) -> float | None:
    """The Videos API's `seconds` (a numeric string or number) as a positive float."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise APIError(400, f"seconds={value!r} is not a number", param="seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise APIError(400, f"seconds={value!r} is not accepted: it must be a positive number", param="seconds")
    return seconds


def frames_for_seconds(seconds: float, defaults: ModelDefaults, fps: int) -> int:
    """Frames for a clip of `seconds` at `fps`: the 4k+1 count nearest to seconds*fps (halves round up),
    at least the model's smallest 4k+1 count; longer than its largest is a 400 naming the maximum seconds.
    E.g. Wan at 16 fps: 5 s -> 81 frames, 4 s -> 65, 0.3 s -> 5."""
    k = max(0, math.floor((seconds * fps - 1) / 4 + 0.5))
    frames = 4 * k + 1
    lo = defaults.min_frames + (-(defaults.min_frames - 1)) % 4
    hi = defaults.max_frames - (defaults.max_frames - 1) % 4
    if frames > hi:
        raise APIError(400, f"seconds={seconds:g} is too long for this model: it makes at most {hi} frames "
                            f"({hi / fps:.2f} s at {fps} fps)", param="seconds")
    return max(frames, lo)


def resolve(req: GenerationRequest, defaults: ModelDefaults) -> GenerationRequest:
    """Fill the model's defaults and validate (diffserve.config rules); a 400 naming the API field."""
    try:
        return resolve_request(req, defaults, seed=secrets.randbelow(2**31))
    except UserError as e:
        raise from_user_error(e) from None

