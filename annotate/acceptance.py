"""The paper's acceptance rule applied to a sample's reviews, disagreement, lead adjudication, and "what if" previews.

MCIE section 3.1 keeps a sample when the experts find its complex instruction consistent (yes/no) and rate image
quality and editing-scenario complexity (1-5) above 3. :class:`annotate.project.AcceptanceRule` holds the thresholds;
this module turns a sample's reviews into ``accepted``, ``rejected`` or ``needs_adjudication``.

Aggregation (:func:`annotate.aggregation.aggregate`): consistency is the majority verdict (None on a tie), quality
and complexity are medians (3 and 4 give 3.5), spreads are max - min; "above" is :func:`annotate.aggregation.above`.
Gold reviews are never passed in: gold samples are never settled.

The rule (:func:`evaluate`, :func:`rule_outcome`), criterion by criterion. Each of consistency (only when
``require_consistent``), quality and complexity is *pass*, *fail* or *disputed*:

1. Consistency: every reviewer says yes -> pass; every reviewer says no -> fail; any mix of yes and no -> disputed.
   A tie and a non-unanimous majority are both disputes: a single expert who sees a conflict between the
   sub-instructions is a specific, checkable claim, and the dataset is for training, so a doubtful "consistent" is
   not taken on a majority vote. (With one review per sample there is never a dispute.)
2. Quality / complexity, with threshold ``t`` (pass means median > t, strictly, as in the paper):
   spread (max - min) > ``max_score_spread`` -> disputed (the median of wildly different scores means little);
   otherwise median exactly equal to ``t`` with at least one score above ``t`` and one below -> disputed (the
   aggregate sits on the boundary and reviewers are on both sides); otherwise pass if median > t, else fail.
   So (3, 4) with t = 3 has median 3.5 and passes; (2, 3, 4) sits on 3 with scores on both sides and is disputed;
   (3, 3, 4) has median 3, nobody below, and fails.
3. Outcome: any *fail* -> ``rejected`` (a dispute elsewhere could not change that, so no lead time is spent on it);
   else any *disputed* -> ``needs_adjudication``; else ``accepted``.

Every decision explains itself (``RuleResult.reasons``, stored as the decision's reason).

Decision rules (project setting ``decision_rule``). ``paper`` (the default) is the rule above. ``weighted``
(:func:`decide`) accepts when the reliability-weighted posterior probability that the sample meets the thresholds
(:func:`annotate.reliability.posterior_accept` under the newest reliability fit, the MLLM's calibrated verdict as the
consistency prior) is at least ``weighted.accept_at``, and rejects otherwise: it never sends a sample to a lead. The
posterior is computed under either rule and recorded with every rule decision (:func:`provenance`: thresholds,
``decision_rule``, ``review_policy``, ``posterior``, ``reliability_fit``), so exports carry it. Under the ``adaptive``
review policy a sample whose posterior is still uncertain is not settled but asks for another review
(:func:`settle_loaded`).

Settling (:func:`settle_sample`): the outcome becomes the sample's status. A ``decisions`` row (source ``rule``, the
rule's thresholds as JSON, the reason) is written when the status changes to accepted or rejected. The ``decisions``
table's outcome is only accepted/rejected, so a move to ``needs_adjudication`` is written to ``audit_log``
(action ``sample.needs_adjudication``, with the rule and reason) and :func:`decision_history` shows both; the
sample's ``status`` is always the current verdict. A sample with any lead decision is never changed by the rule.

Leads: :func:`preview_rule` counts what a rule (thresholds, decision rule, cut) would do to every settled sample
without writing; :func:`apply_rule` stores it in the project settings and re-settles every rule-decided sample
(lead decisions stay); :func:`adjudication_queue` lists samples waiting for a lead with every review side by side;
:func:`adjudicate` records a lead's accept/reject with its reason. Only leads and admins may apply rules or
adjudicate (:class:`PermissionError` otherwise). :func:`settle_complete` settles open samples that already have
the reviews they want, for when a lead lowers ``reviews_per_sample`` or ``calibration_share``.

Transactions: :func:`settle_complete`, :func:`adjudication_queue`, :func:`adjudicate` and :func:`decision_history`
take the caller's ``Session`` and never commit; the writers (settle, adjudicate) need a write transaction,
``session_scope(url, write=True)`` (checked by :func:`db.session.require_write`).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, Literal

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from mcie.annotate import reliability_service
from mcie.annotate.aggregation import Aggregate, AggregationError, above, aggregate, answers
from mcie.annotate.project import AcceptanceRule, ProjectConfig, get_project_config, set_project_config
from mcie.annotate.queue import (
    OPEN_STATUSES,
    is_calibration,
    is_gold_clause,
    reviews_wanted,
    submitted_clause,
    utc,
    wanted_clause,
)
from mcie.annotate.reliability import (
    Posterior,
    ReliabilityFit,
    adaptive_next,
    disagrees_with_mllm,
    followup_priority,
    posterior_accept,
    weighted_outcome,
)
from mcie.db.models import (
    AuditLog,
    Decision,
    DecisionSource,
    GoldAnswer,
    MllmJudgement,
    MllmStage,
    Outcome,
    Review,
    Role,
    Sample,
    SampleStatus,
    User,
    utcnow,
)
from mcie.db.session import require_write

RuleOutcome = Literal["accepted", "rejected", "needs_adjudication"]
Criterion = Literal["pass", "fail", "disputed"]
SETTLED_STATUSES: tuple[SampleStatus, ...] = (
    SampleStatus.accepted,
    SampleStatus.rejected,
    SampleStatus.needs_adjudication,
)
LEAD_ROLES: tuple[Role, ...] = (Role.lead, Role.admin)
NEEDS_ADJUDICATION_ACTION = "sample.needs_adjudication"


class AcceptanceError(AggregationError):
    """A request the acceptance rule cannot serve (no reviews, unknown sample, a gold sample ...)."""


# ----------------------------------------------------------------------------------------------------------
# pure rule


@dataclass(frozen=True)
class RuleResult:
    outcome: RuleOutcome
    aggregate: Aggregate
    criteria: Mapping[str, Criterion]
    reasons: tuple[str, ...]

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _score_criterion(name: str, scores: list[int], median: float, spread: int, threshold: float, max_spread: int):
    if spread > max_spread:
        return "disputed", f"{name} scores {sorted(scores)} differ by {spread} > {max_spread}"
    if median == threshold and any(s > threshold for s in scores) and any(s < threshold for s in scores):
        return "disputed", f"median {name} {median:g} sits on the threshold with scores {sorted(scores)} on both sides"
    if above(median, threshold):
        return "pass", f"median {name} {median:g} > {threshold:g}"
    return "fail", f"median {name} {median:g} <= {threshold:g}"


def evaluate(reviews: Sequence[Any], rule: AcceptanceRule) -> RuleResult:
    """Apply ``rule`` to one sample's reviews (see the module docstring); raises AcceptanceError without reviews.

    The result depends only on the multiset of answers, so it is memoized on the sorted answers (re-settling a whole
    project evaluates a few hundred distinct cases, not 100,000); treat it as read-only.
    """
    try:
        consistent, quality, complexity = answers(reviews)
    except AggregationError as exc:
        raise AcceptanceError(str(exc)) from exc
    if not consistent:
        raise AcceptanceError("the acceptance rule needs at least one review")
    return _evaluate_answers(tuple(sorted(zip(consistent, quality, complexity, strict=True))), rule)


@functools.lru_cache(maxsize=8192)
def _evaluate_answers(triples: tuple[tuple[bool, int, int], ...], rule: AcceptanceRule) -> RuleResult:
    reviews = [{"consistent": c, "quality": q, "complexity": x} for c, q, x in triples]
    quality, complexity = [q for _, q, _ in triples], [x for _, _, x in triples]
    agg = aggregate(reviews)
    criteria: dict[str, Criterion] = {}
    reasons: list[str] = []
    if rule.require_consistent:
        yes, n = agg.n_consistent, agg.n
        if yes == n:
            criteria["consistency"], text = "pass", f"consistent: {yes}/{n} yes"
        elif yes == 0:
            criteria["consistency"], text = "fail", f"inconsistent: {n}/{n} no"
        else:
            criteria["consistency"], text = "disputed", f"consistency split: {yes} yes, {n - yes} no"
        reasons.append(text)
    for name, scores, median, spread, threshold in (
        ("quality", quality, agg.quality, agg.spread_quality, rule.quality_above),
        ("complexity", complexity, agg.complexity, agg.spread_complexity, rule.complexity_above),
    ):
        state, text = _score_criterion(name, scores, median, spread, threshold, rule.max_score_spread)
        criteria[name] = state
        reasons.append(text)
    states = set(criteria.values())
    outcome: RuleOutcome
    if "fail" in states:
        outcome = "rejected"
    elif "disputed" in states:
        outcome = "needs_adjudication"
    else:
        outcome = "accepted"
    return RuleResult(outcome, agg, MappingProxyType(criteria), (f"{agg.n} review(s)", *reasons))


def rule_outcome(reviews: Sequence[Any], rule: AcceptanceRule) -> RuleOutcome:
    """``accepted``, ``rejected`` or ``needs_adjudication`` for one sample's reviews under ``rule``."""
    return evaluate(reviews, rule).outcome


