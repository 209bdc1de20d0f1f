"""Answers are validated, committed with every revision kept, refused without an assignment, and the review screen,
progress and history show what the database holds (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import event, func, select

from mcie.annotate.acceptance import adjudicate
from mcie.annotate.queue import expire_leases, next_sample
from mcie.annotate.reviews import (
    Answer,
    Progress,
    ReviewError,
    flag_sample,
    reviewer_history,
    reviewer_progress,
    revise_review,
    sample_view,
    skip_sample,
    submit_review,
    validate_answer,
)
from mcie.db.models import (
    Assignment,
    AssignmentState,
    Decision,
    Instance,
    Review,
    ReviewRevision,
    Sample,
    SampleFlag,
    SampleStatus,
    Turn,
)
from mcie.db.session import engine_for, session_scope
from tests.annotate.factories import (
    add_conflict_judgement,
    configure,
    make_gold,
    make_instance,
    make_sample,
    make_samples,
    make_user,
    make_users,
    sha,
)
from tests.annotate.tx import read_tx, write_tx

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
WINDOW = SimpleNamespace(first_turn=2, last_turn=3)


def _project(url: str, **changes) -> None:
    with session_scope(url) as session:
        configure(session, **({"gold_rate": 0.0, "calibration_share": 0.0} | changes))


# ----------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Answer(True, 0, 3), "quality must be a whole number from 1 to 5; got 0"),
        (Answer(True, 3, 6), "complexity must be a whole number from 1 to 5; got 6"),
        (Answer(True, 3.5, 3), "quality must be a whole number"),  # type: ignore[arg-type]
        (Answer(True, True, 3), "quality must be a whole number"),  # type: ignore[arg-type]
        (Answer("yes", 3, 3), "consistent must be yes"),  # type: ignore[arg-type]
        (Answer(True, 3, 3, comment="x" * 5001), "at most 5000"),
        (Answer(True, 3, 3, box_corrections=[{"turn_index": 2, "box": [0.1, 0.1, 1.2, 0.5]}]), "inside 0..1"),
        (Answer(True, 3, 3, box_corrections=[{"turn_index": 2, "box": [0.5, 0.1, 0.4, 0.5]}]), "x0 < x1"),
        (Answer(True, 3, 3, box_corrections=[{"turn_index": 2, "box": [0.1, 0.5, 0.4, 0.5]}]), "y0 < y1"),
        (Answer(True, 3, 3, box_corrections=[{"turn_index": 1, "box": [0.1, 0.1, 0.4, 0.5]}]), r"turn of this sample"),
        (Answer(True, 3, 3, box_corrections=[{"turn_index": 2, "box": [0.1, 0.1, 0.4]}]), "four numbers"),
        (Answer(True, 3, 3, box_corrections=[{"turn_index": 2, "box": [0, 0, 1, float("nan")]}]), "finite"),
        (Answer(True, 3, 3, box_corrections=[{"turn_index": 2, "bbox": [0, 0, 1, 1]}]), "missing"),
        (
            Answer(True, 3, 3, box_corrections=[{"turn_index": 3, "box": [0, 0, 1, 1]}] * 2),
            "at most one box correction per turn",
        ),
    ],
)
def test_invalid_answers_are_refused_with_a_clear_message(answer: Answer, message: str) -> None:
    with pytest.raises(ReviewError, match=message):
        validate_answer(answer, WINDOW)


def test_a_valid_answer_is_normalized() -> None:
    answer = Answer(False, 1, 5, comment="  two turns recolour the car  ", box_corrections=[
        {"turn_index": 3, "box": (0, 0.25, 1, 0.75)}
    ])
    clean = validate_answer(answer, WINDOW)
    assert clean.comment == "two turns recolour the car"
    assert clean.box_corrections == [{"turn_index": 3, "box": [0.0, 0.25, 1.0, 0.75]}]
    assert validate_answer(Answer(True, 3, 3, comment="   ", box_corrections=[]), WINDOW).comment is None


# ----------------------------------------------------------------------------------------------------------
# submit and revise


def test_submit_then_revise_keeps_every_revision_and_resettles(migrated_url: str) -> None:
    url = migrated_url
    _project(url)
    with session_scope(url) as session:
        sample = make_sample(session, n_turns=3, first_turn=2, last_turn=3).id
        ann, bob = (u.id for u in make_users(session, 2))
    write_tx(url, next_sample, ann, now=T0)
    first = write_tx(url, submit_review, ann, sample, Answer(True, 4, 4, comment="fine"), time_spent_s=40, now=T0)
    assert (first.sample_id, first.revision, first.created_at) == (sample, 1, T0)
    with session_scope(url) as session:
        assert session.get(Sample, sample).status == SampleStatus.accepted  # settled in the same transaction
        assignment = session.scalar(select(Assignment).where(Assignment.sample_id == sample))
        assert assignment.state == AssignmentState.submitted and assignment.finished_at is not None
    with pytest.raises(ReviewError, match=r"already reviewed sample .*revise it instead"):
        write_tx(url, submit_review, ann, sample, Answer(True, 5, 5), time_spent_s=1)

    boxes = [{"turn_index": 2, "box": [0.2, 0.2, 0.6, 0.7]}]
    later = T0 + timedelta(minutes=5)
    second = write_tx(url, revise_review, ann, first.review_id, Answer(False, 4, 4, box_corrections=boxes),
                      time_spent_s=10, now=later)
    third = write_tx(url, revise_review, ann, first.review_id, Answer(False, 2, 3), time_spent_s=5, now=later)
    assert (second.revision, third.revision) == (2, 3)
    assert second.review_id == third.review_id == first.review_id and third.created_at == T0
    with pytest.raises(PermissionError, match="only its author"):
        write_tx(url, revise_review, bob, first.review_id, Answer(True, 5, 5), time_spent_s=1)
    with pytest.raises(ReviewError, match="no review with id"):
        write_tx(url, revise_review, ann, 999_999, Answer(True, 5, 5))

    with session_scope(url) as session:
        revisions = session.execute(
            select(ReviewRevision.revision, ReviewRevision.consistent, ReviewRevision.quality,
                   ReviewRevision.box_corrections, ReviewRevision.time_spent_s)
            .order_by(ReviewRevision.revision)
        ).all()
        review = session.get(Review, first.review_id)
        decisions = session.scalars(select(Decision.outcome).order_by(Decision.id)).all()
        status = session.get(Sample, sample).status
    assert [tuple(r) for r in revisions] == [
        (1, True, 4, None, 40.0),
        (2, False, 4, boxes, 10.0),
        (3, False, 2, None, 5.0),
    ]
    assert (review.revision, review.consistent, review.quality, review.complexity) == (3, False, 2, 3)
    assert review.time_spent_s == 55.0 and review.comment is None
    assert status == SampleStatus.rejected
    assert [d.value for d in decisions] == ["accepted", "rejected"]  # one decision per change of outcome


def test_revising_never_overrides_a_lead_decision(migrated_url: str) -> None:
    url = migrated_url
    _project(url)
    with session_scope(url) as session:
        sample = make_sample(session).id
        ann = make_user(session).id
        lead = make_user(session, role="lead").id
    write_tx(url, next_sample, ann, now=T0)
    record = write_tx(url, submit_review, ann, sample, Answer(False, 2, 2), now=T0)
    write_tx(url, adjudicate, sample, "accepted", lead, "the conflict is only apparent: different cars")
    write_tx(url, revise_review, ann, record.review_id, Answer(False, 1, 1))
    with session_scope(url) as session:
        assert session.get(Sample, sample).status == SampleStatus.accepted
        assert session.scalar(select(func.count()).select_from(ReviewRevision)) == 2


def test_submit_needs_an_assignment_and_a_valid_answer(migrated_url: str) -> None:
    url = migrated_url
    _project(url)
    with session_scope(url) as session:
        sample = make_sample(session).id
        ann, bob = (u.id for u in make_users(session, 2))
    with pytest.raises(ReviewError, match="not assigned to you"):
        write_tx(url, submit_review, ann, sample, Answer(True, 4, 4))
    with pytest.raises(ReviewError, match="no sample with id"):
        write_tx(url, submit_review, ann, 999_999, Answer(True, 4, 4))
    write_tx(url, next_sample, ann, now=T0)
    with pytest.raises(ReviewError, match="quality"):
        write_tx(url, submit_review, ann, sample, Answer(True, 9, 4))
    with pytest.raises(ReviewError, match="time_spent_s cannot be negative"):
        write_tx(url, submit_review, ann, sample, Answer(True, 4, 4), time_spent_s=-3)
    with session_scope(url) as session:  # nothing was written by the refused submits
        assert session.scalar(select(func.count()).select_from(Review)) == 0
        assert session.scalar(select(Assignment.state).where(Assignment.user_id == ann)) == AssignmentState.leased
    with pytest.raises(ReviewError, match="not assigned to you"):
        write_tx(url, submit_review, bob, sample, Answer(True, 4, 4))


def test_a_late_submit_on_an_expired_lease_is_kept_unless_others_finished(migrated_url: str) -> None:
    url = migrated_url
    _project(url, lease_minutes=20)
    with session_scope(url) as session:
        first, second = (s.id for s in make_samples(session, 2))
        ann, bob = (u.id for u in make_users(session, 2))
    assert write_tx(url, next_sample, ann, now=T0).sample_id == first
    assert write_tx(url, next_sample, bob, now=T0 + timedelta(minutes=25)).sample_id == first  # ann's lease ran out
    # nothing lost
    record = write_tx(url, submit_review, ann, first, Answer(True, 5, 4), now=T0 + timedelta(minutes=26))
    assert record.revision == 1
    with pytest.raises(ReviewError, match="already has all its reviews from others"):
        write_tx(url, submit_review, bob, first, Answer(True, 4, 4), now=T0 + timedelta(minutes=27))
    # bob's lease on the finished sample is dropped: he is given the next one
    assert write_tx(url, next_sample, bob, now=T0 + timedelta(minutes=28)).sample_id == second
    with session_scope(url) as session:
        assert session.scalar(select(func.count()).where(Review.sample_id == first)) == 1
        state = session.scalar(select(Assignment.state).where(Assignment.user_id == bob, Assignment.sample_id == first))
        assert state == AssignmentState.expired


def test_a_late_submit_puts_a_returned_sample_back_in_review(migrated_url: str) -> None:
    url = migrated_url
    _project(url, calibration_share=1.0, calibration_reviews=3)
    with session_scope(url) as session:
        sample = make_sample(session).id
        ann = make_user(session).id
    write_tx(url, next_sample, ann, now=T0)
    assert write_tx(url, expire_leases, now=T0 + timedelta(hours=1)) == 1
    with session_scope(url) as session:
        assert session.get(Sample, sample).status == SampleStatus.ready
    write_tx(url, submit_review, ann, sample, Answer(True, 4, 4), now=T0 + timedelta(hours=1))
    with session_scope(url) as session:
        assert session.get(Sample, sample).status == SampleStatus.in_review  # 1 of 3 reviews: no longer "ready"


def test_gold_reviews_are_stored_but_settle_nothing(migrated_url: str) -> None:
    url = migrated_url
    _project(url, gold_rate=0.5)
    with session_scope(url) as session:
        sample = make_sample(session)
        make_gold(session, sample)
        sample_id = sample.id
        rita = make_user(session).id
    assert write_tx(url, next_sample, rita, now=T0) is None  # gold is never served alone: the pool is empty
    with session_scope(url) as session:
        make_samples(session, 10)
    while (lease := write_tx(url, next_sample, rita, now=T0)) is not None and lease.purpose != "gold":
        write_tx(url, submit_review, rita, lease.sample_id, Answer(True, 4, 4), now=T0)
    assert lease is not None and lease.sample_id == sample_id
    write_tx(url, submit_review, rita, sample_id, Answer(False, 2, 2), now=T0)
    with session_scope(url) as session:
        assert session.get(Sample, sample_id).status == SampleStatus.ready
        assert session.scalar(select(func.count()).where(Decision.sample_id == sample_id)) == 0


def test_flagging_records_the_reason_and_the_review_goes_on(migrated_url: str) -> None:
    url = migrated_url
    _project(url)
    with session_scope(url) as session:
        sample = make_sample(session).id
        ann = make_user(session).id
    write_tx(url, next_sample, ann, now=T0)
    with pytest.raises(ReviewError, match="reason is required to flag"):
        write_tx(url, flag_sample, ann, sample, "")
    flag_id = write_tx(url, flag_sample, ann, sample, "offensive content in the target")
    write_tx(url, flag_sample, ann, sample, "watermark")
    write_tx(url, submit_review, ann, sample, Answer(True, 4, 4), now=T0)
    with session_scope(url) as session:
        flag = session.get(SampleFlag, flag_id)
        row = session.get(Sample, sample)
        assert (flag.user_id, flag.reason) == (ann, "offensive content in the target")
        assert row.flagged and row.flag_reason == "offensive content in the target; watermark"
        assert row.status == SampleStatus.accepted


# ----------------------------------------------------------------------------------------------------------
# reads


def test_progress_and_history(migrated_url: str) -> None:
    url = migrated_url
    _project(url, calibration_share=1.0, calibration_reviews=2)
    with session_scope(url) as session:
        samples = [s.id for s in make_samples(session, 5)]
        ann, bob = (u.id for u in make_users(session, 2))
    yesterday, today = T0 - timedelta(days=1), T0 + timedelta(hours=3)
    assert read_tx(url, reviewer_progress, ann, now=today) == Progress(done_today=0, done_total=0, queue_left=5)
    records = []
    for when in (yesterday, yesterday, today):
        lease = write_tx(url, next_sample, ann, now=when)
        records.append(write_tx(url, submit_review, ann, lease.sample_id, Answer(True, 3, 4), now=when))
    lease = write_tx(url, next_sample, bob, now=today)  # bob leases the first sample, which wants one more review
    assert lease.sample_id == samples[0]
    progress = read_tx(url, reviewer_progress, ann, now=today)
    assert (progress.done_today, progress.done_total, progress.queue_left) == (1, 3, 2)
    assert read_tx(url, reviewer_progress, bob, now=today).queue_left == 4  # his own lease is not "left"

    write_tx(url, revise_review, ann, records[0].review_id, Answer(False, 2, 2), now=today + timedelta(minutes=1))
    history = read_tx(url, reviewer_history, ann)
    assert [h.review_id for h in history] == [records[0].review_id, records[2].review_id, records[1].review_id]
    assert (history[0].revision, history[0].consistent, history[0].quality) == (2, False, 2)
    assert history[0].instruction == "edit number 1, then edit number 2"
    assert history[0].updated_at == today + timedelta(minutes=1)
    assert [h.review_id for h in read_tx(url, reviewer_history, ann, limit=1, offset=1)] == [records[2].review_id]
    assert read_tx(url, reviewer_history, bob) == []
    with pytest.raises(ReviewError, match="limit"):
        read_tx(url, reviewer_history, ann, limit=0)


def test_sample_view_shows_the_window_in_two_queries(migrated_url: str) -> None:
    url = migrated_url
    with session_scope(url) as session:
        instance = make_instance(session, 4, external_id="car-7")
        later_window = make_sample(session, instance, first_turn=2, last_turn=4, boxes=False)
        first_window = make_sample(session, instance, first_turn=1, last_turn=2)
        add_conflict_judgement(session, later_window, "conflict", "turns 2 and 4 both edit the car",
                               created_at=T0)
        add_conflict_judgement(session, later_window, "no_conflict", "different cars", created_at=T0 + timedelta(1))
        later_window.flagged, later_window.flag_reason = True, "no box was found for turn(s) 3"
        ids = (later_window.id, first_window.id)
        turns = dict(
            session.execute(select(Turn.index, Turn.result_image).where(Turn.instance_id == instance.id)).all()
        )
        source = session.get(Instance, instance.id).source_image

    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    engine = engine_for(url)
    event.listen(engine, "before_cursor_execute", count)
    try:
        view = read_tx(url, sample_view, ids[0])
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(statements) <= 2
    assert (view.dataset, view.external_id, view.first_turn, view.last_turn) == ("demo", "car-7", 2, 4)
    assert view.steps == [("source", turns[1]), ("after turn 2", turns[2]), ("after turn 3", turns[3]),
                          ("target", turns[4])]
    assert view.instruction == "edit number 2, then edit number 3, then edit number 4"
    assert [(s.turn_index, s.operation, s.box, s.box_source) for s in view.sub_instructions] == [
        (2, "remove", None, None),
        (3, "change", None, None),
        (4, "add", None, None),
    ]
    assert (view.mllm_verdict, view.mllm_conflict, view.mllm_reason) == ("no_conflict", False, "different cars")
    assert view.flagged and view.flag_reason == "no box was found for turn(s) 3"
    assert view.n_reviews == 0 and view.status == "ready"

    first = read_tx(url, sample_view, ids[1])
    assert first.steps == [("source", source), ("after turn 1", turns[1]), ("target", turns[2])]
    assert first.sub_instructions[0].box == (0.1, 0.2, 0.5, 0.6) and first.sub_instructions[0].box_source == "mllm"
    assert (first.mllm_verdict, first.mllm_conflict, first.flagged) == (None, None, False)
    assert source == sha("demo/car-7/0")
    with pytest.raises(ReviewError, match="no sample with id"):
        read_tx(url, sample_view, 999_999)


@pytest.mark.parametrize(
    ("service", "args"),
    [
        (submit_review, (1, 1, Answer(True, 4, 4))),
        (revise_review, (1, 1, Answer(True, 4, 4))),
        (skip_sample, (1, 1, "broken")),
        (flag_sample, (1, 1, "broken")),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_the_writers_refuse_a_session_that_is_not_a_write_transaction(sqlite_url: str, service, args) -> None:
    with session_scope(sqlite_url) as session, pytest.raises(RuntimeError, match=f"{service.__name__} reads then"):
        service(session, *args)
