"""Who is asking: login sessions, roles, the login rate limiter and the session-signing key of the web app.

A login puts the user's id into a Starlette session cookie (signed with the secret key, HttpOnly, SameSite=Lax).
Every request then loads that user from the database again, so disabling an account or changing its role takes
effect on the next request, not at the next login. Roles are checked on the server:

- :func:`require_user`, :func:`require_reviewer`, :func:`require_lead` are FastAPI dependencies (401/403);
- :class:`RoleGate` guards whole mounted apps (the Gradio review app and the leads' dashboard) by path prefix, so a
  rater gets 403 for every route under ``/dashboard`` - the page, its config and its event queue;
- :func:`gradio_auth_dependency` is what ``gr.mount_gradio_app(auth_dependency=...)`` calls; Gradio then passes the
  username to event handlers as ``request.username``, and :func:`user_for_username` turns it back into a user whose
  role the handler checks again.

The key that signs sessions is ``MCIE_SECRET_KEY`` or, when unset, one generated once into
``<data_dir>/secret_key`` (mode 0600) by :func:`load_secret_key`.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio.to_thread
from fastapi import HTTPException, Request, status
from sqlalchemy import select
from starlette.types import ASGIApp, Receive, Scope, Send

from db.models import Role, User
from db.session import session_scope

SESSION_COOKIE = "mcie_session"
SESSION_MAX_AGE_S = 12 * 3600
SECRET_KEY_FILE = "secret_key"
REVIEWER_ROLES: frozenset[Role] = frozenset({Role.admin, Role.lead, Role.rater})
LEAD_ROLES: frozenset[Role] = frozenset({Role.admin, Role.lead})


# ----------------------------------------------------------------------------------------------------------
# the session-signing key


def load_secret_key(data_dir: Path, configured: str | None = None) -> str:
    """The configured key, else the one in ``<data_dir>/secret_key``, generated (0600) the first time.

    Creation is exclusive (``O_EXCL``), so two processes starting at once agree on one key.
    """
    if configured:
        return configured
    path = Path(data_dir) / SECRET_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret_key(path)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(secrets.token_urlsafe(48))
    return _read_secret_key(path)


def _read_secret_key(path: Path) -> str:
    for _ in range(50):  # another process may have created it a moment ago and not written it yet
        key = path.read_text(encoding="ascii").strip()
        if key:
            return key
        time.sleep(0.02)
    raise RuntimeError(f"{path} is empty: delete it to generate a new session key, or set MCIE_SECRET_KEY")


# ----------------------------------------------------------------------------------------------------------
# login rate limiting


class LoginRateLimiter:
    """Sliding-window limit on failed logins: at most ``max_failures`` per key in ``window_s`` seconds.

    Keys are free-form (the app uses ``ip:<address>`` and ``user:<name>``), so one attacker can neither try many
    passwords for one account from many addresses nor many accounts from one address. In-process and thread-safe;
    memory is bounded by ``max_keys`` (the least recently failed keys are dropped first).
    """

    def __init__(
        self,
        max_failures: int = 5,
        window_s: float = 300.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if max_failures < 1 or window_s <= 0:
            raise ValueError("max_failures must be >= 1 and window_s > 0")
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _prune(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, *keys: str) -> float | None:
        """Seconds until a blocked key may try again (the largest over ``keys``), or None when none is blocked."""
        now = self._clock()
        wait = 0.0
        with self._lock:
            for key in keys:
                times = self._prune(key, now)
                if times is not None and len(times) >= self.max_failures:
                    # the window slides: the attempt is allowed once enough old failures fall out of it
                    oldest_that_matters = times[len(times) - self.max_failures]
                    wait = max(wait, oldest_that_matters + self.window_s - now)
        return wait if wait > 0 else None

    def record_failure(self, *keys: str) -> None:
        now = self._clock()
        with self._lock:
            for key in keys:
                times = self._prune(key, now)
                if times is None:
                    if len(self._failures) >= self.max_keys:
                        self._evict(now)
                    times = self._failures[key] = deque()
                times.append(now)

    def reset(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)

    def _evict(self, now: float) -> None:
        for key in list(self._failures):
            self._prune(key, now)
        while len(self._failures) >= self.max_keys:
            stalest = min(self._failures, key=lambda k: self._failures[k][-1])
            del self._failures[stalest]


def limiter_keys(client_ip: str, username: str) -> tuple[str, str]:
    return f"ip:{client_ip}", f"user:{username.strip().lower()}"


# ----------------------------------------------------------------------------------------------------------
# users of the web app


@dataclass(frozen=True)
class WebUser:
    """The logged-in user as the web app sees it (a detached snapshot of the ``users`` row).

    ``session_tag`` is derived from the password hash: a session remembers it, so changing a password ends every
    session opened with the old one."""

    id: int
    username: str
    role: Role
    display_name: str | None = None
    session_tag: str = ""

    @property
    def is_lead(self) -> bool:
        return self.role in LEAD_ROLES

    @property
    def is_reviewer(self) -> bool:
        return self.role in REVIEWER_ROLES

    @property
    def shown_name(self) -> str:
        return self.display_name or self.username


def password_tag(password_hash: str | None) -> str:
    return hashlib.sha256((password_hash or "").encode()).hexdigest()[:16]


def snapshot(user: User | None) -> WebUser | None:
    """A detached :class:`WebUser` of an active ``users`` row, or None."""
    if user is None or not user.active:
        return None
    return WebUser(user.id, user.username, Role(user.role), user.display_name, password_tag(user.password_hash))


def _session_matches(user: WebUser | None, session: Any) -> WebUser | None:
    """The user when the session was opened for this very account and password, else None."""
    if user is None or user.username != session.get("u") or user.session_tag != session.get("p"):
        return None  # the id was reused for another account, or the password changed since the login
    return user


def load_user(url: str, user_id: Any) -> WebUser | None:
    """The active user with this id, or None."""
    if not isinstance(user_id, int) or isinstance(user_id, bool):
        return None
    with session_scope(url) as session:
        return snapshot(session.get(User, user_id))


def user_for_username(url: str, username: str | None) -> WebUser | None:
    """The active user with this username (what Gradio hands event handlers as ``request.username``), or None."""
    if not username:
        return None
    with session_scope(url) as session:
        return snapshot(session.scalar(select(User).where(User.username == username)))


def _database_url(request: Request) -> str:
    return request.app.state.settings.database_url


def session_user(request: Request, database_url: str | None = None) -> WebUser | None:
    """The user of this request's session cookie, or None (no cookie, unknown or disabled user).

    ``database_url`` defaults to the main app's settings (a mounted sub-app, such as Gradio's, must pass it)."""
    session = request.scope.get("session")
    if not session:
        return None
    return _session_matches(load_user(database_url or _database_url(request), session.get("uid")), session)


def start_session(request: Request, user: WebUser) -> None:
    """Log ``user`` in: a fresh session (nothing from before the login survives it)."""
    request.session.clear()
    request.session.update({"uid": user.id, "u": user.username, "p": user.session_tag, "t": int(time.time())})


def end_session(request: Request) -> None:
    request.session.clear()


def csrf_token(request: Request) -> str:
    """The session's anti-forgery token for HTML forms (made on first use)."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(24)
    return token


