"""The review queue: which sample a reviewer gets next, held under a lease that expires if it is abandoned.

Rules (the web app calls only :func:`next_sample`, :func:`release` and :func:`expire_leases`):

* **Pool.** A sample is in the pool while its status is ``ready`` or ``in_review``, it has no ``gold_answers`` row,
  and it still needs reviews: its *active* assignments (``submitted``, or ``leased`` with an unexpired lease) are
  fewer than :func:`reviews_wanted`. Skipped and expired assignments free their slot. The pool is served highest
  ``priority`` first, then lowest id.
* **Nobody sees a sample twice.** A user is never given a sample they have an assignment for, whatever its state
  (skipped, expired and released ones included); the ``(sample_id, user_id)`` unique key enforces it.
* **Leases.** A lease lasts ``lease_minutes``. A user holds at most :data:`MAX_LEASES` (2) unexpired leases: the
  sample on screen and the prefetched next one (``next_sample(session, uid, exclude=[current])``). ``next_sample`` first
  returns the user's oldest unexpired lease not in ``exclude`` (a page reload gets the same sample) and only then
  leases a new sample. Asking for a third raises :class:`QueueError`. A user's own leases on samples that left the
  pool meanwhile (settled, or decided by a lead) are expired instead of being returned.
* **Calibration.** :func:`is_calibration` puts a stable ``calibration_share`` of the samples into the calibration
  set by a multiplicative hash of the id (Knuth's ``id * 2654435761 mod 2**32`` below ``share * 2**32``), computed the
  same way in Python and in SQL, so no column is needed and raising the share only adds samples. Calibration samples
  want ``calibration_reviews`` independent reviews, the others ``reviews_per_sample``.
* **Gold.** Samples with a ``gold_answers`` row are outside the pool. Before each new lease a deterministic draw
  (:func:`gold_draw`, a hash of the user id and their number of assignments so far) says, with probability
  ``gold_rate``, to give a gold sample the user has not seen (lowest id first); if there is none, a pool sample is
  given. Gold leases never change the sample's status and never count toward acceptance. With an empty pool the
  user gets ``None`` (gold samples are only mixed into real work, never served alone).
* **Adaptive policy** (``review_policy = "adaptive"``). Ordinary samples want one review, or their
  ``reviews_target`` once :func:`annotate.acceptance.settle_loaded` asked for another (the posterior is uncertain);
  such follow-ups get a priority above every fresh sample. A rater the newest reliability fit finds less reliable
  (flagged careless, or in the bottom quarter) is given fresh samples first and a follow-up only when no fresh one is
  left, and each rater's gold rate follows :func:`annotate.reliability.adaptive_gold_rate` (more gold while their
  reliability is unknown, uncertain or falling). Leases, ``SKIP LOCKED`` and the windows are the same.
* **Status.** Leasing a ``ready`` sample makes it ``in_review`` (so does a late submit, see ``annotate.reviews``);
  when its leases expire or are released and nothing active is left, :func:`expire_leases` / :func:`release` /
  skipping put it back to ``ready``.
* **Expiry.** A lease whose time is over no longer counts (the queries compare ``lease_expires_at`` with ``now``), so
  the slot is free at once; ``next_sample`` marks the caller's own expired leases ``expired``, and
  :func:`expire_leases` (run periodically by the server) marks everybody's.

Concurrency. On PostgreSQL ``next_sample`` locks the user's row (``FOR UPDATE``: one user's requests queue) and
takes the candidate sample row with ``SELECT ... FOR UPDATE SKIP LOCKED`` (20 reviewers never wait on each other's
candidates), then recounts the sample's active assignments in a fresh statement while holding the lock, because a
lease committed between the query's snapshot and the lock would be invisible to it. Every transaction that adds an
active assignment or a review to a sample holds that sample's row lock, so the recount is exact and no sample gets
more reviews than it wants. On SQLite the whole call is one ``BEGIN IMMEDIATE`` transaction, which serializes
writers. The same code runs on both; ``FOR UPDATE`` renders to nothing on SQLite.

Transactions. :func:`next_sample`, :func:`release` and :func:`expire_leases` take the caller's ``Session``, which
must come from ``session_scope(url, write=True)`` (checked by :func:`db.session.require_write`), and never commit:
the caller does, and a lease counts for others only once it is committed.

Speed. Candidates are looked for in windows of the queue order (the first 32 open samples, then 1024 more, then the
rest), and only the window's rows are checked against the assignments, so a call touches a handful of rows. Finding
the window is a top-N sort of the open samples (about 14 ms at 100,000 samples on PostgreSQL) unless the partial
index ``ix_samples_open_queue`` on ``samples (priority DESC, id) WHERE status IN ('ready', 'in_review')`` exists,
which makes it an index scan of 32 entries; :func:`open_status_clause` writes the condition inline so that the index
matches.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    and_,
    case,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from mcie.annotate.project import ProjectConfig, get_project_config
from mcie.db.models import (
    Assignment,
    AssignmentPurpose,
    AssignmentState,
    GoldAnswer,
    Role,
    Sample,
    SampleStatus,
    User,
)
from mcie.db.session import require_write

OPEN_STATUSES: tuple[SampleStatus, ...] = (SampleStatus.ready, SampleStatus.in_review)
REVIEWER_ROLES: tuple[Role, ...] = (Role.rater, Role.lead, Role.admin)
MAX_LEASES = 2
HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant, ~ 2**32 / golden ratio
HASH_MODULUS = 2**32
WINDOW_SIZES: tuple[int | None, ...] = (32, 1024, None)  # None: the rest of the queue

IdColumn = InstrumentedAttribute[int] | ColumnElement[int]


class QueueError(ValueError):
    """A queue request that cannot be served as asked; the message says why."""


@dataclass(frozen=True)
class Lease:
    """A sample leased to a reviewer until ``expires_at`` (UTC); ``purpose`` is regular, calibration or gold."""

    assignment_id: int
    sample_id: int
    purpose: str
    expires_at: datetime


# ----------------------------------------------------------------------------------------------------------
# pure helpers


def utc(moment: datetime | None) -> datetime:
    """``moment`` in UTC (naive datetimes are taken to be UTC already); the current time when None."""
    if moment is None:
        return datetime.now(UTC)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def calibration_hash(sample_id: int) -> int:
    """Knuth's multiplicative hash of a sample id, in ``[0, 2**32)``; the SQL twin is :func:`calibration_clause`."""
    if isinstance(sample_id, bool) or not isinstance(sample_id, numbers.Integral) or sample_id < 1:
        raise QueueError(f"a sample id is a positive integer; got {sample_id!r}")
    return (int(sample_id) * HASH_MULTIPLIER) % HASH_MODULUS


