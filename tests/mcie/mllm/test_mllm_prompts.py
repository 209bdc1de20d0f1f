"""Tests of the prompt builders (structure, image frames, schemas, examples) and of cache keys; one grounding
round trip through the local chat server checks that boxes come back to the original image's pixels."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from mcie.mllm.base import ImagePart, MLLMRequest
from mcie.mllm.openai_backend import OpenAIBackend, RetryPolicy
from mcie.mllm.parsing import (
    ConflictVerdict,
    Decomposition,
    GroundingAnswer,
    JudgeScores,
    extract_json,
    parse_conflict,
    parse_decomposition,
    parse_grounding,
    parse_judge,
)
from mcie.mllm.prompts import (
    CONFLICT_EXAMPLE,
    CONFLICT_MAX_PIXELS,
    CONFLICT_SCHEMA,
    DECOMPOSE_EXAMPLE,
    DECOMPOSE_MAX_PIXELS,
    DECOMPOSE_SCHEMA,
    GROUNDING_EXAMPLE,
    GROUNDING_MAX_PIXELS,
    JUDGE_EXAMPLE,
    JUDGE_SCHEMA,
    PROMPT_VERSION,
    cache_key,
    conflict_prompt,
    decompose_prompt,
    grounding_prompt,
    grounding_schema,
    judge_prompt,
)
from mcie.mllm.qwen import qwen_frame
from tests.mcie.mllm.chat_server import RecordedRequest, chat_server


def _scene(size: tuple[int, int], square: tuple[int, int, int, int] | None = None) -> Image.Image:
    image = Image.new("RGB", size, (240, 240, 240))
    if square is not None:
        image.paste((220, 20, 20), square)
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _texts(request: MLLMRequest) -> str:
    return "\n".join(p for m in request.messages for p in m.parts if isinstance(p, str))


# --- builders -----------------------------------------------------------------------------------------------


def test_conflict_prompt_shows_every_image_and_turn_in_order() -> None:
    source = _scene((2000, 1500))
    turns = [("add a hat", _scene((2000, 1500))), ("  make the   hat red ", _png(_scene((300, 200))))]
    prompt = conflict_prompt(source, turns)
    assert (prompt.task, prompt.version, prompt.n_turns) == ("conflict", PROMPT_VERSION["conflict"], 2)
    request = prompt.request
    assert request.messages[0].role == "system" and "conflict" in request.messages[0].text
    assert request.json_schema == CONFLICT_SCHEMA
    images = request.images
    assert len(images) == 3
    for image in images:
        width, height = image.size
        assert width % 28 == 0 and height % 28 == 0 and width * height <= CONFLICT_MAX_PIXELS
    text = _texts(request)
    assert text.index('Turn 1: "add a hat"') < text.index('Turn 2: "make the hat red"')
    assert "merging these 2 turns" in text
    kinds = ["image" if isinstance(p, ImagePart) else "text" for p in request.messages[1].parts]
    assert kinds == ["text", "image", "text", "image", "text", "image", "text"]  # example + header first


def test_conflict_prompt_rejects_bad_input() -> None:
    image = _scene((64, 64))
    with pytest.raises(ValueError, match="at least 2"):
        conflict_prompt(image, [("add a hat", image)])
    with pytest.raises(ValueError, match="turn 2 instruction: expected non-empty text"):
        conflict_prompt(image, [("add a hat", image), ("  ", image)])
    with pytest.raises(ValueError, match="expected PNG, JPEG or WebP"):
        conflict_prompt(image, [("a", image), ("b", b"not an image")])


def test_grounding_prompt_uses_the_before_frame_for_both_images() -> None:
    before, after = _scene((1920, 1080)), _scene((1000, 600))
    prompt = grounding_prompt(before, after, "remove the cup", k=4)
    frame = qwen_frame((1920, 1080), max_pixels=GROUNDING_MAX_PIXELS)
    assert prompt.frame == frame and prompt.image_size == (1920, 1080)
    assert [image.size for image in prompt.request.images] == [frame, frame]
    text = _texts(prompt.request)
    assert f"Both images are {frame[0]}x{frame[1]} pixels" in text and "Give 4 candidate boxes" in text
    assert prompt.request.json_schema == grounding_schema(4)
    assert prompt.to_original((0, 0, frame[0], frame[1])) == (0.0, 0.0, 1920.0, 1080.0)
    with pytest.raises(ValueError, match="k: expected 1 to 10"):
        grounding_prompt(before, after, "remove the cup", k=0)


def test_images_already_at_their_frame_are_sent_as_given() -> None:
    data = _png(_scene((644, 476)))  # a Qwen frame already
    prompt = grounding_prompt(data, data, "remove the cup")
    assert prompt.frame == (644, 476)
    assert all(image.encoded()[0] is data for image in prompt.request.images)


def test_decompose_and_judge_prompts() -> None:
    image = _scene((800, 600))
    prompt = decompose_prompt(image, "remove the car and add two birds")
    assert prompt.frame == qwen_frame((800, 600), max_pixels=DECOMPOSE_MAX_PIXELS)
    assert prompt.request.json_schema == DECOMPOSE_SCHEMA and len(prompt.request.images) == 1
    assert '"remove the car and add two birds"' in _texts(prompt.request)
    judged = judge_prompt(image, _scene((400, 400)), "add a hat")
    assert judged.request.json_schema == JUDGE_SCHEMA
    sizes = [i.size for i in judged.request.images]
    assert sizes[0] == sizes[1]  # the edited image is shown at the source's frame
    with pytest.raises(ValueError, match="no boxes to map"):
        judged.to_original((0, 0, 1, 1))
    with pytest.raises(ValueError, match="instruction: expected non-empty text"):
        judge_prompt(image, image, "")


@pytest.mark.parametrize(
    ("example", "schema", "parse"),
    [
        (GROUNDING_EXAMPLE, grounding_schema(3), lambda t: parse_grounding(t, 640, 480, k=3)),
        (DECOMPOSE_EXAMPLE, DECOMPOSE_SCHEMA, lambda t: parse_decomposition(t, 800, 600)),
        (JUDGE_EXAMPLE, JUDGE_SCHEMA, parse_judge),
    ],
)
def test_in_context_examples_follow_the_schema_and_parse_cleanly(
    example: str, schema: dict[str, Any], parse: Callable[[str], Any]
) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    found = extract_json(example)
    assert not hasattr(found, "reason"), found
    jsonschema.validate(found.value, schema)
    result = parse(example)
    assert isinstance(result, GroundingAnswer | Decomposition | JudgeScores)
    assert not [n for n in result.notes if "text around" not in n]


def test_conflict_examples_follow_the_schema_and_parse_cleanly() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    answers = re.findall(r"Answer: (\{.*\})", CONFLICT_EXAMPLE)
    assert len(answers) == 2
    for answer in answers:
        jsonschema.validate(json.loads(answer), CONFLICT_SCHEMA)
        verdict = parse_conflict(answer, n_turns=3)
        assert isinstance(verdict, ConflictVerdict) and verdict.notes == ()


# --- cache keys ---------------------------------------------------------------------------------------------


def test_cache_key_changes_with_each_input_and_only_then() -> None:
    red, red2, blue = _scene((8, 8), (0, 0, 4, 4)), _scene((8, 8), (0, 0, 4, 4)), _scene((8, 8))
    key = cache_key("qwen", "conflict-v1", "add a hat", red)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert key == cache_key("qwen", "conflict-v1", "add a hat", red2)
    assert key == cache_key("qwen", "conflict-v1", "add a hat", ImagePart(red))
    for other in (
        cache_key("qwen-7b", "conflict-v1", "add a hat", red),
        cache_key("qwen", "conflict-v2", "add a hat", red),
        cache_key("qwen", "conflict-v1", "add a cap", red),
        cache_key("qwen", "conflict-v1", "add a hat", blue),
        cache_key("qwen", "conflict-v1", red, "add a hat"),
    ):
        assert other != key
    # boundaries and types are part of the key
    assert cache_key("m", "v", "ab") != cache_key("m", "v", "a", "b") != cache_key("m", "v", ["a", "b"])
    assert cache_key("m", "v", 1) != cache_key("m", "v", "1") != cache_key("m", "v", True)
    assert cache_key("m", "v", b"\x89PNG") == cache_key("m", "v", bytearray(b"\x89PNG"))
    with pytest.raises(TypeError, match="cannot hash a dict"):
        cache_key("m", "v", {"a": 1})  # type: ignore[arg-type]


def test_prompt_cache_key_covers_what_is_sent() -> None:
    image = _scene((100, 80), (10, 10, 30, 30))
    key = grounding_prompt(image, image, "remove the square").cache_key("qwen")
    assert key == grounding_prompt(image.copy(), image.copy(), "remove the square").cache_key("qwen")
    assert key != grounding_prompt(image, image, "remove the circle").cache_key("qwen")
    assert key != grounding_prompt(image, image, "remove the square", k=2).cache_key("qwen")
    assert key != grounding_prompt(image, _scene((100, 80)), "remove the square").cache_key("qwen")
    assert key != grounding_prompt(image, image, "remove the square").cache_key("other-model")


# --- round trip ---------------------------------------------------------------------------------------------


def _find_square(request: RecordedRequest) -> str:
    """A stand-in grounding model: boxes the red square of the 'after' image it received, Qwen style."""
    after = request.images()[1].convert("RGB")
    xs, ys = [], []
    for y in range(after.height):
        for x in range(after.width):
            r, g, _ = after.getpixel((x, y))
            if r > 150 and g < 100:
                xs.append(x)
                ys.append(y)
    box = [min(xs), min(ys), max(xs) + 1, max(ys) + 1]
    answer = [{"bbox_2d": box, "label": "red square"}, {"bbox_2d": [0, 0, 5, 5]}]
    return "```json\n" + json.dumps(answer) + "\n```"


def test_grounding_round_trip_maps_boxes_back_to_the_original_image() -> None:
    truth = (1200, 500, 1500, 800)
    before, after = _scene((1920, 1080)), _scene((1920, 1080), truth)
    prompt = grounding_prompt(before, after, "add a red square", k=2)
    with chat_server(_find_square) as server:
        backend = OpenAIBackend(server.base_url, "m", retry=RetryPolicy(max_retries=0))
        (response,) = backend.generate([prompt.request])
    assert response.ok, response.error
    assert server.requests[0].images()[0].size == prompt.frame
    answer = parse_grounding(response.text, *prompt.frame, k=2)
    assert isinstance(answer, GroundingAnswer) and answer.boxes[0].label == "red square"
    assert prompt.to_original(answer.boxes[0]) == pytest.approx(truth, abs=3)
