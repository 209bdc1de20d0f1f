"""How a sample's expert reviews aggregate, and what "above" and "at least" a threshold mean: the one home of both.

A sample's reviews become one line (:func:`aggregate`): the majority consistency verdict (:func:`majority`; None on
a tie, e.g. one yes and one no, so the sample is undecided), the median quality and complexity (3 and 4 give 3.5;
NaN without reviews) and their spreads (max - min). The acceptance rule (:mod:`annotate.acceptance`), the weighted
rule (:mod:`annotate.reliability`), the dashboard (:mod:`annotate.dashboard_data`) and the export records and filter
(:mod:`exports.records`, :mod:`exports.select`) all aggregate through here.

Two comparisons, named so, because the paper and a dataset user ask different questions:

* :func:`above`: strictly greater. MCIE section 3.1 keeps a sample whose quality and complexity are rated *above* 3,
  so a median of exactly 3 fails; the project's ``AcceptanceRule.quality_above`` / ``complexity_above`` use it.
* :func:`at_least`: greater or equal. The export filter's ``min_quality`` / ``min_complexity`` ("give me samples
  of median quality 4 or more") use it.

A missing aggregate (no reviews: None or NaN) is never above nor at least anything.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class AggregationError(ValueError):
    """A review whose answers are not a yes/no consistency and 1-5 integer scores; the message names which."""


@dataclass(frozen=True)
class Aggregate:
    """A sample's reviews in one line: count, majority consistency (None on a tie), median scores and their spreads."""

    n: int
    consistent: bool | None
    quality: float
    complexity: float
    spread_quality: int
    spread_complexity: int
    n_consistent: int = 0  # reviewers who answered "yes"


def _missing(x: object) -> bool:
    return x is None or (isinstance(x, float | np.floating) and math.isnan(x))


def majority(yes: int, no: int) -> bool | None:
    """The majority verdict of ``yes`` and ``no`` answers; None on a tie (including no answer at all)."""
    return None if yes == no else yes > no


def aggregate_consistency(values: Sequence[bool | None] | Any) -> bool | None:
    """Majority verdict of the consistency answers of one sample (None/NaN ignored; None on a tie or no answer)."""
    yes = no = 0
    for k, x in enumerate(list(values)):
        if _missing(x):
            continue
        if not isinstance(x, numbers.Real | np.bool_) or float(x) not in (0.0, 1.0):
            raise ValueError(f"values must hold booleans (True/False, 1/0) or None; got {x!r} at position {k}")
        yes, no = (yes + 1, no) if float(x) == 1.0 else (yes, no + 1)
    return majority(yes, no)


def aggregate_score(values: Sequence[float | None] | Any) -> float:
    """Median of one sample's scores (None/NaN ignored); NaN if there is none.

    With an even number of scores the median can fall between levels (3 and 4 -> 3.5).
    """
    present: list[float] = []
    for k, x in enumerate(list(values)):
        if _missing(x):
            continue
        if not isinstance(x, numbers.Real | np.bool_) or math.isinf(float(x)):
            raise ValueError(f"values must be finite numeric scores (None/NaN for missing); got {x!r} at position {k}")
        present.append(float(x))
    return float(np.median(present)) if present else math.nan


def _field(review: Any, name: str) -> Any:
    return review[name] if isinstance(review, Mapping) else getattr(review, name)


def answers(reviews: Sequence[Any]) -> tuple[list[bool], list[int], list[int]]:
    """The consistency, quality and complexity answers of ``reviews`` (objects or mappings with those fields),
    checked: consistency True/False, scores integers 1-5 (:class:`AggregationError` naming the review otherwise)."""
    consistent, quality, complexity = [], [], []
    for k, review in enumerate(reviews):
        c, q, x = _field(review, "consistent"), _field(review, "quality"), _field(review, "complexity")
        if not isinstance(c, bool):
            raise AggregationError(f"review {k}: consistent must be True or False; got {c!r}")
        for name, v in (("quality", q), ("complexity", x)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 5:
                raise AggregationError(f"review {k}: {name} must be an integer 1-5; got {v!r}")
        consistent.append(c)
        quality.append(q)
        complexity.append(x)
    return consistent, quality, complexity


def aggregate(reviews: Sequence[Any]) -> Aggregate:
    """Aggregate reviews (objects or mappings with ``consistent``, ``quality``, ``complexity``).

    No reviews gives n = 0, consistency None and NaN medians.
    """
    consistent, quality, complexity = answers(reviews)
    return Aggregate(
        n=len(consistent),
        consistent=aggregate_consistency(consistent),
        quality=aggregate_score(quality),
        complexity=aggregate_score(complexity),
        spread_quality=max(quality) - min(quality) if quality else 0,
        spread_complexity=max(complexity) - min(complexity) if complexity else 0,
        n_consistent=sum(consistent),
    )


def above(value: float | None, threshold: float) -> bool:
    """The acceptance rule's "above": ``value > threshold``, strictly; a missing value (None/NaN) is not above."""
    return value is not None and not math.isnan(value) and value > threshold


def at_least(value: float | None, minimum: float | None) -> bool:
    """The export filter's minimum: ``value >= minimum``; no minimum keeps everything, a missing value fails one."""
    if minimum is None:
        return True
    return value is not None and not math.isnan(value) and value >= minimum
