"""The FastAPI application: routes, API-key check, body-size limit, metrics, and OpenAI-shaped errors.

Routes: ``POST /v1/images/generations``, ``POST /v1/images/edits``, ``POST /v1/videos``, ``GET /v1/videos``,
``GET|DELETE /v1/videos/{id}``, ``GET /v1/videos/{id}/content``, ``GET /v1/models[/{id}]`` (all ``/v1``
routes need ``Authorization: Bearer KEY`` when the server has an API key), and without a key:
``GET /health`` (200 when the worker is ready, else 503), ``GET /metrics`` (Prometheus) and
``GET /outputs/images/{name}`` (``url`` image results).

Every error is ``{"error": {"message", "type", "param", "code"}}``: 400 bad input (FastAPI's 422 included),
401 missing or wrong key, 404 unknown route / job / model, 409 video not ready, 413 body over the limit,
429 queue full, 500 generation failed or worker died, 503 loading / out of memory / shutting down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffserve.errors import UserError
from diffserve.server import routes_images, routes_videos
from diffserve.server.inputs import PayloadTooLarge
from diffserve.server.protocol import APIError, error_body, from_user_error, from_validation_error
from diffserve.server.runtime import Runtime

_OUTPUT_NAME = re.compile(r"^img_[0-9a-f]{32}\.(png|jpg|webp)$")
_MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
_STATUS_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
                 413: "invalid_request_error", 429: "rate_limit_error"}
_STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413: from Content-Length before reading, else while
    streaming (the route's body read raises PayloadTooLarge)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            err = PayloadTooLarge(self.max_bytes)
            response = JSONResponse(error_body(err.detail, code="request_too_large"), status_code=413,
                                    headers={"connection": "close"})
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class MetricsMiddleware:
    """Count every request by method, route template and status, and time it."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.metrics = runtime.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording)
        finally:
            route = _route_label(scope)
            self.metrics.requests.inc(scope["method"], route, str(status))
            self.metrics.latency.observe(time.perf_counter() - start, scope["method"], route)


def _route_label(scope: Scope) -> str:
    """The template of the route that answered ("/v1/videos/{video_id}"), or "unmatched"."""
    path = getattr(scope.get("route"), "path", None)
    if path is None:
        return "unmatched"
    # Routes of included routers carry their path without the router's prefix.
    return "/v1" + path if scope["path"].startswith("/v1/") and not path.startswith("/v1/") else path


def _require_key(request: Request) -> None:
    """The /v1 API-key check (constant-time comparison)."""
    key = request.app.state.runtime.config.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    ok = hmac.compare_digest(token.strip().encode(), key.encode())
    if scheme.lower() != "bearer" or not ok:
        what = "Missing bearer authentication in header" if not header else "Incorrect API key provided"
        raise APIError(401, f"{what}. Send 'Authorization: Bearer <key>'.", code="invalid_api_key")


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(UserError)
    async def user_error(_: Request, e: UserError) -> JSONResponse:
        return _error_response(from_user_error(e))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(from_validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = str(e.detail)
        if e.status_code == 404 and message == "Not Found":
            message = f"Unknown route: {request.method} {request.url.path}"
        err = APIError(e.status_code, message, type=_STATUS_TYPES.get(e.status_code, "server_error"),
                       code=_STATUS_CODES.get(e.status_code))
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def crash(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal server error ({type(e).__name__})", type="server_error"),
                            status_code=500)


def _models_router() -> APIRouter:
    router = APIRouter()

    def card(rt: Runtime) -> dict[str, Any]:
        d = rt.supervisor.defaults
        info = rt.supervisor.info
        return {"id": rt.config.model_id, "object": "model", "created": rt.created, "owned_by": "diffserve",
                "kind": d.kind if d else None, "pipeline": info.pipeline_class if info else None,
                "defaults": dataclasses.asdict(d) if d else None}

    @router.get("/models")
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [card(request.app.state.runtime)]}

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        rt: Runtime = request.app.state.runtime
        rt.check_model(model_id)
        return card(rt)

    return router


def _service_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        rt: Runtime = request.app.state.runtime
        worker = rt.supervisor.snapshot()
        body = {"status": worker["state"], "model": rt.config.model_id, "queue_depth": rt.scheduler.depth,
                "worker": worker}
        return JSONResponse(body, status_code=200 if worker["state"] == "ready" else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.app.state.runtime.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/outputs/images/{name}")
    async def output_image(name: str, request: Request) -> FileResponse:
        path = request.app.state.runtime.image_dir / name
        if not _OUTPUT_NAME.match(name) or not path.is_file():
            raise APIError(404, f"no image named {name!r}", code="not_found")
        return FileResponse(path, media_type=_MEDIA_TYPES[name.rsplit(".", 1)[1]])


def create_app(runtime: Runtime) -> FastAPI:
    """The ASGI app over `runtime`; its lifespan starts the worker and runs the shutdown sequence."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        try:
            yield
        finally:
            await asyncio.to_thread(runtime.shutdown, runtime.config.shutdown_grace_s + 30.0)

    app = FastAPI(title="diffserve", version="0.1.0", lifespan=lifespan,
                  summary="OpenAI-compatible image and video generation")
    app.state.runtime = runtime
    _install_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_require_key)])
    v1.include_router(routes_images.router)
    v1.include_router(routes_videos.router)
    v1.include_router(_models_router())
    app.include_router(v1)
    _service_routes(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=runtime.config.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, runtime=runtime)
    return app
