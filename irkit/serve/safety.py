"""Input checks of the HTTP service: ids, tokens, image bytes, body size.

Everything a client sends is untrusted: ids are matched against a strict pattern before they
reach the store (and never become file paths), image bytes are identified by their content (magic
numbers, then Pillow) and never by file name or Content-Type, and request bodies are bounded
before any parser sees them.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from typing import Any, Awaitable, Callable

import numpy as np

from irkit.errors import ImageError
from irkit.io.images import decode_image_bytes
from irkit.serve.errors import BadRequest, PayloadTooLarge, Unauthorized, UnsupportedMedia

log = logging.getLogger(__name__)

MAX_ID_LENGTH = 200
#: path-like ids of folder collections (``holidays/2019/img_001``) are allowed: segments of
#: letters, digits, ``_ - . + @``, separated by single slashes; no segment is ``.`` or ``..``,
#: none starts with a dot, no leading or trailing slash, no backslash, no control characters.
_SEGMENT = r"[A-Za-z0-9_+@-][A-Za-z0-9_.+@-]*"
ID_PATTERN = re.compile(rf"^{_SEGMENT}(?:/{_SEGMENT})*$")


def check_id(value: Any, what: str = "id") -> str:
    """Return ``value`` if it is a well-formed image id, else raise BadRequest saying why."""
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise BadRequest(f"{what} is empty")
    if len(value) > MAX_ID_LENGTH:
        raise BadRequest(f"{what} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}")
    if not ID_PATTERN.match(value):
        raise BadRequest(f"{what} {value[:80]!r} is not a valid image id: use letters, digits and _ - . + @ "
                         "in '/'-separated parts, none starting with '.'")
    return value


def check_token(expected: str | None, authorization: str | None) -> None:
    """Require ``Authorization: Bearer <expected>``; compared in constant time.

    With no token configured the server is read-only: writes are refused, not opened to all."""
    if expected is None:
        raise Unauthorized("this server was started without --token, so adding and removing images is disabled")
    if not authorization:
        raise Unauthorized("missing 'Authorization: Bearer <token>' header")
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode("utf-8"), expected.encode("utf-8")):
        raise Unauthorized("wrong token")


# --------------------------------------------------------------------------------------- images

#: (format name, predicate on the first bytes); checked before Pillow sees anything
_SIGNATURES: tuple[tuple[str, Callable[[bytes], bool]], ...] = (
    ("JPEG", lambda b: b[:3] == b"\xff\xd8\xff"),
    ("PNG", lambda b: b[:8] == b"\x89PNG\r\n\x1a\n"),
    ("GIF", lambda b: b[:6] in (b"GIF87a", b"GIF89a")),
    ("WEBP", lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP"),
    ("BMP", lambda b: b[:2] == b"BM"),
    ("TIFF", lambda b: b[:4] in (b"II*\x00", b"MM\x00*")),
)
SUPPORTED_FORMATS = tuple(name for name, _ in _SIGNATURES)


def sniff_format(data: bytes) -> str | None:
    """The image format the bytes start with, or None (file name and Content-Type are ignored)."""
    head = bytes(data[:16])
    for name, test in _SIGNATURES:
        if test(head):
            return name
    return None


def decode_upload(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, str]:
    """Decode untrusted upload bytes to RGB uint8; returns (pixels, sniffed format).

    Raises UnsupportedMedia when the content is not an image of a supported kind (whatever its
    name says), PayloadTooLarge over the pixel limit, ImageError (400) when truncated or corrupt."""
    if not data:
        raise BadRequest(f"{name}: the uploaded file is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedMedia(f"{name}: the content is not a supported image (expected one of "
                               f"{', '.join(SUPPORTED_FORMATS)}, identified from the bytes, not the file "
                               "name or Content-Type)")
    try:
        return decode_image_bytes(data, name=name, max_pixels=max_pixels), fmt
    except ImageError as err:
        msg = str(err)
        if "refused" in msg and ("limit" in msg or "too large" in msg):
            raise PayloadTooLarge(msg) from None
        raise


# ------------------------------------------------------------------ pure ASGI middleware
# Both are plain ASGI callables, not ``BaseHTTPMiddleware``: that one runs the app in a separate
# task and raises "No response returned" (a logged traceback) when a client disconnects early.

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

#: the page's policy: only our own scripts/styles; thumbnails may be blob:/data: URLs
PAGE_CSP = b"default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'"
PAGE_PATHS = ("/", "/index.html")


class SecurityHeadersMiddleware:
    """Add ``X-Content-Type-Options: nosniff`` to every response, and the CSP to the web page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_page = scope.get("path") in PAGE_PATHS

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if not (is_page and k.lower() == b"content-security-policy")]
                if not any(k.lower() == b"x-content-type-options" for k, _ in headers):
                    headers.append((b"x-content-type-options", b"nosniff"))
                if is_page:
                    headers.append((b"content-security-policy", PAGE_CSP))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimitMiddleware:
    """Read the whole request body, within ``max_bytes`` and ``timeout`` seconds, before the app sees it.

    A declared Content-Length over the limit is refused (413) without reading; a chunked body is
    read up to the limit. A body that has not fully arrived ``timeout`` seconds after the request
    started is refused with 408 and the connection closed, so a slow sender holds no more than its
    connection for that long (never an inference slot: those are taken after the body is in). A
    client that disconnects mid-body is dropped silently: there is nobody to answer."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float | None = 30.0) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.timeout = timeout if timeout and timeout > 0 else None

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _json(send, 400, "invalid Content-Length header")
                return
            if declared > self.max_bytes:
                await _json(send, 413, f"request body of {declared:,} bytes is over the limit of "
                                       f"{self.max_bytes:,} bytes")
                return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout if self.timeout else None
        chunks: list[bytes] = []
        total = 0
        more = True
        while more:
            try:
                if deadline is None:
                    message = await receive()
                else:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                log.info("%s %s: request body incomplete after %g s (%d bytes received); answered 408",
                         scope.get("method"), scope.get("path"), self.timeout, total)
                await _json(send, 408, f"the request body did not arrive within {self.timeout:g} s "
                                       f"({total:,} bytes received); send it faster or in a smaller request")
                return
            if message["type"] == "http.disconnect":
                log.info("%s %s: client disconnected after %d bytes of the body", scope.get("method"),
                         scope.get("path"), total)
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await _json(send, 413, f"request body is over the limit of {self.max_bytes:,} bytes")
                return
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _json(send, status: int, message: str) -> None:
    """A complete JSON error response that also closes the connection (the body may be unread)."""
    body = json.dumps({"error": message}).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
