"""The four MLLM prompts of the pipeline and of MCIE-E1, their answer schemas, versions and cache keys.

Every prompt has the three parts of the paper's in-context prompts (sections 3.1 and 3.2): a guideline (the
assistant's role, the rules and the answer format), an in-context example, and the test instance (images and
instructions). Tasks:

- ``conflict``: would merging the turns of a multi-turn edit into one complex instruction conflict
  (e.g. the same object edited twice)? Sees the source image, every intermediate image and each instruction.
- ``grounding``: k candidate boxes of the region one turn edited (image before, image after, instruction).
- ``decompose``: split a complex instruction on an image into (sub-instruction, add/remove/change, box).
- ``judge``: Instruction Compliance 1-10 and Background Consistency 1-5 of an edit (paper section 4.1).

Images are resized on the client to the Qwen2.5-VL processor size (:func:`mcie.mllm.qwen.smart_resize`)
with a per-task pixel budget, so the server leaves them as they are and the boxes of an answer are in a known
pixel frame (``Prompt.frame``); ``Prompt.to_original`` maps them back. The budgets must not exceed the
server's ``max_pixels`` (Qwen2.5-VL's default is far larger). Bump a task's ``PROMPT_VERSION`` whenever its
text, schema or image budget changes: the version is part of every cache key. Text parts are written so
that they read well when a chat template concatenates them around the image placeholders.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from PIL import Image

from mcie.mllm.base import ImageLike, ImagePart, MLLMRequest, as_part, system, user
from mcie.mllm.parsing import PixelBox
from mcie.mllm.qwen import PROCESSOR_MIN_PIXELS, Box4, box_to_original, qwen_frame, resize_for_qwen

Task = Literal["conflict", "grounding", "decompose", "judge"]
TASKS: tuple[Task, ...] = ("conflict", "grounding", "decompose", "judge")

PROMPT_VERSION: MappingProxyType[str, str] = MappingProxyType(
    {
        "conflict": "conflict-v1",
        "grounding": "grounding-v1",
        "decompose": "decompose-v1",
        "judge": "judge-v1",
    }
)

# Pixel budget per image (Qwen2.5-VL spends one visual token per 28x28 pixels).
CONFLICT_MAX_PIXELS = 512 * 28 * 28  # up to 5 images per prompt
GROUNDING_MAX_PIXELS = 1280 * 28 * 28  # boxes need detail
DECOMPOSE_MAX_PIXELS = 1280 * 28 * 28
JUDGE_MAX_PIXELS = 1024 * 28 * 28


@dataclass(frozen=True)
class Prompt:
    """A built prompt: the request to send and what is needed to read its answer."""

    task: Task
    version: str
    request: MLLMRequest
    frame: tuple[int, int] | None = None  # (width, height) of the pixel space the answer's boxes use
    image_size: tuple[int, int] | None = None  # (width, height) of the original image the boxes map to
    n_turns: int | None = None  # conflict: how many turns the answer may refer to

    def to_original(self, box: PixelBox | Box4) -> Box4:
        """A box of the answer (in ``frame``) as pixels of the original image."""
        if self.frame is None or self.image_size is None:
            raise ValueError(f"{self.task} prompt: its answers have no boxes to map")
        coords = box.as_tuple() if isinstance(box, PixelBox) else box
        return box_to_original(coords, self.frame, self.image_size)

    def cache_key(self, model: str) -> str:
        """A key over the model, the version and everything sent (texts, image pixels, schema, limits)."""
        request = self.request
        texts = [p for m in request.messages for p in m.parts if isinstance(p, str)]
        schema = json.dumps(request.json_schema, sort_keys=True) if request.json_schema else ""
        limits = (request.max_tokens, request.temperature, schema)
        return cache_key(model, self.version, texts, list(request.images), limits)


# ---------------------------------------------------------------------------------------------------------
# cache keys

CacheInput = str | bytes | int | float | bool | None | Image.Image | ImagePart | Sequence[Any]


def cache_key(model: str, prompt_version: str, *inputs: CacheInput) -> str:
    """sha256 (hex) over the model, the prompt version and the inputs, so repeated calls can be skipped.

    Inputs are texts (instructions, or precomputed image hashes such as blob digests), encoded image bytes
    (hashed as given), PIL images or :class:`ImagePart` (content hashes), numbers, None, and nested lists.
    Every value is tagged with its type and length, so different inputs cannot produce the same stream.
    """
    digest = hashlib.sha256()
    _feed(digest, "model", model)
    _feed(digest, "version", prompt_version)
    for value in inputs:
        _feed(digest, "input", value)
    return digest.hexdigest()


def _feed(digest: Any, tag: str, value: Any) -> None:
    if isinstance(value, str):
        data = value.encode("utf-8")
        digest.update(f"{tag}:str:{len(data)}:".encode())
        digest.update(data)
    elif isinstance(value, bytes | bytearray | memoryview):
        digest.update(f"{tag}:bytes:{hashlib.sha256(bytes(value)).hexdigest()}".encode())
    elif isinstance(value, Image.Image | ImagePart):
        part = value if isinstance(value, ImagePart) else ImagePart(value)
        digest.update(f"{tag}:image:{part.content_hash()}".encode())
    elif value is None or isinstance(value, bool | int | float):
        digest.update(f"{tag}:{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, list | tuple):
        digest.update(f"{tag}:list:{len(value)}[".encode())
        for item in value:
            _feed(digest, "item", item)
        digest.update(b"]")
    else:
        raise TypeError(
            f"cache_key: cannot hash a {type(value).__name__}; expected text, bytes, images, numbers, lists"
        )


# ---------------------------------------------------------------------------------------------------------
# helpers


def _fit(
    image: ImageLike, max_pixels: int, size: tuple[int, int] | None = None
) -> tuple[ImagePart, tuple[int, int]]:
    """(the image at its Qwen frame for ``max_pixels`` or at ``size``, its original (width, height)).
    An image that already has that size is sent as given."""
    part = as_part(image)
    if not isinstance(part, ImagePart):
        raise TypeError(f"expected an image (PIL image or encoded bytes), got {type(image).__name__}")
    original = part.size
    target = size or qwen_frame(original, PROCESSOR_MIN_PIXELS, max_pixels)
    if original == target:
        return part, original
    return ImagePart(resize_for_qwen(part.to_pil(), size=target)), original


def _text(value: str, task: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{task} prompt: {name}: expected non-empty text, got {value!r}")
    return " ".join(value.split())


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _box_schema() -> dict[str, Any]:
    return {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4}


# ---------------------------------------------------------------------------------------------------------
# conflict (paper 3.1, data filtering)

CONFLICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reason": {"type": "string"},
        "conflict": {"type": "boolean"},
        "turns": {"type": "array", "items": {"type": "integer", "minimum": 1}},
    },
    "required": ["reason", "conflict", "turns"],
    "additionalProperties": False,
}

CONFLICT_GUIDELINE = """\
You review image-editing data. In a multi-turn edit, each turn applies one instruction to the result of the \
previous turn. We want to merge all turns into ONE complex instruction that is applied to the original image \
in a single step. Decide whether this merge introduces a conflict.

