"""Per-project review settings that leads change at run time, stored in the ``project_settings`` table.

One typed object, :class:`ProjectConfig`, holds them: how many reviews each sample wants, the calibration share that
gets extra independent reviews for agreement figures, the gold rate, the lease length, whether the MLLM's verdict is
shown before a review is submitted, and the acceptance rule (the paper's default: consistent, quality > 3,
complexity > 3). Stored values overlay the defaults; every change is validated and written to the audit log.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import AuditLog, ProjectSetting


class AcceptanceRule(BaseModel):
    """Accept a sample when its aggregated answers pass every threshold (quality and complexity strictly above)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    require_consistent: bool = Field(True, description="Majority of reviewers answered 'consistent: yes'.")
    quality_above: float = Field(3, ge=0, le=5, description="Median quality must be strictly above this.")
    complexity_above: float = Field(3, ge=0, le=5, description="Median complexity must be strictly above this.")
    max_score_spread: int = Field(
        2, ge=0, le=4, description="Reviews whose quality or complexity differ by more than this are a disagreement."
    )


class ProjectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reviews_per_sample: int = Field(1, ge=1, le=10, description="Independent reviews wanted per ordinary sample.")
    calibration_share: float = Field(0.10, ge=0, le=1, description="Share of samples reviewed by several raters.")
    calibration_reviews: int = Field(3, ge=2, le=10, description="Reviews wanted per calibration sample.")
    gold_rate: float = Field(0.05, ge=0, le=0.5, description="Share of a reviewer's queue drawn from gold samples.")
    lease_minutes: float = Field(20, gt=0, le=24 * 60, description="How long a sample stays leased to a reviewer.")
    show_mllm_verdict_before_submit: bool = Field(
        False, description="Show the MLLM's verdict before the review is submitted (it may anchor reviewers)."
    )
    acceptance: AcceptanceRule = Field(default_factory=AcceptanceRule)


class ProjectConfigError(ValueError):
    """A requested setting change is invalid; the message names the setting and what was expected."""


def get_project_config(session: Session) -> ProjectConfig:
    stored = {row.key: row.value for row in session.scalars(select(ProjectSetting))}
    known = {k: v for k, v in stored.items() if k in ProjectConfig.model_fields}
    return ProjectConfig.model_validate(known)


def set_project_config(session: Session, changes: dict[str, Any], *, actor_id: int | None) -> ProjectConfig:
    """Validate and store ``changes`` (top-level keys of :class:`ProjectConfig`); returns the new configuration."""
    current = get_project_config(session)
    unknown = sorted(set(changes) - set(ProjectConfig.model_fields))
    if unknown:
        raise ProjectConfigError(f"unknown project setting(s): {', '.join(unknown)}")
    merged = current.model_dump() | changes
    if isinstance(changes.get("acceptance"), dict):  # a partial rule change keeps the rule's other thresholds
        merged["acceptance"] = current.acceptance.model_dump() | changes["acceptance"]
    try:
        new = ProjectConfig.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ProjectConfigError(problems) from None
    dumped = new.model_dump()
    for key in changes:
        row = session.get(ProjectSetting, key)
        if row is None:
            session.add(ProjectSetting(key=key, value=dumped[key], updated_by=actor_id))
        else:
            row.value = dumped[key]
            row.updated_by = actor_id
    session.add(AuditLog(user_id=actor_id, action="project.settings", entity="project_settings",
                         details={"changes": {k: dumped[k] for k in changes}}))  # fmt: skip
    session.flush()
    return new
