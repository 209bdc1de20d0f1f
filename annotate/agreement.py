"""Inter-rater agreement statistics for the MCIE expert review (issue 4).

The review app has 20 experts rate each candidate sample on instruction consistency (yes/no), image
quality (1-5) and editing-scenario complexity (1-5); a calibration share of samples gets three
independent reviews. This module turns those reviews into the reliability figures the leads report:
Krippendorff's alpha (with a unit-bootstrap confidence interval), Fleiss' and Cohen's kappa, per-rater
diagnostics (pairwise kappa, leave-one-out agreement, gold accuracy, score distributions), the
MLLM-vs-human conflict confusion table, and a JSON-ready summary (``agreement_report``) for the
dashboard and ``mcie agreement --json``. How one sample's reviews aggregate lives in :mod:`annotate.aggregation`.

Everything here is pure: numpy/pandas in, floats or DataFrames out, no I/O and no database.

Conventions
-----------
* *Reliability data* is a raters x units matrix (list of lists, numpy array or DataFrame) with NaN or
  None for "this rater did not rate this unit".
* *Long ratings* are a DataFrame with the columns ``unit``, ``rater`` and ``value`` (one row per
  rating; a rater rates a unit at most once).
* Undefined statistics are NaN, never an exception: alpha with fewer than two pairable values or a
  single observed value, kappa when chance agreement is already perfect, and so on. Malformed input
  (wrong shape, unknown level, non-numeric scores, negative counts ...) raises ``ValueError`` saying
  what was expected.

Krippendorff's alpha follows K. Krippendorff, "Computing Krippendorff's Alpha-Reliability" (2011):
coincidences within units, ``alpha = 1 - (n - 1) * sum(o_ck * delta_ck) / sum(n_c * n_k * delta_ck)``,
with the nominal, ordinal (rank-based, from the pairable values' marginals), interval and ratio
difference functions.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

Level = Literal["nominal", "ordinal", "interval", "ratio"]
KappaWeights = Literal["linear", "quadratic"] | None

LEVELS: tuple[str, ...] = ("nominal", "ordinal", "interval", "ratio")
KAPPA_WEIGHTS: tuple[str | None, ...] = (None, "linear", "quadratic")
LONG_COLUMNS: tuple[str, str, str] = ("unit", "rater", "value")
REVIEW_COLUMNS: tuple[str, ...] = ("sample_id", "rater", "consistent", "quality", "complexity")
SCORE_LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5)
# (question name in the report, review column, level of measurement)
QUESTIONS: tuple[tuple[str, str, Level], ...] = (
    ("consistency", "consistent", "nominal"),
    ("quality", "quality", "ordinal"),
    ("complexity", "complexity", "ordinal"),
)

_BOOT_CHUNK_CELLS = 2_000_000  # resample-by-unit cells held in memory at once


# --------------------------------------------------------------------------------------------------
# Input validation helpers
# --------------------------------------------------------------------------------------------------


def _check_level(level: str, allowed: Sequence[str] = LEVELS) -> None:
    if level not in allowed:
        raise ValueError(f"level must be one of {', '.join(map(repr, allowed))}; got {level!r}")


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real | np.bool_)


def _is_missing(x: object) -> bool:
    if x is None or x is pd.NA or x is pd.NaT:
        return True
    return isinstance(x, float | np.floating) and math.isnan(x)


def _as_2d(reliability_data: ArrayLike | pd.DataFrame) -> NDArray[Any]:
    """Reliability data as a 2-D numpy array (raters x units), numeric if possible, else object."""
    if isinstance(reliability_data, pd.DataFrame):
        arr = reliability_data.to_numpy()
    else:
        try:
            arr = np.asarray(reliability_data)
        except ValueError as exc:  # ragged lists
            raise ValueError("reliability_data must be a rectangular raters x units array (NaN for missing)") from exc
    if arr.ndim != 2:
        raise ValueError(f"reliability_data must be 2-D (raters x units); got an array of shape {arr.shape}")
    return arr


def _numeric_matrix(arr: NDArray[Any], what: str) -> NDArray[np.float64] | None:
    """``arr`` as floats with NaN for missing; None if some present value is not a number."""
    if arr.dtype.kind in "biuf":
        out = arr.astype(np.float64)
    else:
        flat = arr.ravel()
        if any(not _is_missing(x) and not _is_number(x) for x in flat):
            return None
        out = np.array([np.nan if _is_missing(x) else float(x) for x in flat], dtype=np.float64)
        out = out.reshape(arr.shape)
    if np.isinf(out).any():
        raise ValueError(f"{what} must be finite numbers or NaN for missing; found infinity")
    return out


def _value_counts(reliability_data: ArrayLike | pd.DataFrame, level: str) -> tuple[NDArray[Any], NDArray[np.float64]]:
    """Distinct values (sorted where possible) and the units x values count matrix."""
    _check_level(level)
    arr = _as_2d(reliability_data)
    numeric = _numeric_matrix(arr, "reliability_data")
    if numeric is not None:
        present = ~np.isnan(numeric)
        unit_idx = np.nonzero(present)[1]
        labels, codes = np.unique(numeric[present], return_inverse=True)
        if level == "ratio" and (labels < 0).any():
            raise ValueError("level 'ratio' needs non-negative values (a ratio scale has a true zero)")
    else:
        if level != "nominal":
            raise ValueError(f"level {level!r} needs numeric values; use level 'nominal' for labels")
        present = ~np.vectorize(_is_missing, otypes=[bool])(arr) if arr.size else np.zeros(arr.shape, bool)
        unit_idx = np.nonzero(present)[1]
        codes, uniques = pd.factorize(pd.Series(arr[present], dtype=object), sort=False)
        labels = np.asarray(uniques, dtype=object)
    n_units, n_values = arr.shape[1], len(labels)
    flat = np.bincount(unit_idx * n_values + codes, minlength=n_units * n_values)
    return labels, flat.reshape(n_units, n_values).astype(np.float64)


# --------------------------------------------------------------------------------------------------
# Krippendorff's alpha
# --------------------------------------------------------------------------------------------------


def _fixed_delta(labels: NDArray[Any], level: str) -> NDArray[np.float64]:
    """Squared difference function for the nominal, interval and ratio levels."""
    if level == "nominal":
        return 1.0 - np.eye(len(labels))
    v = labels.astype(np.float64)
    diff = v[:, None] - v[None, :]
    if level == "interval":
        return diff**2
    total = v[:, None] + v[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(total == 0, 0.0, diff / np.where(total == 0, 1.0, total))
    return ratio**2


def _ordinal_delta(marginals: NDArray[np.float64]) -> NDArray[np.float64]:
    """Ordinal difference for each row of value marginals ``n_c`` (shape B x V -> B x V x V).

    ``delta(c, k) = (sum_{g=c..k} n_g - (n_c + n_k) / 2) ** 2`` which equals ``(M_k - M_c) ** 2`` with
    the mid-rank ``M_g = cumsum(n)_g - n_g / 2``.
    """
    mid = np.cumsum(marginals, axis=1) - marginals / 2.0
    return (mid[:, :, None] - mid[:, None, :]) ** 2


def _alpha_from_counts(
    counts: NDArray[np.float64], labels: NDArray[Any], level: str, weights: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Alpha for each row of unit multiplicities ``weights`` (B x N) over ``counts`` (N x V).

    Row b of ``weights`` says how many times each unit enters the data set b, so the plain estimate
    is ``weights = ones((1, N))`` and a bootstrap resample is a row of multinomial counts.
    """
    m = counts.sum(axis=1)
    pairable = m >= 2
    n_boot = weights.shape[0]
    if not pairable.any():
        return np.full(n_boot, np.nan)
    counts, weights = counts[pairable], weights[:, pairable]
    inv = 1.0 / (m[pairable] - 1.0)
    marginals = weights @ counts  # n_c per data set, B x V
    n = marginals.sum(axis=1)
    if level == "ordinal":
        delta = _ordinal_delta(marginals)
        v = counts.shape[1]
        per_unit = ((counts * inv[:, None])[:, :, None] * counts[:, None, :]).reshape(len(counts), v * v)
        coincidences = (weights @ per_unit).reshape(n_boot, v, v)  # diagonal is ignored: delta_cc = 0
        observed = np.einsum("bck,bck->b", coincidences, delta)
        expected = np.einsum("bc,bck,bk->b", marginals, delta, marginals)
    else:
        delta = _fixed_delta(labels, level)
        per_unit = inv * np.einsum("nc,ck,nk->n", counts, delta, counts)
        observed = weights @ per_unit
        expected = np.einsum("bc,ck,bk->b", marginals, delta, marginals)
    out = np.full(n_boot, np.nan)
    ok = (expected > 0) & (n >= 2)
    out[ok] = 1.0 - (n[ok] - 1.0) * observed[ok] / expected[ok]
    return out


