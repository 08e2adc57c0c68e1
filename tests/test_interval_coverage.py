"""The mean's interval covers the true mean as often as it says, at the seed counts people run.

A seeded simulation: 2,000 repetitions of n seeds' scores from a known distribution, and the
share of repetitions whose 95% interval contains the true mean. With 2,000 repetitions the
share's standard error is sqrt(0.95 * 0.05 / 2000) = 0.005, so [0.92, 0.98] is about six
standard errors around 0.95: a correct interval stays inside it, the percentile bootstrap's
0.72-0.90 does not.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import scipy.stats
from numpy.typing import NDArray

from rlbench.stats import mean_ci, t_intervals

REPETITIONS = 2000
SEED_COUNTS = (3, 5, 10)
Draw = Callable[[np.random.Generator, tuple[int, int]], NDArray[np.float64]]
#: (name, draw, true mean): accuracy-like scores, one symmetric and one skewed (Beta(2, 5) has
#: mean 2 / (2 + 5) = 2/7 and skewness 0.6, so a t-interval is not exact there).
DISTRIBUTIONS: list[tuple[str, Draw, float]] = [
    ("normal(0.5, 0.1)", lambda rng, size: rng.normal(0.5, 0.1, size), 0.5),
    ("beta(2, 5)", lambda rng, size: rng.beta(2.0, 5.0, size), 2.0 / 7.0),
]


def coverage(low: NDArray[np.float64], high: NDArray[np.float64], truth: float) -> float:
    return float(np.mean((low <= truth) & (truth <= high)))


@pytest.mark.parametrize("n", SEED_COUNTS)
@pytest.mark.parametrize(("name", "draw", "truth"), DISTRIBUTIONS, ids=[d[0] for d in DISTRIBUTIONS])
def test_mean_interval_reaches_its_nominal_coverage(name: str, draw: Draw, truth: float, n: int) -> None:
    rng = np.random.default_rng(2026 + n)
    scores = draw(rng, (REPETITIONS, n))
    low, high = t_intervals(scores, 0.95)
    share = coverage(low, high, truth)
    print(f"{name}, n={n}: the 95% t-interval covered the true mean in {share:.3f} of {REPETITIONS}")
    assert 0.92 <= share <= 0.98
    # the vectorised intervals are mean_ci's, row by row, and scipy's one-sample t-intervals
    for i in range(20):
        expected = scipy.stats.ttest_1samp(scores[i], 0.0).confidence_interval(0.95)
        assert mean_ci(scores[i]) == pytest.approx((low[i], high[i]), rel=1e-12)
        assert mean_ci(scores[i]) == pytest.approx((expected.low, expected.high), rel=1e-12)


def test_the_percentile_bootstrap_it_replaces_under_covers_at_three_seeds() -> None:
    # Why the mean has a t-interval: the percentile bootstrap's interval cannot leave the
    # range of the seeds' scores, and at n = 3 its nominal 95% covers about 75%.
    rng = np.random.default_rng(7)
    n, resamples = 3, 1000
    scores = rng.normal(0.5, 0.1, (REPETITIONS, n))
    picks = rng.integers(0, n, (REPETITIONS, resamples, n))
    means = np.take_along_axis(scores[:, None, :], picks, axis=-1).mean(axis=-1)
    low, high = np.quantile(means, [0.025, 0.975], axis=1)
    share = coverage(low, high, 0.5)
    print(f"normal, n=3: the 95% percentile bootstrap covered the true mean in {share:.3f}")
    assert share < 0.85