There is a conflict when:
1. The same object or region is edited in more than one turn (for example, turn 1 adds a hat and turn 3 \
changes the color of that hat; or turn 2 paints a car red and turn 4 removes the car).
2. A turn refers to something that only exists because of an earlier turn, so it cannot be understood on the \
original image (for example, "make the dog you added bigger").
3. Turns contradict or undo each other (for example, add a lamp, then remove the lamp).

There is no conflict when every turn edits a different object or region and each instruction can be \
carried out on the original image alone. Look at the images to see which object each turn really changed.

Answer with one JSON object and nothing else:
{"reason": "<one sentence>", "conflict": true or false, "turns": [<numbers of the turns involved, empty \
when there is no conflict>]}"""

CONFLICT_EXAMPLE = """\
Example (images omitted).
Turn 1: "add a red balloon in the girl's hand"
Turn 2: "change the sky to a sunset"
Turn 3: "make the balloon blue"
Answer: {"reason": "Turn 3 recolors the balloon that turn 1 added.", "conflict": true, "turns": [1, 3]}

Turn 1: "remove the bicycle"
Turn 2: "add snow on the roof"
Answer: {"reason": "The turns edit different objects.", "conflict": false, "turns": []}"""


def conflict_prompt(
    source: ImageLike,
    turns: Sequence[tuple[str, ImageLike]],
    *,
    max_pixels: int = CONFLICT_MAX_PIXELS,
    max_tokens: int = 512,
) -> Prompt:
    """The conflict check of a multi-turn edit: the source image, then (instruction, image after) per turn."""
    if len(turns) < 2:
        raise ValueError(
            f"conflict prompt: turns: expected at least 2 (instruction, image) pairs, got {len(turns)}"
        )
    source_part, _ = _fit(source, max_pixels)
    parts: list[str | ImagePart] = [
        CONFLICT_EXAMPLE + "\n\nNow the test instance.\nImage 1 is the original image:",
        source_part,
    ]
    for number, (instruction, image) in enumerate(turns, start=1):
        text = _text(instruction, "conflict", f"turn {number} instruction")
        parts.append(f'\nTurn {number}: "{text}"\nImage {number + 1} is the result after turn {number}:')
        parts.append(_fit(image, max_pixels)[0])
    parts.append(
        f"\nDoes merging these {len(turns)} turns into one instruction introduce a conflict? "
        "Answer with the JSON object only."
    )
    request = MLLMRequest(
        (system(CONFLICT_GUIDELINE), user(*parts)),
        max_tokens=max_tokens,
        json_schema=CONFLICT_SCHEMA,
        schema_name="conflict",
    )
    return Prompt("conflict", PROMPT_VERSION["conflict"], request, n_turns=len(turns))


# ---------------------------------------------------------------------------------------------------------
# grounding (paper 3.1, spatial information generation)


def grounding_schema(k: int) -> dict[str, Any]:
    box = {
        "type": "object",
        "properties": {"bbox_2d": _box_schema(), "label": {"type": "string"}},
        "required": ["bbox_2d", "label"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"boxes": {"type": "array", "items": box, "minItems": 1, "maxItems": k}},
        "required": ["boxes"],
        "additionalProperties": False,
    }


GROUNDING_GUIDELINE = """\
You are a precise visual grounding assistant. You see an image before an edit, the same image after the \
edit, and the edit instruction. Find the region of the image that the edit changed and give candidate \
bounding boxes for it, best first.

