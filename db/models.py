"""The whole platform's SQL schema as typed SQLAlchemy 2 models (the single source of truth for Alembic).

Tables, by stage:
- source data: ``images`` (content-addressed blobs' metadata), ``instances``, ``turns``;
- pipeline: ``samples`` (windows of turns), ``sub_instructions``, ``box_candidates``, ``mllm_judgements``;
- review: ``users``, ``assignments``, ``reviews``, ``review_revisions``, ``sample_flags``, ``gold_answers``,
  ``decisions``, ``project_settings``, ``reliability_fits``;
- user study: ``studies``, ``study_items``, ``study_outputs``, ``study_participants``, ``study_assignments``,
  ``votes``;
- products: ``exports``, ``export_items``, ``previews``; and ``audit_log``;
- runtime: ``web_sessions`` (server-side login sessions), ``login_throttle`` (failed logins shared by every replica),
  ``jobs`` (the work queue of ``mcie worker``: exports, previews).

Constraints live in the database (foreign keys, uniques, CHECKs on ranges and enumerations), so a bad row is refused
whichever program writes it. Enumerations are stored as short strings with a CHECK (``native_enum=False``) so that
SQLite and PostgreSQL behave alike and adding a value is a plain migration.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SHA256 = String(64)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=max(len(m.value) for m in cls) + 4,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


def _created() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now(), nullable=False)


def _box_checks(prefix: str = "box") -> tuple[CheckConstraint, ...]:
    """A normalized box is all-null or 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1."""
    cols = [f"{prefix}_x0", f"{prefix}_y0", f"{prefix}_x1", f"{prefix}_y1"]
    x0, y0, x1, y1 = cols
    all_null = " AND ".join(f"{c} IS NULL" for c in cols)
    valid = f"{x0} >= 0 AND {y0} >= 0 AND {x1} <= 1 AND {y1} <= 1 AND {x0} < {x1} AND {y0} < {y1}"
    return (CheckConstraint(f"({all_null}) OR ({valid})", name=f"{prefix}_normalized"),)


# ----------------------------------------------------------------------------------------------------------
# enumerations


class SampleStatus(enum.StrEnum):
    filtering = "filtering"
    filtered_out = "filtered_out"
    ready = "ready"
    in_review = "in_review"
    accepted = "accepted"
    rejected = "rejected"
    needs_adjudication = "needs_adjudication"


class Operation(enum.StrEnum):
    add = "add"
    remove = "remove"
    change = "change"


class BoxSource(enum.StrEnum):
    mllm = "mllm"
    diff = "diff"
    human = "human"
    truth = "truth"


class MllmStage(enum.StrEnum):
    conflict = "conflict"
    grounding = "grounding"
    decompose = "decompose"
    judge = "judge"


class Role(enum.StrEnum):
    admin = "admin"
    lead = "lead"
    rater = "rater"
    participant = "participant"


class AssignmentState(enum.StrEnum):
    leased = "leased"
    submitted = "submitted"
    skipped = "skipped"
    expired = "expired"


class AssignmentPurpose(enum.StrEnum):
    regular = "regular"
    calibration = "calibration"
    gold = "gold"


class Outcome(enum.StrEnum):
    accepted = "accepted"
    rejected = "rejected"


class DecisionSource(enum.StrEnum):
    rule = "rule"
    lead = "lead"


class StudyStatus(enum.StrEnum):
    draft = "draft"
    open = "open"
    closed = "closed"


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class QueueStatus(enum.StrEnum):
    """States of a ``jobs`` row (a queued job can be cancelled; a failed or cancelled one retried)."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


class Split(enum.StrEnum):
    train = "train"
    val = "val"


# ----------------------------------------------------------------------------------------------------------
# source data


