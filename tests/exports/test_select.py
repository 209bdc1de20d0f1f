"""Selection on SQLite and PostgreSQL: the default, every filter, ``since`` semantics, and streaming in id order."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mcie.db.models import Decision, Export, ExportItem, JobStatus, Sample
from mcie.db.session import session_scope
from mcie.exports.select import ExportFilter, iter_records
from tests.exports.builder import T0, Builder, build_small_db


@pytest.fixture
def small(migrated_url, store):
    return build_small_db(migrated_url, store)


def _ids(url: str, flt: ExportFilter | None = None, **kwargs) -> list[int]:
    with session_scope(url) as session:
        return [r.sample_id for r in iter_records(session, flt, **kwargs)]


def test_default_is_the_accepted_samples_in_id_order_whatever_the_chunk(migrated_url, small) -> None:
    assert _ids(migrated_url) == sorted(small.accepted)
    assert _ids(migrated_url, chunk_size=2) == sorted(small.accepted)
    with session_scope(migrated_url) as session:
        records = {r.sample_id: r for r in iter_records(session, chunk_size=1)}
    b12 = records[small.by_name["b12"]]
    assert b12.provenance.n_reviews == 3 and b12.provenance.mllm_conflict.verdict == "conflict"
    assert b12.provenance.decision.source == "lead" and b12.provenance.decision.decided_by is None
    assert records[small.by_name["a23"]].source_image.after_turn == 1


def test_status_dataset_and_reviewer_filters(migrated_url, small) -> None:
    n = small.by_name
    assert _ids(migrated_url, ExportFilter(statuses=["rejected", "in_review"])) == sorted([n["a13"], n["c24"]])
    assert _ids(migrated_url, ExportFilter(datasets=["seed"])) == [n["c12"], n["c34"]]
    assert _ids(migrated_url, ExportFilter(reviewers=["carol"])) == [n["a23"], n["b12"], n["c34"]]
    assert _ids(migrated_url, ExportFilter(reviewers=["nobody"])) == []


def test_score_thresholds_use_the_medians(migrated_url, small) -> None:
    n = small.by_name
    # medians: a12 q4.5 c4; a23 q4 c5; b12 q4 c4; c12 q5 c5; c34 q4 c3.5
    assert _ids(migrated_url, ExportFilter(min_quality=4.5)) == [n["a12"], n["c12"]]
    assert _ids(migrated_url, ExportFilter(min_complexity=4.5)) == [n["a23"], n["c12"]]
    assert _ids(migrated_url, ExportFilter(min_quality=4, min_complexity=4)) == [n["a12"], n["a23"], n["b12"], n["c12"]]


def test_decision_date_range_uses_the_newest_decision(migrated_url, small, store) -> None:
    n = small.by_name
    window = ExportFilter(decided_after=T0 + timedelta(days=2), decided_before=T0 + timedelta(days=5))
    assert _ids(migrated_url, window) == [n["a23"], n["b12"], n["c12"]]
    with session_scope(migrated_url) as session:  # a later re-decision moves a12 into the window
        session.add(Decision(sample_id=n["a12"], outcome="accepted", source="rule", created_at=T0 + timedelta(days=3)))
    assert _ids(migrated_url, window) == [n["a12"], n["a23"], n["b12"], n["c12"]]


def test_since_takes_samples_accepted_after_that_export_and_not_in_it(migrated_url, small, store) -> None:
    n = small.by_name
    cut = T0 + timedelta(days=10)
    with session_scope(migrated_url) as session:
        export = Export(format="jsonl", status=JobStatus.done, created_at=cut)
        session.add(export)
        session.flush()
        session.add_all([ExportItem(export_id=export.id, sample_id=n["a12"], split="train"),
                         ExportItem(export_id=export.id, sample_id=n["a23"], split="train")])
        later = cut + timedelta(hours=1)
        # a12 re-accepted after the export but already in it; c24 newly accepted; b12 re-decided as rejected
        session.add(Decision(sample_id=n["a12"], outcome="accepted", source="rule", created_at=later))
        session.add(Decision(sample_id=n["c24"], outcome="accepted", source="rule", created_at=later))
        session.add(Decision(sample_id=n["b12"], outcome="rejected", source="rule", created_at=later))
        session.get_one(Sample, n["c24"]).status = "accepted"
        b = Builder(session, store)
        since_id = export.id
        # a brand-new sample accepted after the export
        inst = b.instance("demo", "new", 2)
        new_id = b.sample(inst, 1, 2, reviews=(("alice", True, 5, 5),), decided_at=later)
    assert _ids(migrated_url, since=since_id) == sorted([n["c24"], new_id])
    # the filter still applies on top of since
    assert _ids(migrated_url, ExportFilter(datasets=["demo"]), since=since_id) == [new_id]