def krippendorff_alpha(reliability_data: ArrayLike | pd.DataFrame, level: Level = "nominal") -> float:
    """Krippendorff's alpha of a raters x units matrix (NaN or None = missing).

    ``level`` is "nominal", "ordinal", "interval" or "ratio". Nominal data may be any hashable labels;
    the other levels need numbers (ratio: non-negative). Units with fewer than two values are not
    pairable and are ignored. Returns NaN when alpha is undefined: no pairable unit, or a single
    distinct value among the pairable values (no expected disagreement).
    """
    labels, counts = _value_counts(reliability_data, level)
    return float(_alpha_from_counts(counts, labels, level, np.ones((1, len(counts))))[0])


def coincidence_matrix(reliability_data: ArrayLike | pd.DataFrame) -> pd.DataFrame:
    """Krippendorff's coincidence matrix ``o_ck`` (values x values) over the pairable units.

    ``o_ck = sum_u (number of c-k pairs in unit u) / (m_u - 1)``; its margins are the pairable-value
    counts ``n_c``. Values that occur only in unpairable units are kept as zero rows/columns.
    """
    labels, counts = _value_counts(reliability_data, "nominal")
    m = counts.sum(axis=1)
    keep = m >= 2
    c, inv = counts[keep], 1.0 / (m[keep] - 1.0)
    o = (c * inv[:, None]).T @ c - np.diag((c * inv[:, None]).sum(axis=0))
    return pd.DataFrame(o, index=pd.Index(labels, name="value"), columns=pd.Index(labels, name="value"))