# ----------------------------------------------------------------------------------------------------------
# database edge


def _has_lead_decision(session: Session, sample_id: int) -> bool:
    query = select(Decision.id).where(Decision.sample_id == sample_id, Decision.source == DecisionSource.lead)
    return session.scalar(query.limit(1)) is not None


def _record(
    session: Session, sample: Sample, result: RuleResult, provenance: dict[str, Any], actor_id: int | None
) -> SampleStatus:
    """Set the sample's status to the rule's outcome, recording the change; returns the new status."""
    new = SampleStatus(result.outcome)
    if new == sample.status and new != SampleStatus.needs_adjudication:
        latest = session.scalar(
            select(Decision.outcome)
            .where(Decision.sample_id == sample.id)
            .order_by(Decision.created_at.desc(), Decision.id.desc())
            .limit(1)
        )
        if latest is not None and latest.value == new.value:
            return new
    elif new == sample.status:
        return new
    # core statements (no ORM flush); the loaded sample gets its new status as if it had been flushed
    session.flush()
    if new == SampleStatus.needs_adjudication:
        session.execute(
            insert(AuditLog).values(
                user_id=actor_id,
                action=NEEDS_ADJUDICATION_ACTION,
                entity="sample",
                entity_id=str(sample.id),
                details={"rule": provenance, "reason": result.reason, "previous": sample.status.value},
            )
        )
    else:
        session.execute(
            insert(Decision).values(
                sample_id=sample.id,
                outcome=Outcome(new.value),
                source=DecisionSource.rule,
                rule=provenance,
                decided_by=actor_id,
                reason=result.reason,
            )
        )
    session.execute(
        update(Sample).where(Sample.id == sample.id).values(status=new).execution_options(synchronize_session=False)
    )
    set_committed_value(sample, "status", new)
    return new