class Image(Base):
    """Metadata of one image in the content-addressed store; the bytes live in the store under ``sha256``."""

    __tablename__ = "images"

    sha256: Mapped[str] = mapped_column(SHA256, primary_key=True)
    format: Mapped[str] = mapped_column(String(8))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created()

    __table_args__ = (
        CheckConstraint("width > 0 AND height > 0", name="positive_size"),
        CheckConstraint("length(sha256) = 64", name="sha256_length"),
    )


class Instance(Base):
    """A multi-turn edit from a source dataset: a source image and n >= 1 turns."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset: Mapped[str] = mapped_column(String(64))
    external_id: Mapped[str] = mapped_column(String(255))
    source_image: Mapped[str] = mapped_column(ForeignKey("images.sha256"))
    n_turns: Mapped[int] = mapped_column(Integer)
    source_file: Mapped[str | None] = mapped_column(Text)
    # the source dataset's licence as recorded at ingest (an SPDX id such as CC-BY-NC-4.0, or "other"; NULL: not stated)
    license: Mapped[str | None] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = _created()

    turns: Mapped[list[Turn]] = relationship(
        back_populates="instance", order_by="Turn.index", cascade="all, delete-orphan"
    )
    samples: Mapped[list[Sample]] = relationship(back_populates="instance", cascade="all, delete-orphan")

    __table_args__ = (
        UniqueConstraint("dataset", "external_id"),
        CheckConstraint("n_turns >= 1", name="n_turns_positive"),
    )


class Turn(Base):
    """One turn of an instance: its instruction and the image after it (turn 1 edits the source image)."""

    __tablename__ = "turns"

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    instruction: Mapped[str] = mapped_column(Text)
    operation: Mapped[Operation | None] = mapped_column(_enum(Operation, "operation"))
    result_image: Mapped[str] = mapped_column(ForeignKey("images.sha256"))

    instance: Mapped[Instance] = relationship(back_populates="turns")
    box_candidates: Mapped[list[BoxCandidate]] = relationship(
        back_populates="turn", cascade="all, delete-orphan", order_by="BoxCandidate.rank"
    )

    __table_args__ = (
        UniqueConstraint("instance_id", "index"),
        CheckConstraint('"index" >= 1', name="index_positive"),
        CheckConstraint("length(trim(instruction)) > 0", name="instruction_not_empty"),
    )


# ----------------------------------------------------------------------------------------------------------
# pipeline


class Sample(Base):
    """A complex-instruction candidate: the contiguous window [first_turn, last_turn] (2+ turns) of an instance."""

    __tablename__ = "samples"

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    first_turn: Mapped[int] = mapped_column(Integer)
    last_turn: Mapped[int] = mapped_column(Integer)
    instruction: Mapped[str] = mapped_column(Text)
    status: Mapped[SampleStatus] = mapped_column(
        _enum(SampleStatus, "sample_status"), default=SampleStatus.filtering, index=True
    )
    priority: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # reviews this sample wants, set by the adaptive review policy (NULL: the fixed policy's number)
    reviews_target: Mapped[int | None] = mapped_column(Integer)
    box_scorer: Mapped[str | None] = mapped_column(String(32))
    flagged: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    flag_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow, server_default=func.now()
    )

    instance: Mapped[Instance] = relationship(back_populates="samples")
    sub_instructions: Mapped[list[SubInstruction]] = relationship(
        back_populates="sample", cascade="all, delete-orphan", order_by="SubInstruction.turn_index"
    )
    reviews: Mapped[list[Review]] = relationship(back_populates="sample", passive_deletes=True)

    __table_args__ = (
        UniqueConstraint("instance_id", "first_turn", "last_turn"),
        CheckConstraint("first_turn >= 1 AND last_turn > first_turn", name="window_of_two_or_more"),
        Index("ix_samples_queue", "status", "priority", "id"),
        CheckConstraint("reviews_target IS NULL OR reviews_target >= 1", name="reviews_target_positive"),
    )


# The head of the review queue: open samples by priority (defined here to order a column descending).
Index(
    "ix_samples_open_queue",
    Sample.priority.desc(),
    Sample.id,
    postgresql_where=text("status IN ('ready', 'in_review')"),
    sqlite_where=text("status IN ('ready', 'in_review')"),
)


class SubInstruction(Base):
    """One turn of a sample's window: text, operation and the chosen box (normalized 0..1)."""

    __tablename__ = "sub_instructions"

    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"))
    turn_index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    operation: Mapped[Operation] = mapped_column(_enum(Operation, "operation"))
    box_x0: Mapped[float | None] = mapped_column(Float)
    box_y0: Mapped[float | None] = mapped_column(Float)
    box_x1: Mapped[float | None] = mapped_column(Float)
    box_y1: Mapped[float | None] = mapped_column(Float)
    box_source: Mapped[BoxSource | None] = mapped_column(_enum(BoxSource, "box_source"))
    box_score: Mapped[float | None] = mapped_column(Float)

    sample: Mapped[Sample] = relationship(back_populates="sub_instructions")

    __table_args__ = (
        UniqueConstraint("sample_id", "turn_index"),
        CheckConstraint("turn_index >= 1", name="turn_index_positive"),
        *_box_checks(),
    )


