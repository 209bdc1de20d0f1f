"""The pipeline from expanded instances to review-ready samples: expand -> conflict filter -> grounding -> load.

Every stage is idempotent and resumable, so ``mcie pipeline run`` after an interruption does only the missing work.
With ``--mllm none`` the MLLM stages are skipped (no conflict filter; boxes come from pixel differences only) and
the summary says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mcie.config import Settings
from mcie.pipeline.conflict_stage import conflict_stage
from mcie.pipeline.engines import make_stage_engine
from mcie.pipeline.expand_stage import expand_stage
from mcie.pipeline.grounding_stage import grounding_stage
from mcie.pipeline.load_stage import load_stage
from mcie.pipeline.report import StageReport, recorded_model_name


@dataclass
class RunSummary:
    engine: str
    mllm: str
    scorer: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "mllm": self.mllm, "scorer": self.scorer, "stages": self.stages,
                "notes": self.notes}


HINTS = {
    "connection": "is the MLLM server at MCIE_MLLM_BASE_URL running and reachable from here?",
    "timeout": "the server is too slow: raise MCIE_MLLM_TIMEOUT_S or lower MCIE_MLLM_CONCURRENCY",
    "HTTP 401": "the server refused the key: check MCIE_MLLM_API_KEY",
    "HTTP 403": "the server refused the key: check MCIE_MLLM_API_KEY",
    "HTTP 404": "check MCIE_MLLM_BASE_URL (it usually ends in /v1) and MCIE_MLLM_MODEL",
    "HTTP 429": "the server is rate limiting: lower MCIE_MLLM_CONCURRENCY",
    "unparseable": "the answers do not follow the prompt's JSON format: is MCIE_MLLM_MODEL a grounding-capable "
    "model such as Qwen2.5-VL?",
}
DEFAULT_HINT = "see the server's log; the calls are stored in mllm_judgements with their errors"


def hint(kind: str) -> str:
    """What to check for a kind of MLLM failure (see :func:`pipeline.report.failure_kind`)."""
    if kind in HINTS:
        return HINTS[kind]
    if kind.startswith("HTTP 5"):
        return "the server failed (overloaded or crashed?): see its log, or lower MCIE_MLLM_CONCURRENCY"
    return DEFAULT_HINT


def failed_stages(summary: RunSummary) -> list[str]:
    """One message per stage whose MLLM calls all failed: which stage, the first error and a hint."""
    out = []
    for stage in summary.stages:
        calls, errors = stage.get("calls", 0), stage.get("errors") or {}
        if not calls or stage.get("failures", 0) + stage.get("unparseable", 0) < calls:
            continue
        kind, entry = max(errors.items(), key=lambda item: item[1]["count"])
        out.append(f"all {calls} MLLM calls of the {stage['name']} stage failed; first error ({kind}): "
                   f"{entry['first']}; hint: {hint(kind)}")
    return out


def error_lines(summary: RunSummary, width: int = 200) -> list[str]:
    """A short summary of every stage's failed MLLM calls, by kind, with the first message of each kind."""
    out = []
    for stage in summary.stages:
        for kind, entry in sorted((stage.get("errors") or {}).items(), key=lambda item: -item[1]["count"]):
            first = str(entry["first"] or "")
            first = first if len(first) <= width else first[: width - 1] + "…"
            out.append(f"{stage['name']}: {entry['count']} x {kind}: {first}")
    return out


def resolve_scorer(kind: str, settings: Settings) -> str:
    if kind == "auto":
        return "clip" if settings.clip_checkpoint is not None else "pixel"
    return kind


def run_pipeline(
    settings: Settings,
    *,
    engine: str = "local",
    mllm: str | None = None,
    scorer: str = "auto",
    k: int = 3,
    ray_address: str | None = None,
    ray_workers: int = 2,
    progress: bool = True,
    retry: bool = True,
) -> RunSummary:
    """Run every stage in order; ``retry=False`` asks the MLLM only what it was never asked (no retries of calls
    that failed or answers that could not be parsed)."""
    from mcie.mllm.prompts import PROMPT_VERSION

    mllm = mllm or settings.mllm_backend
    scorer = resolve_scorer(scorer, settings)
    summary = RunSummary(engine, mllm, scorer)
    url = settings.database_url
    expand = expand_stage(url)
    summary.stages.append({"name": "expand", "pending": expand.instances, "counts": expand.as_dict()})
    options: dict[str, Any] = {"progress": progress}
    if engine == "ray":
        options |= {"address": ray_address, "workers": ray_workers}
        if ray_address is None:
            options["num_cpus"] = max(2, ray_workers)
    runner = make_stage_engine(engine, **options)
    if mllm == "none":
        summary.notes.append(
            "MLLM stages skipped (--mllm none): no conflict filter; boxes from pixel differences only"
        )
        summary.stages.append(StageReport("conflict", skipped_reason="--mllm none").as_dict())
    else:
        summary.stages.append(conflict_stage(url, runner, settings, mllm=mllm, retry=retry).as_dict())
    summary.stages.append(grounding_stage(url, runner, settings, mllm=mllm, scorer=scorer, k=k,
                                                  retry=retry).as_dict())
    model = recorded_model_name(settings, mllm) if mllm != "none" else None
    load = load_stage(url, conflict_checked=mllm != "none", model=model,
                      version=PROMPT_VERSION["conflict"] if mllm != "none" else None)
    summary.stages.append(load.as_dict())
    return summary
