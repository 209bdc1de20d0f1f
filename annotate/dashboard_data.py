"""The figures of the leads' dashboard: loaders that read the review tables into DataFrames, pure functions over
those frames, and the JSON-ready agreement figures that ``mcie agreement --json`` prints.

Loaders (one query each): :func:`reviews_frame` (one row per review, the rater's username in ``rater``, times in UTC,
``is_gold`` / ``is_calibration`` flags), :func:`samples_frame` and :func:`grounding_frames` (reviewers' box
corrections and the pipeline's candidate boxes, for :func:`grounding_vs_corrections`); :func:`status_counts` and
:func:`remaining_reviews` are single aggregate queries. They, :func:`agreement_figures`, :func:`reliability_figures`
and :func:`review_budget` take the caller's ``Session`` (any read transaction; ``with session_scope(url) as
session:``) and never commit. Everything else is pure and takes a reviews frame.

Conventions: days are UTC days; gold reviews count as work done (per-reviewer and throughput figures) but not
toward the remaining work or the finish forecast, and they are left out of inter-rater agreement (gold samples are
chosen by leads, often for being tricky) and measured by gold accuracy instead. Calibration membership is
:func:`annotate.queue.is_calibration` under the current ``calibration_share``.

:func:`agreement_figures` returns one JSON object of plain types (no NaN: undefined values are None), so
``json.dumps(figures, allow_nan=False)`` works.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from mcie.annotate.aggregation import majority
from mcie.annotate.agreement import (
    agreement_report,
    confusion,
    gold_accuracy,
    leave_one_out_agreement,
    mllm_human_agreement,
    pairwise_cohen_matrix,
    pairwise_shared_counts,
    score_distribution,
)
from mcie.annotate.project import get_project_config
from mcie.annotate.queue import (
    HASH_MODULUS,
    HASH_MULTIPLIER,
    OPEN_STATUSES,
    calibration_threshold,
    is_gold_clause,
    submitted_clause,
    utc,
    wanted_clause,
)
from mcie.annotate.reviews import conflict_of
from mcie.db.models import (
    Assignment,
    AssignmentState,
    GoldAnswer,
    MllmJudgement,
    MllmStage,
    Review,
    Sample,
    SampleStatus,
    User,
)
from mcie.db.session import require_write

REVIEW_COLUMNS: tuple[str, ...] = (
    "sample_id", "rater", "consistent", "quality", "complexity", "time_spent_s", "server_s", "created_at", "is_gold",
    "is_calibration",
)
SAMPLE_COLUMNS: tuple[str, ...] = (
    "sample_id", "instance_id", "first_turn", "last_turn", "status", "priority", "flagged", "is_gold",
    "is_calibration", "n_reviews", "mllm_verdict", "created_at", "updated_at",
)
QUESTIONS: tuple[tuple[str, str, str | None], ...] = (
    ("consistency", "consistent", None),
    ("quality", "quality", "quadratic"),
    ("complexity", "complexity", "quadratic"),
)
DECISIVE_VERDICTS = ("conflict", "no_conflict")


class DashboardError(ValueError):
    """A dashboard figure was asked with bad input (missing columns, a bad frequency ...)."""


# ----------------------------------------------------------------------------------------------------------
# loaders


def calibration_mask(sample_ids: pd.Series | np.ndarray, share: float) -> np.ndarray:
    """Vectorized :func:`annotate.queue.is_calibration` (uint64 products wrap mod 2**64, a multiple of 2**32)."""
    ids = np.asarray(sample_ids, dtype=np.uint64)
    hashed = (ids * np.uint64(HASH_MULTIPLIER)) % np.uint64(HASH_MODULUS)
    return hashed < np.uint64(calibration_threshold(share))


def reviews_frame(session: Session) -> pd.DataFrame:
    """One row per review: ``sample_id, rater (username), consistent, quality, complexity, time_spent_s (the
    client's figure), server_s (:func:`server_seconds`), created_at (UTC), is_gold, is_calibration``."""
    share = get_project_config(session).calibration_share
    rows = session.execute(
        select(
            Review.sample_id,
            User.username,
            Review.consistent,
            Review.quality,
            Review.complexity,
            Review.time_spent_s,
            Review.created_at,
            is_gold_clause(Review.sample_id),
            Assignment.leased_at,
            Assignment.finished_at,
        )
        .join(User, User.id == Review.user_id)
        .outerjoin(  # one assignment per user and sample (queue.lease); reviews imported without one get NaN
            Assignment,
            (Assignment.sample_id == Review.sample_id)
            & (Assignment.user_id == Review.user_id)
            & (Assignment.state == AssignmentState.submitted),
        )
        .order_by(Review.id)
    ).all()
    columns = [c for c in REVIEW_COLUMNS[:-1] if c != "server_s"] + ["leased_at", "submitted_at"]
    frame = pd.DataFrame([tuple(r) for r in rows], columns=columns)
    server = server_seconds(frame["rater"], frame["leased_at"], frame["submitted_at"])
    frame.insert(REVIEW_COLUMNS.index("server_s"), "server_s", server.to_numpy(dtype="float64"))
    frame = frame.drop(columns=["leased_at", "submitted_at"])
    frame = frame.astype(
        {"sample_id": "int64", "rater": "object", "consistent": "bool", "quality": "int64", "complexity": "int64",
         "time_spent_s": "float64", "is_gold": "bool"}
    )
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    frame["is_calibration"] = calibration_mask(frame["sample_id"], share) & ~frame["is_gold"].to_numpy()
    return frame


def _latest_verdicts(session: Session, decisive_only: bool) -> dict[int, str | None]:
    query = select(MllmJudgement.sample_id, MllmJudgement.verdict).where(
        MllmJudgement.stage == MllmStage.conflict, MllmJudgement.sample_id.is_not(None)
    )
    if decisive_only:
        query = query.where(MllmJudgement.verdict.in_(DECISIVE_VERDICTS))
    out: dict[int, str | None] = {}
    for sample_id, verdict in session.execute(query.order_by(MllmJudgement.created_at, MllmJudgement.id)):
        out[sample_id] = verdict
    return out


def samples_frame(session: Session) -> pd.DataFrame:
    """One row per sample: ``sample_id, instance_id, first_turn, last_turn, status, priority, flagged, is_gold,
    is_calibration, n_reviews, mllm_verdict`` (newest conflict verdict), ``created_at, updated_at`` (UTC)."""
    n_reviews = select(func.count()).where(Review.sample_id == Sample.id).scalar_subquery()
    share = get_project_config(session).calibration_share
    rows = session.execute(
        select(
            Sample.id,
            Sample.instance_id,
            Sample.first_turn,
            Sample.last_turn,
            Sample.status,
            Sample.priority,
            Sample.flagged,
            is_gold_clause(Sample.id),
            n_reviews,
            Sample.created_at,
            Sample.updated_at,
        ).order_by(Sample.id)
    ).all()
    verdicts = _latest_verdicts(session, decisive_only=False)
    frame = pd.DataFrame(
        [(*r[:4], SampleStatus(r[4]).value, *r[5:9], r[9], r[10]) for r in rows],
        columns=["sample_id", "instance_id", "first_turn", "last_turn", "status", "priority", "flagged", "is_gold",
                 "n_reviews", "created_at", "updated_at"],
    )
    frame = frame.astype({"sample_id": "int64", "flagged": "bool", "is_gold": "bool", "n_reviews": "int64"})
    frame["is_calibration"] = calibration_mask(frame["sample_id"], share) & ~frame["is_gold"].to_numpy()
    frame["mllm_verdict"] = frame["sample_id"].map(verdicts)
    for column in ("created_at", "updated_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame[list(SAMPLE_COLUMNS)]


def status_counts(session: Session) -> dict[str, int]:
    """Number of samples in each status (every status listed, zeros included)."""
    rows = session.execute(select(Sample.status, func.count()).group_by(Sample.status)).all()
    counts = {status.value: 0 for status in SampleStatus}
    for status, n in rows:
        counts[SampleStatus(status).value] = int(n)
    return counts


def remaining_reviews(session: Session) -> int:
    """Reviews still wanted by the pool (open, non-gold samples): sum of wanted - submitted, never negative."""
    config = get_project_config(session)
    submitted = submitted_clause()
    wanted = wanted_clause(Sample.id, config, Sample.reviews_target)
    missing = case((wanted > submitted, wanted - submitted), else_=0)
    total = session.scalar(
        select(func.coalesce(func.sum(missing), 0)).where(
            Sample.status.in_(OPEN_STATUSES), ~is_gold_clause(Sample.id)
        )
    )
    return int(total or 0)


# ----------------------------------------------------------------------------------------------------------
# pure figures


def _check_frame(df: pd.DataFrame, columns: tuple[str, ...]) -> None:
    if not isinstance(df, pd.DataFrame):
        raise DashboardError(f"expected a reviews DataFrame with columns {list(columns)}; got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DashboardError(f"the reviews frame lacks columns {missing}")


def _utc_times(df: pd.DataFrame) -> pd.Series:
    return pd.to_datetime(df["created_at"], utc=True)


def reviews_per_reviewer_per_day(df: pd.DataFrame) -> pd.DataFrame:
    """Long table ``day (date, UTC), rater, n_reviews``: one row per reviewer and day they reviewed, sorted."""
    _check_frame(df, ("rater", "created_at"))
    if df.empty:
        return pd.DataFrame({"day": pd.Series(dtype=object), "rater": pd.Series(dtype=object),
                             "n_reviews": pd.Series(dtype="int64")})
    days = _utc_times(df).dt.date
    out = df.assign(day=days).groupby(["day", "rater"]).size().rename("n_reviews").reset_index()
    return out.sort_values(["day", "rater"], ignore_index=True)


def throughput(df: pd.DataFrame, freq: str = "D") -> pd.DataFrame:
    """Reviews per period: ``period`` (UTC start of each ``freq`` bin, empty bins included), ``n_reviews``,
    ``cumulative``."""
    _check_frame(df, ("created_at",))
    try:
        pd.tseries.frequencies.to_offset(freq)
    except ValueError:
        raise DashboardError(f"freq must be a pandas frequency such as 'D', 'h' or 'W'; got {freq!r}") from None
    if df.empty:
        return pd.DataFrame({"period": pd.Series(dtype="datetime64[ns, UTC]"), "n_reviews": pd.Series(dtype="int64"),
                             "cumulative": pd.Series(dtype="int64")})
    counts = pd.Series(1, index=_utc_times(df)).sort_index().resample(freq).sum()
    out = counts.rename("n_reviews").rename_axis("period").reset_index()
    out["n_reviews"] = out["n_reviews"].astype("int64")
    out["cumulative"] = out["n_reviews"].cumsum()
    return out


def throughput_freq(df: pd.DataFrame) -> str:
    """The bin of the throughput plot: hours ("h") while the reviews span less than two days, else days ("D");
    a project's first day then shows its hours instead of a single bar."""
    _check_frame(df, ("created_at",))
    if df.empty:
        return "D"
    times = _utc_times(df)
    return "h" if times.max() - times.min() < pd.Timedelta(days=2) else "D"


def server_seconds(rater: pd.Series, leased_at: pd.Series, submitted_at: pd.Series) -> pd.Series:
    """Seconds each review took as the server saw it: from the later of the sample's lease and the same rater's
    previous submit, to this submit (NaN without a lease record).

    Lease to submit alone would count twice the time of a sample the review screen leased ahead (it prefetches the
    next sample while the current one is answered), and it does not depend on what a client reports - the JSON API's
    clients often send no ``time_spent_s`` at all.
    """
    leased = pd.to_datetime(leased_at, utc=True)
    done = pd.to_datetime(submitted_at, utc=True)
    order = done.sort_values(kind="stable").index
    previous = done.loc[order].groupby(rater.loc[order].to_numpy()).shift(1).reindex(done.index)
    start = leased.where(previous.isna() | (leased >= previous), previous)
    return (done - start).dt.total_seconds()


def median_seconds_per_review(df: pd.DataFrame, column: str = "time_spent_s") -> float | None:
    """Median of ``column`` (the client's ``time_spent_s`` or the server's ``server_s``) over the reviews that
    have it; None when none does."""
    _check_frame(df, (column,))
    times = pd.to_numeric(df[column], errors="coerce").dropna()
    return float(times.median()) if len(times) else None


def forecast_finish(remaining_reviews: int, df: pd.DataFrame, now: datetime, *, window_days: int = 7) -> date | None:
    """The UTC day the remaining reviews should be done at the recent rate, or None without a rate.

    The rate is the non-gold reviews of the last ``window_days`` days before ``now`` per day (over the time since the
    first review when the project is younger than that, at least one day). No remaining work gives today.
    """
    _check_frame(df, ("created_at",))
    if remaining_reviews < 0:
        raise DashboardError(f"remaining_reviews cannot be negative; got {remaining_reviews}")
    if window_days < 1:
        raise DashboardError(f"window_days must be at least 1; got {window_days}")
    now = utc(now)
    if remaining_reviews == 0:
        return now.date()
    work = df[~df["is_gold"].astype(bool)] if "is_gold" in df.columns else df
    times = _utc_times(work)
    times = times[times <= pd.Timestamp(now)]
    if times.empty:
        return None
    start = max(pd.Timestamp(now) - pd.Timedelta(days=window_days), times.min())
    recent = int((times > pd.Timestamp(now) - pd.Timedelta(days=window_days)).sum())
    span_days = max((pd.Timestamp(now) - start) / pd.Timedelta(days=1), 1.0)
    rate = recent / span_days
    if rate <= 0:
        return None
    return (now + timedelta(days=remaining_reviews / rate)).date()


# ----------------------------------------------------------------------------------------------------------
# agreement figures


def plain(value: Any) -> Any:
    """``value`` as JSON-ready plain types: numpy scalars to Python, NaN/inf to None, dates to ISO strings."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return [plain(r) for r in value.to_dict(orient="records")]
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, datetime | date | pd.Timestamp):
        return value.isoformat()
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)


def _long(df: pd.DataFrame, column: str) -> pd.DataFrame:
    out = df[["sample_id", "rater", column]].set_axis(["unit", "rater", "value"], axis=1)
    if column == "consistent":
        out = out.assign(value=out["value"].astype(bool))
    return out.reset_index(drop=True)


def _matrix(frame: pd.DataFrame) -> list[list[Any]]:
    return plain(frame.to_numpy().tolist())


def _pairwise(overlap: pd.DataFrame, min_shared: int) -> dict[str, Any]:
    raters = sorted(overlap["rater"].unique().tolist()) if len(overlap) else []
    out: dict[str, Any] = {"raters": raters, "min_shared": min_shared, "weights": {}}
    if not raters:
        return out | {"shared": [], **{name: [] for name, _, _ in QUESTIONS}}
    out["shared"] = _matrix(pairwise_shared_counts(_long(overlap, "quality")).reindex(index=raters, columns=raters))
    for name, column, weights in QUESTIONS:
        kappa = pairwise_cohen_matrix(_long(overlap, column), weights=weights, min_shared=min_shared)  # type: ignore[arg-type]
        out[name] = _matrix(kappa.reindex(index=raters, columns=raters))
        out["weights"][name] = weights
    return out


def _leave_one_out(overlap: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, column, weights in QUESTIONS:
        if overlap.empty:
            out[name] = []
            continue
        level = "nominal" if weights is None else "ordinal"
        out[name] = plain(leave_one_out_agreement(_long(overlap, column), level))  # type: ignore[arg-type]
    return out


def _gold_accuracy(gold_reviews: pd.DataFrame, gold: pd.DataFrame) -> list[dict[str, Any]]:
    """Per-rater gold accuracy with each gold sample's own tolerance (groups by tolerance, weighted by counts)."""
    parts = []
    for tolerance, answers in gold.groupby("tolerance"):
        reviews = gold_reviews[gold_reviews["sample_id"].isin(answers["sample_id"])]
        if len(reviews):
            parts.append(gold_accuracy(reviews, answers.drop(columns="tolerance"), tolerance=float(tolerance)))
    if not parts:
        return []
    both = pd.concat(parts, ignore_index=True)
    rows = []
    for rater, group in both.groupby("rater", sort=True):
        n = group["n_gold"].to_numpy(dtype=float)
        row: dict[str, Any] = {"rater": rater, "n_gold": int(n.sum())}
        for column in ("consistent_accuracy", "quality_accuracy", "complexity_accuracy", "quality_bias",
                       "complexity_bias"):
            values = group[column].to_numpy(dtype=float)
            ok = ~np.isnan(values)
            row[column] = float(np.average(values[ok], weights=n[ok])) if ok.any() else None
        rows.append(row)
    return plain(rows)


def human_majority(reviews: pd.DataFrame) -> dict[int, bool | None]:
    """Each sample's majority consistency verdict (:func:`annotate.aggregation.majority`: None on a tie), counted
    for all samples at once."""
    if reviews.empty:
        return {}
    grouped = reviews.groupby("sample_id")["consistent"]
    yes = grouped.sum().astype(int)
    no = grouped.size() - yes
    return {int(s): majority(int(y), int(n)) for s, y, n in zip(yes.index, yes, no, strict=True)}


def _mllm_vs_human(work: pd.DataFrame, verdicts: dict[int, str | None]) -> dict[str, Any]:
    human = human_majority(work)
    sample_ids = [s for s in human if conflict_of(verdicts.get(s)) is not None]
    mllm = [conflict_of(verdicts[s]) for s in sample_ids]
    people = [human[s] for s in sample_ids]
    table = confusion(mllm, people) if sample_ids else confusion([], [])
    stats = mllm_human_agreement(mllm, people)
    return {
        "n_samples": len(sample_ids),
        "rows": "mllm",
        "columns": "human",
        "confusion": {str(row): {str(col): int(table.loc[row, col]) for col in table.columns} for row in table.index},
        "agreement": plain(stats["agreement"]),
        "kappa": plain(stats["kappa"]),
    }


def agreement_figures(session: Session, n_boot: int = 1000, seed: int = 0, *, min_shared: int = 10) -> dict[str, Any]:
    """Every agreement figure of the dashboard as one JSON-ready object (what ``mcie agreement --json`` prints).

    Keys: ``n_reviews``, ``n_reviewers``, ``n_gold_reviews``; ``calibration`` and ``overlapping``:
    :func:`annotate.agreement.agreement_report` on the calibration samples and on every non-gold sample with two or
    more reviews; ``pairwise_cohen``: raters, shared-sample counts and Cohen's kappa matrices per question
    (unweighted for consistency, quadratic-weighted for the scores; None below ``min_shared`` shared samples);
    ``leave_one_out``: each reviewer against the others per question; ``gold_accuracy``: per reviewer, each gold
    sample scored within its own tolerance; ``score_distribution``: quality and complexity per reviewer;
    ``mllm_vs_human``: the MLLM conflict verdict (newest decisive one) against the reviewers' majority consistency,
    as a confusion table with agreement and Cohen's kappa; ``reliability``: :func:`reliability_figures`.
    """
    reviews = reviews_frame(session)
    gold_rows = session.execute(
        select(
            GoldAnswer.sample_id,
            GoldAnswer.consistent,
            GoldAnswer.quality,
            GoldAnswer.complexity,
            GoldAnswer.tolerance,
        )
    ).all()
    verdicts = _latest_verdicts(session, decisive_only=True)
    gold = pd.DataFrame(
        [tuple(r) for r in gold_rows], columns=["sample_id", "consistent", "quality", "complexity", "tolerance"]
    )
    work = reviews[~reviews["is_gold"]]
    per_sample = work.groupby("sample_id")["rater"].transform("size")
    overlap = work[per_sample >= 2]
    calibration = work[work["is_calibration"]]
    figures = {
        "n_reviews": len(reviews),
        "n_reviewers": int(reviews["rater"].nunique()),
        "n_gold_reviews": int(reviews["is_gold"].sum()),
        "calibration": agreement_report(calibration, n_boot=n_boot, seed=seed),
        "overlapping": agreement_report(overlap, n_boot=n_boot, seed=seed),
        "pairwise_cohen": _pairwise(overlap, min_shared),
        "leave_one_out": _leave_one_out(overlap),
        "gold_accuracy": _gold_accuracy(reviews[reviews["is_gold"]], gold),
        "score_distribution": {
            name: plain(score_distribution(_long(work, column), levels=(1, 2, 3, 4, 5))) if len(work) else []
            for name, column in (("quality", "quality"), ("complexity", "complexity"))
        },
        "mllm_vs_human": _mllm_vs_human(work, verdicts),
        "reliability": reliability_figures(session),
    }
    return plain(figures)


def reliability_figures(session: Session, *, refit: bool = False) -> dict[str, Any]:
    """Each rater's reliability (:mod:`annotate.reliability`): skill with a 95% interval per question and overall,
    rank, bias, and careless/biased flags with their evidence; raters by username.

    The newest stored fit when it has seen every review, else a fresh fit (stored only with ``refit``, which reads
    then writes: ``session`` must then come from ``session_scope(url, write=True)``). Keys:
    ``fit_id`` (None for an unstored fit), ``n_reviews``, ``n_samples``, ``n_informative`` (gold or 2+ reviews),
    ``mllm_prior`` (the calibrated MLLM: intercept, slope, n; or None), ``priors`` per question and ``raters``."""
    from mcie.annotate import reliability_service as rs

    if refit:
        require_write(session, "refitting rater reliability")
        fit_id, fit = rs.refit(session)
    elif rs.reviews_since_fit(session) == 0:
        fit_id, fit = rs.latest_fit(session)
    else:
        fit_id, fit = None, rs.compute_fit(session)
    names = rs.usernames(session, [r["rater"] for r in fit.reports])
    raters = [r | {"user_id": r["rater"], "rater": names.get(str(r["rater"]), str(r["rater"]))} for r in fit.reports]
    return plain({
        "fit_id": fit_id,
        "n_reviews": fit.n_reviews,
        "n_samples": fit.n_samples,
        "n_informative": fit.n_informative,
        "mllm_prior": None if fit.mllm is None else {"intercept": fit.mllm.intercept, "slope": fit.mllm.slope,
                                                      "n": fit.mllm.n},
        "priors": {q: f.prior for q, f in fit.questions.items()},
        "raters": raters,
    })


def review_budget(session: Session) -> dict[str, Any]:
    """The "Review budget" figures: reviews spent per sample by policy, the share of decided samples decided after
    1/2/3+ reviews, the expected number of wrong decisions from the posteriors of the newest rule decisions, and
    each rater's overall skill over the stored reliability fits.

    The policy of a decided sample is the ``review_policy`` recorded with its newest rule decision ("unknown" for
    decisions made before the decision recorded it, "lead" for lead decisions). Gold reviews are counted apart."""
    from mcie.annotate import reliability_service as rs
    from mcie.db.models import Decision, DecisionSource

    work = select(Review.sample_id, func.count()).where(~is_gold_clause(Review.sample_id))
    per_sample = dict(session.execute(work.group_by(Review.sample_id)).all())
    n_gold = int(session.scalar(select(func.count()).select_from(Review).where(is_gold_clause(Review.sample_id)))
                 or 0)
    newest: dict[int, tuple[str, dict[str, Any] | None, str]] = {}
    for sample_id, source, rule, outcome in session.execute(
        select(Decision.sample_id, Decision.source, Decision.rule, Decision.outcome).order_by(Decision.id)
    ):
        newest[int(sample_id)] = (DecisionSource(source).value, rule, str(getattr(outcome, "value", outcome)))
    history = rs.fit_history(session)
    names = rs.usernames(session, {h["rater"] for h in history})
    by_policy: dict[str, list[int]] = {}
    posteriors, accepted = [], []
    for sample_id, (source, rule, outcome) in newest.items():
        policy = "lead" if source == "lead" else str((rule or {}).get("review_policy", "unknown"))
        by_policy.setdefault(policy, []).append(int(per_sample.get(sample_id, 0)))
        p = ((rule or {}).get("posterior") or {}).get("p_accept")
        if source == "rule" and p is not None:
            posteriors.append(float(p))
            accepted.append(outcome == "accepted")
    from mcie.annotate.reliability import expected_wrong

    decided_counts = [n for counts in by_policy.values() for n in counts]
    total = max(len(decided_counts), 1)
    rows = [{"policy": policy, "decided_samples": len(counts), "reviews": int(sum(counts)),
             "reviews_per_sample": (sum(counts) / len(counts)) if counts else None}
            for policy, counts in sorted(by_policy.items())]
    return plain({
        "n_reviews": int(sum(per_sample.values())),
        "n_gold_reviews": n_gold,
        "reviewed_samples": len(per_sample),
        "reviews_per_reviewed_sample": (sum(per_sample.values()) / len(per_sample)) if per_sample else None,
        "by_policy": rows,
        "decided_after": {
            "1": sum(1 for n in decided_counts if n == 1) / total,
            "2": sum(1 for n in decided_counts if n == 2) / total,
            "3+": sum(1 for n in decided_counts if n >= 3) / total,
        },
        "n_decided": len(decided_counts),
        "expected_wrong_decisions": expected_wrong(posteriors, accepted) if posteriors else None,
        "n_with_posterior": len(posteriors),
        "reliability_over_time": [h | {"rater": names.get(h["rater"], h["rater"])} for h in history],
    })


# --- grounding measured against reviewers' box corrections ------------------------------------------------------

GROUNDING_SOURCES = ("mllm", "diff", "chosen")


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two normalised (x0, y0, x1, y1) boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def grounding_frames(session: Session) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(corrections, candidates): every reviewer's box correction with its turn's operation, and every candidate box.

    corrections: ``instance_id, turn_index, operation, review_id, x0, y0, x1, y1`` (one row per corrected turn per
    review); candidates: ``instance_id, turn_index, source, rank, chosen, x0, y0, x1, y1``.
    """
    from mcie.db.models import BoxCandidate, SubInstruction, Turn

    corrections: list[dict[str, Any]] = []
    operations = {
        (sample_id, turn): str(op)
        for sample_id, turn, op in session.execute(
            select(SubInstruction.sample_id, SubInstruction.turn_index, SubInstruction.operation)
            .join(Review, Review.sample_id == SubInstruction.sample_id)
            .where(Review.box_corrections.is_not(None))
        )
    }
    for review_id, sample_id, instance_id, boxes in session.execute(
        select(Review.id, Review.sample_id, Sample.instance_id, Review.box_corrections)
        .join(Sample, Sample.id == Review.sample_id)
        .where(Review.box_corrections.is_not(None))
    ):
        for item in boxes or []:
            x0, y0, x1, y1 = item["box"]
            turn = int(item["turn_index"])
            corrections.append({"instance_id": instance_id, "turn_index": turn,
                                "operation": operations.get((sample_id, turn)), "review_id": review_id,
                                "x0": x0, "y0": y0, "x1": x1, "y1": y1})
    instance_ids = sorted({c["instance_id"] for c in corrections})
    candidates = [
        {"instance_id": instance_id, "turn_index": index, "source": str(c.source), "rank": c.rank,
         "chosen": bool(c.chosen), "x0": c.box_x0, "y0": c.box_y0, "x1": c.box_x1, "y1": c.box_y1}
        for start in range(0, len(instance_ids), 5000)
        for instance_id, index, c in session.execute(
            select(Turn.instance_id, Turn.index, BoxCandidate)
            .join(BoxCandidate, BoxCandidate.turn_id == Turn.id)
            .where(Turn.instance_id.in_(instance_ids[start : start + 5000]))
        )
    ]
    columns = ["instance_id", "turn_index", "operation", "review_id", "x0", "y0", "x1", "y1"]
    cand_columns = ["instance_id", "turn_index", "source", "rank", "chosen", "x0", "y0", "x1", "y1"]
    return pd.DataFrame(corrections, columns=columns), pd.DataFrame(candidates, columns=cand_columns)


def grounding_vs_corrections(corrections: pd.DataFrame, candidates: pd.DataFrame) -> pd.DataFrame:
    """IoU of the pipeline's boxes with the reviewers' corrected boxes, by operation and box source.

    The truth of a turn is the per-coordinate median of its corrections (several reviewers may correct it). For each
    corrected turn with candidates: ``mllm`` and ``diff`` are that source's best candidate (``first_iou``: its first
    one, the MLLM's own top answer), ``chosen`` the box the pipeline chose. One row per (operation, source), plus
    ``all`` operations: ``turns``, ``mean_iou``, ``mean_first_iou``, ``share_iou_50`` (IoU >= 0.5).
    """
    _check_frame(corrections, ("instance_id", "turn_index", "operation", "x0", "y0", "x1", "y1"))
    _check_frame(candidates, ("instance_id", "turn_index", "source", "rank", "chosen", "x0", "y0", "x1", "y1"))
    out_columns = ["operation", "source", "turns", "mean_iou", "mean_first_iou", "share_iou_50"]
    if corrections.empty or candidates.empty:
        return pd.DataFrame(columns=out_columns)
    keys = ["instance_id", "turn_index"]
    truth = corrections.groupby(keys).agg(
        operation=("operation", "first"), x0=("x0", "median"), y0=("y0", "median"), x1=("x1", "median"),
        y1=("y1", "median"),
    )
    by_turn = {key: group.sort_values("rank") for key, group in candidates.groupby(keys)}
    rows = []
    for key, t in truth.iterrows():
        group = by_turn.get(key)
        if group is None:
            continue
        box = (t.x0, t.y0, t.x1, t.y1)
        ious = [box_iou(box, (c.x0, c.y0, c.x1, c.y1)) for c in group.itertuples()]
        group = group.assign(iou=ious)
        operation = t.operation or "unknown"
        for source in ("mllm", "diff"):
            own = group[group["source"] == source]
            if not own.empty:
                rows.append((operation, source, float(own["iou"].max()), float(own["iou"].iloc[0])))
        chosen = group[group["chosen"]]
        if not chosen.empty:
            rows.append((operation, "chosen", float(chosen["iou"].iloc[0]), float("nan")))
    if not rows:
        return pd.DataFrame(columns=out_columns)
    frame = pd.DataFrame(rows, columns=["operation", "source", "iou", "first_iou"])
    frame = pd.concat([frame, frame.assign(operation="all")])

    def summary(group: pd.DataFrame) -> pd.Series:
        first = group["first_iou"].dropna()
        return pd.Series({"turns": len(group), "mean_iou": round(float(group["iou"].mean()), 4),
                          "mean_first_iou": round(float(first.mean()), 4) if len(first) else None,
                          "share_iou_50": round(float((group["iou"] >= 0.5).mean()), 4)})

    result = frame.groupby(["operation", "source"]).apply(summary, include_groups=False).reset_index()
    order = {s: i for i, s in enumerate(GROUNDING_SOURCES)}
    result["_op"] = result["operation"].map(lambda op: (op == "all", op))
    result["_src"] = result["source"].map(order)
    result = result.sort_values(["_op", "_src"]).drop(columns=["_op", "_src"]).reset_index(drop=True)
    result["turns"] = result["turns"].astype(int)
    return result[out_columns]