def settle_sample(session: Session, sample_id: int, config: ProjectConfig) -> SampleStatus:
    """Apply ``config.acceptance`` to a sample that has all the reviews it wants and set its status.

    Writes a decision (or an audit entry for needs_adjudication) only when the status changes. A sample a lead has
    decided keeps the lead's decision. Raises AcceptanceError for an unknown or gold sample, or one with fewer reviews
    than :func:`annotate.queue.reviews_wanted`. The caller holds the sample's row lock (``annotate.reviews`` does).
    """
    sample = session.get(Sample, sample_id)
    if sample is None:
        raise AcceptanceError(f"no sample with id {sample_id}")
    if session.get(GoldAnswer, sample_id) is not None:
        raise AcceptanceError(f"sample {sample_id} is a gold sample; gold reviews are never settled")
    return settle_loaded(session, sample, config)


def settle_loaded(session: Session, sample: Sample, config: ProjectConfig) -> SampleStatus:
    """:func:`settle_sample` for a sample the caller has loaded (and locked) and knows is not a gold sample.

    Under the adaptive review policy an open, non-calibration sample whose posterior is still inside the band (and
    under the cap) is not settled: its ``reviews_target`` goes up by one and it moves up the queue
    (:func:`annotate.reliability.followup_priority`); its status stays ``in_review``."""
    sample_id = sample.id
    lead = (
        select(Decision.id)
        .where(Decision.sample_id == sample_id, Decision.source == DecisionSource.lead)
        .limit(1)
        .scalar_subquery()
    )
    rows = session.execute(
        select(Review.user_id, Review.consistent, Review.quality, Review.complexity, lead.label("lead"))
        .where(Review.sample_id == sample_id)
        .order_by(Review.id)
    ).all()
    has_lead = rows[0].lead is not None if rows else _has_lead_decision(session, sample_id)
    if has_lead:
        return sample.status
    reviews = [_Answer(r.consistent, r.quality, r.complexity, r.user_id) for r in rows]
    wanted = reviews_wanted(sample_id, config, sample.reviews_target)
    if len(reviews) < wanted:
        raise AcceptanceError(f"sample {sample_id} has {len(reviews)} of the {wanted} reviews it wants")
    fit_id, fit = reliability_service.latest_fit(session)
    score = reliability_service.mllm_scores(session, [sample_id]).get(sample_id)
    posterior = _posterior(fit, reviews, config, score)
    band = (config.adaptive.band_low, config.adaptive.band_high)
    if (
        config.review_policy == "adaptive"
        and sample.status in OPEN_STATUSES
        and not is_calibration(sample_id, config.calibration_share)
        and adaptive_next(posterior.p_accept, len(reviews), band=band, cap=config.adaptive.max_reviews)
    ):
        disagreement = disagrees_with_mllm(score, [r.consistent for r in reviews])
        priority = followup_priority(sample.priority, disagreement=disagreement, p_accept=posterior.p_accept)
        session.execute(
            update(Sample)
            .where(Sample.id == sample_id)
            .values(reviews_target=len(reviews) + 1, priority=priority)
            .execution_options(synchronize_session=False)
        )
        set_committed_value(sample, "reviews_target", len(reviews) + 1)
        set_committed_value(sample, "priority", priority)
        return sample.status
    result = decide(reviews, config, posterior)
    return _record(session, sample, result, provenance(config, posterior, fit_id), None)


