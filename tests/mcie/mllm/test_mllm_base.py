"""Tests of the backend interface: image parts, messages, requests, stats, the factory, CallableBackend."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mcie.config import ConfigError, load_settings
from mcie.mllm.base import (
    Backend,
    BackendStats,
    CallableBackend,
    ImagePart,
    Message,
    MLLMRequest,
    MLLMResponse,
    make_backend,
    sniff_image_mime,
    system,
    user,
)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_image_part_from_pil_encodes_png_once_and_round_trips() -> None:
    image = Image.new("RGB", (7, 5), (1, 2, 3))
    part = ImagePart(image)
    data, mime = part.encoded()
    assert mime == "image/png" and part.encoded()[0] is data  # cached
    assert Image.open(io.BytesIO(data)).tobytes() == image.tobytes()
    assert part.size == (7, 5) and part.to_pil() is image


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_image_part_from_bytes_keeps_them_and_decodes_lazily(fmt: str, mime: str) -> None:
    data = _encoded(Image.new("RGB", (9, 4), "white"), fmt)
    part = ImagePart(data)
    assert part.encoded() == (data, mime)
    assert part.size == (9, 4)
    assert part.to_pil().mode == "RGB" and part.to_pil().size == (9, 4)
    assert sniff_image_mime(data) == mime


@pytest.mark.parametrize("mode", ["P", "CMYK", "LA", "I;16"])
def test_image_part_encodes_unusual_modes(mode: str) -> None:
    data, mime = ImagePart(Image.new(mode, (4, 4))).encoded()
    assert mime == "image/png" and Image.open(io.BytesIO(data)).size == (4, 4)


def test_image_part_can_encode_jpeg_but_never_re_encodes_given_bytes() -> None:
    part = ImagePart(Image.new("RGBA", (30, 20), (0, 128, 255, 255)))
    data, mime = part.encoded("jpeg")
    assert mime == "image/jpeg" and sniff_image_mime(data) == "image/jpeg"
    decoded = Image.open(io.BytesIO(data))
    assert decoded.size == (30, 20) and abs(decoded.getpixel((5, 5))[2] - 255) <= 3
    assert part.encoded("png")[1] == "image/png"
    png = _encoded(Image.new("RGB", (3, 3)), "PNG")
    assert ImagePart(png).encoded("jpeg") == (png, "image/png")
    with pytest.raises(ValueError, match="expected 'png' or 'jpeg'"):
        ImagePart(Image.new("RGB", (3, 3))).encoded("gif")  # type: ignore[arg-type]


def test_image_part_rejects_what_is_not_an_image() -> None:
    with pytest.raises(ValueError, match="expected PNG, JPEG or WebP bytes, got 5 bytes"):
        ImagePart(b"hello")
    with pytest.raises(TypeError, match="got str"):
        ImagePart("photo.png")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty image"):
        ImagePart(Image.new("RGB", (0, 3)))


def test_content_hash_follows_content() -> None:
    a, b = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "red")
    assert ImagePart(a).content_hash() == ImagePart(b).content_hash()
    assert ImagePart(a).content_hash() != ImagePart(Image.new("RGB", (4, 4), "blue")).content_hash()
    png = _encoded(a, "PNG")
    from_bytes = ImagePart(png)
    assert from_bytes.content_hash() == ImagePart(bytearray(png)).content_hash()
    decoded_first = ImagePart(png)
    decoded_first.to_pil()  # decoding must not change what the hash is over
    assert decoded_first.content_hash() == from_bytes.content_hash()


def test_messages_and_requests_validate_their_fields() -> None:
    message = user("look", Image.new("RGB", (2, 2)), _encoded(Image.new("RGB", (2, 2)), "PNG"), "why?")
    assert len(message.images) == 2 and message.text == "look\nwhy?"
    with pytest.raises(ValueError, match="images are only allowed in user messages"):
        Message("system", ("rules", Image.new("RGB", (2, 2))))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one text or image part"):
        user()
    with pytest.raises(ValueError, match="message role"):
        Message("tool", ("x",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="last message to be 'user'"):
        MLLMRequest((user("q"), Message("assistant", ("a",))))
    with pytest.raises(ValueError, match="at least one message"):
        MLLMRequest(())
    with pytest.raises(ValueError, match="max_tokens"):
        MLLMRequest((user("q"),), max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        MLLMRequest((user("q"),), temperature=3.0)
    request = MLLMRequest([system("s"), message])  # type: ignore[arg-type]
    assert isinstance(request.messages, tuple) and len(request.images) == 2


def test_stats_add_subtract_and_summarize() -> None:
    responses = [
        MLLMResponse("a", prompt_tokens=10, completion_tokens=2, attempts=1),
        MLLMResponse.failure("boom", attempts=3),
    ]
    batch = BackendStats.of(responses, seconds=2.0)
    assert batch == BackendStats(
        calls=2, failures=1, retries=2, prompt_tokens=10, completion_tokens=2, seconds=2.0
    )
    total = batch + batch
    assert total - batch == batch
    assert total.as_dict()["calls"] == 4
    assert batch.summary() == (
        "2 calls, 1 failed, 2 retries, 10 prompt + 2 completion tokens, 2.0 s, 1.0 calls/s"
    )


def test_callable_backend_keeps_order_turns_exceptions_into_errors_and_counts() -> None:
    def answer(request: MLLMRequest) -> str:
        text = request.messages[-1].text
        if text == "fail":
            raise RuntimeError("no answer")
        return text[::-1]

    backend = CallableBackend(answer, model="rule")
    before = backend.stats
    responses = backend.generate([MLLMRequest((user(t),)) for t in ("abc", "fail", "xy")])
    assert [r.text for r in responses] == ["cba", "", "yx"]
    assert responses[1].error == "RuntimeError: no answer" and responses[0].model == "rule"
    used = backend.stats - before
    assert (used.calls, used.failures) == (3, 1)
    assert backend.generate([]) == []


class _Broken(Backend):
    kind = "broken"

    def __init__(self, answers: int | None) -> None:
        super().__init__("broken-model")
        self.answers = answers

    def _generate(self, requests: list[MLLMRequest]) -> list[MLLMResponse]:
        if self.answers is None:
            raise OSError("engine lost")
        return [MLLMResponse("x")] * self.answers


def test_a_backend_that_raises_still_answers_every_request_with_an_error() -> None:
    responses = _Broken(None).generate([MLLMRequest((user("a"),)), MLLMRequest((user("b"),))])
    assert [r.error for r in responses] == ["broken backend failed: OSError: engine lost"] * 2
    with pytest.raises(RuntimeError, match="returned 1 responses for 2 requests"):
        _Broken(1).generate([MLLMRequest((user("a"),)), MLLMRequest((user("b"),))])


def test_make_backend_explains_configuration_problems() -> None:
    with pytest.raises(ConfigError, match="MCIE_MLLM_BACKEND: is 'none'"):
        make_backend(settings=load_settings())
    with pytest.raises(ConfigError, match="MCIE_MLLM_BACKEND: expected one of none, openai, vllm"):
        make_backend("llama", load_settings())
