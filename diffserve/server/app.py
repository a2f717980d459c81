"""The FastAPI application: routes, API-key check, body-size limit, metrics, and OpenAI-shaped errors.

Routes: ``POST /v1/images/generations``, ``POST /v1/images/edits``, ``POST /v1/videos``, ``GET /v1/videos``,
``GET|DELETE /v1/videos/{id}``, ``GET /v1/videos/{id}/content``, ``GET /v1/models[/{id}]`` (the model card
of ``diffserve models``, with this server's limits and loaded LoRAs), ``GET|POST /v1/loras`` (all ``/v1``
routes need ``Authorization: Bearer KEY`` when the server has an API key; it is checked before any of the
body is read), and without a key: ``GET /health`` (200 when the worker is ready, else 503, with details),
``GET /health/ready`` (readiness: 200 only while requests can be served), ``GET /health/live`` (liveness:
200 unless the worker is dead for good), ``GET /metrics`` (Prometheus; needs the key with
``metrics_require_key``), ``GET /outputs/images/{name}`` (``url`` image results), and with ``docs`` on
``GET /docs`` (a self-contained HTML reference) and ``GET /openapi.json``, and with ``playground`` on ``GET /``
(the web playground, `diffserve.server.playground`). CORS headers are sent for the
configured origins only (none by default).

Every error is ``{"error": {"message", "type", "param", "code"}}``: 400 bad input (FastAPI's 422 included),
401 missing or wrong key, 404 unknown route / job / model, 409 video not ready, 413 body over the limit,
429 queue full (with Retry-After), 500 generation failed or worker died or stalled, 503 loading / out of
memory / shutting down, 504 a generation past its deadline.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffserve.errors import UserError
from diffserve.models_catalog import model_card
from diffserve.server import routes_images, routes_loras, routes_videos
from diffserve.server.docs_page import render_docs
from diffserve.server.inputs import PayloadTooLarge
from diffserve.server.outputs import output_response
from diffserve.server.playground import mount_playground
from diffserve.server.protocol import APIError, error_body, from_user_error, from_validation_error
from diffserve.server.runtime import Runtime

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
    """Count every request by method, route template and status, and time it (labels from closed sets)."""

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
            self.metrics.http_request(scope["method"], _route_label(scope), status, time.perf_counter() - start)


def _route_label(scope: Scope) -> str:
    """The template of the route that answered ("/v1/videos/{video_id}"), or "unmatched"."""
    path = getattr(scope.get("route"), "path", None)
    if path is None:
        return "unmatched"
    # Routes of included routers carry their path without the router's prefix.
    return "/v1" + path if scope["path"].startswith("/v1/") and not path.startswith("/v1/") else path


def key_problem(authorization: str, key: str) -> str | None:
    """Why an Authorization header value does not carry `key` (constant-time comparison), or None."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
        return None
    return "Missing bearer authentication in header" if not authorization else "Incorrect API key provided"


class AuthMiddleware:
    """The API-key check on /v1 (and /metrics when asked), done on the headers alone: a request without the
    key is answered 401 before any of its body is read."""

    def __init__(self, app: ASGIApp, key: str | None, protect_metrics: bool) -> None:
        self.app = app
        self.key = key
        self.protect_metrics = protect_metrics

    def _protected(self, path: str) -> bool:
        return path == "/v1" or path.startswith("/v1/") or (self.protect_metrics and path == "/metrics")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None or not self._protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        problem = key_problem(headers.get(b"authorization", b"").decode("latin-1"), self.key)
        if problem is None:
            await self.app(scope, receive, send)
            return
        err = APIError(401, f"{problem}. Send 'Authorization: Bearer <key>'.", code="invalid_api_key")
        has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        # The unread body must not be taken for the next request on this connection.
        extra = {"connection": "close"} if has_body else {}
        await JSONResponse(err.body(), status_code=401, headers={"www-authenticate": "Bearer", **extra})(
            scope, receive, send)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)


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
                       code=_STATUS_CODES.get(e.status_code, "invalid_request"))
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def crash(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal server error ({type(e).__name__})", type="server_error"),
                            status_code=500)