def _posterior(
    fit: ReliabilityFit, reviews: Sequence[_Answer], config: ProjectConfig, score: float | None
) -> Posterior:
    rule = config.acceptance
    answers = [{"rater": r.rater, "consistent": r.consistent, "quality": r.quality, "complexity": r.complexity}
               for r in reviews]
    return posterior_accept(fit, answers, quality_above=rule.quality_above, complexity_above=rule.complexity_above,
                            require_consistent=rule.require_consistent, mllm_score=score,
                            use_mllm=config.weighted.use_mllm_prior)


def decide(reviews: Sequence[Any], config: ProjectConfig, posterior: Posterior) -> RuleResult:
    """The project's decision rule on one sample: the paper's rule (:func:`evaluate`) or the weighted rule
    (accept when ``posterior.p_accept >= config.weighted.accept_at``; never sent to adjudication)."""
    if config.decision_rule == "paper":
        return evaluate(reviews, config.acceptance)
    outcome = weighted_outcome(posterior, config.weighted.accept_at)
    agg = aggregate(reviews)
    at = config.weighted.accept_at
    text = (
        f"P(meets the rule) = {posterior.p_accept:.3f} {'>=' if outcome == 'accepted' else '<'} {at:g} "
        f"(consistent {posterior.p_consistent:.3f}, quality {posterior.p_quality:.3f}, "
        f"complexity {posterior.p_complexity:.3f})"
    )
    state: Criterion = "pass" if outcome == "accepted" else "fail"
    return RuleResult(outcome, agg, MappingProxyType({"posterior": state}), (f"{agg.n} review(s)", text))