def calibration_threshold(share: float) -> int:
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 <= share <= 1.0:
        raise QueueError(f"calibration share must be a number between 0 and 1; got {share!r}")
    return math.floor(share * HASH_MODULUS)


def is_calibration(sample_id: int, share: float) -> bool:
    """Whether a sample belongs to the calibration set of the given share (stable: depends on the id only)."""
    return calibration_hash(sample_id) < calibration_threshold(share)


def calibration_clause(id_column: IdColumn, share: float) -> ColumnElement[bool]:
    """SQL condition equal to :func:`is_calibration` for the sample id in ``id_column`` (SQLite and PostgreSQL)."""
    hashed = (id_column * literal_column(str(HASH_MULTIPLIER))) % literal_column(str(HASH_MODULUS))
    return hashed < literal(calibration_threshold(share), BigInteger)


def reviews_wanted(sample_id: int, config: ProjectConfig, target: int | None = None) -> int:
    """Independent reviews a (non-gold) sample wants: ``calibration_reviews`` for calibration samples; otherwise the
    sample's ``reviews_target`` when the adaptive policy set one, else ``reviews_per_sample`` (fixed policy) or 1
    (adaptive policy). Gold samples are outside the pool: each reviewer sees one once, never counted."""
    if is_calibration(sample_id, config.calibration_share):
        return config.calibration_reviews
    if target is not None:
        return int(target)
    return 1 if config.review_policy == "adaptive" else config.reviews_per_sample


