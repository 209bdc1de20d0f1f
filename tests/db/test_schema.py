"""Migrations round-trip on SQLite and PostgreSQL, match the models, and the database itself enforces the rules."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import IntegrityError

from mcie.db import migrate
from mcie.db.models import (
    Base,
    Image,
    Instance,
    Review,
    Sample,
    SubInstruction,
    Turn,
    User,
)
from mcie.db.session import engine_for, session_scope

EXPECTED_TABLES = {
    "images", "instances", "turns", "samples", "sub_instructions", "box_candidates", "mllm_judgements", "users",
    "assignments", "reviews", "review_revisions", "sample_flags", "gold_answers", "decisions", "project_settings",
    "studies", "study_items", "study_outputs", "study_participants", "study_assignments", "votes", "exports",
    "export_items", "previews", "audit_log", "web_sessions", "login_throttle", "jobs",
    "reliability_fits",
}


def _tables(url: str) -> set[str]:
    return set(sa.inspect(engine_for(url)).get_table_names()) - {"alembic_version"}


def test_upgrade_downgrade_upgrade_round_trip(any_db_url: str) -> None:
    migrate.upgrade(any_db_url)
    assert migrate.current(any_db_url) == migrate.head()
    assert _tables(any_db_url) == EXPECTED_TABLES
    migrate.downgrade(any_db_url, "base")
    assert migrate.current(any_db_url) is None
    assert _tables(any_db_url) == set()
    migrate.upgrade(any_db_url)
    assert _tables(any_db_url) == EXPECTED_TABLES


def test_models_and_migrations_agree(migrated_url: str) -> None:
    with engine_for(migrated_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def _instance(session) -> tuple[Instance, str]:
    image = Image(sha256="a" * 64, format="PNG", width=10, height=10, size_bytes=100)
    instance = Instance(dataset="demo", external_id="x1", source_image=image.sha256, n_turns=2)
    session.add_all([image, instance])
    session.flush()
    return instance, image.sha256


def _expect_refused(url: str, build) -> None:
    with pytest.raises(IntegrityError), session_scope(url) as session:
        build(session)
        session.flush()


def test_constraints_live_in_the_database(migrated_url: str) -> None:
    with session_scope(migrated_url) as session:
        instance, sha = _instance(session)
        session.add_all(
            [Turn(instance_id=instance.id, index=i, instruction=f"edit {i}", result_image=sha) for i in (1, 2)]
        )
        sample = Sample(instance_id=instance.id, first_turn=1, last_turn=2, instruction="edit 1, and edit 2")
        user = User(username="rita", role="rater")
        session.add_all([sample, user])
        session.flush()
        ids = {"instance": instance.id, "sample": sample.id, "user": user.id}

    def same_key_twice(s):
        s.add(Instance(dataset="demo", external_id="x1", source_image="a" * 64, n_turns=1))

    def turn_gap_index_zero(s):
        s.add(Turn(instance_id=ids["instance"], index=0, instruction="x", result_image="a" * 64))

    def empty_instruction(s):
        s.add(Turn(instance_id=ids["instance"], index=3, instruction="   ", result_image="a" * 64))

    def unknown_image(s):
        s.add(Turn(instance_id=ids["instance"], index=3, instruction="x", result_image="b" * 64))

    def window_of_one(s):
        s.add(Sample(instance_id=ids["instance"], first_turn=2, last_turn=2, instruction="x"))

    def duplicate_window(s):
        s.add(Sample(instance_id=ids["instance"], first_turn=1, last_turn=2, instruction="x"))

    def box_outside(s):
        s.add(SubInstruction(sample_id=ids["sample"], turn_index=1, text="x", operation="add",
                             box_x0=0.5, box_y0=0.1, box_x1=1.2, box_y1=0.4))

    def box_reversed(s):
        s.add(SubInstruction(sample_id=ids["sample"], turn_index=1, text="x", operation="add",
                             box_x0=0.6, box_y0=0.1, box_x1=0.5, box_y1=0.4))

    def quality_six(s):
        s.add(Review(sample_id=ids["sample"], user_id=ids["user"], consistent=True, quality=6, complexity=3))

    def complexity_zero(s):
        s.add(Review(sample_id=ids["sample"], user_id=ids["user"], consistent=True, quality=3, complexity=0))

    def bad_status(s):
        s.execute(sa.text("UPDATE samples SET status = 'maybe'"))

    def bad_role(s):
        s.execute(sa.text("INSERT INTO users (username, role, active) VALUES ('zed', 'god', true)"))

    def duplicate_username(s):
        s.add(User(username="rita", role="lead"))

    def orphan_review(s):
        s.add(Review(sample_id=999_999, user_id=ids["user"], consistent=True, quality=3, complexity=3))

    for build in (same_key_twice, turn_gap_index_zero, empty_instruction, unknown_image, window_of_one,
                  duplicate_window, box_outside, box_reversed, quality_six, complexity_zero, bad_status, bad_role,
                  duplicate_username, orphan_review):
        _expect_refused(migrated_url, build)

    with session_scope(migrated_url) as session:  # a valid review and box are accepted
        session.add(Review(sample_id=ids["sample"], user_id=ids["user"], consistent=False, quality=5, complexity=1))
        session.add(SubInstruction(sample_id=ids["sample"], turn_index=1, text="x", operation="remove",
                                   box_x0=0.0, box_y0=0.0, box_x1=1.0, box_y1=1.0))

    with session_scope(migrated_url) as session:  # deleting an instance takes its turns and samples with it
        session.delete(session.get(Instance, ids["instance"]))
    with session_scope(migrated_url) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Sample)) == 0
        assert session.scalar(sa.select(sa.func.count()).select_from(Review)) == 0
