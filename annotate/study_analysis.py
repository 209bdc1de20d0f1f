"""Analysis of the user study's votes: preference shares, pairwise wins, Bradley-Terry strengths, quality checks.

Pure (pandas/numpy/scipy in, DataFrames, dicts or plotly figures out; no database). :mod:`annotate.study` builds the
input with ``votes_frame``; :func:`results` is what the dashboard and ``mcie study results`` show.

Input
-----
A votes DataFrame, one row per (participant, item, criterion), with the columns :data:`VOTE_COLUMNS`:
``participant`` (any hashable id), ``item``, ``criterion`` (e.g. ``instruction``, ``background``),
``chosen_method`` (the method name, or None/NaN for "none is acceptable"), ``shown_order`` (the method names in
screen order, left to right; a list, tuple or array), ``latency_ms`` (may be missing), ``is_attention`` (an attention
check item) and ``attention_answer`` (the method that is the obvious answer of an attention check).

Definitions (per criterion, over the regular, i.e. non-attention, votes of the participants not excluded)
------------------------------------------------------------------------------------------------------------
* **Share of first choices** of method ``m``: votes choosing ``m`` / all votes (the "none is acceptable" votes stay in
  the denominator; their share is ``none_share``). Every screen of this study shows every method; if a design showed
  subsets, compare methods with the Bradley-Terry strengths instead.
* **Pairwise win matrix** ``wins[a][b]``: the number of votes that chose ``a`` on a screen that also showed ``b`` -
  the *winner beats every other shown* convention (a choice among k outputs counts as k - 1 wins of the chosen one;
  "none" votes count for nothing). ``win_rate[a][b] = wins[a][b] / (wins[a][b] + wins[b][a])``.
* **Bradley-Terry strengths** ``s`` maximise the likelihood of the win matrix under ``P(a beats b) = s_a / (s_a +
  s_b)``, fitted with the MM algorithm of Hunter (2004) and normalised to a geometric mean of 1 (log-strengths sum to
  0; ``s_a / s_b`` is the odds that ``a`` beats ``b``). When every screen shows every method the fit reduces to
  ``s`` proportional to the number of first choices, which is the maximum-likelihood estimate of Luce's choice model
  too, so the convention above is consistent there. The maximum-likelihood estimate exists only if the directed
  "beat" graph is strongly connected (Ford 1957); otherwise (a method never won or never lost) strengths are None.
* **Preferred method of a participant**: the method they chose most often on that criterion ("none" votes ignored).
  A tie at the top, or no method chosen at all, means no preference (``undecided_share``). ``preferred[m].share`` is
  the share of participants (with at least one vote on the criterion) whose preferred method is ``m``, i.e. who
  preferred ``m`` over every other method: the paper's "80% of participants".
* **Intervals**: percentile bootstrap (``level``, default 95%) resampling *participants* with replacement
  (``n_boot`` resamples, one seeded generator per criterion, the same resamples for every statistic); resamples in
  which a statistic is undefined are dropped, and the interval is None if more than half are.
* **Position bias**: how often the chosen output sat at each screen position, against the uniform expectation (a
  screen with ``k`` outputs expects ``1/k`` of its choice at each position), with Pearson's chi-square test
  (df = positions - 1). Method quality does not leak into it only because the design shows every method equally often
  at every position (:mod:`annotate.study_design`).

Quality checks and exclusions
-----------------------------
``exclude`` (participant ids) is applied before every figure above. The per-participant checks list every
participant, excluded or not (with an ``excluded`` flag), so a lead sees whom to exclude: attention-check failures
(a vote on an attention item that did not choose its ``attention_answer``; "none" is a failure; on every criterion
unless ``attention_criteria`` names some) and implausibly fast participants (median vote latency below
``min_median_latency_ms``). Nothing is excluded automatically.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import stats

VOTE_COLUMNS: tuple[str, ...] = (
    "participant",
    "item",
    "criterion",
    "chosen_method",
    "shown_order",
    "latency_ms",
    "is_attention",
    "attention_answer",
)
DEFAULT_MIN_MEDIAN_LATENCY_MS = 2000.0
BT_MAX_ITER = 10_000
BT_TOL = 1e-10
_BOOT_CHUNK = 500  # resamples evaluated at once


# ----------------------------------------------------------------------------------------------------------
# input


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _as_order(value: object, row: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence | np.ndarray):
        raise ValueError(f"votes row {row}: shown_order must be a list of method names; got {value!r}")
    order = tuple(str(m) if isinstance(m, str) else m for m in value)
    if len(order) < 2 or len(set(order)) != len(order) or not all(isinstance(m, str) and m for m in order):
        raise ValueError(f"votes row {row}: shown_order must list two or more distinct method names; got {order!r}")
    return order


def check_votes(votes: pd.DataFrame) -> pd.DataFrame:
    """A validated copy of ``votes``: the :data:`VOTE_COLUMNS` with ``shown_order`` as tuples, ``chosen_method`` None
    for "none acceptable", ``is_attention`` bool and ``latency_ms`` float (NaN if missing).

    Raises ``ValueError`` naming the column or row: missing columns, duplicate (participant, item, criterion) rows, a
    chosen method that was not shown, a negative latency.
    """
    if not isinstance(votes, pd.DataFrame):
        raise ValueError(f"votes must be a pandas DataFrame; got {type(votes).__name__}")
    missing = [c for c in VOTE_COLUMNS if c not in votes.columns]
    if missing:
        raise ValueError(f"votes is missing the column(s) {', '.join(missing)} (expected {', '.join(VOTE_COLUMNS)})")
    frame = votes[list(VOTE_COLUMNS)].reset_index(drop=True).copy()
    if frame["participant"].isna().any() or frame["criterion"].isna().any():
        raise ValueError("votes has rows without a participant or criterion")
    frame["shown_order"] = [_as_order(v, k) for k, v in enumerate(frame["shown_order"])]
    chosen: list[str | None] = []
    for k, (choice, order) in enumerate(zip(frame["chosen_method"], frame["shown_order"], strict=True)):
        if _is_missing(choice):
            chosen.append(None)
        elif choice in order:
            chosen.append(str(choice))
        else:
            raise ValueError(f"votes row {k}: chosen_method {choice!r} is not among the shown methods {list(order)}")
    frame["chosen_method"] = pd.Series(chosen, dtype=object)
    frame["attention_answer"] = pd.Series(
        [None if _is_missing(a) else str(a) for a in frame["attention_answer"]], dtype=object
    )
    frame["is_attention"] = [not _is_missing(v) and bool(v) for v in frame["is_attention"]]
    frame["latency_ms"] = pd.to_numeric(frame["latency_ms"], errors="coerce").astype(np.float64)
    if (frame["latency_ms"] < 0).any():
        raise ValueError(f"votes row {int(np.flatnonzero(frame['latency_ms'] < 0)[0])}: latency_ms is negative")
    duplicated = frame.duplicated(subset=["participant", "item", "criterion"])
    if duplicated.any():
        first = frame.loc[duplicated, ["participant", "item", "criterion"]].iloc[0].tolist()
        raise ValueError(
            f"votes has {int(duplicated.sum())} duplicate (participant, item, criterion) rows, e.g. {first}"
        )
    return frame


def apply_exclusion(votes: pd.DataFrame, exclude: Iterable[Hashable] = ()) -> pd.DataFrame:
    """``votes`` without the rows of the participants in ``exclude``."""
    excluded = set(exclude)
    return votes[~votes["participant"].isin(excluded)] if excluded else votes


def methods_of(votes: pd.DataFrame) -> list[str]:
    """Every method shown in ``votes``, sorted."""
    return sorted({m for order in votes["shown_order"] for m in order})


# ----------------------------------------------------------------------------------------------------------
# coding votes as arrays


@dataclass(frozen=True)
class _Coded:
    """One criterion's votes as arrays: ``participant`` codes, ``chosen`` method codes (-1 = none), ``shown`` mask,
    ``position`` of the choice (-1 = none) and the number of outputs shown."""

    participants: list[Hashable]
    methods: list[str]
    participant: NDArray[np.int64]
    chosen: NDArray[np.int64]
    shown: NDArray[np.bool_]
    position: NDArray[np.int64]
    n_shown: NDArray[np.int64]


def _code(votes: pd.DataFrame, methods: Sequence[str]) -> _Coded:
    index = {m: k for k, m in enumerate(methods)}
    participants = list(pd.unique(votes["participant"]))
    p_index = {p: k for k, p in enumerate(participants)}
    n = len(votes)
    shown = np.zeros((n, len(methods)), dtype=bool)
    chosen = np.full(n, -1, dtype=np.int64)
    position = np.full(n, -1, dtype=np.int64)
    n_shown = np.zeros(n, dtype=np.int64)
    for k, (order, choice) in enumerate(zip(votes["shown_order"], votes["chosen_method"], strict=True)):
        shown[k, [index[m] for m in order]] = True
        n_shown[k] = len(order)
        if choice is not None:
            chosen[k] = index[choice]
            position[k] = order.index(choice)
    participant = np.asarray([p_index[p] for p in votes["participant"]], dtype=np.int64)
    return _Coded(participants, list(methods), participant, chosen, shown, position, n_shown)


def _per_participant_choices(coded: _Coded) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(counts[p, m], votes[p])``: choices of each method and all votes (none included) per participant."""
    n_p, n_m = len(coded.participants), len(coded.methods)
    counts = np.zeros((n_p, n_m), dtype=np.float64)
    picked = coded.chosen >= 0
    np.add.at(counts, (coded.participant[picked], coded.chosen[picked]), 1.0)
    totals = np.bincount(coded.participant, minlength=n_p).astype(np.float64)
    return counts, totals


