"""Tests of the vLLM backend that run without vLLM: the install hint, request conversion, sampling parameters
for both vLLM structured-output APIs, and batch handling around a stand-in engine object."""

from __future__ import annotations

import base64
import io
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mcie.config import load_settings
from mcie.mllm.base import MLLMRequest, make_backend, system, user
from mcie.mllm.vllm_backend import VLLMBackend, import_vllm, sampling_factory, to_vllm_conversation


@pytest.fixture
def no_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails even on a host that has vllm


def test_missing_vllm_says_how_to_install_it(no_vllm: None) -> None:
    with pytest.raises(ImportError, match=r"install mcie\[vllm\] on a GPU host"):
        import_vllm()
    with pytest.raises(ImportError, match="MCIE_MLLM_BACKEND=openai"):
        make_backend("vllm", load_settings(mllm_backend="vllm"))


def test_requests_become_openai_chat_conversations_with_data_urls() -> None:
    image = Image.new("RGB", (8, 6), (10, 20, 30))
    request = MLLMRequest((system("rules"), user("a", image, "b", image)))
    conversation = to_vllm_conversation(request)
    assert conversation[0] == {"role": "system", "content": "rules"}
    content = conversation[1]["content"]
    assert [p["type"] for p in content] == ["text", "image_url", "text", "image_url"]
    url = content[1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (8, 6) and decoded.convert("RGB").tobytes() == image.tobytes()


def _fake_vllm(monkeypatch: pytest.MonkeyPatch, api: str) -> None:
    """Install modules with vLLM's SamplingParams and one of its two structured-output classes."""

    @dataclass
    class SamplingParams:
        max_tokens: int = 16
        temperature: float = 1.0
        structured_outputs: Any = None
        guided_decoding: Any = None

    @dataclass
    class JsonParams:
        json: Any = None

    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = SamplingParams  # type: ignore[attr-defined]
    params = types.ModuleType("vllm.sampling_params")
    setattr(params, api, JsonParams)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", params)


@pytest.mark.parametrize(
    ("api", "field_name"),
    [("StructuredOutputsParams", "structured_outputs"), ("GuidedDecodingParams", "guided_decoding")],
)
def test_sampling_params_carry_limits_and_the_schema(
    monkeypatch: pytest.MonkeyPatch, api: str, field_name: str
) -> None:
    _fake_vllm(monkeypatch, api)
    build = sampling_factory(sys.modules["vllm"])
    schema = {"type": "object"}
    params = build(MLLMRequest((user("q"),), max_tokens=33, temperature=0.2, json_schema=schema))
    assert (params.max_tokens, params.temperature) == (33, 0.2)
    assert getattr(params, field_name).json == schema
    plain = build(MLLMRequest((user("q"),)))
    assert plain.structured_outputs is None and plain.guided_decoding is None


@dataclass
class _Completion:
    text: str
    token_ids: list[int]
    finish_reason: str = "stop"


@dataclass
class _Output:
    prompt_token_ids: list[int]
    outputs: list[_Completion]


@dataclass
class _Engine:
    """Answers like ``vllm.LLM.chat``; rejects a whole batch if one prompt says 'too long', as vLLM does."""

    batches: list[int] = field(default_factory=list)

    def chat(self, conversations: list[Any], params: list[Any], use_tqdm: bool = True) -> list[_Output]:
        assert len(conversations) == len(params) and use_tqdm is False
        self.batches.append(len(conversations))
        texts = [conversation[-1]["content"][0]["text"] for conversation in conversations]
        if any("too long" in text for text in texts):
            raise ValueError("prompt is longer than max_model_len")
        return [
            _Output(list(range(5 + i)), [_Completion(text.upper(), list(range(p["max_tokens"])))])
            for i, (text, p) in enumerate(zip(texts, params, strict=True))
        ]


def _backend(engine: _Engine) -> VLLMBackend:
    return VLLMBackend(engine, "qwen-local", lambda request: {"max_tokens": request.max_tokens})


def test_a_batch_goes_to_the_engine_at_once_and_answers_keep_order() -> None:
    engine = _Engine()
    backend = _backend(engine)
    requests = [MLLMRequest((user(f"q{i}"),), max_tokens=i + 1) for i in range(4)]
    responses = backend.generate(requests)
    assert engine.batches == [4]
    assert [r.text for r in responses] == ["Q0", "Q1", "Q2", "Q3"]
    assert [r.completion_tokens for r in responses] == [1, 2, 3, 4]
    assert [r.prompt_tokens for r in responses] == [5, 6, 7, 8]
    assert all(r.ok and r.model == "qwen-local" and r.finish_reason == "stop" for r in responses)


def test_a_rejected_batch_is_retried_one_by_one_so_only_the_bad_request_fails() -> None:
    engine = _Engine()
    backend = _backend(engine)
    requests = [MLLMRequest((user(text),)) for text in ("a", "too long", "b")]
    responses = backend.generate(requests)
    assert engine.batches == [3, 1, 1, 1]
    assert [r.ok for r in responses] == [True, False, True]
    assert "max_model_len" in responses[1].error
    assert backend.stats.failures == 1
    (single,) = backend.generate([MLLMRequest((user("too long"),))])
    assert not single.ok and engine.batches[-1] == 1


def test_model_by_hub_id_reaches_vllm_as_the_cached_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mcie.hub import ModelNotAvailable
    from tests.hf_cache import add_to_cache

    _fake_vllm(monkeypatch, "StructuredOutputsParams")
    started: list[dict[str, Any]] = []

    class LLM:
        def __init__(self, model: str, **options: Any) -> None:
            started.append({"model": model, **options})

    sys.modules["vllm"].LLM = LLM  # type: ignore[attr-defined]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    snapshot = add_to_cache(tmp_path / "hf", "acme/tiny-vl", tmp_path / "model", ref="v1")
    backend = VLLMBackend.from_settings(load_settings(mllm_backend="vllm", mllm_model_path="acme/tiny-vl@v1"))
    assert started[0]["model"] == str(snapshot) and backend.model == "acme/tiny-vl"
    with pytest.raises(ModelNotAvailable, match=r"MCIE_MLLM_MODEL: model 'Qwen/Qwen2\.5-VL-72B-Instruct'"):
        VLLMBackend.from_settings(load_settings(mllm_backend="vllm"))  # the default MCIE_MLLM_MODEL, not cached
