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


@pytest.fixture(scope="session")
def _postgres_admin():
    """An AUTOCOMMIT engine on the admin URL, or skip (fail under CI=true) when no server answers."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    admin_url = _postgres_admin_url()
    try:
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:  # any failure to connect means "unreachable"
        _unreachable(f"{make_url(admin_url).render_as_string(hide_password=True)} cannot be reached ({exc})")
    yield admin
    admin.dispose()


def _database_url(name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(_postgres_admin_url()).set(database=name).render_as_string(hide_password=False)


def _drop(admin, name: str) -> None:
    from mcie.db.session import engine_for

    url = _database_url(name)
    engine_for(url).dispose()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _postgres_template(_postgres_admin) -> Iterator[str]:
    """A database migrated to the newest schema once per run, cloned by :func:`migrated_url` (fast)."""
    from mcie.db.migrate import upgrade
    from mcie.db.session import engine_for

    name = f"mcie_tpl_{uuid.uuid4().hex[:12]}"
    with _postgres_admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    upgrade(_database_url(name))
    engine_for(_database_url(name)).dispose()
    yield name
    _drop(_postgres_admin, name)


def _new_postgres_database(admin, template: str | None = None) -> Iterator[str]:
    name = f"mcie_test_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"{clause}')
    try:
        yield _database_url(name)
    finally:
        _drop(admin, name)


@pytest.fixture
def postgres_url(_postgres_admin) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test, dropped afterwards."""
    yield from _new_postgres_database(_postgres_admin)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/test.db"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_db_url(request: pytest.FixtureRequest) -> str:
    """An empty database of each kind in turn (SQLite, then PostgreSQL)."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def migrated_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """An SQLite or PostgreSQL database at the newest schema (PostgreSQL ones are cloned from a template)."""
    if request.param == "sqlite":
        from mcie.db.migrate import upgrade

        url = request.getfixturevalue("sqlite_url")
        upgrade(url)
        yield url
        return
    admin = request.getfixturevalue("_postgres_admin")
    template = request.getfixturevalue("_postgres_template")
    yield from _new_postgres_database(admin, template)


@pytest.fixture
def store(tmp_path: Path):
    from mcie.db.store import ImageStore

    return ImageStore(str(tmp_path / "blobs"), max_pixels=50_000_000, max_bytes=20 * 1024 * 1024)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a shared 2-core machine two threads wait on each other
    (measured: the model tests ran 5x faster on one thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face home, offline: tests put tiny models in its cache (``tests/hf_cache.add_to_cache``)."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home
