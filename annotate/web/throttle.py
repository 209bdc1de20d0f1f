"""Login throttling that every replica shares (the ``login_throttle`` table) and that cannot lock a user out.

Failures are counted per key in the database:

- ``pair`` (username, client IP): after ``login_free_failures`` failures each further one blocks the pair for a
  growing delay (``login_delay_base_s`` doubling up to ``login_max_delay_s``). Only that pair is blocked: the same
  user logging in from another address is never refused because someone failed for their name elsewhere, and
  users behind one address do not block each other.
- ``ip`` (all usernames from one IP): ``login_ip_max_failures`` failures block the IP for ``login_max_delay_s``
  (password spraying over many usernames).
- ``join`` (unknown invite links from one IP): like ``ip`` with a cap of 5, for ``/study/join/{token}``.

A key's count restarts when ``login_failure_window_s`` passed since its last failure; a correct password clears its
pair. Every block and every unblock (expired, or a correct password) is written to the audit log.

The client IP is the direct peer unless that peer is one of ``MCIE_TRUSTED_PROXIES`` (uvicorn's
``ProxyHeadersMiddleware`` then takes it from ``X-Forwarded-For``; see :func:`annotate.web.server.create_app`).

Counting happens in one write transaction per failure (``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE``
on PostgreSQL), so concurrent failures on two replicas are all counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from mcie.db.models import AuditLog, LoginThrottleKey
from mcie.db.session import session_scope

PAIR, IP, JOIN = "pair", "ip", "join"


@dataclass(frozen=True)
class ThrottlePolicy:
    free_failures: int = 3
    delay_base_s: float = 2.0
    max_delay_s: float = 900.0
    window_s: float = 3600.0
    ip_max_failures: int = 50
    join_max_failures: int = 5  # invite tokens are 256-bit random: a guesser is blocked early

    @classmethod
    def from_settings(cls, settings: Any) -> ThrottlePolicy:
        return cls(settings.login_free_failures, settings.login_delay_base_s, settings.login_max_delay_s,
                   settings.login_failure_window_s, settings.login_ip_max_failures)


def pair_delay(failures: int, policy: ThrottlePolicy) -> float:
    """Seconds a (username, IP) pair waits after its ``failures``-th failure: 0 for the free ones, then doubling."""
    if failures < policy.free_failures:
        return 0.0
    return min(policy.max_delay_s, policy.delay_base_s * 2.0 ** (failures - policy.free_failures))


def ip_delay(failures: int, cap: int, policy: ThrottlePolicy) -> float:
    return policy.max_delay_s if failures >= cap else 0.0


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _keys(ip: str, username: str | None, *, join: bool) -> list[tuple[str, str, str]]:
    ip = ip[:64]
    if join:
        return [(JOIN, "", ip)]
    keys = [(IP, "", ip)]
    if username:
        keys.insert(0, (PAIR, username.strip().lower()[:64], ip))
    return keys


class LoginThrottle:
    """The service over ``login_throttle`` for one database. ``clock`` (epoch seconds) is for tests."""

    def __init__(self, url: str, policy: ThrottlePolicy | None = None, *, clock: Callable[[], float] = time.time):
        self.url = url
        self.policy = policy or ThrottlePolicy()
        self._clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def retry_after(self, ip: str, username: str | None = None, *, join: bool = False) -> float | None:
        """Seconds until this client may try (the longest over its keys), or None when it may try now."""
        now = self._now()
        keys = _keys(ip, username, join=join)
        match = or_(*(and_(LoginThrottleKey.scope == s, LoginThrottleKey.username == u, LoginThrottleKey.ip == i)
                      for s, u, i in keys))
        with session_scope(self.url) as session:
            blocked = select(LoginThrottleKey).where(match, LoginThrottleKey.blocked_until.is_not(None))
            rows = list(session.scalars(blocked))
        wait = 0.0
        expired = []
        for row in rows:
            until = _aware(row.blocked_until)  # type: ignore[arg-type]
            if until > now:
                wait = max(wait, (until - now).total_seconds())
            else:
                expired.append(row.id)
        if expired:
            self._unblock_expired(expired, now)
        return wait if wait > 0 else None

    def _unblock_expired(self, ids: list[int], now: datetime) -> None:
        with session_scope(self.url, write=True) as session:
            for row in session.scalars(select(LoginThrottleKey).where(LoginThrottleKey.id.in_(ids)).with_for_update()):
                if row.blocked_until is not None and _aware(row.blocked_until) <= now:
                    row.blocked_until = None
                    _audit(session, "login.unblock", row, reason="expired")

    def record_failure(self, ip: str, username: str | None = None, *, join: bool = False) -> float | None:
        """Count one failure for every key of the client; returns the wait it now faces (None if none)."""
        now = self._now()
        policy = self.policy
        wait = 0.0
        with session_scope(self.url, write=True) as session:
            for scope, user, addr in _keys(ip, username, join=join):
                row = _locked_row(session, scope, user, addr, now)
                if (now - _aware(row.last_failure_at)).total_seconds() > policy.window_s or row.failures == 0:
                    row.failures, row.first_failure_at = 0, now
                row.failures += 1
                row.last_failure_at = now
                cap = policy.join_max_failures if scope == JOIN else policy.ip_max_failures
                delay = pair_delay(row.failures, policy) if scope == PAIR else ip_delay(row.failures, cap, policy)
                if delay > 0:
                    was_blocked = row.blocked_until is not None and _aware(row.blocked_until) > now
                    row.blocked_until = now + timedelta(seconds=delay)
                    if not was_blocked:
                        _audit(session, "login.block", row, seconds=delay)
                    wait = max(wait, delay)
        return wait or None

    def record_success(self, ip: str, username: str) -> None:
        """A correct password: forget the pair's failures (the per-IP count stays)."""
        scope, user, addr = _keys(ip, username, join=False)[0]
        with session_scope(self.url, write=True) as session:
            row = session.scalar(select(LoginThrottleKey).where(
                LoginThrottleKey.scope == scope, LoginThrottleKey.username == user, LoginThrottleKey.ip == addr))
            if row is None:
                return
            if row.blocked_until is not None:
                _audit(session, "login.unblock", row, reason="correct password")
            session.execute(delete(LoginThrottleKey).where(LoginThrottleKey.id == row.id))

    def purge(self, *, older_than_s: float | None = None) -> int:
        """Delete keys whose last failure is older than the window and that are not blocked; returns how many."""
        cut = self._now() - timedelta(seconds=older_than_s or self.policy.window_s)
        with session_scope(self.url, write=True) as session:
            result = session.execute(delete(LoginThrottleKey).where(
                LoginThrottleKey.last_failure_at < cut, LoginThrottleKey.blocked_until.is_(None)))
            return int(result.rowcount or 0)


def _locked_row(session: Session, scope: str, user: str, ip: str, now: datetime) -> LoginThrottleKey:
    """The key's row, created if missing, locked for this transaction (two replicas never lose a count)."""
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(
        insert(LoginThrottleKey)
        .values(scope=scope, username=user, ip=ip, failures=0, first_failure_at=now, last_failure_at=now)
        .on_conflict_do_nothing(index_elements=["scope", "username", "ip"])
    )
    row = session.scalar(
        select(LoginThrottleKey)
        .where(LoginThrottleKey.scope == scope, LoginThrottleKey.username == user, LoginThrottleKey.ip == ip)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    assert row is not None
    return row


def _audit(session: Session, action: str, row: LoginThrottleKey, **extra: Any) -> None:
    session.add(AuditLog(action=action, entity="login_throttle", entity_id=str(row.id),
                         details={"scope": row.scope, "username": row.username, "ip": row.ip,
                                  "failures": row.failures, **extra}))
