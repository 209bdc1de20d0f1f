"""Rater reliability and reliability-weighted acceptance: who to trust, how sure a decision is, when to ask again.

Pure: pandas/numpy in, dataclasses and plain dicts out, no database (``annotate.reliability_service`` is the edge).

The model. Each sample has three hidden true answers: consistency (no/yes), quality and complexity (1-5). A rater's
answer depends only on the true answer of that question and on the rater, through a *likelihood matrix*
``L[true, observed]`` per rater and question; the three questions are taken as independent given the truth.

* **Consistency** is a two-class Dawid-Skene model (A. P. Dawid and A. M. Skene, 1979): a full 2x2 confusion matrix
  per rater, fitted by EM with crowd-kit's :class:`crowdkit.aggregation.DawidSkene`, gold answers clamping the
  posteriors of gold samples (``true_labels``). The matrices are then re-estimated from crowd-kit's posteriors with
  one pseudo-count per cell toward a good default rater (:data:`DEFAULT_CONSISTENCY`), so a rater seen on a handful
  of samples is neither perfect nor hopeless.
* **Quality and complexity** use an ordinal bias/noise model (written here; no library fits it): a rater reports
  ``round(true + bias + noise)``, noise normal with the rater's ``sigma``, clipped to 1..5 (an ordered probit with
  the cut points shifted by the bias), mixed with a share ``careless`` of answers uniform over 1..5. Three numbers
  per rater instead of Dawid-Skene's 20 free cells over five levels: the overlap a project can afford (a calibration
  share and gold) identifies them, and they read directly as "rates 0.8 too high" and "answers at random 40% of the
  time". Fitted by EM (E-step as in Dawid-Skene, M-step a 3-parameter maximum likelihood per rater with a weak
  prior toward a good rater). ``tests/annotate/test_reliability.py`` checks it against crowd-kit's unconstrained
  five-level Dawid-Skene and against simulated raters with known bias and noise.

What is fitted on what. Rater parameters are estimated only from *informative* samples: gold samples (truth known)
and samples with two or more reviews. A sample with one review says nothing about its rater (EM would call every
answer right and every rater perfect), so it only receives a posterior. Class priors come from the informative
samples too.

Reliability shown to leads (:func:`rater_reports`). Per rater and question, the *skill* is chance-corrected
agreement with the *leave-self-out* consensus (the posterior of each informative sample from everybody else's
answers and the gold): ``(a - e) / (1 - e)`` where ``a`` is the mean agreement weight with that posterior (exact
match for consistency, linear weights ``1 - |y - z| / 4`` for the scores, as in weighted kappa) and ``e`` the same
for a rater answering at random with this rater's own answer distribution. 1 is perfect, 0 is a coin toss. The 95%
interval treats the agreement as ``n`` soft successes under a uniform prior (a Beta(a n + 1, (1 - a) n + 1) credible
interval mapped through the same formula). Flags, only with at least :data:`MIN_FLAG_ITEMS` informative samples:
*careless* when the skill interval lies entirely below :data:`CARELESS_SKILL` on at least two of the three
questions (no bias flags then: random answers have a mean offset from the consensus too); *biased* on a question
when the mean signed difference from the consensus (answer minus consensus expectation; for consistency the share of
"yes" minus the consensus' share) is at least :data:`BIAS_FLAG` (:data:`BIAS_FLAG_CONSISTENCY`) with a 95% interval
that excludes 0. Every flag comes with its evidence.

The weighted decision (:func:`posterior_accept`). For one sample, the posterior of each true answer is
``prior * prod_r L_r[:, y_r]`` normalised (gold: the known answer); the probability that the sample meets the
acceptance rule is ``P(consistent) * P(quality > t_q) * P(complexity > t_x)`` (``P(consistent)`` left out when the
rule does not require it). The consistency prior is the MLLM's calibrated verdict where the sample has one: a
logistic regression of the consensus on the conflict score (:func:`fit_mllm_prior`, fitted on the informative
samples), else the class prior. Raters the fit has not seen get the default rater.

Adaptive overlap (:func:`adaptive_next`): a sample whose posterior lies inside the lead's band and that has fewer
reviews than the cap asks for one more; samples where the MLLM and the first reviewer disagree are served first
(:func:`followup_priority`). Gold adapts per rater (:func:`adaptive_gold_rate`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import optimize
from scipy.special import expit, ndtr
from scipy.stats import beta as beta_dist

from mcie.annotate.aggregation import above

Question = Literal["consistency", "quality", "complexity"]
QUESTIONS: tuple[Question, ...] = ("consistency", "quality", "complexity")
COLUMN: dict[str, str] = {"consistency": "consistent", "quality": "quality", "complexity": "complexity"}
LEVELS: dict[str, int] = {"consistency": 2, "quality": 5, "complexity": 5}
# a good default rater: answers consistency right 85% of the time, scores with no bias and little noise
DEFAULT_CONSISTENCY = np.array([[0.85, 0.15], [0.15, 0.85]])
DEFAULT_ORDINAL = (0.0, 0.7, 0.05)  # bias, sigma, careless share
ORDINAL_PRIOR_WEIGHT = 5.0  # pseudo-samples of evidence for the default ordinal parameters
MIN_FLAG_ITEMS = 20
CARELESS_SKILL = 0.3
BIAS_FLAG = 0.5
BIAS_FLAG_CONSISTENCY = 0.2
EM_ITERATIONS = 50
EM_TOL = 1e-4
_EPS = 1e-9
REVIEW_COLUMNS = ("sample_id", "rater", "consistent", "quality", "complexity")
GOLD_COLUMNS = ("sample_id", "consistent", "quality", "complexity")


class ReliabilityError(ValueError):
    """Malformed input to the reliability model (missing columns, scores outside 1-5 ...)."""


# ----------------------------------------------------------------------------------------------------------
# the ordinal bias/noise likelihood


def ordinal_matrix(bias: float, sigma: float, careless: float, levels: int = 5) -> NDArray[np.float64]:
    """``L[true, observed]`` of the ordinal model on ``levels`` levels (1-based scores, true/observed index 0..)."""
    true = np.arange(1, levels + 1, dtype=float)[:, None]
    cuts = np.concatenate(([-np.inf], np.arange(1.5, levels, 1.0), [np.inf]))
    upper = ndtr((cuts[None, 1:] - true - bias) / sigma)
    lower = ndtr((cuts[None, :-1] - true - bias) / sigma)
    probit = np.clip(upper - lower, 0.0, 1.0)
    return (1.0 - careless) * probit + careless / levels


def _unpack(theta: NDArray[np.float64]) -> tuple[float, float, float]:
    return float(theta[0]), float(np.exp(theta[1])), float(expit(theta[2]))


def _pack(bias: float, sigma: float, careless: float) -> NDArray[np.float64]:
    careless = min(max(careless, 1e-4), 1 - 1e-4)
    return np.array([bias, math.log(sigma), math.log(careless / (1 - careless))])


def fit_ordinal_rater(
    counts: NDArray[np.float64], start: tuple[float, float, float] = DEFAULT_ORDINAL
) -> tuple[float, float, float]:
    """Maximum a-posteriori (bias, sigma, careless) for one rater from soft counts ``counts[true, observed]``.

    The weak prior (:data:`ORDINAL_PRIOR_WEIGHT` pseudo-samples) keeps raters with little overlap near a good
    default rather than at an extreme."""
    default = _pack(*DEFAULT_ORDINAL)
    scale = np.array([1.0, 0.5, 2.0])  # prior spread of bias, log sigma, logit careless

    def loss(theta: NDArray[np.float64]) -> float:
        lik = ordinal_matrix(*_unpack(theta), levels=counts.shape[0])
        nll = -float(np.sum(counts * np.log(lik + _EPS)))
        return nll + 0.5 * ORDINAL_PRIOR_WEIGHT * float(np.sum(((theta - default) / scale) ** 2)) / 3.0

    # BFGS without bounds: the prior keeps the parameters finite, and it is several times faster than L-BFGS-B here
    result = optimize.minimize(loss, _pack(*start), method="BFGS", options={"gtol": 1e-4})
    theta = np.clip(result.x, [-4.0, math.log(0.05), -9.0], [4.0, math.log(10.0), 9.0])
    return _unpack(theta)


# ----------------------------------------------------------------------------------------------------------
# input


def _codes(question: str, values: pd.Series) -> NDArray[np.int64]:
    if question == "consistency":
        return values.astype(bool).to_numpy().astype(np.int64)
    scores = pd.to_numeric(values, errors="coerce").to_numpy()
    if np.isnan(scores).any() or not np.isin(scores, [1, 2, 3, 4, 5]).all():
        bad = scores[np.isnan(scores) | ~np.isin(scores, [1, 2, 3, 4, 5])][0]
        raise ReliabilityError(f"{question} must be an integer score 1-5; got {bad!r}")
    return scores.astype(np.int64) - 1


def _check(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReliabilityError(f"{name} lacks column(s) {', '.join(missing)}; expected {', '.join(columns)}")


@dataclass
class _Data:
    """One question's answers as integer arrays: item index, rater index, observed code."""

    item: NDArray[np.int64]
    rater: NDArray[np.int64]
    code: NDArray[np.int64]
    n_items: int
    gold: dict[int, int]  # item index -> true code
    informative: NDArray[np.bool_]  # per item


