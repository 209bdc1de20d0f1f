"""The weighted decision rule and the adaptive review policy on a real database (SQLite and PostgreSQL): follow-up
reviews while uncertain, from another and preferably more reliable rater, the cap, the recorded provenance, the
what-if preview of the decision rule, the dashboard's figures, exports, and the seeded review-economics simulation."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from mcie.annotate import reliability_service
from mcie.annotate.acceptance import apply_rule, preview_rule
from mcie.annotate.dashboard_data import reliability_figures, review_budget
from mcie.annotate.project import get_project_config
from mcie.annotate.queue import next_sample
from mcie.annotate.reliability import default_fit
from mcie.annotate.reviews import Answer, submit_review
from mcie.db.migrate import upgrade
from mcie.db.models import Decision, ReliabilityFit, Sample, SampleStatus
from mcie.db.session import session_scope
from tests.annotate.factories import add_conflict_judgement, configure, make_sample, make_user, make_users
from tests.annotate.tx import read_tx, write_tx

GOOD = Answer(consistent=True, quality=5, complexity=5)
ADAPTIVE = {"gold_rate": 0.0, "calibration_share": 0.0, "review_policy": "adaptive",
            "adaptive": {"band_low": 0.2, "band_high": 0.9, "max_reviews": 3}}


def _project(url: str, n_samples: int, n_raters: int, **settings) -> tuple[list[int], list[int], int]:
    upgrade(url)
    with session_scope(url) as session:
        configure(session, **settings)
        samples = [make_sample(session).id for _ in range(n_samples)]
        raters = [u.id for u in make_users(session, n_raters)]
        lead = make_user(session, role="lead").id
    return samples, raters, lead


def _sample(url: str, sample_id: int) -> tuple[SampleStatus, int | None, float]:
    with session_scope(url) as session:
        s = session.get(Sample, sample_id)
        return s.status, s.reviews_target, s.priority


def _review(url: str, user_id: int, answer: Answer = GOOD, **kwargs) -> int:
    lease = write_tx(url, next_sample, user_id, **kwargs)
    assert lease is not None
    write_tx(url, submit_review, user_id, lease.sample_id, answer)
    return lease.sample_id


def test_adaptive_policy_asks_another_review_while_uncertain(any_db_url: str) -> None:
    (first, second), (a, b, c), _ = _project(any_db_url, 2, 3, **ADAPTIVE)
    assert _review(any_db_url, a) == first
    status, target, priority = _sample(any_db_url, first)
    # one default rater's "yes, 5, 5": P(meets the rule) about 0.8, inside the band -> one more review, served first
    assert (status, target) == (SampleStatus.in_review, 2) and priority > 1.0
    assert _review(any_db_url, b) == first  # before the fresh sample with the lower priority
    status, target, _ = _sample(any_db_url, first)
    assert (status, target) == (SampleStatus.accepted, 2)
    with session_scope(any_db_url) as session:
        rule = session.scalar(select(Decision.rule).where(Decision.sample_id == first))
    assert rule["review_policy"] == "adaptive" and rule["decision_rule"] == "paper"
    assert rule["posterior"]["p_accept"] > 0.9
    assert _review(any_db_url, a) == second  # never the same sample twice
    assert write_tx(any_db_url, next_sample, c) is not None


def test_adaptive_policy_stops_at_the_cap(sqlite_url: str) -> None:
    settings = ADAPTIVE | {"adaptive": {"band_low": 0.0, "band_high": 1.0, "max_reviews": 2}}
    (sample,), raters, _ = _project(sqlite_url, 1, 3, **settings)
    for rater in raters[:2]:
        _review(sqlite_url, rater)
    status, target, _ = _sample(sqlite_url, sample)
    assert status == SampleStatus.accepted and target == 2
    assert write_tx(sqlite_url, next_sample, raters[2]) is None


def test_mllm_disagreement_goes_up_the_queue(sqlite_url: str) -> None:
    (s1, s2, _), (a, b), _ = _project(sqlite_url, 3, 2, **ADAPTIVE)
    with session_scope(sqlite_url) as session:
        add_conflict_judgement(session, session.get(Sample, s2), "conflict")  # the MLLM sees a conflict
    assert _review(sqlite_url, a) == s1
    assert _review(sqlite_url, a) == s2  # the reviewer says consistent: a disagreement
    assert _sample(sqlite_url, s2)[2] > _sample(sqlite_url, s1)[2] > 1.0
    assert _review(sqlite_url, b) == s2


def test_less_reliable_raters_get_fresh_samples_before_follow_ups(sqlite_url: str) -> None:
    (follow, fresh), (a, careless, good), _ = _project(sqlite_url, 2, 3, **ADAPTIVE)
    fit = default_fit()
    fit.reports = [{"rater": careless, "skill": 0.0, "n_samples": 50, "flags": [{"flag": "careless"}],
                    "questions": {"consistency": {"skill_ci": [-0.1, 0.1]}}}]
    with session_scope(sqlite_url, write=True) as session:
        reliability_service.store_fit(session, fit)
    assert _review(sqlite_url, a) == follow
    assert _sample(sqlite_url, follow)[1] == 2
    assert write_tx(sqlite_url, next_sample, careless).sample_id == fresh
    assert write_tx(sqlite_url, next_sample, good).sample_id == follow


def test_fixed_policy_keeps_todays_behaviour(sqlite_url: str) -> None:
    (sample,), (a, b), _ = _project(sqlite_url, 1, 2, gold_rate=0.0, calibration_share=0.0)
    _review(sqlite_url, a, Answer(consistent=True, quality=4, complexity=3))
    status, target, priority = _sample(sqlite_url, sample)
    assert (status, target, priority) == (SampleStatus.rejected, None, 0.0)
    assert write_tx(sqlite_url, next_sample, b) is None


def test_weighted_rule_decides_with_the_posterior_and_never_adjudicates(sqlite_url: str) -> None:
    (s1, s2), (a, b), _ = _project(sqlite_url, 2, 2, gold_rate=0.0, calibration_share=0.0, reviews_per_sample=2,
                                   decision_rule="weighted")
    for rater in (a, b):
        _review(sqlite_url, rater)
    _review(sqlite_url, a, Answer(consistent=True, quality=5, complexity=5))
    _review(sqlite_url, b, Answer(consistent=False, quality=2, complexity=5))
    with session_scope(sqlite_url) as session:
        rows = {d.sample_id: d for d in session.scalars(select(Decision))}
        statuses = {s: session.get(Sample, s).status for s in (s1, s2)}
    assert statuses == {s1: SampleStatus.accepted, s2: SampleStatus.rejected}
    assert rows[s1].rule["decision_rule"] == "weighted" and rows[s1].rule["accept_at"] == 0.5
    assert "P(meets the rule)" in rows[s2].reason
    assert rows[s2].rule["posterior"]["p_accept"] < 0.5


def test_preview_and_apply_the_decision_rule(any_db_url: str) -> None:
    samples, (a, b), lead = _project(any_db_url, 3, 2, gold_rate=0.0, calibration_share=0.0, reviews_per_sample=2)
    answers = [(GOOD, GOOD), (GOOD, Answer(consistent=False, quality=5, complexity=5)),
               (Answer(consistent=True, quality=5, complexity=4), Answer(consistent=True, quality=2, complexity=4))]
    for first, second in answers:
        _review(any_db_url, a, first)
        _review(any_db_url, b, second)
    assert _sample(any_db_url, samples[1])[0] == SampleStatus.needs_adjudication  # paper rule: a split
    preview = read_tx(any_db_url, preview_rule, decision_rule="weighted")
    assert preview["needs_adjudication"] == 0 and preview["would_change"] >= 1
    assert read_tx(any_db_url, preview_rule)["would_change"] == 0  # the current rule on its own decisions
    with pytest.raises(PermissionError):
        write_tx(any_db_url, apply_rule, None, a, decision_rule="weighted")
    counts = write_tx(any_db_url, apply_rule, None, lead, decision_rule="weighted", accept_at=0.6)
    assert counts["changed"] == read_tx(any_db_url, preview_rule, decision_rule="paper")["would_change"] >= 1
    with session_scope(any_db_url) as session:
        config = get_project_config(session)
        assert (config.decision_rule, config.weighted.accept_at) == ("weighted", 0.6)
        newest = session.scalars(select(Decision).where(Decision.sample_id == samples[1]).order_by(Decision.id)).all()
    assert newest[-1].decided_by == lead and newest[-1].rule["decision_rule"] == "weighted"


def test_reviews_target_is_checked_by_the_database(any_db_url: str) -> None:
    (sample,), _, _ = _project(any_db_url, 1, 1)
    with pytest.raises(IntegrityError), session_scope(any_db_url) as session:
        session.execute(update(Sample).where(Sample.id == sample).values(reviews_target=0))


def test_dashboard_figures_and_exports_carry_the_posterior(sqlite_url: str) -> None:
    from mcie.exports.select import iter_records

    samples, raters, _ = _project(sqlite_url, 12, 4, gold_rate=0.0, calibration_share=0.0, reviews_per_sample=2,
                                  decision_rule="weighted")
    for _ in samples:
        for rater in raters[:2]:
            lease = write_tx(sqlite_url, next_sample, rater)
            if lease is not None:
                write_tx(sqlite_url, submit_review, rater, lease.sample_id, GOOD)
    with session_scope(sqlite_url) as session, pytest.raises(RuntimeError, match="refitting rater reliability"):
        reliability_figures(session, refit=True)  # stores a fit: a write session only
    with session_scope(sqlite_url, write=True) as session:
        figures = reliability_figures(session, refit=True)
    assert figures["fit_id"] is not None and {r["rater"] for r in figures["raters"]} <= {
        f"{name}" for name in _usernames(sqlite_url)
    }
    with session_scope(sqlite_url) as session:
        budget = review_budget(session)
    assert budget["by_policy"][0]["policy"] == "fixed" and budget["by_policy"][0]["reviews_per_sample"] == 2
    assert budget["decided_after"]["2"] == 1.0
    assert budget["expected_wrong_decisions"] is not None and budget["reliability_over_time"]
    with session_scope(sqlite_url) as session:
        records = list(iter_records(session))
    assert records and all(r.provenance.decision.rule["posterior"]["p_accept"] >= 0.5 for r in records)
    assert records[0].provenance.decision.rule["decision_rule"] == "weighted"


def _usernames(url: str) -> list[str]:
    from mcie.db.models import User

    with session_scope(url) as session:
        return list(session.scalars(select(User.username)))


def _bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "review_economics.py"
    spec = importlib.util.spec_from_file_location("review_economics", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("review_economics", module)
    spec.loader.exec_module(module)
    return module


def test_seeded_review_economics(tmp_path: Path) -> None:
    """The benchmark's simulation, small: the adaptive policy with the weighted rule spends far fewer reviews than
    three per sample, decides better than one review per sample, and finds the near-random rater."""
    out = _bench().run(samples=300, gold=40, seed=1, refit_every=100, workdir=tmp_path)
    f1, f3, ad = (out["policies"][p] for p in ("fixed-1", "fixed-3", "adaptive-weighted"))
    assert f1["reviews_per_sample"] < 1.2 and f3["reviews_per_sample"] == 3.0
    assert ad["reviews"] <= 0.7 * f3["reviews"]
    assert ad["accuracy"] >= f1["accuracy"] + 0.02
    assert ad["careless_rank"] >= ad["n_raters"] - 1
    assert sum(ad["decided_after"].values()) == 300


def _dashboard(tmp_path: Path, url: str):
    from mcie.annotate.web.ui_dashboard import Dashboard
    from mcie.config import load_settings

    settings = load_settings(data_dir=tmp_path, database_url=url, blob_url=str(tmp_path / "blobs"), secret_key=None)
    from mcie.annotate.web.ui_dashboard import DashboardWidgets, Table
    from tests.annotate.web_fixtures import named_widgets

    dashboard = Dashboard(settings)
    dashboard.w = named_widgets(DashboardWidgets)
    for group, names in ((dashboard.budget, ("by_policy", "decided_after", "over_time")),
                         (dashboard.agreement, ("alpha", "pairwise", "loo", "distribution", "gold", "confusion",
                                                "reliability"))):
        for name in names:
            group[name] = Table(f"{name}-plot", f"{name}-table", f"{name}-csv", f"test-{name}")
    return dashboard


def _as(username: str | None):
    from types import SimpleNamespace

    return SimpleNamespace(username=username)


def test_dashboard_decision_rule_is_applied_only_after_a_preview(sqlite_url: str, tmp_path: Path) -> None:
    samples, (a, b), _ = _project(sqlite_url, 2, 2, gold_rate=0.0, calibration_share=0.0, reviews_per_sample=2)
    with session_scope(sqlite_url) as session:
        make_user(session, "lead-dash", role="lead")
    for rater in (a, b):
        _review(sqlite_url, rater)
    _review(sqlite_url, a)
    _review(sqlite_url, b, Answer(consistent=False, quality=5, complexity=5))
    dashboard = _dashboard(tmp_path, sqlite_url)
    lead = _as("lead-dash")
    assert "Preview this decision rule first" in dashboard.on_decision_apply("weighted", 0.5, None, lead)[
        "decision_status"]
    preview = dashboard.on_decision_preview("weighted", 0.5, lead)
    assert "would change" in preview["decision_preview"] or "changed" in preview["decision_preview"]
    applied = dashboard.on_decision_apply("weighted", 0.5, preview["decision_previewed"], lead)
    assert "Decision rule weighted applied by lead-dash" in applied["decision_status"]
    assert _sample(sqlite_url, samples[1])[0] != SampleStatus.needs_adjudication
    budget = dashboard.on_budget(lead)
    assert "expected wrong decisions" in budget["budget_kpis"] and budget["policy"] == "fixed"
    saved = dashboard.on_policy_save("adaptive", 0.3, 0.7, 2, lead)
    assert "Saved by lead-dash: review policy adaptive" in saved["policy_status"]
    refused = dashboard.on_policy_save("adaptive", 0.8, 0.3, 2, lead)
    assert "band_low" in refused["policy_status"]  # a band the wrong way round is refused, naming the setting
    with session_scope(sqlite_url) as session:
        config = get_project_config(session)
    assert (config.review_policy, config.adaptive.band_low, config.adaptive.max_reviews) == ("adaptive", 0.3, 2)
    agreement = dashboard.on_agreement("quality", lead)
    assert "Rater reliability from" in agreement["reliability_flags"]


def test_dashboard_reliability_handlers_refuse_non_leads(sqlite_url: str, tmp_path: Path) -> None:
    import gradio as gr

    _project(sqlite_url, 1, 1)
    with session_scope(sqlite_url) as session:
        make_user(session, "part1", role="participant")
        rater = make_user(session, "rater-x").username
    dashboard = _dashboard(tmp_path, sqlite_url)
    calls = [
        lambda r: dashboard.on_decision_preview("weighted", 0.5, r),
        lambda r: dashboard.on_decision_apply("weighted", 0.5, {"decision_rule": "weighted", "accept_at": 0.5}, r),
        lambda r: dashboard.on_decision_load(r),
        lambda r: dashboard.on_budget(r),
        lambda r: dashboard.on_policy_save("adaptive", 0.2, 0.8, 3, r),
    ]
    for who in (rater, "part1", None):
        for call in calls:
            with pytest.raises(gr.Error, match="Only leads and admins"):
                call(_as(who))
    with session_scope(sqlite_url) as session:
        assert get_project_config(session).review_policy == "fixed"


def test_dashboard_reliability_parts_render_flags_escaped() -> None:
    from mcie.annotate.web.dashboard_views import budget_parts, reliability_parts, render_flags

    figures = {"reliability": {"fit_id": None, "n_reviews": 10, "n_informative": 5, "raters": [
        {"rank": 1, "rater": "<b>eve</b>", "skill": 0.1, "flags": [
            {"flag": "careless", "question": "all", "evidence": "skill <0.2>"}],
         "questions": {q: {"skill": 0.1, "skill_ci": [0.0, 0.2], "bias": 0.0, "bias_ci": [-0.1, 0.1],
                           "n_samples": 30, "n_gold": 3, "model": {}} for q in ("consistency", "quality",
                                                                                 "complexity")}}]}}
    html = render_flags(figures)
    assert "&lt;b&gt;eve&lt;/b&gt;" in html and "skill &lt;0.2&gt;" in html and "<b>eve</b>" not in html
    _, table = reliability_parts(figures)
    assert list(table["question"]) == ["consistency", "quality", "complexity"] and table["flags"].eq("careless").all()
    assert budget_parts({"by_policy": []})[1].empty


def test_policy_settings_are_validated_and_partial_changes_keep_the_rest(sqlite_url: str) -> None:
    from mcie.annotate.project import ProjectConfigError

    upgrade(sqlite_url)
    with session_scope(sqlite_url) as session:
        config = get_project_config(session)
        assert (config.decision_rule, config.review_policy) == ("paper", "fixed")  # the paper's protocol by default
        with pytest.raises(ProjectConfigError, match="decision_rule"):
            configure(session, decision_rule="majority")
        with pytest.raises(ProjectConfigError, match="band_low"):
            configure(session, adaptive={"band_low": 0.9, "band_high": 0.1})
        with pytest.raises(ProjectConfigError, match="max_reviews"):
            configure(session, adaptive={"max_reviews": 0})
        configure(session, adaptive={"max_reviews": 4})
        configure(session, adaptive={"band_high": 0.7})
        config = get_project_config(session)
    assert (config.adaptive.max_reviews, config.adaptive.band_high, config.adaptive.band_low) == (4, 0.7, 0.2)


def test_agreement_command_shows_and_stores_rater_reliability() -> None:
    import json

    from tests.annotate.factories import agreement_project
    from tests.cli import invoke

    invoke("db", "upgrade")
    with session_scope() as session:
        raters = agreement_project(session)
    result = invoke("agreement", "--json", "--n-boot", "0", "--refit")
    assert result.exit_code == 0, result.stdout
    reliability = json.loads(result.stdout)["reliability"]
    assert reliability["fit_id"] == 1 and reliability["n_reviews"] == 18  # stored, and it has seen every review
    names = {r["rater"] for r in reliability["raters"]}
    assert names == {r.username for r in raters} and {r["rank"] for r in reliability["raters"]} == {1, 2, 3}
    first = reliability["raters"][0]
    assert first["questions"]["consistency"]["n_samples"] == 6 and len(first["questions"]["quality"]["skill_ci"]) == 2
    table = invoke("agreement", "--n-boot", "0")
    assert table.exit_code == 0 and "rater reliability" in table.stdout


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_twenty_reviewers_at_once_under_the_adaptive_policy(db: str, request: pytest.FixtureRequest) -> None:
    """Follow-ups under concurrency: with a band that keeps every sample uncertain, every sample ends with exactly
    the cap of reviews from different raters, none is lost, refused or over its target, and every one is decided."""
    import random
    import threading
    from collections import Counter

    from mcie.db.models import Assignment, Review

    url = request.getfixturevalue(f"{db}_url")
    settings = ADAPTIVE | {"adaptive": {"band_low": 0.0, "band_high": 1.0, "max_reviews": 3}}
    samples, reviewers, _ = _project(url, 30, 20, decision_rule="weighted", **settings)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(reviewers))

    done = [0] * len(reviewers)

    def reviewer(index: int, user_id: int) -> None:
        rng = random.Random(index)
        try:
            barrier.wait()
            while (lease := write_tx(url, next_sample, user_id)) is not None:
                answer = Answer(consistent=rng.random() < 0.8, quality=rng.randint(2, 5), complexity=rng.randint(2, 5))
                write_tx(url, submit_review, user_id, lease.sample_id, answer)
                done[index] += 1
        except BaseException as exc:
            errors.append(exc)

    # rounds, as raters come back: a follow-up may be asked for after everybody else found the queue empty
    for _ in range(6):
        before = sum(done)
        threads = [threading.Thread(target=reviewer, args=(k, u)) for k, u in enumerate(reviewers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
        if sum(done) == before:
            break
    with session_scope(url) as session:
        reviews = session.execute(select(Review.user_id, Review.sample_id)).all()
        pairs = session.execute(select(Assignment.user_id, Assignment.sample_id)).all()
        rows = session.execute(select(Sample.id, Sample.status, Sample.reviews_target)).all()
    assert len(set(pairs)) == len(pairs) and len(set(reviews)) == len(reviews)
    assert Counter(s for _, s in reviews) == {s: 3 for s in samples}
    assert all(status in (SampleStatus.accepted, SampleStatus.rejected) and target == 3 for _, status, target in rows)


def test_the_server_sweep_refits_only_when_enough_new_reviews_came_in(sqlite_url: str) -> None:
    _, raters, _ = _project(sqlite_url, 12, 2, gold_rate=0.0, calibration_share=0.0, reviews_per_sample=2,
                            adaptive={"refit_every": 10})
    for _ in range(4):
        for rater in raters:
            _review(sqlite_url, rater)
    assert reliability_service.refit_when_due(sqlite_url) is None  # 8 reviews < 10
    for _ in range(2):
        for rater in raters:
            _review(sqlite_url, rater)
    fit_id = reliability_service.refit_when_due(sqlite_url)
    assert fit_id is not None and reliability_service.refit_when_due(sqlite_url) is None
    with session_scope(sqlite_url) as session:
        stored_id, fit = reliability_service.latest_fit(session)
    assert stored_id == fit_id and fit.n_reviews == 12
    assert all("previous_skill" in report for report in fit.reports)


def test_the_sweep_queues_one_refit_job_and_a_worker_runs_it(any_db_url: str, tmp_path: Path) -> None:
    """The web tier only queues a ``reliability`` job when a refit is due (never two at once); a worker fits."""
    from mcie.annotate import jobs
    from mcie.annotate.worker import Worker
    from mcie.config import Settings

    _, raters, _ = _project(any_db_url, 12, 2, gold_rate=0.0, calibration_share=0.0, reviews_per_sample=2,
                            adaptive={"refit_every": 10})
    for _ in range(4):
        for rater in raters:
            _review(any_db_url, rater)
    assert write_tx(any_db_url, reliability_service.queue_refit_when_due) is None  # 8 reviews < 10
    with session_scope(any_db_url) as session, pytest.raises(RuntimeError, match="queueing a reliability refit"):
        reliability_service.queue_refit_when_due(session)
    for rater in raters:
        _review(any_db_url, rater)
    job_id = write_tx(any_db_url, reliability_service.queue_refit_when_due)
    assert job_id is not None
    assert write_tx(any_db_url, reliability_service.queue_refit_when_due) is None  # one is queued already
    with session_scope(any_db_url) as session:
        assert session.scalar(select(func.count()).select_from(ReliabilityFit)) == 0  # the web tier fitted nothing
    settings = Settings(database_url=any_db_url, data_dir=tmp_path)
    worker = Worker(settings, kinds=["reliability"], poll_s=0.05).start()
    try:
        for _ in range(400):
            job = read_tx(any_db_url, jobs.get, job_id)
            if job.status in ("done", "failed"):
                break
            time.sleep(0.05)
    finally:
        worker.stop(5.0)
    assert job.status == "done", job.error
    with session_scope(any_db_url) as session:
        stored_id, fit = reliability_service.latest_fit(session)
    assert job.result == {"fit_id": stored_id} and fit.n_reviews == 10
    assert write_tx(any_db_url, reliability_service.queue_refit_when_due) is None  # not due again


def test_a_replica_drops_its_refit_when_another_stored_one_meanwhile(sqlite_url: str, monkeypatch) -> None:
    """Two web replicas due at once: the one whose fit is stored second drops it instead of storing a near-copy."""
    _, raters, _ = _project(sqlite_url, 12, 2, gold_rate=0.0, calibration_share=0.0, reviews_per_sample=2,
                            adaptive={"refit_every": 10})
    for _ in range(6):
        for rater in raters:
            _review(sqlite_url, rater)
    compute = reliability_service.compute_fit

    def compute_while_another_replica_stores(session):
        fit = compute(session)
        with session_scope(sqlite_url, write=True) as other:
            reliability_service.store_fit(other, compute(other))  # the other replica was faster
        return fit

    monkeypatch.setattr(reliability_service, "compute_fit", compute_while_another_replica_stores)
    assert reliability_service.refit_when_due(sqlite_url) is None
    with session_scope(sqlite_url) as session:
        assert session.scalar(select(func.count()).select_from(ReliabilityFit)) == 1
