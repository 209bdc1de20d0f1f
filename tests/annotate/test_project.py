"""Project settings overlay defaults, validate changes and leave an audit trail."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from mcie.annotate.project import ProjectConfigError, get_project_config, set_project_config
from mcie.db.models import AuditLog
from mcie.db.session import session_scope


def test_defaults_changes_and_audit(migrated_url: str) -> None:
    with session_scope(migrated_url) as session:
        config = get_project_config(session)
        assert config.reviews_per_sample == 1 and config.calibration_share == 0.10
        assert config.acceptance.quality_above == 3 and config.acceptance.require_consistent
        set_project_config(session, {"reviews_per_sample": 2, "acceptance": {"quality_above": 2}}, actor_id=None)
    with session_scope(migrated_url) as session:
        config = get_project_config(session)
        assert config.reviews_per_sample == 2
        assert config.acceptance.quality_above == 2 and config.acceptance.complexity_above == 3
        assert session.scalars(select(AuditLog.action)).all() == ["project.settings"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"reviews_per_sample": 0}, "reviews_per_sample"),
        ({"calibration_share": 1.5}, "calibration_share"),
        ({"acceptance": {"quality_above": 9}}, "acceptance.quality_above"),
        ({"colour": "blue"}, "unknown project setting"),
    ],
)
def test_invalid_changes_are_refused(migrated_url: str, changes, message) -> None:
    with session_scope(migrated_url) as session, pytest.raises(ProjectConfigError, match=message):
        set_project_config(session, changes, actor_id=None)
