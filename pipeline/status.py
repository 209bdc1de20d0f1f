"""``mcie pipeline status``: where the pipeline stands and what the next ``mcie pipeline run`` would do.

Samples by status, flagged samples grouped by reason, the MLLM calls whose last attempt failed (by stage and kind,
with the first message: an item answered since is not counted), and how many samples and turns a rerun would send
to the MLLM with the configured backend (retries of failed calls counted apart; cache hits are not calls).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mcie.config import Settings
from mcie.db.models import Instance, MllmJudgement, MllmStage, Sample
from mcie.db.session import session_scope
from mcie.pipeline.report import failure_kind, recorded_model_name

_NUMBERS = re.compile(r"\d+(?:, \d+)*")


def reason_group(reason: str) -> str:
    """A flag reason without its specifics (turn numbers, the parser's message), to count alike reasons."""
    return _NUMBERS.sub("N", reason.split(":")[0].strip())


def flagged_summary(session: Session) -> dict[str, Any]:
    reasons: Counter[str] = Counter()
    count = 0
    for (reason,) in session.execute(select(Sample.flag_reason).where(Sample.flagged)):
        count += 1
        for part in (reason or "no reason given").split("; "):
            reasons[reason_group(part)] += 1
    return {"count": count, "reasons": dict(reasons.most_common())}


def unrecovered_failures(session: Session) -> dict[str, dict[str, dict[str, Any]]]:
    """stage -> kind -> {"count", "first"} over the items (samples, turns) whose newest call failed."""
    latest: dict[tuple[str, int], tuple[str | None, str | None]] = {}
    rows = session.execute(
        select(MllmJudgement.stage, MllmJudgement.sample_id, MllmJudgement.turn_id, MllmJudgement.verdict,
               MllmJudgement.error, MllmJudgement.parse_error)
        .where(MllmJudgement.stage.in_((MllmStage.conflict, MllmStage.grounding)))
        .order_by(MllmJudgement.id)
    )
    for stage, sample_id, turn_id, verdict, error, parse_error in rows:
        item = sample_id if stage == MllmStage.conflict else turn_id
        if item is not None:
            latest[(str(stage), item)] = (verdict, error or parse_error)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (stage, _), (verdict, message) in latest.items():
        if verdict not in ("error", "unparseable"):
            continue
        entry = out.setdefault(stage, {}).setdefault(failure_kind(verdict, message), {"count": 0, "first": message})
        entry["count"] += 1
    return out


def rerun_plan(session: Session, settings: Settings, mllm: str, k: int = 3) -> dict[str, int]:
    """How many samples / turns the next run would ask the MLLM about (and how many of those are retries)."""
    from mcie.mllm.prompts import PROMPT_VERSION
    from mcie.pipeline import conflict_stage, grounding_stage

    if mllm == "none":
        turns = grounding_stage.pending_tasks(session, None, None, k, retry=True)
        return {"grounding_turns_without_boxes": len(turns)}
    model = recorded_model_name(settings, mllm)
    samples = conflict_stage.pending_tasks(session, model, PROMPT_VERSION["conflict"])
    hits, misses = conflict_stage.from_cache(session, samples)
    asked_before = set(
        session.scalars(
            select(MllmJudgement.sample_id).where(MllmJudgement.stage == MllmStage.conflict,
                                                  MllmJudgement.model == model,
                                                  MllmJudgement.sample_id.in_([t.sample_id for t in misses]))
        )
    )
    turns = grounding_stage.from_cache(
        session, grounding_stage.pending_tasks(session, model, PROMPT_VERSION["grounding"], k, retry=True)
    )
    asks = [t for t in turns if t.ask and t.cached is None]
    return {
        "conflict_samples": len(misses),
        "conflict_retries": len(asked_before),
        "conflict_from_cache": len(hits),
        "grounding_turns": len(asks),
        "grounding_retries": sum(t.retry for t in asks),
        "grounding_from_cache": sum(t.cached is not None for t in turns),
        "grounding_turns_without_boxes": sum(not t.existing for t in turns),
    }


def pipeline_status(settings: Settings) -> dict[str, Any]:
    with session_scope(settings.database_url) as session:
        statuses = dict(session.execute(select(Sample.status, func.count()).group_by(Sample.status)).all())
        return {
            "instances": session.scalar(select(func.count()).select_from(Instance)),
            "samples": {str(k): v for k, v in sorted(statuses.items())},
            "flagged": flagged_summary(session),
            "mllm_failures": unrecovered_failures(session),
            "rerun": {"mllm": settings.mllm_backend, "would_ask": rerun_plan(session, settings, settings.mllm_backend)},
        }
