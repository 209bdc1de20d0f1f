"""Study analysis: hand-computed tiny cases, Bradley-Terry against a direct likelihood fit, and simulated studies
with known strengths, position bias, inattentive and fast participants."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from scipy.optimize import minimize

from mcie.annotate.study_analysis import (
    VOTE_COLUMNS,
    attention_failures,
    bradley_terry,
    check_votes,
    choice_shares,
    fast_participants,
    plot_position_bias,
    plot_shares,
    plot_strengths,
    plot_win_matrix,
    position_bias,
    preferred_methods,
    results,
    win_matrix,
)
from mcie.annotate.study_design import design

METHODS = ("mcie-e1", "smartedit", "mgie", "ip2p", "ultraedit")


def simulate(
    strengths: dict[str, Sequence[float]],
    *,
    n_participants: int = 50,
    n_items: int = 400,
    per: int = 100,
    seed: int = 0,
    position_weights: Sequence[float] | None = None,
    none_weight: float = 0.0,
    n_attention: int = 0,
    inattentive: Sequence[int] = (),
    fast: Sequence[int] = (),
    participant_strengths: dict[int, Sequence[float]] | None = None,
) -> pd.DataFrame:
    """Votes of a study laid out by :func:`design`, drawn from Luce's choice model: on a screen showing methods
    ``order``, position ``j`` is chosen with probability proportional to ``strength[order[j]] * position_weight[j]``
    and "none" with probability proportional to ``none_weight``. Attention items (answer: the first method) are
    answered right by attentive participants and at random by the inattentive ones."""
    m = len(next(iter(strengths.values())))
    methods = METHODS[:m]
    layout = design(
        n_items + n_attention, m, n_participants, per, seed, attention_items=range(n_items, n_items + n_attention)
    )
    screens = [(p, s) for p, seq in enumerate(layout.sequences) for s in seq]
    participant = np.array([p for p, _ in screens])
    order = np.array([s.order for _, s in screens])
    attention = np.array([s.attention for _, s in screens])
    careless = np.isin(participant, list(inattentive))
    bias = np.ones(m) if position_weights is None else np.asarray(position_weights, dtype=float)
    rng = np.random.default_rng(seed + 1)
    latency = rng.lognormal(np.log(np.where(np.isin(participant, list(fast)), 700.0, 6000.0)), 0.3)
    frames = []
    for criterion, st in strengths.items():
        table = np.tile(np.asarray(st, dtype=float), (n_participants, 1))
        for p, own in (participant_strengths or {}).items():
            table[p] = own
        weights = np.hstack([table[participant[:, None], order] * bias, np.full((len(order), 1), none_weight)])
        weights[attention & ~careless] = np.hstack([order == 0, np.zeros((len(order), 1))])[attention & ~careless]
        weights[attention & careless] = np.append(np.ones(m), 0.0)
        cumulative = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
        picked = np.minimum((cumulative < rng.random(len(order))[:, None]).sum(axis=1), m)
        frames.append(
            pd.DataFrame(
                {
                    "participant": participant,
                    "item": [s.item for _, s in screens],
                    "criterion": criterion,
                    "chosen_method": [
                        None if k == m else methods[row[k]] for k, row in zip(picked, order, strict=True)
                    ],
                    "shown_order": [[methods[i] for i in row] for row in order],
                    "latency_ms": latency,
                    "is_attention": attention,
                    "attention_answer": [methods[0] if a else None for a in attention],
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _centred_log(strengths: Sequence[float]) -> np.ndarray:
    log = np.log(np.asarray(strengths, dtype=float))
    return log - log.mean()


def _tiny() -> pd.DataFrame:
    rows = [
        ("p1", "i1", "instruction", "A", ["A", "B", "C"]),  # A beats B, A beats C
        ("p1", "i2", "instruction", "C", ["B", "C"]),  # C beats B
        ("p1", "i3", "instruction", "C", ["C", "A", "B"]),  # C beats A, C beats B
        ("p2", "i1", "instruction", None, ["C", "A", "B"]),  # none acceptable: no wins
        ("p2", "i2", "instruction", "B", ["A", "B", "C"]),  # B beats A, B beats C
        ("p2", "i3", "instruction", "B", ["B", "A"]),  # B beats A
    ]
    frame = pd.DataFrame(rows, columns=["participant", "item", "criterion", "chosen_method", "shown_order"])
    return frame.assign(latency_ms=[900.0, 1200, 1500, 5000, 6000, 7000], is_attention=False, attention_answer=None)


# ----------------------------------------------------------------------------------------------------------
# hand-computed


def test_hand_computed_win_matrix_shares_and_preferences() -> None:
    votes = _tiny()
    wins = win_matrix(votes)
    expected = [[0, 1, 1], [2, 0, 1], [1, 2, 0]]  # rows: winner A, B, C; columns: loser A, B, C
    assert wins.to_numpy().tolist() == expected
    assert list(wins.index) == list(wins.columns) == ["A", "B", "C"]
    assert choice_shares(votes).to_dict() == {"A": 1 / 6, "B": 2 / 6, "C": 2 / 6}
    assert preferred_methods(votes).to_dict() == {"p1": "C", "p2": "B"}
    res = results(votes, n_boot=0)["by_criterion"]["instruction"]
    assert res["win_matrix"]["wins"] == expected
    assert res["win_matrix"]["win_rate"][1][0] == pytest.approx(2 / 3)
    assert res["none_share"] == pytest.approx(1 / 6)
    assert {m: v["share"] for m, v in res["preferred"].items()} == {"A": 0.0, "B": 0.5, "C": 0.5}
    assert res["shares"]["A"]["ci"] is None  # n_boot=0
    assert res["position_bias"]["chosen"] == [3, 2, 0] and res["position_bias"]["n_screens"] == [5, 5, 3]
    assert res["position_bias"]["expected"] == pytest.approx([1 / 3 + 1 / 2 + 1 / 3 + 1 / 3 + 1 / 2] * 2 + [1])


def test_ties_at_the_top_mean_no_preference() -> None:
    votes = _tiny()
    votes.loc[2, "chosen_method"] = "A"  # p1 now chose A twice and C once; p2 chose B twice
    votes.loc[4, "chosen_method"] = "C"  # p2: C once, B once: a tie
    assert preferred_methods(votes).to_dict() == {"p1": "A", "p2": None}
    res = results(votes, n_boot=0)["by_criterion"]["instruction"]
    assert res["preferred"]["A"]["share"] == 0.5 and res["undecided_share"] == 0.5


def test_bradley_terry_two_methods_closed_form_and_normalisation() -> None:
    strengths = bradley_terry(pd.DataFrame([[0, 3], [1, 0]], index=["a", "b"], columns=["a", "b"]))
    assert strengths["a"] / strengths["b"] == pytest.approx(3.0)
    assert strengths["a"] * strengths["b"] == pytest.approx(1.0)  # geometric mean 1


def test_bradley_terry_matches_a_direct_likelihood_maximisation() -> None:
    rng = np.random.default_rng(4)
    wins = rng.integers(1, 30, size=(5, 5)).astype(float)
    np.fill_diagonal(wins, 0)
    ours = np.log(bradley_terry(wins))

    def negative_log_likelihood(free: np.ndarray) -> float:
        theta = np.append(free, -free.sum())
        diff = theta[:, None] - theta[None, :]
        return float((wins * np.logaddexp(0.0, -diff)).sum())

    direct = minimize(negative_log_likelihood, np.zeros(4), method="BFGS", options={"gtol": 1e-10})
    reference = np.append(direct.x, -direct.x.sum())
    assert ours == pytest.approx(reference, abs=1e-5)
    assert ours.sum() == pytest.approx(0.0, abs=1e-9)


def test_bradley_terry_is_undefined_when_a_method_never_wins() -> None:
    wins = np.array([[0, 2, 1], [1, 0, 3], [0, 0, 0]], dtype=float)
    assert np.isnan(bradley_terry(wins)).all()
    votes = _tiny()
    votes = votes[votes["chosen_method"] != "A"]  # A never wins
    res = results(votes, n_boot=50)
    bt = res["by_criterion"]["instruction"]["bradley_terry"]
    assert bt["exists"] is False and bt["strengths"]["A"]["strength"] is None
    json.dumps(res, allow_nan=False)


# ----------------------------------------------------------------------------------------------------------
# simulated studies


def test_simulated_study_recovers_known_strengths() -> None:
    """The paper's size: 50 participants x 100 of 400 items, 5 methods, two criteria, some "none" votes.

    Tolerance: 0.15 on log-strengths (each method has >= ~400 first choices, so a standard error <= ~0.05) and
    0.03 on choice shares.
    """
    truth = {"instruction": [4.0, 2.0, 1.0, 1.0, 0.5], "background": [1.0, 1.5, 2.0, 1.0, 0.8]}
    none_weight = 0.4
    votes = simulate(truth, none_weight=none_weight, seed=21)
    res = results(votes, n_boot=300, seed=1)
    assert res["n_participants"] == 50 and res["n_votes"] == 50 * 100 * 2
    for criterion, st in truth.items():
        block = res["by_criterion"][criterion]
        estimated = [block["bradley_terry"]["strengths"][m]["log_strength"] for m in METHODS]
        assert estimated == pytest.approx(_centred_log(st), abs=0.15)
        expected_share = np.asarray(st) / (sum(st) + none_weight)
        assert [block["shares"][m]["share"] for m in METHODS] == pytest.approx(expected_share, abs=0.03)
        assert block["none_share"] == pytest.approx(none_weight / (sum(st) + none_weight), abs=0.03)
        counts = np.array([block["shares"][m]["n_chosen"] for m in METHODS], dtype=float)
        # every screen shows every method: BT strengths are proportional to the first choices
        assert estimated == pytest.approx(_centred_log(counts), abs=1e-6)
    assert res["by_criterion"]["instruction"]["preferred"]["mcie-e1"]["share"] > 0.9


def test_bootstrap_intervals_cover_the_truth() -> None:
    """Over 40 small simulated studies the 95% intervals (participant bootstrap) cover the true log-strengths and
    shares about 95% of the time: at least 85% of the 160 intervals, and they are not absurdly wide."""
    truth = [3.0, 1.5, 1.0, 0.6]
    shares_truth = np.asarray(truth) / (sum(truth) + 0.3)
    covered_bt, covered_share, widths = [], [], []
    for rep in range(40):
        votes = simulate({"instruction": truth}, n_participants=20, n_items=60, per=30, seed=100 + rep, none_weight=0.3)
        block = results(votes, n_boot=200, seed=rep)["by_criterion"]["instruction"]
        for k, method in enumerate(METHODS[:4]):
            low, high = np.log(block["bradley_terry"]["strengths"][method]["ci"])
            covered_bt.append(low <= _centred_log(truth)[k] <= high)
            widths.append(high - low)
            low, high = block["shares"][method]["ci"]
            covered_share.append(low <= shares_truth[k] <= high)
    assert np.mean(covered_bt) >= 0.85 and np.mean(covered_share) >= 0.85
    assert np.mean(widths) < 0.6


def test_the_share_of_participants_preferring_a_method() -> None:
    """The paper's "80% of participants": 40 of 50 simulated participants favour mcie-e1, 10 favour ip2p."""
    contrarians = {p: [0.5, 1.0, 1.0, 6.0, 1.0] for p in range(40, 50)}
    votes = simulate({"instruction": [6.0, 1.0, 1.0, 0.5, 1.0]}, participant_strengths=contrarians, seed=5)
    block = results(votes, n_boot=300)["by_criterion"]["instruction"]
    regular = votes[~votes["is_attention"]]
    tops = regular.groupby("participant")["chosen_method"].agg(lambda s: s.value_counts().idxmax())
    assert block["preferred"]["mcie-e1"]["share"] == pytest.approx((tops == "mcie-e1").mean()) == pytest.approx(0.8)
    assert block["preferred"]["ip2p"]["share"] == pytest.approx(0.2)
    low, high = block["preferred"]["mcie-e1"]["ci"]
    assert low < 0.8 < high


