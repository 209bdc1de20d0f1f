"""Who is asking: login sessions, roles, the client's address and the key that signs the pre-login cookie.

A login starts a server-side session (:mod:`annotate.sessions`: a ``web_sessions`` row, a random id in an HttpOnly,
SameSite=Lax cookie) holding the user's id. Every request reads that row joined with the user again, so disabling an
account or changing its role takes effect on the next request, not at the next login. Roles are checked on the server:

- :func:`require_user`, :func:`require_reviewer`, :func:`require_lead` are FastAPI dependencies (401/403);
- :class:`RoleGate` guards whole mounted apps (the Gradio review app and the leads' dashboard) by path prefix, so a
  rater gets 403 for every route under ``/dashboard`` - the page, its config and its event queue;
- :func:`gradio_auth_dependency` is what ``gr.mount_gradio_app(auth_dependency=...)`` calls; Gradio then passes the
  username to event handlers as ``request.username``, and :func:`user_for_username` turns it back into a user whose
  role the handler checks again.

Failed logins are counted by :mod:`annotate.web.throttle`. The key that signs the anonymous (pre-login) cookie is
``MCIE_SECRET_KEY`` or, when unset, one generated once into
``<data_dir>/secret_key`` (mode 0600) by :func:`load_secret_key`.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import secrets
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio.to_thread
from fastapi import HTTPException, Request, status
from sqlalchemy import select
from starlette.types import ASGIApp, Receive, Scope, Send

from mcie.annotate.web import sessions
from mcie.annotate.web.edges import send_answer, under, wants_html
from mcie.db.models import Role, User
from mcie.db.session import session_scope

SESSION_COOKIE = sessions.COOKIE
SECRET_KEY_FILE = "secret_key"
SESSION_STUDY_KEY = "study"  # an invite-link session is limited to this study id
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
# the client


def client_ip(request: Request | Scope) -> str:
    """The client's address: the direct peer, or what a trusted proxy forwarded (uvicorn's ProxyHeadersMiddleware
    rewrites ``scope["client"]`` only for peers in ``MCIE_TRUSTED_PROXIES``)."""
    scope = request if isinstance(request, dict) else request.scope
    client = scope.get("client")
    return str(client[0])[:64] if client else "unknown"


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


def session_matches(user: WebUser | None, session: Any) -> WebUser | None:
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
    return session_matches(scope_user(request.scope, database_url or _database_url(request)), session)


def scope_user(scope: Scope, database_url: str) -> WebUser | None:
    """The session's user: the one the session middleware read with the session row, else read now."""
    session = scope.get("session") or {}
    if sessions.USER_KEY in scope:
        user = scope[sessions.USER_KEY]
        return user if user is not None and user.id == session.get("uid") else None
    return load_user(database_url, session.get("uid"))


def session_study(request: Request | Any) -> int | None:
    """The study an invite-link session is limited to, or None (a password session); ``request`` is a Starlette
    request, a Gradio request (its underlying request is used) or an ASGI scope."""
    scope = request if isinstance(request, dict) else getattr(getattr(request, "request", request), "scope", None)
    session = (scope or {}).get("session")
    value = session.get(SESSION_STUDY_KEY) if isinstance(session, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def start_session(request: Request, user: WebUser) -> None:
    """Log ``user`` in: a fresh session with a new id (nothing from before the login survives it)."""
    request.session.clear()
    request.session.update({"uid": user.id, "u": user.username, "p": user.session_tag, "t": int(time.time())})
    request.scope[sessions.ROTATE_KEY] = True
    request.scope[sessions.USER_KEY] = user


def end_session(request: Request) -> None:
    """Log out: the session middleware revokes the session's row when the response starts."""
    request.session.clear()
    request.scope.pop(sessions.USER_KEY, None)


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


async def current_user(scope: Scope, database_url: str) -> WebUser | None:
    """:func:`session_user` for async code (gates, dependencies). The session middleware read the user with the
    session row (``scope[USER_KEY]``), so this is pure work and needs no hop to the thread pool; a read from the
    database (a session without that key: a sub-app outside the middleware) still runs in a worker thread."""
    session = scope.get("session") or {}
    if not session:
        return None
    if sessions.USER_KEY in scope:
        return session_matches(scope_user(scope, database_url), session)
    return session_matches(await anyio.to_thread.run_sync(scope_user, scope, database_url), session)


# The role checks are async on purpose: see current_user.


async def require_user(request: Request) -> WebUser:
    user = await current_user(request.scope, _database_url(request))
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "log in first")
    return user


async def require_reviewer(request: Request) -> WebUser:
    user = await require_user(request)
    if not user.is_reviewer:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only reviewers, leads and admins may do this")
    return user


async def require_lead(request: Request) -> WebUser:
    user = await require_user(request)
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
        return next((rule for rule in self.rules if under(path, rule.prefix)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rule = self._rule_for(scope["path"])
        if rule is None:
            await self.app(scope, receive, send)
            return
        user = await current_user(scope, self.database_url)
        if user is not None and user.role in rule.roles:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4403 if user else 4401})
            return
        await _refuse(scope, send, logged_in=user is not None)


async def _refuse(scope: Scope, send: Send, *, logged_in: bool) -> None:
    if not logged_in and wants_html(scope):
        target = scope["path"] + (("?" + scope["query_string"].decode("latin-1")) if scope.get("query_string") else "")
        await send_answer(send, 303, b"", "text/plain", [(b"location", f"/login?next={quote(target)}".encode())])
        return
    code = status.HTTP_403_FORBIDDEN if logged_in else status.HTTP_401_UNAUTHORIZED
    message = "only leads and admins may open this page" if logged_in else "log in first"
    if wants_html(scope):
        body = refusal_page(code, message).encode()
        await send_answer(send, code, body, "text/html; charset=utf-8")
    else:
        await send_answer(send, code, json.dumps({"detail": message}).encode(), "application/json")


def refusal_page(code: int, message: str) -> str:
    """A small HTML page for 401/403/429 answers (the message is escaped)."""
    title = {401: "Log in first", 403: "Not allowed", 429: "Too many attempts"}.get(code, "Error")
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>mcie - "
        f"{html.escape(title)}</title><link rel=stylesheet href=/static/app.css></head><body class=mcie-page>"
        f"<main class=mcie-card><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
        "<p><a href=/>Back to the start page</a> · <a href=/login>Log in as someone else</a></p></main></body></html>"
    )
