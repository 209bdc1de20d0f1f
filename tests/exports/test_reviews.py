"""``export_reviews`` writes every raw review and decision as CSV or Parquet, on SQLite and PostgreSQL."""

from __future__ import annotations

import pandas as pd
import pytest
from sqlalchemy import func, select

from mcie.db.models import Decision, Review, User
from mcie.db.session import session_scope
from mcie.exports.api import export_reviews
from tests.exports.builder import T0, build_small_db


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_reviews_and_decisions_round_trip(migrated_url, store, tmp_path, suffix) -> None:
    small = build_small_db(migrated_url, store)
    a12 = small.by_name["a12"]
    with session_scope(migrated_url) as session:  # a second decision: only the newest is marked latest
        lena = session.scalar(select(User.id).where(User.username == "lena"))
        session.add(Decision(sample_id=a12, outcome="rejected", source="lead", decided_by=lena, reason="blurry"))
        n_reviews = session.scalar(select(func.count()).select_from(Review))
        n_decisions = session.scalar(select(func.count()).select_from(Decision))
    with session_scope(migrated_url) as session:
        result = export_reviews(session, tmp_path / "out" / f"reviews{suffix}")
    assert (result.n_reviews, result.n_decisions) == (n_reviews, n_decisions)
    assert result.decisions_path == tmp_path / "out" / f"reviews-decisions{suffix}"
    read = pd.read_csv if suffix == ".csv" else pd.read_parquet
    reviews, decisions = read(result.reviews_path), read(result.decisions_path)
    assert len(reviews) == n_reviews and reviews["review_id"].is_monotonic_increasing
    b12 = reviews[reviews["sample_id"] == small.by_name["b12"]]
    assert sorted(b12["username"]) == ["alice", "bob", "carol"]
    assert sorted(b12["quality"].tolist()) == [4, 4, 5] and b12["consistent"].tolist() == [True, False, True]
    assert set(reviews["dataset"]) == {"demo", "seed"} and set(reviews["comment"]) == {"private note"}
    mine = decisions[decisions["sample_id"] == a12].sort_values("decision_id")
    assert mine["outcome"].tolist() == ["accepted", "rejected"] and mine["is_latest"].tolist() == [False, True]
    assert mine["decided_by_username"].tolist()[-1] == "lena" and mine["reason"].tolist()[-1] == "blurry"
    assert decisions["is_latest"].sum() == decisions["sample_id"].nunique()
    first = pd.to_datetime(mine["created_at"].iloc[0], utc=True)
    assert first == pd.Timestamp(T0 + pd.Timedelta(days=1))
    assert not list((tmp_path / "out").glob(".*"))


def test_unknown_suffix_is_refused(sqlite_url, tmp_path) -> None:
    with session_scope(sqlite_url) as session, pytest.raises(ValueError, match=r"must end in \.csv or \.parquet"):
        export_reviews(session, tmp_path / "reviews.xlsx")