def _models_router() -> APIRouter:
    router = APIRouter()

    def card(rt: Runtime) -> dict[str, Any]:
        """`diffserve models`' card of the loaded model (`models_catalog.model_card`), plus this server's
        limits and LoRAs; while loading, the card without defaults."""
        d = rt.supervisor.defaults
        info = rt.supervisor.info
        limits = {"max_batch_size": rt.config.max_batch_size, "max_upload_bytes": rt.config.max_upload_bytes,
                  "max_request_mpx_steps": rt.max_request_cost(d) / 1e6 if d else None,
                  "max_input_pixels": rt.max_input_pixels(d) if d else None}
        if d is None or info is None:
            card = {"id": rt.config.model_id, "object": "model", "created": rt.created, "owned_by": "diffserve",
                    "kind": None, "pipeline": None, "defaults": None, "accepts": None}
        else:
            card = model_card(d, model_id=rt.config.model_id, pipeline=info.pipeline_class, created=rt.created)
        loras = [{"name": i["name"], "scale": i["scale"], "default": i["default"]}
                 for i in (info.loras if info else [])]
        return {**card, "limits": limits, "lora_mode": rt.supervisor.lora_mode, "loras": loras}

    @router.get("/models")
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [card(request.app.state.runtime)]}

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        rt: Runtime = request.app.state.runtime
        rt.check_model(model_id)
        return card(rt)

    return router


def _health_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Worker state and queue; 200 when ready, else 503."""
        rt: Runtime = request.app.state.runtime
        worker = rt.supervisor.snapshot()
        body = {"status": worker["state"], "model": rt.config.model_id, "queue_depth": rt.scheduler.depth,
                "worker": worker}
        return JSONResponse(body, status_code=200 if worker["state"] == "ready" else 503)

    @app.get("/health/ready")
    async def ready(request: Request) -> JSONResponse:
        """Readiness: 200 only while the model is loaded and requests are taken (route traffic here)."""
        rt: Runtime = request.app.state.runtime
        state = rt.supervisor.state
        ok = state == "ready" and not rt.scheduler.closed
        return JSONResponse({"status": "ready" if ok else state}, status_code=200 if ok else 503)

    @app.get("/health/live")
    async def live(request: Request) -> JSONResponse:
        """Liveness: 200 while the server can recover by itself (loading and restarting included); 503 once
        the worker is dead for good (restart the process)."""
        state = request.app.state.runtime.supervisor.state
        return JSONResponse({"status": state}, status_code=503 if state == "dead" else 200)


def _service_routes(app: FastAPI, runtime: Runtime) -> None:
    _health_routes(app)

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        """Prometheus text page (rendered in a thread: the event loop keeps answering meanwhile)."""
        page = await asyncio.to_thread(request.app.state.runtime.metrics.render)
        return PlainTextResponse(page, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/outputs/images/{name}")
    async def output_image(name: str, request: Request) -> Response:
        """A ``url`` image: the file, or a 307 redirect to a presigned URL when outputs are in S3."""
        location = request.app.state.runtime.outputs.locate("images", name)
        if location is None:
            raise APIError(404, f"no image named {name!r} (unknown, or expired)", code="not_found")
        return output_response(location, name)

    if runtime.config.docs:
        @app.get("/docs", include_in_schema=False)
        async def docs() -> HTMLResponse:
            return HTMLResponse(render_docs(app.openapi()))


def create_app(runtime: Runtime) -> FastAPI:
    """The ASGI app over `runtime`; its lifespan starts the worker and runs the shutdown sequence."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        try:
            yield
        finally:
            await asyncio.to_thread(runtime.shutdown, runtime.config.shutdown_grace_s + 30.0)

    cfg = runtime.config
    app = FastAPI(title="diffserve", version="0.1.0", lifespan=lifespan,
                  summary="OpenAI-compatible image and video generation", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if cfg.docs else None)
    app.state.runtime = runtime
    _install_error_handlers(app)
    v1 = APIRouter(prefix="/v1")
    v1.include_router(routes_images.router)
    v1.include_router(routes_videos.router)
    v1.include_router(routes_loras.router)
    v1.include_router(_models_router())
    app.include_router(v1)
    _service_routes(app, runtime)
    if cfg.playground:
        mount_playground(app)  # GET / and /playground/{name}, without the key
    # Outermost last: metrics see every answer, CORS answers preflights, the key is checked before the body.
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_upload_bytes)
    app.add_middleware(AuthMiddleware, key=cfg.api_key, protect_metrics=cfg.metrics_require_key)
    if cfg.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.allowed_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After"], max_age=600)
    app.add_middleware(MetricsMiddleware, runtime=runtime)
    return app
