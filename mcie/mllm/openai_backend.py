"""Backend for any OpenAI-compatible chat-completions server: ``vllm serve``, SGLang, hosted APIs.

The public API is synchronous (``generate``; ``agenerate`` for callers already inside an event loop); under
the hood ``concurrency`` asyncio workers, each with its own keep-alive httpx connection, keep that many
requests in flight, so the server's batcher stays full. Images travel as base64 data URLs, several per
message (PIL images as JPEG quality 95 by default, bytes as given). Failed attempts are retried with
exponential backoff and jitter on 408/429/5xx, timeouts and connection errors (honouring ``Retry-After``);
each attempt has a hard deadline of ``timeout_s``.

Structured output: with ``structured="auto"`` a request with a JSON schema is sent with ``response_format``
(type ``json_schema``); if the server rejects that (400/422/501), it is sent again with vLLM's ``guided_json``
and then with no constraint, and the first mode that works is kept for later requests. The parsers in
:mod:`mcie.mllm.parsing` read unconstrained answers too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import ssl
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import httpx

from mcie.mllm.base import (
    Backend,
    ImageFormat,
    ImagePart,
    LazyRequest,
    MLLMRequest,
    MLLMResponse,
    build_request,
)

if TYPE_CHECKING:
    from mcie.config import Settings

StructuredMode = Literal["auto", "response_format", "guided_json", "none"]
_MODE_CHAIN: dict[str, tuple[str, ...]] = {
    "auto": ("response_format", "guided_json", "none"),
    "response_format": ("response_format", "none"),
    "guided_json": ("guided_json", "none"),
    "none": ("none",),
}
RETRY_STATUS = frozenset({408, 429})  # plus every 5xx except 501 (not implemented)
REJECT_STATUS = frozenset({400, 422, 501})  # how servers refuse a field they do not support
_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------------------------
# wire format


def image_data_url(image: ImagePart, fmt: ImageFormat = "png") -> str:
    """The image as a ``data:<mime>;base64,...`` URL (PIL images encoded as ``fmt``, bytes as given)."""
    data, mime = image.encoded(fmt)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def to_openai_messages(request: MLLMRequest, image_format: ImageFormat = "png") -> list[dict[str, Any]]:
    """The request's messages in the chat-completions format: system text as a string, user content as
    a list of ``text`` and ``image_url`` parts in order."""
    out: list[dict[str, Any]] = []
    for message in request.messages:
        if message.role != "user":
            out.append({"role": message.role, "content": message.text})
            continue
        content: list[dict[str, Any]] = []
        for part in message.parts:
            if isinstance(part, str):
                content.append({"type": "text", "text": part})
            else:
                url = image_data_url(part, image_format)
                content.append({"type": "image_url", "image_url": {"url": url}})
        out.append({"role": "user", "content": content})
    return out


def chat_payload(
    request: MLLMRequest, model: str, mode: str, image_format: ImageFormat = "png"
) -> dict[str, Any]:
    """The JSON body of a chat-completions call, with the structured-output field of ``mode``."""
    payload: dict[str, Any] = {
        "model": model,
        "messages": to_openai_messages(request, image_format),
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
    }
    if request.json_schema is not None:
        if mode == "response_format":
            payload["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": request.schema_name, "schema": request.json_schema},
            }
        elif mode == "guided_json":
            payload["guided_json"] = request.json_schema
    return payload


def parse_completion(body: Any, fallback_model: str) -> MLLMResponse:
    """An :class:`MLLMResponse` from a chat-completions response body (error set if it is malformed)."""
    if not isinstance(body, dict):
        return MLLMResponse.failure(f"malformed response: expected a JSON object, got {type(body).__name__}")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return MLLMResponse.failure(f"malformed response: no choices in {_clip(json.dumps(body))}")
    choice = choices[0]
    message = choice.get("message") or {}
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    model = str(body.get("model") or fallback_model)
    finish = choice.get("finish_reason")
    if not isinstance(content, str):
        refusal = message.get("refusal") if isinstance(message, dict) else None
        reason = f"refused: {refusal}" if refusal else f"no text in the answer (finish_reason {finish!r})"
        return MLLMResponse.failure(reason, model=model)
    return MLLMResponse(
        text=content,
        prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
        completion_tokens=_int_or_none(usage.get("completion_tokens")),
        model=model,
        finish_reason=finish if isinstance(finish, str) else None,
    )


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------
# retries


@dataclass(frozen=True)
class RetryPolicy:
    """How failed attempts are retried: ``max_retries`` more tries, exponential backoff with jitter."""

    max_retries: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    jitter: float = 0.5  # each delay is scaled by a random factor in [1 - jitter, 1]

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.base_delay_s < 0 or self.max_delay_s < 0 or not 0 <= self.jitter <= 1:
            raise ValueError(f"retry policy: expected non-negative values and jitter in [0, 1], got {self}")

    def delay(self, retry: int, rng: random.Random, retry_after_s: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based), at least the server's Retry-After."""
        backoff = min(self.max_delay_s, self.base_delay_s * (2**retry))
        backoff *= 1.0 - self.jitter * rng.random()
        if retry_after_s is not None:
            backoff = max(backoff, min(retry_after_s, self.max_delay_s))
        return backoff


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """The Retry-After header in seconds when it is a number (HTTP dates are ignored)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


# ---------------------------------------------------------------------------------------------------------
# backend


class _Attempt:
    """Outcome of one HTTP attempt: a response, or an error and whether it is worth retrying."""

    __slots__ = ("error", "rejected", "response", "retry_after", "retryable")

    def __init__(
        self,
        response: MLLMResponse | None = None,
        error: str | None = None,
        *,
        retryable: bool = False,
        rejected: bool = False,
        retry_after: float | None = None,
    ) -> None:
        self.response, self.error = response, error
        self.retryable, self.rejected, self.retry_after = retryable, rejected, retry_after


class OpenAIBackend(Backend):
    """Chat completions over HTTP with bounded concurrency, retries, timeouts and structured output."""

    kind: ClassVar[str] = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int = 16,
        timeout_s: float = 180.0,
        retry: RetryPolicy | None = None,
        structured: StructuredMode = "auto",
        image_format: ImageFormat = "jpeg",
        seed: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``image_format`` is how PIL images are encoded: "jpeg" (quality 95; in bench/mllm_overhead.py
        4.5x the throughput of PNG for 1-megapixel images, at a third of the bytes) or "png" (lossless).
        Images given as bytes are sent as they are."""
        super().__init__(model)
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected an http:// or https:// URL, got {base_url!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency: expected at least 1, got {concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s}")
        if structured not in _MODE_CHAIN:
            raise ValueError(f"structured: expected one of {', '.join(_MODE_CHAIN)}, got {structured!r}")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.structured = structured
        if image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format: expected 'png' or 'jpeg', got {image_format!r}")
        self.image_format: ImageFormat = image_format
        self._modes = _MODE_CHAIN[structured]
        self._mode_floor = 0  # index into _modes of the first mode the server has not refused
        self._rng = random.Random(seed)
        self._transport = transport
        self._ssl_context: ssl.SSLContext | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIBackend:
        key = settings.mllm_api_key.get_secret_value() if settings.mllm_api_key is not None else None
        return cls(
            settings.mllm_base_url,
            settings.mllm_model,
            api_key=key,
            concurrency=settings.mllm_concurrency,
            timeout_s=settings.mllm_timeout_s,
            retry=RetryPolicy(max_retries=settings.mllm_max_retries),
        )

    @property
    def structured_mode(self) -> str:
        """The structured-output mode requests are sent with now (after any fallback)."""
        return self._modes[self._mode_floor]

    # --- public API ------------------------------------------------------------------------------------

    builds_lazily = True

    def _generate(self, requests: list[MLLMRequest]) -> list[MLLMResponse]:
        return _run_sync(self._answer_all(requests))

    async def agenerate(self, requests: Sequence[MLLMRequest]) -> list[MLLMResponse]:
        """:meth:`generate` for callers inside a running event loop."""
        batch = list(requests)
        start = time.perf_counter()
        responses = await self._answer_all(batch)
        self._record(responses, time.perf_counter() - start)
        return responses

    # --- internals -------------------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        """A client with one keep-alive connection: each worker owns one (see :meth:`_answer_all`)."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        verify: ssl.SSLContext | bool = False  # plain http: no TLS, so no CA certificates to load
        if self.base_url.startswith("https://"):
            if self._ssl_context is None:  # built once and shared: loading CA certificates takes 20-100 ms
                self._ssl_context = httpx.create_ssl_context()
            verify = self._ssl_context
        return httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            verify=verify,
            transport=self._transport,
        )

    async def _answer_all(self, requests: list[MLLMRequest | LazyRequest]) -> list[MLLMResponse]:
        """``concurrency`` workers take the requests in turn, each over its own keep-alive connection.

        One client per worker, not one shared pool: httpcore's shared pool re-opens connections and stalls
        (up to seconds) once dozens of requests wait on it, which left a 50 ms server at 10% of its
        throughput at concurrency 64 in bench/mllm_overhead.py.
        """
        results: list[MLLMResponse | None] = [None] * len(requests)
        pending = iter(range(len(requests)))
        # Lazy requests are built ahead, in request order, by a small thread pool, so building (reading and
        # encoding images) overlaps the requests in flight instead of delaying each worker's next send.
        # At most 2 x concurrency requests are built ahead of the ones sent, so memory stays bounded.
        loop = asyncio.get_running_loop()
        builder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mllm-build")
        built: list[asyncio.Future[MLLMRequest | MLLMResponse] | None] = [None] * len(requests)
        window = 2 * self.concurrency
        scheduled = 0

        def schedule(upto: int) -> None:
            nonlocal scheduled
            while scheduled < min(upto, len(requests)):
                request = requests[scheduled]
                if not isinstance(request, MLLMRequest):
                    built[scheduled] = loop.run_in_executor(builder, build_request, request)
                scheduled += 1

        schedule(window)

        async def worker() -> None:
            async with self._client() as client:
                for index in pending:  # shared iterator: each index is taken by exactly one worker
                    try:
                        schedule(index + window)
                        future = built[index]
                        request = requests[index] if future is None else await future
                        if isinstance(request, MLLMResponse):  # building it failed
                            results[index] = request
                            continue
                        results[index] = await self._answer(client, request)
                    except Exception as exc:  # never lose the batch for one request
                        error = f"{type(exc).__name__}: {exc}"
                        results[index] = MLLMResponse.failure(error, model=self.model)

        try:
            await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(requests)))))
        finally:
            builder.shutdown(wait=False, cancel_futures=True)
        missing = MLLMResponse.failure("not answered", model=self.model)
        return [r if r is not None else missing for r in results]

    async def _answer(self, client: httpx.AsyncClient, request: MLLMRequest) -> MLLMResponse:
        start = time.perf_counter()
        attempts = 0
        retries = 0
        mode_index = self._mode_floor if request.json_schema is not None else len(self._modes) - 1
        last_error = "not attempted"
        bodies: dict[str, bytes] = {}  # built once per structured-output mode, reused by retries
        while True:
            mode = self._modes[mode_index]
            body = bodies.get(mode)
            if body is None:
                body = bodies[mode] = await _payload_bytes(request, self.model, mode, self.image_format)
            attempts += 1
            outcome = await self._attempt(client, body)
            if outcome.response is not None:
                if mode_index > self._mode_floor:
                    self._mode_floor = mode_index  # the server refused the stronger modes: skip them now
                return _with(outcome.response, time.perf_counter() - start, attempts)
            last_error = outcome.error or "unknown error"
            if outcome.rejected and mode != "none" and mode_index + 1 < len(self._modes):
                mode_index += 1  # the server refused the structured-output field: try the next mode
                continue
            if not outcome.retryable or retries >= self.retry.max_retries:
                break
            await asyncio.sleep(self.retry.delay(retries, self._rng, outcome.retry_after))
            retries += 1
        if retries:
            last_error += f" (after {retries} {'retry' if retries == 1 else 'retries'})"
        return MLLMResponse.failure(
            last_error, model=self.model, latency_s=time.perf_counter() - start, attempts=attempts
        )

    async def _attempt(self, client: httpx.AsyncClient, body: bytes) -> _Attempt:
        try:
            async with asyncio.timeout(self.timeout_s):
                reply = await client.post("/chat/completions", content=body)
        except (TimeoutError, httpx.TimeoutException):
            return _Attempt(error=f"timed out after {self.timeout_s:g} s", retryable=True)
        except httpx.TransportError as exc:
            return _Attempt(error=f"connection error: {type(exc).__name__}: {exc}", retryable=True)
        if reply.status_code >= 400:
            error = f"HTTP {reply.status_code} from {reply.request.url}: {_clip(reply.text)}"
            return _Attempt(
                error=error,
                retryable=_retryable(reply.status_code),
                rejected=reply.status_code in REJECT_STATUS,
                retry_after=retry_after_seconds(reply.headers),
            )
        try:
            parsed = reply.json()
        except ValueError:
            return _Attempt(error=f"malformed response: not JSON: {_clip(reply.text)}")
        response = parse_completion(parsed, self.model)
        if response.error is not None:
            return _Attempt(error=response.error)
        return _Attempt(response=response)


