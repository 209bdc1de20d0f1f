"""Which samples an export takes (:class:`ExportFilter`), read from the database as a stream of records.

By default an export takes the samples whose status is ``accepted`` (the review rule or a lead accepted them). A
filter narrows that: the statuses, the minimum aggregated (median) quality and complexity, the reviewers (samples
that at least one of these usernames reviewed), a date range of the sample's newest decision, and the datasets.
``since=EXPORT_ID`` keeps only the samples whose newest decision is an acceptance made after that export was
created and that are not already in it, so successive exports can ship increments.

The samples are read in id order with ``yield_per``; for each partition the related rows (sub-instructions, reviews,
turns, images, MLLM verdicts) are loaded in a handful of ``IN`` queries, so memory stays flat however large the
selection. Aggregated-score thresholds are applied in Python after loading (medians are not portable SQL).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import Select, and_, exists, func, select
from sqlalchemy.orm import Session, aliased

from mcie.annotate.aggregation import at_least
from mcie.db.models import (
    Decision,
    Export,
    ExportItem,
    Image,
    Instance,
    MllmJudgement,
    MllmStage,
    Outcome,
    Review,
    Sample,
    SampleStatus,
    SubInstruction,
    Turn,
    User,
)
from mcie.db.windows import window_images
from mcie.exports.records import (
    DecisionRow,
    ExportRecord,
    JudgementRow,
    ReviewRow,
    SampleRows,
    SubRow,
    build_record,
)
from mcie.exports.splits import split_for

DEFAULT_CHUNK = 1000


class ExportFilter(BaseModel):
    """Selection of an export, stored as JSON in ``exports.filter`` (``model_dump(mode="json")``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    statuses: tuple[SampleStatus, ...] = Field(
        (SampleStatus.accepted,), description="Sample statuses to take (default: accepted)."
    )
    min_quality: float | None = Field(None, ge=1, le=5, description="Median review quality at least this.")
    min_complexity: float | None = Field(None, ge=1, le=5, description="Median review complexity at least this.")
    reviewers: tuple[str, ...] | None = Field(None, description="Samples reviewed by at least one of these users.")
    decided_after: datetime | None = Field(None, description="Newest decision made at or after this time (UTC).")
    decided_before: datetime | None = Field(None, description="Newest decision made before this time (UTC).")
    datasets: tuple[str, ...] | None = Field(None, description="Instances from these source datasets only.")

    @field_validator("statuses", "reviewers", "datasets")
    @classmethod
    def _not_empty(cls, value: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
        if value is not None and len(value) == 0:
            raise ValueError("must list at least one value (leave it out to not filter on it)")
        return None if value is None else tuple(sorted(set(value)))

    @field_validator("decided_after", "decided_before")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @model_validator(mode="after")
    def _range(self) -> ExportFilter:
        if self.decided_after and self.decided_before and self.decided_after >= self.decided_before:
            raise ValueError("decided_after must be earlier than decided_before")
        return self

    def keeps_scores(self, quality: float | None, complexity: float | None) -> bool:
        """Whether aggregated scores are :func:`~annotate.aggregation.at_least` the minimums (a sample without reviews
        fails any minimum)."""
        return at_least(quality, self.min_quality) and at_least(complexity, self.min_complexity)


def _naive_utc(value: datetime) -> datetime:
    """SQLite stores UTC wall-clock text; compare with a naive UTC value there (aware on PostgreSQL is the same)."""
    return value.astimezone(UTC).replace(tzinfo=None)


def selection_query(flt: ExportFilter, since: int | None = None, *, dialect: str = "sqlite") -> Select[Any]:
    """The samples an export takes, with their instance and newest decision, in id order."""
    newest = (
        select(func.max(Decision.id)).where(Decision.sample_id == Sample.id).correlate(Sample).scalar_subquery()
    )
    lead = aliased(User)
    query = (
        select(
            Sample.id,
            Sample.instance_id,
            Sample.first_turn,
            Sample.last_turn,
            Sample.status,
            Sample.instruction,
            Instance.dataset,
            Instance.external_id,
            Instance.source_image,
            Decision.outcome,
            Decision.source,
            Decision.rule,
            lead.username,
        )
        .join(Instance, Instance.id == Sample.instance_id)
        .outerjoin(Decision, Decision.id == newest)
        .outerjoin(lead, lead.id == Decision.decided_by)
        .where(Sample.status.in_(list(flt.statuses)))
        .order_by(Sample.id)
    )

    def when(value: datetime) -> datetime:
        return _naive_utc(value) if dialect == "sqlite" else value

    if flt.datasets is not None:
        query = query.where(Instance.dataset.in_(list(flt.datasets)))
    if flt.reviewers is not None:
        reviewed = (
            select(Review.id)
            .join(User, User.id == Review.user_id)
            .where(Review.sample_id == Sample.id, User.username.in_(list(flt.reviewers)))
        )
        query = query.where(exists(reviewed))
    if flt.decided_after is not None:
        query = query.where(Decision.created_at >= when(flt.decided_after))
    if flt.decided_before is not None:
        query = query.where(Decision.created_at < when(flt.decided_before))
    if since is not None:
        since_created = select(Export.created_at).where(Export.id == since).scalar_subquery()
        in_since = select(ExportItem.sample_id).where(
            and_(ExportItem.export_id == since, ExportItem.sample_id == Sample.id)
        )
        query = query.where(
            Decision.outcome == Outcome.accepted,
            Decision.created_at > since_created,
            ~exists(in_since),
        )
    return query


def _load_related(session: Session, chunk: Sequence[Any]) -> list[SampleRows]:
    """The rows of one partition of samples, each with its sub-instructions, reviews, turns and verdict."""
    ids = [row.id for row in chunk]
    instance_ids = sorted({row.instance_id for row in chunk})
    subs: dict[int, list[SubRow]] = defaultdict(list)
    for s in session.execute(
        select(
            SubInstruction.sample_id,
            SubInstruction.turn_index,
            SubInstruction.text,
            SubInstruction.operation,
            SubInstruction.box_x0,
            SubInstruction.box_y0,
            SubInstruction.box_x1,
            SubInstruction.box_y1,
            SubInstruction.box_source,
            SubInstruction.box_score,
        )
        .where(SubInstruction.sample_id.in_(ids))
        .order_by(SubInstruction.sample_id, SubInstruction.turn_index)
    ):
        box = None if s.box_x0 is None else (s.box_x0, s.box_y0, s.box_x1, s.box_y1)
        source = None if s.box_source is None else str(s.box_source)
        subs[s.sample_id].append(SubRow(s.turn_index, s.text, str(s.operation), box, source, s.box_score))
    reviews: dict[int, list[ReviewRow]] = defaultdict(list)
    for r in session.execute(
        select(Review.sample_id, Review.consistent, Review.quality, Review.complexity, Review.revision, User.username)
        .join(User, User.id == Review.user_id)
        .where(Review.sample_id.in_(ids))
        .order_by(Review.sample_id, Review.id)
    ):
        reviews[r.sample_id].append(ReviewRow(bool(r.consistent), r.quality, r.complexity, r.revision, r.username))
    judgements: dict[int, JudgementRow] = {}
    for j in session.execute(
        select(MllmJudgement.sample_id, MllmJudgement.verdict, MllmJudgement.score, MllmJudgement.model,
               MllmJudgement.prompt_version)
        .where(MllmJudgement.sample_id.in_(ids), MllmJudgement.stage == MllmStage.conflict)
        .order_by(MllmJudgement.sample_id, MllmJudgement.id)
    ):
        judgements[j.sample_id] = JudgementRow(j.verdict, j.score, j.model, j.prompt_version)  # newest wins
    turns: dict[int, dict[int, str]] = defaultdict(dict)
    for t in session.execute(
        select(Turn.instance_id, Turn.index, Turn.result_image).where(Turn.instance_id.in_(instance_ids))
    ):
        turns[t.instance_id][t.index] = t.result_image
    out = []
    for row in chunk:
        decision = None
        if row.outcome is not None:
            decision = DecisionRow(str(row.outcome), str(row.source), row.rule, row.username)
        out.append(
            SampleRows(
                sample_id=row.id,
                instance_id=row.instance_id,
                dataset=row.dataset,
                external_id=row.external_id,
                first_turn=row.first_turn,
                last_turn=row.last_turn,
                status=str(row.status),
                instruction=row.instruction,
                instance_source=row.source_image,
                turn_results=turns.get(row.instance_id, {}),
                subs=subs.get(row.id, ()),
                reviews=reviews.get(row.id, ()),
                judgement=judgements.get(row.id),
                decision=decision,
            )
        )
    return out


def _image_meta(session: Session, shas: set[str]) -> dict[str, tuple[str, int, int]]:
    if not shas:
        return {}
    rows = session.execute(
        select(Image.sha256, Image.format, Image.width, Image.height).where(Image.sha256.in_(sorted(shas)))
    )
    return {r.sha256: (r.format, r.width, r.height) for r in rows}


def _shas_of(rows: SampleRows) -> set[str]:
    return window_images(rows.instance_source, rows.turn_results, rows.first_turn, rows.last_turn).shas()


def iter_records(
    session: Session,
    flt: ExportFilter | None = None,
    *,
    since: int | None = None,
    val_fraction: float = 0.05,
    include_reviewers: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
) -> Iterator[ExportRecord]:
    """The records of the selected samples, in sample id order, streamed ``chunk_size`` samples at a time."""
    flt = flt or ExportFilter()
    dialect = session.get_bind().dialect.name
    query = selection_query(flt, since, dialect=dialect).execution_options(yield_per=chunk_size)
    for chunk in session.execute(query).partitions():
        loaded = _load_related(session, chunk)
        images = _image_meta(session, set().union(*(_shas_of(r) for r in loaded)))
        for rows in loaded:
            record = build_record(
                rows, images, split_for(rows.dataset, rows.external_id, val_fraction),
                include_reviewers=include_reviewers,
            )
            aggregated = record.provenance.aggregated
            if flt.keeps_scores(aggregated.quality, aggregated.complexity):
                yield record