def submitted_clause() -> ColumnElement[int]:
    """SQL expression: how many submitted reviews the outer query's ``Sample`` row has (a correlated count)."""
    return (
        select(func.count())
        .select_from(Assignment)
        .where(Assignment.sample_id == Sample.id, Assignment.state == AssignmentState.submitted)
        .scalar_subquery()
    )


def wanted_clause(
    id_column: IdColumn, config: ProjectConfig, target_column: ColumnElement[int | None] | None = None
) -> ColumnElement[int]:
    """SQL expression equal to :func:`reviews_wanted` for the sample id in ``id_column`` (and its ``reviews_target``
    in ``target_column``; without it, the target is taken to be NULL)."""
    base = 1 if config.review_policy == "adaptive" else config.reviews_per_sample
    otherwise: Any = literal(base) if target_column is None else func.coalesce(target_column, base)
    return case((calibration_clause(id_column, config.calibration_share), config.calibration_reviews), else_=otherwise)


def gold_draw(user_id: int, n_assigned: int, rate: float) -> bool:
    """Whether a user's next lease (they have ``n_assigned`` assignments so far) should be a gold sample.

    Deterministic: a hash of (user, count) read as a uniform number in [0, 1) is compared with ``rate``, so over many
    leases the share of gold draws is ``rate`` and a retried request makes the same draw.
    """
    if not 0.0 <= rate <= 1.0:
        raise QueueError(f"gold rate must be between 0 and 1; got {rate!r}")
    digest = hashlib.sha256(f"mcie-gold:{user_id}:{n_assigned}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < rate


def purpose_of(sample_id: int, config: ProjectConfig, *, gold: bool = False) -> AssignmentPurpose:
    if gold:
        return AssignmentPurpose.gold
    if is_calibration(sample_id, config.calibration_share):
        return AssignmentPurpose.calibration
    return AssignmentPurpose.regular


# ----------------------------------------------------------------------------------------------------------
# SQL building blocks shared with annotate.reviews and annotate.acceptance


def active_clause(assignment: type[Assignment], now: datetime) -> ColumnElement[bool]:
    """An assignment that holds a review slot: submitted, or leased and not yet expired at ``now``."""
    return or_(
        assignment.state == AssignmentState.submitted,
        and_(assignment.state == AssignmentState.leased, assignment.lease_expires_at > now),
    )


def open_status_clause(status_column: InstrumentedAttribute[SampleStatus]) -> ColumnElement[bool]:
    """``status IN ('ready', 'in_review')`` with the values inline (not bound), so that PostgreSQL can match a
    partial index on exactly that condition even with generic (prepared) plans."""
    return status_column.in_([literal_column(f"'{status.value}'") for status in OPEN_STATUSES])


def is_gold_clause(id_column: IdColumn) -> ColumnElement[bool]:
    return exists().where(GoldAnswer.sample_id == id_column)


def count_submitted(session: Session, sample_id: int, *, except_user: int | None = None) -> int:
    query = (
        select(func.count())
        .select_from(Assignment)
        .where(Assignment.sample_id == sample_id, Assignment.state == AssignmentState.submitted)
    )
    if except_user is not None:
        query = query.where(Assignment.user_id != except_user)
    return int(session.scalar(query) or 0)


def check_reviewer(session: Session, user_id: int, *, lock: bool = False) -> User:
    """The active reviewer ``user_id`` (locked ``FOR UPDATE`` on PostgreSQL with ``lock``), else QueueError."""
    query = select(User).where(User.id == user_id)
    if lock:
        query = query.with_for_update()
    user = session.scalar(query)
    if user is None:
        raise QueueError(f"no user with id {user_id}")
    if not user.active:
        raise QueueError(f"user {user.username!r} is disabled")
    if user.role not in REVIEWER_ROLES:
        raise QueueError(f"user {user.username!r} is a {user.role.value}; only raters, leads and admins review samples")
    return user


def ensure_reviewer(session: Session, user_id: int, *, lock: bool = False) -> None:
    """:func:`check_reviewer` without loading the ORM object (the same checks and messages)."""
    query = select(User.username, User.active, User.role).where(User.id == user_id)
    if lock:
        query = query.with_for_update()
    row = session.execute(query).first()
    if row is None:
        raise QueueError(f"no user with id {user_id}")
    username, active, role = row
    if not active:
        raise QueueError(f"user {username!r} is disabled")
    role = Role(role)
    if role not in REVIEWER_ROLES:
        raise QueueError(f"user {username!r} is a {role.value}; only raters, leads and admins review samples")


def reopen_idle(session: Session, sample_ids: Sequence[int], now: datetime) -> int:
    """Put ``in_review`` samples without any active assignment back to ``ready``; returns how many.

    Rows another transaction is working on are skipped (``SKIP LOCKED``): that transaction leaves them in review.
    The check runs after the lock is held, in a fresh statement, so a lease committed meanwhile is seen.
    """
    ids = sorted(set(sample_ids))
    if not ids:
        return 0
    locked = list(
        session.scalars(
            select(Sample.id)
            .where(Sample.id.in_(ids), Sample.status == SampleStatus.in_review, ~is_gold_clause(Sample.id))
            .order_by(Sample.id)
            .with_for_update(skip_locked=True)
        )
    )
    if not locked:
        return 0
    busy = exists().where(Assignment.sample_id == Sample.id, active_clause(Assignment, now))
    result = session.execute(
        update(Sample)
        .where(Sample.id.in_(locked), Sample.status == SampleStatus.in_review, ~busy)
        .values(status=SampleStatus.ready)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)


# ----------------------------------------------------------------------------------------------------------
# choosing a sample


def _window(cursor: tuple[float, int] | None, size: int | None) -> Select[tuple[int]]:
    """Ids of the next ``size`` open samples after ``cursor`` = (priority, id) in queue order (priority descending,
    id ascending); all of them when ``size`` is None. Built on an alias so it never correlates with ``samples``."""
    w = aliased(Sample)
    window = select(w.id).where(open_status_clause(w.status))
    if cursor is not None:
        priority, sample_id = cursor
        window = window.where(or_(w.priority < priority, and_(w.priority == priority, w.id > sample_id)))
    window = window.order_by(w.priority.desc(), w.id)
    return window if size is None else window.limit(size)


def _still_open(session: Session, sample_id: int, config: ProjectConfig, now: datetime) -> bool:
    """Re-check a locked candidate in a fresh statement (PostgreSQL: sees leases committed after our snapshot)."""
    active = (
        select(func.count())
        .select_from(Assignment)
        .where(Assignment.sample_id == sample_id, active_clause(Assignment, now))
        .scalar_subquery()
    )
    row = session.execute(select(Sample.status, active, Sample.reviews_target).where(Sample.id == sample_id)).first()
    if row is None:
        return False
    status, n_active, target = row
    return status in OPEN_STATUSES and int(n_active or 0) < reviews_wanted(sample_id, config, target)


def _pick_pool_sample(
    session: Session, user_id: int, config: ProjectConfig, now: datetime, *, fresh_only: bool = False
) -> int | None:
    """Lock and return the first pool sample (queue order) this user may get, or None when there is none; with
    ``fresh_only``, only samples the adaptive policy has not asked a further review for."""
    mine = exists().where(Assignment.sample_id == Sample.id, Assignment.user_id == user_id)
    active = (
        select(func.count())
        .select_from(Assignment)
        .where(Assignment.sample_id == Sample.id, active_clause(Assignment, now))
        .scalar_subquery()
    )
    cursor: tuple[float, int] | None = None
    lost: set[int] = set()  # candidates that filled up between our snapshot and our lock
    for size in WINDOW_SIZES:
        window = _window(cursor, size)
        while True:
            query = select(Sample.id).where(
                Sample.id.in_(window.scalar_subquery()),
                ~is_gold_clause(Sample.id),
                ~mine,
                active < wanted_clause(Sample.id, config, Sample.reviews_target),
            )
            if lost:
                query = query.where(Sample.id.not_in(sorted(lost)))
            if fresh_only:
                query = query.where(Sample.reviews_target.is_(None))
            query = query.order_by(Sample.priority.desc(), Sample.id).limit(1)
            sample_id = session.scalar(query.with_for_update(skip_locked=True, of=Sample))
            if sample_id is None:
                break
            if _still_open(session, sample_id, config, now):
                return int(sample_id)
            lost.add(int(sample_id))
        if size is None:
            return None
        last = session.execute(
            select(Sample.priority, Sample.id)
            .where(Sample.id.in_(window.scalar_subquery()))
            .order_by(Sample.priority.asc(), Sample.id.desc())
            .limit(1)
        ).first()
        if last is None:  # nothing after the cursor
            return None
        cursor = (float(last[0]), int(last[1]))
    return None


def _pick_gold_sample(session: Session, user_id: int) -> int | None:
    seen = exists().where(Assignment.sample_id == GoldAnswer.sample_id, Assignment.user_id == user_id)
    return session.scalar(select(GoldAnswer.sample_id).where(~seen).order_by(GoldAnswer.sample_id).limit(1))


def _stale_clause(now: datetime) -> ColumnElement[bool]:
    """A leased assignment that :func:`_expire_own` would expire: its time is over, or its sample left the pool."""
    gone = (
        select(Sample.id)
        .where(Sample.status.not_in(OPEN_STATUSES), ~is_gold_clause(Sample.id))
        .where(Sample.id == Assignment.sample_id)
        .exists()
    )
    return or_(Assignment.lease_expires_at <= now, gone)


def _held(session: Session, user_id: int, now: datetime) -> list[Any]:
    """The user's leased assignments (oldest first) with whether each is stale (see :func:`_stale_clause`)."""
    stale = case((_stale_clause(now), True), else_=False).label("stale")
    return list(
        session.execute(
            select(Assignment.id, Assignment.sample_id, Assignment.purpose, Assignment.lease_expires_at, stale)
            .where(Assignment.user_id == user_id, Assignment.state == AssignmentState.leased)
            .order_by(Assignment.leased_at, Assignment.id)
        )
    )


def _lease_of_row(row: Any) -> Lease:
    return Lease(
        assignment_id=int(row.id),
        sample_id=int(row.sample_id),
        purpose=AssignmentPurpose(row.purpose).value,
        expires_at=utc(row.lease_expires_at),
    )


def _expire_own(session: Session, user_id: int, now: datetime) -> None:
    """Expire the user's leases that ran out, and their leases on samples that have left the pool."""
    session.execute(
        update(Assignment)
        .where(
            Assignment.user_id == user_id,
            Assignment.state == AssignmentState.leased,
            Assignment.lease_expires_at <= now,
        )
        .values(state=AssignmentState.expired, finished_at=Assignment.lease_expires_at)
        .execution_options(synchronize_session=False)
    )
    gone = (
        select(Sample.id)
        .where(Sample.status.not_in(OPEN_STATUSES), ~is_gold_clause(Sample.id))
        .where(Sample.id == Assignment.sample_id)
        .exists()
    )
    session.execute(
        update(Assignment)
        .where(Assignment.user_id == user_id, Assignment.state == AssignmentState.leased, gone)
        .values(state=AssignmentState.expired, finished_at=now)
        .execution_options(synchronize_session=False)
    )


def _adaptive_rater(session: Session, user_id: int, config: ProjectConfig) -> tuple[float, bool]:
    """The adaptive policy's view of a rater from the newest reliability fit: their gold rate
    (:func:`annotate.reliability.adaptive_gold_rate`) and whether they are among the less reliable raters."""
    from mcie.annotate import reliability_service
    from mcie.annotate.reliability import adaptive_gold_rate

    _, fit = reliability_service.latest_fit(session)
    report = reliability_service.rater_report(fit, user_id)
    previous = None if report is None else report.get("previous_skill")
    rate = adaptive_gold_rate(config.gold_rate, report, previous, max_factor=config.adaptive.gold_max_factor)
    return rate, reliability_service.is_less_reliable(fit, user_id)


def next_sample(
    session: Session, user_id: int, *, exclude: Sequence[int] = (), now: datetime | None = None
) -> Lease | None:
    """The sample this reviewer should look at now, leased to them; None when there is nothing left for them.

    Returns their oldest unexpired lease whose sample is not in ``exclude`` (reloads get the same sample; the UI
    prefetches with ``exclude=[current]``), otherwise leases a new sample (gold at ``gold_rate``). Raises
    :class:`QueueError` for an unknown, disabled or non-reviewer user, or when they already hold two leases that are
    both excluded. Needs a write session; the caller commits.
    """
    require_write(session, "next_sample")
    now = utc(now)
    excluded = set(exclude)
    ensure_reviewer(session, user_id, lock=True)
    config = get_project_config(session)
    # the user's leases, each with whether _expire_own would expire it: the updates run only when one would
    held = _held(session, user_id, now)
    if any(row.stale for row in held):
        _expire_own(session, user_id, now)
        held = _held(session, user_id, now)
    for row in held:
        if row.sample_id not in excluded:
            return _lease_of_row(row)
    if len(held) >= MAX_LEASES:
        ids = ", ".join(str(a.sample_id) for a in held)
        raise QueueError(
            f"user {user_id} already holds {len(held)} leased samples ({ids}); submit, skip or release one first"
        )
    n_assigned = int(
        session.scalar(select(func.count()).select_from(Assignment).where(Assignment.user_id == user_id)) or 0
    )
    gold_rate = config.gold_rate
    sample_id = None
    if config.review_policy == "adaptive":
        gold_rate, less_reliable = _adaptive_rater(session, user_id, config)
        if less_reliable:  # follow-up reviews go preferably to more reliable raters
            sample_id = _pick_pool_sample(session, user_id, config, now, fresh_only=True)
    if sample_id is None:
        sample_id = _pick_pool_sample(session, user_id, config, now)
    if sample_id is None:
        return None  # gold samples are only mixed into real work
    gold = False
    if gold_rate > 0 and gold_draw(user_id, n_assigned, gold_rate):
        gold_id = _pick_gold_sample(session, user_id)
        if gold_id is not None:  # the pool sample's row lock is simply released at commit
            sample_id, gold = gold_id, True
    purpose = purpose_of(sample_id, config, gold=gold)
    expires_at = now + timedelta(minutes=config.lease_minutes)
    assignment_id = session.scalar(
        insert(Assignment)
        .values(
            sample_id=sample_id,
            user_id=user_id,
            state=AssignmentState.leased,
            purpose=purpose,
            leased_at=now,
            lease_expires_at=expires_at,
        )
        .returning(Assignment.id)
    )
    if not gold:
        session.execute(
            update(Sample)
            .where(Sample.id == sample_id, Sample.status == SampleStatus.ready)
            .values(status=SampleStatus.in_review)
            .execution_options(synchronize_session=False)
        )
    return Lease(
        assignment_id=int(assignment_id),
        sample_id=int(sample_id),
        purpose=purpose.value,
        expires_at=utc(expires_at),
    )


def release(session: Session, user_id: int, sample_id: int, *, now: datetime | None = None) -> bool:
    """Give a lease back (logout, closing the tab): it ends now and frees the slot for others. The user will not be
    given this sample again (nobody sees a sample twice); a review they still submit for it is accepted while the
    sample needs it. Returns False when the user held no lease on the sample. Needs a write session; the caller
    commits."""
    require_write(session, "release")
    now = utc(now)
    result = session.execute(
        update(Assignment)
        .where(
            Assignment.user_id == user_id,
            Assignment.sample_id == sample_id,
            Assignment.state == AssignmentState.leased,
        )
        .values(state=AssignmentState.expired, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:
        return False
    reopen_idle(session, [sample_id], now)
    return True


def expire_leases(session: Session, now: datetime | None = None) -> int:
    """Mark every lease that ran out by ``now`` as expired (their samples go back to ``ready`` when nothing else is
    active on them); returns the number of leases expired. Safe to run at any time, e.g. every minute. Needs a write
    session; the caller commits."""
    require_write(session, "expire_leases")
    now = utc(now)
    rows = session.execute(
        update(Assignment)
        .where(Assignment.state == AssignmentState.leased, Assignment.lease_expires_at <= now)
        .values(state=AssignmentState.expired, finished_at=Assignment.lease_expires_at)
        .returning(Assignment.sample_id)
        .execution_options(synchronize_session=False)
    ).all()
    reopen_idle(session, [r[0] for r in rows], now)
    return len(rows)
