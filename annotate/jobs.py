"""The job queue: background work (exports, model previews) as rows of the ``jobs`` table, run by ``mcie worker``.

A job is ``queued`` until a worker claims it; it is then ``running`` under a lease (``lease_until``, ``worker_id``)
that the worker renews while it works (:mod:`annotate.worker`), and ends ``done`` (with a JSON ``result``),
``failed`` (with the error) or ``cancelled``. A failure is retried - the job goes back to ``queued`` - until it has
had ``max_attempts`` tries. A worker killed with ``kill -9`` renews nothing: once its lease has run out the job is
claimed again by any worker, and a job whose tries are used up fails with its last error.

Claiming is the only contended step: on PostgreSQL ``SELECT ... FOR UPDATE SKIP LOCKED`` lets many workers take
different rows without waiting on each other; on SQLite the write transaction starts with ``BEGIN IMMEDIATE``
(:func:`db.session.session_scope` with ``write=True``), so claims are serialised by the database lock. Every
state change checks the ``worker_id`` it expects, so a worker that lost its lease (it stalled past it and another
worker took the job) can no longer finish or fail the job.

Every function takes the caller's ``Session`` and never commits: the worker (:mod:`annotate.worker`) opens one
transaction per step - a claim, a lease renewal, a finish - and the CLI one per command. The read-then-write ones
(:func:`claim`, :func:`fail`, :func:`retry`, :func:`cancel`) want a write transaction
(``session_scope(url, write=True)``); the others are single statements or reads and take any session.

Leads and admins manage jobs with ``mcie jobs list|show|retry|cancel`` and on the dashboard's Export tab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import event, or_, select, update
from sqlalchemy.orm import Session

from mcie.db.models import AuditLog, Job, QueueStatus, utcnow
from mcie.db.session import require_write

KINDS = ("export", "preview", "reliability")
ACTIVE = (QueueStatus.queued, QueueStatus.running)
MAX_ERROR_CHARS = 4000
LOST = "the worker running it stopped renewing its lease (killed or stalled)"


_LISTENERS: list[Callable[[], None]] = []  # workers of this process, woken when it queues a job


def add_listener(wake: Callable[[], None]) -> None:
    _LISTENERS.append(wake)


def remove_listener(wake: Callable[[], None]) -> None:
    if wake in _LISTENERS:
        _LISTENERS.remove(wake)


def _notify(_session: Session) -> None:
    for wake in list(_LISTENERS):
        wake()


class JobError(ValueError):
    """A request about jobs that cannot be done; the message says why."""


@dataclass(frozen=True)
class JobView:
    """One ``jobs`` row as callers see it (detached)."""

    id: int
    kind: str
    payload: dict[str, Any]
    status: str
    attempts: int
    max_attempts: int
    lease_until: datetime | None
    worker_id: str | None
    progress: float
    progress_note: str | None
    error: str | None
    result: dict[str, Any] | None
    requested_by: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for key in ("lease_until", "created_at", "started_at", "finished_at"):
            out[key] = out[key].isoformat() if out[key] is not None else None
        return out


def view(row: Job) -> JobView:
    return JobView(
        row.id, row.kind, dict(row.payload or {}), QueueStatus(row.status).value, row.attempts, row.max_attempts,
        row.lease_until, row.worker_id, float(row.progress or 0.0), row.progress_note, row.error, row.result,
        row.requested_by, row.created_at, row.started_at, row.finished_at,
    )


def _error_text(error: str) -> str:
    return error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 1] + "…"


# ----------------------------------------------------------------------------------------------------------
# producers


def enqueue(
    session: Session,
    kind: str,
    payload: dict[str, Any],
    *,
    requested_by: int | None = None,
    max_attempts: int = 3,
) -> Job:
    """Add a queued job in the caller's transaction (so a job exists exactly when what it works on does)."""
    if kind not in KINDS:
        raise JobError(f"unknown job kind {kind!r} (expected one of {', '.join(KINDS)})")
    job = Job(kind=kind, payload=payload, status=QueueStatus.queued, max_attempts=max(1, max_attempts),
              requested_by=requested_by)
    session.add(job)
    session.flush()
    session.add(AuditLog(user_id=requested_by, action="job.enqueue", entity="job", entity_id=str(job.id),
                         details={"kind": kind}))
    if _LISTENERS:  # a worker in this process starts on it as soon as it is committed (others poll)
        event.listen(session, "after_commit", _notify, once=True)
    return job


def submit(session: Session, kind: str, payload: dict[str, Any], **kwargs: Any) -> JobView:
    """:func:`enqueue`, returned as a :class:`JobView` (the job is queued when the caller commits)."""
    return view(enqueue(session, kind, payload, **kwargs))


# ----------------------------------------------------------------------------------------------------------
# workers


