"""Statistics for comparing RL algorithms over a handful of seeds.

RL results vary a lot from seed to seed, and papers usually have 3 to 10 seeds per
algorithm. Agarwal et al. (2021), "Deep Reinforcement Learning at the Edge of the Statistical
Precipice", show that a bare mean (or, worse, a best seed) over so few runs routinely ranks
algorithms wrongly, and recommend the figures below. Every function here takes plain
per-seed scores (one number per seed: final accuracy, mean return, ...), is pure, and is
deterministic for a given ``seed``.

``iqm`` -- interquartile mean
    The mean of the middle 50% of the scores: drop the lowest and highest quarter, average
    the rest. Unlike the median it still uses half of the runs, so it moves less from one set
    of seeds to the next; unlike the mean, one diverged or lucky seed cannot drag it. The cut
    follows ``scipy.stats.trim_mean(scores, 0.25)`` (as rliable does): ``int(0.25 * n)``
    scores are dropped from each end, so with ``n`` not a multiple of 4 slightly less than a
    quarter goes, and with ``n < 4`` nothing goes and the IQM equals the mean.

``bootstrap_ci`` -- how far the mean or IQM could move with other seeds
    A percentile bootstrap confidence interval: resample the seeds with replacement many
    times, compute the statistic on each resample, and report the central ``confidence``
    share of those values (2.5th to 97.5th percentile for 95%). Report it beside every point
    estimate; two algorithms whose intervals overlap a lot are not shown to differ. With few
    seeds the percentile interval is somewhat too narrow, which is one more reason to run
    more seeds, not a reason to leave it out.

``probability_of_improvement`` -- P(X > Y)
    The chance that a run of algorithm X, picked at random, scores higher than a random run
    of algorithm Y, ties counting one half: the Mann-Whitney U statistic divided by ``n * m``
    (the number of seed pairs). 0.5 means no difference; it says nothing about how *much*
    better X is, only how often, so it is robust to outlying seeds and to the score's scale.
    ``probability_of_improvement_ci`` bootstraps it, resampling X's and Y's seeds
    independently. A lower end above 0.5 says X beats Y more often than not, at that
    confidence; an interval straddling 0.5 says the seeds cannot tell them apart.

``first_crossing`` -- cost to reach a threshold
    The first x (samples, tokens, seconds, optimizer step) at which a learning curve reaches
    a threshold score: "samples to 80% accuracy". Compute it per seed, then summarise those
    per-seed costs with the figures above (treat ``None``, never reached, explicitly: drop
    and report the count, or replace by the run's budget as a lower bound).

``summarize`` -- everything a results table needs for one algorithm
    n, mean with its bootstrap CI, IQM, sample standard deviation, min and max.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike, NDArray

#: Statistics ``bootstrap_ci`` can put an interval on.
Statistic = Literal["mean", "iqm"]

#: Share of scores ``iqm`` drops from each end (Agarwal et al.'s interquartile mean).
IQM_CUT = 0.25

#: Upper bound on ``resamples * n * m`` comparisons held in memory at once by
#: ``probability_of_improvement_ci``; larger jobs are done in chunks.
_MAX_PAIR_COMPARISONS = 10_000_000


@dataclass(frozen=True)
class Summary:
    """One algorithm's per-seed scores summarised for a results table."""

    n: int
    """Number of seeds (scores)."""
    mean: float
    """Arithmetic mean of the scores."""
    ci_low: float
    """Lower end of the percentile bootstrap CI of the mean."""
    ci_high: float
    """Upper end of the percentile bootstrap CI of the mean."""
    iqm: float
    """Interquartile mean (see ``iqm``)."""
    std: float
    """Sample standard deviation (``ddof=1``); 0 for a single seed."""
    min: float
    """Lowest score."""
    max: float
    """Highest score."""


def _as_scores(scores: ArrayLike, name: str = "scores") -> NDArray[np.float64]:
    """Per-seed scores as a 1-D float array; ``ValueError`` if empty, not 1-D, NaN or inf."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D list of per-seed scores, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: need at least one per-seed score")
    nan_at = np.flatnonzero(np.isnan(array))
    if nan_at.size:
        raise ValueError(
            f"{name} contains NaN at index {nan_at.tolist()}: drop or fix those seeds before comparing"
        )
    inf_at = np.flatnonzero(np.isinf(array))
    if inf_at.size:
        raise ValueError(f"{name} contains inf at index {inf_at.tolist()}: scores must be finite")
    return array


def _check_bootstrap_args(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")


def _iqm_along(values: NDArray[np.float64], axis: int = -1) -> NDArray[np.float64]:
    return scipy.stats.trim_mean(values, IQM_CUT, axis=axis)


_STATISTICS: dict[str, Callable[..., NDArray[np.float64]]] = {"mean": np.mean, "iqm": _iqm_along}


def iqm(scores: ArrayLike) -> float:
    """Interquartile mean: the mean after dropping ``int(0.25 * n)`` scores from each end.

    Parameters
    ----------
    scores : per-seed scores, one number per seed.

    Returns
    -------
    float : ``scipy.stats.trim_mean(scores, 0.25)``; equals the mean for ``n < 4``.
    """
    return float(_iqm_along(_as_scores(scores)))


def bootstrap_ci(
    scores: ArrayLike,
    statistic: Statistic = "mean",
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a statistic over seeds.

    Parameters
    ----------
    scores : per-seed scores.
    statistic : ``"mean"`` or ``"iqm"``.
    confidence : coverage of the interval, e.g. 0.95.
    resamples : number of bootstrap resamples of the seeds.
    seed : seeds the ``numpy.random.Generator`` that draws the resamples.

    Returns
    -------
    (low, high) : the interval; ``(x, x)`` when there is one score or all scores equal ``x``,
        since every resample then gives ``x``.
    """
    values = _as_scores(scores)
    _check_bootstrap_args(confidence, resamples)
    if statistic not in _STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(_STATISTICS)}, got {statistic!r}")
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    result = scipy.stats.bootstrap(
        (values,),
        _STATISTICS[statistic],
        n_resamples=resamples,
        vectorized=True,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)