def provenance(config: ProjectConfig, posterior: Posterior | None, fit_id: int | None) -> dict[str, Any]:
    """What a rule decision records in ``decisions.rule`` (and exports carry): the thresholds, the decision rule,
    the review policy, the posterior and the reliability fit it came from."""
    out: dict[str, Any] = config.acceptance.model_dump()
    out["decision_rule"] = config.decision_rule
    out["review_policy"] = config.review_policy
    if config.decision_rule == "weighted":
        out["accept_at"] = config.weighted.accept_at
    if posterior is not None:
        out["posterior"] = posterior.as_dict()
    out["reliability_fit"] = fit_id
    return out


@dataclass(frozen=True)
class _Answer:
    consistent: bool
    quality: int
    complexity: int
    rater: int | None = None


def _settled_reviews(
    session: Session, lock: bool
) -> tuple[dict[int, SampleStatus], dict[int, list[_Answer]], set[int]]:
    """Status of every settled non-gold sample, their answers, and the ids of those a lead decided (plain rows, no
    ORM objects: this runs over the whole project). With ``lock`` the sample rows are locked (PostgreSQL)."""
    query = (
        select(Sample.id, Sample.status)
        .where(Sample.status.in_(SETTLED_STATUSES), ~is_gold_clause(Sample.id))
        .order_by(Sample.id)
    )
    if lock:
        query = query.with_for_update(of=Sample)
    statuses = {sample_id: SampleStatus(status) for sample_id, status in session.execute(query)}
    answers: dict[int, list[_Answer]] = defaultdict(list)
    lead_ids: set[int] = set()
    if statuses:
        settled = select(Sample.id).where(Sample.status.in_(SETTLED_STATUSES))
        rows = session.execute(
            select(Review.sample_id, Review.consistent, Review.quality, Review.complexity, Review.user_id)
            .where(Review.sample_id.in_(settled))
            .order_by(Review.id)
        )
        for sample_id, consistent, quality, complexity, user_id in rows:
            if sample_id in statuses:
                answers[sample_id].append(_Answer(consistent, quality, complexity, user_id))
        lead_ids = set(
            session.scalars(
                select(Decision.sample_id).where(
                    Decision.source == DecisionSource.lead, Decision.sample_id.in_(settled)
                )
            )
        )
    return statuses, answers, lead_ids


Decider = Callable[[int, list[_Answer]], tuple[RuleResult, dict[str, Any]]]


def _decider(session: Session, config: ProjectConfig) -> Decider:
    """The project's decision rule under ``config`` as a function of (sample id, answers) -> (result, provenance)."""
    fit_id, fit = reliability_service.latest_fit(session)
    scores = reliability_service.mllm_scores(session)

    def run(sample_id: int, answers: list[_Answer]) -> tuple[RuleResult, dict[str, Any]]:
        posterior = _posterior(fit, answers, config, scores.get(sample_id))
        return decide(answers, config, posterior), provenance(config, posterior, fit_id)

    return run


def _what_if(
    statuses: dict[int, SampleStatus], answers: dict[int, list[_Answer]], lead_ids: set[int], decider: Decider
) -> tuple[dict[str, int], dict[int, tuple[RuleResult, dict[str, Any]]]]:
    """Counts of what the decision rule does to the settled samples, and the result (with its provenance) of each
    sample whose status it changes."""
    counts = {"accepted": 0, "rejected": 0, "needs_adjudication": 0, "kept_lead_decisions": 0, "would_change": 0}
    changes: dict[int, tuple[RuleResult, dict[str, Any]]] = {}
    for sample_id, status in statuses.items():
        if sample_id in lead_ids:
            counts["kept_lead_decisions"] += 1
            continue
        if not answers.get(sample_id):
            continue
        result, rule_json = decider(sample_id, answers[sample_id])
        counts[result.outcome] += 1
        if result.outcome != status.value:
            counts["would_change"] += 1
            changes[sample_id] = (result, rule_json)
    return counts, changes