def _per_participant_wins(coded: _Coded) -> NDArray[np.float64]:
    """``wins[p, a, b]``: participant p's votes choosing a on a screen that showed b (b != a)."""
    n_p, n_m = len(coded.participants), len(coded.methods)
    wins = np.zeros((n_p, n_m, n_m), dtype=np.float64)
    picked = np.flatnonzero(coded.chosen >= 0)
    np.add.at(wins, (coded.participant[picked], coded.chosen[picked]), coded.shown[picked].astype(np.float64))
    wins[:, np.arange(n_m), np.arange(n_m)] = 0.0
    return wins


def _preferred_onehot(counts: NDArray[np.float64]) -> NDArray[np.float64]:
    """One row per participant: 1 at their strictly most chosen method, all zeros on a tie or without choices."""
    onehot = np.zeros_like(counts)
    if counts.size == 0:
        return onehot
    top = counts.max(axis=1)
    unique_top = ((counts == top[:, None]).sum(axis=1) == 1) & (top > 0)
    rows = np.flatnonzero(unique_top)
    onehot[rows, counts[rows].argmax(axis=1)] = 1.0
    return onehot


# ----------------------------------------------------------------------------------------------------------
# public statistics (one criterion's votes)


def win_matrix(votes: pd.DataFrame, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Wins of the row method over the column method ("winner beats every other shown"), for one criterion's votes."""
    votes = check_votes(votes)
    _single_criterion(votes)
    methods = list(methods) if methods is not None else methods_of(votes)
    coded = _code(votes, methods)
    wins = _per_participant_wins(coded).sum(axis=0)
    return pd.DataFrame(
        wins.astype(np.int64), index=pd.Index(methods, name="winner"), columns=pd.Index(methods, name="loser")
    )


def choice_shares(votes: pd.DataFrame, methods: Sequence[str] | None = None) -> pd.Series:
    """Share of first choices per method (denominator: all votes, none included), for one criterion's votes."""
    votes = check_votes(votes)
    _single_criterion(votes)
    methods = list(methods) if methods is not None else methods_of(votes)
    counts, totals = _per_participant_choices(_code(votes, methods))
    total = totals.sum()
    shares = counts.sum(axis=0) / total if total else np.full(len(methods), np.nan)
    return pd.Series(shares, index=pd.Index(methods, name="method"), name="share")


def preferred_methods(votes: pd.DataFrame, methods: Sequence[str] | None = None) -> pd.Series:
    """Each participant's strictly most chosen method (None on a tie or without choices), for one criterion."""
    votes = check_votes(votes)
    _single_criterion(votes)
    methods = list(methods) if methods is not None else methods_of(votes)
    coded = _code(votes, methods)
    onehot = _preferred_onehot(_per_participant_choices(coded)[0])
    values = [methods[int(row.argmax())] if row.any() else None for row in onehot]
    return pd.Series(values, index=pd.Index(coded.participants, name="participant"), name="preferred", dtype=object)


def _single_criterion(votes: pd.DataFrame) -> None:
    if votes["criterion"].nunique() > 1:
        raise ValueError(
            f"votes mixes the criteria {sorted(map(str, votes['criterion'].unique()))}; select one criterion first"
        )


def _strongly_connected(wins: NDArray[np.float64]) -> NDArray[np.bool_]:
    """For each ``(B, M, M)`` win matrix: is the directed graph a -> b (a beat b at least once) strongly connected?"""
    n_m = wins.shape[-1]
    reach = (wins > 0) | np.eye(n_m, dtype=bool)
    for _ in range(max(1, math.ceil(math.log2(max(n_m, 2))))):
        reach = np.matmul(reach.astype(np.float64), reach.astype(np.float64)) > 0
    return reach.all(axis=(-2, -1))


def bradley_terry_batch(wins: NDArray[np.float64]) -> NDArray[np.float64]:
    """Bradley-Terry strengths (geometric mean 1) of a batch of ``(B, M, M)`` win matrices by Hunter's (2004) MM.

    Rows whose maximum-likelihood estimate does not exist (beat graph not strongly connected) are NaN.
    """
    wins = np.asarray(wins, dtype=np.float64)
    if wins.ndim != 3 or wins.shape[1] != wins.shape[2]:
        raise ValueError(f"win matrices must have the shape (B, M, M); got {wins.shape}")
    exists = _strongly_connected(wins)
    safe = np.where(exists[:, None, None], wins, 1.0)
    n_m = wins.shape[1]
    safe[:, np.arange(n_m), np.arange(n_m)] = 0.0
    total_wins = safe.sum(axis=2)
    pairs = safe + np.swapaxes(safe, 1, 2)
    log_s = np.zeros(total_wins.shape)
    active = np.ones(len(safe), dtype=bool)
    for _ in range(BT_MAX_ITER):
        s = np.exp(log_s[active])
        denom = (pairs[active] / (s[:, :, None] + s[:, None, :])).sum(axis=2)
        new = np.log(total_wins[active]) - np.log(denom)
        new -= new.mean(axis=1, keepdims=True)
        change = np.abs(new - log_s[active]).max(axis=1)
        log_s[active] = new
        still = change > BT_TOL
        if not still.any():
            break
        active[np.flatnonzero(active)[~still]] = False
    strengths = np.exp(log_s)
    strengths[~exists] = np.nan
    return strengths


def bradley_terry(wins: pd.DataFrame | NDArray[np.float64]) -> pd.Series | NDArray[np.float64]:
    """Bradley-Terry strengths (geometric mean 1) of one ``M x M`` win matrix (``wins[a, b]``: a beat b).

    Returns a Series indexed like the DataFrame's rows, or an array for an array; NaN where the estimate does not
    exist (see :func:`bradley_terry_batch`).
    """
    matrix = np.asarray(wins, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or (matrix < 0).any():
        raise ValueError(f"a win matrix must be square with non-negative counts; got shape {matrix.shape}")
    strengths = bradley_terry_batch(matrix[None])[0]
    if isinstance(wins, pd.DataFrame):
        return pd.Series(strengths, index=wins.index, name="strength")
    return strengths


def position_bias(votes: pd.DataFrame) -> dict[str, Any]:
    """Chosen screen positions against the uniform expectation, with Pearson's chi-square test (one criterion).

    Over the votes that chose an output ("none" votes carry no position): ``positions`` (1-based), ``chosen``
    (counts), ``expected`` (under no bias), ``n_screens`` (those votes whose screen had that position), ``rate``
    (chosen / n_screens), ``chi2``, ``df`` and ``p_value`` (None when fewer than two positions or no choices).
    """
    votes = check_votes(votes)
    _single_criterion(votes)
    return _position_bias(_code(votes, methods_of(votes)))


def _position_bias(coded: _Coded) -> dict[str, Any]:
    width = int(coded.n_shown.max()) if coded.n_shown.size else 0
    picked = coded.position >= 0
    chosen = np.bincount(coded.position[picked], minlength=width).astype(np.float64)
    has_position = np.arange(width)[None, :] < coded.n_shown[picked][:, None]
    expected = (has_position / coded.n_shown[picked][:, None]).sum(axis=0)
    shown = has_position.sum(axis=0).astype(np.float64)
    chi2 = df = p_value = None
    keep = expected > 0
    if keep.sum() >= 2 and chosen.sum() > 0:
        test = stats.chisquare(chosen[keep], expected[keep])
        chi2, df, p_value = float(test.statistic), int(keep.sum() - 1), float(test.pvalue)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = chosen / shown
    return {
        "positions": list(range(1, width + 1)),
        "chosen": [int(c) for c in chosen],
        "expected": [float(e) for e in expected],
        "n_screens": [int(s) for s in shown],
        "rate": [_json_number(r) for r in rate],
        "chi2": chi2,
        "df": df,
        "p_value": p_value,
    }


# ----------------------------------------------------------------------------------------------------------
# participant quality checks


def attention_failures(votes: pd.DataFrame, criteria: Sequence[str] | None = None) -> pd.DataFrame:
    """Per participant with attention-check votes: ``n_checks``, ``n_failed`` and ``failure_rate``.

    A check fails when the vote did not choose the item's ``attention_answer`` ("none" fails too). ``criteria``
    limits the votes counted (default every criterion).
    """
    votes = check_votes(votes)
    checks = votes[votes["is_attention"] & votes["attention_answer"].notna()]
    if criteria is not None:
        checks = checks[checks["criterion"].isin(list(criteria))]
    failed = checks["chosen_method"].to_numpy(dtype=object) != checks["attention_answer"].to_numpy(dtype=object)
    table = (
        pd.DataFrame({"participant": checks["participant"].to_numpy(), "failed": failed.astype(int)})
        .groupby("participant", sort=True)["failed"]
        .agg(n_checks="size", n_failed="sum")
    )
    table["failure_rate"] = table["n_failed"] / table["n_checks"]
    return table


def participant_latency(
    votes: pd.DataFrame, min_median_latency_ms: float = DEFAULT_MIN_MEDIAN_LATENCY_MS
) -> pd.DataFrame:
    """Per participant: ``n_votes``, ``median_latency_ms`` (over votes with a latency) and ``fast`` (median under
    ``min_median_latency_ms``; False when no latency was recorded)."""
    if not min_median_latency_ms >= 0:
        raise ValueError(f"min_median_latency_ms must be >= 0; got {min_median_latency_ms!r}")
    votes = check_votes(votes)
    table = votes.groupby("participant", sort=True)["latency_ms"].agg(n_votes="size", median_latency_ms="median")
    table["fast"] = (table["median_latency_ms"] < min_median_latency_ms).fillna(False).astype(bool)
    return table


def fast_participants(votes: pd.DataFrame, min_median_latency_ms: float = DEFAULT_MIN_MEDIAN_LATENCY_MS) -> list[Any]:
    """Participants whose median vote latency is under ``min_median_latency_ms``."""
    table = participant_latency(votes, min_median_latency_ms)
    return list(table.index[table["fast"]])


# ----------------------------------------------------------------------------------------------------------
# bootstrap


def _resample_weights(rng: np.random.Generator, n: int, size: int) -> NDArray[np.float64]:
    """``size`` bootstrap resamples of ``n`` units as multiplicities (rows sum to ``n``)."""
    draws = rng.integers(0, n, size=(size, n))
    offsets = (np.arange(size) * n)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=size * n).reshape(size, n).astype(np.float64)


def _interval(estimates: NDArray[np.float64], level: float) -> list[float | None] | None:
    """Percentile interval per column of ``estimates`` (B x K); None columns where over half are undefined."""
    tail = (1.0 - level) / 2.0
    out = []
    for column in estimates.T:
        valid = column[np.isfinite(column)]
        if valid.size == 0 or valid.size * 2 < column.size:
            out.append(None)
        else:
            low, high = np.quantile(valid, [tail, 1.0 - tail])
            out.append([float(low), float(high)])
    return out


def _bootstrap(
    n_units: int, n_boot: int, rng: np.random.Generator, statistic: Callable[[NDArray[np.float64]], NDArray[np.float64]]
) -> NDArray[np.float64]:
    """``statistic(weights)`` (weights: chunk x n_units -> chunk x K) over ``n_boot`` resamples, stacked."""
    chunks, done = [], 0
    while done < n_boot:
        size = min(_BOOT_CHUNK, n_boot - done)
        chunks.append(statistic(_resample_weights(rng, n_units, size)))
        done += size
    return np.concatenate(chunks)


# ----------------------------------------------------------------------------------------------------------
# report


def _json_number(x: object) -> float | int | None:
    if x is None:
        return None
    if isinstance(x, bool | np.bool_):
        return bool(x)  # type: ignore[return-value]
    if isinstance(x, numbers.Integral):
        return int(x)
    value = float(x)  # type: ignore[arg-type]
    return value if math.isfinite(value) else None


def _plain(x: object) -> Any:
    """``x`` with numpy scalars turned into Python ones and NaN into None (ids and names pass through)."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _ratio(num: NDArray[np.float64], den: NDArray[np.float64]) -> NDArray[np.float64]:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _criterion_report(
    votes: pd.DataFrame, methods: list[str], n_boot: int, level: float, rng: np.random.Generator
) -> dict[str, Any]:
    coded = _code(votes, methods)
    counts, totals = _per_participant_choices(coded)
    per_wins = _per_participant_wins(coded)
    onehot = _preferred_onehot(counts)
    n_p, n_m = counts.shape
    wins = per_wins.sum(axis=0)
    share = _ratio(counts.sum(axis=0), np.full(n_m, totals.sum()))
    none_share = _ratio(np.array([totals.sum() - counts.sum()]), np.array([totals.sum()]))[0]
    strengths = bradley_terry_batch(wins[None])[0]
    voters = (totals > 0).astype(np.float64)
    preferred = _ratio(onehot.sum(axis=0), np.full(n_m, voters.sum()))

    def statistic(weights: NDArray[np.float64]) -> NDArray[np.float64]:
        boot_wins = np.einsum("bp,pij->bij", weights, per_wins)
        boot_share = _ratio(weights @ counts, (weights @ totals)[:, None])
        boot_pref = _ratio(weights @ onehot, (weights @ voters)[:, None])
        return np.hstack([boot_share, np.log(bradley_terry_batch(boot_wins)), boot_pref])

    intervals: list[Any] = [None] * (3 * n_m)
    if n_boot > 0 and n_p > 0:
        intervals = _interval(_bootstrap(n_p, n_boot, rng, statistic), level)
    share_ci, log_bt_ci, pref_ci = intervals[:n_m], intervals[n_m : 2 * n_m], intervals[2 * n_m :]
    with np.errstate(invalid="ignore", divide="ignore"):
        win_rate = _ratio(wins, wins + wins.T)
    np.fill_diagonal(win_rate, np.nan)
    return {
        "n_votes": len(votes),
        "n_participants": n_p,
        "none_share": _json_number(none_share),
        "shares": {
            m: {"n_chosen": int(counts[:, k].sum()), "share": _json_number(share[k]), "ci": share_ci[k]}
            for k, m in enumerate(methods)
        },
        "win_matrix": {
            "methods": methods,
            "wins": [[int(w) for w in row] for row in wins],
            "win_rate": [[_json_number(r) for r in row] for row in win_rate],
        },
        "bradley_terry": {
            "exists": bool(np.isfinite(strengths).all()),
            "normalization": "geometric mean 1 (log-strengths sum to 0)",
            "strengths": {
                m: {
                    "strength": _json_number(strengths[k]),
                    "log_strength": _json_number(np.log(strengths[k])),
                    "ci": None if log_bt_ci[k] is None else [math.exp(v) for v in log_bt_ci[k]],
                }
                for k, m in enumerate(methods)
            },
        },
        "preferred": {
            m: {"n_participants": int(onehot[:, k].sum()), "share": _json_number(preferred[k]), "ci": pref_ci[k]}
            for k, m in enumerate(methods)
        },
        "undecided_share": _json_number(_ratio(np.array([voters.sum() - onehot.sum()]), np.array([voters.sum()]))[0]),
        "position_bias": _position_bias(coded),
    }


def _check_results_args(n_boot: object, seed: object, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer; got {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be strictly between 0 and 1; got {level!r}")


def results(
    votes: pd.DataFrame,
    exclude: Iterable[Hashable] = (),
    n_boot: int = 1000,
    seed: int = 0,
    *,
    level: float = 0.95,
    min_median_latency_ms: float = DEFAULT_MIN_MEDIAN_LATENCY_MS,
    attention_criteria: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The study's JSON-ready results (plain types, NaN as None); see the module docstring for the definitions.

    Top level: ``methods``, ``criteria`` (sorted), counts of votes and participants (``n_participants`` after the
    exclusions, ``excluded``: the excluded ids that have votes), ``n_boot``, ``seed``, ``ci_level``;
    ``by_criterion[criterion]``: ``n_votes``, ``n_participants``, ``none_share``, ``shares[method]`` (``share``,
    ``ci``, ``n_chosen``), ``win_matrix`` (``methods``, ``wins[a][b]``, ``win_rate[a][b]``), ``bradley_terry``
    (``exists``, ``normalization``, ``strengths[method]``: ``strength``, ``log_strength``, ``ci``),
    ``preferred[method]`` (``share``, ``ci``, ``n_participants``), ``undecided_share`` and ``position_bias``;
    ``quality``: per-participant ``participants`` records (``participant``, ``excluded``, ``n_votes``,
    ``median_latency_ms``, ``fast``, ``attention_checks``, ``attention_failed``) and the lists ``fast`` and
    ``failed_attention`` of ids.
    """
    _check_results_args(n_boot, seed, level)
    checked = check_votes(votes)
    excluded = set(exclude)
    methods = methods_of(checked)
    present = set(checked["participant"])
    included = apply_exclusion(checked, excluded)
    regular = included[~included["is_attention"]]
    criteria = sorted(checked["criterion"].unique(), key=str)
    by_criterion = {
        str(c): _criterion_report(
            regular[regular["criterion"] == c], methods, int(n_boot), level, np.random.default_rng([int(seed), k])
        )
        for k, c in enumerate(criteria)
    }
    return {
        "methods": methods,
        "criteria": [str(c) for c in criteria],
        "n_votes": len(checked),
        "n_votes_analysed": len(regular),
        "n_participants_total": int(checked["participant"].nunique()),
        "n_participants": int(included["participant"].nunique()),
        "excluded": sorted((_plain(p) for p in excluded if p in present), key=str),
        "ci_level": level,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "by_criterion": by_criterion,
        "quality": _quality_report(checked, excluded, min_median_latency_ms, attention_criteria),
    }


def _quality_report(
    votes: pd.DataFrame, excluded: set[Hashable], min_median_latency_ms: float, attention_criteria: Sequence[str] | None
) -> dict[str, Any]:
    latency = participant_latency(votes, min_median_latency_ms)
    attention = attention_failures(votes, attention_criteria)
    records = []
    for participant, row in latency.iterrows():
        checks = attention.loc[participant] if participant in attention.index else None
        records.append(
            {
                "participant": _plain(participant),
                "excluded": participant in excluded,
                "n_votes": int(row["n_votes"]),
                "median_latency_ms": _json_number(row["median_latency_ms"]),
                "fast": bool(row["fast"]),
                "attention_checks": 0 if checks is None else int(checks["n_checks"]),
                "attention_failed": 0 if checks is None else int(checks["n_failed"]),
            }
        )
    return {
        "min_median_latency_ms": float(min_median_latency_ms),
        "participants": records,
        "fast": [r["participant"] for r in records if r["fast"]],
        "failed_attention": [r["participant"] for r in records if r["attention_failed"] > 0],
    }


# ----------------------------------------------------------------------------------------------------------
# figures (plotly), built from the results dict so a cached report can be drawn again


def _criterion(res: dict[str, Any], criterion: str) -> dict[str, Any]:
    try:
        return res["by_criterion"][criterion]
    except KeyError:
        raise ValueError(f"no criterion {criterion!r} in the results (have {', '.join(res['by_criterion'])})") from None


def _error_bars(values: list[float | None], cis: list[list[float] | None]) -> dict[str, Any]:
    plus = [None if ci is None or v is None else ci[1] - v for v, ci in zip(values, cis, strict=True)]
    minus = [None if ci is None or v is None else v - ci[0] for v, ci in zip(values, cis, strict=True)]
    return {"type": "data", "symmetric": False, "array": plus, "arrayminus": minus}


def plot_shares(res: dict[str, Any], criterion: str, *, what: str = "shares") -> Any:
    """Bar chart of each method's share of first choices (``what="shares"``) or of participants preferring it
    (``what="preferred"``), with the bootstrap intervals as error bars."""
    import plotly.graph_objects as go

    if what not in ("shares", "preferred"):
        raise ValueError(f"what must be 'shares' or 'preferred'; got {what!r}")
    block = _criterion(res, criterion)[what]
    methods = list(block)
    values = [block[m]["share"] for m in methods]
    figure = go.Figure(go.Bar(x=methods, y=values, error_y=_error_bars(values, [block[m]["ci"] for m in methods])))
    title = "Share of first choices" if what == "shares" else "Share of participants preferring the method"
    figure.update_layout(
        title=f"{title} - {criterion}", yaxis={"title": "share", "tickformat": ".0%"}, xaxis={"title": "method"}
    )
    return figure


def plot_strengths(res: dict[str, Any], criterion: str) -> Any:
    """Bradley-Terry strengths (log axis, geometric mean 1) with bootstrap intervals."""
    import plotly.graph_objects as go

    block = _criterion(res, criterion)["bradley_terry"]["strengths"]
    methods = list(block)
    values = [block[m]["strength"] for m in methods]
    figure = go.Figure(
        go.Scatter(x=methods, y=values, mode="markers", error_y=_error_bars(values, [block[m]["ci"] for m in methods]))
    )
    figure.add_hline(y=1.0, line_dash="dot")
    figure.update_layout(
        title=f"Bradley-Terry strength - {criterion}",
        yaxis={"title": "strength", "type": "log"},
        xaxis={"title": "method"},
    )
    return figure


def plot_win_matrix(res: dict[str, Any], criterion: str) -> Any:
    """Heatmap of ``win_rate[row][column]`` (row beats column), annotated with the win counts."""
    import plotly.graph_objects as go

    block = _criterion(res, criterion)["win_matrix"]
    methods, wins = block["methods"], block["wins"]
    text = [
        [f"{wins[a][b]} / {wins[a][b] + wins[b][a]}" if a != b else "" for b in range(len(methods))]
        for a in range(len(methods))
    ]
    figure = go.Figure(
        go.Heatmap(
            z=block["win_rate"],
            x=methods,
            y=methods,
            text=text,
            texttemplate="%{text}",
            zmin=0,
            zmax=1,
            colorscale="RdBu",
            colorbar={"title": "win rate"},
        )
    )
    figure.update_layout(
        title=f"Pairwise wins (row beats column) - {criterion}",
        xaxis={"title": "loser"},
        yaxis={"title": "winner", "autorange": "reversed"},
    )
    return figure


def plot_position_bias(res: dict[str, Any], criterion: str) -> Any:
    """Choices per screen position against the uniform expectation, with the chi-square p-value in the title."""
    import plotly.graph_objects as go

    block = _criterion(res, criterion)["position_bias"]
    labels = [chr(ord("A") + p - 1) if p <= 26 else str(p) for p in block["positions"]]
    figure = go.Figure(
        [
            go.Bar(x=labels, y=block["chosen"], name="chosen"),
            go.Scatter(x=labels, y=block["expected"], name="expected (no bias)", mode="lines+markers"),
        ]
    )
    p_value = block["p_value"]
    note = "" if p_value is None else f" (chi-square p = {p_value:.3g})"
    figure.update_layout(
        title=f"Choices by screen position - {criterion}{note}",
        xaxis={"title": "screen position"},
        yaxis={"title": "votes"},
    )
    return figure
