"""Inference-time instruction decomposition (paper 3.2, Eq. 2): a complex instruction on an image becomes a list of
(sub-instruction, operation, box) triples, through the configured MLLM with an in-context prompt.

The MCIE-E1 model (``model/``) calls :func:`decompose` when it is given a complex instruction without boxes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image


class DecompositionError(RuntimeError):
    """The MLLM could not be asked, or its answer could not be read; the message says which."""


@dataclass(frozen=True)
class SubEdit:
    instruction: str
    operation: str  # add | remove | change
    box: tuple[float, float, float, float] | None  # normalized x0, y0, x1, y1


@dataclass(frozen=True)
class DecompositionResult:
    instruction: str
    edits: tuple[SubEdit, ...]
    model: str
    prompt_version: str
    raw: str
    notes: tuple[str, ...]
    latency_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decompose(image: Image.Image, instruction: str, backend: Any) -> DecompositionResult:
    """Split ``instruction`` on ``image`` into sub-edits with normalized boxes (None where the MLLM gave none)."""
    from mcie.geometry import Box
    from mcie.mllm.parsing import ParseFailure, parse_decomposition
    from mcie.mllm.prompts import decompose_prompt

    prompt = decompose_prompt(image, instruction)
    response = backend.generate_one(prompt.request)
    if not response.ok:
        raise DecompositionError(f"the MLLM request failed: {response.error}")
    assert prompt.frame is not None and prompt.image_size is not None
    answer = parse_decomposition(response.text, *prompt.frame)
    if isinstance(answer, ParseFailure):
        raise DecompositionError(f"the MLLM's answer could not be parsed ({answer.reason}): {response.text!r}")
    width, height = prompt.image_size
    edits = []
    for edit in answer.edits:
        box = None
        if edit.box is not None:
            x0, y0, x1, y1 = prompt.to_original(edit.box)
            try:
                box = Box.from_pixels(x0, y0, x1, y1, width, height, clip=True).as_tuple()
            except ValueError:
                box = None
        edits.append(SubEdit(edit.instruction, edit.operation, box))
    return DecompositionResult(instruction, tuple(edits), backend.model, prompt.version, response.text,
                               tuple(answer.notes), response.latency_s * 1000)