def _improvement_along(x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
    """P(X > Y) over the last axis of ``x`` ``[..., n]`` and ``y`` ``[..., m]``, ties 1/2."""
    greater = x[..., :, None] > y[..., None, :]
    tied = x[..., :, None] == y[..., None, :]
    return (greater + 0.5 * tied).mean(axis=(-2, -1))


def probability_of_improvement(x_scores: ArrayLike, y_scores: ArrayLike) -> float:
    """Probability that a random seed of X beats a random seed of Y, ties counting 1/2.

    Parameters
    ----------
    x_scores : per-seed scores of algorithm X (``n`` seeds).
    y_scores : per-seed scores of algorithm Y (``m`` seeds).

    Returns
    -------
    float : Mann-Whitney ``U / (n * m)`` in [0, 1]; 0.5 means no difference.
    """
    x = _as_scores(x_scores, "x_scores")
    y = _as_scores(y_scores, "y_scores")
    return float(_improvement_along(x, y))


def probability_of_improvement_ci(
    x_scores: ArrayLike,
    y_scores: ArrayLike,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``probability_of_improvement``.

    A hand-rolled bootstrap rather than ``scipy.stats.bootstrap(paired=False)``: scipy refuses
    a sample of one seed, and comparing against a single baseline run is common. Each
    resample draws ``n`` of X's seeds and, independently, ``m`` of Y's, with replacement.

    Parameters
    ----------
    x_scores, y_scores : per-seed scores of algorithms X and Y.
    confidence : coverage of the interval, e.g. 0.95.
    resamples : number of bootstrap resamples.
    seed : seeds the ``numpy.random.Generator`` that draws the resamples.

    Returns
    -------
    (low, high) : the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the
        resampled estimates (linear interpolation, as scipy's percentile method).
    """
    x = _as_scores(x_scores, "x_scores")
    y = _as_scores(y_scores, "y_scores")
    _check_bootstrap_args(confidence, resamples)
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_PAIR_COMPARISONS // (x.size * y.size))
    estimates = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        x_resampled = x[rng.integers(0, x.size, size=(size, x.size))]
        y_resampled = y[rng.integers(0, y.size, size=(size, y.size))]
        estimates[start : start + size] = _improvement_along(x_resampled, y_resampled)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(estimates, [tail, 1.0 - tail])
    return float(low), float(high)


def first_crossing(xs: ArrayLike, ys: ArrayLike, threshold: float) -> float | None:
    """The first x at which the curve ``ys`` reaches ``threshold`` (``y >= threshold``).

    Parameters
    ----------
    xs : the cost axis in increasing order: samples, tokens, seconds or steps.
    ys : the score at each x, same length as ``xs``. NaN never counts as reached.
    threshold : the score to reach.

    Returns
    -------
    float or None : ``xs[i]`` for the first ``i`` with ``ys[i] >= threshold``; None if never.
    """
    x_values = np.asarray(xs, dtype=np.float64)
    y_values = np.asarray(ys, dtype=np.float64)
    if x_values.ndim != 1 or y_values.ndim != 1 or x_values.shape != y_values.shape:
        raise ValueError(
            f"xs and ys must be 1-D and the same length, got shapes {x_values.shape} and {y_values.shape}"
        )
    if np.any(np.diff(x_values) < 0):
        raise ValueError("xs must be non-decreasing (sort the curve by x before looking for a crossing)")
    reached = np.flatnonzero(y_values >= threshold)
    if reached.size == 0:
        return None
    return float(x_values[reached[0]])


def summarize(scores: ArrayLike, confidence: float = 0.95, seed: int = 0, resamples: int = 10_000) -> Summary:
    """Summarise per-seed scores for a results table.

    Parameters
    ----------
    scores : per-seed scores.
    confidence : coverage of the bootstrap CI of the mean.
    seed : seeds the bootstrap.
    resamples : number of bootstrap resamples.

    Returns
    -------
    Summary : n, mean, CI of the mean, IQM, sample std (0 for one seed), min and max.
    """
    values = _as_scores(scores)
    ci_low, ci_high = bootstrap_ci(values, "mean", confidence=confidence, resamples=resamples, seed=seed)
    return Summary(
        n=int(values.size),
        mean=float(values.mean()),
        ci_low=ci_low,
        ci_high=ci_high,
        iqm=iqm(values),
        std=float(values.std(ddof=1)) if values.size > 1 else 0.0,
        min=float(values.min()),
        max=float(values.max()),
    )
