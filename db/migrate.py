"""Schema migrations: the programmatic face of Alembic (``mcie db upgrade|downgrade|current``).

The migration scripts live in ``db/migrations/versions``; this module builds the Alembic configuration for a
database URL so no ``alembic.ini`` or working-directory convention is needed.
"""

from __future__ import annotations

import io
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from mcie.db.session import engine_for

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config(stdout=io.StringIO())
    config.set_main_option("script_location", str(MIGRATIONS))
    # '%' must be escaped for configparser (URL-encoded passwords contain it).
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database is at (None for an empty database)."""
    with engine_for(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head() -> str:
    head_rev = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head_rev is not None
    return head_rev
