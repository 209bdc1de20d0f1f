"""Tests of the OpenAI-compatible backend against a local chat-completions server (chat_server.py)."""

from __future__ import annotations

import asyncio
import io
import json
import random
import socket
import time

import pytest
from PIL import Image

from mcie.config import load_settings
from mcie.mllm.base import MLLMRequest, make_backend, system, user
from mcie.mllm.openai_backend import OpenAIBackend, RetryPolicy, chat_payload, parse_completion
from tests.mcie.mllm.chat_server import RecordedRequest, Reply, chat_server

FAST_RETRY = RetryPolicy(max_retries=2, base_delay_s=0.01, max_delay_s=0.05)
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _text_request(text: str, **kwargs: object) -> MLLMRequest:
    return MLLMRequest((user(text),), **kwargs)  # type: ignore[arg-type]


def test_images_arrive_as_data_urls_in_order_with_the_request_fields() -> None:
    red = Image.new("RGB", (40, 30), (255, 0, 0))
    noise = Image.frombytes("RGB", (16, 16), random.Random(0).randbytes(16 * 16 * 3))
    jpeg = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 0, 255)).save(jpeg, format="JPEG")
    request = MLLMRequest(
        (system("guideline"), user("before:", red, "after:", _png(noise), jpeg.getvalue(), "question")),
        max_tokens=77,
        temperature=0.3,
    )
    with chat_server("fine") as server:
        backend = OpenAIBackend(
            server.base_url, "qwen-test", api_key="sk-test", image_format="png", retry=FAST_RETRY
        )
        (response,) = backend.generate([request])
    assert response.ok and response.text == "fine" and response.model == "qwen-test"
    (seen,) = server.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert (seen.body["max_tokens"], seen.body["temperature"], seen.body["model"]) == (77, 0.3, "qwen-test")
    assert seen.messages[0] == {"role": "system", "content": "guideline"}
    assert [p["type"] for p in seen.messages[1]["content"]] == [
        "text", "image_url", "text", "image_url", "image_url", "text",
    ]
    urls = seen.image_urls()
    assert urls[0].startswith("data:image/png;base64,") and urls[2].startswith("data:image/jpeg;base64,")
    images = seen.images()
    assert images[0].tobytes() == red.tobytes()  # PNG: lossless
    assert images[1].tobytes() == noise.tobytes()
    assert images[2].size == (20, 20)
    assert response.prompt_tokens == 4 + 3 * 64 and response.completion_tokens == 1  # the server's usage


def test_pil_images_travel_as_jpeg_by_default_while_bytes_stay_as_given() -> None:
    png = _png(Image.new("RGB", (8, 8), "white"))
    request = MLLMRequest((user("a", Image.new("RGB", (64, 48), (200, 10, 10)), "b", png),))
    with chat_server("ok") as server:
        backend = OpenAIBackend(server.base_url, "m", retry=FAST_RETRY)
        assert backend.generate([request])[0].ok
    urls = server.requests[0].image_urls()
    assert urls[0].startswith("data:image/jpeg;base64,") and urls[1].startswith("data:image/png;base64,")
    assert server.requests[0].images()[0].size == (64, 48)
    with pytest.raises(ValueError, match="image_format"):
        OpenAIBackend("http://127.0.0.1:1/v1", "m", image_format="gif")  # type: ignore[arg-type]


def test_order_is_kept_and_concurrency_is_bounded_and_used() -> None:
    rng = random.Random(1)
    delays = {f"q{i}": rng.uniform(0.0, 0.04) for i in range(24)}

    def answer(request: RecordedRequest) -> Reply:
        text = request.texts()[-1]
        return Reply(text=text.upper(), delay_s=delays[text])

    with chat_server(answer) as server:
        backend = OpenAIBackend(server.base_url, "m", concurrency=4, retry=FAST_RETRY)
        responses = backend.generate([_text_request(q) for q in delays])
    assert [r.text for r in responses] == [q.upper() for q in delays]
    assert server.max_in_flight == 4
    assert len(server.requests) == 24
    assert backend.stats.calls == 24 and backend.stats.failures == 0


