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

``mean_ci`` -- how far the mean could move with other seeds
    The Student-t interval ``mean +- t_{(1+c)/2, n-1} * s / sqrt(n)`` (``s`` the sample
    standard deviation). It holds its nominal coverage at the 3 to 10 seeds people run,
    where the percentile bootstrap does not: in 2,000 simulated repetitions the bootstrap's
    nominal 95% covered the true mean 51% of the time at 2 seeds, 75% at 3, 85% at 5 and 88%
    at 10; the t-interval 93-96% at 3, 5 and 10, for normal and skewed (Beta(2, 5)) scores
    alike (``tests/test_interval_coverage.py`` keeps it so).
    Below 3 seeds a report prints no interval: one seed has none, and with two the t quantile
    is 12.7, an interval that says nothing.

``bootstrap_ci`` -- the same for the IQM (or the mean, where a bootstrap is wanted)
    A percentile bootstrap confidence interval: resample the seeds with replacement many
    times, compute the statistic on each resample, and report the central ``confidence``
    share of those values (2.5th to 97.5th percentile for 95%). The IQM has no t-interval, so
    this is its interval; it cannot leave the range of the seeds' scores and so is too
    narrow with few seeds (the figures above), which reports state beside it.

``paired_difference`` -- A minus B, seed by seed
    Runs of two algorithms with the same seed share the warm start and the prompt sequence,
    so the per-seed differences ``a_i - b_i`` cancel what the seed does to both. Their mean,
    its t-interval, and ``seeds_to_resolve``: how many seeds the interval would need to
    exclude 0 if the mean difference and its spread stayed as observed.

``stratified_bootstrap_ci`` -- one figure over several tasks
    rliable's aggregate over tasks x seeds: the IQM of every task's scores pooled, or the
    mean of the per-task means, with a percentile bootstrap that resamples seeds *within*
    each task (a stratified bootstrap), so every resample keeps every task's share.

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
    n, mean with its t-interval, IQM, sample standard deviation, min and max.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
    """Lower end of the Student-t interval of the mean (``mean_ci``); NaN for one seed."""
    ci_high: float
    """Upper end of the Student-t interval of the mean (``mean_ci``); NaN for one seed."""
    iqm: float
    """Interquartile mean (see ``iqm``)."""
    std: float
    """Sample standard deviation (``ddof=1``); 0 for a single seed."""
    min: float
    """Lowest score."""
    max: float
    """Highest score."""


@dataclass(frozen=True)
class PairedDifference:
    """Mean of the per-seed differences ``a_i - b_i`` of two algorithms run on the same seeds."""

    mean: float
    """Mean difference, A minus B."""
    lo: float
    """Lower end of the Student-t interval of the mean difference; NaN below 2 seeds."""
    hi: float
    """Upper end of the Student-t interval of the mean difference; NaN below 2 seeds."""
    n: int
    """Number of seeds both algorithms finished (pairs)."""
    sd: float
    """Sample standard deviation (``ddof=1``) of the differences; NaN below 2 seeds."""
    seeds_needed: int | None
    """``seeds_to_resolve(mean, sd)``: seeds for the interval to exclude 0 at this mean and
    spread; None when the mean difference is 0 (or there is no spread to judge by)."""


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

    The IQM's interval. For the mean, ``mean_ci`` covers as it says at few seeds and this
    does not (about 75% for a nominal 95% at 3 seeds, see the module docstring).

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


def _t_quantile(confidence: float, dof: ArrayLike) -> NDArray[np.float64]:
    """``t_{(1 + confidence) / 2, dof}``: the half-width of a central interval in standard errors."""
    return np.asarray(scipy.stats.t.ppf((1.0 + confidence) / 2.0, dof), dtype=np.float64)


