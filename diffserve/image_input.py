"""User-supplied image input (file path, http(s) URL, data URI, base64, raw bytes) -> an RGB PIL image, with
clear errors; URL fetching with a deadline, a size limit, a content-type check and an SSRF guard (every resolved
address of every redirect is checked, and the connection goes to the checked address)."""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import struct
import time
import warnings
from pathlib import Path
from urllib.parse import unquote_to_bytes, urljoin, urlsplit
from urllib.request import url2pathname

from PIL import Image, ImageOps, UnidentifiedImageError

from diffserve.errors import InvalidRequestError

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

# --------------------------------------------------------------------------------------------------------
# Image input
# --------------------------------------------------------------------------------------------------------


def _bad_image(message: str) -> InvalidRequestError:
    """The error for unusable image input."""
    return InvalidRequestError(message, param="image")


def as_path(p: str | os.PathLike[str]) -> Path:
    """A user path with ~ expanded."""
    return Path(p).expanduser()


def reason(err: OSError) -> str:
    """The human part of an OSError ("Permission denied")."""
    return err.strerror or str(err)


def short(text: str, limit: int = 80) -> str:
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
        return _read_file(as_path(source), max_bytes)
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
        return _read_file(as_path(text), max_bytes)
    if len(text) >= _MIN_BARE_BASE64_CHARS and _BASE64_RE.fullmatch(text):
        invalid = ("the image input is neither an existing file nor valid base64" if allow_paths
                   else "the image input is not valid base64")
        return _decode_base64(text, max_bytes, "the base64 image", invalid=invalid)
    if allow_paths:
        raise _bad_image(f"image file not found: {short(text)!r}; accepted: {_ACCEPTED_SOURCES_TEXT}")
    raise _bad_image(f"image input {short(text)!r} is not a URL, data URI or base64; "
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
        return _read_file(as_path(url2pathname(urlsplit(text).path)), max_bytes)
    accepted = _ACCEPTED_SOURCES_TEXT if allow_paths else _remote_sources(allow_urls)
    raise _bad_image(f"URL scheme {scheme!r} is not accepted; send {accepted}")


def _is_existing_path(text: str) -> bool:
    """Whether `text` names an existing file system entry (False for strings no path can be)."""
    try:
        return as_path(text).exists()
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
        raise _bad_image(f"cannot read image file {str(path)!r}: {reason(e)}") from None


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
        raise _bad_image(f"cannot resolve image URL host {host!r}: {reason(e)}") from None
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
        raise _bad_image(f"fetching image URL {short(url)} timed out after {timeout_s:g} s")
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
    raise _bad_image(f"image URL {short(url)} redirected more than {_MAX_REDIRECTS} times")


def _fetch_once(current: str, url: str, deadline: float, max_bytes: int, timeout_s: float,
                block_private: bool) -> bytes | str:
    """One request: the body, or the absolute URL a redirect points to."""
    parts = urlsplit(current)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _bad_image(f"image URL {short(current)} is not an http(s) URL with a host name")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise _bad_image(f"image URL {short(current)} has an invalid port") from None
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
                raise _bad_image(f"image URL {short(current)} redirected without a Location")
            return urljoin(current, location)
        if resp.status != 200:
            raise _bad_image(f"image URL {short(current)} answered HTTP {resp.status} {resp.reason}")
        _check_content_type(resp.getheader("Content-Type"), current)
        return _read_body(resp, conn.raw_sock, url, deadline, max_bytes, timeout_s)
    except TimeoutError:
        raise _bad_image(f"fetching image URL {short(url)} timed out after {timeout_s:g} s") from None
    except (OSError, http.client.HTTPException) as e:
        detail = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
        raise _bad_image(f"cannot fetch image URL {short(current)}: {detail}") from None
    finally:
        if conn is not None:
            conn.close()


def _check_content_type(content_type: str | None, url: str) -> None:
    """Refuse a response that does not say it is an image."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if not media_type.startswith("image/"):
        raise _bad_image(f"image URL {short(url)} returned content type {media_type or 'none'!r}; an image/* "
                         "response is required")


def _read_body(resp: http.client.HTTPResponse, sock: socket.socket | None, url: str, deadline: float,
               max_bytes: int, timeout_s: float) -> bytes:
    """The response body, refused as soon as it (or its declared length) passes `max_bytes` or the deadline."""
    declared = resp.getheader("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise _too_large(f"image URL {short(url)}", int(declared), max_bytes)
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
            raise _too_large(f"image URL {short(url)}", f"over {max_bytes}", max_bytes)
        chunks.append(chunk)
