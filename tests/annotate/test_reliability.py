"""The reliability model (annotate.reliability): validated against crowd-kit's Dawid-Skene and simulated raters with
known bias and noise; reports, flags, posteriors and the adaptive policy's pure rules."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from crowdkit.aggregation import DawidSkene

from mcie.annotate.reliability import (
    MIN_FLAG_ITEMS,
    ReliabilityError,
    ReliabilityFit,
    adaptive_gold_rate,
    adaptive_next,
    default_fit,
    disagrees_with_mllm,
    expected_wrong,
    fit_ordinal_rater,
    fit_reliability,
    followup_priority,
    ordinal_matrix,
    posterior_accept,
)

SCORE_P = (0.05, 0.15, 0.30, 0.30, 0.20)


def simulate(n: int = 600, per_item: int = 3, seed: int = 0, n_gold: int = 40):
    """Raters with known parameters: (name, p_correct consistency, score bias, score sd, random)."""
    rng = np.random.default_rng(seed)
    raters = [(f"good{k}", 0.9, 0.0, 0.5, False) for k in range(6)]
    raters += [("high", 0.9, 1.0, 0.5, False), ("low", 0.9, -1.0, 0.5, False), ("careless", 0.5, 0.0, 0.5, True)]
    consistent = rng.random(n) < 0.7
    quality = rng.choice(np.arange(1, 6), size=n, p=SCORE_P)
    complexity = rng.choice(np.arange(1, 6), size=n, p=SCORE_P)
    rows = []
    for i in range(n):
        for r in rng.choice(len(raters), per_item, replace=False):
            name, acc, bias, sd, random_ = raters[r]
            if random_:
                c, q, x = bool(rng.random() < 0.5), int(rng.integers(1, 6)), int(rng.integers(1, 6))
            else:
                c = bool(consistent[i]) if rng.random() < acc else not consistent[i]
                q, x = (int(np.clip(np.rint(v + bias + rng.normal(0, sd)), 1, 5)) for v in (quality[i], complexity[i]))
            rows.append({"sample_id": i + 1, "rater": name, "consistent": c, "quality": q, "complexity": x})
    gold = pd.DataFrame({"sample_id": np.arange(1, n_gold + 1), "consistent": consistent[:n_gold],
                         "quality": quality[:n_gold], "complexity": complexity[:n_gold]})
    truth = {"consistent": consistent, "quality": quality, "complexity": complexity}
    return pd.DataFrame(rows), gold, truth


@pytest.fixture(scope="module")
def simulated():
    reviews, gold, truth = simulate()
    return reviews, gold, truth, fit_reliability(reviews, gold)


def test_ordinal_matrix_is_a_likelihood_and_bias_shifts_it() -> None:
    lik = ordinal_matrix(0.0, 0.5, 0.0)
    assert lik.shape == (5, 5)
    np.testing.assert_allclose(lik.sum(axis=1), 1.0)
    assert np.argmax(lik[2]) == 2  # an unbiased rater answers the truth most often
    assert np.argmax(ordinal_matrix(1.0, 0.5, 0.0)[2]) == 3  # biased +1: one level higher
    np.testing.assert_allclose(ordinal_matrix(0.0, 0.5, 1.0), 0.2)  # fully careless: uniform


def test_ordinal_rater_fit_recovers_known_parameters() -> None:
    rng = np.random.default_rng(3)
    true = rng.choice(5, size=4000, p=SCORE_P)
    lik = ordinal_matrix(0.8, 0.6, 0.1)
    observed = np.array([rng.choice(5, p=lik[z]) for z in true])
    counts = np.zeros((5, 5))
    np.add.at(counts, (true, observed), 1.0)
    bias, sigma, careless = fit_ordinal_rater(counts)
    assert bias == pytest.approx(0.8, abs=0.08)
    assert sigma == pytest.approx(0.6, abs=0.08)
    assert careless == pytest.approx(0.1, abs=0.04)


def test_ordinal_model_agrees_with_crowdkit_five_level_dawid_skene(simulated) -> None:
    """Where raters follow the ordinal model, the constrained model and crowd-kit's unconstrained five-level
    Dawid-Skene find the same true scores, and ours is at least as close to the truth."""
    reviews, _, truth, fit = simulated
    data = reviews.rename(columns={"sample_id": "task", "rater": "worker", "quality": "label"})
    ds_labels = DawidSkene(n_iter=100).fit_predict(data[["task", "worker", "label"]])
    lik = {r: np.asarray(fit.questions["quality"].likelihood[r]) for r in fit.questions["quality"].likelihood}
    prior = np.asarray(fit.questions["quality"].prior)
    ours = {}
    for sample_id, group in reviews.groupby("sample_id"):
        answers = zip(group["rater"], group["quality"], strict=True)
        log_post = np.log(prior) + sum(np.log(lik[r][:, q - 1]) for r, q in answers)
        ours[sample_id] = int(np.argmax(log_post)) + 1
    ids = sorted(ours)
    mine = np.array([ours[i] for i in ids])
    theirs = ds_labels.loc[ids].to_numpy()
    true = truth["quality"][np.array(ids) - 1]
    assert np.mean(mine == theirs) > 0.8
    assert np.mean(mine == true) >= np.mean(theirs == true) - 0.01
    assert np.mean(mine == true) > 0.8


def test_consistency_matrices_come_from_crowdkit_dawid_skene(simulated) -> None:
    reviews, gold, _, fit = simulated
    data = reviews.rename(columns={"sample_id": "task", "rater": "worker", "consistent": "label"})
    data = data.assign(label=data["label"].astype(int))
    true_labels = gold.set_index("sample_id")["consistent"].astype(int)
    ds = DawidSkene(n_iter=50, tol=1e-4).fit(data[["task", "worker", "label"]], true_labels=true_labels)
    for rater in ("good0", "high", "careless"):
        ours = np.asarray(fit.questions["consistency"].likelihood[rater])  # [true, observed]
        theirs = ds.errors_.loc[rater].reindex(index=[0, 1], columns=[0, 1]).to_numpy().T
        np.testing.assert_allclose(ours, theirs, atol=0.03)
    assert fit.questions["consistency"].likelihood["good0"][1][1] == pytest.approx(0.9, abs=0.05)
    assert fit.questions["consistency"].likelihood["careless"][1][1] == pytest.approx(0.5, abs=0.1)


def test_reports_rank_the_careless_rater_last_and_flag_biased_raters(simulated) -> None:
    _, _, _, fit = simulated
    by_name = {r["rater"]: r for r in fit.reports}
    careless = by_name["careless"]
    assert careless["rank"] == len(fit.reports)
    assert careless["flags"][0]["flag"] == "careless"
    assert "95% interval" in careless["flags"][0]["evidence"]
    high_flags = {(f["flag"], f["question"]) for f in by_name["high"]["flags"]}
    assert {("biased_high", "quality"), ("biased_high", "complexity")} <= high_flags
    assert ("biased_low", "quality") in {(f["flag"], f["question"]) for f in by_name["low"]["flags"]}
    assert by_name["high"]["questions"]["quality"]["model"]["bias"] == pytest.approx(1.0, abs=0.2)
    for name in ("good0", "good1", "good2"):
        entry = by_name[name]
        assert entry["flags"] == []
        low, high = entry["questions"]["consistency"]["skill_ci"]
        assert low < entry["questions"]["consistency"]["skill"] < high
        assert entry["skill"] > 0.5


def test_few_checked_samples_are_never_flagged() -> None:
    reviews, gold, _ = simulate(n=40, per_item=2, n_gold=0, seed=1)
    fit = fit_reliability(reviews, gold)
    for report in fit.reports:
        if report["n_samples"] < MIN_FLAG_ITEMS:
            assert report["flags"] == []


def test_single_reviews_do_not_make_a_rater_look_perfect() -> None:
    """Samples with one review are not evidence about their rater (EM would call every answer right)."""
    reviews = pd.DataFrame([{"sample_id": i, "rater": "solo", "consistent": i % 2 == 0, "quality": 1 + i % 5,
                             "complexity": 3} for i in range(1, 200)])
    fit = fit_reliability(reviews)
    solo = fit.reports[0]
    assert solo["n_samples"] == 0 and solo["skill"] is None
    np.testing.assert_allclose(fit.questions["consistency"].likelihood["solo"], [[0.85, 0.15], [0.15, 0.85]])


def test_posterior_weighs_reliable_raters_and_uses_the_mllm_prior(simulated) -> None:
    _, _, _, fit = simulated
    good = {"consistent": True, "quality": 5, "complexity": 5}
    rule = {"quality_above": 3, "complexity_above": 3}
    p_good = posterior_accept(fit, [{"rater": "good0", **good}], **rule).p_accept
    p_careless = posterior_accept(fit, [{"rater": "careless", **good}], **rule).p_accept
    assert p_good > 0.6 and p_good > p_careless + 0.2
    # a biased-high rater's 4 is weaker evidence of quality > 3 than a good rater's 4
    four = {"consistent": True, "quality": 4, "complexity": 5}
    assert (posterior_accept(fit, [{"rater": "high", **four}], **rule).p_quality
            < posterior_accept(fit, [{"rater": "good0", **four}], **rule).p_quality)
    fit.mllm = type("Prior", (), {"p_consistent": staticmethod(lambda x: 0.05 if x > 0.5 else 0.95)})()
    with_conflict = posterior_accept(fit, [{"rater": "good0", **good}], mllm_score=0.9, **rule)
    without = posterior_accept(fit, [{"rater": "good0", **good}], mllm_score=0.9, use_mllm=False, **rule)
    assert with_conflict.p_consistent < without.p_consistent
    fit.mllm = None
    not_required = posterior_accept(fit, [{"rater": "good0", **good}], require_consistent=False, **rule)
    assert not_required.p_accept == pytest.approx(not_required.p_quality * not_required.p_complexity)


def test_unknown_raters_and_the_default_fit_use_the_default_rater() -> None:
    fit = default_fit()
    p = posterior_accept(fit, [{"rater": 99, "consistent": True, "quality": 5, "complexity": 5}],
                         quality_above=3, complexity_above=3)
    assert 0.5 < p.p_accept < 1


def test_fit_round_trips_through_json(simulated) -> None:
    import json

    _, _, _, fit = simulated
    again = ReliabilityFit.from_json(json.loads(json.dumps(fit.to_json())))
    answers = [{"rater": "good1", "consistent": True, "quality": 4, "complexity": 4}]
    assert posterior_accept(again, answers, quality_above=3, complexity_above=3) == posterior_accept(
        fit, answers, quality_above=3, complexity_above=3
    )


def test_mllm_prior_is_calibrated_from_the_consensus() -> None:
    reviews, gold, truth = simulate(n=400, seed=2)
    rng = np.random.default_rng(5)
    z = rng.normal(np.where(truth["consistent"], -1.0, 1.0), 1.0)
    scores = {i + 1: float(1 / (1 + np.exp(-v))) for i, v in enumerate(z)}
    fit = fit_reliability(reviews, gold, scores)
    assert fit.mllm is not None and fit.mllm.slope < 0  # a higher conflict score: less likely consistent
    assert fit.mllm.p_consistent(0.1) > fit.mllm.p_consistent(0.9)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"sample_id": [1], "rater": ["a"], "consistent": [True]}), "lacks column"),
        (pd.DataFrame({"sample_id": [1], "rater": ["a"], "consistent": [True], "quality": [7], "complexity": [3]}),
         "quality must be an integer score 1-5"),
        (pd.DataFrame({"sample_id": [1, 1], "rater": ["a", "a"], "consistent": [True, True], "quality": [3, 3],
                       "complexity": [3, 3]}), "duplicate"),
    ],
)
def test_bad_input_names_the_problem(frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(ReliabilityError, match=message):
        fit_reliability(frame)


def test_adaptive_rules() -> None:
    assert adaptive_next(0.5, 1, band=(0.2, 0.8), cap=3)
    assert not adaptive_next(0.5, 3, band=(0.2, 0.8), cap=3)  # at the cap
    assert not adaptive_next(0.9, 1, band=(0.2, 0.8), cap=3)  # sure enough
    assert disagrees_with_mllm(0.9, [True]) and not disagrees_with_mllm(0.9, [False])
    assert not disagrees_with_mllm(None, [True])
    plain = followup_priority(0.3, disagreement=False, p_accept=0.5)
    assert plain > 1.0  # above every fresh sample (pipeline priorities lie in [0, 1])
    assert followup_priority(0.3, disagreement=True, p_accept=0.5) > plain
    assert followup_priority(0.3, disagreement=False, p_accept=0.7) < plain
    assert expected_wrong([0.9, 0.2], [True, False]) == pytest.approx(0.3)


def test_adaptive_gold_rate_follows_uncertainty() -> None:
    assert adaptive_gold_rate(0.05, None) == pytest.approx(0.15)  # unknown rater: three times
    sure = {"n_samples": 200, "skill": 0.8, "questions": {"consistency": {"skill_ci": [0.75, 0.85]}}}
    unsure = {"n_samples": 30, "skill": 0.6, "questions": {"consistency": {"skill_ci": [0.2, 0.9]}}}
    assert adaptive_gold_rate(0.05, sure) == pytest.approx(0.025)
    assert adaptive_gold_rate(0.05, unsure) > adaptive_gold_rate(0.05, sure)
    assert adaptive_gold_rate(0.05, sure, previous_skill=0.95) == pytest.approx(0.05)  # falling: doubled
    assert adaptive_gold_rate(0.4, None) == 0.5
    assert not math.isnan(adaptive_gold_rate(0.05, sure))


def test_the_mllm_score_is_its_confidence_in_its_verdict() -> None:
    from mcie.annotate.reliability_service import conflict_score

    assert conflict_score("conflict", 0.9) == pytest.approx(0.9)
    assert conflict_score("no_conflict", 0.9) == pytest.approx(0.1)
    assert (conflict_score("conflict", None), conflict_score("no_conflict", None)) == (1.0, 0.0)
    assert conflict_score("unparseable", 0.8) is None and conflict_score(None, None) is None
    assert conflict_score("conflict", 7.0) == 1.0  # out of range: the bare verdict