Rules:
- Coordinates are absolute pixels of the images as shown: [x1, y1, x2, y2] with (x1, y1) the top-left and \
(x2, y2) the bottom-right corner. Both images have the same size.
- For an added object, box where it appears in the after image. For a removed object, box where it was in \
the before image. For a changed object, box that object.
- Boxes should be tight around the edited region. Make the candidates differ (for example a tight box, a \
slightly larger box, or another plausible object) rather than repeat one box.

Answer with one JSON object and nothing else:
{"boxes": [{"bbox_2d": [x1, y1, x2, y2], "label": "<what is in the box>"}, ...]}"""

GROUNDING_EXAMPLE = """\
Example (images omitted). Images are 640x480. Instruction: "remove the cup on the table". Answer with 3 \
candidates:
{"boxes": [{"bbox_2d": [412, 300, 478, 372], "label": "cup"}, {"bbox_2d": [402, 290, 490, 384], "label": \
"cup and its shadow"}, {"bbox_2d": [380, 280, 520, 400], "label": "cup on the table"}]}"""


def grounding_prompt(
    before: ImageLike,
    after: ImageLike,
    instruction: str,
    *,
    k: int = 3,
    max_pixels: int = GROUNDING_MAX_PIXELS,
    max_tokens: int = 512,
) -> Prompt:
    """k candidate boxes for one turn. Both images are sent at the before image's Qwen frame (an after
    image of another size is resized to it), so boxes are in ``Prompt.frame`` of the before image."""
    if not 1 <= k <= 10:
        raise ValueError(f"grounding prompt: k: expected 1 to 10 candidate boxes, got {k}")
    text = _text(instruction, "grounding", "instruction")
    before_part, original = _fit(before, max_pixels)
    frame = before_part.size
    after_part, _ = _fit(after, max_pixels, size=frame)
    width, height = frame
    parts: list[str | ImagePart] = [
        GROUNDING_EXAMPLE
        + f"\n\nNow the test instance. Both images are {width}x{height} pixels.\nImage before the edit:",
        before_part,
        "\nImage after the edit:",
        after_part,
        f'\nInstruction: "{text}"\nGive {k} candidate boxes of the edited region. '
        "Answer with the JSON object only.",
    ]
    request = MLLMRequest(
        (system(GROUNDING_GUIDELINE), user(*parts)),
        max_tokens=max_tokens,
        json_schema=grounding_schema(k),
        schema_name="grounding",
    )
    return Prompt("grounding", PROMPT_VERSION["grounding"], request, frame=frame, image_size=original)


# ---------------------------------------------------------------------------------------------------------
# decomposition (paper 3.2, instruction decomposition for MCIE-E1)

DECOMPOSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "edits": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "instruction": {"type": "string"},
                    "operation": {"type": "string", "enum": ["add", "remove", "change"]},
                    "bbox_2d": _box_schema(),
                },
                "required": ["instruction", "operation", "bbox_2d"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["edits"],
    "additionalProperties": False,
}

DECOMPOSE_GUIDELINE = """\
You help an image-editing model that carries out one simple edit per region. Split a complex editing \
instruction about the image into simple sub-instructions, and give the region each one edits.

Rules:
- Each sub-instruction is one operation on one object: "add" (put a new object in the image), "remove" \
(take an existing object away) or "change" (alter an existing object: color, material, shape, style, or \
replace it with something else).
- Split quantities into single objects: "add three apples on the table" becomes three sub-instructions \
"add an apple on the table", each with its own box at a different place.
- Keep the order of the original instruction and keep each sub-instruction short and self-contained.
- Boxes are absolute pixels of the image as shown, [x1, y1, x2, y2] with (x1, y1) the top-left and (x2, y2) \
the bottom-right corner. For "add", box where the new object should appear, with a plausible size; for \
"remove" and "change", box the existing object.

