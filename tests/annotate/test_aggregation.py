"""annotate.aggregation: majority and median per sample, and the two threshold comparisons ("above" is strict,
"at least" is not), as the acceptance rule, the dashboard and the export filter use them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mcie.annotate.aggregation import (
    AggregationError,
    above,
    aggregate,
    aggregate_consistency,
    aggregate_score,
    at_least,
    majority,
)


def _reviews(*answers: tuple[bool, int, int]) -> list[dict[str, object]]:
    return [{"consistent": c, "quality": q, "complexity": x} for c, q, x in answers]


def test_aggregation_rules() -> None:
    assert aggregate_consistency([True, True, False]) is True
    assert aggregate_consistency([None, False]) is False
    assert aggregate_consistency([True, False]) is None  # tie: undecided
    assert aggregate_consistency([]) is None
    assert aggregate_consistency(np.array([1.0, np.nan, 0.0, 1.0])) is True
    assert (majority(2, 1), majority(0, 3), majority(1, 1)) == (True, False, None)
    assert aggregate_score([3, 4]) == 3.5
    assert aggregate_score([None, 2, 4, 5]) == 4.0
    assert math.isnan(aggregate_score([None]))
    with pytest.raises(ValueError, match="booleans"):
        aggregate_consistency(["yes"])
    with pytest.raises(ValueError, match="numeric"):
        aggregate_score(["high"])
    with pytest.raises(ValueError, match="finite"):
        aggregate_score([3, math.inf])


def test_aggregate() -> None:
    agg = aggregate(_reviews((True, 2, 4), (False, 3, 5), (True, 5, 5), (True, 4, 1)))
    assert (agg.n, agg.consistent, agg.n_consistent) == (4, True, 3)
    assert (agg.quality, agg.complexity, agg.spread_quality, agg.spread_complexity) == (3.5, 4.5, 3, 4)
    assert aggregate(_reviews((True, 4, 4), (False, 4, 4))).consistent is None  # a tie
    empty = aggregate([])
    assert empty.n == 0 and empty.consistent is None and math.isnan(empty.quality)
    with pytest.raises(AggregationError, match="review 0: quality must be an integer 1-5; got 7"):
        aggregate(_reviews((True, 7, 4)))
    with pytest.raises(AggregationError, match="review 1: consistent must be True or False"):
        aggregate([*_reviews((True, 4, 4)), {"consistent": 1, "quality": 4, "complexity": 5}])


def test_above_is_strict_and_at_least_is_not() -> None:
    assert above(3.5, 3) and not above(3.0, 3) and not above(None, 3) and not above(math.nan, 0)
    assert at_least(3.0, 3) and at_least(4, 3) and not at_least(2.5, 3)
    assert at_least(None, None) and not at_least(None, 1) and not at_least(math.nan, 1)
