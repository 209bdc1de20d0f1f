"""Fixtures shared by every test: isolated settings, a migrated SQLite database, and a throw-away PostgreSQL one.

PostgreSQL tests run when ``MCIE_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``)
reaches a server; that URL is only used to create and drop a database of the test's own. When it cannot be
reached the tests are skipped with the reason, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts from default settings with its own data folder, whatever the developer's environment."""
    from mcie.config import get_settings

    for key in list(os.environ):
        if key.startswith("MCIE_") and not key.startswith("MCIE_TEST_"):
            monkeypatch.delenv(key)
    data_dir = tmp_path_factory.mktemp("data")
    monkeypatch.setenv("MCIE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("MCIE_DATABASE_URL", f"sqlite:///{data_dir}/mcie.db")
    monkeypatch.setenv("MCIE_CONFIG", str(data_dir / "absent.toml"))
    (data_dir / "absent.toml").write_text("")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _postgres_admin_url() -> str:
    return os.environ.get("MCIE_TEST_POSTGRES_URL", DEFAULT_PG)


def _unreachable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required under CI=true but {reason}")
    pytest.skip(f"PostgreSQL tests skipped: {reason} (set MCIE_TEST_POSTGRES_URL)")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test, dropped afterwards."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    admin_url = _postgres_admin_url()
    try:
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:  # any failure to connect means "unreachable"
        _unreachable(f"{make_url(admin_url).render_as_string(hide_password=True)} cannot be reached ({exc})")
    name = f"mcie_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        from db.session import engine_for

        engine_for(url).dispose()
        engine_for.cache_clear()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/test.db"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_db_url(request: pytest.FixtureRequest) -> str:
    """An empty database of each kind in turn (SQLite, then PostgreSQL)."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def migrated_url(any_db_url: str) -> str:
    """An SQLite or PostgreSQL database upgraded to the newest schema."""
    from db.migrate import upgrade

    upgrade(any_db_url)
    return any_db_url


@pytest.fixture
def store(tmp_path: Path):
    from db.store import ImageStore

    return ImageStore(str(tmp_path / "blobs"), max_pixels=50_000_000, max_bytes=20 * 1024 * 1024)