@pytest.mark.parametrize("status", [500, 503, 429])
def test_retries_then_success(status: int) -> None:
    with chat_server("done", fail_first=2, fail_status=status) as server:
        backend = OpenAIBackend(server.base_url, "m", retry=FAST_RETRY)
        (response,) = backend.generate([_text_request("x")])
    assert response.ok and response.text == "done"
    assert response.attempts == 3 and len(server.requests) == 3
    assert backend.stats.retries == 2 and backend.stats.failures == 0


def test_retry_after_is_honoured() -> None:
    with chat_server("done", fail_first=1, fail_status=429, retry_after=0.3) as server:
        backend = OpenAIBackend(server.base_url, "m", retry=FAST_RETRY)
        start = time.perf_counter()
        (response,) = backend.generate([_text_request("x")])
        elapsed = time.perf_counter() - start
    assert response.ok and response.attempts == 2
    assert elapsed >= 0.05  # Retry-After 0.3 s capped at max_delay_s 0.05 s, more than the 0.01 s backoff


def test_exhausted_retries_give_an_error_response_and_the_batch_goes_on() -> None:
    def answer(request: RecordedRequest) -> Reply:
        if request.texts()[-1] == "bad":
            return Reply(status=502, body={"error": {"message": "upstream down"}})
        return Reply(text="good")

    with chat_server(answer) as server:
        backend = OpenAIBackend(server.base_url, "m", retry=FAST_RETRY)
        responses = backend.generate([_text_request("a"), _text_request("bad"), _text_request("b")])
    assert [r.ok for r in responses] == [True, False, True]
    bad = responses[1]
    assert "HTTP 502" in bad.error and "upstream down" in bad.error and "after 2 retries" in bad.error
    assert bad.attempts == 3 and bad.text == ""
    assert len(server.requests) == 5
    assert backend.stats.failures == 1


def test_client_errors_are_not_retried() -> None:
    with chat_server(lambda _r: Reply(status=401, body={"error": {"message": "bad key"}})) as server:
        backend = OpenAIBackend(server.base_url, "m", retry=FAST_RETRY)
        (response,) = backend.generate([_text_request("x")])
    assert not response.ok and "HTTP 401" in response.error and response.attempts == 1
    assert len(server.requests) == 1


def test_timeout_gives_an_error_response() -> None:
    with chat_server("late", delay_s=2.0) as server:
        retry = RetryPolicy(max_retries=1, base_delay_s=0)
        backend = OpenAIBackend(server.base_url, "m", timeout_s=0.2, retry=retry)
        start = time.perf_counter()
        (response,) = backend.generate([_text_request("x")])
        elapsed = time.perf_counter() - start
    assert not response.ok and "timed out after 0.2 s" in response.error and "after 1 retry" in response.error
    assert response.attempts == 2 and 0.4 <= elapsed < 1.5


def test_connection_errors_are_retried_then_reported() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", retry=FAST_RETRY)
    (response,) = backend.generate([_text_request("x")])
    assert not response.ok and "connection error" in response.error and response.attempts == 3


def test_structured_output_falls_back_when_the_server_rejects_it_and_remembers() -> None:
    with chat_server('{"ok": true}', reject_fields=("response_format",)) as server:
        backend = OpenAIBackend(server.base_url, "m", concurrency=1, retry=FAST_RETRY)
        requests = [_text_request("a", json_schema=SCHEMA), _text_request("b", json_schema=SCHEMA)]
        first, second = backend.generate(requests)
    assert first.ok and second.ok and json.loads(first.text) == {"ok": True}
    sent = [set(r.body) & {"response_format", "guided_json"} for r in server.requests]
    assert sent == [{"response_format"}, {"guided_json"}, {"guided_json"}]
    assert server.requests[1].body["guided_json"] == SCHEMA
    assert backend.structured_mode == "guided_json"


