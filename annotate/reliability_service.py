"""The database edge of rater reliability: read reviews, gold and MLLM scores, store fits, serve the newest fit.

:func:`refit` fits :mod:`annotate.reliability` on every review and stores it as a ``reliability_fits`` row
(``mcie agreement --refit``); :func:`refit_when_due` is the server's sweep (every minute), which refits when
``adaptive.refit_every`` reviews came in since the newest fit. :func:`latest_fit` returns the newest stored fit
(parsed fits are cached by id, so the review path pays one indexed query); before any fit exists every rater is the
default rater (:func:`annotate.reliability.default_fit`).

The MLLM's conflict score of a sample (:func:`mllm_scores`), in [0, 1] with 1 meaning "conflict", comes from the
newest decisive conflict-stage judgement: its ``score`` read as the MLLM's confidence in its verdict (the score of a
"conflict" verdict, one minus the score of a "no_conflict" one), or 1.0 / 0.0 when it has no score. Undecided
judgements (unparseable, error) and missing ones give none.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from mcie.annotate.reliability import GOLD_COLUMNS, ReliabilityFit, default_fit, fit_reliability
from mcie.db.models import GoldAnswer, Job, MllmJudgement, MllmStage, QueueStatus, Review, User
from mcie.db.models import ReliabilityFit as FitRow
from mcie.db.session import require_write, session_scope

REFIT_JOB = "reliability"  # the job kind that runs refit_when_due in a worker

_CACHE: dict[int, ReliabilityFit] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 8
VERDICT_SCORE = {"conflict": 1.0, "no_conflict": 0.0}


def mllm_scores(session: Session, sample_ids: Iterable[int] | None = None) -> dict[int, float]:
    """Sample id -> the MLLM's conflict score in [0, 1] (module docstring), for ``sample_ids`` or every sample."""
    query = select(MllmJudgement.sample_id, MllmJudgement.verdict, MllmJudgement.score).where(
        MllmJudgement.stage == MllmStage.conflict, MllmJudgement.sample_id.is_not(None)
    )
    if sample_ids is not None:
        ids = sorted(set(sample_ids))
        if not ids:
            return {}
        query = query.where(MllmJudgement.sample_id.in_(ids))
    out: dict[int, float | None] = {}
    for sample_id, verdict, score in session.execute(query.order_by(MllmJudgement.created_at, MllmJudgement.id)):
        out[int(sample_id)] = conflict_score(verdict, score)  # the newest wins
    return {k: v for k, v in out.items() if v is not None}


def conflict_score(verdict: str | None, score: float | None) -> float | None:
    """P(conflict) as the MLLM states it: its confidence ``score`` in its verdict, or the bare verdict as 1.0/0.0."""
    if verdict not in VERDICT_SCORE:
        return None
    if score is None or not 0.0 <= score <= 1.0:
        return VERDICT_SCORE[verdict]
    return float(score) if verdict == "conflict" else 1.0 - float(score)


def fit_inputs(session: Session) -> tuple[pd.DataFrame, pd.DataFrame, dict[int, float]]:
    """Every review (rater = user id), the gold answers, and the MLLM scores of the reviewed samples."""
    reviews = pd.DataFrame(
        session.execute(
            select(Review.sample_id, Review.user_id, Review.consistent, Review.quality, Review.complexity)
        ).all(),
        columns=["sample_id", "rater", "consistent", "quality", "complexity"],
    )
    gold = pd.DataFrame(
        session.execute(
            select(GoldAnswer.sample_id, GoldAnswer.consistent, GoldAnswer.quality, GoldAnswer.complexity)
        ).all(),
        columns=list(GOLD_COLUMNS),
    )
    scores = mllm_scores(session, reviews["sample_id"].unique().tolist()) if len(reviews) else {}
    return reviews, gold, scores


def compute_fit(session: Session) -> ReliabilityFit:
    """A fresh fit on the current reviews (not stored)."""
    return fit_reliability(*fit_inputs(session))


def store_fit(session: Session, fit: ReliabilityFit) -> int:
    """Store a fit as the newest ``reliability_fits`` row; returns its id. The caller commits.

    Each rater's report keeps their overall skill in the fit before (``previous_skill``), so the adaptive gold rate
    can see a falling reliability without another query on the review path."""
    _, before = latest_fit(session)
    for report in fit.reports:
        previous = rater_report(before, report["rater"])
        report["previous_skill"] = None if previous is None else previous.get("skill")
    fit_id = session.scalar(
        insert(FitRow)
        .values(n_reviews=fit.n_reviews, n_samples=fit.n_samples, model=fit.to_json())
        .returning(FitRow.id)
    )
    assert fit_id is not None
    with _CACHE_LOCK:
        _CACHE[int(fit_id)] = fit
    return int(fit_id)


def refit(session: Session) -> tuple[int, ReliabilityFit]:
    """Fit on every review and store the fit; returns its id and the fit. The caller commits."""
    fit = compute_fit(session)
    return store_fit(session, fit), fit


