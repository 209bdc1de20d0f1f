"""Tests for annotate.agreement: published worked examples, cross-checks against reference packages
(krippendorff, statsmodels) on seeded random data, edge cases, and the dashboard helpers and report."""

from __future__ import annotations

import functools
import json
import math
import time

import krippendorff
import numpy as np
import pandas as pd
import pytest
from statsmodels.stats import inter_rater

from mcie.annotate.agreement import (
    AlphaStatistic,
    agreement_report,
    bootstrap_ci,
    cohen_kappa,
    coincidence_matrix,
    confusion,
    fleiss_kappa,
    gold_accuracy,
    krippendorff_alpha,
    leave_one_out_agreement,
    mllm_human_agreement,
    pairwise_cohen_matrix,
    pairwise_shared_counts,
    reliability_matrix,
    score_distribution,
)

nan = np.nan
LEVELS = ["nominal", "ordinal", "interval", "ratio"]

# --- Published data ------------------------------------------------------------------------------
# K. Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", Annenberg School for
# Communication Departmental Papers 43, https://repository.upenn.edu/asc_papers/43 .
# A: binary data, two observers, no missing data (alpha = 0.095).
# B: nominal data, two observers, no missing data, values a-e coded 1-5 (alpha = 0.692).
# C: nominal data, any number of observers, missing data (alpha = 0.743), with the same data also
#    worked at the ordinal (0.815), interval (0.849) and ratio (0.797) levels. The data and values were
#    looked up with the search tool and agree with the doctests of the `krippendorff` package.
KRIPPENDORFF_A = [[0, 1, 0, 0, 0, 0, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]]
KRIPPENDORFF_B = [[1, 1, 2, 2, 4, 3, 3, 3, 5, 4, 4, 1], [2, 1, 2, 2, 2, 3, 3, 3, 5, 4, 4, 4]]
KRIPPENDORFF_C = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
    [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan],
]

# Fleiss (1971) data as worked in Wikipedia's "Fleiss' kappa" article: 10 subjects, 14 raters,
# 5 categories; P-bar = 0.378, P-bar_e = 0.213, kappa = 0.210.
FLEISS_1971 = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def _two_raters(yes_yes: int, yes_no: int, no_yes: int, no_no: int) -> tuple[list[str], list[str]]:
    """Label lists for a 2x2 table (rater A's answer first)."""
    a = ["yes"] * (yes_yes + yes_no) + ["no"] * (no_yes + no_no)
    b = ["yes"] * yes_yes + ["no"] * yes_no + ["yes"] * no_yes + ["no"] * no_no
    return a, b


def _random_reliability(rng: np.random.Generator, missing: float = 0.25) -> np.ndarray:
    raters, units = int(rng.integers(2, 6)), int(rng.integers(3, 40))
    data = rng.integers(1, 6, size=(raters, units)).astype(float)
    data[rng.random(data.shape) < missing] = nan
    return data


