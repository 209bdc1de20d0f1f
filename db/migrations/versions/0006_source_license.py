"""Each instance's source-dataset licence, recorded at ingest and carried into the dataset card.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

``instances.license`` is the licence of the dataset the instance was read from (SPDX id, e.g. ``CC-BY-NC-4.0`` for
SEED-Data-Edit); NULL for instances ingested before it was recorded, or from a manifest that states none.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # a nullable column without a default: SQLite and PostgreSQL add it in place, no table copy
    op.add_column("instances", sa.Column("license", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("license")