def latest_fit(session: Session) -> tuple[int | None, ReliabilityFit]:
    """The newest stored fit (id and model), or (None, the default model) before the first fit."""
    fit_id = session.scalar(select(func.max(FitRow.id)))
    if fit_id is None:
        return None, default_fit()
    with _CACHE_LOCK:
        cached = _CACHE.get(int(fit_id))
    if cached is not None:
        return int(fit_id), cached
    model = session.scalar(select(FitRow.model).where(FitRow.id == fit_id))
    fit = ReliabilityFit.from_json(model)
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(min(_CACHE))
        _CACHE[int(fit_id)] = fit
    return int(fit_id), fit


def _newest_fit_reviews(session: Session) -> int:
    """How many reviews the newest stored fit saw (0 before the first fit)."""
    return int(session.scalar(select(FitRow.n_reviews).order_by(FitRow.id.desc()).limit(1)) or 0)


def reviews_since_fit(session: Session) -> int:
    """Reviews stored now minus the reviews the newest fit saw (all reviews before the first fit)."""
    n_now = int(session.scalar(select(func.count()).select_from(Review)) or 0)
    return n_now - _newest_fit_reviews(session)


def refit_when_due(url: str) -> int | None:
    """The ``reliability`` job (queued by the web tier's sweep, :func:`queue_refit_when_due`): when
    ``adaptive.refit_every`` reviews came in since the newest fit, fit in a read-only transaction (seconds on a large
    project; reviewers are not blocked) and store it in a short write one.

    It takes the URL, not a ``Session``, because it runs its own two transactions: one write transaction around the
    whole fit would hold the database's write lock on SQLite (``BEGIN IMMEDIATE``) for those seconds and queue every
    reviewer's submit behind it. (:func:`refit` is the one-transaction form, for a caller's write session.)

    When another process (a second job, ``mcie agreement --refit``) stored a fit that saw as many reviews while this
    one was computing, this fit is dropped (None), so the fit history, which the adaptive gold rate compares
    against, holds no near-copies. (The check narrows the race to the short write transaction; it does not lock.)"""
    from mcie.annotate.project import get_project_config

    with session_scope(url) as session:
        if reviews_since_fit(session) < get_project_config(session).adaptive.refit_every:
            return None
        fit = compute_fit(session)
    with session_scope(url, write=True) as session:
        if _newest_fit_reviews(session) >= fit.n_reviews:
            return None
        return store_fit(session, fit)


def queue_refit_when_due(session: Session) -> int | None:
    """The web tier's sweep: when a refit is due (as :func:`refit_when_due` judges it) and no ``reliability`` job is
    queued or running, queue one; returns its job id, else None. The fit itself runs in a worker (``mcie worker``,
    or ``mcie serve``'s own): seconds of CPU that a web replica should not spend between requests, and one worker
    instead of every replica. Two replicas may both queue one in the same instant; the second job then finds
    nothing due and stores nothing."""
    from mcie.annotate import jobs
    from mcie.annotate.project import get_project_config

    require_write(session, "queueing a reliability refit")
    if reviews_since_fit(session) < get_project_config(session).adaptive.refit_every:
        return None
    pending = session.scalar(
        select(func.count()).select_from(Job).where(
            Job.kind == REFIT_JOB, Job.status.in_((QueueStatus.queued, QueueStatus.running))
        )
    )
    if pending:
        return None
    return jobs.submit(session, REFIT_JOB, {}, max_attempts=1).id


def rater_report(fit: ReliabilityFit, user_id: int) -> Mapping[str, Any] | None:
    for report in fit.reports:
        if str(report["rater"]) == str(user_id):
            return report
    return None


def is_less_reliable(fit: ReliabilityFit, user_id: int) -> bool:
    """Flagged careless, or in the bottom quarter of the raters' overall skill (with at least four raters)."""
    report = rater_report(fit, user_id)
    if report is None:
        return False
    if any(f["flag"] == "careless" for f in report["flags"]):
        return True
    skills = sorted(r["skill"] for r in fit.reports if r["skill"] is not None)
    if len(skills) < 4 or report["skill"] is None:
        return False
    return report["skill"] < skills[len(skills) // 4]


def usernames(session: Session, ids: Iterable[Any]) -> dict[str, str]:
    keys = sorted({int(i) for i in ids if str(i).isdigit()})
    if not keys:
        return {}
    return {str(i): name for i, name in session.execute(select(User.id, User.username).where(User.id.in_(keys)))}


def fit_history(session: Session, limit: int = 200) -> list[dict[str, Any]]:
    """Per-rater overall skill over the stored fits (oldest first): rows of fit id, time, rater, skill, interval."""
    rows = session.execute(
        select(FitRow.id, FitRow.created_at, FitRow.n_reviews, FitRow.model).order_by(FitRow.id.desc()).limit(limit)
    ).all()
    out: list[dict[str, Any]] = []
    for fit_id, created_at, n_reviews, model in reversed(rows):
        for report in model.get("reports", []):
            ci = report["questions"]["consistency"]["skill_ci"]
            out.append({"fit_id": fit_id, "created_at": created_at, "n_reviews": n_reviews,
                        "rater": str(report["rater"]), "skill": report["skill"],
                        "consistency_skill_low": ci[0], "consistency_skill_high": ci[1]})
    return out
