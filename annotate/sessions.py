"""Server-side login sessions, the service: the ``web_sessions`` table's rows made, found, ended, listed and purged.

Every function takes the caller's :class:`~sqlalchemy.orm.Session`. The cookie side (reading and writing
``scope["session"]``) is :mod:`annotate.web.sessions`; accounts, study invitations and the CLI end sessions here
without reaching into the web layer.

Written by hand (about 300 lines with the middleware) rather than with starsessions: starsessions keeps an opaque
blob per session id and cannot list or end the sessions *of a user*, which is what logout everywhere,
``mcie users disable`` and a revoked study invitation need; its SQL store would also mean a second connection pool
beside ``db/session.py``.

- A login (:func:`annotate.web.auth.start_session`) makes a new row (:func:`create`): the cookie gets 32 random
  bytes (URL-safe base64) and the table only their sha256, so a copy of the table opens no session. The row keeps
  the user, the study of an invite link, the session's small data dict (CSRF token ...), created / last-seen /
  absolute expiry, the user agent and the client IP.
- A session is valid (:func:`lookup`) while it is not revoked, before ``expires_at`` (absolute lifetime) and while
  ``last_seen_at`` is within the idle timeout.
- Logout revokes the row at once; so do password changes, disabling an account (:mod:`annotate.accounts`),
  ``mcie users sessions NAME --revoke-all`` and revoking a study invitation (:func:`revoke_user`). Every replica
  reads the same table, so a revoked session is refused everywhere on its next request.
"""


from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mcie.db.models import User, WebSession, utcnow


@dataclass(frozen=True)
class SessionPolicy:
    idle_timeout_s: int = 4 * 3600
    max_age_s: int = 12 * 3600
    touch_interval_s: int = 60

    @classmethod
    def from_settings(cls, settings: Any) -> SessionPolicy:
        return cls(settings.session_idle_timeout_s, settings.session_max_age_s, settings.session_touch_interval_s)


@dataclass(frozen=True)
class SessionInfo:
    """One row of ``mcie users sessions`` (never the id itself: only a short prefix of its hash)."""

    ref: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    ip: str | None
    user_agent: str | None
    study_id: int | None
    revoked_at: datetime | None
    revoked_reason: str | None
    active: bool


def hash_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def aware(value: datetime) -> datetime:
    """SQLite hands back naive UTC datetimes; PostgreSQL aware ones."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def study_of(data: dict[str, Any]) -> int | None:
    value = data.get("study")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def create(
    session: Session,
    user_id: int,
    data: dict[str, Any],
    policy: SessionPolicy,
    *,
    ip: str | None = None,
    user_agent: str | None = None,
    now: datetime | None = None,
) -> str:
    """A new session row for ``user_id``; returns the cookie's id (shown only this once)."""
    now = now or utcnow()
    token = secrets.token_urlsafe(32)
    session.add(
        WebSession(
            id_hash=hash_id(token),
            user_id=user_id,
            study_id=study_of(data),
            data=data,
            created_at=now,
            last_seen_at=now,
            expires_at=now + timedelta(seconds=policy.max_age_s),
            user_agent=(user_agent or "")[:300] or None,
            ip=(ip or "")[:64] or None,
        )
    )
    return token


def lookup(
    session: Session, token: str, policy: SessionPolicy, now: datetime | None = None
) -> tuple[WebSession, User] | None:
    """The valid session of ``token`` with its user (one indexed read), or None."""
    now = now or utcnow()
    row = session.execute(
        select(WebSession, User)
        .join(User, User.id == WebSession.user_id)
        .where(
            WebSession.id_hash == hash_id(token),
            WebSession.revoked_at.is_(None),
            WebSession.expires_at > now,
            WebSession.last_seen_at > now - timedelta(seconds=policy.idle_timeout_s),
        )
    ).first()
    return None if row is None else (row[0], row[1])


def touch(session: Session, id_hash: str, now: datetime, data: dict[str, Any] | None = None) -> None:
    """Record that the session was seen at ``now`` (and store its data dict when it changed)."""
    values: dict[str, Any] = {"last_seen_at": now}
    if data is not None:
        values.update(data=data, study_id=study_of(data))
    session.execute(update(WebSession).where(WebSession.id_hash == id_hash).values(**values))


def revoke(session: Session, id_hash: str, reason: str) -> None:
    session.execute(
        update(WebSession)
        .where(WebSession.id_hash == id_hash, WebSession.revoked_at.is_(None))
        .values(revoked_at=utcnow(), revoked_reason=reason[:64])
    )


def revoke_user(session: Session, user_id: int, reason: str, *, study_id: int | None = None) -> int:
    """End every live session of ``user_id`` (only those of ``study_id``'s invite link when given); returns how many."""
    query = update(WebSession).where(WebSession.user_id == user_id, WebSession.revoked_at.is_(None))
    if study_id is not None:
        query = query.where(WebSession.study_id == study_id)
    result = session.execute(query.values(revoked_at=utcnow(), revoked_reason=reason[:64]))
    return int(result.rowcount or 0)


def sessions_of(
    session: Session, user_id: int, policy: SessionPolicy, *, include_ended: bool = False
) -> list[SessionInfo]:
    """The user's sessions, newest first (live ones only unless ``include_ended``)."""
    now = utcnow()
    rows = session.scalars(
        select(WebSession).where(WebSession.user_id == user_id).order_by(WebSession.created_at.desc())
    )
    out = []
    for row in rows:
        active = (
            row.revoked_at is None
            and aware(row.expires_at) > now
            and aware(row.last_seen_at) > now - timedelta(seconds=policy.idle_timeout_s)
        )
        if active or include_ended:
            out.append(SessionInfo(row.id_hash[:12], aware(row.created_at), aware(row.last_seen_at),
                                   aware(row.expires_at), row.ip, row.user_agent, row.study_id,
                                   row.revoked_at and aware(row.revoked_at), row.revoked_reason, active))
    return out


def purge(session: Session, *, older_than_days: float = 30) -> int:
    """Delete rows that ended (expired or revoked) more than ``older_than_days`` ago; returns how many."""
    from sqlalchemy import delete, or_

    cut = utcnow() - timedelta(days=older_than_days)
    result = session.execute(
        delete(WebSession).where(or_(WebSession.expires_at < cut, WebSession.revoked_at < cut))
    )
    return int(result.rowcount or 0)
