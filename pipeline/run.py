"""The pipeline from expanded instances to review-ready samples: expand -> conflict filter -> grounding -> load.

Every stage is idempotent and resumable, so ``mcie pipeline run`` after an interruption does only the missing work.
With ``--mllm none`` the MLLM stages are skipped (no conflict filter; boxes come from pixel differences only) and
the summary says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mcie.config import Settings
from pipeline.conflict_stage import StageReport, _model_name, conflict_stage
from pipeline.engines import make_engine
from pipeline.expand_stage import expand_stage
from pipeline.grounding_stage import grounding_stage
from pipeline.load_stage import load_stage


@dataclass
class RunSummary:
    engine: str
    mllm: str
    scorer: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "mllm": self.mllm, "scorer": self.scorer, "stages": self.stages,
                "notes": self.notes}  # fmt: skip


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
) -> RunSummary:
    from pipeline.mllm.prompts import PROMPT_VERSION

    mllm = mllm or settings.mllm_backend
    scorer = resolve_scorer(scorer, settings)
    summary = RunSummary(engine, mllm, scorer)
    url = settings.database_url
    expand = expand_stage(url)
    summary.stages.append({"name": "expand", "pending": expand.instances, "counts": expand.as_dict()})
    options: dict[str, Any] = {"progress": progress}
    if engine == "ray":
        options |= {"address": ray_address, "concurrency": ray_workers}
        if ray_address is None:
            options["num_cpus"] = max(2, ray_workers)
    runner = make_engine(engine, **options)
    if mllm == "none":
        summary.notes.append(
            "MLLM stages skipped (--mllm none): no conflict filter; boxes from pixel differences only"
        )
        summary.stages.append(StageReport("conflict", skipped_reason="--mllm none").as_dict())
    else:
        summary.stages.append(conflict_stage(url, runner, settings, mllm=mllm).as_dict())
    summary.stages.append(grounding_stage(url, runner, settings, mllm=mllm, scorer=scorer, k=k).as_dict())
    model = _model_name(settings, mllm) if mllm != "none" else None
    load = load_stage(url, conflict_checked=mllm != "none", model=model,
                      version=PROMPT_VERSION["conflict"] if mllm != "none" else None)  # fmt: skip
    summary.stages.append(load.as_dict())
    return summary
