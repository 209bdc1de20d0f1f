"""The MLLM layer: backends (OpenAI-compatible server, vLLM, transformers), the four prompts (conflict, grounding,
decomposition, judge), robust parsers of their answers, and inference-time decomposition (:mod:`.decompose`).

It lives in ``mcie/``, beside the settings it reads, because two stages use it: the pipeline (conflict filter,
grounding) and the model (decomposition at inference, the judge in evaluation); neither reaches into the other.

Typical use::

    backend = make_backend()                       # from MCIE_MLLM_* settings
    prompt = grounding_prompt(before, after, "remove the cup", k=3)
    response = backend.generate([prompt.request])[0]
    answer = parse_grounding(response.text, *prompt.frame, k=3)
    boxes = [prompt.to_original(box) for box in answer.boxes] if answer.ok else []

Backends import their heavy dependencies (httpx clients, torch, vllm) only when built.
"""

from mcie.mllm.base import (
    Backend,
    BackendStats,
    CallableBackend,
    ImagePart,
    Message,
    MLLMRequest,
    MLLMResponse,
    make_backend,
    system,
    user,
)
from mcie.mllm.parsing import (
    ConflictVerdict,
    Decomposition,
    GroundingAnswer,
    JudgeScores,
    ParsedEdit,
    ParseFailure,
    PixelBox,
    extract_json,
    parse_conflict,
    parse_decomposition,
    parse_grounding,
    parse_judge,
)
from mcie.mllm.prompts import (
    PROMPT_VERSION,
    Prompt,
    cache_key,
    conflict_prompt,
    decompose_prompt,
    grounding_prompt,
    judge_prompt,
)
from mcie.mllm.qwen import box_to_original, qwen_frame, smart_resize

__all__ = [
    "PROMPT_VERSION",
    "Backend",
    "BackendStats",
    "CallableBackend",
    "ConflictVerdict",
    "Decomposition",
    "GroundingAnswer",
    "ImagePart",
    "JudgeScores",
    "MLLMRequest",
    "MLLMResponse",
    "Message",
    "ParseFailure",
    "ParsedEdit",
    "PixelBox",
    "Prompt",
    "box_to_original",
    "cache_key",
    "conflict_prompt",
    "decompose_prompt",
    "extract_json",
    "grounding_prompt",
    "judge_prompt",
    "make_backend",
    "parse_conflict",
    "parse_decomposition",
    "parse_grounding",
    "parse_judge",
    "qwen_frame",
    "smart_resize",
    "system",
    "user",
]
