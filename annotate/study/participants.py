"""A study's participants: invites (:func:`enrol`, :func:`revoke_invite`, what a link resolves to), which images a
participant may see, listing and resolving studies and participants, and materialising a participant's sequence
(:func:`assign_participant`)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from mcie.annotate import study_design
from mcie.annotate.accounts import check_username, create_user
from mcie.annotate.study.common import (
    ParticipantStatus,
    StudyAccessError,
    StudyError,
    assignment_count,
    get_enrolment,
    get_study,
    hash_token,
)
from mcie.db.models import (
    AuditLog,
    Role,
    Study,
    StudyAssignment,
    StudyItem,
    StudyOutput,
    StudyParticipant,
    StudyStatus,
    User,
    utcnow,
)
from mcie.db.session import require_write


def _new_username(session: Session, study_id: int) -> str:
    while True:
        username = f"study{study_id}-{secrets.token_hex(4)}"
        if session.scalar(select(User.id).where(User.username == username)) is None:
            return username


def enrol(
    session: Session,
    study_id: int,
    username: str | None = None,
    *,
    display_name: str | None = None,
    actor_id: int | None = None,
) -> tuple[User, str]:
    """Enrol a participant and return ``(user, invite_token)``; the token is shown once, only its sha256 is kept.

    Without ``username`` a participant account ``study<id>-<random>`` is created; an unknown username gets a new
    participant account (no password); an existing active account of any role is enrolled as it is. Enrolling an
    enrolled participant again issues a new token (the old link stops working) and lifts a revocation.
    """
    require_write(session, "enrol")
    token = secrets.token_urlsafe(32)
    study = get_study(session, study_id)
    if study.status is StudyStatus.closed:
        raise StudyError(f"study {study_id} ({study.name}) is closed")
    name = check_username(username) if username is not None else _new_username(session, study_id)
    user = session.scalar(select(User).where(User.username == name))
    if user is None:
        user = create_user(session, name, Role.participant, None, display_name=display_name, actor_id=actor_id)
    elif not user.active:
        raise StudyError(f"the account {name!r} is disabled")
    row = session.scalar(
        select(StudyParticipant).where(StudyParticipant.study_id == study_id, StudyParticipant.user_id == user.id)
    )
    if row is None:
        session.add(StudyParticipant(study_id=study_id, user_id=user.id, invite_token_hash=hash_token(token)))
    else:
        row.invite_token_hash, row.revoked_at = hash_token(token), None
    session.add(
        AuditLog(
            user_id=actor_id,
            action="study.enrol",
            entity="study",
            entity_id=str(study_id),
            details={"user_id": user.id, "username": name, "reissued": row is not None},
        )
    )
    session.flush()
    return user, token


def revoke_invite(session: Session, study_id: int, user_id: int, *, actor_id: int | None = None) -> None:
    """Make the participant's invite link stop working (their votes are kept; :func:`enrol` re-invites)."""
    require_write(session, "revoke_invite")
    row = get_enrolment(session, study_id, user_id, active=False)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        from mcie.annotate.sessions import revoke_user

        revoke_user(session, user_id, "invitation revoked", study_id=study_id)  # the link's session ends now
        session.add(
            AuditLog(
                user_id=actor_id,
                action="study.revoke",
                entity="study",
                entity_id=str(study_id),
                details={"user_id": user_id},
            )
        )


def participant_from_token(session: Session, token: str) -> tuple[int, int] | None:
    """``(study_id, user_id)`` of an invite token, or None if it is unknown, revoked, the account is disabled or the
    study is not open."""
    if not token:
        return None
    found = session.execute(
        select(StudyParticipant.study_id, StudyParticipant.user_id)
        .join(Study, Study.id == StudyParticipant.study_id)
        .join(User, User.id == StudyParticipant.user_id)
        .where(
            StudyParticipant.invite_token_hash == hash_token(token),
            StudyParticipant.revoked_at.is_(None),
            Study.status == StudyStatus.open,
            User.active.is_(True),
        )
    ).first()
    return None if found is None else (int(found[0]), int(found[1]))


INVITE_UNKNOWN = (
    "This invitation link is not valid. Please check that you opened the whole link, or ask the study's organisers "
    "for a new one."
)
INVITE_REVOKED = "This invitation link was withdrawn by the study's organisers, so it no longer opens the study."
INVITE_DISABLED = "The account of this invitation is disabled. Please contact the study's organisers."
INVITE_DRAFT = "This study has not started yet. Please open your link again later."
INVITE_CLOSED = "This study is closed. Thank you for your interest!"