def _config_with(
    config: ProjectConfig, rule: AcceptanceRule | None, decision_rule: str | None, accept_at: float | None = None
) -> ProjectConfig:
    update_: dict[str, Any] = {}
    if rule is not None:
        update_["acceptance"] = rule
    if decision_rule is not None:
        update_["decision_rule"] = decision_rule
    if accept_at is not None:
        update_["weighted"] = config.weighted.model_copy(update={"accept_at": accept_at})
    return ProjectConfig.model_validate(config.model_dump() | {k: v for k, v in update_.items()})


def preview_rule(
    session: Session,
    rule: AcceptanceRule | None = None,
    *,
    decision_rule: str | None = None,
    accept_at: float | None = None,
) -> dict[str, int]:
    """What the decision rule would do to the settled (reviewed) samples, without writing anything: the current
    configuration with ``rule`` (thresholds), ``decision_rule`` (paper or weighted) and ``accept_at`` (the weighted
    rule's cut) replaced where given.

    Keys: ``accepted``, ``rejected``, ``needs_adjudication`` (rule-decided samples under the new rule),
    ``kept_lead_decisions`` (samples a lead decided: they keep their decision) and ``would_change``.
    """
    config = _config_with(get_project_config(session), rule, decision_rule, accept_at)
    counts, _ = _what_if(*_settled_reviews(session, lock=False), _decider(session, config))
    return counts


def _check_lead(session: Session, user_id: int, action: str) -> User:
    user = session.get(User, user_id)
    if user is None or not user.active or user.role not in LEAD_ROLES:
        who = f"user {user_id}" if user is None else f"{user.role.value} {user.username!r}"
        raise PermissionError(f"only an active lead or admin may {action}; {who} may not")
    return user


def apply_rule(
    session: Session,
    rule: AcceptanceRule | None,
    actor_id: int,
    *,
    decision_rule: str | None = None,
    accept_at: float | None = None,
) -> dict[str, int]:
    """Store ``rule`` (and ``decision_rule`` / ``accept_at`` where given) in the project settings and re-settle every
    rule-decided sample under them.

    Lead decisions are kept. Returns the counts of :func:`preview_rule` plus ``changed`` (samples whose status
    changed, each with a decision or audit entry naming ``actor_id``). Raises PermissionError unless ``actor_id`` is
    an active lead or admin.
    """
    require_write(session, "changing the acceptance rule")
    _check_lead(session, actor_id, "change the acceptance rule")
    current = get_project_config(session)
    config = _config_with(current, rule, decision_rule, accept_at)
    changes_: dict[str, Any] = {}
    if rule is not None:
        changes_["acceptance"] = rule.model_dump()
    if decision_rule is not None:
        changes_["decision_rule"] = decision_rule
    if accept_at is not None:
        changes_["weighted"] = {"accept_at": accept_at}
    if changes_:
        set_project_config(session, changes_, actor_id=actor_id)
    statuses, answers, lead_ids = _settled_reviews(session, lock=True)
    counts, changes = _what_if(statuses, answers, lead_ids, _decider(session, config))
    _record_changes(session, statuses, changes, actor_id)
    return counts | {"changed": len(changes)}


