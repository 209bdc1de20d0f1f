"""The leads' dashboard figures on a small hand-made database whose every number is known (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from mcie.annotate.aggregation import aggregate_consistency
from mcie.annotate.agreement import cohen_kappa, krippendorff_alpha, mllm_human_agreement
from mcie.annotate.dashboard_data import (
    REVIEW_COLUMNS,
    DashboardError,
    agreement_figures,
    calibration_mask,
    forecast_finish,
    human_majority,
    median_seconds_per_review,
    remaining_reviews,
    reviews_frame,
    reviews_per_reviewer_per_day,
    samples_frame,
    server_seconds,
    status_counts,
    throughput,
    throughput_freq,
)
from mcie.annotate.project import ProjectConfig
from mcie.annotate.queue import is_calibration, reviews_wanted
from mcie.db.session import session_scope
from tests.annotate.factories import (
    add_conflict_judgement,
    add_review,
    configure,
    make_gold,
    make_sample,
    make_user,
)
from tests.annotate.tx import read_tx

DAY1 = datetime(2025, 3, 3, 10, 0, tzinfo=UTC)
DAY3 = datetime(2025, 3, 5, 10, 0, tzinfo=UTC)
SHARE = 0.5
# sample -> {rater: (consistent, quality, complexity)}
ANSWERS = {
    "s1": {"ann": (True, 4, 4), "bob": (True, 4, 5), "cy": (True, 5, 4)},
    "s2": {"ann": (False, 2, 3), "bob": (False, 2, 2), "cy": (True, 3, 3)},
    "s3": {"ann": (True, 4, 4), "bob": (True, 3, 4), "cy": (True, 4, 4)},
    "s4": {"ann": (False, 1, 2), "bob": (False, 2, 2), "cy": (False, 1, 1)},
    "s5": {"ann": (True, 5, 5)},
    "s6": {"ann": (True, 4, 3)},
    "gold": {"ann": (True, 4, 4), "bob": (False, 2, 4)},
}
DAYS = {  # rater -> samples reviewed on day 1; the rest on day 3
    "ann": ("s1", "s2", "s3"),
    "bob": ("s1", "s2"),
    "cy": (),
}
STATUSES = {"s1": "accepted", "s2": "rejected", "s3": "accepted", "s4": "rejected", "s5": "in_review",
            "s6": "in_review", "s7": "ready", "gold": "ready"}


@pytest.fixture
def project(migrated_url: str) -> tuple[str, dict[str, int]]:
    """The hand-made project: 3 raters, 7 samples and a gold one, reviews on day 1 and day 3, MLLM verdicts."""
    url = migrated_url
    with session_scope(url) as session:
        configure(session, calibration_share=SHARE, gold_rate=0.0, reviews_per_sample=1, calibration_reviews=3)
        users = {name: make_user(session, name) for name in ("ann", "bob", "cy")}
        samples = {name: make_sample(session, status=status) for name, status in STATUSES.items()}
        make_gold(session, samples["gold"], consistent=True, quality=4, complexity=4, tolerance=1)
        k = 0
        for sample_name, by_rater in ANSWERS.items():
            for rater, (c, q, x) in by_rater.items():
                day = DAY1 if sample_name in DAYS[rater] else DAY3
                add_review(session, samples[sample_name], users[rater], consistent=c, quality=q, complexity=x,
                           time_spent_s=10.0 * (k + 1), created_at=day + timedelta(minutes=k))
                k += 1
        add_conflict_judgement(session, samples["s1"], "no_conflict")
        add_conflict_judgement(session, samples["s2"], "conflict")
        add_conflict_judgement(session, samples["s3"], "conflict")
        add_conflict_judgement(session, samples["s4"], "error")
        add_conflict_judgement(session, samples["s5"], "conflict", created_at=DAY1)
        add_conflict_judgement(session, samples["s5"], "no_conflict", created_at=DAY3)
        ids = {name: sample.id for name, sample in samples.items()}
    return url, ids



def test_loaders(project) -> None:
    url, ids = project
    frame = read_tx(url, reviews_frame)
    assert tuple(frame.columns) == REVIEW_COLUMNS
    assert len(frame) == sum(len(v) for v in ANSWERS.values())
    assert str(frame["created_at"].dt.tz) == "UTC"
    assert frame["quality"].dtype == np.int64 and frame["consistent"].dtype == bool
    name_of = {v: k for k, v in ids.items()}
    got = {(name_of[r.sample_id], r.rater): (r.consistent, r.quality, r.complexity) for r in frame.itertuples()}
    assert got == {(s, rater): answer for s, by in ANSWERS.items() for rater, answer in by.items()}
    assert set(frame.loc[frame["is_gold"], "sample_id"]) == {ids["gold"]}
    for row in frame.itertuples():
        assert row.is_calibration == (not row.is_gold and is_calibration(row.sample_id, SHARE))
    bob_day1 = frame[(frame["rater"] == "bob") & (frame["sample_id"] == ids["s1"])]["created_at"].iloc[0]
    assert bob_day1.date() == DAY1.date()

    samples = read_tx(url, samples_frame).set_index("sample_id")
    assert samples.loc[ids["s1"], "n_reviews"] == 3 and samples.loc[ids["s7"], "n_reviews"] == 0
    assert samples.loc[ids["gold"], "is_gold"] and not samples.loc[ids["gold"], "is_calibration"]
    assert samples.loc[ids["s5"], "mllm_verdict"] == "no_conflict"  # the newest verdict
    assert samples.loc[ids["s4"], "mllm_verdict"] == "error"
    assert pd.isna(samples.loc[ids["s6"], "mllm_verdict"])
    assert samples.loc[ids["s2"], "status"] == "rejected"

    assert read_tx(url, status_counts) == {
        "filtering": 0, "filtered_out": 0, "ready": 2, "in_review": 2, "accepted": 2, "rejected": 2,
        "needs_adjudication": 0,
    }
    config = ProjectConfig(calibration_share=SHARE, reviews_per_sample=1, calibration_reviews=3)
    expected = sum(max(reviews_wanted(ids[s], config) - len(ANSWERS.get(s, {})), 0) for s in ("s5", "s6", "s7"))
    assert read_tx(url, remaining_reviews) == expected


def test_calibration_mask_matches_the_queue() -> None:
    ids = np.arange(1, 50_001)
    mask = calibration_mask(ids, 0.1)
    assert mask.tolist() == [is_calibration(int(i), 0.1) for i in ids]
    assert calibration_mask(np.array([2**40 + 3]), 0.3)[0] == is_calibration(2**40 + 3, 0.3)


def test_work_figures(project) -> None:
    url, _ = project
    frame = read_tx(url, reviews_frame)
    per_day = reviews_per_reviewer_per_day(frame)
    assert [tuple(r) for r in per_day.itertuples(index=False)] == [
        (date(2025, 3, 3), "ann", 3),
        (date(2025, 3, 3), "bob", 2),
        (date(2025, 3, 5), "ann", 4),
        (date(2025, 3, 5), "bob", 3),
        (date(2025, 3, 5), "cy", 4),
    ]
    daily = throughput(frame)
    assert [p.date() for p in daily["period"]] == [date(2025, 3, 3), date(2025, 3, 4), date(2025, 3, 5)]
    assert daily["n_reviews"].tolist() == [5, 0, 11] and daily["cumulative"].tolist() == [5, 5, 16]
    assert throughput(frame, freq="W")["n_reviews"].sum() == 16
    with pytest.raises(DashboardError, match="freq"):
        throughput(frame, freq="fortnightly")

    assert median_seconds_per_review(frame) == 85.0  # 10, 20, ..., 160
    assert (frame["server_s"] == 0).all()  # the factory leases and submits each review in the same instant
    assert median_seconds_per_review(frame, "server_s") == 0.0
    assert throughput_freq(frame) == "D"  # two and a half days of reviews
    assert throughput_freq(frame[frame["created_at"] < DAY1 + timedelta(days=1)]) == "h"
    assert throughput_freq(frame.iloc[:0]) == "D"
    assert median_seconds_per_review(frame.assign(time_spent_s=np.nan)) is None

    now = DAY3 + timedelta(hours=8)
    # 14 non-gold reviews since the first one, 2 days 8 hours ago: 6 a day; 22 left take 3 days 16 hours
    assert forecast_finish(22, frame, now) == date(2025, 3, 9)
    # over the last day only: 9 non-gold reviews a day; 22 left take 2.44 days
    assert forecast_finish(22, frame, now, window_days=1) == date(2025, 3, 8)
    assert forecast_finish(0, frame, now) == now.date()
    assert forecast_finish(10, frame.iloc[0:0], now) is None
    assert forecast_finish(10, frame, DAY1 - timedelta(days=1)) is None  # no review before "now"


def test_agreement_figures(project) -> None:
    url, ids = project
    figures = read_tx(url, agreement_figures, n_boot=200, seed=1, min_shared=2)
    json.dumps(figures, allow_nan=False)
    assert (figures["n_reviews"], figures["n_reviewers"], figures["n_gold_reviews"]) == (16, 3, 2)

    overlapping = figures["overlapping"]
    assert (overlapping["n_samples"], overlapping["n_reviews"]) == (4, 12)
    consistency = {r: [ANSWERS[s][r][0] for s in ("s1", "s2", "s3", "s4")] for r in ("ann", "bob", "cy")}
    expected_alpha = krippendorff_alpha([consistency[r] for r in ("ann", "bob", "cy")], "nominal")
    assert overlapping["questions"]["consistency"]["alpha"] == pytest.approx(expected_alpha)
    n_calibration = sum(is_calibration(ids[s], SHARE) for s in ("s1", "s2", "s3", "s4"))
    assert figures["calibration"]["questions"]["quality"]["n_units"] == n_calibration

    pairwise = figures["pairwise_cohen"]
    assert pairwise["raters"] == ["ann", "bob", "cy"]
    assert pairwise["weights"] == {"consistency": None, "quality": "quadratic", "complexity": "quadratic"}
    assert pairwise["shared"] == [[4, 4, 4], [4, 4, 4], [4, 4, 4]]  # s1-s4, each reviewed by all three
    assert pairwise["consistency"][0][0] is None
    assert pairwise["consistency"][0][1] == pytest.approx(1.0)
    assert pairwise["consistency"][0][2] == pytest.approx(cohen_kappa(consistency["ann"], consistency["cy"]))
    quality = {r: [ANSWERS[s][r][1] for s in ("s1", "s2", "s3", "s4")] for r in ("bob", "cy")}
    assert pairwise["quality"][1][2] == pytest.approx(cohen_kappa(quality["bob"], quality["cy"], "quadratic"))

    loo = {row["rater"]: row for row in figures["leave_one_out"]["consistency"]}
    assert (loo["ann"]["n_units"], loo["ann"]["n_ties"], loo["ann"]["agreement"]) == (3, 1, 1.0)
    assert loo["cy"]["agreement"] == pytest.approx(3 / 4)  # others say no on s2, cy says yes

    gold = {row["rater"]: row for row in figures["gold_accuracy"]}
    assert gold["ann"] == {"rater": "ann", "n_gold": 1, "consistent_accuracy": 1.0, "quality_accuracy": 1.0,
                           "complexity_accuracy": 1.0, "quality_bias": 0.0, "complexity_bias": 0.0}
    assert (gold["bob"]["consistent_accuracy"], gold["bob"]["quality_accuracy"]) == (0.0, 0.0)  # off by 2 > 1
    assert (gold["bob"]["complexity_accuracy"], gold["bob"]["quality_bias"]) == (1.0, -2.0)
    assert "cy" not in gold

    ann_quality = next(r for r in figures["score_distribution"]["quality"] if r["rater"] == "ann")
    assert ann_quality["n"] == 6
    assert [ann_quality[f"n_{k}"] for k in range(1, 6)] == [1, 1, 0, 3, 1]

    mllm = figures["mllm_vs_human"]
    # s1 no conflict/consistent, s2 conflict/inconsistent, s3 conflict/consistent, s5 no conflict/consistent;
    # s4's verdict is an error and s6 has none
    assert mllm["n_samples"] == 4
    assert mllm["confusion"] == {
        "conflict": {"inconsistent": 1, "consistent": 1},
        "no conflict": {"inconsistent": 0, "consistent": 2},
    }
    expected = mllm_human_agreement([False, True, True, False], [True, False, True, True])
    assert mllm["agreement"] == pytest.approx(0.75) and mllm["kappa"] == pytest.approx(expected["kappa"])


def test_agreement_figures_on_an_empty_project(migrated_url: str) -> None:
    figures = read_tx(migrated_url, agreement_figures, n_boot=10)
    json.dumps(figures, allow_nan=False)
    assert figures["n_reviews"] == 0 and figures["pairwise_cohen"]["raters"] == []
    assert figures["mllm_vs_human"]["n_samples"] == 0 and figures["gold_accuracy"] == []
    assert figures["overlapping"]["questions"]["consistency"]["alpha"] is None
    assert throughput(read_tx(migrated_url, reviews_frame)).empty
    assert reviews_per_reviewer_per_day(read_tx(migrated_url, reviews_frame)).empty


def test_human_majority_agrees_with_the_validated_aggregate() -> None:
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"sample_id": rng.integers(1, 200, 600), "consistent": rng.random(600) < 0.6})
    majority = human_majority(frame)
    expected = {int(s): aggregate_consistency(g.tolist()) for s, g in frame.groupby("sample_id")["consistent"]}
    assert majority == expected and None in majority.values()
    assert human_majority(frame.iloc[0:0]) == {}


def test_server_seconds_run_from_the_later_of_the_lease_and_the_previous_submit() -> None:
    t0 = datetime(2025, 3, 3, 10, 0, tzinfo=UTC)
    at = [t0 + timedelta(seconds=s) for s in (0, 5, 40, 100, 0, 60)]
    rater = pd.Series(["ann", "ann", "ann", "bob", "bob", "cy"])
    # ann leases sample 1 at 0 s and sample 2 at 5 s (prefetched while she answers sample 1), submits 1 at 40 s and
    # 2 at 100 s; bob leases at 0 s and submits at 100 s; cy's review has no lease record
    leased = pd.Series([at[0], at[1], pd.NaT, at[4], pd.NaT, pd.NaT])
    submitted = pd.Series([at[2], at[3], pd.NaT, at[3], pd.NaT, pd.NaT])
    leased[2], submitted[2] = at[0], at[0] + timedelta(seconds=200)  # a third one of ann's, leased first
    got = server_seconds(rater, leased, submitted)
    assert got.tolist()[:2] == [40.0, 60.0]  # sample 2 counts from the submit of sample 1, not from its lease
    assert got[2] == 100.0  # after her submit at 100 s
    assert got[3] == 100.0 and np.isnan(got[4]) and np.isnan(got[5])