class BoxCandidate(Base):
    """A candidate box for one turn's edited region. Candidates belong to the turn (its before/after images), so
    every sample window containing that turn shares them; ``chosen`` marks the Eq. 1 winner."""

    __tablename__ = "box_candidates"

    id: Mapped[int] = mapped_column(primary_key=True)
    turn_id: Mapped[int] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    source: Mapped[BoxSource] = mapped_column(_enum(BoxSource, "box_source"))
    box_x0: Mapped[float] = mapped_column(Float)
    box_y0: Mapped[float] = mapped_column(Float)
    box_x1: Mapped[float] = mapped_column(Float)
    box_y1: Mapped[float] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(Text)
    score: Mapped[float | None] = mapped_column(Float)
    scorer: Mapped[str | None] = mapped_column(String(32))
    chosen: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")

    turn: Mapped[Turn] = relationship(back_populates="box_candidates")

    __table_args__ = (UniqueConstraint("turn_id", "rank"), *_box_checks())


class MllmJudgement(Base):
    """One MLLM call of a pipeline stage, kept whole (raw text too) so every verdict can be audited and reused."""

    __tablename__ = "mllm_judgements"

    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int | None] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    turn_id: Mapped[int | None] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), index=True)
    stage: Mapped[MllmStage] = mapped_column(_enum(MllmStage, "mllm_stage"))
    model: Mapped[str] = mapped_column(String(255))
    prompt_version: Mapped[str] = mapped_column(String(32))
    cache_key: Mapped[str] = mapped_column(SHA256, index=True)
    verdict: Mapped[str | None] = mapped_column(String(64))
    score: Mapped[float | None] = mapped_column(Float)
    rationale: Mapped[str | None] = mapped_column(Text)
    raw_response: Mapped[str | None] = mapped_column(Text)
    parsed: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)  # the request failed (after the backend's retries)
    parse_error: Mapped[str | None] = mapped_column(Text)  # the answer came but could not be parsed: why
    created_at: Mapped[datetime] = _created()


# ----------------------------------------------------------------------------------------------------------
# review


