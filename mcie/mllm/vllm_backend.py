"""In-process offline batch inference with vLLM (``vllm.LLM.chat``), for GPU hosts without a server.

vLLM is an optional GPU extra (``pip install 'mcie[vllm]'``) and is imported only when this backend is built.
Requests become OpenAI-style chat messages (images as base64 data URLs, several per message) and a whole
batch goes to ``LLM.chat`` at once, so vLLM's scheduler batches them; each request gets its own
``SamplingParams`` (max tokens, temperature, and the JSON schema as structured output:
``StructuredOutputsParams`` in current vLLM, ``GuidedDecodingParams`` in older releases). If vLLM rejects the
batch (for example one prompt is too long), the requests are run one by one so only the bad one fails.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mcie.mllm.base import Backend, MLLMRequest, MLLMResponse
from mcie.mllm.openai_backend import to_openai_messages

if TYPE_CHECKING:
    from mcie.config import Settings

VLLM_MISSING = (
    "the vllm backend needs the vllm package, which is not installed: install mcie[vllm] on a GPU host "
    "(pip install 'mcie[vllm]'), or run `vllm serve` there and use MCIE_MLLM_BACKEND=openai with "
    "MCIE_MLLM_BASE_URL pointing at it"
)

SamplingFactory = Callable[[MLLMRequest], Any]


def import_vllm() -> Any:
    """The vllm module, or an ImportError that says how to get it."""
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise ImportError(VLLM_MISSING) from exc


def to_vllm_conversation(request: MLLMRequest) -> list[dict[str, Any]]:
    """The request as one conversation for ``LLM.chat`` (the OpenAI chat format vLLM parses)."""
    return to_openai_messages(request)


def sampling_factory(vllm: Any) -> SamplingFactory:
    """A function building ``vllm.SamplingParams`` for a request, with its JSON schema as structured output
    through whichever API this vLLM version has."""
    sampling_params = vllm.SamplingParams
    sampling_module = importlib.import_module("vllm.sampling_params")
    structured = getattr(sampling_module, "StructuredOutputsParams", None)
    guided = getattr(sampling_module, "GuidedDecodingParams", None)

    def build(request: MLLMRequest) -> Any:
        kwargs: dict[str, Any] = {"max_tokens": request.max_tokens, "temperature": request.temperature}
        if request.json_schema is not None:
            if structured is not None:
                kwargs["structured_outputs"] = structured(json=request.json_schema)
            elif guided is not None:
                kwargs["guided_decoding"] = guided(json=request.json_schema)
        return sampling_params(**kwargs)

    return build


class VLLMBackend(Backend):
    """Batches of requests answered by an in-process ``vllm.LLM`` engine."""

    kind: ClassVar[str] = "vllm"

    def __init__(self, engine: Any, model: str, sampling: SamplingFactory) -> None:
        """Wrap a built engine (see :meth:`load`); ``sampling`` makes the SamplingParams of a request."""
        super().__init__(model)
        self.engine = engine
        self.sampling = sampling

    @classmethod
    def load(
        cls,
        model: str | Path,
        *,
        model_name: str | None = None,
        max_images_per_prompt: int = 8,
        tensor_parallel_size: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        **engine_kwargs: Any,
    ) -> VLLMBackend:
        """Start a vLLM engine on ``model`` (a local folder, or a hub id on hosts that may download).

        ``tensor_parallel_size`` defaults to every visible GPU; ``mm_processor_kwargs`` can set the Qwen
        processor's ``min_pixels``/``max_pixels``.
        """
        vllm = import_vllm()
        if tensor_parallel_size is None:
            import torch

            tensor_parallel_size = max(1, torch.cuda.device_count())
        options: dict[str, Any] = {
            "limit_mm_per_prompt": {"image": max_images_per_prompt},
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "seed": seed,
            **engine_kwargs,
        }
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        if mm_processor_kwargs:
            options["mm_processor_kwargs"] = mm_processor_kwargs
        engine = vllm.LLM(model=str(model), **options)
        return cls(engine, model_name or Path(str(model)).name, sampling_factory(vllm))

    @classmethod
    def from_settings(cls, settings: Settings) -> VLLMBackend:
        from mcie.hub import resolve_folder

        import_vllm()  # say how to install vLLM before fetching any weights for it
        # a Hub id (MCIE_MLLM_MODEL_PATH, else MCIE_MLLM_MODEL) goes through the HF cache; vLLM gets the local folder
        value, setting = (settings.mllm_model_path, "MCIE_MLLM_MODEL_PATH") if settings.mllm_model_path else \
            (settings.mllm_model, "MCIE_MLLM_MODEL")
        folder = resolve_folder(value, setting)
        return cls.load(str(folder), model_name=Path(value).name if Path(value).exists() else value.split("@", 1)[0])

    def _generate(self, requests: list[MLLMRequest]) -> list[MLLMResponse]:
        start = time.perf_counter()
        try:
            outputs = self._chat(requests)
        except Exception as exc:
            if len(requests) == 1:
                error = f"{type(exc).__name__}: {exc}"
                return [MLLMResponse.failure(error, model=self.model, latency_s=time.perf_counter() - start)]
            return [self._generate_one(request) for request in requests]  # isolate the bad request
        elapsed = time.perf_counter() - start
        return [self._response(output, elapsed) for output in outputs]

    def _generate_one(self, request: MLLMRequest) -> MLLMResponse:
        start = time.perf_counter()
        try:
            (output,) = self._chat([request])
        except Exception as exc:
            return MLLMResponse.failure(
                f"{type(exc).__name__}: {exc}", model=self.model, latency_s=time.perf_counter() - start
            )
        return self._response(output, time.perf_counter() - start)

    def _chat(self, requests: list[MLLMRequest]) -> list[Any]:
        conversations = [to_vllm_conversation(request) for request in requests]
        params = [self.sampling(request) for request in requests]
        outputs = list(self.engine.chat(conversations, params, use_tqdm=False))
        if len(outputs) != len(requests):
            raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(requests)} requests")
        return outputs

    def _response(self, output: Any, latency_s: float) -> MLLMResponse:
        """An MLLMResponse from a ``vllm.RequestOutput``; latency is that of the whole batch."""
        completions = getattr(output, "outputs", None) or []
        if not completions:
            return MLLMResponse.failure("vllm returned no completion", model=self.model, latency_s=latency_s)
        completion = completions[0]
        prompt_ids = getattr(output, "prompt_token_ids", None)
        return MLLMResponse(
            text=completion.text,
            latency_s=latency_s,
            prompt_tokens=len(prompt_ids) if prompt_ids is not None else None,
            completion_tokens=len(completion.token_ids),
            model=self.model,
            finish_reason=getattr(completion, "finish_reason", None),
        )

    def close(self) -> None:
        """Drop the engine so its GPU memory can be released."""
        self.engine = None