def _panel(n_units: int, n_raters: int = 3, noise: float = 0.8, seed: int = 0) -> np.ndarray:
    """Scores 1-5 from a latent per-unit truth plus rater noise (moderate agreement)."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform(1, 5, size=n_units)
    return np.clip(np.rint(truth + rng.normal(0, noise, size=(n_raters, n_units))), 1, 5)


# --- Krippendorff's alpha --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "level", "expected"),
    [
        (KRIPPENDORFF_A, "nominal", 0.095),
        (KRIPPENDORFF_B, "nominal", 0.692),
        (KRIPPENDORFF_C, "nominal", 0.743),
        (KRIPPENDORFF_C, "ordinal", 0.815),
        (KRIPPENDORFF_C, "interval", 0.849),
        (KRIPPENDORFF_C, "ratio", 0.797),
    ],
)
def test_alpha_reproduces_krippendorff_2011(data: list, level: str, expected: float) -> None:
    assert round(krippendorff_alpha(data, level), 3) == expected


def test_coincidence_matrix_matches_krippendorff_2011_example_c() -> None:
    o = coincidence_matrix(KRIPPENDORFF_C)
    t = 1 / 3
    printed = [
        [7, 4 * t, t, t, 0],
        [4 * t, 10, 4 * t, t, 0],
        [t, 4 * t, 8, t, 0],
        [t, t, t, 4, 0],
        [0, 0, 0, 0, 3],
    ]
    np.testing.assert_allclose(o.to_numpy(), printed)
    np.testing.assert_allclose(o.sum(axis=1), [9, 13, 10, 5, 3])  # n = 40: unit 12 is not pairable
    # nominal alpha from the printed matrix: 1 - (n - 1) * off-diagonal / (n^2 - sum n_c^2)
    assert krippendorff_alpha(KRIPPENDORFF_C) == pytest.approx(1 - 39 * 8 / (40**2 - 384))


@pytest.mark.parametrize("level", LEVELS)
def test_alpha_matches_krippendorff_package_on_random_missing_data(level: str) -> None:
    rng = np.random.default_rng(20240611)
    compared = 0
    for _ in range(60):
        data = _random_reliability(rng)
        try:
            expected = krippendorff.alpha(reliability_data=data, level_of_measurement=level)
        except ValueError:  # the package refuses data with a single distinct value
            continue
        ours = krippendorff_alpha(data, level)
        if np.isnan(expected):
            assert np.isnan(ours)
        else:
            assert ours == pytest.approx(float(expected), abs=1e-9)
            compared += 1
    assert compared >= 50


@pytest.mark.parametrize("level", LEVELS)
def test_alpha_perfect_agreement_is_one(level: str) -> None:
    data = [[1, 2, 3, 4, 5, nan], [1, 2, 3, 4, 5, 2], [nan, 2, 3, 4, 5, 2]]
    assert krippendorff_alpha(data, level) == pytest.approx(1.0)


@pytest.mark.parametrize("level", LEVELS)
def test_alpha_systematic_disagreement_is_negative(level: str) -> None:
    data = [[1, 5, 1, 5, 1, 5], [5, 1, 5, 1, 5, 1]]
    assert krippendorff_alpha(data, level) < 0


def test_alpha_ignores_unpairable_units() -> None:
    base = krippendorff_alpha(KRIPPENDORFF_C, "ordinal")
    extra = np.hstack([np.array(KRIPPENDORFF_C), [[nan, 7], [4, nan], [nan, nan], [nan, nan]]])
    assert krippendorff_alpha(extra, "ordinal") == pytest.approx(base)


@pytest.mark.parametrize(
    "data",
    [
        [[3, 3, 3], [3, 3, nan]],  # a single distinct value: no expected disagreement
        [[1, nan, 2], [nan, 3, nan]],  # no unit has two values
        [[nan, nan], [nan, nan]],
        np.empty((2, 0)),
    ],
)
def test_alpha_degenerate_inputs_are_nan(data: object) -> None:
    for level in LEVELS:
        assert math.isnan(krippendorff_alpha(data, level))


def test_alpha_accepts_labels_none_and_dataframes_for_nominal() -> None:
    letters = [["abcde"[int(v) - 1] if v == v else None for v in row] for row in KRIPPENDORFF_C]
    assert krippendorff_alpha(letters, "nominal") == pytest.approx(krippendorff_alpha(KRIPPENDORFF_C))
    frame = pd.DataFrame(KRIPPENDORFF_C, index=list("ABCD"))
    assert krippendorff_alpha(frame, "interval") == pytest.approx(krippendorff_alpha(KRIPPENDORFF_C, "interval"))
    booleans = [[True, False, True, None], [True, False, False, True]]
    assert krippendorff_alpha(booleans) == pytest.approx(krippendorff_alpha([[1, 0, 1, nan], [1, 0, 0, 1]]))


@pytest.mark.parametrize(
    ("data", "level", "message"),
    [
        (KRIPPENDORFF_C, "binary", "level must be one of"),
        ([1, 2, 3], "nominal", "2-D"),
        ([[1, 2], [1]], "nominal", "2-D|rectangular"),
        ([[1, -2], [1, -2]], "ratio", "non-negative"),
        ([["a", "b"], ["a", "c"]], "ordinal", "numeric values"),
        ([[1, np.inf], [1, 2]], "interval", "finite"),
    ],
)
def test_alpha_rejects_bad_input(data: object, level: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        krippendorff_alpha(data, level)  # type: ignore[arg-type]


# --- Bootstrap ---------------------------------------------------------------------------------------


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_units() -> None:
    small, large = _panel(60, seed=1), _panel(600, seed=2)
    widths = []
    for data in (small, large):
        alpha = krippendorff_alpha(data, "ordinal")
        low, high = bootstrap_ci(AlphaStatistic("ordinal"), data, n_boot=500, seed=3)
        assert low < alpha < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(10) expected


@pytest.mark.parametrize("level", LEVELS)
def test_bootstrap_fast_path_equals_generic_resampling(level: str) -> None:
    data = _panel(80, seed=4)
    data[np.random.default_rng(5).random(data.shape) < 0.2] = nan
    fast = bootstrap_ci(AlphaStatistic(level), data, n_boot=200, seed=7)
    generic = bootstrap_ci(lambda x: krippendorff_alpha(x, level), data, n_boot=200, seed=7)
    partial = bootstrap_ci(functools.partial(krippendorff_alpha, level=level), data, n_boot=200, seed=7)
    np.testing.assert_allclose(fast, generic, atol=1e-12)
    np.testing.assert_allclose(fast, partial, atol=1e-12)


def test_bootstrap_is_seeded_and_fast() -> None:
    data = _panel(300, seed=8)
    start = time.perf_counter()
    first = bootstrap_ci(AlphaStatistic("ordinal"), data, n_boot=1000, seed=11)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0
    assert bootstrap_ci(AlphaStatistic("ordinal"), data, n_boot=1000, seed=11) == first
    assert bootstrap_ci(AlphaStatistic("ordinal"), data, n_boot=1000, seed=12) != first
    assert bootstrap_ci(krippendorff_alpha, data, n_boot=50) == bootstrap_ci(AlphaStatistic(), data, n_boot=50)


def test_bootstrap_generic_statistic_and_degenerate_data() -> None:
    data = _panel(50, seed=9)
    low, high = bootstrap_ci(lambda x: float(np.nanmean(x)), data, n_boot=300, level=0.9)
    assert low < float(np.nanmean(data)) < high
    assert all(math.isnan(v) for v in bootstrap_ci(AlphaStatistic(), [[2, 2, 2], [2, 2, 2]], n_boot=20))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n_boot": 0}, "n_boot"), ({"level": 1.0}, "level"), ({"level": 0}, "level")],
)
def test_bootstrap_rejects_bad_parameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(AlphaStatistic(), KRIPPENDORFF_C, **kwargs)


def test_alpha_statistic_rejects_unknown_level() -> None:
    with pytest.raises(ValueError, match="level must be one of"):
        AlphaStatistic("likert")  # type: ignore[arg-type]


# --- Fleiss' kappa -------------------------------------------------------------------------------------


def test_fleiss_reproduces_the_1971_worked_example() -> None:
    assert round(fleiss_kappa(FLEISS_1971), 3) == 0.210


def test_fleiss_matches_statsmodels_on_random_tables() -> None:
    rng = np.random.default_rng(31)
    for _ in range(30):
        subjects, categories, raters = int(rng.integers(2, 30)), int(rng.integers(2, 6)), int(rng.integers(2, 9))
        probs = rng.dirichlet(np.ones(categories))
        table = np.array([rng.multinomial(raters, probs) for _ in range(subjects)])
        if np.count_nonzero(table.sum(axis=0)) < 2:
            continue
        assert fleiss_kappa(table) == pytest.approx(inter_rater.fleiss_kappa(table, method="fleiss"), abs=1e-12)


def test_fleiss_edge_cases() -> None:
    assert fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)
    assert math.isnan(fleiss_kappa([[3, 0], [3, 0]]))  # one category: chance agreement is perfect
    assert math.isnan(fleiss_kappa(np.zeros((0, 3))))
    assert math.isnan(fleiss_kappa([[1, 0], [0, 1]]))  # one rating per subject
    with pytest.raises(ValueError, match="same number of ratings"):
        fleiss_kappa([[2, 1], [1, 1]])
    with pytest.raises(ValueError, match="non-negative integer"):
        fleiss_kappa([[2, -1], [1, 0]])
    with pytest.raises(ValueError, match="2-D"):
        fleiss_kappa([1, 2, 3])


# --- Cohen's kappa -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cells", "expected"),
    [
        # Wikipedia, "Cohen's kappa": 50 grant proposals, p_o = 0.70, p_e = 0.50, kappa = 0.40
        ((20, 5, 10, 15), 0.4),
        # same article, equal agreement p_o = 0.60 but different marginals: 0.1304 and 0.2593
        ((45, 15, 25, 15), 0.1304),
        ((25, 35, 5, 35), 0.2593),
    ],
)
def test_cohen_reproduces_published_examples(cells: tuple[int, int, int, int], expected: float) -> None:
    a, b = _two_raters(*cells)
    assert cohen_kappa(a, b) == pytest.approx(expected, abs=5e-5)


def test_cohen_drops_missing_pairs() -> None:
    a, b = _two_raters(20, 5, 10, 15)
    assert cohen_kappa([*a, None, "yes", nan], [*b, "no", None, "yes"]) == pytest.approx(0.4)


@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
def test_cohen_matches_statsmodels_on_random_scores(weights: str | None) -> None:
    rng = np.random.default_rng(41)
    for _ in range(25):
        n = int(rng.integers(10, 80))
        a = rng.integers(1, 6, size=n)
        b = np.clip(a + rng.integers(-2, 3, size=n), 1, 5)
        table = pd.crosstab(a, b).reindex(index=range(1, 6), columns=range(1, 6), fill_value=0).to_numpy()
        reference = inter_rater.cohens_kappa(table, wt=weights, weights=np.arange(1, 6) if weights else None)
        assert cohen_kappa(a, b, weights) == pytest.approx(reference.kappa, abs=1e-10)


def test_weighted_cohen_uses_score_values_not_category_ranks() -> None:
    a = [1, 2, 5, 5, 2, 1, 5, 2, 2, 1]  # scores 3 and 4 never used
    b = [2, 2, 5, 1, 1, 1, 2, 5, 1, 2]
    full = pd.crosstab(pd.Series(a), pd.Series(b)).reindex(index=range(1, 6), columns=range(1, 6), fill_value=0)
    by_value = inter_rater.cohens_kappa(full.to_numpy(), wt="linear").kappa
    by_rank = inter_rater.cohens_kappa(pd.crosstab(pd.Series(a), pd.Series(b)).to_numpy(), wt="linear").kappa
    assert cohen_kappa(a, b, "linear") == pytest.approx(by_value)
    assert by_value != pytest.approx(by_rank)


def test_cohen_edge_cases_and_errors() -> None:
    assert cohen_kappa([1, 2, 3], [1, 2, 3], "quadratic") == pytest.approx(1.0)
    assert math.isnan(cohen_kappa(["x", "x"], ["x", "x"]))
    assert math.isnan(cohen_kappa([None], [1]))
    assert cohen_kappa([True, False, True], [1, 0, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same units"):
        cohen_kappa([1, 2], [1])
    with pytest.raises(ValueError, match="numeric labels"):
        cohen_kappa(["a", "b"], ["a", "a"], "linear")
    with pytest.raises(ValueError, match="weights must be"):
        cohen_kappa([1, 2], [1, 2], "cubic")  # type: ignore[arg-type]


# --- Per-rater diagnostics -------------------------------------------------------------------------------


def _long(rows: dict[str, dict[str, object]]) -> pd.DataFrame:
    """{rater: {unit: value}} -> long ratings."""
    return pd.DataFrame([{"unit": u, "rater": r, "value": v} for r, units in rows.items() for u, v in units.items()])


def test_reliability_matrix_and_duplicates() -> None:
    ratings = _long({"a": {"u1": 3, "u2": 4}, "b": {"u2": 5}})
    wide = reliability_matrix(ratings)
    assert wide.shape == (2, 2) and math.isnan(wide.loc["b", "u1"]) and wide.loc["b", "u2"] == 5
    with pytest.raises(ValueError, match="duplicate"):
        reliability_matrix(pd.concat([ratings, ratings.iloc[:1]]))
    with pytest.raises(ValueError, match="missing columns"):
        reliability_matrix(ratings.rename(columns={"value": "score"}))


def test_pairwise_cohen_matrix() -> None:
    rng = np.random.default_rng(51)
    units = [f"s{i}" for i in range(30)]
    truth = rng.integers(1, 6, size=30)
    rows = {
        r: {u: int(np.clip(t + rng.integers(-1, 2), 1, 5)) for u, t in zip(units, truth, strict=True)}
        for r in ("a", "b", "c")
    }
    rows["d"] = {u: 3 for u in units[:4]}  # shares only four units with everyone
    ratings = _long(rows)
    matrix = pairwise_cohen_matrix(ratings, weights="linear", min_shared=5)
    assert list(matrix.index) == ["a", "b", "c", "d"]
    np.testing.assert_allclose(matrix.to_numpy(), matrix.to_numpy().T, equal_nan=True)
    assert np.isnan(np.diag(matrix)).all() and matrix["d"].isna().all()
    a = [rows["a"][u] for u in units]
    c = [rows["c"][u] for u in units]
    assert matrix.loc["a", "c"] == pytest.approx(cohen_kappa(a, c, "linear"))
    shared = pairwise_shared_counts(ratings)
    assert shared.loc["a", "b"] == 30 and shared.loc["a", "d"] == 4 and shared.loc["d", "d"] == 4
    with pytest.raises(ValueError, match="min_shared"):
        pairwise_cohen_matrix(ratings, min_shared=0)


def test_leave_one_out_nominal_uses_majority_of_others_and_skips_ties() -> None:
    ratings = _long(
        {
            "a": {"u1": True, "u2": False, "u3": True, "u4": True},
            "b": {"u1": True, "u2": True, "u3": False, "u4": False},
            "c": {"u1": True, "u2": True, "u3": True},
        }
    )
    out = leave_one_out_agreement(ratings, "nominal").set_index("rater")
    # a: u1 agrees (T,T), u2 disagrees (T,T), u3 others tie (F,T), u4 disagrees (F)
    assert out.loc["a", ["n_units", "n_ties"]].tolist() == [3, 1]
    assert out.loc["a", "agreement"] == pytest.approx(1 / 3)
    # c: u1 agrees, u2 and u3 tie, u4 not rated
    assert out.loc["c", ["n_units", "n_ties"]].tolist() == [1, 2]
    assert out.loc["c", "agreement"] == pytest.approx(1.0)
    assert out["mean_abs_diff"].isna().all()


def test_leave_one_out_ordinal_uses_median_of_others() -> None:
    ratings = _long({"a": {"u1": 5, "u2": 4, "u3": 5}, "b": {"u1": 3, "u2": 2, "u3": 4}, "c": {"u1": 3, "u2": 3}})
    out = leave_one_out_agreement(ratings, "ordinal").set_index("rater")
    # a vs medians 3, 2.5, 4 -> diffs +2, +1.5, +1 (lenient)
    assert out.loc["a", "bias"] == pytest.approx(1.5) and out.loc["a", "agreement"] == 0
    # b vs medians 4, 3.5, 5 -> diffs -1, -1.5, -1 (harsh)
    assert out.loc["b", "bias"] == pytest.approx(-7 / 6) and out.loc["b", "mean_abs_diff"] == pytest.approx(7 / 6)
    # c vs medians 4, 3 -> diffs -1, 0
    assert out.loc["c", "n_units"] == 2 and out.loc["c", "agreement"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="level must be one of"):
        leave_one_out_agreement(ratings, "interval")  # type: ignore[arg-type]


def test_score_distribution_flags_harsh_rater() -> None:
    ratings = _long({"a": {"u1": 1, "u2": 2, "u3": 2}, "b": {"u1": 4, "u2": 5, "u3": 5, "u4": None}})
    out = score_distribution(ratings, levels=[1, 2, 3, 4, 5]).set_index("rater")
    assert out.loc["a", "n"] == 3 and out.loc["b", "n"] == 3
    assert out.loc["a", "mean"] == pytest.approx(5 / 3) and out.loc["a", "sd"] == pytest.approx(
        np.std([1, 2, 2], ddof=1)
    )
    assert out.loc["a", "mean_vs_overall"] == pytest.approx(5 / 3 - 19 / 6)
    assert out.loc["b", ["n_1", "n_2", "n_3", "n_4", "n_5"]].tolist() == [0, 0, 0, 1, 2]


def test_gold_accuracy() -> None:
    gold = pd.DataFrame(
        {"sample_id": ["g1", "g2"], "consistent": [True, False], "quality": [4, 2], "complexity": [3, None]}
    )
    reviews = pd.DataFrame(
        {
            "sample_id": ["g1", "g2", "g1", "s9"],
            "rater": ["a", "a", "b", "c"],
            "consistent": [True, False, False, True],
            "quality": [5, 2, 4, 3],
            "complexity": [3, 4, 1, 3],
        }
    )
    out = gold_accuracy(reviews, gold).set_index("rater")
    assert list(out.index) == ["a", "b"]  # c reviewed no gold sample
    # a: g1 (T, 5 vs 4, 3 vs 3) and g2 (F, 2 vs 2, gold has no complexity)
    assert out.loc["a"].tolist() == pytest.approx([2, 1.0, 0.5, 1.0, 0.5, 0.0])
    assert out.loc["b", ["consistent_accuracy", "quality_accuracy", "complexity_accuracy"]].tolist() == [0, 1, 0]
    assert out.loc["b", "complexity_bias"] == -2
    lenient = gold_accuracy(reviews, gold, tolerance=1).set_index("rater")
    assert lenient.loc["a", "quality_accuracy"] == 1.0 and lenient.loc["b", "complexity_accuracy"] == 0.0
    with pytest.raises(ValueError, match="tolerance"):
        gold_accuracy(reviews, gold, tolerance=-1)
    with pytest.raises(ValueError, match="duplicate sample_id"):
        gold_accuracy(reviews, pd.concat([gold, gold]))


# --- MLLM filter vs humans, aggregation ------------------------------------------------------------------


def test_confusion_and_mllm_agreement() -> None:
    conflict = [True, True, False, False, False, None]
    consistent = [False, True, True, True, False, True]
    table = confusion(conflict, consistent)
    assert table.loc["conflict"].tolist() == [1, 1] and table.loc["no conflict"].tolist() == [1, 2]
    summary = mllm_human_agreement(conflict, consistent)
    assert summary["n"] == 5 and summary["agreement"] == pytest.approx(0.6)
    assert summary["kappa"] == pytest.approx((0.6 - 0.52) / (1 - 0.52))  # p_e = .6 * .6 + .4 * .4
    with pytest.raises(ValueError, match="same samples"):
        confusion([True], [True, False])
    with pytest.raises(ValueError, match="booleans"):
        confusion(["yes"], [True])


# --- Report --------------------------------------------------------------------------------------------


def _reviews() -> pd.DataFrame:
    rows = [
        ("s1", "a", True, 4, 3),
        ("s1", "b", True, 4, 3),
        ("s1", "c", True, 5, 3),
        ("s2", "a", False, 2, 4),
        ("s2", "b", False, 2, 5),
        ("s2", "c", True, 2, 4),
        ("s3", "a", True, 5, 2),
        ("s3", "b", False, 4, 2),
        ("s4", "a", True, 3, 1),  # single review: not in the agreement figures
        ("s5", "b", False, 1, 5),
        ("s5", "c", False, 1, None),
    ]
    return pd.DataFrame(rows, columns=["sample_id", "rater", "consistent", "quality", "complexity"])


def test_agreement_report_on_hand_made_reviews() -> None:
    reviews = _reviews()
    report = agreement_report(reviews, n_boot=300, seed=1)
    json.dumps(report, allow_nan=False)  # plain JSON: no NaN, no numpy types
    assert (report["n_reviews"], report["n_samples"], report["n_raters"]) == (11, 5, 3)

    consistency = report["questions"]["consistency"]
    # units s1 TTT, s2 FFT, s3 TF, s5 FF: o_FF = o_TT = 3, o_FT = o_TF = 2, n_F = n_T = 5
    assert consistency["alpha"] == pytest.approx(1 - 9 * 4 / 50)
    assert consistency["observed_agreement"] == pytest.approx(0.6)
    # modal count: two units with 3 ratings and two with 2 -> the larger, 3 (s1, s2): kappa = 0.25
    assert (consistency["fleiss_ratings_per_unit"], consistency["fleiss_n_units"]) == (3, 2)
    assert consistency["fleiss_kappa"] == pytest.approx(0.25)
    assert (consistency["n_units"], consistency["n_raters"], consistency["n_ratings"]) == (4, 3, 10)
    low, high = consistency["alpha_ci"]
    assert low <= consistency["alpha"] <= high

    for name, column in (("quality", "quality"), ("complexity", "complexity")):
        wide = reviews.pivot(index="rater", columns="sample_id", values=column).astype(float)
        wide = wide.loc[:, wide.notna().sum() >= 2]
        expected = krippendorff.alpha(reliability_data=wide.to_numpy(), level_of_measurement="ordinal")
        assert report["questions"][name]["alpha"] == pytest.approx(expected)
        assert report["questions"][name]["level"] == "ordinal"
    assert report["questions"]["quality"]["n_units"] == 4
    assert report["questions"]["complexity"]["n_units"] == 3  # s5 has one complexity score


def test_agreement_report_degenerate_values_are_none() -> None:
    reviews = _reviews().assign(quality=4)
    report = agreement_report(reviews, n_boot=0)
    quality = report["questions"]["quality"]
    assert quality["alpha"] is None and quality["fleiss_kappa"] is None and quality["alpha_ci"] is None
    assert quality["observed_agreement"] == 1.0
    empty = agreement_report(_reviews().iloc[[0, 3, 6]], n_boot=10)  # every sample reviewed once
    assert empty["questions"]["consistency"]["alpha"] is None
    assert empty["questions"]["consistency"]["alpha_ci"] == [None, None]
    assert empty["questions"]["consistency"]["n_units"] == 0
    json.dumps(empty, allow_nan=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quality": [7] + [4] * 10}, "quality must be scores"),
        ({"consistent": ["yes"] + [True] * 10}, "booleans"),
    ],
)
def test_agreement_report_rejects_bad_reviews(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        agreement_report(_reviews().assign(**change), n_boot=0)
    with pytest.raises(ValueError, match="duplicate"):
        agreement_report(pd.concat([_reviews(), _reviews().iloc[:1]]), n_boot=0)
    with pytest.raises(ValueError, match="missing columns"):
        agreement_report(_reviews().drop(columns="complexity"), n_boot=0)