class User(Base):
    """An account: admins, leads and raters log in with a password (argon2 hash); study participants may join by an
    invite link instead and then have no password."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    password_hash: Mapped[str | None] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default="1")
    created_at: Mapped[datetime] = _created()
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (CheckConstraint("length(username) >= 2", name="username_length"),)


class Assignment(Base):
    """A lease of one sample to one reviewer; it expires if abandoned and the sample returns to the queue."""

    __tablename__ = "assignments"

    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    state: Mapped[AssignmentState] = mapped_column(
        _enum(AssignmentState, "assignment_state"), default=AssignmentState.leased
    )
    purpose: Mapped[AssignmentPurpose] = mapped_column(
        _enum(AssignmentPurpose, "assignment_purpose"), default=AssignmentPurpose.regular
    )
    leased_at: Mapped[datetime] = _created()
    lease_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    skip_reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("sample_id", "user_id"),
        Index("ix_assignments_sample_state", "sample_id", "state"),
        Index(
            "ix_assignments_active_leases",
            "lease_expires_at",
            postgresql_where=text("state = 'leased'"),
            sqlite_where=text("state = 'leased'"),
        ),
    )


class Review(Base):
    """A reviewer's current answer for a sample; earlier versions are kept in ``review_revisions``."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    consistent: Mapped[bool] = mapped_column(Boolean)
    quality: Mapped[int] = mapped_column(Integer)
    complexity: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    box_corrections: Mapped[list[Any] | None] = mapped_column(JSON)
    time_spent_s: Mapped[float | None] = mapped_column(Float)
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow, server_default=func.now()
    )

    sample: Mapped[Sample] = relationship(back_populates="reviews")

    __table_args__ = (
        UniqueConstraint("sample_id", "user_id"),
        CheckConstraint("quality BETWEEN 1 AND 5", name="quality_1_5"),
        CheckConstraint("complexity BETWEEN 1 AND 5", name="complexity_1_5"),
        CheckConstraint("revision >= 1", name="revision_positive"),
        CheckConstraint("time_spent_s IS NULL OR time_spent_s >= 0", name="time_spent_nonnegative"),
        Index("ix_reviews_created_at", "created_at"),
    )


class ReviewRevision(Base):
    """Every submitted version of a review (revision 1 is the first submit), so revising never loses an answer."""

    __tablename__ = "review_revisions"

    id: Mapped[int] = mapped_column(primary_key=True)
    review_id: Mapped[int] = mapped_column(ForeignKey("reviews.id", ondelete="CASCADE"))
    revision: Mapped[int] = mapped_column(Integer)
    consistent: Mapped[bool] = mapped_column(Boolean)
    quality: Mapped[int] = mapped_column(Integer)
    complexity: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    box_corrections: Mapped[list[Any] | None] = mapped_column(JSON)
    time_spent_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = _created()

    __table_args__ = (
        UniqueConstraint("review_id", "revision"),
        CheckConstraint("quality BETWEEN 1 AND 5", name="quality_1_5"),
        CheckConstraint("complexity BETWEEN 1 AND 5", name="complexity_1_5"),
    )


class SampleFlag(Base):
    """A reviewer's flag on a sample (broken images, offensive content ...) for a lead to look at."""

    __tablename__ = "sample_flags"

    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resolved_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))


class GoldAnswer(Base):
    """The known answer of a gold sample, mixed into the queue to measure each reviewer's accuracy."""

    __tablename__ = "gold_answers"

    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), primary_key=True)
    consistent: Mapped[bool] = mapped_column(Boolean)
    quality: Mapped[int] = mapped_column(Integer)
    complexity: Mapped[int] = mapped_column(Integer)
    tolerance: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    note: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = _created()

    __table_args__ = (
        CheckConstraint("quality BETWEEN 1 AND 5", name="quality_1_5"),
        CheckConstraint("complexity BETWEEN 1 AND 5", name="complexity_1_5"),
        CheckConstraint("tolerance BETWEEN 0 AND 4", name="tolerance_0_4"),
    )


