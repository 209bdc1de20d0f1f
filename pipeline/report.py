"""What every pipeline stage reports, shared by the stages and their sequence (:mod:`pipeline.run`).

:class:`StageReport` counts a stage's pending work, cache hits, MLLM calls, failures by kind (:func:`failure_kind`)
and tokens; :func:`recorded_model_name` is the model name a stage stores with its MLLM judgements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mcie.config import Settings


def failure_kind(verdict: str | None, error: str | None) -> str:
    """A short class of a failed MLLM call, for summaries: unparseable, timeout, connection, HTTP 503, ..."""
    if verdict == "unparseable":
        return "unparseable"
    text = error or ""
    if text.startswith("HTTP "):
        return " ".join(text.split()[:2])
    for prefix, kind in (("timed out", "timeout"), ("connection error", "connection"),
                         ("malformed response", "malformed response")):
        if text.startswith(prefix):
            return kind
    return "error"


@dataclass
class StageReport:
    name: str
    pending: int = 0
    cached: int = 0
    calls: int = 0
    failures: int = 0  # requests that failed (after the backend's retries)
    unparseable: int = 0  # answers that could not be parsed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> {"count": n, "first": message}
    skipped_reason: str | None = None

    def add_call(self, outcome: Any) -> None:
        self.calls += 1
        self.prompt_tokens += outcome.prompt_tokens or 0
        self.completion_tokens += outcome.completion_tokens or 0

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def add_failure(self, verdict: str, message: str | None) -> None:
        """Count a failed or unparseable call by kind, keeping the first message of each kind."""
        entry = self.errors.setdefault(failure_kind(verdict, message), {"count": 0, "first": message})
        entry["count"] += 1
        if verdict == "error":
            self.failures += 1
        else:
            self.unparseable += 1

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not (k == "skipped_reason" and v is None)}


def recorded_model_name(settings: Settings, mllm: str) -> str:
    """The model name recorded with judgements (the server's model, or the local model folder)."""
    if mllm == "openai":
        return settings.mllm_model
    return str(settings.mllm_model_path or settings.mllm_model)