def _retryable(status: int) -> bool:
    return status in RETRY_STATUS or (status >= 500 and status != 501)


def _with(response: MLLMResponse, latency_s: float, attempts: int) -> MLLMResponse:
    return MLLMResponse(
        text=response.text,
        error=response.error,
        latency_s=latency_s,
        prompt_tokens=response.prompt_tokens,
        completion_tokens=response.completion_tokens,
        model=response.model,
        finish_reason=response.finish_reason,
        attempts=attempts,
    )


async def _payload_bytes(request: MLLMRequest, model: str, mode: str, image_format: ImageFormat) -> bytes:
    """The encoded request body; built in a worker thread when images must be encoded (CPU-bound work
    that Pillow and base64 do outside the GIL, so it runs beside the event loop)."""

    def build() -> bytes:
        payload = chat_payload(request, model, mode, image_format)
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")

    if request.images:
        return await asyncio.to_thread(build)
    return build()


def _run_sync(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coroutine`` to completion from synchronous code, also when this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mllm-openai") as pool:
        return pool.submit(asyncio.run, coroutine).result()


__all__ = [
    "OpenAIBackend",
    "RetryPolicy",
    "chat_payload",
    "image_data_url",
    "parse_completion",
    "retry_after_seconds",
    "to_openai_messages",
]
