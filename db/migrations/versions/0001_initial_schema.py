"""Initial schema of the whole platform.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

One migration creates every table the platform needs, so later stages add behaviour, not tables. Choices made on
top of the brief, and why:
- ``images`` is a table of its own (sha256 primary key, format, size): instances, turns, study outputs and previews
  point at it by foreign key, so an image row exists exactly when its bytes were validated into the store, and the
  same picture used twice is stored once.
- ``box_candidates`` hang off ``turns``, not ``sub_instructions``: candidates are computed from the images before
  and after one turn, which every window containing that turn shares (n(n-1)/2 windows would otherwise repeat the
  work). ``sub_instructions`` copy the chosen box per sample so a human correction can differ by sample. The box
  source enum has a fourth value, ``truth``, for boxes that come with the data (the demo's ground truth).
- ``turns.operation`` keeps the add/remove/change class per turn (classified once), copied to sub-instructions.
- Review history: ``reviews`` holds the current answer (unique per sample and user) and ``review_revisions`` every
  submitted version; ``sample_flags`` holds flags; ``project_settings`` holds what leads change at run time
  (reviews per sample, calibration share, gold rate, acceptance thresholds).
- User study: ``study_participants`` (enrolment, invite-link hash, exclusion) joins ``users`` and ``studies``, so
  participants with accounts and with invite links are handled alike.
- Enumerations are strings with CHECK constraints (not PostgreSQL ENUM types) so SQLite and PostgreSQL behave the
  same and adding a value is a simple migration; all constraint names follow ``db.models.NAMING_CONVENTION``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("format", sa.String(length=8), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.CheckConstraint("length(sha256) = 64", name=op.f("ck_images_sha256_length")),
        sa.CheckConstraint("width > 0 AND height > 0", name=op.f("ck_images_positive_size")),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_images")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.String(length=255), nullable=True),
        sa.Column(
            "role",
            sa.Enum(
                "admin",
                "lead",
                "rater",
                "participant",
                name="role",
                native_enum=False,
                create_constraint=True,
                length=15,
            ),
            nullable=False,
        ),
        sa.Column("password_hash", sa.String(length=255), nullable=True),
        sa.Column("active", sa.Boolean(), server_default="1", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("length(username) >= 2", name=op.f("ck_users_username_length")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("username", name=op.f("uq_users_username")),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False
        ),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("entity", sa.String(length=64), nullable=True),
        sa.Column("entity_id", sa.String(length=64), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_audit_log_user_id_users"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index("ix_audit_log_at", ["at"], unique=False)

    op.create_table(
        "exports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "running",
                "done",
                "failed",
                name="job_status",
                native_enum=False,
                create_constraint=True,
                length=11,
            ),
            nullable=False,
        ),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("filter", sa.JSON(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("since_export_id", sa.Integer(), nullable=True),
        sa.Column("n_samples", sa.Integer(), server_default="0", nullable=False),
        sa.Column("db_revision", sa.String(length=64), nullable=True),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_by", sa.Integer(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["created_by"], ["users.id"], name=op.f("fk_exports_created_by_users"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["since_export_id"],
            ["exports.id"],
            name=op.f("fk_exports_since_export_id_exports"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exports")),
    )
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset", sa.String(length=64), nullable=False),
        sa.Column("external_id", sa.String(length=255), nullable=False),
        sa.Column("source_image", sa.String(length=64), nullable=False),
        sa.Column("n_turns", sa.Integer(), nullable=False),
        sa.Column("source_file", sa.Text(), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.CheckConstraint("n_turns >= 1", name=op.f("ck_instances_n_turns_positive")),
        sa.ForeignKeyConstraint(
            ["source_image"], ["images.sha256"], name=op.f("fk_instances_source_image_images")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("dataset", "external_id", name=op.f("uq_instances_dataset_external_id")),
    )
    op.create_table(
        "project_settings",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.Column("updated_by", sa.Integer(), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["updated_by"],
            ["users.id"],
            name=op.f("fk_project_settings_updated_by_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_project_settings")),
    )
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "draft",
                "open",
                "closed",
                name="study_status",
                native_enum=False,
                create_constraint=True,
                length=10,
            ),
            nullable=False,
        ),
        sa.Column("items_per_participant", sa.Integer(), server_default="100", nullable=False),
        sa.Column("criteria", sa.JSON(), nullable=False),
        sa.Column("seed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_by", sa.Integer(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.CheckConstraint("items_per_participant >= 1", name=op.f("ck_studies_items_positive")),
        sa.ForeignKeyConstraint(
            ["created_by"], ["users.id"], name=op.f("fk_studies_created_by_users"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("name", name=op.f("uq_studies_name")),
    )
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("first_turn", sa.Integer(), nullable=False),
        sa.Column("last_turn", sa.Integer(), nullable=False),
        sa.Column("instruction", sa.Text(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "filtering",
                "filtered_out",
                "ready",
                "in_review",
                "accepted",
                "rejected",
                "needs_adjudication",
                name="sample_status",
                native_enum=False,
                create_constraint=True,
                length=22,
            ),
            nullable=False,
        ),
        sa.Column("priority", sa.Float(), server_default="0", nullable=False),
        sa.Column("box_scorer", sa.String(length=32), nullable=True),
        sa.Column("flagged", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("flag_reason", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "first_turn >= 1 AND last_turn > first_turn", name=op.f("ck_samples_window_of_two_or_more")
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_samples_instance_id_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_samples")),
        sa.UniqueConstraint(
            "instance_id", "first_turn", "last_turn", name=op.f("uq_samples_instance_id_first_turn_last_turn")
        ),
    )
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.create_index("ix_samples_queue", ["status", "priority", "id"], unique=False)
        batch_op.create_index(batch_op.f("ix_samples_status"), ["status"], unique=False)

    op.create_table(
        "study_participants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("invite_token_hash", sa.String(length=64), nullable=True),
        sa.Column(
            "invited_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("excluded", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("exclusion_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_study_participants_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_study_participants_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_participants")),
        sa.UniqueConstraint("invite_token_hash", name=op.f("uq_study_participants_invite_token_hash")),
        sa.UniqueConstraint("study_id", "user_id", name=op.f("uq_study_participants_study_id_user_id")),
    )
    op.create_table(
        "turns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("instruction", sa.Text(), nullable=False),
        sa.Column(
            "operation",
            sa.Enum(
                "add",
                "remove",
                "change",
                name="operation",
                native_enum=False,
                create_constraint=True,
                length=10,
            ),
            nullable=True,
        ),
        sa.Column("result_image", sa.String(length=64), nullable=False),
        sa.CheckConstraint('"index" >= 1', name=op.f("ck_turns_index_positive")),
        sa.CheckConstraint("length(trim(instruction)) > 0", name=op.f("ck_turns_instruction_not_empty")),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name=op.f("fk_turns_instance_id_instances"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["result_image"], ["images.sha256"], name=op.f("fk_turns_result_image_images")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_turns")),
        sa.UniqueConstraint("instance_id", "index", name=op.f("uq_turns_instance_id_index")),
    )
    op.create_table(
        "assignments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "leased",
                "submitted",
                "skipped",
                "expired",
                name="assignment_state",
                native_enum=False,
                create_constraint=True,
                length=13,
            ),
            nullable=False,
        ),
        sa.Column(
            "purpose",
            sa.Enum(
                "regular",
                "calibration",
                "gold",
                name="assignment_purpose",
                native_enum=False,
                create_constraint=True,
                length=15,
            ),
            nullable=False,
        ),
        sa.Column(
            "leased_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("skip_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["sample_id"], ["samples.id"], name=op.f("fk_assignments_sample_id_samples"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_assignments_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assignments")),
        sa.UniqueConstraint("sample_id", "user_id", name=op.f("uq_assignments_sample_id_user_id")),
    )
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.create_index("ix_assignments_sample_state", ["sample_id", "state"], unique=False)
        batch_op.create_index(batch_op.f("ix_assignments_user_id"), ["user_id"], unique=False)

    op.create_table(
        "box_candidates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("turn_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column(
            "source",
            sa.Enum(
                "mllm",
                "diff",
                "human",
                "truth",
                name="box_source",
                native_enum=False,
                create_constraint=True,
                length=9,
            ),
            nullable=False,
        ),
        sa.Column("box_x0", sa.Float(), nullable=False),
        sa.Column("box_y0", sa.Float(), nullable=False),
        sa.Column("box_x1", sa.Float(), nullable=False),
        sa.Column("box_y1", sa.Float(), nullable=False),
        sa.Column("label", sa.Text(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("scorer", sa.String(length=32), nullable=True),
        sa.Column("chosen", sa.Boolean(), server_default="0", nullable=False),
        sa.CheckConstraint(
            "(box_x0 IS NULL AND box_y0 IS NULL AND box_x1 IS NULL AND box_y1 IS NULL) OR (box_x0 >= 0 AND box_y0 >= 0 AND box_x1 <= 1 AND box_y1 <= 1 AND box_x0 < box_x1 AND box_y0 < box_y1)",
            name=op.f("ck_box_candidates_box_normalized"),
        ),
        sa.ForeignKeyConstraint(
            ["turn_id"], ["turns.id"], name=op.f("fk_box_candidates_turn_id_turns"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_box_candidates")),
        sa.UniqueConstraint("turn_id", "rank", name=op.f("uq_box_candidates_turn_id_rank")),
    )
    with op.batch_alter_table("box_candidates", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_box_candidates_turn_id"), ["turn_id"], unique=False)

    op.create_table(
        "decisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column(
            "outcome",
            sa.Enum(
                "accepted", "rejected", name="outcome", native_enum=False, create_constraint=True, length=12
            ),
            nullable=False,
        ),
        sa.Column(
            "source",
            sa.Enum(
                "rule", "lead", name="decision_source", native_enum=False, create_constraint=True, length=8
            ),
            nullable=False,
        ),
        sa.Column("rule", sa.JSON(), nullable=True),
        sa.Column("decided_by", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "source <> 'lead' OR decided_by IS NOT NULL", name=op.f("ck_decisions_lead_decision_has_author")
        ),
        sa.ForeignKeyConstraint(
            ["decided_by"], ["users.id"], name=op.f("fk_decisions_decided_by_users"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["sample_id"], ["samples.id"], name=op.f("fk_decisions_sample_id_samples"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_decisions")),
    )
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_decisions_sample_id"), ["sample_id"], unique=False)

    op.create_table(
        "export_items",
        sa.Column("export_id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column(
            "split",
            sa.Enum("train", "val", name="split", native_enum=False, create_constraint=True, length=9),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["export_id"], ["exports.id"], name=op.f("fk_export_items_export_id_exports"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["sample_id"], ["samples.id"], name=op.f("fk_export_items_sample_id_samples"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("export_id", "sample_id", name=op.f("pk_export_items")),
    )
    op.create_table(
        "gold_answers",
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("consistent", sa.Boolean(), nullable=False),
        sa.Column("quality", sa.Integer(), nullable=False),
        sa.Column("complexity", sa.Integer(), nullable=False),
        sa.Column("tolerance", sa.Integer(), server_default="1", nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_by", sa.Integer(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.CheckConstraint("complexity BETWEEN 1 AND 5", name=op.f("ck_gold_answers_complexity_1_5")),
        sa.CheckConstraint("quality BETWEEN 1 AND 5", name=op.f("ck_gold_answers_quality_1_5")),
        sa.CheckConstraint("tolerance BETWEEN 0 AND 4", name=op.f("ck_gold_answers_tolerance_0_4")),
        sa.ForeignKeyConstraint(
            ["created_by"], ["users.id"], name=op.f("fk_gold_answers_created_by_users"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["sample_id"], ["samples.id"], name=op.f("fk_gold_answers_sample_id_samples"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("sample_id", name=op.f("pk_gold_answers")),
    )
    op.create_table(
        "mllm_judgements",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=True),
        sa.Column("turn_id", sa.Integer(), nullable=True),
        sa.Column(
            "stage",
            sa.Enum(
                "conflict",
                "grounding",
                "decompose",
                "judge",
                name="mllm_stage",
                native_enum=False,
                create_constraint=True,
                length=13,
            ),
            nullable=False,
        ),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("prompt_version", sa.String(length=32), nullable=False),
        sa.Column("cache_key", sa.String(length=64), nullable=False),
        sa.Column("verdict", sa.String(length=64), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("rationale", sa.Text(), nullable=True),
        sa.Column("raw_response", sa.Text(), nullable=True),
        sa.Column("parsed", sa.JSON(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["sample_id"],
            ["samples.id"],
            name=op.f("fk_mllm_judgements_sample_id_samples"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["turn_id"], ["turns.id"], name=op.f("fk_mllm_judgements_turn_id_turns"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mllm_judgements")),
    )
    with op.batch_alter_table("mllm_judgements", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_mllm_judgements_cache_key"), ["cache_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_mllm_judgements_sample_id"), ["sample_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_mllm_judgements_turn_id"), ["turn_id"], unique=False)

    op.create_table(
        "previews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("params_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "running",
                "done",
                "failed",
                name="job_status",
                native_enum=False,
                create_constraint=True,
                length=11,
            ),
            nullable=False,
        ),
        sa.Column("image", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("requested_by", sa.Integer(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["image"], ["images.sha256"], name=op.f("fk_previews_image_images")),
        sa.ForeignKeyConstraint(
            ["requested_by"], ["users.id"], name=op.f("fk_previews_requested_by_users"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["sample_id"], ["samples.id"], name=op.f("fk_previews_sample_id_samples"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_previews")),
        sa.UniqueConstraint(
            "sample_id",
            "model_version",
            "seed",
            "params_hash",
            name=op.f("uq_previews_sample_id_model_version_seed_params_hash"),
        ),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("consistent", sa.Boolean(), nullable=False),
        sa.Column("quality", sa.Integer(), nullable=False),
        sa.Column("complexity", sa.Integer(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("box_corrections", sa.JSON(), nullable=True),
        sa.Column("time_spent_s", sa.Float(), nullable=True),
        sa.Column("revision", sa.Integer(), server_default="1", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.CheckConstraint("complexity BETWEEN 1 AND 5", name=op.f("ck_reviews_complexity_1_5")),
        sa.CheckConstraint("quality BETWEEN 1 AND 5", name=op.f("ck_reviews_quality_1_5")),
        sa.CheckConstraint("revision >= 1", name=op.f("ck_reviews_revision_positive")),
        sa.CheckConstraint(
            "time_spent_s IS NULL OR time_spent_s >= 0", name=op.f("ck_reviews_time_spent_nonnegative")
        ),
        sa.ForeignKeyConstraint(
            ["sample_id"], ["samples.id"], name=op.f("fk_reviews_sample_id_samples"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_reviews_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
        sa.UniqueConstraint("sample_id", "user_id", name=op.f("uq_reviews_sample_id_user_id")),
    )
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.create_index("ix_reviews_created_at", ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_reviews_user_id"), ["user_id"], unique=False)

    op.create_table(
        "sample_flags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_by", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["resolved_by"], ["users.id"], name=op.f("fk_sample_flags_resolved_by_users"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["sample_id"], ["samples.id"], name=op.f("fk_sample_flags_sample_id_samples"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_sample_flags_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sample_flags")),
    )
    with op.batch_alter_table("sample_flags", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sample_flags_sample_id"), ["sample_id"], unique=False)

    op.create_table(
        "study_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("external_id", sa.String(length=255), nullable=False),
        sa.Column("source_image", sa.String(length=64), nullable=False),
        sa.Column("instruction", sa.Text(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=True),
        sa.Column("is_attention_check", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("attention_answer", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["sample_id"], ["samples.id"], name=op.f("fk_study_items_sample_id_samples"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["source_image"], ["images.sha256"], name=op.f("fk_study_items_source_image_images")
        ),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_study_items_study_id_studies"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_items")),
        sa.UniqueConstraint("study_id", "external_id", name=op.f("uq_study_items_study_id_external_id")),
    )
    op.create_table(
        "sub_instructions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("turn_index", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column(
            "operation",
            sa.Enum(
                "add",
                "remove",
                "change",
                name="operation",
                native_enum=False,
                create_constraint=True,
                length=10,
            ),
            nullable=False,
        ),
        sa.Column("box_x0", sa.Float(), nullable=True),
        sa.Column("box_y0", sa.Float(), nullable=True),
        sa.Column("box_x1", sa.Float(), nullable=True),
        sa.Column("box_y1", sa.Float(), nullable=True),
        sa.Column(
            "box_source",
            sa.Enum(
                "mllm",
                "diff",
                "human",
                "truth",
                name="box_source",
                native_enum=False,
                create_constraint=True,
                length=9,
            ),
            nullable=True,
        ),
        sa.Column("box_score", sa.Float(), nullable=True),
        sa.CheckConstraint(
            "(box_x0 IS NULL AND box_y0 IS NULL AND box_x1 IS NULL AND box_y1 IS NULL) OR (box_x0 >= 0 AND box_y0 >= 0 AND box_x1 <= 1 AND box_y1 <= 1 AND box_x0 < box_x1 AND box_y0 < box_y1)",
            name=op.f("ck_sub_instructions_box_normalized"),
        ),
        sa.CheckConstraint("turn_index >= 1", name=op.f("ck_sub_instructions_turn_index_positive")),
        sa.ForeignKeyConstraint(
            ["sample_id"],
            ["samples.id"],
            name=op.f("fk_sub_instructions_sample_id_samples"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sub_instructions")),
        sa.UniqueConstraint("sample_id", "turn_index", name=op.f("uq_sub_instructions_sample_id_turn_index")),
    )
    op.create_table(
        "review_revisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("review_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("consistent", sa.Boolean(), nullable=False),
        sa.Column("quality", sa.Integer(), nullable=False),
        sa.Column("complexity", sa.Integer(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("box_corrections", sa.JSON(), nullable=True),
        sa.Column("time_spent_s", sa.Float(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.CheckConstraint("complexity BETWEEN 1 AND 5", name=op.f("ck_review_revisions_complexity_1_5")),
        sa.CheckConstraint("quality BETWEEN 1 AND 5", name=op.f("ck_review_revisions_quality_1_5")),
        sa.ForeignKeyConstraint(
            ["review_id"],
            ["reviews.id"],
            name=op.f("fk_review_revisions_review_id_reviews"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_revisions")),
        sa.UniqueConstraint("review_id", "revision", name=op.f("uq_review_revisions_review_id_revision")),
    )
    op.create_table(
        "study_assignments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("participant_id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("shown_order", sa.JSON(), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("position >= 1", name=op.f("ck_study_assignments_position_positive")),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["study_items.id"],
            name=op.f("fk_study_assignments_item_id_study_items"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["participant_id"],
            ["users.id"],
            name=op.f("fk_study_assignments_participant_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_study_assignments_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_assignments")),
        sa.UniqueConstraint(
            "participant_id", "item_id", name=op.f("uq_study_assignments_participant_id_item_id")
        ),
        sa.UniqueConstraint(
            "study_id",
            "participant_id",
            "position",
            name=op.f("uq_study_assignments_study_id_participant_id_position"),
        ),
    )
    op.create_table(
        "study_outputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=False),
        sa.Column("image", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["image"], ["images.sha256"], name=op.f("fk_study_outputs_image_images")),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["study_items.id"],
            name=op.f("fk_study_outputs_item_id_study_items"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_outputs")),
        sa.UniqueConstraint("item_id", "method", name=op.f("uq_study_outputs_item_id_method")),
    )
    op.create_table(
        "votes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("assignment_id", sa.Integer(), nullable=False),
        sa.Column("participant_id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("criterion", sa.String(length=32), nullable=False),
        sa.Column("chosen_output_id", sa.Integer(), nullable=True),
        sa.Column("shown_position", sa.Integer(), nullable=True),
        sa.Column("shown_order", sa.JSON(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "latency_ms IS NULL OR latency_ms >= 0", name=op.f("ck_votes_latency_nonnegative")
        ),
        sa.ForeignKeyConstraint(
            ["assignment_id"],
            ["study_assignments.id"],
            name=op.f("fk_votes_assignment_id_study_assignments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["chosen_output_id"],
            ["study_outputs.id"],
            name=op.f("fk_votes_chosen_output_id_study_outputs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["item_id"], ["study_items.id"], name=op.f("fk_votes_item_id_study_items"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["participant_id"], ["users.id"], name=op.f("fk_votes_participant_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_votes")),
        sa.UniqueConstraint(
            "participant_id", "item_id", "criterion", name=op.f("uq_votes_participant_id_item_id_criterion")
        ),
    )


def downgrade() -> None:
    op.drop_table("votes")
    op.drop_table("study_outputs")
    op.drop_table("study_assignments")
    op.drop_table("review_revisions")
    op.drop_table("sub_instructions")
    op.drop_table("study_items")
    with op.batch_alter_table("sample_flags", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sample_flags_sample_id"))

    op.drop_table("sample_flags")
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reviews_user_id"))
        batch_op.drop_index("ix_reviews_created_at")

    op.drop_table("reviews")
    op.drop_table("previews")
    with op.batch_alter_table("mllm_judgements", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_mllm_judgements_turn_id"))
        batch_op.drop_index(batch_op.f("ix_mllm_judgements_sample_id"))
        batch_op.drop_index(batch_op.f("ix_mllm_judgements_cache_key"))

    op.drop_table("mllm_judgements")
    op.drop_table("gold_answers")
    op.drop_table("export_items")
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_decisions_sample_id"))

    op.drop_table("decisions")
    with op.batch_alter_table("box_candidates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_box_candidates_turn_id"))

    op.drop_table("box_candidates")
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_assignments_user_id"))
        batch_op.drop_index("ix_assignments_sample_state")

    op.drop_table("assignments")
    op.drop_table("turns")
    op.drop_table("study_participants")
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_samples_status"))
        batch_op.drop_index("ix_samples_queue")

    op.drop_table("samples")
    op.drop_table("studies")
    op.drop_table("project_settings")
    op.drop_table("instances")
    op.drop_table("exports")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_log_at")

    op.drop_table("audit_log")
    op.drop_table("users")
    op.drop_table("images")