class Decision(Base):
    """Accept or reject a sample, by the acceptance rule or by a lead; the newest decision of a sample counts and
    earlier ones stay as its history."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), index=True)
    outcome: Mapped[Outcome] = mapped_column(_enum(Outcome, "outcome"))
    source: Mapped[DecisionSource] = mapped_column(_enum(DecisionSource, "decision_source"))
    rule: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    decided_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()

    __table_args__ = (
        CheckConstraint("source <> 'lead' OR decided_by IS NOT NULL", name="lead_decision_has_author"),
        Index("ix_decisions_sample_latest", "sample_id", "id"),
    )


class ProjectSetting(Base):
    """Per-project settings a lead changes at run time (reviews per sample, calibration share, thresholds...)."""

    __tablename__ = "project_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)
    updated_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    updated_at: Mapped[datetime] = _created()


class ReliabilityFit(Base):
    """One fit of the rater reliability model (``annotate.reliability``): class priors, every rater's likelihood
    matrices, the MLLM calibration and the per-rater reports, as JSON. The newest row is the one in use; the earlier
    ones are each rater's reliability over time."""

    __tablename__ = "reliability_fits"

    id: Mapped[int] = mapped_column(primary_key=True)
    n_reviews: Mapped[int] = mapped_column(Integer)
    n_samples: Mapped[int] = mapped_column(Integer)
    model: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = _created()

    __table_args__ = (CheckConstraint("n_reviews >= 0 AND n_samples >= 0", name="counts_nonnegative"),)


# ----------------------------------------------------------------------------------------------------------
# user study


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    status: Mapped[StudyStatus] = mapped_column(_enum(StudyStatus, "study_status"), default=StudyStatus.draft)
    items_per_participant: Mapped[int] = mapped_column(Integer, default=100, server_default="100")
    criteria: Mapped[list[Any]] = mapped_column(JSON, default=lambda: ["instruction", "background"])
    seed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = _created()

    __table_args__ = (CheckConstraint("items_per_participant >= 1", name="items_positive"),)


class StudyItem(Base):
    __tablename__ = "study_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(255))
    source_image: Mapped[str] = mapped_column(ForeignKey("images.sha256"))
    instruction: Mapped[str] = mapped_column(Text)
    sample_id: Mapped[int | None] = mapped_column(ForeignKey("samples.id", ondelete="SET NULL"))
    is_attention_check: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    attention_answer: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (UniqueConstraint("study_id", "external_id"),)


class StudyOutput(Base):
    """One method's output image for a study item; method names are never shown to participants."""

    __tablename__ = "study_outputs"

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("study_items.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(64))
    image: Mapped[str] = mapped_column(ForeignKey("images.sha256"))

    __table_args__ = (UniqueConstraint("item_id", "method"),)


class StudyParticipant(Base):
    """A participant's enrolment in a study, with an optional per-participant invite link (only its hash is kept)."""

    __tablename__ = "study_participants"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    invite_token_hash: Mapped[str | None] = mapped_column(SHA256, unique=True)
    invited_at: Mapped[datetime] = _created()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    excluded: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    exclusion_reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (UniqueConstraint("study_id", "user_id"),)


class StudyAssignment(Base):
    """An item in a participant's sequence, with the screen order of the method outputs shown to them."""

    __tablename__ = "study_assignments"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    participant_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("study_items.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    shown_order: Mapped[list[Any]] = mapped_column(JSON)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("participant_id", "item_id"),
        UniqueConstraint("study_id", "participant_id", "position"),
        CheckConstraint("position >= 1", name="position_positive"),
    )


class Vote(Base):
    """A participant's choice for one item and criterion (``chosen_output_id`` NULL = none is acceptable)."""

    __tablename__ = "votes"

    id: Mapped[int] = mapped_column(primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("study_assignments.id", ondelete="CASCADE"))
    participant_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("study_items.id", ondelete="CASCADE"))
    criterion: Mapped[str] = mapped_column(String(32))
    chosen_output_id: Mapped[int | None] = mapped_column(ForeignKey("study_outputs.id", ondelete="CASCADE"))
    shown_position: Mapped[int | None] = mapped_column(Integer)
    shown_order: Mapped[list[Any]] = mapped_column(JSON)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow, server_default=func.now()
    )

    __table_args__ = (
        UniqueConstraint("participant_id", "item_id", "criterion"),
        Index("ix_votes_assignment_id", "assignment_id"),
        CheckConstraint("latency_ms IS NULL OR latency_ms >= 0", name="latency_nonnegative"),
    )