def invite_problem(session: Session, token: str) -> str | None:
    """Why an invite token does not open its study, as a sentence for the participant (unknown, withdrawn, account
    disabled, study not started or closed); None when it works (:func:`participant_from_token` returns its ids)."""
    if not token:
        return INVITE_UNKNOWN
    found = session.execute(
        select(StudyParticipant.revoked_at, Study.status, User.active)
        .join(Study, Study.id == StudyParticipant.study_id)
        .join(User, User.id == StudyParticipant.user_id)
        .where(StudyParticipant.invite_token_hash == hash_token(token))
    ).first()
    if found is None:
        return INVITE_UNKNOWN
    revoked_at, status, active = found
    if revoked_at is not None:
        return INVITE_REVOKED
    if not active:
        return INVITE_DISABLED
    if status is StudyStatus.draft:
        return INVITE_DRAFT
    if status is StudyStatus.closed:
        return INVITE_CLOSED
    return None


def participant_study(session: Session, user_id: int) -> int | None:
    """The open study the user takes part in (invitation not revoked), the first unfinished one by enrolment, else
    the first finished one; None when there is none (for a participant who logs in with a password)."""
    rows = session.execute(
        select(StudyParticipant.study_id, StudyParticipant.finished_at)
        .join(Study, Study.id == StudyParticipant.study_id)
        .where(
            StudyParticipant.user_id == user_id,
            StudyParticipant.revoked_at.is_(None),
            Study.status == StudyStatus.open,
        )
        .order_by(StudyParticipant.id)
    ).all()
    unfinished = [study_id for study_id, finished in rows if finished is None]
    return (unfinished or [study_id for study_id, _ in rows] or [None])[0]


def may_see_image(session: Session, user_id: int, sha256: str, study_id: int | None = None) -> bool:
    """Whether ``sha256`` is the source image or an output of an item in the user's own sequence (of ``study_id``
    only, when given) while their invitation stands: what a participant may load."""
    items = (
        select(StudyAssignment.item_id)
        .join(
            StudyParticipant,
            (StudyParticipant.study_id == StudyAssignment.study_id)
            & (StudyParticipant.user_id == StudyAssignment.participant_id),
        )
        .where(StudyAssignment.participant_id == user_id, StudyParticipant.revoked_at.is_(None))
    )
    if study_id is not None:
        items = items.where(StudyAssignment.study_id == study_id)
    source = select(StudyItem.id).where(StudyItem.id.in_(items), StudyItem.source_image == sha256)
    output = select(StudyOutput.id).where(StudyOutput.item_id.in_(items), StudyOutput.image == sha256)
    return bool(session.scalar(select(exists(source) | exists(output))))


def upcoming_images(session: Session, study_id: int, user_id: int, after_position: int, n: int = 1) -> list[str]:
    """The images of the participant's next ``n`` screens after ``after_position`` (to warm the browser's cache);
    never method names."""
    item_ids = list(
        session.scalars(
            select(StudyAssignment.item_id)
            .where(
                StudyAssignment.study_id == study_id,
                StudyAssignment.participant_id == user_id,
                StudyAssignment.position > after_position,
                StudyAssignment.completed_at.is_(None),
            )
            .order_by(StudyAssignment.position)
            .limit(n)
        )
    )
    if not item_ids:
        return []
    sources = list(session.scalars(select(StudyItem.source_image).where(StudyItem.id.in_(item_ids))))
    outputs = list(session.scalars(select(StudyOutput.image).where(StudyOutput.item_id.in_(item_ids))))
    return list(dict.fromkeys([*sources, *outputs]))


@dataclass(frozen=True)
class StudySummary:
    id: int
    name: str
    status: str
    n_items: int
    methods: tuple[str, ...]
    criteria: tuple[str, ...]
    items_per_participant: int
    enrolled: int
    finished: int
    created_at: datetime


def list_studies(session: Session) -> list[StudySummary]:
    """Every study, newest first, with its item count, methods and how many participants enrolled and finished."""
    studies = list(session.scalars(select(Study).order_by(Study.id.desc())))
    n_items = dict(session.execute(select(StudyItem.study_id, func.count()).group_by(StudyItem.study_id)).all())
    methods: dict[int, set[str]] = {}
    pairs = select(StudyItem.study_id, StudyOutput.method).join(StudyItem, StudyItem.id == StudyOutput.item_id)
    for study_id, method in session.execute(pairs.distinct()):
        methods.setdefault(study_id, set()).add(method)
    enrolled = dict(
        session.execute(select(StudyParticipant.study_id, func.count()).group_by(StudyParticipant.study_id)).all()
    )
    finished = dict(
        session.execute(
            select(StudyParticipant.study_id, func.count())
            .where(StudyParticipant.finished_at.is_not(None))
            .group_by(StudyParticipant.study_id)
        ).all()
    )
    return [
        StudySummary(
            s.id,
            s.name,
            s.status.value,
            int(n_items.get(s.id, 0)),
            tuple(sorted(methods.get(s.id, ()))),
            tuple(s.criteria),
            s.items_per_participant,
            int(enrolled.get(s.id, 0)),
            int(finished.get(s.id, 0)),
            s.created_at,
        )
        for s in studies
    ]