def check_csrf(request: Request, submitted: str | None) -> bool:
    expected = request.session.get("csrf")
    return bool(expected) and bool(submitted) and secrets.compare_digest(str(expected), str(submitted))


# ----------------------------------------------------------------------------------------------------------
# FastAPI dependencies


def require_user(request: Request) -> WebUser:
    user = session_user(request)
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "log in first")
    return user


def require_reviewer(request: Request) -> WebUser:
    user = require_user(request)
    if not user.is_reviewer:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only reviewers, leads and admins may do this")
    return user


def require_lead(request: Request) -> WebUser:
    user = require_user(request)
    if not user.is_lead:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only leads and admins may do this")
    return user


def gradio_auth_dependency(database_url: str, roles: Collection[Role]) -> Callable[[Request], str | None]:
    """For ``gr.mount_gradio_app(auth_dependency=...)``: the username when the session user has one of ``roles``."""
    allowed = frozenset(roles)

    def dependency(request: Request) -> str | None:
        user = session_user(request, database_url)
        return user.username if user is not None and user.role in allowed else None

    return dependency


# ----------------------------------------------------------------------------------------------------------
# guarding mounted apps


@dataclass(frozen=True)
class GateRule:
    prefix: str
    roles: frozenset[Role]


class RoleGate:
    """ASGI middleware: requests under a guarded path prefix need a logged-in user with one of the rule's roles.

    Without a login, a browser asking for a page is sent to ``/login?next=...`` and anything else gets 401; a user
    without the role gets 403. It must sit inside Starlette's ``SessionMiddleware`` (which fills ``scope['session']``).
    """

    def __init__(self, app: ASGIApp, *, database_url: str, rules: Iterable[GateRule]) -> None:
        self.app = app
        self.database_url = database_url
        self.rules = tuple(rules)

    def _rule_for(self, path: str) -> GateRule | None:
        for rule in self.rules:
            if path == rule.prefix or path.startswith(rule.prefix + "/"):
                return rule
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rule = self._rule_for(scope["path"])
        if rule is None:
            await self.app(scope, receive, send)
            return
        session = scope.get("session") or {}
        user = _session_matches(await anyio.to_thread.run_sync(load_user, self.database_url, session.get("uid")),
                                session)
        if user is not None and user.role in rule.roles:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4403 if user else 4401})
            return
        await _refuse(scope, send, logged_in=user is not None)


def _wants_html(scope: Scope) -> bool:
    accept = dict(scope.get("headers") or []).get(b"accept", b"").decode("latin-1")
    return scope.get("method") == "GET" and "text/html" in accept


async def _refuse(scope: Scope, send: Send, *, logged_in: bool) -> None:
    if not logged_in and _wants_html(scope):
        target = scope["path"] + (("?" + scope["query_string"].decode("latin-1")) if scope.get("query_string") else "")
        await _send(scope, send, 303, b"", "text/plain", [(b"location", f"/login?next={quote(target)}".encode())])
        return
    code = status.HTTP_403_FORBIDDEN if logged_in else status.HTTP_401_UNAUTHORIZED
    message = "only leads and admins may open this page" if logged_in else "log in first"
    if _wants_html(scope):
        body = refusal_page(code, message).encode()
        await _send(scope, send, code, body, "text/html; charset=utf-8", [])
    else:
        await _send(scope, send, code, json.dumps({"detail": message}).encode(), "application/json", [])


async def _send(scope: Scope, send: Send, code: int, body: bytes, ctype: str, extra: list[tuple[bytes, bytes]]) -> None:
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def refusal_page(code: int, message: str) -> str:
    """A small HTML page for 401/403/429 answers (the message is escaped)."""
    title = {401: "Log in first", 403: "Not allowed", 429: "Too many attempts"}.get(code, "Error")
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>mcie - "
        f"{html.escape(title)}</title><link rel=stylesheet href=/static/app.css></head><body class=mcie-page>"
        f"<main class=mcie-card><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
        "<p><a href=/>Back to the start page</a> · <a href=/login>Log in as someone else</a></p></main></body></html>"
    )