def test_position_bias_is_detected_only_when_present() -> None:
    truth = {"instruction": [2.0, 1.0, 1.0, 0.7, 0.5]}
    biased = simulate(truth, n_participants=30, n_items=120, per=60, seed=8, position_weights=[1.8, 1, 1, 1, 1])
    unbiased = simulate(truth, n_participants=30, n_items=120, per=60, seed=9)
    found = position_bias(biased)
    assert found["p_value"] < 1e-6 and found["df"] == 4
    assert found["chosen"][0] == max(found["chosen"]) and found["rate"][0] > 0.25
    clean = position_bias(unbiased)
    assert clean["p_value"] > 0.01
    assert sum(clean["chosen"]) == pytest.approx(sum(clean["expected"]))


def test_exclusion_is_applied_before_every_figure() -> None:
    votes = simulate({"instruction": [3.0, 1.0, 1.0, 1.0, 1.0]}, n_participants=20, n_items=40, per=20, seed=3)
    rogue = votes["participant"] < 5
    votes.loc[rogue, "chosen_method"] = "ultraedit"  # five participants always pick the weakest method
    excluded = set(range(5))
    full = results(votes, n_boot=100, seed=2)
    cleaned = results(votes, exclude=excluded, n_boot=100, seed=2)
    dropped = results(votes[~rogue], n_boot=100, seed=2)
    assert (full["n_participants"], cleaned["n_participants"], cleaned["n_participants_total"]) == (20, 15, 20)
    assert cleaned["excluded"] == [0, 1, 2, 3, 4]
    assert cleaned["by_criterion"] == dropped["by_criterion"]
    before, after = full["by_criterion"]["instruction"], cleaned["by_criterion"]["instruction"]
    for key in ("shares", "win_matrix", "bradley_terry", "preferred", "position_bias"):
        assert before[key] != after[key], key
    assert after["shares"]["ultraedit"]["share"] < before["shares"]["ultraedit"]["share"]
    flagged = {r["participant"]: r["excluded"] for r in cleaned["quality"]["participants"]}
    assert len(flagged) == 20 and sum(flagged.values()) == 5  # the quality table still lists everyone


