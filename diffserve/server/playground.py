"""The web playground: a page at ``GET /`` that calls this server's public API from the browser.

The page and its assets are static files shipped in the package (``static/playground/``: index.html,
app.js, style.css; no CDN, no build step). They hold no secret, so they are served without the API key; the
page sends the key the user types with each API call. Assets are served under ``/playground/<name>``; the
page links them with a content hash (``app.js?v=1a2b3c4d``), so browsers may keep them for a year while a new
release is fetched at once, and the page itself is revalidated on every load (``no-cache`` with an ETag).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import Response

from diffserve.server.protocol import APIError

ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PAGE = "index.html"
# The page runs only its own script and style, talks only to this origin, and shows generated images and
# videos from data: and blob: URLs.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                           "frame-ancestors 'none'; form-action 'none'")
_COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@dataclass(frozen=True)
class StaticFile:
    """A file served from memory, with its ETag (a hash of its content)."""

    body: bytes
    media_type: str
    etag: str

    @classmethod
    def of(cls, body: bytes, media_type: str) -> StaticFile:
        return cls(body, media_type, f'"{hashlib.sha256(body).hexdigest()[:16]}"')

    def response(self, request: Request, cache_control: str, extra: dict[str, str] | None = None) -> Response:
        """200 with the body, or 304 when the client's If-None-Match already names this version."""
        headers = {"ETag": self.etag, "Cache-Control": cache_control, **_COMMON_HEADERS, **(extra or {})}
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def read_static(name: str) -> bytes:
    """One of the playground's packaged files."""
    return resources.files("diffserve.server").joinpath("static", "playground", name).read_bytes()


def versioned_page(page: str, assets: dict[str, StaticFile]) -> str:
    """The page with each ``/playground/<asset>`` link given its content hash as ``?v=``."""
    for name, asset in assets.items():
        link = f"/playground/{name}"
        if link not in page:
            raise ValueError(f"the playground page does not link {link}")
        page = page.replace(f'"{link}"', f'"{link}?v={asset.etag.strip(chr(34))[:8]}"')
    return page


def load_playground() -> tuple[StaticFile, dict[str, StaticFile]]:
    """The page (asset links versioned) and its assets, read from the package."""
    assets = {name: StaticFile.of(read_static(name), media_type) for name, media_type in ASSETS.items()}
    page = versioned_page(read_static(PAGE).decode("utf-8"), assets)
    return StaticFile.of(page.encode("utf-8"), "text/html; charset=utf-8"), assets


def mount_playground(app: FastAPI) -> None:
    """Serve the playground on `app`: ``GET /`` (the page) and ``GET /playground/{name}`` (its assets)."""
    page, assets = load_playground()

    @app.get("/", include_in_schema=False)
    async def playground_page(request: Request) -> Response:
        return page.response(request, "no-cache", {"Content-Security-Policy": CONTENT_SECURITY_POLICY})

    @app.get("/playground/{name}", include_in_schema=False)
    async def playground_asset(name: str, request: Request) -> Response:
        asset = assets.get(name)
        if asset is None:
            raise APIError(404, f"no playground file named {name!r}; there are {', '.join(sorted(assets))}",
                           code="not_found")
        # A request naming the current version may be cached for good; any other is revalidated.
        current = request.query_params.get("v") == asset.etag.strip('"')[:8]
        return asset.response(request, "public, max-age=31536000, immutable" if current else "no-cache")
