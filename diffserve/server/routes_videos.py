"""The Videos API: create a job, poll it, download its MP4, list and delete jobs.

`POST /v1/videos` takes multipart (what OpenAI's SDK sends; ``input_reference`` as an uploaded file or as
``input_reference[image_url]``) or JSON (``input_reference: {"image_url": ...}``). Duration: ``num_frames``
when given, else ``seconds`` mapped to the 4k+1 frame count nearest to seconds*fps
(`diffserve.server.protocol.frames_for_seconds`), else the model's default frame count. ``fps`` defaults to
the model's. The job is answered at once (status ``queued``); a request over the cost ceiling is a 400.
Finished jobs expire after ``--job-ttl`` (``expires_at``), their MP4 with them; jobs and MP4s survive a
restart (`diffserve.server.jobs`).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from concurrent.futures import Future
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from diffserve.config import GenerationRequest
from diffserve.server.inputs import (
    ImageRules,
    check_url_allowed,
    image_from_upload,
    image_from_url,
    is_form,
    read_form,
    read_json,
)
from diffserve.server.jobs import VideoJob
from diffserve.server.messages import OutputSpec
from diffserve.server.outputs import output_response
from diffserve.server.protocol import (
    APIError,
    VideoCreateBody,
    frames_for_seconds,
    parse_seconds,
    parse_size,
    resolve,
)
from diffserve.server.routes_loras import request_lora
from diffserve.server.runtime import Runtime
from diffserve.server.scheduler import WorkItem

router = APIRouter()


async def _parse_body(rt: Runtime, request: Request) -> tuple[VideoCreateBody, bytes | None]:
    """The create body, and the uploaded input_reference file if one came."""
    if not is_form(request):
        return VideoCreateBody.parse(await read_json(request)), None
    fields, files = await read_form(request, rt.config.max_upload_bytes)
    body = VideoCreateBody.parse(fields, lax=True)
    unknown = set(files) - {"input_reference"}
    if unknown:
        name = min(unknown)
        raise APIError(400, f"Unrecognized file field supplied: {name}", param=name)
    uploads = files.get("input_reference", [])
    if len(uploads) > 1 or (uploads and body.input_reference is not None):
        raise APIError(400, "give one input_reference", param="input_reference")
    return body, (uploads[0] if uploads else None)


async def _input_image(rt: Runtime, body: VideoCreateBody, upload: bytes | None) -> Any:
    """The input_reference, checked, shrunk and compressed for the model (None without one)."""
    ref = body.input_reference
    if ref is not None and ref.file_id is not None:
        raise APIError(400, "input_reference.file_id is not supported here; upload the image or give image_url",
                       param="input_reference")
    if ref is not None and ref.image_url is None:
        raise APIError(400, "input_reference needs image_url", param="input_reference")
    if ref is not None:
        check_url_allowed(ref.image_url or "", allow_urls=rt.config.allow_url_inputs, param="input_reference")
    defaults = rt.defaults()
    if (upload is not None or ref is not None) and not defaults.accepts_image:
        raise APIError(400, f"model '{rt.config.model_id}' does not take an input image (input_reference)",
                       param="input_reference")
    rules: ImageRules = rt.image_rules(defaults, *parse_size(body.size))
    if upload is not None:
        return await image_from_upload(upload, param="input_reference", rules=rules)
    if ref is not None:
        return await image_from_url(ref.image_url or "", allow_urls=rt.config.allow_url_inputs,
                                    max_bytes=rt.config.max_upload_bytes, param="input_reference", rules=rules)
    if defaults.needs_image:
        raise APIError(400, f"model '{rt.config.model_id}' makes videos from an image: give input_reference",
                       param="input_reference")
    return None


def _build_request(rt: Runtime, body: VideoCreateBody, image: Any) -> GenerationRequest:
    defaults = rt.defaults()
    fps = body.fps if body.fps is not None else (defaults.fps or 16)
    frames = body.num_frames
    seconds = parse_seconds(body.seconds)
    if frames is None and seconds is not None:
        frames = frames_for_seconds(seconds, defaults, fps)
    width, height = parse_size(body.size)
    req = resolve(GenerationRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, height=height, width=width,
        cache_threshold=body.cache_threshold,
        num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
        true_cfg_scale=body.true_cfg_scale, seed=body.seed,
        num_frames=frames, fps=body.fps, image=image, lora=body.lora_value()), defaults)
    rt.check_cost(req, defaults)
    return request_lora(rt, req)


def _job_done(rt: Runtime, job_id: str, future: Future) -> None:
    """A job's work item is over: write its MP4 through the output store, then record the outcome."""
    error = future.exception()
    name = rt.outputs.video_name(job_id)
    if error is None:
        if rt.jobs.status(job_id) is None:  # deleted meanwhile
            return
        try:
            rt.outputs.write("videos", name, future.result().blobs[0])
        except OSError as e:
            error = APIError(500, f"the video could not be written: {e.strerror or e}", type="server_error",
                             code="output_write_failed")
    if not rt.jobs.finished(job_id, error):
        rt.outputs.remove("videos", name)  # deleted while it was written


