"""Server-side login sessions, the cookie side: the ASGI middleware that fills ``scope["session"]`` from the
``web_sessions`` row of the cookie (:mod:`annotate.sessions` owns the table) and writes it back.

- Every request with a session cookie costs one indexed read that joins the user (``scope["mcie.user"]`` then
  saves the routes and gates their own user read). ``last_seen_at`` is written at most once per
  ``session_touch_interval_s`` per session, not on every request.
- Logout (the session dict cleared) revokes the row at once; a login gets a new id (no fixation).
- Before login a visitor has no row: the little they carry (the login form's CSRF token) lives in a signed cookie
  (``a.`` prefix, itsdangerous like Starlette's), so anonymous traffic never writes to the database.

The middleware keeps Starlette's interface: ``scope["session"]`` is a dict, so the routes did not change.
"""

from __future__ import annotations

import json
from base64 import b64decode, b64encode
from dataclasses import dataclass
from datetime import datetime
from http.cookies import SimpleCookie
from typing import Any

import anyio.to_thread
import itsdangerous
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcie.annotate.sessions import SessionPolicy, aware, create, lookup, revoke, touch
from mcie.db.models import utcnow
from mcie.db.session import session_scope

COOKIE = "mcie_session"
ANON_PREFIX = "a."
USER_KEY = "mcie.user"  # scope key: the WebUser the session belongs to (read with the session)
ROTATE_KEY = "mcie.session_rotate"  # scope key: start_session asks for a new id (no fixation)
MAX_COOKIE_CHARS = 4000


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
        from mcie.annotate.web.auth import snapshot  # web_auth reads this module's scope keys; import it late

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
                    touch(session, loaded.id_hash, now, data if changed else None)
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
