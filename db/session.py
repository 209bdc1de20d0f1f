"""The only place that opens database connections: engines, sessions and transactions.

Every other module gets a :class:`sqlalchemy.orm.Session` from :func:`session_scope` (or a sessionmaker from
:func:`sessionmaker_for`) and never builds an engine itself. Services take that ``Session`` and never commit: the
caller (a FastAPI dependency, a CLI command, the worker) owns the transaction; a service that reads then writes
checks it was given a write transaction (:func:`require_write`). SQLite gets the pragmas a multi-user app needs (foreign
keys on, WAL journal, a busy timeout) and ``session_scope(write=True)`` starts a write transaction up front so
concurrent writers queue instead of failing half-way; PostgreSQL uses a normal pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

WRITE_KEY = "mcie.write"  # Session.info: begun by session_scope(write=True)


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _on_sqlite_connect(dbapi_connection, _record) -> None:
    # Let SQLAlchemy, not pysqlite, decide when transactions begin (needed for BEGIN IMMEDIATE).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _on_sqlite_begin(conn) -> None:
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str, *, echo: bool = False, pool_size: int = 10) -> Engine:
    """Create an engine for ``url`` (SQLite file folders are created as needed)."""
    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _on_sqlite_connect)
        event.listen(engine, "begin", _on_sqlite_begin)
        return engine
    return create_engine(url, echo=echo, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """One shared engine per URL for the life of the process."""
    return make_engine(url)


def sessionmaker_for(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)


def _default_url() -> str:
    from mcie.config import get_settings

    return get_settings().database_url


@contextmanager
def session_scope(url: str | None = None, *, write: bool = False) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error.

    ``write=True`` is for read-then-write transactions that must not interleave (the review queue): on SQLite the
    transaction starts with ``BEGIN IMMEDIATE``, so concurrent writers queue on the database lock before they read;
    on PostgreSQL it changes nothing (use ``SELECT ... FOR UPDATE SKIP LOCKED`` there).
    """
    engine = engine_for(url or _default_url())
    if write and engine.dialect.name == "sqlite":
        engine = engine.execution_options(sqlite_begin="IMMEDIATE")
    session = Session(engine, expire_on_commit=False, info={WRITE_KEY: write})
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def require_write(session: Session, what: str) -> None:
    """Refuse a read-then-write service (a lease, a review, a vote ...) on a session that did not begin as a write
    transaction: on SQLite two such transactions could both read, then one would fail at its first write. The
    service's caller opens it: ``with session_scope(url, write=True) as session: service(session, ...)``."""
    if not session.info.get(WRITE_KEY):
        raise RuntimeError(f"{what} reads then writes: call it with a session from session_scope(url, write=True)")


def ping(url: str) -> None:
    """Raise if the database cannot be reached."""
    with engine_for(url).connect() as conn:
        conn.execute(text("SELECT 1"))
