"""Server-side login sessions: the ``web_sessions`` table, the service around it and the ASGI middleware.

Written by hand (about 300 lines) rather than with starsessions: starsessions keeps an opaque blob per session id
and cannot list or end the sessions *of a user*, which is what logout everywhere, ``mcie users disable`` and a
revoked study invitation need; its SQL store would also mean a second connection pool beside ``db/session.py``.

How it works:

- A login (:func:`annotate.web.auth.start_session`) makes a new row: the cookie gets 32 random bytes (URL-safe
  base64) and the table only their sha256, so a copy of the table opens no session. The row keeps the user, the
  study of an invite link, the session's small data dict (CSRF token ...), created / last-seen / absolute expiry,
  the user agent and the client IP.
- Every request with such a cookie costs one indexed read that joins the user (``scope["mcie.user"]`` then
  saves the routes and gates their own user read). A session is valid while it is not revoked, before
  ``expires_at`` (absolute lifetime) and while ``last_seen_at`` is within the idle timeout. ``last_seen_at`` is
  written at most once per ``session_touch_interval_s`` per session, not on every request.
- Logout (the session dict cleared) revokes the row at once; so do password changes, disabling an account
  (:mod:`annotate.accounts`), ``mcie users sessions NAME --revoke-all`` and revoking a study invitation. Every
  replica reads the same table, so a revoked session is refused everywhere on its next request.
- Before login a visitor has no row: the little they carry (the login form's CSRF token) lives in a signed cookie
  (``a.`` prefix, itsdangerous like Starlette's), so anonymous traffic never writes to the database.

The middleware keeps Starlette's interface: ``scope["session"]`` is a dict, so the routes did not change.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from base64 import b64decode, b64encode
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from typing import Any

import anyio.to_thread
import itsdangerous
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.models import User, WebSession, utcnow
from db.session import session_scope

COOKIE = "mcie_session"
ANON_PREFIX = "a."
USER_KEY = "mcie.user"  # scope key: the WebUser the session belongs to (read with the session)
ROTATE_KEY = "mcie.session_rotate"  # scope key: start_session asks for a new id (no fixation)
MAX_COOKIE_CHARS = 4000


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


def _study(data: dict[str, Any]) -> int | None:
    value = data.get("study")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ----------------------------------------------------------------------------------------------------------
# the service


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
            study_id=_study(data),
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


# ----------------------------------------------------------------------------------------------------------
# the middleware


@dataclass
class _Loaded:
    id_hash: str
    user_id: int
    last_seen_at: datetime


class ServerSessionMiddleware:
    """ASGI middleware that fills ``scope["session"]`` from the ``web_sessions`` row of the cookie and writes it
    back when the response starts (before any byte of it is sent, so a login's cookie exists only once its row is
    committed). ``secure``: the cookie is sent over HTTPS only."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        database_url: str,
        secret_key: str,
        policy: SessionPolicy,
        secure: bool = False,
        cookie: str = COOKIE,
    ) -> None:
        from annotate.web.auth import snapshot  # web_auth reads this module's scope keys; import it late

        self._snapshot = snapshot
        self.app = app
        self.url = database_url
        self.policy = policy
        self.secure = secure
        self.cookie = cookie
        self.signer = itsdangerous.TimestampSigner(secret_key, salt="mcie-anonymous-session")

    # --- cookie codecs ---------------------------------------------------------------------------------------
    def _read_anonymous(self, value: str) -> dict[str, Any]:
        try:
            raw = self.signer.unsign(value.encode(), max_age=self.policy.max_age_s)
            data = json.loads(b64decode(raw))
        except (itsdangerous.BadSignature, ValueError):
            return {}
        return data if isinstance(data, dict) and "uid" not in data else {}

    def _write_anonymous(self, data: dict[str, Any]) -> str:
        return ANON_PREFIX + self.signer.sign(b64encode(json.dumps(data).encode())).decode()

    def _cookie_header(self, value: str, *, clear: bool = False) -> tuple[bytes, bytes]:
        parts = [f"{self.cookie}={value}", "path=/", "httponly", "samesite=lax"]
        parts.append("max-age=0" if clear else f"max-age={self.policy.max_age_s}")
        if clear:
            parts.append("expires=Thu, 01 Jan 1970 00:00:00 GMT")
        if self.secure:
            parts.append("secure")
        return b"set-cookie", "; ".join(parts).encode("latin-1")

    # --- database work (in a worker thread) -----------------------------------------------------------------
    def _load(self, token: str) -> tuple[_Loaded, dict[str, Any], Any] | None:
        with session_scope(self.url) as session:
            found = lookup(session, token, self.policy)
            if found is None:
                return None
            row, user = found
            loaded = _Loaded(row.id_hash, row.user_id, aware(row.last_seen_at))
            return loaded, dict(row.data or {}), self._snapshot(user)

    def _unchanged(self, scope: Scope, loaded: _Loaded | None, data: dict[str, Any], changed: bool) -> bool:
        """The same live session, its data unchanged and its last-seen time recent enough: nothing to write."""
        if loaded is None or changed or scope.get(ROTATE_KEY) or data.get("uid") != loaded.user_id:
            return False
        return (utcnow() - loaded.last_seen_at).total_seconds() < self.policy.touch_interval_s

    def _commit(
        self, scope: Scope, loaded: _Loaded | None, data: dict[str, Any], changed: bool, had_cookie: bool
    ) -> tuple[bytes, bytes] | None:
        uid = data.get("uid")
        logged_in = isinstance(uid, int) and not isinstance(uid, bool)
        rotate = bool(scope.get(ROTATE_KEY))
        if logged_in and loaded is not None and not rotate and loaded.user_id == uid:
            now = utcnow()
            stale = (now - loaded.last_seen_at).total_seconds() >= self.policy.touch_interval_s
            if changed or stale:
                with session_scope(self.url) as session:
                    values: dict[str, Any] = {"last_seen_at": now}
                    if changed:
                        values.update(data=data, study_id=_study(data))
                    session.execute(update(WebSession).where(WebSession.id_hash == loaded.id_hash).values(**values))
            return None
        if logged_in:
            headers = dict(scope.get("headers") or [])
            client = scope.get("client")
            with session_scope(self.url) as session:
                if loaded is not None:
                    revoke(session, loaded.id_hash, "rotated")
                token = create(
                    session, int(uid), data, self.policy,
                    ip=client[0] if client else None,
                    user_agent=headers.get(b"user-agent", b"").decode("latin-1"),
                )
            return self._cookie_header(token)
        if loaded is not None:
            with session_scope(self.url) as session:
                revoke(session, loaded.id_hash, "logout")
        if data and (changed or loaded is not None):
            value = self._write_anonymous(data)
            if len(value) <= MAX_COOKIE_CHARS:
                return self._cookie_header(value)
        if not data and had_cookie:
            return self._cookie_header("", clear=True)
        return None

    # --- ASGI ------------------------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        value = _cookie_value(scope, self.cookie)
        loaded: _Loaded | None = None
        data: dict[str, Any] = {}
        if value.startswith(ANON_PREFIX):
            data = self._read_anonymous(value[len(ANON_PREFIX):])
        elif value and len(value) <= 100:
            found = await anyio.to_thread.run_sync(self._load, value)
            if found is not None:
                loaded, data, user = found
                scope[USER_KEY] = user
        scope["session"] = data
        before = json.dumps(data, sort_keys=True, default=str)

        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                now = scope["session"]
                changed = json.dumps(now, sort_keys=True, default=str) != before
                quiet = (not now and not value) or (loaded is None and now and not changed)  # anonymous, as it was
                if quiet or self._unchanged(scope, loaded, now, changed):
                    header = None  # the usual request: nothing to write, no thread hop
                else:
                    header = await anyio.to_thread.run_sync(self._commit, scope, loaded, now, changed, bool(value))
                if header is not None:
                    message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await self.app(scope, receive, send_wrapper)


def _cookie_value(scope: Scope, name: str) -> str:
    for key, raw in scope.get("headers") or []:
        if key == b"cookie":
            cookie: SimpleCookie = SimpleCookie()
            try:
                cookie.load(raw.decode("latin-1"))
            except Exception:  # a malformed cookie header is no session
                continue
            if name in cookie:
                return cookie[name].value
    return ""
