"""Reviewers' answers: validation, submit and revise (committed before the UI moves on), skip, flag, progress,
history, and everything the review screen shows about a sample.

An answer is the paper's three questions (instruction consistency yes/no, image quality 1-5, editing-scenario
complexity 1-5) plus an optional comment and box corrections (``{"turn_index": k, "box": [x0, y0, x1, y1]}``,
normalized 0..1, k a turn of the sample's window).

* :func:`submit_review` needs an assignment of the sample to the user: a lease, even an expired or released one,
  so nothing a reviewer entered is lost, unless the sample already has all its reviews from others. It writes the
  review and revision 1, marks the assignment submitted and, when the sample has all the reviews it wants, settles it
  with the acceptance rule in the same transaction. Gold reviews are stored the same way but never settle anything.
* :func:`revise_review` (author only) keeps every version in ``review_revisions`` and re-settles a settled sample
  (a lead's decision is kept). The review's ``time_spent_s`` is the total over its revisions.
* Every function takes the caller's ``Session`` and never commits. The writers (submit, revise, skip, flag) need a
  write transaction, ``session_scope(url, write=True)`` (checked by :func:`db.session.require_write`).
* Writers lock the sample's row (``FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), like the queue, so
  the review count of a sample never exceeds what it wants.
* "Today" in :func:`reviewer_progress` is the UTC day of ``now``.

Unauthorized requests (revising someone else's review) raise :class:`PermissionError`; every other refusal raises
:class:`ReviewError` with a message for the reviewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, time
from typing import Any

from sqlalchemy import Select, and_, exists, func, insert, select, update
from sqlalchemy.orm import Session, aliased
from sqlalchemy.orm.attributes import set_committed_value

from mcie.annotate.acceptance import settle_loaded
from mcie.annotate.project import ProjectConfig, get_project_config
from mcie.annotate.queue import (
    OPEN_STATUSES,
    QueueError,
    active_clause,
    count_submitted,
    ensure_reviewer,
    is_gold_clause,
    reopen_idle,
    reviews_wanted,
    utc,
    wanted_clause,
)
from mcie.db.models import (
    Assignment,
    AssignmentState,
    GoldAnswer,
    Instance,
    MllmJudgement,
    MllmStage,
    Review,
    ReviewRevision,
    Sample,
    SampleFlag,
    SampleStatus,
    SubInstruction,
    Turn,
)
from mcie.db.session import require_write
from mcie.db.windows import window_images

MAX_COMMENT_CHARS = 5000
MAX_HISTORY_PAGE = 500
BOX_KEYS = frozenset({"turn_index", "box"})


class ReviewError(ValueError):
    """A review request that cannot be done; the message says what is wrong, for the reviewer."""


@dataclass(frozen=True)
class Answer:
    consistent: bool
    quality: int
    complexity: int
    comment: str | None = None
    box_corrections: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class ReviewRecord:
    review_id: int
    sample_id: int
    revision: int
    created_at: datetime


@dataclass(frozen=True)
class Progress:
    done_today: int
    done_total: int
    queue_left: int


@dataclass(frozen=True)
class HistoryRow:
    review_id: int
    sample_id: int
    instruction: str
    consistent: bool
    quality: int
    complexity: int
    comment: str | None
    box_corrections: list[dict[str, Any]] | None
    revision: int
    updated_at: datetime


@dataclass(frozen=True)
class SubInstructionView:
    turn_index: int
    text: str
    operation: str
    box: tuple[float, float, float, float] | None
    box_source: str | None


@dataclass(frozen=True)
class SampleView:
    """What the review screen shows. ``steps``: (label, image sha256) from the image before the window ("source")
    through each intermediate result ("after turn k") to the target ("target")."""

    sample_id: int
    status: str
    dataset: str
    external_id: str
    first_turn: int
    last_turn: int
    steps: list[tuple[str, str]]
    instruction: str
    sub_instructions: list[SubInstructionView]
    mllm_verdict: str | None
    mllm_conflict: bool | None
    mllm_reason: str | None
    flagged: bool
    flag_reason: str | None
    n_reviews: int


# ----------------------------------------------------------------------------------------------------------
# validation (pure)


def _score(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
        raise ReviewError(f"{name} must be a whole number from 1 to 5; got {value!r}")
    return value


def _box_correction(k: int, item: Any, first_turn: int, last_turn: int) -> dict[str, Any]:
    where = f"box correction {k + 1}"
    if not isinstance(item, dict):
        raise ReviewError(f'{where} must be {{"turn_index": int, "box": [x0, y0, x1, y1]}}; got {item!r}')
    unknown = sorted(set(item) - BOX_KEYS)
    missing = sorted(BOX_KEYS - set(item))
    if unknown or missing:
        raise ReviewError(f"{where}: expected the keys turn_index and box; missing {missing}, unknown {unknown}")
    turn = item["turn_index"]
    if isinstance(turn, bool) or not isinstance(turn, int) or not first_turn <= turn <= last_turn:
        raise ReviewError(f"{where}: turn_index must be a turn of this sample ({first_turn}-{last_turn}); got {turn!r}")
    box = item["box"]
    if not isinstance(box, list | tuple) or len(box) != 4:
        raise ReviewError(f"{where}: box must be four numbers [x0, y0, x1, y1]; got {box!r}")
    if any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) for v in box):
        raise ReviewError(f"{where}: box must hold finite numbers; got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ReviewError(f"{where}: box must lie inside 0..1 with x0 < x1 and y0 < y1; got {list(box)}")
    return {"turn_index": turn, "box": [x0, y0, x1, y1]}


def validate_answer(answer: Answer, sample: Any) -> Answer:
    """Check an answer against a sample (anything with ``first_turn`` and ``last_turn``); returns it normalized
    (comment stripped, empty -> None; boxes as float lists). Raises ReviewError saying what is wrong."""
    if not isinstance(answer, Answer):
        raise ReviewError(f"expected an Answer; got {type(answer).__name__}")
    if not isinstance(answer.consistent, bool):
        raise ReviewError(f"consistent must be yes (True) or no (False); got {answer.consistent!r}")
    _score("quality", answer.quality)
    _score("complexity", answer.complexity)
    comment = answer.comment
    if comment is not None:
        if not isinstance(comment, str):
            raise ReviewError(f"comment must be text; got {type(comment).__name__}")
        comment = comment.strip() or None
        if comment is not None and len(comment) > MAX_COMMENT_CHARS:
            raise ReviewError(f"comment is {len(comment)} characters; at most {MAX_COMMENT_CHARS} are kept")
    boxes = answer.box_corrections
    if boxes is not None:
        if not isinstance(boxes, list | tuple):
            raise ReviewError(f"box_corrections must be a list; got {type(boxes).__name__}")
        boxes = [_box_correction(k, item, sample.first_turn, sample.last_turn) for k, item in enumerate(boxes)]
        turns = [b["turn_index"] for b in boxes]
        if len(set(turns)) != len(turns):
            raise ReviewError(f"at most one box correction per turn; got turns {turns}")
        boxes = boxes or None
    return replace(answer, comment=comment, box_corrections=boxes)


def _check_time(time_spent_s: float | None) -> float | None:
    if time_spent_s is None:
        return None
    if isinstance(time_spent_s, bool) or not isinstance(time_spent_s, int | float) or not math.isfinite(time_spent_s):
        raise ReviewError(f"time_spent_s must be a number of seconds; got {time_spent_s!r}")
    if time_spent_s < 0:
        raise ReviewError(f"time_spent_s cannot be negative; got {time_spent_s!r}")
    return float(time_spent_s)


# ----------------------------------------------------------------------------------------------------------
# writes


def _locked_sample(session: Session, sample_id: int) -> Sample:
    sample = session.get(Sample, sample_id, with_for_update=True)
    if sample is None:
        raise ReviewError(f"no sample with id {sample_id}")
    return sample


def _reviewer(session: Session, user_id: int) -> None:
    try:
        ensure_reviewer(session, user_id)
    except QueueError as exc:
        raise ReviewError(str(exc)) from None


def _answer_columns(answer: Answer) -> dict[str, Any]:
    """The columns a review and each of its revisions store of an answer."""
    return {"consistent": answer.consistent, "quality": answer.quality, "complexity": answer.complexity,
            "comment": answer.comment, "box_corrections": answer.box_corrections}


def _revision_row(review: Review, answer: Answer, time_spent_s: float | None, now: datetime) -> ReviewRevision:
    return ReviewRevision(review_id=review.id, revision=review.revision, **_answer_columns(answer),
                          time_spent_s=time_spent_s, created_at=now)


def _settle_if_complete(session: Session, sample: Sample) -> None:
    """Settle a non-gold sample that has all its reviews (in the caller's transaction)."""
    if session.get(GoldAnswer, sample.id) is not None:
        return
    config = get_project_config(session)
    if count_submitted(session, sample.id) >= reviews_wanted(sample.id, config, sample.reviews_target):
        settle_loaded(session, sample, config)


def submit_review(
    session: Session,
    user_id: int,
    sample_id: int,
    answer: Answer,
    *,
    time_spent_s: float | None = None,
    now: datetime | None = None,
) -> ReviewRecord:
    """Store a reviewer's first answer for a sample they were assigned (see the module docstring). Needs a write
    session (``session_scope(url, write=True)``); the caller commits."""
    require_write(session, "submit_review")
    now = utc(now)
    spent = _check_time(time_spent_s)
    _reviewer(session, user_id)
    sample = _locked_sample(session, sample_id)
    answer = validate_answer(answer, sample)
    existing_q = select(Review.id).where(Review.sample_id == sample_id, Review.user_id == user_id).scalar_subquery()
    row = session.execute(
        select(Assignment.id, Assignment.state, existing_q).where(
            Assignment.sample_id == sample_id, Assignment.user_id == user_id
        )
    ).first()
    if row is None:
        raise ReviewError(f"sample {sample_id} was not assigned to you; take samples from the queue")
    assignment_id, state, existing = row
    if existing is not None or state == AssignmentState.submitted:
        which = f" (review {existing})" if existing is not None else ""
        raise ReviewError(f"you already reviewed sample {sample_id}; revise it instead{which}")
    if state == AssignmentState.skipped:
        raise ReviewError(f"you skipped sample {sample_id}; a skipped sample cannot be reviewed")
    others_q = (
        select(func.count())
        .select_from(Assignment)
        .where(
            Assignment.sample_id == sample_id,
            Assignment.state == AssignmentState.submitted,
            Assignment.user_id != user_id,
        )
        .scalar_subquery()
    )
    gold_q = select(GoldAnswer.sample_id).where(GoldAnswer.sample_id == sample_id).scalar_subquery()
    gold_id, others = session.execute(select(gold_q, others_q)).one()
    gold = gold_id is not None
    config: ProjectConfig | None = None
    wanted = 0
    if not gold:
        config = get_project_config(session)
        wanted = reviews_wanted(sample_id, config, sample.reviews_target)
        if int(others or 0) >= wanted:
            raise ReviewError(f"sample {sample_id} already has all its reviews from others; take the next one")
    # core statements, no ORM flush: the review, its revision 1, the assignment, and a late submit's status
    columns = _answer_columns(answer)
    review_id = session.scalar(
        insert(Review)
        .values(sample_id=sample_id, user_id=user_id, **columns, time_spent_s=spent, revision=1, created_at=now,
                updated_at=now)
        .returning(Review.id)
    )
    session.execute(
        insert(ReviewRevision).values(review_id=review_id, revision=1, **columns, time_spent_s=spent, created_at=now)
    )
    session.execute(
        update(Assignment)
        .where(Assignment.id == assignment_id)
        .values(state=AssignmentState.submitted, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    if not gold and sample.status == SampleStatus.ready:  # a late submit after the sample went back to ready
        session.execute(
            update(Sample)
            .where(Sample.id == sample_id)
            .values(status=SampleStatus.in_review)
            .execution_options(synchronize_session=False)
        )
        set_committed_value(sample, "status", SampleStatus.in_review)
    # every other submitted review is counted in ``others`` (one assignment per user and sample)
    if config is not None and int(others or 0) + 1 >= wanted:
        settle_loaded(session, sample, config)
    return ReviewRecord(int(review_id), sample_id, 1, now)


def revise_review(
    session: Session,
    user_id: int,
    review_id: int,
    answer: Answer,
    *,
    time_spent_s: float | None = None,
    now: datetime | None = None,
) -> ReviewRecord:
    """Replace the author's answer with a new revision (every revision is kept) and re-settle a settled sample.
    Needs a write session; the caller commits."""
    require_write(session, "revise_review")
    now = utc(now)
    spent = _check_time(time_spent_s)
    sample_id = session.scalar(select(Review.sample_id).where(Review.id == review_id))
    if sample_id is None:
        raise ReviewError(f"no review with id {review_id}")
    sample = _locked_sample(session, sample_id)
    review = session.get(Review, review_id, populate_existing=True)
    assert review is not None
    if review.user_id != user_id:
        raise PermissionError(f"review {review_id} belongs to another reviewer; only its author may revise it")
    answer = validate_answer(answer, sample)
    review.revision += 1
    for column, value in _answer_columns(answer).items():
        setattr(review, column, value)
    if spent is not None:
        review.time_spent_s = (review.time_spent_s or 0.0) + spent
    review.updated_at = now
    session.flush()
    session.add(_revision_row(review, answer, spent, now))
    session.flush()
    if sample.status in (SampleStatus.accepted, SampleStatus.rejected, SampleStatus.needs_adjudication):
        _settle_if_complete(session, sample)
    return ReviewRecord(review.id, sample_id, review.revision, utc(review.created_at))


def _required_reason(reason: str, what: str) -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise ReviewError(f"a reason is required to {what}")
    return reason.strip()


def skip_sample(session: Session, user_id: int, sample_id: int, reason: str, *, now: datetime | None = None) -> None:
    """Give up a leased sample with a reason: its slot goes to someone else and this user never gets it again.
    Needs a write session; the caller commits."""
    require_write(session, "skip_sample")
    now = utc(now)
    reason = _required_reason(reason, "skip a sample")
    _reviewer(session, user_id)
    _locked_sample(session, sample_id)
    assignment = session.scalar(
        select(Assignment).where(Assignment.sample_id == sample_id, Assignment.user_id == user_id)
    )
    if assignment is None:
        raise ReviewError(f"sample {sample_id} was not assigned to you")
    if assignment.state == AssignmentState.submitted:
        raise ReviewError(f"you already reviewed sample {sample_id}; a reviewed sample cannot be skipped")
    if assignment.state == AssignmentState.skipped:
        raise ReviewError(f"you already skipped sample {sample_id}")
    assignment.state = AssignmentState.skipped
    assignment.skip_reason = reason
    assignment.finished_at = now
    session.flush()
    reopen_idle(session, [sample_id], now)


def flag_sample(session: Session, user_id: int, sample_id: int, reason: str) -> int:
    """Flag a sample for a lead (broken images, offensive content ...); returns the flag id. The review goes on.
    Needs a write session; the caller commits."""
    require_write(session, "flag_sample")
    reason = _required_reason(reason, "flag a sample")
    _reviewer(session, user_id)
    sample = _locked_sample(session, sample_id)
    flag = SampleFlag(sample_id=sample_id, user_id=user_id, reason=reason)
    session.add(flag)
    sample.flagged = True
    sample.flag_reason = f"{sample.flag_reason}; {reason}" if sample.flag_reason else reason
    session.flush()
    return flag.id


# ----------------------------------------------------------------------------------------------------------
# reads


def queue_left_query(user_id: int, config: ProjectConfig, now: datetime) -> Select[tuple[int]]:
    """Count of pool samples this user could still be given (see annotate.queue for the pool)."""
    active = (
        select(Assignment.sample_id, func.count().label("n"))
        .where(active_clause(Assignment, now))
        .where(Assignment.sample_id.in_(select(Sample.id).where(Sample.status.in_(OPEN_STATUSES))))
        .group_by(Assignment.sample_id)
        .subquery()
    )
    mine = exists().where(Assignment.sample_id == Sample.id, Assignment.user_id == user_id)
    return (
        select(func.count())
        .select_from(Sample)
        .outerjoin(active, active.c.sample_id == Sample.id)
        .where(
            Sample.status.in_(OPEN_STATUSES),
            ~is_gold_clause(Sample.id),
            ~mine,
            func.coalesce(active.c.n, 0) < wanted_clause(Sample.id, config, Sample.reviews_target),
        )
    )


def reviewer_progress(session: Session, user_id: int, *, now: datetime | None = None) -> Progress:
    """Reviews done today (UTC day of ``now``) and in total, and how many pool samples this user could still get
    (gold samples are not counted: they are only mixed into real work)."""
    now = utc(now)
    midnight = datetime.combine(now.date(), time(0), tzinfo=now.tzinfo)
    config = get_project_config(session)
    total, today = session.execute(
        select(func.count(), func.count().filter(Review.created_at >= midnight)).where(Review.user_id == user_id)
    ).one()
    left = int(session.scalar(queue_left_query(user_id, config, now)) or 0)
    return Progress(done_today=int(today or 0), done_total=int(total or 0), queue_left=left)


def reviewer_history(session: Session, user_id: int, *, limit: int = 50, offset: int = 0) -> list[HistoryRow]:
    """The user's reviews, most recently updated first (paged by ``limit`` and ``offset``)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_HISTORY_PAGE:
        raise ReviewError(f"limit must be 1..{MAX_HISTORY_PAGE}; got {limit!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ReviewError(f"offset must be a non-negative integer; got {offset!r}")
    rows = session.execute(
        select(Review, Sample.instruction)
        .join(Sample, Sample.id == Review.sample_id)
        .where(Review.user_id == user_id)
        .order_by(Review.updated_at.desc(), Review.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return [_history_row(r, instruction) for r, instruction in rows]


def reviewer_review(session: Session, user_id: int, review_id: int) -> HistoryRow | None:
    """One of the user's reviews as a history row (None when ``review_id`` is not theirs): one indexed read."""
    found = session.execute(
        select(Review, Sample.instruction)
        .join(Sample, Sample.id == Review.sample_id)
        .where(Review.id == review_id, Review.user_id == user_id)
    ).first()
    return None if found is None else _history_row(*found)


def _history_row(r: Review, instruction: str) -> HistoryRow:
    return HistoryRow(
        review_id=r.id,
        sample_id=r.sample_id,
        instruction=instruction,
        consistent=r.consistent,
        quality=r.quality,
        complexity=r.complexity,
        comment=r.comment,
        box_corrections=r.box_corrections,
        revision=r.revision,
        updated_at=utc(r.updated_at),
    )


def conflict_of(verdict: str | None) -> bool | None:
    """The MLLM conflict flag of a conflict-stage verdict: "conflict" -> True, "no_conflict" -> False, else None
    (unparseable, error, missing)."""
    return {"conflict": True, "no_conflict": False}.get(verdict or "")


def sample_view(session: Session, sample_id: int) -> SampleView:
    """Everything the review screen shows for one sample, in two queries. Raises ReviewError for an unknown id."""
    j = aliased(MllmJudgement)
    latest = (
        select(j.id)
        .where(j.sample_id == Sample.id, j.stage == MllmStage.conflict)
        .order_by(j.created_at.desc(), j.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    n_reviews = select(func.count()).where(Review.sample_id == Sample.id).scalar_subquery()
    row = session.execute(
        select(
            Sample,
            Instance.dataset,
            Instance.external_id,
            Instance.source_image,
            MllmJudgement.verdict,
            MllmJudgement.rationale,
            n_reviews,
        )
        .join(Instance, Instance.id == Sample.instance_id)
        .outerjoin(MllmJudgement, MllmJudgement.id == latest)
        .where(Sample.id == sample_id)
    ).first()
    if row is None:
        raise ReviewError(f"no sample with id {sample_id}")
    sample, dataset, external_id, source_image, verdict, reason, count = row
    turns = session.execute(
        select(Turn.index, Turn.result_image, SubInstruction)
        .outerjoin(SubInstruction, and_(SubInstruction.sample_id == sample_id, SubInstruction.turn_index == Turn.index))
        .where(
            Turn.instance_id == sample.instance_id,
            Turn.index >= sample.first_turn - 1,
            Turn.index <= sample.last_turn,
        )
        .order_by(Turn.index)
    ).all()
    results = {index: image for index, image, _ in turns}
    window = window_images(source_image, results, sample.first_turn, sample.last_turn)
    steps = [("source", window.source[1])]
    steps += [("target" if k == sample.last_turn else f"after turn {k}", image) for k, image in window.steps]
    missing = [label for label, image in steps if image is None]
    if missing:
        raise ReviewError(f"sample {sample_id}: the instance lacks the images for {', '.join(missing)}")
    subs = []
    for _, _, sub in turns:
        if sub is None:
            continue
        box = None
        if sub.box_x0 is not None:
            box = (sub.box_x0, sub.box_y0, sub.box_x1, sub.box_y1)
        subs.append(
            SubInstructionView(
                sub.turn_index,
                sub.text,
                sub.operation.value,
                box,
                sub.box_source.value if sub.box_source else None,
            )
        )
    return SampleView(
        sample_id=sample.id,
        status=sample.status.value,
        dataset=dataset,
        external_id=external_id,
        first_turn=sample.first_turn,
        last_turn=sample.last_turn,
        steps=steps,
        instruction=sample.instruction,
        sub_instructions=subs,
        mllm_verdict=verdict,
        mllm_conflict=conflict_of(verdict),
        mllm_reason=reason,
        flagged=bool(sample.flagged),
        flag_reason=sample.flag_reason,
        n_reviews=int(count or 0),
    )
