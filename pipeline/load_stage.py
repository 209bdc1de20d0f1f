"""Stage 5, load for review: samples that passed the filter become ``ready``, with a review priority.

A sample still ``filtering`` is ready when its conflict check is done (or the MLLM stages were skipped). A sample
lacking a box for some turn is flagged (reviewers can draw it) but still loaded. The priority orders the review
queue (higher first) by how much a human is needed, a documented heuristic in [0, 1]:

    priority = 0.5 * mllm_doubt + 0.3 * box_doubt + 0.2 * flagged

where ``mllm_doubt`` is 0 for a clean "no conflict" answer, 0.5 when no MLLM was asked, and 1 for an answer that
could not be parsed; ``box_doubt`` is 1 - the smallest margin, over the sample's turns, between the best and the
second-best candidate's Eq. 1 score, scaled so that a margin of 0.05 or more counts as certain (a single candidate
counts as certain, a turn with none as doubtful).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict

from sqlalchemy import select
from sqlalchemy.orm import Session

from mcie.db.models import BoxCandidate, MllmJudgement, MllmStage, Sample, SampleStatus, SubInstruction, Turn
from mcie.db.session import session_scope
from mcie.pipeline.report import StageReport

CERTAIN_MARGIN = 0.05


def box_doubt(scores_by_turn: dict[int, list[float]], turns: range) -> float:
    """1 - the smallest normalized top-2 margin over ``turns`` (0 = every box clear-cut, 1 = a coin toss)."""
    doubt = 0.0
    for index in turns:
        scores = sorted(scores_by_turn.get(index, []), reverse=True)
        if not scores:
            return 1.0
        margin = scores[0] - scores[1] if len(scores) > 1 else CERTAIN_MARGIN
        doubt = max(doubt, 1.0 - min(1.0, max(0.0, margin) / CERTAIN_MARGIN))
    return doubt


def priority(mllm_doubt: float, box_doubt_value: float, flagged: bool) -> float:
    return round(0.5 * mllm_doubt + 0.3 * box_doubt_value + 0.2 * float(flagged), 6)


NO_BOX_REASON = re.compile(r"no box was found for turn\(s\) [0-9, ]+")


def without_no_box_reason(reason: str | None) -> str | None:
    """``flag_reason`` less its "no box was found for turn(s) ..." part (other reasons, e.g. a reviewer's, stay)."""
    if not reason:
        return None
    parts = [p for p in reason.split("; ") if not NO_BOX_REASON.fullmatch(p)]
    return "; ".join(parts) or None


def _missing_boxes(session: Session, sample_ids: list[int]) -> dict[int, list[int]]:
    """Turn indexes without a box, per sample."""
    missing: dict[int, list[int]] = defaultdict(list)
    for start in range(0, len(sample_ids), 5000):
        chunk = sample_ids[start : start + 5000]
        for sample_id, turn_index in session.execute(
            select(SubInstruction.sample_id, SubInstruction.turn_index).where(
                SubInstruction.sample_id.in_(chunk), SubInstruction.box_x0.is_(None)
            )
        ):
            missing[sample_id].append(turn_index)
    return missing


def _box_scores(session: Session, instance_ids: set[int]) -> dict[int, dict[int, list[float]]]:
    """Every candidate's score, per instance and turn index."""
    scores: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    ids = sorted(instance_ids)
    for start in range(0, len(ids), 5000):
        for instance_id, index, score in session.execute(
            select(Turn.instance_id, Turn.index, BoxCandidate.score)
            .join(BoxCandidate, BoxCandidate.turn_id == Turn.id)
            .where(Turn.instance_id.in_(ids[start : start + 5000]))
        ):
            if score is not None:
                scores[instance_id][index].append(score)
    return scores


def _flag_missing(sample: Sample, missing: list[int]) -> None:
    """Set (or clear) the sample's "no box was found" flag from the turns still ``missing`` a box."""
    other = without_no_box_reason(sample.flag_reason)
    unexplained = bool(sample.flagged) and not sample.flag_reason  # flagged without a reason: leave it flagged
    reason = other
    if missing:
        no_box = "no box was found for turn(s) " + ", ".join(str(i) for i in sorted(missing))
        reason = f"{other}; {no_box}" if other else no_box
    sample.flag_reason = reason
    sample.flagged = reason is not None or unexplained


def refresh_ready(session: Session, sample_ids: list[int]) -> int:
    """Recompute the "no box" flag and the review priority of the ``ready`` samples among ``sample_ids``.

    Called by the grounding stage after it re-grounded turns of samples already loaded (a retried MLLM call): the
    new boxes may answer an earlier "no box was found" flag and change the box doubt. ``mllm_doubt`` comes from the
    sample's latest conflict judgement that did not fail (none: 0.5, as when the MLLM stages were skipped). A flag
    with another reason (the conflict answer, a reviewer) stays. Returns the number of samples refreshed.
    """
    samples = session.scalars(
        select(Sample).where(Sample.id.in_(sorted(set(sample_ids))), Sample.status == SampleStatus.ready)
    ).all()
    if not samples:
        return 0
    ids = [s.id for s in samples]
    missing = _missing_boxes(session, ids)
    scores = _box_scores(session, {s.instance_id for s in samples})
    verdicts: dict[int, str] = {}
    for sample_id, verdict in session.execute(
        select(MllmJudgement.sample_id, MllmJudgement.verdict)
        .where(MllmJudgement.sample_id.in_(ids), MllmJudgement.stage == MllmStage.conflict,
               MllmJudgement.error.is_(None))
        .order_by(MllmJudgement.id)
    ):
        verdicts[sample_id] = verdict
    for sample in samples:
        _flag_missing(sample, missing.get(sample.id, []))
        verdict = verdicts.get(sample.id)
        mllm_doubt = 0.5 if verdict is None else (1.0 if verdict == "unparseable" else 0.0)
        doubt = box_doubt(scores[sample.instance_id], range(sample.first_turn, sample.last_turn + 1))
        sample.priority = priority(mllm_doubt, doubt, sample.flagged)
    return len(samples)


def load_stage(url: str, *, conflict_checked: bool, model: str | None, version: str | None) -> StageReport:
    report = StageReport("load")
    started = time.perf_counter()
    with session_scope(url) as session:
        samples = session.scalars(
            select(Sample).where(Sample.status == SampleStatus.filtering).order_by(Sample.id)
        ).all()
        report.pending = len(samples)
        verdicts: dict[int, str] = {}
        if conflict_checked:
            for sample_id, verdict in session.execute(
                select(MllmJudgement.sample_id, MllmJudgement.verdict)
                .where(
                    MllmJudgement.stage == MllmStage.conflict,
                    MllmJudgement.model == model,
                    MllmJudgement.prompt_version == version,
                    MllmJudgement.error.is_(None),
                )
                .order_by(MllmJudgement.id)
            ):
                verdicts[sample_id] = verdict
        missing_box = _missing_boxes(session, [s.id for s in samples])
        scores = _box_scores(session, {s.instance_id for s in samples})
        for sample in samples:
            if conflict_checked and sample.id not in verdicts:
                report.count("awaiting_conflict_check")
                continue
            if missing_box.get(sample.id):
                _flag_missing(sample, missing_box[sample.id])
                report.count("flagged_no_box")
            verdict = verdicts.get(sample.id)
            mllm_doubt = 0.5 if not conflict_checked else (1.0 if verdict == "unparseable" else 0.0)
            doubt = box_doubt(scores[sample.instance_id], range(sample.first_turn, sample.last_turn + 1))
            sample.priority = priority(mllm_doubt, doubt, sample.flagged)
            sample.status = SampleStatus.ready
            report.count("ready")
    report.seconds = round(time.perf_counter() - started, 3)
    return report
