"""The web app's edges: request-size limits read before any body, uploads, validation errors without echoes, and
when the session cookie is Secure.

- :class:`BodyLimit` (ASGI, outermost but for the security headers) answers 413 with a small JSON body when the
  ``Content-Length`` is over the limit of the request's path, before anything reads the body; a body sent without a
  length (chunked) is counted while it is read and cut off at the limit the same way. The app-wide limit is
  ``MCIE_MAX_REQUEST_BYTES``; :data:`ROUTE_LIMITS` are tighter ones for routes whose bodies are small by nature.
  Gradio's file upload route is refused (403) on every screen: none of them takes files.
- :func:`validation_error_handler` answers FastAPI's 422 without the ``input`` of each error (the default echoes
  the whole body back).
- :func:`secure_cookies_for` decides the cookie's ``Secure`` flag: on unless the app is served on a loopback
  address or ``MCIE_PUBLIC_URL`` is ``http://``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import PydanticCustomError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

KIB = 1024
# (path prefix, limit in bytes): the first match wins; 0 refuses any body (403).
ROUTE_LIMITS: tuple[tuple[str, int], ...] = (
    ("/login", 16 * KIB),
    ("/logout", 16 * KIB),
    ("/api/study/", 16 * KIB),
    ("/api/review/", 64 * KIB),
)
UPLOAD_SUFFIX = "/gradio_api/upload"


def limit_for(path: str, default: int) -> int:
    """The body limit of ``path`` (bytes): the tightest of the default and the route's own."""
    for prefix, limit in ROUTE_LIMITS:
        base = prefix.rstrip("/")
        if path == base or path.startswith(base + "/"):
            return min(limit, default)
    return default


Headers = list[tuple[bytes, bytes]]


async def send_answer(
    send: Send, code: int, body: bytes, content_type: str, extra: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """A whole HTTP answer from ASGI middleware (the gates and the body limit answer before any route runs)."""
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def wants_html(scope: Scope) -> bool:
    """A browser asking for a page (a GET that accepts HTML), as opposed to a script or a fetch of JSON."""
    accept = dict(scope.get("headers") or []).get(b"accept", b"").decode("latin-1")
    return scope.get("method") == "GET" and "text/html" in accept


def under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or below it (``/review`` and ``/review/x``, not ``/reviewer``)."""
    return path == prefix or path.startswith(prefix + "/")


async def _answer(send: Send, code: int, detail: str) -> None:
    await send_answer(send, code, json.dumps({"detail": detail}).encode(), "application/json",
                      [(b"connection", b"close")])


class BodyLimit:
    """ASGI middleware: request bodies over the path's limit get 413 before (or while) they are read."""

    def __init__(self, app: ASGIApp, *, default_limit: int) -> None:
        self.app = app
        self.default_limit = default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.endswith(UPLOAD_SUFFIX) and scope.get("method") == "POST":
            await _answer(send, 403, "file uploads are off: no screen of this app takes files")
            return
        limit = limit_for(path, self.default_limit)
        declared = None
        for name, value in scope.get("headers") or []:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _answer(send, 400, "Content-Length is not a number")
                    return
        if declared is not None and declared > limit:
            await _answer(send, 413, f"the request body is larger than {limit} bytes")
            return
        received = 0
        started = refused = False

        async def counted_receive() -> Message:
            # Over the limit: answer 413 now and tell the app the client went away, so it stops reading (an
            # exception here would be turned into a 400 by the body parser).
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await _answer(send, 413, f"the request body is larger than {limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 was sent; whatever the app answers to the "disconnect" is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counted_receive, guarded_send)


USER_MESSAGE = "user_message"


def user_message(text: str) -> PydanticCustomError:
    """An error for a request model's validator to raise: the 422 answer is ``{"detail": text}``, a sentence for the
    person who sent the request (the review API's bodies say what the review screen says)."""
    return PydanticCustomError(USER_MESSAGE, "{text}", {"text": text})


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """422 naming each bad field and what was expected, never echoing the submitted values; a request model's own
    message (:func:`user_message`) is answered as it is."""
    assert isinstance(exc, RequestValidationError)
    for err in exc.errors():
        if err.get("type") == USER_MESSAGE:
            return JSONResponse({"detail": str(err.get("msg", ""))[:1000]}, status_code=422,
                                headers={"cache-control": "no-store"})
    errors: list[dict[str, Any]] = [
        {"loc": list(err.get("loc", ())), "msg": str(err.get("msg", ""))[:300], "type": err.get("type", "")}
        for err in exc.errors()[:20]
    ]
    return JSONResponse({"detail": errors}, status_code=422)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def secure_cookies_for(public_url: str | None, host: str, override: bool | None = None) -> bool:
    """Whether the session cookie is Secure: ``override`` when given; else by ``MCIE_PUBLIC_URL``'s scheme; else
    on unless the app binds a loopback address (``mcie serve`` on a laptop, plain http://127.0.0.1)."""
    if override is not None:
        return override
    if public_url:
        return public_url.startswith("https://")
    return not is_loopback(host)