# ----------------------------------------------------------------------------------------------------------
# products


class Export(Base):
    """A recorded export run, so it is always known which samples went into which export."""

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(primary_key=True)
    format: Mapped[str] = mapped_column(String(32))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"), default=JobStatus.running)
    path: Mapped[str | None] = mapped_column(Text)
    filter: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    since_export_id: Mapped[int | None] = mapped_column(ForeignKey("exports.id", ondelete="SET NULL"))
    n_samples: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    db_revision: Mapped[str | None] = mapped_column(String(64))
    manifest_sha256: Mapped[str | None] = mapped_column(SHA256)
    error: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = _created()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ExportItem(Base):
    __tablename__ = "export_items"

    export_id: Mapped[int] = mapped_column(ForeignKey("exports.id", ondelete="CASCADE"), primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"), primary_key=True)
    split: Mapped[Split] = mapped_column(_enum(Split, "split"))


class Preview(Base):
    """An edit the model made of a sample, cached per (model version, seed, parameters)."""

    __tablename__ = "previews"

    id: Mapped[int] = mapped_column(primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id", ondelete="CASCADE"))
    model_version: Mapped[str] = mapped_column(String(128))
    seed: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    params_hash: Mapped[str] = mapped_column(SHA256)
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"), default=JobStatus.queued)
    image: Mapped[str | None] = mapped_column(ForeignKey("images.sha256"))
    error: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = _created()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("sample_id", "model_version", "seed", "params_hash"),)


class AuditLog(Base):
    """Who did what and when: logins, decisions, setting changes, exports, account changes."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = _created()
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    action: Mapped[str] = mapped_column(String(64))
    entity: Mapped[str | None] = mapped_column(String(64))
    entity_id: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    __table_args__ = (Index("ix_audit_log_at", "at"),)


# ----------------------------------------------------------------------------------------------------------
# runtime: sessions, login throttling, the job queue


class WebSession(Base):
    """A login session of the web app. The cookie holds a random id; only its sha256 is stored here, so a leaked
    table does not hand out sessions. ``data`` is what the app keeps in the session (user id, CSRF token, the
    study of an invite link); ``revoked_at`` ends it at once for every replica."""

    __tablename__ = "web_sessions"

    id_hash: Mapped[str] = mapped_column(SHA256, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = _created()
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    user_agent: Mapped[str | None] = mapped_column(String(300))
    ip: Mapped[str | None] = mapped_column(String(64))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_reason: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_web_sessions_user_id", "user_id"),)


class LoginThrottleKey(Base):
    """Failed logins of one key: ``scope`` ``pair`` is (username, client IP), ``ip`` every username from one IP,
    ``join`` unknown invite links from one IP. ``blocked_until`` is when the key may try again."""

    __tablename__ = "login_throttle"

    id: Mapped[int] = mapped_column(primary_key=True)
    scope: Mapped[str] = mapped_column(String(8))
    username: Mapped[str] = mapped_column(String(64), default="", server_default="")
    ip: Mapped[str] = mapped_column(String(64))
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    first_failure_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_failure_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    blocked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("scope", "username", "ip"),
        CheckConstraint("scope IN ('pair', 'ip', 'join')", name="scope_known"),
        CheckConstraint("failures >= 0", name="failures_nonnegative"),
    )


class Job(Base):
    """One unit of background work (an export, a model preview) for ``mcie worker``. A worker claims a queued row
    (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), holds it until ``lease_until`` and
    renews the lease while it works; a row whose lease ran out is claimed again (its worker died)."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[QueueStatus] = mapped_column(_enum(QueueStatus, "queue_status"), default=QueueStatus.queued)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, default=3, server_default="3")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker_id: Mapped[str | None] = mapped_column(String(128))
    progress: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    progress_note: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    requested_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = _created()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_jobs_claim", "status", "id"),
        CheckConstraint("attempts >= 0 AND max_attempts >= 1", name="attempts_valid"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_range"),
    )
