"""The parser's failure reason in its own column of ``mllm_judgements``, for every stage.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

Before, the conflict stage kept why an answer could not be parsed in ``rationale`` (the MLLM's own reason) and the
grounding stage in ``parsed["reason"]``. Both move to ``parse_error``; ``error`` stays the request's failure.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("mllm_judgements", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parse_error", sa.Text(), nullable=True))
    table = sa.table("mllm_judgements", sa.column("id", sa.Integer()), sa.column("stage", sa.String()),
                     sa.column("verdict", sa.String()), sa.column("rationale", sa.Text()),
                     sa.column("parsed", sa.JSON()), sa.column("parse_error", sa.Text()))
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(table.c.id, table.c.stage, table.c.rationale, table.c.parsed).where(table.c.verdict == "unparseable")
    ).all()
    for row_id, stage, rationale, parsed in rows:
        if stage == "grounding":
            reason = (parsed or {}).get("reason") if isinstance(parsed, dict) else None
            values = {"parse_error": reason, "parsed": sa.null()}
        else:
            values = {"parse_error": rationale, "rationale": None}
        bind.execute(sa.update(table).where(table.c.id == row_id).values(**values))


def downgrade() -> None:
    table = sa.table("mllm_judgements", sa.column("id", sa.Integer()), sa.column("stage", sa.String()),
                     sa.column("verdict", sa.String()), sa.column("rationale", sa.Text()),
                     sa.column("parsed", sa.JSON()), sa.column("parse_error", sa.Text()))
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(table.c.id, table.c.stage, table.c.parse_error)
        .where(table.c.verdict == "unparseable", table.c.parse_error.is_not(None))
    ).all()
    for row_id, stage, reason in rows:
        values = {"parsed": {"reason": reason}} if stage == "grounding" else {"rationale": reason}
        bind.execute(sa.update(table).where(table.c.id == row_id).values(**values))
    with op.batch_alter_table("mllm_judgements", schema=None) as batch_op:
        batch_op.drop_column("parse_error")
