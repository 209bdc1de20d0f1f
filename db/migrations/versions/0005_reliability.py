"""Rater reliability: fitted models over time, and the adaptive review policy's per-sample review target.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

``reliability_fits`` keeps every fit of ``annotate.reliability`` (the newest is used by the weighted decision rule
and the adaptive policy; the history is each rater's reliability over time). ``samples.reviews_target`` is how many
reviews the adaptive policy wants for a sample (NULL under the fixed policy).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


TARGET = "reviews_target IS NULL OR reviews_target >= 1"
TARGET_CHECK = "ck_samples_reviews_target_positive"


def upgrade() -> None:
    op.create_table(
        "reliability_fits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("n_reviews", sa.Integer(), nullable=False),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        sa.Column("model", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("n_reviews >= 0 AND n_samples >= 0", name=op.f("ck_reliability_fits_counts_nonnegative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reliability_fits")),
    )
    # SQLite adds a column with its CHECK in place (a batch copy of ``samples`` would cost minutes on big projects)
    if op.get_bind().dialect.name == "sqlite":
        op.execute(f"ALTER TABLE samples ADD COLUMN reviews_target INTEGER CONSTRAINT {TARGET_CHECK} CHECK ({TARGET})")
    else:
        op.add_column("samples", sa.Column("reviews_target", sa.Integer(), nullable=True))
        op.create_check_constraint("reviews_target_positive", "samples", TARGET)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE samples DROP COLUMN reviews_target")  # SQLite >= 3.35
    else:
        op.drop_constraint(op.f(TARGET_CHECK), "samples", type_="check")
        op.drop_column("samples", "reviews_target")
    op.drop_table("reliability_fits")
