"""The participant's flow through a study: the current screen, progress, votes and moving on. A vote on the current
screen takes one read (:func:`_open_screen`) and locks the screen's row on PostgreSQL, so it cannot cross an
:func:`advance` of the same screen."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, aliased

from mcie.annotate.study.common import (
    LABELS,
    ItemScreen,
    ScreenOutput,
    StudyError,
    StudyNotOpenError,
    StudyProgress,
    assignment_count,
    get_enrolment,
    get_study,
)
from mcie.annotate.study.participants import assign_participant
from mcie.db.models import (
    Study,
    StudyAssignment,
    StudyItem,
    StudyOutput,
    StudyParticipant,
    StudyStatus,
    Vote,
    utcnow,
)
from mcie.db.session import require_write


def _open_study(session: Session, study_id: int) -> Study:
    study = get_study(session, study_id)
    if study.status is not StudyStatus.open:
        raise StudyNotOpenError(f"study {study_id} ({study.name}) is {study.status.value}, not open", study.status)
    return study


def _current(session: Session, study_id: int, user_id: int) -> StudyAssignment | None:
    return session.scalar(
        select(StudyAssignment)
        .where(
            StudyAssignment.study_id == study_id,
            StudyAssignment.participant_id == user_id,
            StudyAssignment.completed_at.is_(None),
        )
        .order_by(StudyAssignment.position)
        .limit(1)
    )


def current_item(session: Session, study_id: int, user_id: int) -> ItemScreen | None:
    """The participant's first screen not yet completed (assigning their sequence on first use); None when done.

    It may write (the assignment), so it needs a write session; :func:`quick_current_item` is the read-only path
    for a participant whose sequence is assigned and who has a screen left."""
    require_write(session, "current_item (it assigns the participant's sequence on first use)")
    screen = quick_current_item(session, study_id, user_id)
    if screen is not None:  # the usual case: three reads
        return screen
    study = _open_study(session, study_id)
    get_enrolment(session, study_id, user_id)
    total = assignment_count(session, study_id, user_id)
    if total:
        return _screen(session, study, user_id, total)
    assign_participant(session, study_id, user_id)
    study = _open_study(session, study_id)
    return _screen(session, study, user_id, assignment_count(session, study_id, user_id))


_ENROLMENT = (StudyParticipant.study_id == StudyAssignment.study_id) & (
    StudyParticipant.user_id == StudyAssignment.participant_id
)


def _live_screens(study_id: int, user_id: int) -> tuple[ColumnElement[bool], ...]:
    """The participant's screens not yet completed, of an open study, while their invitation stands (over
    ``study_assignments`` joined to ``studies`` and the enrolment, :data:`_ENROLMENT`)."""
    return (
        StudyAssignment.study_id == study_id,
        StudyAssignment.participant_id == user_id,
        StudyAssignment.completed_at.is_(None),
        Study.status == StudyStatus.open,
        StudyParticipant.revoked_at.is_(None),
    )


def quick_current_item(session: Session, study_id: int, user_id: int) -> ItemScreen | None:
    """The current screen in three reads when the study is open, the invitation stands and a screen is left; None
    otherwise (:func:`current_item` then assigns the sequence, says the participant is done, or why they cannot go
    on)."""
    total = (
        select(func.count())
        .select_from(StudyAssignment)
        .where(StudyAssignment.study_id == study_id, StudyAssignment.participant_id == user_id)
        .scalar_subquery()
    )
    row = session.execute(
        select(
            StudyAssignment.id,
            StudyAssignment.position,
            StudyAssignment.shown_order,
            StudyItem.id.label("item_id"),
            StudyItem.instruction,
            StudyItem.source_image,
            Study.criteria,
            total.label("total"),
        )
        .join(StudyItem, StudyItem.id == StudyAssignment.item_id)
        .join(Study, Study.id == StudyAssignment.study_id)
        .join(StudyParticipant, _ENROLMENT)
        .where(*_live_screens(study_id, user_id))
        .order_by(StudyAssignment.position)
        .limit(1)
    ).first()
    if row is None:
        return None
    images = dict(
        session.execute(select(StudyOutput.method, StudyOutput.image).where(StudyOutput.item_id == row.item_id)).all()
    )
    votes = session.execute(select(Vote.criterion, Vote.shown_position).where(Vote.assignment_id == row.id))
    return ItemScreen(
        study_id=study_id,
        item_id=row.item_id,
        position=row.position,
        total=int(row.total),
        instruction=row.instruction,
        source_image=row.source_image,
        outputs=tuple(ScreenOutput(LABELS[k], images[m]) for k, m in enumerate(row.shown_order)),
        criteria=tuple(row.criteria),
        choices={c: None if pos is None else LABELS[pos - 1] for c, pos in votes},
    )


def _screen(session: Session, study: Study, user_id: int, total: int) -> ItemScreen | None:
    assignment = _current(session, study.id, user_id)
    if assignment is None:
        return None
    item = session.get(StudyItem, assignment.item_id)
    assert item is not None
    outputs = session.execute(select(StudyOutput.method, StudyOutput.image).where(StudyOutput.item_id == item.id))
    images = {method: image for method, image in outputs}
    votes = session.execute(select(Vote.criterion, Vote.shown_position).where(Vote.assignment_id == assignment.id))
    return ItemScreen(
        study_id=study.id,
        item_id=item.id,
        position=assignment.position,
        total=total,
        instruction=item.instruction,
        source_image=item.source_image,
        outputs=tuple(ScreenOutput(LABELS[k], images[m]) for k, m in enumerate(assignment.shown_order)),
        criteria=tuple(study.criteria),
        choices={c: None if pos is None else LABELS[pos - 1] for c, pos in votes},
    )


def participant_progress(session: Session, study_id: int, user_id: int) -> StudyProgress:
    """How far the participant is: screens completed, screens in their sequence, and whether they finished."""
    enrolment = get_enrolment(session, study_id, user_id, active=False)
    total = assignment_count(session, study_id, user_id)
    done = (
        session.scalar(
            select(func.count())
            .select_from(StudyAssignment)
            .where(
                StudyAssignment.study_id == study_id,
                StudyAssignment.participant_id == user_id,
                StudyAssignment.completed_at.is_not(None),
            )
        )
        or 0
    )
    return StudyProgress(int(done), int(total), enrolment.finished_at is not None)


def _editable_assignment(session: Session, study_id: int, user_id: int, item_id: int) -> StudyAssignment:
    assignment = session.scalar(
        select(StudyAssignment).where(
            StudyAssignment.study_id == study_id,
            StudyAssignment.participant_id == user_id,
            StudyAssignment.item_id == item_id,
        )
    )
    if assignment is None:
        raise StudyError(f"item {item_id} is not in the sequence of user {user_id} in study {study_id}")
    if assignment.completed_at is not None:
        raise StudyError(f"item {item_id} (screen {assignment.position}) is completed; its votes can no longer change")
    current = _current(session, study_id, user_id)
    if current is None or current.id != assignment.id:
        raise StudyError(
            f"item {item_id} (screen {assignment.position}) is not the current screen "
            f"({current.position if current else 'none'})"
        )
    return assignment


@dataclass(frozen=True)
class _OpenScreen:
    assignment_id: int
    position: int
    order: list[str]
    criteria: list[str]


def _open_screen(session: Session, study_id: int, user_id: int, item_id: int) -> _OpenScreen | None:
    """The participant's current screen when it shows ``item_id`` and everything allows a change to it - the study is
    open, the invitation stands, the screen is not completed and none before it is open - in one read (the vote
    path's hot spot); None when any check fails (the callers then find out which with the detailed checks).

    On PostgreSQL the assignment row stays locked until the transaction ends, so a vote and the :func:`advance` of
    the same screen never cross: whichever comes second waits, and reads the row again after the lock (a vote that
    waited for an advance finds the screen completed and is refused)."""
    earlier = aliased(StudyAssignment)
    open_before = (
        select(earlier.id)
        .where(
            earlier.study_id == study_id,
            earlier.participant_id == user_id,
            earlier.completed_at.is_(None),
            earlier.position < StudyAssignment.position,
        )
        .exists()
    )
    row = session.execute(
        select(StudyAssignment.id, StudyAssignment.position, StudyAssignment.shown_order, Study.criteria)
        .join(Study, Study.id == StudyAssignment.study_id)
        .join(StudyParticipant, _ENROLMENT)
        .where(*_live_screens(study_id, user_id), StudyAssignment.item_id == item_id, ~open_before)
        .with_for_update(of=StudyAssignment)
    ).first()
    if row is None:
        return None
    return _OpenScreen(int(row.id), int(row.position), list(row.shown_order), list(row.criteria))


def _checked_screen(session: Session, study_id: int, user_id: int, item_id: int) -> _OpenScreen:
    """:func:`_open_screen`, or the StudyError that says why the screen cannot change."""
    screen = _open_screen(session, study_id, user_id, item_id)
    if screen is not None:
        return screen
    study = _open_study(session, study_id)
    get_enrolment(session, study_id, user_id)
    assignment = _editable_assignment(session, study_id, user_id, item_id)
    return _OpenScreen(assignment.id, assignment.position, list(assignment.shown_order), list(study.criteria))


def cast_vote(
    session: Session,
    study_id: int,
    user_id: int,
    item_id: int,
    criterion: str,
    choice_label: str | None,
    latency_ms: float | None,
) -> None:
    """Record (or change) the participant's choice on the current screen for one criterion; ``choice_label`` None =
    none is acceptable. Refused once the participant has moved past the screen."""
    require_write(session, "cast_vote")
    if latency_ms is not None and (not math.isfinite(latency_ms) or latency_ms < 0):
        raise StudyError(f"latency_ms must be a non-negative number; got {latency_ms!r}")
    screen = _checked_screen(session, study_id, user_id, item_id)
    if criterion not in screen.criteria:
        raise StudyError(f"unknown criterion {criterion!r}: study {study_id} asks for {', '.join(screen.criteria)}")
    order = screen.order
    output_id: Any = None
    position = None
    if choice_label is not None:
        if choice_label not in LABELS[: len(order)]:
            raise StudyError(
                f"unknown choice {choice_label!r}: expected one of {', '.join(LABELS[: len(order)])} "
                "or None (none acceptable)"
            )
        position = LABELS.index(choice_label) + 1
        output_id = (  # looked up by the insert itself: one statement less on the vote path
            select(StudyOutput.id)
            .where(StudyOutput.item_id == item_id, StudyOutput.method == order[position - 1])
            .scalar_subquery()
        )
    insert = (pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert)(Vote).values(
        assignment_id=screen.assignment_id,
        participant_id=user_id,
        item_id=item_id,
        criterion=criterion,
        chosen_output_id=output_id,
        shown_position=position,
        shown_order=order,
        latency_ms=latency_ms,
    )
    changed = ("chosen_output_id", "shown_position", "shown_order", "latency_ms")
    session.execute(
        insert.on_conflict_do_update(
            index_elements=["participant_id", "item_id", "criterion"],
            set_={**{k: insert.excluded[k] for k in changed}, "updated_at": utcnow()},
        )
    )


def advance(session: Session, study_id: int, user_id: int, item_id: int) -> StudyProgress:
    """Complete the current screen (a vote on every criterion is required) and move on; after the last screen the
    participant is marked finished."""
    require_write(session, "advance")
    screen = _checked_screen(session, study_id, user_id, item_id)
    voted = set(session.scalars(select(Vote.criterion).where(Vote.assignment_id == screen.assignment_id)))
    missing = [c for c in screen.criteria if c not in voted]
    if missing:
        raise StudyError(f"item {item_id} (screen {screen.position}) still needs a vote on: {', '.join(missing)}")
    session.execute(
        update(StudyAssignment)
        .where(StudyAssignment.id == screen.assignment_id)
        .values(completed_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    total, done = session.execute(
        select(func.count(), func.count(StudyAssignment.completed_at)).where(
            StudyAssignment.study_id == study_id, StudyAssignment.participant_id == user_id
        )
    ).one()
    if done == total:
        session.execute(
            update(StudyParticipant)
            .where(
                StudyParticipant.study_id == study_id,
                StudyParticipant.user_id == user_id,
                StudyParticipant.finished_at.is_(None),
            )
            .values(finished_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return StudyProgress(int(done), int(total), done == total)