def _record_changes(
    session: Session,
    statuses: dict[int, SampleStatus],
    changes: dict[int, tuple[RuleResult, dict[str, Any]]],
    actor_id: int | None,
    chunk: int = 500,
) -> None:
    """:func:`_record` for many samples at once: bulk status updates, decision and audit rows."""
    now = utcnow()
    by_status: dict[SampleStatus, list[int]] = defaultdict(list)
    decisions: list[dict[str, Any]] = []
    audits: list[dict[str, Any]] = []
    for sample_id, (result, rule_json) in changes.items():
        new = SampleStatus(result.outcome)
        by_status[new].append(sample_id)
        if new == SampleStatus.needs_adjudication:
            details = {"rule": rule_json, "reason": result.reason, "previous": statuses[sample_id].value}
            audits.append({"user_id": actor_id, "action": NEEDS_ADJUDICATION_ACTION, "entity": "sample",
                           "entity_id": str(sample_id), "details": details, "at": now})
        else:
            decisions.append({"sample_id": sample_id, "outcome": Outcome(new.value), "source": DecisionSource.rule,
                              "rule": rule_json, "decided_by": actor_id, "reason": result.reason,
                              "created_at": now})
    for status, ids in by_status.items():
        for start in range(0, len(ids), chunk):
            session.execute(
                update(Sample)
                .where(Sample.id.in_(ids[start : start + chunk]))
                .values(status=status)
                .execution_options(synchronize_session=False)
            )
    for table, rows in ((Decision, decisions), (AuditLog, audits)):
        for start in range(0, len(rows), chunk):
            session.execute(insert(table), rows[start : start + chunk])


def settle_complete(session: Session) -> int:
    """Settle every open non-gold sample that already has all the reviews it wants (after a lead lowers
    ``reviews_per_sample`` or ``calibration_share``, such samples would otherwise wait in review); returns how many.
    One transaction (rows another writer holds are skipped): needs a write session; the caller commits."""
    require_write(session, "settle_complete")
    config = get_project_config(session)
    submitted = submitted_clause()
    ids = list(
        session.scalars(
            select(Sample.id)
            .where(
                Sample.status.in_(OPEN_STATUSES),
                ~is_gold_clause(Sample.id),
                submitted >= wanted_clause(Sample.id, config, Sample.reviews_target),
                submitted > 0,
            )
            .order_by(Sample.id)
            .with_for_update(skip_locked=True, of=Sample)
        )
    )
    for sample_id in ids:
        settle_sample(session, sample_id, config)
    return len(ids)


def _latest_conflict(session: Session, sample_ids: Sequence[int]) -> dict[int, tuple[str | None, str | None]]:
    """(verdict, reason) of the newest conflict-stage judgement of each sample."""
    out: dict[int, tuple[str | None, str | None]] = {}
    if not sample_ids:
        return out
    rows = session.execute(
        select(MllmJudgement.sample_id, MllmJudgement.verdict, MllmJudgement.rationale)
        .where(MllmJudgement.sample_id.in_(sample_ids), MllmJudgement.stage == MllmStage.conflict)
        .order_by(MllmJudgement.sample_id, MllmJudgement.created_at, MllmJudgement.id)
    )
    for sample_id, verdict, reason in rows:
        out[sample_id] = (verdict, reason)
    return out


@dataclass(frozen=True)
class ReviewSide:
    review_id: int
    reviewer: str
    consistent: bool
    quality: int
    complexity: int
    comment: str | None
    box_corrections: list[dict[str, Any]] | None
    revision: int
    updated_at: datetime


@dataclass(frozen=True)
class AdjudicationItem:
    sample_id: int
    instruction: str
    priority: float
    reviews: list[ReviewSide]
    mllm_verdict: str | None
    mllm_reason: str | None
    why: str  # the rule's reasons for sending it to a lead


def adjudication_queue(session: Session) -> list[AdjudicationItem]:
    """Samples waiting for a lead (status needs_adjudication), highest priority first, every review side by side."""
    config = get_project_config(session)
    samples = list(
        session.scalars(
            select(Sample)
            .where(Sample.status == SampleStatus.needs_adjudication)
            .order_by(Sample.priority.desc(), Sample.id)
        )
    )
    ids = [s.id for s in samples]
    sides: dict[int, list[ReviewSide]] = defaultdict(list)
    if ids:
        rows = session.execute(
            select(Review, User.username)
            .join(User, User.id == Review.user_id)
            .where(Review.sample_id.in_(ids))
            .order_by(Review.sample_id, Review.id)
        )
        for review, username in rows:
            sides[review.sample_id].append(
                ReviewSide(
                    review_id=review.id,
                    reviewer=username,
                    consistent=review.consistent,
                    quality=review.quality,
                    complexity=review.complexity,
                    comment=review.comment,
                    box_corrections=review.box_corrections,
                    revision=review.revision,
                    updated_at=utc(review.updated_at),
                )
            )
    verdicts = _latest_conflict(session, ids)
    items = []
    for sample in samples:
        reviews = sides.get(sample.id, [])
        why = evaluate(reviews, config.acceptance).reason if reviews else "no reviews"
        verdict, reason = verdicts.get(sample.id, (None, None))
        items.append(
            AdjudicationItem(sample.id, sample.instruction, sample.priority, reviews, verdict, reason, why)
        )
    return items


