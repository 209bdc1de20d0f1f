"""The one interface every MLLM backend implements: requests, responses, usage statistics, and the factory.

A request is a short chat (system and user messages whose content mixes text and images) plus sampling limits
and an optional JSON schema for structured output. ``Backend.generate(requests)`` answers a batch in order and
never raises because one request failed: the failure is the ``error`` of that request's response. Backends are
chosen by configuration with :func:`make_backend`; heavy modules (httpx clients, torch, vllm) are imported
only by the backend that is chosen.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from PIL import Image

if TYPE_CHECKING:
    from mcie.config import Settings

log = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]
ImageFormat = Literal["png", "jpeg"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# (magic prefix, MIME type) of the encoded image formats every backend accepts.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
)


def sniff_image_mime(data: bytes) -> str | None:
    """The MIME type of PNG, JPEG or WebP bytes, or None for anything else."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


class ImagePart:
    """One image of a message: a PIL image, or encoded PNG/JPEG/WebP bytes, converted lazily both ways.

    Bytes are sent as given and decoded only when a backend needs pixels. PIL images are encoded only when a
    backend needs bytes: PNG by default (lossless, fast compression level), or JPEG (several times smaller
    and faster to encode, for remote servers). Conversions are cached on the part.
    """

    __slots__ = ("_bytes", "_encoded", "_hash", "_pil")

    def __init__(self, image: Image.Image | bytes | bytearray | memoryview) -> None:
        self._pil: Image.Image | None = None
        self._bytes: tuple[bytes, str] | None = None  # the encoded image as given
        self._encoded: dict[tuple[str, int], tuple[bytes, str]] = {}
        self._hash: str | None = None
        if isinstance(image, Image.Image):
            if image.width < 1 or image.height < 1:
                raise ValueError(f"image part: expected a non-empty image, got size {image.size}")
            self._pil = image
        elif isinstance(image, bytes | bytearray | memoryview):
            data = bytes(image)
            mime = sniff_image_mime(data)
            if mime is None:
                raise ValueError(
                    f"image part: expected PNG, JPEG or WebP bytes, "
                    f"got {len(data)} bytes starting {data[:8]!r}"
                )
            self._bytes = (data, mime)
        else:
            raise TypeError(f"image part: expected a PIL image or encoded bytes, got {type(image).__name__}")

    def encoded(self, fmt: ImageFormat = "png", quality: int = 95) -> tuple[bytes, str]:
        """The image as (bytes, MIME type): the bytes as given, or the PIL image encoded as ``fmt``."""
        if self._bytes is not None:
            return self._bytes
        key = (fmt, quality if fmt == "jpeg" else 0)
        cached = self._encoded.get(key)
        if cached is None:
            assert self._pil is not None
            image = self._pil
            buffer = io.BytesIO()
            if fmt == "jpeg":
                if image.mode != "RGB":
                    image = image.convert("RGB")
                image.save(buffer, format="JPEG", quality=quality)
            elif fmt == "png":
                if image.mode not in ("RGB", "RGBA", "L", "LA"):
                    image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
                image.save(buffer, format="PNG", compress_level=1)
            else:
                raise ValueError(f"image format: expected 'png' or 'jpeg', got {fmt!r}")
            cached = (buffer.getvalue(), f"image/{fmt}")
            self._encoded[key] = cached
        return cached

    def to_pil(self) -> Image.Image:
        """The image as an RGB PIL image (decoded once)."""
        if self._pil is None:
            assert self._bytes is not None
            with Image.open(io.BytesIO(self._bytes[0])) as opened:
                self._pil = opened.convert("RGB")
        return self._pil if self._pil.mode == "RGB" else self._pil.convert("RGB")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels; for bytes, read from the header without decoding pixels."""
        if self._pil is not None:
            return self._pil.size
        assert self._bytes is not None
        with Image.open(io.BytesIO(self._bytes[0])) as opened:
            return opened.size

    def content_hash(self) -> str:
        """sha256 of the encoded bytes as given, or of mode, size and raw pixels for a PIL image."""
        if self._hash is None:
            digest = hashlib.sha256()
            if self._bytes is not None:
                digest.update(b"bytes:")
                digest.update(self._bytes[0])
            else:
                assert self._pil is not None
                digest.update(f"pixels:{self._pil.mode}:{self._pil.width}x{self._pil.height}:".encode())
                digest.update(self._pil.tobytes())
            self._hash = digest.hexdigest()
        return self._hash

    def __repr__(self) -> str:
        kind = self._bytes[1] if self._bytes is not None else "pil"
        return f"ImagePart({kind}, {self.size[0]}x{self.size[1]})"


Part = str | ImagePart
ImageLike = Image.Image | bytes | bytearray | memoryview | ImagePart


def as_part(value: str | ImageLike) -> Part:
    """A content part from text, a PIL image, encoded image bytes, or an existing part."""
    if isinstance(value, str | ImagePart):
        return value
    return ImagePart(value)


@dataclass(frozen=True)
class Message:
    """One chat message: a role and its content parts (text and images, in order)."""

    role: Role
    parts: tuple[Part, ...]

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"message role: expected one of {', '.join(ROLES)}, got {self.role!r}")
        parts = tuple(as_part(p) for p in self.parts)
        if not parts:
            raise ValueError(f"{self.role} message: expected at least one text or image part, got none")
        if self.role != "user" and any(isinstance(p, ImagePart) for p in parts):
            raise ValueError(f"{self.role} message: images are only allowed in user messages")
        object.__setattr__(self, "parts", parts)

    @property
    def text(self) -> str:
        """The text parts joined by newlines (images left out)."""
        return "\n".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(p for p in self.parts if isinstance(p, ImagePart))


def system(*parts: str) -> Message:
    """A system message from text parts."""
    return Message("system", parts)


def user(*parts: str | ImageLike) -> Message:
    """A user message from text parts and images (PIL images or PNG/JPEG/WebP bytes), in order."""
    return Message("user", tuple(as_part(p) for p in parts))


@dataclass(frozen=True)
class MLLMRequest:
    """One chat-completion request. ``json_schema`` asks for structured output where the backend can."""

    messages: tuple[Message, ...]
    max_tokens: int = 1024
    temperature: float = 0.0
    json_schema: dict[str, Any] | None = None
    schema_name: str = "answer"

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", tuple(self.messages))
        if not self.messages:
            raise ValueError("request messages: expected at least one message, got none")
        if self.messages[-1].role != "user":
            last = self.messages[-1].role
            raise ValueError(f"request messages: expected the last message to be 'user', got {last!r}")
        if self.max_tokens < 1:
            raise ValueError(f"request max_tokens: expected a positive integer, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"request temperature: expected a value in [0, 2], got {self.temperature}")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise ValueError(f"request json_schema: expected a dict, got {type(self.json_schema).__name__}")

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(image for message in self.messages for image in message.images)


LazyRequest = Callable[[], "MLLMRequest"]


def build_request(request: MLLMRequest | LazyRequest) -> MLLMRequest | MLLMResponse:
    """The request itself, or the one a :data:`LazyRequest` builds; a failure to build becomes a failed response."""
    if isinstance(request, MLLMRequest):
        return request
    try:
        return request()
    except Exception as exc:  # a bad input image must fail its request, not the batch
        return MLLMResponse.failure(f"the request could not be built: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class MLLMResponse:
    """The answer to one request. ``error`` is None on success; otherwise ``text`` is empty or partial."""

    text: str
    error: str | None = None
    latency_s: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str = ""
    finish_reason: str | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failure(
        cls, error: str, *, model: str = "", latency_s: float = 0.0, attempts: int = 1
    ) -> MLLMResponse:
        return cls(text="", error=error, latency_s=latency_s, model=model, attempts=attempts)


@dataclass(frozen=True)
class BackendStats:
    """Usage counters of a backend. Subtract two snapshots to get the usage of one pipeline stage."""

    calls: int = 0
    failures: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def __add__(self, other: BackendStats) -> BackendStats:
        return BackendStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: BackendStats) -> BackendStats:
        return BackendStats(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def as_dict(self) -> dict[str, float | int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def summary(self) -> str:
        rate = f", {self.calls / self.seconds:.1f} calls/s" if self.seconds > 0 else ""
        return (
            f"{self.calls} calls, {self.failures} failed, {self.retries} retries, "
            f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens, "
            f"{self.seconds:.1f} s{rate}"
        )

    @classmethod
    def of(cls, responses: Sequence[MLLMResponse], seconds: float) -> BackendStats:
        """The usage of one answered batch that took ``seconds`` of wall time."""
        return cls(
            calls=len(responses),
            failures=sum(1 for r in responses if not r.ok),
            retries=sum(max(0, r.attempts - 1) for r in responses),
            prompt_tokens=sum(r.prompt_tokens or 0 for r in responses),
            completion_tokens=sum(r.completion_tokens or 0 for r in responses),
            seconds=seconds,
        )


class Backend(ABC):
    """An MLLM that answers batches of :class:`MLLMRequest` in order, one response per request."""

    kind: ClassVar[str] = "abstract"

    def __init__(self, model: str) -> None:
        self.model = model
        self._stats = BackendStats()
        self._stats_lock = threading.Lock()

    @abstractmethod
    def _generate(self, requests: list[MLLMRequest]) -> list[MLLMResponse]:
        """Answer ``requests`` in order; put per-request failures in the responses."""

    #: Whether :meth:`_generate` accepts :data:`LazyRequest` callables itself (building them while other requests
    #: are in flight); otherwise :meth:`generate` builds them first.
    builds_lazily: ClassVar[bool] = False

    def generate(self, requests: Sequence[MLLMRequest | LazyRequest]) -> list[MLLMResponse]:
        """Answer every request, in order. Never raises for a failed request: see each ``error``.

        A request may be given as a zero-argument callable that builds it (:data:`LazyRequest`): backends that
        overlap work build it when its turn comes, so preparing images overlaps the requests already in flight.
        """
        batch = list(requests)
        if not batch:
            return []
        start = time.perf_counter()
        if not self.builds_lazily:
            built = [build_request(r) for r in batch]
            failed = {i: r for i, r in enumerate(built) if isinstance(r, MLLMResponse)}
            if failed:
                todo = [i for i in range(len(batch)) if i not in failed]
                answered = dict(zip(todo, self.generate([built[i] for i in todo]), strict=True)) if todo else {}
                return [failed.get(i) or answered[i] for i in range(len(batch))]
            batch = built
        try:
            responses = self._generate(batch)
        except Exception as exc:  # a backend bug or a lost engine must not lose the whole batch silently
            log.exception("%s backend failed on a batch of %d requests", self.kind, len(batch))
            error = f"{self.kind} backend failed: {type(exc).__name__}: {exc}"
            responses = [MLLMResponse.failure(error, model=self.model) for _ in batch]
        if len(responses) != len(batch):
            raise RuntimeError(
                f"{self.kind} backend returned {len(responses)} responses for {len(batch)} requests"
            )
        self._record(responses, time.perf_counter() - start)
        return responses

    def generate_one(self, request: MLLMRequest) -> MLLMResponse:
        return self.generate([request])[0]

    def _record(self, responses: Sequence[MLLMResponse], seconds: float) -> None:
        with self._stats_lock:
            self._stats = self._stats + BackendStats.of(responses, seconds)

    @property
    def stats(self) -> BackendStats:
        """A snapshot of the usage so far (calls, failures, retries, tokens, seconds inside generate)."""
        with self._stats_lock:
            return self._stats

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release what the backend holds (connections, GPU memory)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r})"


class CallableBackend(Backend):
    """A backend that answers with a Python function: for rule-based stand-ins and for pipeline tests.

    ``answer`` gets each request and returns the answer text (or a full :class:`MLLMResponse`); an exception
    it raises becomes that request's error.
    """

    kind: ClassVar[str] = "callable"

    def __init__(self, answer: Callable[[MLLMRequest], str | MLLMResponse], model: str = "callable") -> None:
        super().__init__(model)
        self.answer = answer

    def _generate(self, requests: list[MLLMRequest]) -> list[MLLMResponse]:
        return [self._one(request) for request in requests]

    def _one(self, request: MLLMRequest) -> MLLMResponse:
        start = time.perf_counter()
        try:
            result = self.answer(request)
        except Exception as exc:
            return MLLMResponse.failure(f"{type(exc).__name__}: {exc}", model=self.model)
        if isinstance(result, MLLMResponse):
            return result
        return MLLMResponse(text=str(result), latency_s=time.perf_counter() - start, model=self.model)


BACKEND_KINDS: tuple[str, ...] = ("openai", "vllm", "transformers")


def make_backend(kind: str | None = None, settings: Settings | None = None) -> Backend:
    """The backend named by ``kind`` (default: ``settings.mllm_backend``), configured from ``settings``.

    Raises :class:`mcie.config.ConfigError` naming the setting when the configuration cannot make one.
    """
    from mcie.config import ConfigError, get_settings

    settings = settings or get_settings()
    kind = (kind or settings.mllm_backend).strip().lower()
    if kind == "none":
        raise ConfigError(
            "MCIE_MLLM_BACKEND: is 'none', so no MLLM can be called; "
            "set it to one of " + ", ".join(BACKEND_KINDS)
        )
    if kind == "openai":
        from mcie.mllm.openai_backend import OpenAIBackend

        return OpenAIBackend.from_settings(settings)
    if kind == "vllm":
        from mcie.mllm.vllm_backend import VLLMBackend

        return VLLMBackend.from_settings(settings)
    if kind == "transformers":
        from mcie.mllm.transformers_backend import TransformersBackend

        return TransformersBackend.from_settings(settings)
    raise ConfigError(f"MCIE_MLLM_BACKEND: expected one of none, {', '.join(BACKEND_KINDS)}, got {kind!r}")