def test_structured_output_falls_back_to_plain_when_nothing_is_supported() -> None:
    with chat_server('{"ok": true}', reject_fields=("response_format", "guided_json")) as server:
        backend = OpenAIBackend(server.base_url, "m", retry=FAST_RETRY)
        (response,) = backend.generate([_text_request("a", json_schema=SCHEMA)])
    assert response.ok and response.attempts == 3
    assert not ({"response_format", "guided_json"} & set(server.requests[-1].body))
    assert backend.structured_mode == "none"


def test_response_format_is_sent_as_json_schema_when_accepted() -> None:
    with chat_server('{"ok": false}') as server:
        backend = OpenAIBackend(server.base_url, "m", retry=FAST_RETRY)
        backend.generate([MLLMRequest((user("q"),), json_schema=SCHEMA, schema_name="verdict")])
    assert server.requests[0].body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "verdict", "schema": SCHEMA},
    }
    assert chat_payload(_text_request("q"), "m", "response_format").keys() == {
        "model", "messages", "max_tokens", "temperature",
    }


def test_malformed_server_answers_are_errors() -> None:
    with chat_server(lambda _r: {"choices": []}) as server:
        backend = OpenAIBackend(server.base_url, "m", retry=FAST_RETRY)
        (response,) = backend.generate([_text_request("x")])
    assert not response.ok and "malformed" in response.error
    refusal = {"choices": [{"message": {"content": None, "refusal": "no"}, "finish_reason": "stop"}]}
    assert "refused" in (parse_completion(refusal, "m").error or "")
    assert "expected a JSON object" in (parse_completion([1], "m").error or "")


def test_generate_works_inside_a_running_event_loop_and_agenerate_too() -> None:
    with chat_server(lambda r: r.texts()[-1]) as server:
        backend = OpenAIBackend(server.base_url, "m", retry=FAST_RETRY)

        async def main() -> tuple[list[str], list[str]]:
            sync = [r.text for r in backend.generate([_text_request("s1"), _text_request("s2")])]
            asynchronous = [r.text for r in await backend.agenerate([_text_request("a1")])]
            return sync, asynchronous

        assert asyncio.run(main()) == (["s1", "s2"], ["a1"])
    assert backend.stats.calls == 3


def test_make_backend_reads_the_settings() -> None:
    with chat_server("hi") as server:
        settings = load_settings(
            mllm_backend="openai",
            mllm_base_url=server.base_url,
            mllm_model="served-model",
            mllm_api_key="secret",
            mllm_concurrency=3,
            mllm_timeout_s=5,
            mllm_max_retries=1,
        )
        backend = make_backend(settings=settings)
        assert isinstance(backend, OpenAIBackend)
        assert (backend.concurrency, backend.timeout_s, backend.retry.max_retries) == (3, 5.0, 1)
        assert backend.generate_one(_text_request("x")).text == "hi"
    assert server.requests[0].headers["authorization"] == "Bearer secret"
    assert server.requests[0].body["model"] == "served-model"


def test_retry_policy_delays_grow_exponentially_with_jitter() -> None:
    policy = RetryPolicy(max_retries=5, base_delay_s=1.0, max_delay_s=10.0, jitter=0.5)
    rng = random.Random(0)
    for retry, top in enumerate([1, 2, 4, 8, 10, 10]):
        delays = [policy.delay(retry, rng) for _ in range(50)]
        assert all(top * 0.5 <= d <= top for d in delays)
        assert max(delays) - min(delays) > 0.1 * top  # jittered
    assert policy.delay(0, rng, retry_after_s=7.0) == 7.0
    assert policy.delay(0, rng, retry_after_s=70.0) == 10.0
    with pytest.raises(ValueError, match="retry policy"):
        RetryPolicy(jitter=2.0)