def _index(reviews: pd.DataFrame, gold: pd.DataFrame, question: str, items: pd.Index, raters: pd.Index) -> _Data:
    item = items.get_indexer(reviews["sample_id"]).astype(np.int64)
    rater = raters.get_indexer(reviews["rater"]).astype(np.int64)
    code = _codes(question, reviews[COLUMN[question]])
    gold_codes: dict[int, int] = {}
    if len(gold):
        gold_idx = items.get_indexer(gold["sample_id"])
        for i, c in zip(gold_idx, _codes(question, gold[COLUMN[question]]), strict=True):
            if i >= 0:
                gold_codes[int(i)] = int(c)
    per_item = np.bincount(item, minlength=len(items))
    informative = per_item >= 2
    for i in gold_codes:
        informative[i] = True
    return _Data(item, rater, code, len(items), gold_codes, informative)


# ----------------------------------------------------------------------------------------------------------
# posteriors


def _log_posteriors(
    data: _Data, log_lik: NDArray[np.float64], log_prior: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Unnormalised log posterior ``[item, true]`` from every answer (``log_prior`` is [K] or [item, K])."""
    k = log_lik.shape[1]
    out = np.broadcast_to(log_prior, (data.n_items, k)).copy()
    np.add.at(out, data.item, log_lik[data.rater, :, data.code])
    return out


def _normalise(log_post: NDArray[np.float64]) -> NDArray[np.float64]:
    shifted = np.exp(log_post - log_post.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _clamp_gold(post: NDArray[np.float64], gold: Mapping[int, int]) -> NDArray[np.float64]:
    for i, c in gold.items():
        post[i] = 0.0
        post[i, c] = 1.0
    return post


def _soft_counts(data: _Data, post: NDArray[np.float64], n_raters: int, mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    """``counts[rater, true, observed]`` over the review rows in ``mask``."""
    k = post.shape[1]
    counts = np.zeros((n_raters, k, k))
    rows = np.flatnonzero(mask)
    np.add.at(counts, (data.rater[rows], slice(None), data.code[rows]), post[data.item[rows]])
    return counts


# ----------------------------------------------------------------------------------------------------------
# fitting


@dataclass
class QuestionFit:
    """Fitted parameters of one question: class prior and each rater's likelihood matrix (and ordinal numbers)."""

    prior: list[float]
    likelihood: dict[str, list[list[float]]]  # rater key (str) -> L[true][observed]
    ordinal: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # rater -> (bias, sigma, careless)


def _fit_consistency(data: _Data, raters: pd.Index) -> QuestionFit:
    from crowdkit.aggregation import DawidSkene

    rows = data.informative[data.item]
    n_raters = len(raters)
    if not rows.any():
        post_all = np.full((data.n_items, 2), 0.5)
        counts = np.zeros((n_raters, 2, 2))
        prior = np.array([0.5, 0.5])
    else:
        frame = pd.DataFrame({"task": data.item[rows], "worker": data.rater[rows], "label": data.code[rows]})
        tasks = set(frame["task"].tolist())
        gold_items = [i for i in data.gold if i in tasks]
        true_labels = pd.Series({i: data.gold[i] for i in gold_items}, dtype=np.int64) if gold_items else None
        with warnings.catch_warnings():  # crowd-kit 1.4 uses pandas' deprecated inplace=/copy= keywords
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = DawidSkene(n_iter=EM_ITERATIONS, tol=EM_TOL).fit(frame, true_labels=true_labels)
        probas = ds.probas_.reindex(columns=[0, 1], fill_value=0.0)
        post_all = np.full((data.n_items, 2), np.nan)
        post_all[probas.index.to_numpy(dtype=np.int64)] = probas.to_numpy(dtype=float)
        post_all = _clamp_gold(np.nan_to_num(post_all, nan=0.5), data.gold)
        counts = _soft_counts(data, post_all, n_raters, rows)
        informative = np.flatnonzero(data.informative)
        prior = post_all[informative].mean(axis=0)
    # one pseudo-count per true class spread as the default rater answers
    smoothed = counts + DEFAULT_CONSISTENCY[None, :, :]
    lik = smoothed / smoothed.sum(axis=2, keepdims=True)
    prior = np.clip(prior, 0.01, 0.99)
    prior = prior / prior.sum()
    return QuestionFit(prior.tolist(), {str(r): lik[j].tolist() for j, r in enumerate(raters)})


def _fit_ordinal(data: _Data, raters: pd.Index) -> QuestionFit:
    n_raters, k = len(raters), 5
    rows = data.informative[data.item]
    params = [DEFAULT_ORDINAL] * n_raters
    lik = np.stack([ordinal_matrix(*p) for p in params])
    # start from each informative sample's median answer (gold: the truth)
    post = np.full((data.n_items, k), 1.0 / k)
    frame = pd.DataFrame({"item": data.item[rows], "code": data.code[rows]})
    if len(frame):
        medians = frame.groupby("item")["code"].median().round().astype(int)
        post[medians.index.to_numpy()] = np.eye(k)[medians.to_numpy()]
    post = _clamp_gold(post, data.gold)
    informative = np.flatnonzero(data.informative)
    prior = post[informative].mean(axis=0) if len(informative) else np.full(k, 1.0 / k)
    previous = -np.inf
    for _ in range(EM_ITERATIONS if rows.any() else 0):
        counts = _soft_counts(data, post, n_raters, rows)
        params = [fit_ordinal_rater(counts[j], params[j]) for j in range(n_raters)]
        lik = np.stack([ordinal_matrix(*p) for p in params])
        log_post = _log_posteriors(data, np.log(lik + _EPS), np.log(prior + _EPS))
        norm = log_post.max(axis=1) + np.log(np.exp(log_post - log_post.max(axis=1, keepdims=True)).sum(axis=1))
        post = _clamp_gold(_normalise(log_post), data.gold)
        prior = np.clip(post[informative].mean(axis=0), 1e-3, None)
        prior = prior / prior.sum()
        total = float(norm[informative].sum())
        if abs(total - previous) < EM_TOL * max(1.0, abs(total)):
            break
        previous = total
    return QuestionFit(
        prior.tolist(),
        {str(r): lik[j].tolist() for j, r in enumerate(raters)},
        {str(r): params[j] for j, r in enumerate(raters)},
    )


@dataclass
class MllmPrior:
    """``P(consistent | conflict score x) = sigmoid(intercept + slope * x)``, fitted on the informative samples."""

    intercept: float
    slope: float
    n: int

    def p_consistent(self, x: float) -> float:
        return float(expit(self.intercept + self.slope * x))


def fit_mllm_prior(x: NDArray[np.float64], p_consistent: NDArray[np.float64], min_n: int = 30) -> MllmPrior | None:
    """Logistic regression of the (soft) consensus on the MLLM's conflict score ``x`` in [0, 1] (statsmodels GLM with
    fractional responses, quasi-binomial); None with fewer than ``min_n`` samples or when it does not converge."""
    import statsmodels.api as sm

    ok = ~np.isnan(x) & ~np.isnan(p_consistent)
    if ok.sum() < min_n or np.ptp(x[ok]) == 0:
        return None
    design = sm.add_constant(x[ok].astype(float), has_constant="add")
    try:
        result = sm.GLM(np.clip(p_consistent[ok], 0, 1), design, family=sm.families.Binomial()).fit()
    except (ValueError, np.linalg.LinAlgError):  # perfect separation and the like
        return None
    intercept, slope = (float(v) for v in result.params)
    if not (math.isfinite(intercept) and math.isfinite(slope)):
        return None
    return MllmPrior(intercept, slope, int(ok.sum()))


@dataclass
class ReliabilityFit:
    """Everything the weighted rule needs, JSON-serialisable (:meth:`to_json` / :meth:`from_json`)."""

    questions: dict[str, QuestionFit]
    mllm: MllmPrior | None
    n_reviews: int
    n_samples: int
    n_informative: int
    reports: list[dict[str, Any]] = field(default_factory=list)

    def likelihood(self, question: str, rater: Any) -> NDArray[np.float64]:
        fit = self.questions[question]
        found = fit.likelihood.get(str(rater))
        if found is not None:
            return np.asarray(found)
        return DEFAULT_CONSISTENCY if question == "consistency" else ordinal_matrix(*DEFAULT_ORDINAL)

    def to_json(self) -> dict[str, Any]:
        return {
            "questions": {q: asdict(f) for q, f in self.questions.items()},
            "mllm": None if self.mllm is None else asdict(self.mllm),
            "n_reviews": self.n_reviews,
            "n_samples": self.n_samples,
            "n_informative": self.n_informative,
            "reports": self.reports,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReliabilityFit:
        questions = {
            q: QuestionFit(f["prior"], f["likelihood"], {k: tuple(v) for k, v in f.get("ordinal", {}).items()})
            for q, f in data["questions"].items()
        }
        mllm = None if data.get("mllm") is None else MllmPrior(**data["mllm"])
        return cls(questions, mllm, int(data["n_reviews"]), int(data["n_samples"]), int(data["n_informative"]),
                   list(data.get("reports", [])))


def default_fit() -> ReliabilityFit:
    """The model before any fit: every rater is the default rater, flat priors, no MLLM calibration."""
    return ReliabilityFit(
        {
            "consistency": QuestionFit([0.5, 0.5], {}),
            "quality": QuestionFit([0.2] * 5, {}),
            "complexity": QuestionFit([0.2] * 5, {}),
        },
        None,
        0,
        0,
        0,
    )


def fit_reliability(
    reviews: pd.DataFrame, gold: pd.DataFrame | None = None, mllm: Mapping[int, float] | None = None
) -> ReliabilityFit:
    """Fit the model on every non-gold and gold review (see the module docstring).

    ``reviews``: one row per (sample_id, rater) with ``consistent`` (bool), ``quality`` and ``complexity`` (1-5);
    gold samples' reviews included. ``gold``: the known answers (``sample_id``, ``consistent``, ``quality``,
    ``complexity``). ``mllm``: sample id -> conflict score in [0, 1] (1 = the MLLM sees a conflict)."""
    _check(reviews, REVIEW_COLUMNS, "reviews")
    gold = pd.DataFrame(columns=list(GOLD_COLUMNS)) if gold is None else gold
    _check(gold, GOLD_COLUMNS, "gold")
    if reviews.duplicated(["sample_id", "rater"]).any():
        first = reviews.loc[reviews.duplicated(["sample_id", "rater"]), ["sample_id", "rater"]].iloc[0].tolist()
        raise ReliabilityError(f"reviews has duplicate (sample_id, rater) rows, e.g. {first}")
    if reviews.empty:
        return default_fit()
    items = pd.Index(sorted(reviews["sample_id"].unique()))
    raters = pd.Index(sorted(reviews["rater"].unique(), key=str))
    data = {q: _index(reviews, gold, q, items, raters) for q in QUESTIONS}
    questions = {
        "consistency": _fit_consistency(data["consistency"], raters),
        "quality": _fit_ordinal(data["quality"], raters),
        "complexity": _fit_ordinal(data["complexity"], raters),
    }
    fit = ReliabilityFit(questions, None, len(reviews), len(items), int(data["consistency"].informative.sum()))
    # the MLLM prior: calibrated against the consensus of the informative samples
    if mllm:
        d = data["consistency"]
        lik = np.stack([np.asarray(questions["consistency"].likelihood[str(r)]) for r in raters])
        post = _clamp_gold(_normalise(_log_posteriors(d, np.log(lik), np.log(questions["consistency"].prior))), d.gold)
        idx = np.flatnonzero(d.informative)
        x = np.array([mllm.get(int(items[i]), np.nan) for i in idx], dtype=float)
        fit.mllm = fit_mllm_prior(x, post[idx, 1])
    fit.reports = rater_reports(fit, reviews, gold, data, raters)
    return fit


# ----------------------------------------------------------------------------------------------------------
# reports: skill with intervals, flags with evidence


def _weights(k: int) -> NDArray[np.float64]:
    if k == 2:
        return np.eye(2)
    levels = np.arange(k)
    return 1.0 - np.abs(levels[:, None] - levels[None, :]) / (k - 1)


def _skill_interval(a: float, e: float, n: float) -> tuple[float, float, float]:
    if e >= 1 - 1e-9:  # chance agreement is already perfect (one answer only, on a sure consensus): undefined
        return math.nan, math.nan, math.nan
    skill = (a - e) / (1 - e)
    lo, hi = beta_dist.ppf([0.025, 0.975], a * n + 1, (1 - a) * n + 1)
    return skill, (lo - e) / (1 - e), (hi - e) / (1 - e)


def _mean_ci(values: NDArray[np.float64]) -> tuple[float, float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    half = 1.96 * float(values.std(ddof=1)) / math.sqrt(n) if n > 1 else math.inf
    return mean, mean - half, mean + half


def _r(x: float, digits: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def rater_reports(
    fit: ReliabilityFit, reviews: pd.DataFrame, gold: pd.DataFrame, data: Mapping[str, _Data], raters: pd.Index
) -> list[dict[str, Any]]:
    """Per rater: skill with a 95% interval per question and overall, bias, flags and their evidence (JSON-ready)."""
    per_question: dict[str, dict[int, dict[str, Any]]] = {}
    for q in QUESTIONS:
        d = data[q]
        k = LEVELS[q]
        lik = np.stack([fit.likelihood(q, r) for r in raters])
        log_lik = np.log(lik + _EPS)
        log_post = _log_posteriors(d, log_lik, np.log(np.asarray(fit.questions[q].prior) + _EPS))
        own = log_lik[d.rater, :, d.code]
        loo = _normalise(log_post[d.item] - own)  # leave-self-out posterior of each review's sample
        gold_code = np.full(d.n_items, -1)
        if d.gold:
            gold_code[list(d.gold)] = list(d.gold.values())
        has_gold = gold_code[d.item] >= 0
        loo[has_gold] = np.eye(k)[gold_code[d.item][has_gold]]
        # only reviews whose sample has other evidence (another review or gold)
        others = np.bincount(d.item, minlength=d.n_items)[d.item] >= 2
        rows = others | has_gold
        w = _weights(k)
        expected = loo @ np.arange(k)
        out: dict[int, dict[str, Any]] = {}
        for j in range(len(raters)):
            mine = rows & (d.rater == j)
            n = int(mine.sum())
            if n == 0:
                out[j] = {"n": 0, "n_gold": 0, "skill": None, "skill_low": None, "skill_high": None, "bias": None,
                          "bias_low": None, "bias_high": None}
                continue
            codes = d.code[mine]
            agree = float(np.mean(np.sum(loo[mine] * w[:, codes].T, axis=1)))
            own_dist = np.bincount(codes, minlength=k) / n
            chance = float(own_dist @ w @ loo[mine].mean(axis=0))
            skill, lo, hi = _skill_interval(agree, chance, n)
            bias, b_lo, b_hi = _mean_ci(codes - expected[mine])
            out[j] = {"n": n, "n_gold": int((mine & has_gold).sum()), "skill": skill, "skill_low": lo,
                      "skill_high": hi, "bias": bias, "bias_low": b_lo, "bias_high": b_hi}
        per_question[q] = out
    reports = []
    for j, rater in enumerate(raters):
        entry: dict[str, Any] = {"rater": rater if isinstance(rater, str | int) else str(rater), "questions": {}}
        flags: list[dict[str, str]] = []
        careless_evidence = []
        skills, weights = [], []
        for q in QUESTIONS:
            s = per_question[q][j]
            row = {"n_samples": s["n"], "n_gold": s["n_gold"], "skill": _r(s["skill"]),
                   "skill_ci": [_r(s["skill_low"]), _r(s["skill_high"])], "bias": _r(s["bias"]),
                   "bias_ci": [_r(s["bias_low"]), _r(s["bias_high"])]}
            ordinal = fit.questions[q].ordinal.get(str(rater))
            if ordinal is not None:
                row["model"] = {"bias": _r(ordinal[0]), "sigma": _r(ordinal[1]), "careless": _r(ordinal[2])}
            else:
                lik = fit.likelihood(q, rater)
                row["model"] = {"p_yes_when_consistent": _r(lik[1][1]), "p_no_when_inconsistent": _r(lik[0][0])}
            entry["questions"][q] = row
            if s["n"] and s["skill"] is not None and math.isfinite(s["skill"]):
                skills.append(s["skill"])
                weights.append(s["n"])
            if s["n"] < MIN_FLAG_ITEMS:
                continue
            if s["skill_high"] < CARELESS_SKILL:
                careless_evidence.append(
                    f"{q}: skill {s['skill']:.2f} (95% interval {s['skill_low']:.2f} to {s['skill_high']:.2f}) on "
                    f"{s['n']} samples checked against others or gold"
                )
            limit = BIAS_FLAG_CONSISTENCY if q == "consistency" else BIAS_FLAG
            if abs(s["bias"]) >= limit and (s["bias_low"] > 0 or s["bias_high"] < 0):
                direction = "high" if s["bias"] > 0 else "low"
                what = "says 'consistent' more often than" if q == "consistency" else f"rates {q} higher than"
                if direction == "low":
                    what = "says 'consistent' less often than" if q == "consistency" else f"rates {q} lower than"
                unit = " (share of yes)" if q == "consistency" else " points"
                evidence = (
                    f"{what} the consensus by {abs(s['bias']):.2f}{unit} on average "
                    f"(95% interval {s['bias_low']:+.2f} to {s['bias_high']:+.2f}, {s['n']} samples)"
                )
                flags.append({"flag": f"biased_{direction}", "question": q, "evidence": evidence})
        if len(careless_evidence) >= 2:  # a careless rater's mean offset is an artefact of answering at random
            flags = [{"flag": "careless", "question": "all", "evidence": "; ".join(careless_evidence)}]
        overall = float(np.average(skills, weights=weights)) if skills else math.nan
        entry["skill"] = _r(overall)
        entry["n_samples"] = max((per_question[q][j]["n"] for q in QUESTIONS), default=0)
        entry["flags"] = flags
        reports.append(entry)
    ranked = sorted(reports, key=lambda e: -math.inf if e["skill"] is None else e["skill"], reverse=True)
    for rank, entry in enumerate(ranked, start=1):
        entry["rank"] = rank
    return sorted(reports, key=lambda e: e["rank"])


# ----------------------------------------------------------------------------------------------------------
# the weighted decision


@dataclass(frozen=True)
class Posterior:
    """Posterior probability that a sample meets the acceptance rule, and its parts."""

    p_accept: float
    p_consistent: float
    p_quality: float
    p_complexity: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def _question_posterior(
    fit: ReliabilityFit, question: str, answers: Sequence[tuple[Any, int]], prior: NDArray[np.float64] | None = None
) -> NDArray[np.float64]:
    log_post = np.log((np.asarray(fit.questions[question].prior) if prior is None else prior) + _EPS)
    for rater, code in answers:
        log_post = log_post + np.log(fit.likelihood(question, rater)[:, code] + _EPS)
    post = np.exp(log_post - log_post.max())
    return post / post.sum()


def posterior_accept(
    fit: ReliabilityFit,
    reviews: Sequence[Mapping[str, Any]],
    *,
    quality_above: float,
    complexity_above: float,
    require_consistent: bool = True,
    mllm_score: float | None = None,
    use_mllm: bool = True,
) -> Posterior:
    """:class:`Posterior` of one sample from its reviews (mappings with ``rater``, ``consistent``, ``quality``,
    ``complexity``) and, where it has one, the MLLM's conflict score (module docstring)."""
    prior = None
    if use_mllm and mllm_score is not None and fit.mllm is not None and math.isfinite(mllm_score):
        p = fit.mllm.p_consistent(mllm_score)
        prior = np.array([1 - p, p])
    c = _question_posterior(fit, "consistency", [(r["rater"], int(bool(r["consistent"]))) for r in reviews], prior)
    levels = np.arange(1, 6)
    q = _question_posterior(fit, "quality", [(r["rater"], int(r["quality"]) - 1) for r in reviews])
    x = _question_posterior(fit, "complexity", [(r["rater"], int(r["complexity"]) - 1) for r in reviews])
    p_c = float(c[1])
    p_q = float(q[[above(float(level), quality_above) for level in levels]].sum())
    p_x = float(x[[above(float(level), complexity_above) for level in levels]].sum())
    p = (p_c if require_consistent else 1.0) * p_q * p_x
    return Posterior(p, p_c, p_q, p_x)


def weighted_outcome(posterior: Posterior, accept_at: float) -> Literal["accepted", "rejected"]:
    return "accepted" if posterior.p_accept >= accept_at else "rejected"


def expected_wrong(p_accept: Sequence[float], accepted: Sequence[bool]) -> float:
    """Expected number of wrong decisions given the posteriors: ``sum(1 - p)`` over accepted, ``sum(p)`` over the
    rejected samples."""
    p = np.asarray(p_accept, dtype=float)
    a = np.asarray(accepted, dtype=bool)
    return float(np.sum(np.where(a, 1 - p, p)))


# ----------------------------------------------------------------------------------------------------------
# adaptive overlap


def adaptive_next(p_accept: float, n_reviews: int, *, band: tuple[float, float], cap: int) -> bool:
    """Whether a sample should get one more review: its posterior lies inside ``band`` (inclusive) and it has fewer
    than ``cap`` reviews."""
    low, high = band
    return n_reviews < cap and low <= p_accept <= high


def disagrees_with_mllm(mllm_score: float | None, consistent_answers: Sequence[bool]) -> bool:
    """The MLLM (score >= 0.5: conflict) and the reviewers' majority (ties count as "consistent") disagree."""
    if mllm_score is None or not consistent_answers or not math.isfinite(mllm_score):
        return False
    human_says_conflict = sum(consistent_answers) * 2 < len(consistent_answers)
    return (mllm_score >= 0.5) != human_says_conflict


FOLLOWUP_BOOST = 1.0  # pipeline priorities lie in [0, 1]: every follow-up comes before fresh samples
DISAGREEMENT_BOOST = 1.0  # and MLLM-vs-reviewer disagreements before other follow-ups


def followup_priority(base: float, *, disagreement: bool, p_accept: float) -> float:
    """Queue priority of a sample waiting for one more review: above every fresh sample (the decision is half made),
    disagreements with the MLLM first, then the most uncertain (posterior nearest 0.5)."""
    base = min(max(base, 0.0), 1.0)
    uncertainty = 1 - abs(2 * p_accept - 1)
    return FOLLOWUP_BOOST + (DISAGREEMENT_BOOST if disagreement else 0.0) + 0.5 * uncertainty + 0.1 * base


def adaptive_gold_rate(
    base_rate: float, report: Mapping[str, Any] | None, previous_skill: float | None = None, *, max_factor: float = 3.0
) -> float:
    """Gold rate of one rater: ``base_rate`` scaled by how uncertain or falling their reliability is.

    No report (new rater) or fewer than :data:`MIN_FLAG_ITEMS` checked samples: ``max_factor`` times. Otherwise the
    factor is the width of their consistency skill interval over 0.3 (a rater measured to +-0.15 gets the base
    rate), clipped to [0.5, ``max_factor``], and doubled (up to ``max_factor``) when their skill fell by more than 0.1
    since ``previous_skill``. Never above 0.5."""
    if report is None or int(report.get("n_samples") or 0) < MIN_FLAG_ITEMS:
        return min(0.5, base_rate * max_factor)
    low, high = report["questions"]["consistency"]["skill_ci"]
    width = (high - low) if low is not None and high is not None else 1.0
    factor = min(max(width / 0.3, 0.5), max_factor)
    skill = report.get("skill")
    if previous_skill is not None and skill is not None and skill < previous_skill - 0.1:
        factor = min(2 * factor, max_factor)
    return min(0.5, base_rate * factor)