def adjudicate(session: Session, sample_id: int, outcome: str | Outcome, lead_id: int, reason: str) -> int:
    """A lead's accept/reject of a sample, with a required reason; returns the decision id.

    Records who, when and why (``decisions`` row with source lead, and ``audit_log``) and sets the status; the rule
    never overrides it afterwards. Raises PermissionError unless ``lead_id`` is an active lead or admin, and
    AcceptanceError for an empty reason, an unknown outcome or sample, or a gold sample. Needs a write session; the
    caller commits.
    """
    require_write(session, "adjudicate")
    try:
        decided = Outcome(outcome)
    except ValueError:
        raise AcceptanceError(f"outcome must be 'accepted' or 'rejected'; got {outcome!r}") from None
    if not isinstance(reason, str) or not reason.strip():
        raise AcceptanceError("a reason is required to adjudicate a sample")
    _check_lead(session, lead_id, "adjudicate samples")
    sample = session.get(Sample, sample_id, with_for_update=True)
    if sample is None:
        raise AcceptanceError(f"no sample with id {sample_id}")
    if session.get(GoldAnswer, sample_id) is not None:
        raise AcceptanceError(f"sample {sample_id} is a gold sample; edit its gold answer instead")
    decision = Decision(
        sample_id=sample_id,
        outcome=decided,
        source=DecisionSource.lead,
        decided_by=lead_id,
        reason=reason.strip(),
    )
    session.add(decision)
    session.flush()
    session.add(
        AuditLog(
            user_id=lead_id,
            action="sample.adjudicate",
            entity="sample",
            entity_id=str(sample_id),
            details={"outcome": decided.value, "previous": sample.status.value, "decision_id": decision.id},
        )
    )
    sample.status = SampleStatus(decided.value)
    session.flush()
    return decision.id


@dataclass(frozen=True)
class DecisionEntry:
    """One step of a sample's history: a decision (``decision_id`` set) or a move to adjudication (None)."""

    decision_id: int | None
    outcome: str
    source: str
    decided_by: str | None
    reason: str | None
    rule: dict[str, Any] | None
    created_at: datetime


def decision_history(session: Session, sample_id: int) -> list[DecisionEntry]:
    """A sample's decisions and moves to adjudication, oldest first."""
    rows: list[DecisionEntry] = []
    for decision, username in session.execute(
        select(Decision, User.username)
        .outerjoin(User, User.id == Decision.decided_by)
        .where(Decision.sample_id == sample_id)
    ):
        rows.append(
            DecisionEntry(
                decision.id,
                decision.outcome.value,
                decision.source.value,
                username,
                decision.reason,
                decision.rule,
                utc(decision.created_at),
            )
        )
    for entry, username in session.execute(
        select(AuditLog, User.username)
        .outerjoin(User, User.id == AuditLog.user_id)
        .where(
            AuditLog.action == NEEDS_ADJUDICATION_ACTION,
            AuditLog.entity == "sample",
            AuditLog.entity_id == str(sample_id),
        )
    ):
        details = entry.details or {}
        rows.append(
            DecisionEntry(
                None,
                SampleStatus.needs_adjudication.value,
                DecisionSource.rule.value,
                username,
                details.get("reason"),
                details.get("rule"),
                utc(entry.at),
            )
        )
    rows.sort(key=lambda r: (r.created_at, math.inf if r.decision_id is None else r.decision_id))
    return rows
