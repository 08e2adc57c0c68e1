"""Seed-comparison statistics (rlbench.stats) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from rlbench.stats import (
    Summary,
    bootstrap_ci,
    first_crossing,
    iqm,
    probability_of_improvement,
    probability_of_improvement_ci,
    summarize,
)

FAST = 2000  # resamples in tests: enough for stable percentiles, keeps the file well under 5 s


# --- iqm ---------------------------------------------------------------------------------


def test_iqm_n_divisible_by_four() -> None:
    # n = 8, cut int(0.25 * 8) = 2 from each end: [3, 4, 5, 6] -> 18 / 4 = 4.5
    assert iqm([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(4.5)
    # order of the seeds does not matter
    assert iqm([8, 1, 7, 2, 6, 3, 5, 4]) == pytest.approx(4.5)


def test_iqm_fractional_cut_follows_trim_mean() -> None:
    scores = [1, 2, 4, 8, 16, 32, 64]
    # n = 7, 0.25 * 7 = 1.75; trim_mean "slices off less if proportion results in a
    # non-integer slice index", so int(1.75) = 1 score goes from each end:
    # [2, 4, 8, 16, 32] -> 62 / 5 = 12.4
    assert iqm(scores) == pytest.approx(12.4)
    assert iqm(scores) == pytest.approx(scipy.stats.trim_mean(scores, 0.25))
    # Not the fractionally weighted IQM, which would keep 0.25 of 2 and of 32:
    # (0.25*2 + 4 + 8 + 16 + 0.25*32) / 3.5 = 36.5 / 3.5 = 10.43
    assert iqm(scores) != pytest.approx(36.5 / 3.5)


def test_iqm_ignores_an_outlier_seed() -> None:
    # n = 4, cut 1 from each end: [2, 3] -> 2.5, while the mean is 1006 / 4 = 251.5
    assert iqm([1, 2, 3, 1000]) == pytest.approx(2.5)


def test_iqm_below_four_scores_is_the_mean() -> None:
    # n = 3, int(0.75) = 0: nothing is cut, (1 + 2 + 6) / 3 = 3
    assert iqm([1, 2, 6]) == pytest.approx(3.0)
    assert iqm([7.5]) == pytest.approx(7.5)


@pytest.mark.parametrize(
    ("scores", "message"),
    [([], "scores is empty"), ([1.0, float("nan"), 2.0], r"scores contains NaN at index \[1\]")],
)
def test_iqm_rejects_empty_and_nan(scores: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        iqm(scores)


# --- bootstrap_ci --------------------------------------------------------------------------


def test_bootstrap_ci_contains_mean_and_iqm() -> None:
    scores = [0.2, 0.5, 0.4, 0.9, 0.6, 0.3, 0.7, 0.8]  # mean 4.4 / 8 = 0.55
    low, high = bootstrap_ci(scores, "mean", resamples=FAST)
    assert 0.2 <= low < 0.55 < high <= 0.9
    # iqm: sorted [0.2 .. 0.9], keep [0.4, 0.5, 0.6, 0.7] -> 0.55
    assert iqm(scores) == pytest.approx(0.55)
    low, high = bootstrap_ci(scores, "iqm", resamples=FAST)
    assert 0.2 <= low < 0.55 < high <= 0.9


def test_bootstrap_ci_two_scores_by_hand() -> None:
    # Resampling [0, 1] twice gives a mean of 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4).
    # 95%: the 2.5th percentile is 0 and the 97.5th is 1.
    assert bootstrap_ci([0.0, 1.0], confidence=0.95, resamples=FAST) == (0.0, 1.0)
    # 40%: the 30th and 70th percentiles both fall in the middle half, at 0.5.
    assert bootstrap_ci([0.0, 1.0], confidence=0.4, resamples=FAST) == (0.5, 0.5)


def test_bootstrap_ci_is_deterministic_per_seed() -> None:
    scores = [1.0, 3.0, 2.0, 7.0, 4.0]
    first = bootstrap_ci(scores, resamples=FAST, seed=3)
    assert bootstrap_ci(scores, resamples=FAST, seed=3) == first
    assert bootstrap_ci(scores, resamples=FAST, seed=4) != first


def test_bootstrap_ci_narrows_with_more_seeds() -> None:
    few = [0.0, 1.0, 2.0, 3.0, 4.0]
    many = few * 10  # same spread, 10x the seeds: the width should shrink by about sqrt(10)
    few_low, few_high = bootstrap_ci(few, resamples=FAST)
    many_low, many_high = bootstrap_ci(many, resamples=FAST)
    assert many_high - many_low < (few_high - few_low) / 2


def test_bootstrap_ci_degenerate_inputs_give_a_point() -> None:
    assert bootstrap_ci([3.0]) == (3.0, 3.0)
    assert bootstrap_ci([2.0, 2.0, 2.0], "iqm") == (2.0, 2.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": []}, "scores is empty: need at least one per-seed score"),
        ({"scores": [1.0, 2.0, float("nan")]}, r"scores contains NaN at index \[2\]"),
        ({"scores": [1.0, float("inf")]}, r"scores contains inf at index \[1\]"),
        ({"scores": [[1.0, 2.0]]}, r"must be a 1-D list of per-seed scores, got shape \(1, 2\)"),
        ({"scores": [1.0, 2.0], "statistic": "median"}, r"statistic must be one of \['iqm', 'mean'\]"),
        ({"scores": [1.0, 2.0], "confidence": 95}, "confidence must be strictly between 0 and 1, got 95"),
        ({"scores": [1.0, 2.0], "resamples": 0}, "resamples must be at least 1, got 0"),
    ],
)
def test_bootstrap_ci_errors_name_the_problem(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(**kwargs)


# --- probability of improvement ------------------------------------------------------------


def test_probability_of_improvement_with_ties_by_hand() -> None:
    x, y = [1, 2, 3], [2, 2, 4]
    # pairs (x_i vs each of y = 2, 2, 4); win 1, tie 1/2, loss 0:
    #   x=1: 0 + 0 + 0       = 0
    #   x=2: 1/2 + 1/2 + 0   = 1
    #   x=3: 1 + 1 + 0       = 2
    # U = 3 over 3 * 3 = 9 pairs -> 1/3
    assert probability_of_improvement(x, y) == pytest.approx(1 / 3)
    assert probability_of_improvement(x, y) == pytest.approx(scipy.stats.mannwhitneyu(x, y).statistic / 9)
    # P(Y > X) = 1 - P(X > Y) when ties count one half: 6 / 9
    assert probability_of_improvement(y, x) == pytest.approx(2 / 3)


def test_probability_of_improvement_extremes_and_unequal_sizes() -> None:
    assert probability_of_improvement([5, 6], [1, 2, 3]) == 1.0
    assert probability_of_improvement([1, 2, 3], [1, 2, 3]) == pytest.approx(0.5)
    # x = [2] vs y = [1, 2, 3, 4]: win 1 + tie 1/2 = 1.5 over 4 pairs -> 0.375
    assert probability_of_improvement([2], [1, 2, 3, 4]) == pytest.approx(0.375)


def test_probability_of_improvement_names_the_bad_argument() -> None:
    with pytest.raises(ValueError, match="y_scores is empty"):
        probability_of_improvement([1.0], [])
    with pytest.raises(ValueError, match=r"x_scores contains NaN at index \[0\]"):
        probability_of_improvement([float("nan")], [1.0])


def test_probability_of_improvement_ci_brackets_the_estimate() -> None:
    x, y = [3.0, 5.0, 4.0, 6.0, 2.0], [2.0, 4.0, 3.0, 1.0, 5.0]
    # y sorted is [1, 2, 3, 4, 5]; each x's wins + 1/2 per tie:
    #   3 -> 2 + 1/2, 5 -> 4 + 1/2, 4 -> 3 + 1/2, 6 -> 5, 2 -> 1 + 1/2
    # 15 wins + 4 ties * 1/2 = 17 over 25 pairs -> 0.68
    point = probability_of_improvement(x, y)
    assert point == pytest.approx(0.68)
    low, high = probability_of_improvement_ci(x, y, resamples=FAST)
    assert 0.0 <= low < point < high <= 1.0
    assert probability_of_improvement_ci(x, y, resamples=FAST) == (low, high)


def test_probability_of_improvement_ci_degenerate_cases() -> None:
    # every x beats every y, in every resample
    assert probability_of_improvement_ci([5.0, 6.0], [1.0, 2.0], resamples=FAST) == (1.0, 1.0)
    # one seed each: only one possible resample
    assert probability_of_improvement_ci([2.0], [2.0], resamples=FAST) == (0.5, 0.5)
    # one baseline seed is allowed (scipy.stats.bootstrap would refuse it)
    low, high = probability_of_improvement_ci([1.0, 2.0, 3.0], [2.0], resamples=FAST)
    assert 0.0 <= low <= 0.5 <= high <= 1.0


def test_probability_of_improvement_ci_confidence_is_checked() -> None:
    with pytest.raises(ValueError, match="confidence must be strictly between 0 and 1, got 1.0"):
        probability_of_improvement_ci([1.0], [2.0], confidence=1.0)


# --- first_crossing ------------------------------------------------------------------------

STEPS = [0, 100, 200, 300]
ACCURACY = [0.1, 0.5, 0.8, 0.9]


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0.8, 200.0),  # reached exactly: >= counts
        (0.85, 300.0),  # 0.8 < 0.85 <= 0.9
        (0.05, 0.0),  # already above at the first point
        (0.95, None),  # never reached
    ],
)
def test_first_crossing_on_a_hand_series(threshold: float, expected: float | None) -> None:
    assert first_crossing(STEPS, ACCURACY, threshold) == expected


def test_first_crossing_takes_the_first_not_the_last_crossing() -> None:
    # crosses at 100, falls back, crosses again at 300
    assert first_crossing(STEPS, [0.1, 0.9, 0.2, 0.95], 0.8) == 100.0
    assert first_crossing(STEPS, [float("nan"), 0.9, 0.2, 0.95], 0.0) == 100.0  # NaN never counts


def test_first_crossing_rejects_bad_curves() -> None:
    with pytest.raises(ValueError, match=r"same length, got shapes \(4,\) and \(3,\)"):
        first_crossing(STEPS, [0.1, 0.2, 0.3], 0.5)
    with pytest.raises(ValueError, match="xs must be non-decreasing"):
        first_crossing([0, 200, 100], [0.1, 0.2, 0.3], 0.5)


# --- summarize ------------------------------------------------------------------------------


def test_summarize_by_hand() -> None:
    summary = summarize([4.0, 1.0, 3.0, 2.0], resamples=FAST)
    # mean 10 / 4 = 2.5; deviations -1.5, -0.5, 0.5, 1.5 -> sum of squares 5,
    # sample std sqrt(5 / 3) = 1.29099; iqm cuts 1 from each end: [2, 3] -> 2.5
    assert summary.n == 4
    assert summary.mean == pytest.approx(2.5)
    assert summary.std == pytest.approx(math.sqrt(5 / 3))
    assert summary.iqm == pytest.approx(2.5)
    assert (summary.min, summary.max) == (1.0, 4.0)
    assert 1.0 <= summary.ci_low < 2.5 < summary.ci_high <= 4.0
    assert (summary.ci_low, summary.ci_high) == bootstrap_ci([4.0, 1.0, 3.0, 2.0], resamples=FAST)


def test_summarize_one_seed() -> None:
    assert summarize(np.array([0.7])) == Summary(
        n=1, mean=0.7, ci_low=0.7, ci_high=0.7, iqm=0.7, std=0.0, min=0.7, max=0.7
    )


def test_summarize_rejects_nan() -> None:
    with pytest.raises(ValueError, match=r"NaN at index \[1\]"):
        summarize([1.0, float("nan")])