@dataclass(frozen=True)
class AlphaStatistic:
    """Krippendorff's alpha at a fixed level, as a statistic for ``bootstrap_ci``.

    Calling it is ``krippendorff_alpha(data, level)``; ``bootstrap_ci`` recognises it (and
    ``krippendorff_alpha`` itself or a ``functools.partial`` of it fixing ``level``) and evaluates all
    resamples at once from the per-unit value counts instead of re-running alpha 1000 times.
    """

    level: Level = "nominal"

    def __post_init__(self) -> None:
        _check_level(self.level)

    def __call__(self, reliability_data: ArrayLike | pd.DataFrame) -> float:
        return krippendorff_alpha(reliability_data, self.level)


def _alpha_level_of(statistic: Callable[..., float]) -> str | None:
    """The alpha level if ``statistic`` is a recognised alpha statistic, else None."""
    if isinstance(statistic, AlphaStatistic):
        return statistic.level
    if statistic is krippendorff_alpha:
        return "nominal"
    if (
        isinstance(statistic, functools.partial)
        and statistic.func is krippendorff_alpha
        and not statistic.args
        and set(statistic.keywords) <= {"level"}
    ):
        level = statistic.keywords.get("level", "nominal")
        _check_level(level)
        return level
    return None


def _resample_multiplicities(rng: np.random.Generator, n_units: int, n_boot: int) -> Iterator[NDArray[np.int64]]:
    """Chunks of bootstrap resamples of unit indices (each row: n_units draws with replacement)."""
    chunk = max(1, _BOOT_CHUNK_CELLS // max(n_units, 1))
    done = 0
    while done < n_boot:
        size = min(chunk, n_boot - done)
        yield rng.integers(0, n_units, size=(size, n_units))
        done += size


def _percentile_interval(estimates: NDArray[np.float64], level: float) -> tuple[float, float]:
    valid = estimates[np.isfinite(estimates)]
    if valid.size == 0 or valid.size * 2 < estimates.size:
        return (math.nan, math.nan)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(valid, [tail, 1.0 - tail])
    return (float(low), float(high))


def bootstrap_ci(
    statistic: Callable[[NDArray[Any]], float],
    reliability_data: ArrayLike | pd.DataFrame,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic`` resampling units (columns).

    Each of the ``n_boot`` resamples draws as many units as there are columns, with replacement, and
    evaluates ``statistic`` on the resulting raters x units array. Alpha statistics (``AlphaStatistic``,
    ``krippendorff_alpha``, ``functools.partial(krippendorff_alpha, level=...)``) are evaluated for all
    resamples at once, with exactly the same resamples and results as the generic path.

    Resamples where the statistic is undefined (NaN, e.g. every drawn unit has the same value) are
    dropped; if more than half are undefined the interval is ``(nan, nan)``. Units with fewer than two
    ratings add no information to alpha but still take part in the draw, so drop them before calling
    (``agreement_report`` does).
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer; got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be a confidence level strictly between 0 and 1; got {level!r}")
    if not callable(statistic):
        raise ValueError("statistic must be a callable taking a raters x units array and returning a float")
    arr = _as_2d(reliability_data)
    n_units = arr.shape[1]
    if n_units == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    alpha_level = _alpha_level_of(statistic)
    estimates: list[NDArray[np.float64]] = []
    if alpha_level is not None:
        labels, counts = _value_counts(arr, alpha_level)
        offsets = None
        for idx in _resample_multiplicities(rng, n_units, int(n_boot)):
            if offsets is None or len(offsets) != len(idx):
                offsets = (np.arange(len(idx)) * n_units)[:, None]
            mult = np.bincount((idx + offsets).ravel(), minlength=idx.size).reshape(idx.shape)
            estimates.append(_alpha_from_counts(counts, labels, alpha_level, mult.astype(np.float64)))
    else:
        for idx in _resample_multiplicities(rng, n_units, int(n_boot)):
            estimates.append(np.array([float(statistic(arr[:, row])) for row in idx], dtype=np.float64))
    return _percentile_interval(np.concatenate(estimates), level)


# --------------------------------------------------------------------------------------------------
# Kappas
# --------------------------------------------------------------------------------------------------


def fleiss_kappa(table: ArrayLike) -> float:
    """Fleiss' (1971) kappa of a subjects x categories count table.

    Every subject must have been rated by the same number of raters (equal row sums, counts being
    non-negative integers). Returns NaN when undefined: no subjects, fewer than two ratings per
    subject, or all ratings in one category (chance agreement is 1).
    """
    try:
        t = np.asarray(table, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError("table must be a numeric subjects x categories array of counts") from exc
    if t.ndim != 2:
        raise ValueError(f"table must be 2-D (subjects x categories); got shape {t.shape}")
    if not np.isfinite(t).all() or (t < 0).any() or (t != np.round(t)).any():
        raise ValueError("table must hold non-negative integer counts")
    if t.shape[0] == 0 or t.shape[1] == 0:
        return math.nan
    per_subject = t.sum(axis=1)
    if (per_subject != per_subject[0]).any():
        raise ValueError(
            "fleiss_kappa needs the same number of ratings per subject; got row sums "
            f"{sorted(set(per_subject.astype(int).tolist()))}"
        )
    n = per_subject[0]
    if n < 2:
        return math.nan
    p_j = t.sum(axis=0) / t.sum()
    p_i = ((t**2).sum(axis=1) - n) / (n * (n - 1))
    p_bar, p_e = p_i.mean(), float((p_j**2).sum())
    if p_e >= 1.0:
        return math.nan
    return float((p_bar - p_e) / (1.0 - p_e))


def _labels(values: Sequence[Any] | ArrayLike, name: str) -> tuple[NDArray[Any], NDArray[np.bool_]]:
    """1-D labels (floats if all present values are numbers, else objects) and a missing mask."""
    arr = np.asarray(values, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of labels; got shape {arr.shape}")
    missing = np.array([_is_missing(x) for x in arr], dtype=bool)
    if all(_is_number(x) for x in arr[~missing]):
        return np.array([np.nan if m else float(x) for x, m in zip(arr, missing, strict=True)]), missing
    return arr, missing


def cohen_kappa(a: Sequence[Any] | ArrayLike, b: Sequence[Any] | ArrayLike, weights: KappaWeights = None) -> float:
    """Cohen's kappa between two raters' labels for the same units, in the same order.

    Pairs where either label is missing (None/NaN) are dropped. ``weights`` None gives the unweighted
    kappa on any hashable labels; "linear" or "quadratic" give weighted kappa with disagreement
    ``|x - y|`` or ``(x - y) ** 2`` on the numeric label values themselves (so a 1-5 scale keeps its
    spacing even when a score is never used). Returns NaN when no pair is left or chance agreement is
    already perfect (both raters used one and the same label throughout).
    """
    if weights not in KAPPA_WEIGHTS:
        raise ValueError(f"weights must be None, 'linear' or 'quadratic'; got {weights!r}")
    x, miss_x = _labels(a, "a")
    y, miss_y = _labels(b, "b")
    if len(x) != len(y):
        raise ValueError(f"a and b must rate the same units; got {len(x)} and {len(y)} labels")
    keep = ~(miss_x | miss_y)
    x, y = x[keep], y[keep]
    if len(x) == 0:
        return math.nan
    codes, uniques = pd.factorize(pd.Series(np.concatenate([x, y]), dtype=object))
    v = len(uniques)
    n = len(x)
    table = np.bincount(codes[:n] * v + codes[n:], minlength=v * v).reshape(v, v) / n
    if weights is None:
        disagreement = 1.0 - np.eye(v)
    else:
        if x.dtype == object or y.dtype == object:
            raise ValueError(f"weights={weights!r} needs numeric labels (e.g. scores 1-5)")
        values = np.asarray(uniques, dtype=np.float64)
        diff = np.abs(values[:, None] - values[None, :])
        disagreement = diff if weights == "linear" else diff**2
    expected = float((np.outer(table.sum(axis=1), table.sum(axis=0)) * disagreement).sum())
    if expected <= 0.0:
        return math.nan
    return float(1.0 - (table * disagreement).sum() / expected)


# --------------------------------------------------------------------------------------------------
# Long ratings -> per-rater diagnostics
# --------------------------------------------------------------------------------------------------


def _check_columns(frame: pd.DataFrame, required: Sequence[str], name: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame with columns {list(required)}")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} is missing columns {missing}; expected {list(required)}")


def _check_long(ratings: pd.DataFrame) -> pd.DataFrame:
    """Validated long ratings with missing values dropped."""
    _check_columns(ratings, LONG_COLUMNS, "ratings")
    dup = ratings.duplicated(subset=["unit", "rater"])
    if dup.any():
        first = ratings.loc[dup, ["unit", "rater"]].iloc[0].tolist()
        raise ValueError(f"ratings has {int(dup.sum())} duplicate (unit, rater) rows, e.g. {first}")
    return ratings.loc[~ratings["value"].map(_is_missing), list(LONG_COLUMNS)]


def reliability_matrix(ratings: pd.DataFrame) -> pd.DataFrame:
    """Long ratings (unit, rater, value) -> raters x units DataFrame with NaN for missing."""
    long = _check_long(ratings)
    wide = long.pivot(index="rater", columns="unit", values="value")
    return wide.sort_index().sort_index(axis=1)


def pairwise_shared_counts(ratings: pd.DataFrame) -> pd.DataFrame:
    """Raters x raters number of units both raters rated (diagonal: units each rater rated)."""
    wide = reliability_matrix(ratings)
    present = wide.notna().to_numpy(dtype=np.int64)
    return pd.DataFrame(present @ present.T, index=wide.index, columns=wide.index)


def pairwise_cohen_matrix(ratings: pd.DataFrame, weights: KappaWeights = None, min_shared: int = 10) -> pd.DataFrame:
    """Raters x raters Cohen's kappa on the units each pair shares (symmetric).

    Entries are NaN where a pair shares fewer than ``min_shared`` units or kappa is undefined; the
    diagonal is NaN (a rater is not compared with themself).
    """
    if isinstance(min_shared, bool) or not isinstance(min_shared, numbers.Integral) or min_shared < 1:
        raise ValueError(f"min_shared must be a positive integer; got {min_shared!r}")
    if weights not in KAPPA_WEIGHTS:
        raise ValueError(f"weights must be None, 'linear' or 'quadratic'; got {weights!r}")
    wide = reliability_matrix(ratings)
    raters = wide.index
    values = wide.to_numpy(dtype=object)
    present = wide.notna().to_numpy()
    out = np.full((len(raters), len(raters)), np.nan)
    for i in range(len(raters)):
        for j in range(i + 1, len(raters)):
            shared = present[i] & present[j]
            if shared.sum() >= min_shared:
                out[i, j] = out[j, i] = cohen_kappa(values[i, shared], values[j, shared], weights)
    return pd.DataFrame(out, index=raters, columns=raters)


def _majority(counts: NDArray[np.float64]) -> NDArray[np.int64]:
    """Index of the unique modal category per row; -1 where the row is empty or tied."""
    top = counts.max(axis=1)
    unique_top = (counts == top[:, None]).sum(axis=1) == 1
    return np.where((top > 0) & unique_top, counts.argmax(axis=1), -1)


def leave_one_out_agreement(ratings: pd.DataFrame, level: Literal["nominal", "ordinal"]) -> pd.DataFrame:
    """Each rater against the consensus of the *other* raters on the units they share.

    Consensus is the majority label of the others for "nominal" (units where the others tie are
    skipped and counted in ``n_ties``) and the median of the others' scores for "ordinal". Columns:
    ``rater, n_units, n_ties, agreement, kappa, mean_abs_diff, bias``.

    * nominal: ``agreement`` = share of units where the rater gives the consensus label, ``kappa`` =
      Cohen's kappa of rater vs consensus; ``mean_abs_diff`` and ``bias`` are NaN.
    * ordinal: ``agreement`` = share of units within 0.5 of the median (so a median of 3.5 agrees with
      3 and 4), ``mean_abs_diff`` = mean |score - median|, ``bias`` = mean (score - median): negative
      for a harsh rater, positive for a lenient one; ``kappa`` is NaN.
    """
    _check_level(level, ("nominal", "ordinal"))
    wide = reliability_matrix(ratings)
    arr = wide.to_numpy(dtype=object)
    present = wide.notna().to_numpy()
    rows: list[dict[str, Any]] = []
    if level == "nominal":
        labels, counts = _value_counts(arr, "nominal")  # counts: units x labels
        for i, rater in enumerate(wide.index):
            own = np.zeros_like(counts)
            codes = _codes_in(arr[i], labels, present[i])
            own[present[i], codes[present[i]]] = 1.0
            consensus = _majority(counts - own)
            others = (counts - own).sum(axis=1) > 0
            scope = present[i] & others
            usable = scope & (consensus >= 0)
            mine = codes[usable]
            theirs = consensus[usable]
            rows.append(
                {
                    "rater": rater,
                    "n_units": int(usable.sum()),
                    "n_ties": int((scope & (consensus < 0)).sum()),
                    "agreement": float(np.mean(mine == theirs)) if usable.any() else math.nan,
                    "kappa": cohen_kappa(mine, theirs) if usable.any() else math.nan,
                    "mean_abs_diff": math.nan,
                    "bias": math.nan,
                }
            )
    else:
        scores = _numeric_matrix(arr, "ordinal scores")
        if scores is None:
            raise ValueError("level 'ordinal' needs numeric scores in the value column")
        for i, rater in enumerate(wide.index):
            others = np.delete(scores, i, axis=0)
            has_other = (~np.isnan(others)).any(axis=0)
            usable = present[i] & has_other
            median = np.full(scores.shape[1], np.nan)
            if usable.any():
                median[usable] = np.nanmedian(others[:, usable], axis=0)
            diff = scores[i, usable] - median[usable]
            rows.append(
                {
                    "rater": rater,
                    "n_units": int(usable.sum()),
                    "n_ties": 0,
                    "agreement": float(np.mean(np.abs(diff) <= 0.5)) if usable.any() else math.nan,
                    "kappa": math.nan,
                    "mean_abs_diff": float(np.mean(np.abs(diff))) if usable.any() else math.nan,
                    "bias": float(np.mean(diff)) if usable.any() else math.nan,
                }
            )
    return pd.DataFrame(rows, columns=["rater", "n_units", "n_ties", "agreement", "kappa", "mean_abs_diff", "bias"])


def _codes_in(row: NDArray[Any], labels: NDArray[Any], present: NDArray[np.bool_]) -> NDArray[np.int64]:
    """Position of each present value of ``row`` in ``labels`` (-1 where missing)."""
    index = {(_key(v)): k for k, v in enumerate(labels)}
    return np.array([index[_key(v)] if p else -1 for v, p in zip(row, present, strict=True)], dtype=np.int64)


def _key(value: Any) -> Any:
    return float(value) if _is_number(value) else value


def score_distribution(ratings: pd.DataFrame, levels: Sequence[float] | None = None) -> pd.DataFrame:
    """Per-rater score summary to spot harsh or lenient raters.

    Columns: ``rater, n, mean, sd`` (sample sd, NaN for a single rating), ``mean_vs_overall`` (rater
    mean minus the mean of all ratings; raters see different samples, so read it together with the
    unit-matched ``bias`` of ``leave_one_out_agreement``) and one ``n_<level>`` count per score level
    (``levels``; default: every score that occurs).
    """
    long = _check_long(ratings)
    scores = _numeric_matrix(long["value"].to_numpy(dtype=object)[None, :], "scores")
    if scores is None:
        raise ValueError("score_distribution needs numeric scores in the value column")
    long = long.assign(value=scores[0])
    grid = sorted(set(long["value"].tolist())) if levels is None else [float(x) for x in levels]
    grouped = long.groupby("rater", sort=True)["value"]
    out = pd.DataFrame({"n": grouped.size(), "mean": grouped.mean(), "sd": grouped.std(ddof=1)})
    out["mean_vs_overall"] = out["mean"] - long["value"].mean() if len(long) else np.nan
    for lv in grid:
        out[f"n_{lv:g}"] = grouped.apply(lambda s, lv=lv: int((s == lv).sum())).astype(int)
    out = out.reset_index()
    return out.astype({"n": int})


def gold_accuracy(reviews: pd.DataFrame, gold: pd.DataFrame, tolerance: float = 0) -> pd.DataFrame:
    """Per-rater accuracy on gold-standard samples.

    ``reviews`` has ``sample_id, rater, consistent, quality, complexity``; ``gold`` has ``sample_id``
    and the reference ``consistent, quality, complexity`` (NaN/None where the gold has no answer for
    that question). Consistency must match exactly; a score is correct within ``tolerance`` (|review -
    gold| <= tolerance). Only raters who reviewed at least one gold sample are listed. Columns:
    ``rater, n_gold, consistent_accuracy, quality_accuracy, complexity_accuracy, quality_bias,
    complexity_bias`` (bias = mean review - gold score). Each accuracy is over that rater's gold
    samples where both answers are present (NaN if none).
    """
    _check_columns(reviews, REVIEW_COLUMNS, "reviews")
    _check_columns(gold, ("sample_id", "consistent", "quality", "complexity"), "gold")
    if not isinstance(tolerance, numbers.Real) or isinstance(tolerance, bool) or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative number; got {tolerance!r}")
    if gold["sample_id"].duplicated().any():
        raise ValueError("gold has duplicate sample_id rows; expected one reference answer per sample")
    rev = _clean_reviews(reviews)
    ref = _clean_answers(gold, "gold")
    merged = rev.merge(ref, on="sample_id", suffixes=("", "_gold"))
    rows: list[dict[str, Any]] = []
    for rater, grp in merged.groupby("rater", sort=True):
        row: dict[str, Any] = {"rater": rater, "n_gold": len(grp)}
        ok = grp["consistent"].notna() & grp["consistent_gold"].notna()
        row["consistent_accuracy"] = (
            float((grp.loc[ok, "consistent"] == grp.loc[ok, "consistent_gold"]).mean()) if ok.any() else math.nan
        )
        for col in ("quality", "complexity"):
            diff = (grp[col] - grp[f"{col}_gold"]).dropna()
            row[f"{col}_accuracy"] = float((diff.abs() <= tolerance).mean()) if len(diff) else math.nan
            row[f"{col}_bias"] = float(diff.mean()) if len(diff) else math.nan
        rows.append(row)
    columns = [
        "rater", "n_gold", "consistent_accuracy", "quality_accuracy", "complexity_accuracy",
        "quality_bias", "complexity_bias",
    ]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------------------------------
# MLLM conflict filter vs human consistency
# --------------------------------------------------------------------------------------------------


def _bools(values: Sequence[Any] | ArrayLike, name: str) -> NDArray[np.float64]:
    """Yes/no answers as 1.0/0.0 with NaN for missing (None/NaN); anything else is an error."""
    arr = np.asarray(values, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of booleans; got shape {arr.shape}")
    out = np.empty(len(arr), dtype=np.float64)
    for k, x in enumerate(arr):
        if _is_missing(x):
            out[k] = np.nan
        elif _is_number(x) and float(x) in (0.0, 1.0):
            out[k] = float(x)
        else:
            raise ValueError(f"{name} must hold booleans (True/False, 1/0) or None; got {x!r} at position {k}")
    return out


def _paired_bools(
    mllm_conflict: Sequence[Any] | ArrayLike, human_consistent: Sequence[Any] | ArrayLike
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    conflict = _bools(mllm_conflict, "mllm_conflict")
    consistent = _bools(human_consistent, "human_consistent")
    if len(conflict) != len(consistent):
        raise ValueError(
            f"mllm_conflict and human_consistent must describe the same samples; got {len(conflict)} "
            f"and {len(consistent)} values"
        )
    keep = ~(np.isnan(conflict) | np.isnan(consistent))
    return conflict[keep] == 1.0, consistent[keep] == 1.0


def confusion(
    mllm_conflict: Sequence[bool | None] | ArrayLike, human_consistent: Sequence[bool | None] | ArrayLike
) -> pd.DataFrame:
    """2x2 counts of the MLLM conflict flag (rows) against the human consistency verdict (columns).

    Rows ``mllm`` = "conflict" / "no conflict", columns ``human`` = "inconsistent" / "consistent"; the
    MLLM and the humans agree on the diagonal. Pairs with a missing answer are dropped.
    """
    conflict, consistent = _paired_bools(mllm_conflict, human_consistent)
    table = [
        [int((conflict & ~consistent).sum()), int((conflict & consistent).sum())],
        [int((~conflict & ~consistent).sum()), int((~conflict & consistent).sum())],
    ]
    return pd.DataFrame(
        table,
        index=pd.Index(["conflict", "no conflict"], name="mllm"),
        columns=pd.Index(["inconsistent", "consistent"], name="human"),
    )


def mllm_human_agreement(
    mllm_conflict: Sequence[bool | None] | ArrayLike, human_consistent: Sequence[bool | None] | ArrayLike
) -> dict[str, float | int]:
    """Agreement of the MLLM conflict filter with the human consistency verdict.

    The MLLM "agrees" when it flags a conflict on a sample humans call inconsistent, or no conflict on
    one they call consistent. Returns ``{"n", "agreement", "kappa"}`` (Cohen's kappa of the two
    yes/no judgements; NaN when undefined). Pairs with a missing answer are dropped.
    """
    conflict, consistent = _paired_bools(mllm_conflict, human_consistent)
    mllm_consistent = ~conflict
    n = len(conflict)
    return {
        "n": n,
        "agreement": float(np.mean(mllm_consistent == consistent)) if n else math.nan,
        "kappa": cohen_kappa(mllm_consistent.tolist(), consistent.tolist()),
    }


# --------------------------------------------------------------------------------------------------
# JSON-ready report
# --------------------------------------------------------------------------------------------------


def _clean_answers(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """Consistency as 1.0/0.0 and scores as floats (NaN for missing), scores checked to be 1-5."""
    out = frame.copy()
    out["consistent"] = _bools(frame["consistent"].tolist(), f"{name}.consistent")
    for col in ("quality", "complexity"):
        scores = _numeric_matrix(np.asarray(frame[col].tolist(), dtype=object).reshape(1, -1), f"{name}.{col}")
        if scores is None:
            raise ValueError(f"{name}.{col} must be scores {SCORE_LEVELS} (None/NaN for missing)")
        bad = ~np.isnan(scores[0]) & ~np.isin(scores[0], SCORE_LEVELS)
        if bad.any():
            raise ValueError(f"{name}.{col} must be scores {SCORE_LEVELS}; got {scores[0][bad][0]!r}")
        out[col] = scores[0]
    return out


def _clean_reviews(reviews: pd.DataFrame) -> pd.DataFrame:
    _check_columns(reviews, REVIEW_COLUMNS, "reviews")
    dup = reviews.duplicated(subset=["sample_id", "rater"])
    if dup.any():
        first = reviews.loc[dup, ["sample_id", "rater"]].iloc[0].tolist()
        raise ValueError(f"reviews has {int(dup.sum())} duplicate (sample_id, rater) rows, e.g. {first}")
    return _clean_answers(reviews[list(REVIEW_COLUMNS)], "reviews")


def _json_number(x: float | int | None) -> float | int | None:
    if x is None:
        return None
    if isinstance(x, numbers.Integral):
        return int(x)
    return None if not math.isfinite(float(x)) else float(x)


def _question_summary(long: pd.DataFrame, level: Level, n_boot: int, seed: int) -> dict[str, Any]:
    """Alpha (+ CI), Fleiss' kappa and counts for one question from its long ratings."""
    long = long.dropna(subset=["value"])
    per_unit = long.groupby("unit")["rater"].size()
    multi = per_unit[per_unit >= 2]
    sub = long[long["unit"].isin(multi.index)]
    wide = reliability_matrix(sub) if len(sub) else pd.DataFrame()
    alpha = krippendorff_alpha(wide, level) if len(sub) else math.nan
    ci: tuple[float, float] | None = None
    if n_boot > 0:
        ci = bootstrap_ci(AlphaStatistic(level), wide, n_boot=n_boot, seed=seed) if len(sub) else (math.nan,) * 2
    observed = math.nan
    fleiss, fleiss_units, fleiss_m = math.nan, 0, None
    if len(sub):
        o = coincidence_matrix(wide).to_numpy()
        observed = float(np.trace(o) / o.sum()) if o.sum() > 0 else math.nan
        counts_per_m = multi.value_counts()
        fleiss_m = int(max(counts_per_m[counts_per_m == counts_per_m.max()].index))
        modal_units = multi.index[multi == fleiss_m]
        table = pd.crosstab(sub["unit"], sub["value"]).loc[modal_units]
        fleiss, fleiss_units = fleiss_kappa(table.to_numpy()), len(modal_units)
    return {
        "level": level,
        "n_units": len(multi),
        "n_raters": int(sub["rater"].nunique()),
        "n_ratings": len(sub),
        "alpha": _json_number(alpha),
        "alpha_ci": None if ci is None else [_json_number(ci[0]), _json_number(ci[1])],
        "observed_agreement": _json_number(observed),
        "fleiss_kappa": _json_number(fleiss),
        "fleiss_n_units": fleiss_units,
        "fleiss_ratings_per_unit": fleiss_m,
    }


def agreement_report(reviews: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """JSON-ready inter-rater reliability summary of the expert reviews.

    ``reviews`` has one row per (sample_id, rater) with ``consistent`` (bool), ``quality`` and
    ``complexity`` (1-5); None/NaN answers are left out of that question. Per question -
    consistency (nominal), quality (ordinal), complexity (ordinal) - the report gives, over the
    samples with two or more ratings of that question:

    * ``alpha`` (Krippendorff) and ``alpha_ci`` = 95% percentile bootstrap over samples (``n_boot``
      resamples, ``seed``; ``n_boot=0`` skips it and gives None);
    * ``observed_agreement``: share of agreeing rating pairs within samples (exact match);
    * ``fleiss_kappa`` on the samples with the modal number of ratings (``fleiss_ratings_per_unit``,
      the larger on a tie; ``fleiss_n_units`` of them), since Fleiss' kappa needs a constant number
      of ratings per subject; scores are treated as nominal categories there;
    * ``n_units``, ``n_raters`` (raters contributing to those samples) and ``n_ratings``.

    Top level: ``n_reviews``, ``n_samples``, ``n_raters`` over all reviews, ``ci_level``, ``n_boot``,
    ``seed``. Numbers are plain ints/floats; undefined values (NaN) are None.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer; got {n_boot!r}")
    clean = _clean_reviews(reviews)
    questions = {
        name: _question_summary(
            clean[["sample_id", "rater", column]].set_axis(list(LONG_COLUMNS), axis=1), level, int(n_boot), seed
        )
        for name, column, level in QUESTIONS
    }
    return {
        "n_reviews": len(clean),
        "n_samples": int(clean["sample_id"].nunique()),
        "n_raters": int(clean["rater"].nunique()),
        "ci_level": 0.95,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "questions": questions,
    }
