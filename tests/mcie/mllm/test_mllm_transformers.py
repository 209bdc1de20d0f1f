"""Tests of the transformers backend on a tiny random Qwen2.5-VL saved to disk and loaded back by path, and
of smart_resize against transformers' own implementation and processor."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from mcie.config import ConfigError, load_settings
from mcie.mllm.base import MLLMRequest, make_backend, system, user
from mcie.mllm.prompts import conflict_prompt
from mcie.mllm.qwen import HUB_MAX_PIXELS, PROCESSOR_MAX_PIXELS, PROCESSOR_MIN_PIXELS, smart_resize
from mcie.mllm.transformers_backend import TransformersBackend, to_hf_messages
from tests.mcie.mllm.tiny_qwen import TINY_MAX_PIXELS, TINY_MIN_PIXELS, build_tiny_qwen25_vl


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen25_vl(tmp_path_factory.mktemp("models") / "tiny-qwen25-vl")


def _image_tokens(image: Image.Image) -> int:
    height, width = smart_resize(
        image.height, image.width, min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS
    )
    return (height // 28) * (width // 28)  # 14-pixel patches merged 2x2


def test_generates_for_a_two_image_request_loaded_by_path(tiny_qwen: Path) -> None:
    settings = load_settings(mllm_backend="transformers", mllm_model_path=tiny_qwen, device="cpu")
    backend = make_backend(settings=settings)
    assert isinstance(backend, TransformersBackend)
    assert backend.model == "tiny-qwen25-vl"

    before, after = Image.new("RGB", (80, 60), "red"), Image.new("RGB", (150, 100), "blue")
    two_images = MLLMRequest(
        (system("You compare images."), user("Before:", before, "After:", after, "What changed?")),
        max_tokens=6,
    )
    text_only = MLLMRequest((user("Say hi."),), max_tokens=3, temperature=0.7)
    broken = MLLMRequest((user("Look:", Image.new("RGB", (1, 300))),), max_tokens=3)  # aspect ratio 300
    responses = backend.generate([two_images, text_only, broken])

    first, second, third = responses
    assert first.ok and second.ok, (first.error, second.error)
    assert isinstance(first.text, str) and first.model == "tiny-qwen25-vl"
    assert 1 <= first.completion_tokens <= 6 and 1 <= second.completion_tokens <= 3
    assert first.finish_reason in ("stop", "length")

    # prompt tokens = the rendered chat text, with each image placeholder expanded to its visual tokens
    processor = backend.processor
    messages, images = to_hf_messages(two_images)
    assert images == [before, after]
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.count("<|image_pad|>") == 2
    text_tokens = len(processor.tokenizer(rendered)["input_ids"])
    expected = text_tokens - 2 + _image_tokens(before) + _image_tokens(after)
    assert first.prompt_tokens == expected

    assert not third.ok and "aspect ratio" in third.error
    stats = backend.stats
    assert (stats.calls, stats.failures) == (3, 1)
    assert stats.prompt_tokens == first.prompt_tokens + second.prompt_tokens
    assert stats.completion_tokens == first.completion_tokens + second.completion_tokens
    backend.close()


def test_greedy_generation_is_deterministic(tiny_qwen: Path) -> None:
    backend = TransformersBackend(tiny_qwen, device="cpu")
    request = MLLMRequest((user("Describe", Image.new("RGB", (64, 64), "green")),), max_tokens=5)
    first, second = backend.generate([request, request])
    assert first.ok and first.text == second.text and first.completion_tokens == second.completion_tokens


def test_a_built_prompt_runs_through_the_chat_template(tiny_qwen: Path) -> None:
    backend = TransformersBackend(tiny_qwen, device="cpu")
    image = Image.new("RGB", (640, 480), "gray")
    prompt = conflict_prompt(image, [("add a hat", image), ("make the hat red", image)], max_tokens=4)
    (response,) = backend.generate([prompt.request])
    assert response.ok, response.error
    rendered = backend.processor.apply_chat_template(
        to_hf_messages(prompt.request)[0], tokenize=False, add_generation_prompt=True
    )
    assert rendered.count("<|image_pad|>") == 3
    assert rendered.index("<|im_start|>system") < rendered.index('Turn 2: "make the hat red"')


def test_configuration_errors_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MCIE_MLLM_MODEL_PATH"):
        make_backend("transformers", load_settings())
    with pytest.raises(ConfigError, match="MCIE_MLLM_MODEL_PATH: expected a local model folder"):
        make_backend("transformers", load_settings(mllm_model_path=tmp_path))


# --- smart_resize against the reference (here because this file imports transformers anyway) -----------


def _sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    fixed = [(1, 1), (27, 29), (56, 56), (480, 640), (1080, 1920), (4000, 6000), (100, 10000), (7000, 50)]
    return fixed + [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(n)]


@pytest.mark.parametrize(
    ("min_pixels", "max_pixels"),
    [
        (PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS),
        (4 * 28 * 28, HUB_MAX_PIXELS),
        (256 * 28 * 28, 512 * 28 * 28),
    ],
)
def test_smart_resize_matches_transformers(min_pixels: int, max_pixels: int) -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    for height, width in _sizes(300):
        if max(height, width) / min(height, width) > 200:
            continue
        ours = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        assert ours == reference(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)


def test_smart_resize_is_what_the_qwen_processor_does() -> None:
    from transformers import Qwen2VLImageProcessor

    processor = Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 200 * 28 * 28})
    for width, height in [(640, 480), (333, 777), (1920, 1080), (50, 90)]:
        grid = processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"]
        _, grid_h, grid_w = grid[0].tolist()
        assert (grid_h * 14, grid_w * 14) == smart_resize(height, width, max_pixels=200 * 28 * 28)
