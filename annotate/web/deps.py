"""FastAPI dependencies shared by the JSON routes: the database session of a request, and working slots.

``Depends(get_session, scope="function")`` opens :func:`db.session.session_scope` for the route and commits (or rolls
back on an error, HTTP errors included) when the route function returns, before the answer is sent: a client never
sees a 2xx for work that was not committed.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
from fastapi import Request
from sqlalchemy.orm import Session

from mcie.db.session import session_scope


def database_url(request: Request) -> str:
    """The app's database URL (``create_app`` keeps the settings on ``app.state``)."""
    return request.app.state.settings.database_url


def get_session(request: Request) -> Iterator[Session]:
    """One session (one transaction) per request, on the app's database."""
    with session_scope(database_url(request)) as session:
        yield session


def get_write_session(request: Request) -> Iterator[Session]:
    """:func:`get_session` for read-then-write work that must not interleave (``session_scope(write=True)``)."""
    with session_scope(database_url(request), write=True) as session:
        yield session


def working_limiter(request: Request, name: str, limit: int) -> anyio.CapacityLimiter:
    """The app's limiter ``name`` of ``limit`` working slots (made on first use, inside the event loop).

    Hold one (``async with``) while a request is checked and served: the app is one Python process, so a few
    requests working at a time finish each sooner than twenty sharing the interpreter lock, and an API never takes
    more than ``limit`` of the database pool's connections - a crowd arriving at once waits its turn here, first
    come first served, instead of for a pooled connection (which gives up after 30 s with a 500)."""
    limiter = getattr(request.app.state, name, None)
    if limiter is None:
        limiter = anyio.CapacityLimiter(limit)
        setattr(request.app.state, name, limiter)
    return limiter
