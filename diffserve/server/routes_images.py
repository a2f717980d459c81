"""`POST /v1/images/generations` and `POST /v1/images/edits` in OpenAI's request and response shapes.

Response: ``{"created", "data": [{"b64_json"} | {"url"}], "output_format", "size", "seed"}`` (``seed``
is an extension: the request's seed; its n images come from that one seed). ``response_format`` defaults to
``b64_json``; ``url`` results are written through the output store (`diffserve.server.outputs`) and served at
``/outputs/images/<name>`` under unguessable names, without the API key (as capability URLs), until they
expire (``--job-ttl``); with ``--output-storage s3://...`` that URL redirects (307) to a presigned URL.

A request over the cost ceiling (`Runtime.check_cost`) is refused with 400 before it is queued. A client
that closes its connection before the answer cancels its request (it leaves the queue, or stops at the next
denoising step once nothing else in its batch is wanted; a batch that cannot reach a step boundary within
the cancel grace is stopped by restarting the worker).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from typing import Any

from fastapi import APIRouter, Request

from diffserve.config import GenerationRequest
from diffserve.errors import UserError
from diffserve.server.inputs import (
    ImageRules,
    check_url_allowed,
    image_from_upload,
    image_from_url,
    is_form,
    read_form,
    read_json,
)
from diffserve.server.messages import ItemDone, OutputSpec
from diffserve.server.protocol import (
    APIError,
    ImageEditBody,
    ImageGenerationBody,
    ImageReference,
    from_user_error,
    parse_size,
    resolve,
)
from diffserve.server.routes_loras import request_lora
from diffserve.server.runtime import Runtime
from diffserve.server.scheduler import WorkItem

router = APIRouter()


def _output_spec(body: ImageGenerationBody) -> tuple[OutputSpec, str]:
    """How the worker encodes the images, and the format name."""
    from diffserve.media import normalize_format

    try:
        fmt = normalize_format(body.output_format or "png", "image")
    except UserError as e:
        raise from_user_error(e) from None
    quality = 95 if body.output_compression is None else body.output_compression
    if not 0 <= quality <= 100:
        raise APIError(400, f"output_compression={quality} is not accepted: it must be between 0 and 100",
                       param="output_compression")
    return OutputSpec(fmt=fmt, quality=quality), fmt


def _build_request(rt: Runtime, body: ImageGenerationBody, image: Any) -> GenerationRequest:
    """Validate the body against the model and this server's limits; a filled GenerationRequest."""
    defaults = rt.defaults()
    if defaults.kind != "image":
        raise APIError(400, f"model '{rt.config.model_id}' makes videos; use POST /v1/videos", param="model")
    if body.stream:
        raise APIError(400, "streaming image generation is not supported; leave stream unset", param="stream")
    n = 1 if body.n is None else body.n
    if n > rt.config.max_batch_size:
        raise APIError(400, f"n={n} is not accepted: this server makes at most {rt.config.max_batch_size} "
                            "images per request (--max-batch-size)", param="n")
    width, height = parse_size(body.size)
    req = resolve(GenerationRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, height=height, width=width,
        cache_threshold=body.cache_threshold,
        num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
        true_cfg_scale=body.true_cfg_scale, seed=body.seed,
        num_outputs=n, image=image, lora=body.lora_value()), defaults)
    rt.check_cost(req, defaults)
    return request_lora(rt, req)


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read, so nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _result_unless_disconnected(rt: Runtime, request: Request, item: WorkItem) -> ItemDone:
    """The item's result; if the client goes away first, the request is cancelled instead."""
    result = asyncio.wrap_future(item.future)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not result.done():
        result.cancel()  # nobody will read it
        rt.cancel(item)
        raise APIError(499, "the client closed the connection; the request was cancelled", code="cancelled")
    return result.result()


