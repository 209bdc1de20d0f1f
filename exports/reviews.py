"""Raw reviews and decisions as CSV or Parquet for analysis (agreement studies, reviewer audits, dashboards).

``export_reviews(session, "out/reviews.csv")`` writes one row per review (current revision, with the reviewer's id and
username, the sample's instance and status) to that file and one row per decision (every decision, with
``is_latest`` marking the one that counts) to ``out/reviews-decisions.csv``; a ``.parquet`` suffix writes Parquet
instead. Rows are streamed from the database in id order and each file is written to a temporary name and renamed,
so a failed run leaves no half file. Times are UTC (ISO 8601 in CSV, ``timestamp[us, UTC]`` in Parquet). Both
files are read in the caller's transaction (``with session_scope(url) as session:``), so they agree with each other.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, aliased

from mcie.db.models import Decision, Instance, Review, Sample, User

SUFFIXES = (".csv", ".parquet")
_BATCH = 5000

REVIEW_SCHEMA = pa.schema(
    [
        ("review_id", pa.int64()),
        ("sample_id", pa.int64()),
        ("instance_id", pa.int64()),
        ("dataset", pa.string()),
        ("external_id", pa.string()),
        ("first_turn", pa.int32()),
        ("last_turn", pa.int32()),
        ("sample_status", pa.string()),
        ("user_id", pa.int64()),
        ("username", pa.string()),
        ("consistent", pa.bool_()),
        ("quality", pa.int32()),
        ("complexity", pa.int32()),
        ("comment", pa.string()),
        ("box_corrections", pa.string()),
        ("time_spent_s", pa.float64()),
        ("revision", pa.int32()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)

DECISION_SCHEMA = pa.schema(
    [
        ("decision_id", pa.int64()),
        ("sample_id", pa.int64()),
        ("instance_id", pa.int64()),
        ("dataset", pa.string()),
        ("external_id", pa.string()),
        ("outcome", pa.string()),
        ("source", pa.string()),
        ("rule", pa.string()),
        ("decided_by", pa.int64()),
        ("decided_by_username", pa.string()),
        ("reason", pa.string()),
        ("is_latest", pa.bool_()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class ReviewsExport:
    reviews_path: Path
    decisions_path: Path
    n_reviews: int
    n_decisions: int


def decisions_path_for(path: Path) -> Path:
    """Where the decisions go beside the reviews file: ``<stem>-decisions<suffix>``."""
    return path.with_name(f"{path.stem}-decisions{path.suffix}")


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json_text(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))


def _reviews_query() -> Select[Any]:
    return (
        select(
            Review.id, Review.sample_id, Sample.instance_id, Instance.dataset, Instance.external_id,
            Sample.first_turn, Sample.last_turn, Sample.status, Review.user_id, User.username, Review.consistent,
            Review.quality, Review.complexity, Review.comment, Review.box_corrections, Review.time_spent_s,
            Review.revision, Review.created_at, Review.updated_at,
        )
        .join(Sample, Sample.id == Review.sample_id)
        .join(Instance, Instance.id == Sample.instance_id)
        .join(User, User.id == Review.user_id)
        .order_by(Review.id)
    )


def _decisions_query() -> Select[Any]:
    later = aliased(Decision)
    newest = select(func.max(later.id)).where(later.sample_id == Decision.sample_id).scalar_subquery()
    lead = aliased(User)
    return (
        select(
            Decision.id, Decision.sample_id, Sample.instance_id, Instance.dataset, Instance.external_id,
            Decision.outcome, Decision.source, Decision.rule, Decision.decided_by, lead.username, Decision.reason,
            (Decision.id == newest).label("is_latest"), Decision.created_at,
        )
        .join(Sample, Sample.id == Decision.sample_id)
        .join(Instance, Instance.id == Sample.instance_id)
        .outerjoin(lead, lead.id == Decision.decided_by)
        .order_by(Decision.id)
    )


def review_row(r: Any) -> dict[str, Any]:
    return {
        "review_id": r[0], "sample_id": r[1], "instance_id": r[2], "dataset": r[3], "external_id": r[4],
        "first_turn": r[5], "last_turn": r[6], "sample_status": str(r[7]), "user_id": r[8], "username": r[9],
        "consistent": bool(r[10]), "quality": r[11], "complexity": r[12], "comment": r[13],
        "box_corrections": _json_text(r[14]), "time_spent_s": r[15], "revision": r[16],
        "created_at": _utc(r[17]), "updated_at": _utc(r[18]),
    }


def decision_row(d: Any) -> dict[str, Any]:
    return {
        "decision_id": d[0], "sample_id": d[1], "instance_id": d[2], "dataset": d[3], "external_id": d[4],
        "outcome": str(d[5]), "source": str(d[6]), "rule": _json_text(d[7]), "decided_by": d[8],
        "decided_by_username": d[9], "reason": d[10], "is_latest": bool(d[11]), "created_at": _utc(d[12]),
    }


def _csv_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return "" if value is None else value


def _write_table(path: Path, schema: pa.Schema, batches: Iterator[Sequence[dict[str, Any]]]) -> int:
    """Write the row batches to ``path`` (CSV or Parquet by suffix) through a temporary file; returns the rows."""
    tmp = path.with_name(f".{path.name}.partial")
    n = 0
    try:
        if path.suffix == ".csv":
            with tmp.open("w", encoding="utf-8", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(schema.names)
                for batch in batches:
                    writer.writerows([_csv_value(row[c]) for c in schema.names] for row in batch)
                    n += len(batch)
        else:
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                for batch in batches:
                    writer.write_table(pa.Table.from_pylist(list(batch), schema=schema))
                    n += len(batch)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def export_reviews(session: Session, path: str | os.PathLike[str]) -> ReviewsExport:
    """Write every review to ``path`` and every decision beside it (see the module docstring)."""
    out = Path(path)
    if out.suffix not in SUFFIXES:
        raise ValueError(f"{out}: the file name must end in .csv or .parquet (it chooses the format)")
    out.parent.mkdir(parents=True, exist_ok=True)
    decisions_out = decisions_path_for(out)

    def batches(query: Select[Any], convert: Any) -> Iterator[list[dict[str, Any]]]:
        for part in session.execute(query.execution_options(yield_per=_BATCH)).partitions():
            yield [convert(row) for row in part]

    n_reviews = _write_table(out, REVIEW_SCHEMA, batches(_reviews_query(), review_row))
    n_decisions = _write_table(decisions_out, DECISION_SCHEMA, batches(_decisions_query(), decision_row))
    return ReviewsExport(out, decisions_out, n_reviews, n_decisions)
