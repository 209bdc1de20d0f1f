"""In-process Hugging Face backend for small MLLMs (Qwen2.5-VL class) on one machine.

Loads a model and its processor from a local folder (``MCIE_MLLM_MODEL_PATH``; nothing is downloaded),
renders each request with the processor's chat template (one image placeholder per image part, in order),
and generates greedily (or by sampling when ``temperature`` > 0). Requests are answered one at a time: this
backend is for development and small runs; use ``vllm serve`` + the openai backend at scale. JSON schemas are
not enforced here (no constrained decoding); the parsers read free-form answers.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mcie.device import resolve_device
from mcie.mllm.base import Backend, MLLMRequest, MLLMResponse

if TYPE_CHECKING:
    from mcie.config import Settings


def to_hf_messages(request: MLLMRequest) -> tuple[list[dict[str, Any]], list[Any]]:
    """(chat-template messages with ``{"type": "image"}`` placeholders, the PIL images in the same order)."""
    messages: list[dict[str, Any]] = []
    images: list[Any] = []
    for message in request.messages:
        content: list[dict[str, Any]] = []
        for part in message.parts:
            if isinstance(part, str):
                content.append({"type": "text", "text": part})
            else:
                content.append({"type": "image"})
                images.append(part.to_pil())
        messages.append({"role": message.role, "content": content})
    return messages, images


class TransformersBackend(Backend):
    """A local ``transformers`` image-text-to-text model answering requests one by one."""

    kind: ClassVar[str] = "transformers"

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        model_name: str | None = None,
    ) -> None:
        from mcie.hub import resolve_folder

        path = resolve_folder(model_path, "MCIE_MLLM_MODEL_PATH")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"MCIE_MLLM_MODEL_PATH: expected a local model folder with config.json, got {str(path)!r}"
            )
        super().__init__(model_name or _model_name(model_path))
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.path = path
        self.device = resolve_device(device)
        torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype)
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.hf_model: Any = AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch_dtype, local_files_only=True
        )
        self.hf_model.to(self.device).eval()
        tokenizer = self.processor.tokenizer
        eos = _as_id_set(self.hf_model.generation_config.eos_token_id) | _as_id_set(tokenizer.eos_token_id)
        self._eos_ids = eos
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
        self._lock = threading.Lock()  # one generate at a time on the shared model

    @classmethod
    def from_settings(cls, settings: Settings) -> TransformersBackend:
        from mcie.config import ConfigError

        if settings.mllm_model_path is None:
            raise ConfigError(
                "MCIE_MLLM_MODEL_PATH: the transformers backend needs a local model folder (with config.json "
                "and the processor files); none is set"
            )
        try:
            return cls(settings.mllm_model_path, device=settings.device)
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None

    def _generate(self, requests: list[MLLMRequest]) -> list[MLLMResponse]:
        with self._lock:
            return [self._answer(request) for request in requests]

    def _answer(self, request: MLLMRequest) -> MLLMResponse:
        import torch

        start = time.perf_counter()
        try:
            messages, images = to_hf_messages(request)
            prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt").to(self.device)
            sampling: dict[str, Any] = {"do_sample": request.temperature > 0}
            if request.temperature > 0:
                sampling["temperature"] = request.temperature
            with torch.inference_mode():
                output = self.hf_model.generate(
                    **inputs, max_new_tokens=request.max_tokens, pad_token_id=self._pad_id, **sampling
                )
            prompt_length = int(inputs["input_ids"].shape[1])
            new_tokens = output[0, prompt_length:].tolist()
            stopped = bool(new_tokens) and new_tokens[-1] in self._eos_ids
            text = self.processor.decode(new_tokens, skip_special_tokens=True)
        except Exception as exc:  # one bad request (too long, broken image) must not stop the batch
            return MLLMResponse.failure(
                f"{type(exc).__name__}: {exc}", model=self.model, latency_s=time.perf_counter() - start
            )
        return MLLMResponse(
            text=text,
            latency_s=time.perf_counter() - start,
            prompt_tokens=prompt_length,
            completion_tokens=len(new_tokens),
            model=self.model,
            finish_reason="stop" if stopped else "length",
        )

    def close(self) -> None:
        """Drop the model (and free GPU memory when on CUDA)."""
        self.hf_model = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def _as_id_set(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _model_name(model_path: str | Path) -> str:
    """The name reported for a folder (its name) or a Hub id (``owner/name``, without a revision)."""
    text = str(model_path)
    return Path(text).name if Path(text).expanduser().exists() else text.split("@", 1)[0]