@router.post("/videos")
async def create_video(request: Request) -> dict[str, Any]:
    """Queue a text-to-video or image-to-video job; answers the job at once. Besides OpenAI's fields the body
    takes negative_prompt, num_inference_steps, guidance_scale, seed, num_frames, fps and ``lora`` (as in
    POST /v1/images/generations; in a multipart form one comma-separated string, e.g. "style:0.8,detail")."""
    rt: Runtime = request.app.state.runtime
    defaults = rt.defaults()
    body, upload = await _parse_body(rt, request)
    rt.check_model(body.model)
    if defaults.kind != "video":
        raise APIError(400, f"model '{rt.config.model_id}' makes images; use POST /v1/images/generations",
                       param="model")
    image = await _input_image(rt, body, upload)
    req = _build_request(rt, body, image)
    assert req.num_frames is not None and req.fps is not None
    job_id = f"video_{secrets.token_hex(12)}"
    seconds = str(body.seconds) if body.seconds is not None else f"{req.num_frames / req.fps:g}"
    job = VideoJob(id=job_id, model=rt.config.model_id, prompt=req.prompt, size=f"{req.width}x{req.height}",
                   seconds=seconds, num_frames=req.num_frames, fps=req.fps, seed=int(req.seed or 0),
                   num_inference_steps=int(req.num_inference_steps or 0))
    item = WorkItem(id=job_id, kind="video", request=req, output=OutputSpec(fmt="mp4"),
                    on_start=lambda: rt.jobs.started(job_id),
                    on_progress=lambda done, total: rt.jobs.progressed(job_id, done, total))
    job.item = item
    rt.jobs.add(job)
    try:
        rt.submit(item)
    except APIError:
        rt.jobs.remove(job_id)
        raise
    # the MP4 is written off the thread that completes the future (the supervisor's: a slow object store
    # must not hold up the next batch); not a daemon, so an exiting server finishes the write first
    item.future.add_done_callback(lambda f: threading.Thread(target=_job_done, args=(rt, job_id, f),
                                                             name=f"output-{job_id}").start())
    return job.to_api()


def _unknown(video_id: str) -> APIError:
    return APIError(404, f"No video found with id '{video_id}'", param="video_id", code="not_found")


@router.get("/videos")
async def list_videos(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                      order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
    """Jobs newest first (``order=asc`` for oldest first), ``limit`` per page, paged with ``after``."""
    rt: Runtime = request.app.state.runtime
    data, has_more = rt.jobs.page(after=after, limit=limit, order=order)
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/videos/{video_id}")
async def retrieve_video(video_id: str, request: Request) -> dict[str, Any]:
    job = request.app.state.runtime.jobs.get(video_id)
    if job is None:
        raise _unknown(video_id)
    return job


@router.get("/videos/{video_id}/content")
async def video_content(video_id: str, request: Request, variant: str = "video") -> Response:
    """The MP4 of a completed job (409 while it is not completed); with outputs in S3, a 307 redirect to a
    presigned URL of it (clients that follow redirects, the openai SDK among them, get the file)."""
    rt: Runtime = request.app.state.runtime
    status = rt.jobs.status(video_id)
    if status is None:
        raise _unknown(video_id)
    if variant != "video":
        raise APIError(400, f"variant {variant!r} is not available; only 'video' is", param="variant")
    if status != "completed":
        raise APIError(409, f"video '{video_id}' is {status}, not completed; its content is not available",
                       code="video_not_ready")
    name = rt.outputs.video_name(video_id)
    location = rt.outputs.locate("videos", name, filename=f"{video_id}.mp4")
    if location is None:
        raise APIError(404, f"the file of video '{video_id}' is gone", code="not_found")
    return output_response(location, name, filename=f"{video_id}.mp4")


@router.delete("/videos/{video_id}")
async def delete_video(video_id: str, request: Request) -> dict[str, Any]:
    """Forget a job: a queued one leaves the queue, a running one stops at its next denoising step, and its
    file (if written) is removed."""
    rt: Runtime = request.app.state.runtime
    job = rt.jobs.remove(video_id)
    if job is None:
        raise _unknown(video_id)
    if isinstance(job, VideoJob) and job.item is not None:
        rt.cancel(job.item)
    await asyncio.to_thread(rt.outputs.remove, "videos", rt.outputs.video_name(video_id))  # S3: a request
    return {"id": video_id, "object": "video.deleted", "deleted": True}
