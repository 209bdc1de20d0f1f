"""Per-project review settings that leads change at run time, stored in the ``project_settings`` table.

One typed object, :class:`ProjectConfig`, holds them: how many reviews each sample wants, the calibration share that
gets extra independent reviews for agreement figures, the gold rate, the lease length, whether the MLLM's verdict is
shown before a review is submitted, and the acceptance rule (the paper's default: consistent, quality > 3,
complexity > 3), the decision rule (``paper``: that rule on majority/medians; ``weighted``: the rater-reliability
posterior of :mod:`annotate.reliability`) and the review policy (``fixed``: today's number of reviews per sample;
``adaptive``: one review, more only while the posterior is uncertain). Stored values overlay the defaults; every
change is validated and written to the audit log.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from mcie.db.models import AuditLog, ProjectSetting


class AcceptanceRule(BaseModel):
    """Accept a sample when its aggregated answers pass every threshold (quality and complexity strictly above)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    require_consistent: bool = Field(True, description="Majority of reviewers answered 'consistent: yes'.")
    quality_above: float = Field(3, ge=0, le=5, description="Median quality must be strictly above this.")
    complexity_above: float = Field(3, ge=0, le=5, description="Median complexity must be strictly above this.")
    max_score_spread: int = Field(
        2, ge=0, le=4, description="Reviews whose quality or complexity differ by more than this are a disagreement."
    )


class WeightedRule(BaseModel):
    """The ``weighted`` decision rule: accept when the posterior probability of meeting the acceptance rule is at
    least ``accept_at``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accept_at: float = Field(0.5, gt=0, lt=1, description="Accept when P(meets the rule) is at least this.")
    use_mllm_prior: bool = Field(True, description="The MLLM's calibrated conflict score is the consistency prior.")


class AdaptivePolicy(BaseModel):
    """The ``adaptive`` review policy: a sample gets another review only while its posterior is inside the band."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    band_low: float = Field(0.2, ge=0, le=1, description="Posteriors from here ...")
    band_high: float = Field(0.8, ge=0, le=1, description="... to here are uncertain and get another review.")
    max_reviews: int = Field(3, ge=1, le=10, description="Cap on reviews per ordinary sample.")
    refit_every: int = Field(500, ge=10, le=1_000_000, description="Refit rater reliability after this many reviews.")
    gold_max_factor: float = Field(
        3.0, ge=1, le=10, description="Gold rate multiplier for raters whose reliability is unknown or uncertain."
    )

    @model_validator(mode="after")
    def _band_order(self) -> AdaptivePolicy:
        if self.band_low > self.band_high:
            raise ValueError(f"band_low ({self.band_low}) must not exceed band_high ({self.band_high})")
        return self


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
    decision_rule: Literal["paper", "weighted"] = Field(
        "paper", description="paper: majority/medians vs thresholds; weighted: reliability-weighted posterior."
    )
    weighted: WeightedRule = Field(default_factory=WeightedRule)
    review_policy: Literal["fixed", "adaptive"] = Field(
        "fixed", description="fixed: reviews_per_sample each; adaptive: more reviews only while uncertain."
    )
    adaptive: AdaptivePolicy = Field(default_factory=AdaptivePolicy)


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
    for nested in ("acceptance", "weighted", "adaptive"):  # a partial change keeps the other fields
        if isinstance(changes.get(nested), dict):
            merged[nested] = getattr(current, nested).model_dump() | changes[nested]
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
                         details={"changes": {k: dumped[k] for k in changes}}))
    session.flush()
    return new