Answer with one JSON object and nothing else:
{"edits": [{"instruction": "...", "operation": "add" | "remove" | "change", "bbox_2d": [x1, y1, x2, y2]}]}"""

DECOMPOSE_EXAMPLE = """\
Example (image omitted). The image is 800x600. Instruction: "Remove the car on the left, paint the red door \
blue and add two birds in the sky."
{"edits": [{"instruction": "remove the car on the left", "operation": "remove", "bbox_2d": [20, 330, 290, \
520]}, {"instruction": "paint the red door blue", "operation": "change", "bbox_2d": [480, 300, 560, 470]}, \
{"instruction": "add a bird in the sky", "operation": "add", "bbox_2d": [150, 60, 210, 110]}, \
{"instruction": "add a bird in the sky", "operation": "add", "bbox_2d": [330, 90, 390, 140]}]}"""


def decompose_prompt(
    image: ImageLike,
    instruction: str,
    *,
    max_pixels: int = DECOMPOSE_MAX_PIXELS,
    max_tokens: int = 1024,
) -> Prompt:
    """Decomposition of a complex instruction on ``image``; boxes come in ``Prompt.frame``."""
    text = _text(instruction, "decompose", "instruction")
    part, original = _fit(image, max_pixels)
    width, height = part.size
    parts: list[str | ImagePart] = [
        DECOMPOSE_EXAMPLE + f"\n\nNow the test instance. The image is {width}x{height} pixels:",
        part,
        f'\nInstruction: "{text}"\nAnswer with the JSON object only.',
    ]
    request = MLLMRequest(
        (system(DECOMPOSE_GUIDELINE), user(*parts)),
        max_tokens=max_tokens,
        json_schema=DECOMPOSE_SCHEMA,
        schema_name="decomposition",
    )
    return Prompt("decompose", PROMPT_VERSION["decompose"], request, frame=part.size, image_size=original)


# ---------------------------------------------------------------------------------------------------------
# judge (paper 4.1, Instruction Compliance and Background Consistency)

JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reason": {"type": "string"},
        "instruction_compliance": {"type": "integer", "minimum": 1, "maximum": 10},
        "background_consistency": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["reason", "instruction_compliance", "background_consistency"],
    "additionalProperties": False,
}

JUDGE_GUIDELINE = """\
You are a strict evaluator of instruction-based image editing. You see a source image, the edited image and \
the editing instruction, which may contain several sub-instructions. Score the edit on two criteria.

Instruction Compliance (1-10): are the requested modifications carried out as instructed? Check every \
sub-instruction: the right object, the right operation (add, remove, change), the right attribute, count and \
place.
10 = every sub-instruction is done exactly; 7-9 = all done with small flaws; 4-6 = some sub-instructions \
done, others missing or wrong; 2-3 = barely any requested change; 1 = nothing requested was done, or the \
image was changed in unrelated ways only.

Background Consistency (1-5): are the regions the instruction does not mention preserved?
5 = identical apart from the intended edits; 4 = minor changes (slight color or texture shifts); 3 = \
noticeable unintended changes; 2 = large parts changed; 1 = the scene is not recognizable.

Answer with one JSON object and nothing else:
{"reason": "<one or two sentences>", "instruction_compliance": <1-10>, "background_consistency": <1-5>}"""

JUDGE_EXAMPLE = """\
Example (images omitted). Instruction: "add a hat to the man and remove the dog". The edited image shows the \
hat but the dog is still there; the wall color also shifted slightly.
{"reason": "The hat was added but the dog was not removed; the wall is slightly recolored.", \
"instruction_compliance": 5, "background_consistency": 4}"""


def judge_prompt(
    source: ImageLike,
    edited: ImageLike,
    instruction: str,
    *,
    max_pixels: int = JUDGE_MAX_PIXELS,
    max_tokens: int = 512,
) -> Prompt:
    """Instruction Compliance and Background Consistency of ``edited`` against ``source`` and the
    instruction; the edited image is shown at the source's frame."""
    text = _text(instruction, "judge", "instruction")
    source_part, _ = _fit(source, max_pixels)
    edited_part, _ = _fit(edited, max_pixels, size=source_part.size)
    parts: list[str | ImagePart] = [
        JUDGE_EXAMPLE + "\n\nNow the test instance.\nSource image:",
        source_part,
        "\nEdited image:",
        edited_part,
        f'\nInstruction: "{text}"\nAnswer with the JSON object only.',
    ]
    request = MLLMRequest(
        (system(JUDGE_GUIDELINE), user(*parts)),
        max_tokens=max_tokens,
        json_schema=JUDGE_SCHEMA,
        schema_name="judgement",
    )
    return Prompt("judge", PROMPT_VERSION["judge"], request)