def claim(
    session: Session, worker_id: str, kinds: tuple[str, ...] | list[str], lease_s: float
) -> JobView | None:
    """Take the oldest job of ``kinds`` that is queued, or running under a lease that ran out; None when none.

    A job with a lapsed lease and no tries left is failed with its last error (or :data:`LOST`) instead, in the
    same transaction, and the next one is looked at."""
    require_write(session, "claiming a job")
    now = utcnow()
    while True:
        query = (
            select(Job)
            .where(
                Job.kind.in_(list(kinds)),
                or_(Job.status == QueueStatus.queued,
                    (Job.status == QueueStatus.running) & (Job.lease_until < now)),
            )
            .order_by(Job.id)
            .limit(1)
        )
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        row = session.scalar(query)
        if row is None:
            return None
        if row.status == QueueStatus.running and row.attempts >= row.max_attempts:
            row.status, row.finished_at, row.lease_until = QueueStatus.failed, now, None
            row.error = row.error or LOST
            session.add(AuditLog(action="job.failed", entity="job", entity_id=str(row.id),
                                 details={"kind": row.kind, "error": row.error[:200], "worker": row.worker_id}))
            session.flush()
            continue
        if row.status == QueueStatus.running:
            row.error = LOST  # the last try's error, in case this one dies as well
        row.status = QueueStatus.running
        row.attempts += 1
        row.worker_id = worker_id[:128]
        row.lease_until = now + timedelta(seconds=lease_s)
        row.started_at = now
        row.progress, row.progress_note = 0.0, None
        session.flush()
        return view(row)


def renew(
    session: Session,
    job_id: int,
    worker_id: str,
    lease_s: float,
    *,
    progress: float | None = None,
    note: str | None = None,
) -> bool:
    """Extend the lease (and record progress); False when the job is no longer this worker's (cancelled, or taken
    over after the lease lapsed) - the worker should then stop working on it."""
    values: dict[str, Any] = {"lease_until": utcnow() + timedelta(seconds=lease_s)}
    if progress is not None:
        values["progress"] = min(1.0, max(0.0, float(progress)))
    if note is not None:
        values["progress_note"] = note[:255]
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == QueueStatus.running)
        .values(**values)
    )
    return bool(result.rowcount)


def finish(session: Session, job_id: int, worker_id: str, result: dict[str, Any] | None = None) -> bool:
    """Record the job ``done`` with its ``result``; False when the job is no longer this worker's."""
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == QueueStatus.running)
        .values(status=QueueStatus.done, result=result or {}, progress=1.0, finished_at=utcnow(),
                lease_until=None, error=None)
    ).rowcount
    return bool(done)


def fail(session: Session, job_id: int, worker_id: str, error: str) -> str | None:
    """Record a failed try: back to ``queued`` while tries are left, else ``failed``. Returns the new status (None
    when the job was not this worker's any more)."""
    require_write(session, "failing a job")
    row = session.get(Job, job_id, with_for_update=session.get_bind().dialect.name == "postgresql")
    if row is None or row.worker_id != worker_id or row.status != QueueStatus.running:
        return None
    row.error = _error_text(error)
    row.lease_until = None
    if row.attempts < row.max_attempts:
        row.status = QueueStatus.queued
    else:
        row.status, row.finished_at = QueueStatus.failed, utcnow()
        session.add(AuditLog(action="job.failed", entity="job", entity_id=str(row.id),
                             details={"kind": row.kind, "error": row.error[:200], "worker": worker_id}))
    session.flush()
    return QueueStatus(row.status).value


def release(session: Session, job_id: int, worker_id: str) -> bool:
    """Give a job back unfinished (a worker stopping on SIGTERM): queued again, the try not counted."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == QueueStatus.running)
        .values(status=QueueStatus.queued, lease_until=None, worker_id=None, attempts=Job.attempts - 1)
    )
    return bool(result.rowcount)


# ----------------------------------------------------------------------------------------------------------
# leads and admins


def get(session: Session, job_id: int) -> JobView:
    row = session.get(Job, job_id)
    if row is None:
        raise JobError(f"no job with id {job_id}")
    return view(row)


def list_jobs(
    session: Session, *, status: str | None = None, kind: str | None = None, limit: int = 50
) -> list[JobView]:
    """The newest jobs first, optionally of one status or kind."""
    query = select(Job).order_by(Job.id.desc()).limit(max(1, min(limit, 10_000)))
    if status is not None:
        try:
            query = query.where(Job.status == QueueStatus(status))
        except ValueError:
            known = ", ".join(s.value for s in QueueStatus)
            raise JobError(f"unknown status {status!r} (expected {known})") from None
    if kind is not None:
        query = query.where(Job.kind == kind)
    return [view(row) for row in session.scalars(query)]


def retry(session: Session, job_id: int, *, actor_id: int | None = None) -> JobView:
    """Queue a failed or cancelled job again with fresh tries."""
    require_write(session, "retrying a job")
    row = session.get(Job, job_id)
    if row is None:
        raise JobError(f"no job with id {job_id}")
    if row.status not in (QueueStatus.failed, QueueStatus.cancelled):
        state = QueueStatus(row.status).value
        raise JobError(f"job {job_id} is {state}: only failed or cancelled jobs are retried")
    row.status, row.attempts, row.finished_at, row.worker_id, row.lease_until = (
        QueueStatus.queued, 0, None, None, None)
    row.progress, row.progress_note = 0.0, None
    session.add(AuditLog(user_id=actor_id, action="job.retry", entity="job", entity_id=str(job_id)))
    session.flush()
    return view(row)


def cancel(session: Session, job_id: int, *, actor_id: int | None = None) -> JobView:
    """Cancel a queued or running job (a running one stops at its worker's next lease renewal)."""
    require_write(session, "cancelling a job")
    row = session.get(Job, job_id)
    if row is None:
        raise JobError(f"no job with id {job_id}")
    if row.status not in ACTIVE:
        state = QueueStatus(row.status).value
        raise JobError(f"job {job_id} is {state}: only queued or running jobs are cancelled")
    row.status, row.finished_at, row.lease_until = QueueStatus.cancelled, utcnow(), None
    session.add(AuditLog(user_id=actor_id, action="job.cancel", entity="job", entity_id=str(job_id)))
    session.flush()
    return view(row)