def test_attention_failures_and_fast_participants_are_found() -> None:
    votes = simulate(
        {"instruction": [2.0, 1.0, 1.0], "background": [1.0, 1.0, 2.0]},
        n_participants=16,
        n_items=30,
        per=12,
        seed=12,
        n_attention=3,
        inattentive=(3, 11),
        fast=(5,),
    )
    res = results(votes, n_boot=0)
    assert res["quality"]["failed_attention"] == [3, 11]
    assert res["quality"]["fast"] == [5] == fast_participants(votes)
    assert fast_participants(votes, min_median_latency_ms=0) == []
    table = attention_failures(votes)
    assert (table["n_checks"] == 6).all() and set(table.index[table["n_failed"] > 0]) == {3, 11}
    assert (attention_failures(votes, criteria=["background"])["n_checks"] == 3).all()
    assert res["n_votes_analysed"] == 16 * 12 * 2  # attention votes stay out of the figures
    record = next(r for r in res["quality"]["participants"] if r["participant"] == 5)
    assert record["fast"] and record["median_latency_ms"] < 2000 and record["attention_checks"] == 6


def test_results_are_json_ready_and_deterministic() -> None:
    votes = simulate({"instruction": [2.0, 1.0, 1.0]}, n_participants=8, n_items=12, per=6, seed=1, none_weight=1)
    votes["shown_order"] = [np.array(o) for o in votes["shown_order"]]  # as read back from Parquet
    first = results(votes, n_boot=50, seed=4)
    assert json.loads(json.dumps(first, allow_nan=False)) == first
    assert results(votes, n_boot=50, seed=4) == first
    assert results(votes, n_boot=50, seed=5) != first


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v.drop(columns=["latency_ms"]), "missing the column"),
        (lambda v: v.assign(chosen_method=["D", *v["chosen_method"][1:]]), "row 0: chosen_method 'D'"),
        (lambda v: pd.concat([v, v.iloc[:1]]), "duplicate"),
        (lambda v: v.assign(latency_ms=[-1.0, *v["latency_ms"][1:]]), "latency_ms is negative"),
        (lambda v: v.assign(shown_order=["ABC", *v["shown_order"][1:]]), "row 0: shown_order"),
    ],
)
def test_invalid_votes_are_refused_naming_the_problem(change, message) -> None:
    with pytest.raises(ValueError, match=message):
        results(change(_tiny()), n_boot=0)