async def _generate(rt: Runtime, request: Request, body: ImageGenerationBody, image: Any) -> dict[str, Any]:
    """Queue one image request, wait for its result, and shape the response."""
    rt.check_model(body.model)
    req = _build_request(rt, body, image)
    spec, fmt = _output_spec(body)
    item = WorkItem(id=f"img_{secrets.token_hex(12)}", kind="image", request=req, output=spec)
    rt.submit(item)
    done = await _result_unless_disconnected(rt, request, item)
    if (body.response_format or "b64_json") == "url":
        names = [rt.outputs.image_name(fmt) for _ in done.blobs]
        try:
            await asyncio.to_thread(lambda: [rt.outputs.write("images", n, b) for n, b in zip(names, done.blobs)])
        except OSError as e:
            raise APIError(500, f"the images could not be stored: {e.strerror or e}", type="server_error",
                           code="output_write_failed") from None
        base = str(request.base_url).rstrip("/")
        data = [{"url": f"{base}/outputs/images/{name}", "revised_prompt": None} for name in names]
    else:
        data = [{"b64_json": base64.b64encode(b).decode("ascii"), "revised_prompt": None} for b in done.blobs]
    return {"created": int(time.time()), "data": data, "output_format": fmt, "size": f"{req.width}x{req.height}",
            "seed": done.seed}


@router.post("/images/generations")
async def create_image(body: ImageGenerationBody, request: Request) -> dict[str, Any]:
    """Text-to-image (OpenAI Images API)."""
    return await _generate(request.app.state.runtime, request, body, image=None)


async def _edit_input(rt: Runtime, body: ImageEditBody, files: dict[str, list[bytes]]) -> Any:
    """The input image(s) of an edit, uploaded (``image``, ``image[]``) or referenced (``images[i].image_url``:
    a data URL, or an http(s) URL the server fetches only with --allow-url-inputs): a PIL image, or a list of
    them for models that take several."""
    if "mask" in files:
        raise APIError(400, "masks are not supported by this server", param="mask")
    unknown = set(files) - {"image"}
    if unknown:
        raise APIError(400, f"Unrecognized file field supplied: {min(unknown)}", param=min(unknown))
    uploads, refs, most = files.get("image", []), body.images or [], rt.defaults().max_images
    if not uploads and not refs:
        raise APIError(400, "Missing required parameter: 'image' (an image file, or images: [{image_url}]).",
                       param="image")
    if uploads and refs:
        raise APIError(400, "give the input images either as uploads or in images, not both", param="images")
    if len(uploads) + len(refs) > most:
        raise APIError(400, f"this model takes {'one input image' if most == 1 else f'at most {most} input images'}; "
                            f"got {len(uploads) + len(refs)}", param="image")
    rules = rt.image_rules(rt.defaults(), *parse_size(body.size))
    if uploads:
        images = [await image_from_upload(u, param="image", rules=rules) for u in uploads]
    else:
        images = [await _referenced_image(rt, ref, rules) for ref in refs]
    return images[0] if len(images) == 1 else images


async def _referenced_image(rt: Runtime, ref: ImageReference, rules: ImageRules) -> Any:
    if ref.image_url is None:
        raise APIError(400, "images[].file_id is not supported here; upload the image or give image_url",
                       param="images")
    check_url_allowed(ref.image_url, allow_urls=rt.config.allow_url_inputs, param="images")
    return await image_from_url(ref.image_url, allow_urls=rt.config.allow_url_inputs,
                                max_bytes=rt.config.max_upload_bytes, param="images", rules=rules)


@router.post("/images/edits")
async def edit_image(request: Request) -> dict[str, Any]:
    """Image + prompt to image, for models that take an input image: multipart (``image`` file and the same
    fields as generations, what OpenAI's SDK sends) or JSON with ``images: [{"image_url": ...}]``. ``lora`` as
    in generations (in a multipart form: one comma-separated string, e.g. "style:0.8,detail")."""
    rt: Runtime = request.app.state.runtime
    defaults = rt.defaults()
    if is_form(request):
        fields, files = await read_form(request, rt.config.max_upload_bytes)
        body = ImageEditBody.parse(fields, lax=True)
    else:
        body, files = ImageEditBody.parse(await read_json(request)), {}
    rt.check_model(body.model)
    if defaults.kind != "image" or not defaults.accepts_image:
        what = "makes videos (use POST /v1/videos with input_reference)" if defaults.kind == "video" else (
            "does not take an input image, so it cannot edit images (use POST /v1/images/generations)")
        raise APIError(400, f"model '{rt.config.model_id}' {what}", param="image", code="unsupported_model")
    image = await _edit_input(rt, body, files)
    return await _generate(rt, request, body, image=image)