def t_intervals(
    samples: ArrayLike, confidence: float = 0.95
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Student-t intervals of the mean of each row of ``samples`` (``[..., n]``), vectorised.

    Parameters
    ----------
    samples : scores along the last axis, ``n >= 2`` of them per row.
    confidence : coverage of each interval, e.g. 0.95.

    Returns
    -------
    (low, high) : arrays of shape ``samples.shape[:-1]``:
        ``mean -+ t_{(1+c)/2, n-1} * s / sqrt(n)``, ``s`` the sample standard deviation.
    """
    values = np.asarray(samples, dtype=np.float64)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    n = values.shape[-1] if values.ndim else 0
    if n < 2:
        raise ValueError(f"a t-interval needs at least 2 scores per row, got {n}")
    centre = values.mean(axis=-1)
    half = _t_quantile(confidence, n - 1) * values.std(axis=-1, ddof=1) / math.sqrt(n)
    return centre - half, centre + half


def mean_ci(values: ArrayLike, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean of per-seed scores.

    The interval a results table should give for a mean over seeds: unlike the percentile
    bootstrap it reaches its nominal coverage at 3 to 10 seeds (see the module docstring).
    It equals ``scipy.stats.ttest_1samp(values, 0).confidence_interval(confidence)``.

    Parameters
    ----------
    values : per-seed scores, at least 2.
    confidence : coverage of the interval, e.g. 0.95.

    Returns
    -------
    (low, high) : ``mean -+ t_{(1+c)/2, n-1} * s / sqrt(n)``; ``(x, x)`` when every score is ``x``.
    """
    scores = _as_scores(values, "values")
    if scores.size < 2:
        raise ValueError("values has 1 score: a t-interval of the mean needs at least 2 seeds")
    low, high = t_intervals(scores, confidence)
    return float(low), float(high)


def seeds_to_resolve(difference: float, sd: float, confidence: float = 0.95) -> int | None:
    """Seeds a paired t-interval needs to exclude 0, if the mean and spread stay as observed.

    The smallest ``n >= 2`` with ``t_{(1+c)/2, n-1} * sd / sqrt(n) < |difference|``; the
    half-width falls as ``n`` grows, so a doubling search then bisection finds it.

    Parameters
    ----------
    difference : the mean of the per-seed differences.
    sd : their sample standard deviation.
    confidence : coverage of the interval, e.g. 0.95.

    Returns
    -------
    int or None : the seed count; 2 when ``sd`` is 0 (2 is the fewest a t-interval takes);
        None when ``difference`` is 0 (no seed count resolves it) or either input is NaN.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    if math.isnan(difference) or math.isnan(sd) or difference == 0.0:
        return None
    if sd < 0:
        raise ValueError(f"sd must be non-negative, got {sd}")
    target = abs(difference)

    def resolves(n: int) -> bool:
        return float(_t_quantile(confidence, n - 1)) * sd / math.sqrt(n) < target

    low, high = 1, 2  # resolves(low) is False by convention (no interval from one seed)
    while not resolves(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if resolves(middle) else (middle, high)
    return high


def paired_difference(a: ArrayLike, b: ArrayLike, confidence: float = 0.95) -> PairedDifference:
    """The mean difference ``a - b`` over seeds both algorithms ran, with its t-interval.

    ``a[i]`` and ``b[i]`` must be the scores of the same seed: runs of one seed share the
    warm start and the prompt sequence, so pairing them removes that shared variation and
    the interval is the paired t-test's (``scipy.stats.ttest_rel(a, b)``'s).

    Parameters
    ----------
    a, b : per-seed scores of algorithms A and B, aligned by seed, same length.
    confidence : coverage of the interval, e.g. 0.95.

    Returns
    -------
    PairedDifference : mean, interval (``lo``, ``hi``), ``n``, ``sd`` of the differences and
        ``seeds_needed`` (``seeds_to_resolve``); interval and sd are NaN for one pair.
    """
    x = _as_scores(a, "a")
    y = _as_scores(b, "b")
    if x.shape != y.shape:
        raise ValueError(
            f"a and b must hold one score per shared seed, in the same order; got {x.size} and {y.size}"
        )
    differences = x - y
    mean = float(differences.mean())
    if differences.size < 2:
        nan = float("nan")
        return PairedDifference(mean, nan, nan, 1, nan, None)
    low, high = t_intervals(differences, confidence)
    sd = float(differences.std(ddof=1))
    return PairedDifference(
        mean=mean,
        lo=float(low),
        hi=float(high),
        n=int(differences.size),
        sd=sd,
        seeds_needed=seeds_to_resolve(mean, sd, confidence),
    )


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


#: A statistic of scores over tasks: per-task arrays ``[..., n_task]`` in, ``[...]`` out.
TaskStatistic = Callable[[Sequence[NDArray[np.float64]]], NDArray[np.float64]]


def _aggregate_iqm(by_task: Sequence[NDArray[np.float64]]) -> NDArray[np.float64]:
    # rliable's aggregate_iqm: one trimmed mean over every task's runs pooled
    return _iqm_along(np.concatenate(list(by_task), axis=-1))


def _aggregate_mean(by_task: Sequence[NDArray[np.float64]]) -> NDArray[np.float64]:
    # rliable's aggregate_mean: each task weighs the same, however many runs it finished
    return np.mean([scores.mean(axis=-1) for scores in by_task], axis=0)


_TASK_STATISTICS: dict[str, TaskStatistic] = {"mean": _aggregate_mean, "iqm": _aggregate_iqm}


def _as_tasks(scores_by_task: Sequence[ArrayLike]) -> list[NDArray[np.float64]]:
    if len(scores_by_task) == 0:
        raise ValueError("scores_by_task is empty: need the per-seed scores of at least one task")
    return [_as_scores(scores, f"scores_by_task[{i}]") for i, scores in enumerate(scores_by_task)]


def _task_statistic(statistic: Statistic | TaskStatistic) -> TaskStatistic:
    if callable(statistic):
        return statistic
    if statistic not in _TASK_STATISTICS:
        raise ValueError(
            f"statistic must be one of {sorted(_TASK_STATISTICS)} or a callable, got {statistic!r}"
        )
    return _TASK_STATISTICS[statistic]


def aggregate_score(
    scores_by_task: Sequence[ArrayLike], statistic: Statistic | TaskStatistic = "iqm"
) -> float:
    """A statistic over tasks x seeds, as rliable aggregates: the point estimate that
    ``stratified_bootstrap_ci`` puts an interval on.

    Parameters
    ----------
    scores_by_task : per task, its per-seed scores (tasks may have different seed counts).
    statistic : ``"iqm"`` (trimmed mean of every score pooled), ``"mean"`` (mean of the
        per-task means), or a callable taking the per-task arrays ``[..., n_task]`` and
        reducing them to ``[...]``.

    Returns
    -------
    float : the statistic on the scores as observed.
    """
    return float(_task_statistic(statistic)(_as_tasks(scores_by_task)))


def stratified_bootstrap_ci(
    scores_by_task: Sequence[ArrayLike],
    statistic: Statistic | TaskStatistic = "iqm",
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of a statistic over tasks x seeds, seeds resampled per task.

    Each resample draws, for every task on its own, as many of that task's seeds as it has,
    with replacement (rliable's ``StratifiedBootstrap``): tasks differ in difficulty far more
    than seeds do, and an unstratified resample would vary how much each task counts. With
    one task it is ``bootstrap_ci`` exactly (the same draws for the same ``seed``).

    Parameters
    ----------
    scores_by_task : per task, its per-seed scores.
    statistic : ``"iqm"``, ``"mean"`` or a callable, as in ``aggregate_score``.
    confidence : coverage of the interval, e.g. 0.95.
    resamples : number of bootstrap resamples.
    seed : seeds the ``numpy.random.Generator`` that draws the resamples, task by task.

    Returns
    -------
    (low, high) : the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the
        resampled statistic (linear interpolation, as scipy's percentile method).
    """
    tasks = _as_tasks(scores_by_task)
    _check_bootstrap_args(confidence, resamples)
    reduce = _task_statistic(statistic)
    rng = np.random.default_rng(seed)
    resampled = [scores[rng.integers(0, scores.size, size=(resamples, scores.size))] for scores in tasks]
    estimates = np.asarray(reduce(resampled), dtype=np.float64)
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
    confidence : coverage of the t-interval of the mean.
    seed, resamples : unused since the mean's interval became a t-interval; kept so that
        callers passing them still work.

    Returns
    -------
    Summary : n, mean, its t-interval (NaN for one seed), IQM, sample std (0 for one seed),
        min and max.
    """
    values = _as_scores(scores)
    ci_low, ci_high = mean_ci(values, confidence) if values.size > 1 else (float("nan"), float("nan"))
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