def test_single_criterion_helpers_refuse_mixed_criteria() -> None:
    votes = pd.concat([_tiny(), _tiny().assign(criterion="background")])
    assert set(check_votes(votes).columns) == set(VOTE_COLUMNS)
    with pytest.raises(ValueError, match="select one criterion"):
        win_matrix(votes)


def test_plots_show_the_results() -> None:
    votes = simulate({"instruction": [2.0, 1.0, 1.0, 0.5]}, n_participants=10, n_items=20, per=10, seed=2)
    res = results(votes, n_boot=100)
    block, methods = res["by_criterion"]["instruction"], res["methods"]
    assert methods == sorted(METHODS[:4])
    shares = plot_shares(res, "instruction")
    assert isinstance(shares, go.Figure) and list(shares.data[0].x) == methods
    assert list(shares.data[0].y) == [block["shares"][m]["share"] for m in methods]
    first = block["shares"][methods[0]]
    assert shares.data[0].error_y.array[0] == pytest.approx(first["ci"][1] - first["share"])
    preferred = plot_shares(res, "instruction", what="preferred")
    assert list(preferred.data[0].y) == [block["preferred"][m]["share"] for m in methods]
    strengths = plot_strengths(res, "instruction")
    assert math.prod(strengths.data[0].y) == pytest.approx(1.0)
    heatmap = plot_win_matrix(res, "instruction")
    assert [list(row) for row in heatmap.data[0].z] == block["win_matrix"]["win_rate"]
    bias = plot_position_bias(res, "instruction")
    assert list(bias.data[0].y) == block["position_bias"]["chosen"] and list(bias.data[0].x) == ["A", "B", "C", "D"]
    with pytest.raises(ValueError, match="no criterion 'colour'"):
        plot_shares(res, "colour")
