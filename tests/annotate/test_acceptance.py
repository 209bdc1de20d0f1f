"""The acceptance rule on hand-made cases, settling with a decision trail, what-if previews that write nothing,
re-applying a rule without touching lead decisions, and adjudication by leads only (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from mcie.annotate.acceptance import (
    AcceptanceError,
    adjudicate,
    adjudication_queue,
    apply_rule,
    decision_history,
    evaluate,
    preview_rule,
    rule_outcome,
    settle_complete,
    settle_sample,
)
from mcie.annotate.project import AcceptanceRule, get_project_config
from mcie.annotate.queue import next_sample
from mcie.annotate.reviews import Answer, submit_review
from mcie.db.models import AuditLog, Decision, DecisionSource, ProjectSetting, Sample, SampleStatus
from mcie.db.session import session_scope
from tests.annotate.factories import (
    add_conflict_judgement,
    add_reviews,
    configure,
    make_gold,
    make_sample,
    make_user,
    make_users,
)
from tests.annotate.tx import read_tx, write_tx

PAPER = AcceptanceRule()  # consistent, quality > 3, complexity > 3, max spread 2


def _reviews(*answers: tuple[bool, int, int]) -> list[dict]:
    return [{"consistent": c, "quality": q, "complexity": x} for c, q, x in answers]


# ----------------------------------------------------------------------------------------------------------
# the rule, by hand


@pytest.mark.parametrize(
    ("answers", "rule", "expected"),
    [
        # the paper's default rule on single reviews
        ([(True, 4, 4)], PAPER, "accepted"),
        ([(True, 3, 5)], PAPER, "rejected"),
        ([(False, 5, 5)], PAPER, "rejected"),
        ([(True, 5, 3)], PAPER, "rejected"),
        # split consistency votes go to a lead unless a score already rejects the sample
        ([(True, 4, 4), (True, 5, 4), (False, 4, 5)], PAPER, "needs_adjudication"),
        ([(True, 4, 4), (False, 4, 4)], PAPER, "needs_adjudication"),
        ([(False, 4, 4), (False, 5, 4), (True, 4, 5)], PAPER, "needs_adjudication"),
        ([(True, 2, 4), (False, 2, 4), (True, 3, 4)], PAPER, "rejected"),
        ([(False, 4, 4), (False, 5, 4), (False, 4, 5)], PAPER, "rejected"),
        # scores: medians, spread and the boundary
        ([(True, 3, 4), (True, 4, 4)], PAPER, "accepted"),  # median 3.5 > 3
        ([(True, 3, 4), (True, 3, 4), (True, 4, 4)], PAPER, "rejected"),  # median 3, nobody below
        ([(True, 2, 4), (True, 3, 4), (True, 4, 4)], PAPER, "needs_adjudication"),  # on 3, both sides
        ([(True, 1, 4), (True, 5, 4), (True, 4, 4)], PAPER, "needs_adjudication"),  # spread 4 > 2
        ([(True, 1, 4), (True, 5, 4), (True, 4, 4)], AcceptanceRule(max_score_spread=4), "accepted"),
        ([(True, 4, 2), (True, 4, 5), (True, 4, 4)], PAPER, "needs_adjudication"),  # complexity spread 3
        # other rules
        ([(False, 4, 4)], AcceptanceRule(require_consistent=False), "accepted"),
        ([(True, 3, 4)], AcceptanceRule(quality_above=2), "accepted"),
        ([(True, 4, 4), (True, 4, 4)], AcceptanceRule(complexity_above=4), "rejected"),
    ],
)
def test_rule_outcomes(answers, rule: AcceptanceRule, expected: str) -> None:
    assert rule_outcome(_reviews(*answers), rule) == expected


def test_reasons() -> None:
    result = evaluate(_reviews((True, 4, 4), (True, 5, 4), (False, 4, 5)), PAPER)
    assert result.criteria == {"consistency": "disputed", "quality": "pass", "complexity": "pass"}
    assert result.reason == (
        "3 review(s); consistency split: 2 yes, 1 no; median quality 4 > 3; median complexity 4 > 3"
    )
    with pytest.raises(AcceptanceError, match="at least one review"):
        evaluate([], PAPER)
    with pytest.raises(AcceptanceError, match="quality must be an integer 1-5"):
        evaluate(_reviews((True, 7, 4)), PAPER)


# ----------------------------------------------------------------------------------------------------------
# settling, previews, applying a rule


def _statuses(url: str) -> dict[int, SampleStatus]:
    with session_scope(url) as session:
        return dict(session.execute(select(Sample.id, Sample.status)).all())


def _reviewed_project(url: str) -> dict[str, int]:
    """good (yes/4/4), meh (yes/3/4), split (yes/4/4 + no/4/4), vetoed (yes/5/5, then rejected by a lead)."""
    with session_scope(url) as session:
        config = configure(session, gold_rate=0.0, calibration_share=0.0, reviews_per_sample=1)
        ann, bob = make_users(session, 2)
        lead = make_user(session, role="lead")
        rater = make_user(session, role="rater")
        ids = {"lead": lead.id, "rater": rater.id}
        for name, answers in {
            "good": [(True, 4, 4)],
            "meh": [(True, 3, 4)],
            "split": [(True, 4, 4), (False, 4, 4)],
            "vetoed": [(True, 5, 5)],
        }.items():
            sample = make_sample(session, status=SampleStatus.in_review)
            add_reviews(session, sample, [ann, bob][: len(answers)], answers)
            settle_sample(session, sample.id, config)
            ids[name] = sample.id
        add_conflict_judgement(session, session.get(Sample, ids["split"]), "no_conflict", "distinct objects")
    write_tx(url, adjudicate, ids["vetoed"], "rejected", ids["lead"], "the target image is a near duplicate")
    return ids


def test_settle_sample_records_decisions_and_keeps_lead_decisions(migrated_url: str) -> None:
    url = migrated_url
    ids = _reviewed_project(url)
    assert _statuses(url) == {
        ids["good"]: SampleStatus.accepted,
        ids["meh"]: SampleStatus.rejected,
        ids["split"]: SampleStatus.needs_adjudication,
        ids["vetoed"]: SampleStatus.rejected,
    }
    with session_scope(url) as session:
        config = get_project_config(session)
        good = session.scalars(select(Decision).where(Decision.sample_id == ids["good"])).one()
        assert (good.outcome.value, good.source.value, good.decided_by) == ("accepted", "rule", None)
        assert {k: good.rule[k] for k in PAPER.model_dump()} == PAPER.model_dump()
        assert good.rule["decision_rule"] == "paper" and "p_accept" in good.rule["posterior"]
        assert good.reason == "1 review(s); consistent: 1/1 yes; median quality 4 > 3; median complexity 4 > 3"
        # settling again changes nothing and writes nothing
        before = session.scalar(select(func.count()).select_from(Decision))
        assert settle_sample(session, ids["good"], config) == SampleStatus.accepted
        assert settle_sample(session, ids["vetoed"], config) == SampleStatus.rejected  # the lead's, kept
        assert session.scalar(select(func.count()).select_from(Decision)) == before
        # split: no decision row (decisions are accept/reject), the move is in the audit log
        assert session.scalar(select(func.count()).where(Decision.sample_id == ids["split"])) == 0
        assert session.scalar(select(func.count()).where(AuditLog.action == "sample.needs_adjudication")) == 1


def test_settle_sample_refuses_gold_and_incomplete_samples(migrated_url: str) -> None:
    with session_scope(migrated_url) as session:
        config = configure(session, calibration_share=0.0, reviews_per_sample=2)
        gold = make_sample(session)
        make_gold(session, gold)
        half = make_sample(session)
        add_reviews(session, half, make_users(session, 1), [(True, 4, 4)])
        with pytest.raises(AcceptanceError, match="gold sample"):
            settle_sample(session, gold.id, config)
        with pytest.raises(AcceptanceError, match="has 1 of the 2 reviews it wants"):
            settle_sample(session, half.id, config)
        with pytest.raises(AcceptanceError, match="no sample"):
            settle_sample(session, 999_999, config)


def test_preview_writes_nothing_and_apply_resettles_but_keeps_lead_decisions(migrated_url: str) -> None:
    url = migrated_url
    ids = _reviewed_project(url)

    def snapshot() -> tuple:
        with session_scope(url) as session:
            return (
                _statuses(url),
                session.scalar(select(func.count()).select_from(Decision)),
                session.scalar(select(func.count()).select_from(AuditLog)),
                session.scalars(select(ProjectSetting.value).where(ProjectSetting.key == "acceptance")).all(),
            )

    before = snapshot()
    lenient = AcceptanceRule(quality_above=2)
    assert read_tx(url, preview_rule, lenient) == {
        "accepted": 2,  # good, meh
        "rejected": 0,
        "needs_adjudication": 1,  # split
        "kept_lead_decisions": 1,  # vetoed
        "would_change": 1,  # meh
    }
    assert read_tx(url, preview_rule, AcceptanceRule(require_consistent=False))["accepted"] == 2  # good, split
    assert snapshot() == before

    with pytest.raises(PermissionError, match="only an active lead or admin"):
        write_tx(url, apply_rule, lenient, ids["rater"])
    assert snapshot() == before
    result = write_tx(url, apply_rule, lenient, ids["lead"])
    assert result["changed"] == 1 and result["accepted"] == 2
    assert _statuses(url)[ids["meh"]] == SampleStatus.accepted
    assert _statuses(url)[ids["vetoed"]] == SampleStatus.rejected  # the lead's decision stays
    with session_scope(url) as session:
        assert get_project_config(session).acceptance == lenient

    history = read_tx(url, decision_history, ids["meh"])
    assert [(h.outcome, h.source) for h in history] == [("rejected", "rule"), ("accepted", "rule")]
    assert history[1].rule["quality_above"] == 2 and history[1].decided_by is not None

    strict = AcceptanceRule(require_consistent=False, quality_above=4)
    write_tx(url, apply_rule, strict, ids["lead"])  # the split sample now fails on quality: rejected
    assert _statuses(url)[ids["split"]] == SampleStatus.rejected
    assert [(h.outcome, h.decision_id is None) for h in read_tx(url, decision_history, ids["split"])] == [
        ("needs_adjudication", True),
        ("rejected", False),
    ]


def test_adjudication_needs_a_lead_and_a_reason(migrated_url: str) -> None:
    url = migrated_url
    ids = _reviewed_project(url)
    queue = read_tx(url, adjudication_queue)
    assert [item.sample_id for item in queue] == [ids["split"]]
    item = queue[0]
    assert [(r.consistent, r.quality) for r in item.reviews] == [(True, 4), (False, 4)]
    assert len({r.reviewer for r in item.reviews}) == 2 and all(r.reviewer for r in item.reviews)
    assert (item.mllm_verdict, item.mllm_reason) == ("no_conflict", "distinct objects")
    assert "consistency split: 1 yes, 1 no" in item.why

    with pytest.raises(PermissionError, match="only an active lead or admin may adjudicate"):
        write_tx(url, adjudicate, ids["split"], "accepted", ids["rater"], "looks fine")
    with pytest.raises(AcceptanceError, match="reason is required"):
        write_tx(url, adjudicate, ids["split"], "accepted", ids["lead"], "   ")
    with pytest.raises(AcceptanceError, match="outcome must be 'accepted' or 'rejected'"):
        write_tx(url, adjudicate, ids["split"], "maybe", ids["lead"], "unsure")
    decision_id = write_tx(url, adjudicate, ids["split"], "accepted", ids["lead"], "the two edits touch different cars")

    assert read_tx(url, adjudication_queue) == []
    assert _statuses(url)[ids["split"]] == SampleStatus.accepted
    last = read_tx(url, decision_history, ids["split"])[-1]
    assert (last.decision_id, last.outcome, last.source) == (decision_id, "accepted", "lead")
    assert last.reason == "the two edits touch different cars" and last.decided_by is not None
    with session_scope(url) as session:
        decision = session.get(Decision, decision_id)
        assert (decision.source, decision.decided_by) == (DecisionSource.lead, ids["lead"])
        audit = session.scalars(select(AuditLog).where(AuditLog.action == "sample.adjudicate")).all()
        assert [a.entity_id for a in audit] == [str(ids["vetoed"]), str(ids["split"])]
        assert audit[-1].user_id == ids["lead"] and audit[-1].details["previous"] == "needs_adjudication"


def test_a_calibration_split_reached_through_the_queue_goes_to_a_lead(migrated_url: str) -> None:
    url = migrated_url
    with session_scope(url) as session:
        configure(session, gold_rate=0.0, calibration_share=1.0, calibration_reviews=3)
        sample = make_sample(session).id
        raters = [u.id for u in make_users(session, 3)]
    for rater, consistent in zip(raters, (True, True, False), strict=True):
        assert write_tx(url, next_sample, rater).sample_id == sample
        write_tx(url, submit_review, rater, sample, Answer(consistent, 4, 4))
        expected = SampleStatus.needs_adjudication if rater == raters[-1] else SampleStatus.in_review
        assert _statuses(url)[sample] == expected


def test_settle_complete_after_the_target_is_lowered(migrated_url: str) -> None:
    url = migrated_url
    with session_scope(url) as session:
        configure(session, gold_rate=0.0, calibration_share=0.0, reviews_per_sample=2)
        done, untouched = (make_sample(session, status=SampleStatus.in_review) for _ in range(2))
        add_reviews(session, done, make_users(session, 1), [(True, 5, 4)])
        gold = make_sample(session, status=SampleStatus.in_review)
        make_gold(session, gold)
        add_reviews(session, gold, make_users(session, 1), [(True, 5, 4)])
        ids = (done.id, untouched.id, gold.id)
    assert write_tx(url, settle_complete) == 0  # one review of the two wanted
    with session_scope(url) as session:
        configure(session, reviews_per_sample=1)
    assert write_tx(url, settle_complete) == 1
    statuses = _statuses(url)
    assert [statuses[i] for i in ids] == [SampleStatus.accepted, SampleStatus.in_review, SampleStatus.in_review]


@pytest.mark.parametrize(
    ("service", "args"),
    [(adjudicate, (1, "accepted", 1, "fine")), (settle_complete, ())],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_the_writers_refuse_a_session_that_is_not_a_write_transaction(sqlite_url: str, service, args) -> None:
    with session_scope(sqlite_url) as session, pytest.raises(RuntimeError, match=f"{service.__name__} reads then"):
        service(session, *args)