def resolve_study(session: Session, key: str | int) -> int:
    """The id of the study named ``key``, or with the id ``key`` (a number); StudyError when there is none."""
    text = str(key).strip()
    found = session.scalar(select(Study.id).where(Study.name == text))
    if found is None and text.isdigit():
        found = session.scalar(select(Study.id).where(Study.id == int(text)))
    if found is None:
        raise StudyError(f"no study named or numbered {text!r}")
    return int(found)


def resolve_participant(session: Session, study_id: int, key: str | int) -> int:
    """The user id of the study's participant with the username ``key``, or the user id ``key`` (a number)."""
    text = str(key).strip()
    enrolled = select(StudyParticipant.user_id).where(StudyParticipant.study_id == study_id)
    found = session.scalar(select(User.id).where(User.username == text.lower(), User.id.in_(enrolled)))
    if found is None and text.isdigit():
        found = session.scalar(select(User.id).where(User.id == int(text), User.id.in_(enrolled)))
    if found is None:
        raise StudyAccessError(f"no participant {text!r} in study {study_id}")
    return int(found)


@dataclass(frozen=True)
class _Layout:
    items: list[StudyItem]
    methods: list[str]
    attention: list[int]


def _layout(session: Session, study_id: int) -> _Layout:
    """The design's view of a study: items in id order, methods sorted, attention item indices."""
    items = list(session.scalars(select(StudyItem).where(StudyItem.study_id == study_id).order_by(StudyItem.id)))
    methods = sorted(
        set(
            session.scalars(
                select(StudyOutput.method)
                .join(StudyItem, StudyItem.id == StudyOutput.item_id)
                .where(StudyItem.study_id == study_id)
            )
        )
    )
    return _Layout(items, methods, [k for k, item in enumerate(items) if item.is_attention_check])


def assign_participant(session: Session, study_id: int, user_id: int) -> int:
    """Materialise the participant's sequence into ``study_assignments``; returns its length. Idempotent.

    The n-th participant of the study to be assigned (0-based) takes sequence n of
    ``study_design.design(n_items, n_methods, n + 1, items_per_participant, seed, attention_items)``.
    """
    require_write(session, "assign_participant")
    study = get_study(session, study_id, lock=True)  # serialises assignments (SELECT ... FOR UPDATE on PostgreSQL)
    get_enrolment(session, study_id, user_id)
    existing = assignment_count(session, study_id, user_id)
    if existing:
        return existing
    index = (
        session.scalar(
            select(func.count(func.distinct(StudyAssignment.participant_id))).where(
                StudyAssignment.study_id == study_id
            )
        )
        or 0
    )
    layout = _layout(session, study_id)
    sequence = study_design.design(
        len(layout.items), len(layout.methods), index + 1, study.items_per_participant, study.seed, layout.attention
    ).sequences[index]
    session.add_all(
        StudyAssignment(
            study_id=study_id,
            participant_id=user_id,
            item_id=layout.items[screen.item].id,
            position=k,
            shown_order=[layout.methods[m] for m in screen.order],
        )
        for k, screen in enumerate(sequence, start=1)
    )
    session.flush()
    return len(sequence)


def participants_status(session: Session, study_id: int) -> list[ParticipantStatus]:
    """Every enrolled participant with their progress, in enrolment order."""
    get_study(session, study_id)
    counts = {
        row.participant_id: (int(row.assigned), int(row.completed))
        for row in session.execute(
            select(
                StudyAssignment.participant_id,
                func.count().label("assigned"),
                func.count(StudyAssignment.completed_at).label("completed"),
            )
            .where(StudyAssignment.study_id == study_id)
            .group_by(StudyAssignment.participant_id)
        )
    }
    rows = session.execute(
        select(StudyParticipant, User.username)
        .join(User, User.id == StudyParticipant.user_id)
        .where(StudyParticipant.study_id == study_id)
        .order_by(StudyParticipant.id)
    ).all()
    return [
        ParticipantStatus(
            p.user_id,
            username,
            p.invited_at,
            p.revoked_at is not None,
            *counts.get(p.user_id, (0, 0)),
            p.finished_at,
            p.excluded,
            p.exclusion_reason,
        )
        for p, username in rows
    ]
