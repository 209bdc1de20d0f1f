"""A study's votes and results: the analysis frame (:func:`votes_frame`), the raw export, exclusions and
:func:`study_results` over :mod:`annotate.study_analysis`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mcie.annotate import study_analysis
from mcie.annotate.study.common import EXPORT_COLUMNS, StudyError, get_enrolment, get_study
from mcie.db.models import (
    AuditLog,
    StudyAssignment,
    StudyItem,
    StudyOutput,
    StudyParticipant,
    User,
    Vote,
)
from mcie.db.session import require_write


def _vote_rows(session: Session, study_id: int) -> list[dict[str, Any]]:
    stmt = (
        select(
            Vote,
            StudyAssignment.completed_at,
            StudyItem.external_id,
            StudyItem.is_attention_check,
            StudyItem.attention_answer,
            StudyOutput.method,
            User.username,
            StudyParticipant.excluded,
        )
        .join(StudyAssignment, StudyAssignment.id == Vote.assignment_id)
        .join(StudyItem, StudyItem.id == Vote.item_id)
        .outerjoin(StudyOutput, StudyOutput.id == Vote.chosen_output_id)
        .join(User, User.id == Vote.participant_id)
        .outerjoin(
            StudyParticipant,
            (StudyParticipant.study_id == StudyAssignment.study_id) & (StudyParticipant.user_id == Vote.participant_id),
        )
        .where(StudyAssignment.study_id == study_id)
        .order_by(Vote.participant_id, StudyAssignment.position, Vote.criterion)
    )
    return [
        {
            "participant": vote.participant_id,
            "username": username,
            "item": external_id,
            "item_id": vote.item_id,
            "criterion": vote.criterion,
            "chosen_method": method,
            "shown_order": list(vote.shown_order),
            "shown_position": vote.shown_position,
            "latency_ms": vote.latency_ms,
            "is_attention": bool(attention),
            "attention_answer": answer,
            "completed": completed is not None,
            "excluded": bool(excluded),
            "voted_at": vote.updated_at,
        }
        for vote, completed, external_id, attention, answer, method, username, excluded in session.execute(stmt)
    ]


VOTES_FRAME_COLUMNS: tuple[str, ...] = (
    *study_analysis.VOTE_COLUMNS,
    "username",
    "item_id",
    "shown_position",
    "completed",
    "excluded",
    "voted_at",
)


def votes_frame(session: Session, study_id: int, *, completed_only: bool = True) -> pd.DataFrame:
    """The study's votes as the analysis input (:data:`annotate.study_analysis.VOTE_COLUMNS`, ``participant`` is the
    user id and ``item`` the item's id from items.jsonl) plus ``username``, ``item_id``, ``shown_position``,
    ``completed``, ``excluded`` and ``voted_at``. By default only the votes of completed screens (final answers)."""
    get_study(session, study_id)
    rows = _vote_rows(session, study_id)
    frame = pd.DataFrame(rows, columns=list(VOTES_FRAME_COLUMNS))
    frame["shown_position"] = frame["shown_position"].astype("Int64")
    return frame.loc[frame["completed"].astype(bool)].reset_index(drop=True) if completed_only else frame


def export_votes(session: Session, study_id: int, path: str | Path) -> int:
    """Write every stored vote (raw, completed screens or not) to ``path``: CSV (shown order as a JSON list) or
    Parquet (a list column), by the suffix. Returns the number of votes written."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise StudyError(f"{path}: expected a .csv or .parquet file name")
    frame = votes_frame(session, study_id, completed_only=False).rename(
        columns={"chosen_method": "method", "shown_position": "position"}
    )[list(EXPORT_COLUMNS)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        frame.assign(shown_order=[json.dumps(o) for o in frame["shown_order"]]).to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return len(frame)


def set_excluded(
    session: Session,
    study_id: int,
    user_id: int,
    excluded: bool,
    reason: str | None = None,
    *,
    actor_id: int | None = None,
) -> None:
    """Exclude a participant from the results (a reason is required) or include them again."""
    require_write(session, "set_excluded")
    if excluded and not (reason and reason.strip()):
        raise StudyError("excluding a participant needs a reason (e.g. 'failed 2 of 3 attention checks')")
    row = get_enrolment(session, study_id, user_id, active=False)
    row.excluded = excluded
    row.exclusion_reason = reason.strip() if excluded and reason else None
    session.add(
        AuditLog(
            user_id=actor_id,
            action="study.exclude" if excluded else "study.include",
            entity="study",
            entity_id=str(study_id),
            details={"user_id": user_id, "reason": row.exclusion_reason},
        )
    )


def study_results(
    session: Session, study_id: int, n_boot: int = 1000, seed: int | None = None, **options: Any
) -> dict[str, Any]:
    """:func:`annotate.study_analysis.results` of the study's final votes with the recorded exclusions applied;
    ``seed`` defaults to the study's seed and ``options`` go to ``results`` (``min_median_latency_ms`` ...).
    Attention checks are scored on the study's first criterion (instruction following, where the obvious answer is
    obvious; an output that ignores the instruction may well preserve the background best) unless
    ``attention_criteria`` says otherwise. Adds ``study`` (id, name, status, criteria) and ``participants``
    (enrolled, finished) to the report."""
    study = get_study(session, study_id)
    excluded = set(
        session.scalars(
            select(StudyParticipant.user_id).where(StudyParticipant.study_id == study_id, StudyParticipant.excluded)
        )
    )
    enrolled = (
        session.scalar(
            select(func.count()).select_from(StudyParticipant).where(StudyParticipant.study_id == study_id)
        )
        or 0
    )
    finished = (
        session.scalar(
            select(func.count())
            .select_from(StudyParticipant)
            .where(StudyParticipant.study_id == study_id, StudyParticipant.finished_at.is_not(None))
        )
        or 0
    )
    info = {"id": study.id, "name": study.name, "status": study.status.value, "criteria": list(study.criteria)}
    frame = votes_frame(session, study_id)
    options.setdefault("attention_criteria", info["criteria"][:1])
    report = study_analysis.results(
        frame, exclude=excluded, n_boot=n_boot, seed=study.seed if seed is None else seed, **options
    )
    return {"study": info, "participants": {"enrolled": int(enrolled), "finished": int(finished)}, **report}
