"""FastAPI dependencies shared by the JSON routes: the database session of a request.

``Depends(get_session, scope="function")`` opens :func:`db.session.session_scope` for the route and commits (or rolls
back on an error, HTTP errors included) when the route function returns, before the answer is sent: a client never
sees a 2xx for work that was not committed.
"""

from __future__ import annotations

from collections.abc import Iterator

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
