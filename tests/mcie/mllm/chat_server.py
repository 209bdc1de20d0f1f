"""Test helper: a local OpenAI-compatible chat-completions server with programmable answers.

It runs in a thread on 127.0.0.1 (a free port) and records every request; answers come from a hook. It can
answer after a delay, fail the first N requests with a status (500, 429 with Retry-After, ...), and refuse
fields such as ``response_format`` the way servers that lack structured output do (HTTP 400). It tracks how
many requests were in flight at once.

Usage::

    from tests.mcie.mllm.chat_server import Reply, chat_server

    with chat_server(lambda req: '{"conflict": false}', delay_s=0.05) as server:
        backend = OpenAIBackend(server.base_url, "test-model")
        ...
        server.requests[0].images()      # the PIL images of the first request
        server.max_in_flight             # peak concurrency seen by the server
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


@dataclass
class Reply:
    """A programmed answer: completion text, or any status/body, after an optional delay."""

    text: str = ""
    status: int = 200
    delay_s: float | None = None
    body: dict[str, Any] | None = None  # sent as is instead of a completion
    headers: dict[str, str] = field(default_factory=dict)
    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass
class RecordedRequest:
    """One request the server received."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    index: int  # 0-based arrival order

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))

    def parts(self) -> list[dict[str, Any]]:
        """Every content part of every message ({"type": "text"|"image_url", ...}), in order."""
        out: list[dict[str, Any]] = []
        for message in self.messages:
            content = message.get("content")
            if isinstance(content, str):
                out.append({"type": "text", "text": content})
            elif isinstance(content, list):
                out.extend(p for p in content if isinstance(p, dict))
        return out

    def texts(self) -> list[str]:
        return [p["text"] for p in self.parts() if p.get("type") == "text"]

    def image_urls(self) -> list[str]:
        return [p["image_url"]["url"] for p in self.parts() if p.get("type") == "image_url"]

    def images(self) -> list[Image.Image]:
        """The images of the request, decoded from their base64 data URLs."""
        images = []
        for url in self.image_urls():
            if not url.startswith("data:") or ";base64," not in url:
                raise ValueError(f"expected a base64 data URL, got {url[:40]!r}")
            data = base64.b64decode(url.split(";base64,", 1)[1])
            with Image.open(io.BytesIO(data)) as image:
                images.append(image.copy())
        return images


AnswerFn = Callable[[RecordedRequest], "str | Reply | dict[str, Any]"]


def _usage_words(request: RecordedRequest) -> int:
    return sum(len(t.split()) for t in request.texts()) + 64 * len(request.image_urls())


class ChatServer:
    """State of a running server: its URL, the recorded requests, in-flight counters, and its behaviour."""

    def __init__(
        self,
        answer: AnswerFn,
        *,
        delay_s: float,
        fail_first: int,
        fail_status: int,
        retry_after: float | None,
        reject_fields: Collection[str],
        model: str,
    ) -> None:
        self.answer = answer
        self.delay_s = delay_s
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.retry_after = retry_after
        self.reject_fields = set(reject_fields)
        self.model = model
        self.base_url = ""
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def record(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> RecordedRequest:
        with self._lock:
            request = RecordedRequest(path, headers, body, len(self.requests))
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return request

    def done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def take_failure(self) -> bool:
        with self._lock:
            if self.failed < self.fail_first:
                self.failed += 1
                return True
            return False

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def reply_for(self, request: RecordedRequest) -> Reply:
        rejected = sorted(self.reject_fields & set(request.body))
        if rejected:
            message = f"Unrecognized request argument supplied: {rejected[0]}"
            error = {"message": message, "type": "invalid_request_error", "param": rejected[0]}
            return Reply(status=400, body={"error": error}, delay_s=0.0)
        if self.take_failure():
            headers = {"Retry-After": f"{self.retry_after:g}"} if self.retry_after is not None else {}
            error = {"message": f"injected failure {self.failed}", "type": "server_error"}
            return Reply(status=self.fail_status, body={"error": error}, headers=headers, delay_s=0.0)
        try:
            result = self.answer(request)
        except Exception as exc:  # a broken hook shows up as a 500 the test can see
            return Reply(status=500, body={"error": {"message": f"answer hook failed: {exc!r}"}})
        if isinstance(result, Reply):
            return result
        if isinstance(result, dict):
            return Reply(body=result)
        return Reply(text=str(result))

    def completion(self, request: RecordedRequest, reply: Reply) -> dict[str, Any]:
        prompt = reply.prompt_tokens if reply.prompt_tokens is not None else _usage_words(request)
        completion = reply.completion_tokens
        if completion is None:
            completion = max(1, len(reply.text.split()))
        return {
            "id": f"chatcmpl-{request.index}",
            "object": "chat.completion",
            "model": request.body.get("model", self.model),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text},
                    "finish_reason": reply.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }


def _handler(state: ChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
        disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, {"object": "list", "data": [{"id": state.model, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                body = json.loads(raw)
            except ValueError as exc:
                self._send(400, {"error": {"message": f"invalid JSON body: {exc}"}})
                return
            request = state.record(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            try:
                reply = state.reply_for(request)
                state.sleep(state.delay_s if reply.delay_s is None else reply.delay_s)
                if reply.body is not None:
                    self._send(reply.status, reply.body, reply.headers)
                else:
                    self._send(reply.status, state.completion(request, reply), reply.headers)
            finally:
                state.done()

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256


@contextmanager
def chat_server(
    answer: AnswerFn | str | None = None,
    *,
    delay_s: float = 0.0,
    fail_first: int = 0,
    fail_status: int = 500,
    retry_after: float | None = None,
    reject_fields: Collection[str] = (),
    model: str = "test-model",
) -> Iterator[ChatServer]:
    """Run a chat-completions server for the ``with`` block; yields its state (``base_url`` ends in /v1).

    ``answer`` maps each request to the answer text, a :class:`Reply`, or a raw response dict; a plain
    string is always answered; None answers "ok". The first ``fail_first`` requests get ``fail_status``
    (with ``Retry-After`` when given); requests containing any of ``reject_fields`` get HTTP 400.
    """
    if answer is None:
        answer = "ok"
    hook: AnswerFn = (lambda _request, text=answer: text) if isinstance(answer, str) else answer
    state = ChatServer(
        hook,
        delay_s=delay_s,
        fail_first=fail_first,
        fail_status=fail_status,
        retry_after=retry_after,
        reject_fields=reject_fields,
        model=model,
    )
    server = _Server(("127.0.0.1", 0), _handler(state))
    host, port = server.server_address[:2]
    state.base_url = f"http://{host}:{port}/v1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state._stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
