"""Call a service in a transaction of its own, committed when it returns, as the services did when they took the
database URL: ``write_tx(url, submit_review, uid, sample_id, answer)`` is
``with session_scope(url, write=True) as s: submit_review(s, uid, sample_id, answer)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from mcie.db.session import session_scope

T = TypeVar("T")


def write_tx(url: str, service: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``service(session, *args, **kwargs)`` in a write transaction (``session_scope(url, write=True)``)."""
    with session_scope(url, write=True) as session:
        return service(session, *args, **kwargs)


def read_tx(url: str, service: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``service(session, *args, **kwargs)`` in a plain (read) transaction."""
    with session_scope(url) as session:
        return service(session, *args, **kwargs)

