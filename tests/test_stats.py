"""Seed-comparison statistics (rlbench.stats) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from rlbench.stats import (
    PairedDifference,
    aggregate_score,
    bootstrap_ci,
    first_crossing,
    iqm,
    mean_ci,
    paired_difference,
    probability_of_improvement,
    probability_of_improvement_ci,
    seeds_to_resolve,
    stratified_bootstrap_ci,
    summarize,
    t_intervals,
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


# --- mean_ci: the Student-t interval of the mean --------------------------------------------


def test_mean_ci_by_hand_and_against_scipy() -> None:
    # [1, 2, 3]: mean 2, s = 1, standard error 1 / sqrt(3) = 0.57735; t_{0.975, 2} = 4.30265,
    # so the half-width is 4.30265 * 0.57735 = 2.48414
    low, high = mean_ci([1.0, 2.0, 3.0])
    assert (low, high) == pytest.approx((2 - 2.48414, 2 + 2.48414), abs=1e-5)
    # a t-interval leaves the range of the scores (a percentile bootstrap cannot): [1, 3] here
    assert low < 1.0 and high > 3.0
    scores = [0.52, 0.61, 0.47, 0.70, 0.58]
    for confidence in (0.9, 0.95, 0.99):
        expected = scipy.stats.ttest_1samp(scores, 0.0).confidence_interval(confidence)
        assert mean_ci(scores, confidence) == pytest.approx((expected.low, expected.high), rel=1e-12)


def test_mean_ci_of_equal_scores_is_their_value_and_one_seed_is_refused() -> None:
    assert mean_ci([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.4))
    with pytest.raises(ValueError, match="values has 1 score: a t-interval of the mean needs at least 2"):
        mean_ci([0.4])
    with pytest.raises(ValueError, match="confidence must be strictly between 0 and 1, got 95"):
        mean_ci([0.4, 0.5], confidence=95)


def test_t_intervals_are_row_by_row_mean_ci() -> None:
    rows = np.random.default_rng(0).normal(size=(4, 6))
    low, high = t_intervals(rows, 0.9)
    assert low.shape == high.shape == (4,)
    for i, row in enumerate(rows):
        assert (low[i], high[i]) == pytest.approx(mean_ci(row, 0.9), rel=1e-12)
    with pytest.raises(ValueError, match="at least 2 scores per row, got 1"):
        t_intervals(rows[:, :1])


# --- paired_difference and seeds_to_resolve ------------------------------------------------


def test_paired_difference_by_hand() -> None:
    a, b = [0.6, 0.7, 0.5, 0.8], [0.5, 0.5, 0.4, 0.6]
    # differences [0.1, 0.2, 0.1, 0.2]: mean 0.15; deviations +-0.05, sum of squares 0.01,
    # sd sqrt(0.01 / 3) = 0.057735, standard error 0.057735 / 2 = 0.028868;
    # t_{0.975, 3} = 3.182446, half-width 0.0918693
    result = paired_difference(a, b)
    assert result.mean == pytest.approx(0.15)
    assert (result.lo, result.hi) == pytest.approx((0.15 - 0.0918693, 0.15 + 0.0918693), abs=1e-7)
    assert (result.n, result.sd) == (4, pytest.approx(math.sqrt(0.01 / 3)))
    # n = 2: t_{0.975, 1} = 12.706 * 0.057735 / sqrt(2) = 0.519 >= 0.15;
    # n = 3: t_{0.975, 2} = 4.3027 * 0.057735 / sqrt(3) = 0.1434 < 0.15
    assert result.seeds_needed == 3
    expected = scipy.stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (result.lo, result.hi) == pytest.approx((expected.low, expected.high), rel=1e-12)
    # B minus A mirrors it
    mirrored = paired_difference(b, a)
    assert (mirrored.mean, mirrored.lo, mirrored.hi) == pytest.approx((-0.15, -result.hi, -result.lo))


def test_pairing_by_seed_removes_what_the_seed_shares() -> None:
    # Each seed moves both algorithms by the same large amount; A is 0.05 better throughout.
    rng = np.random.default_rng(3)
    seed_effect = rng.normal(0.0, 0.1, 6)
    b = 0.5 + seed_effect + rng.normal(0.0, 0.01, 6)
    a = b + 0.05 + rng.normal(0.0, 0.01, 6)
    paired = paired_difference(a, b)
    assert 0.0 < paired.lo < 0.05 < paired.hi
    unpaired = scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert unpaired.low < 0.0 < unpaired.high  # unpaired, the seeds' spread hides the difference
    assert paired.seeds_needed is not None and paired.seeds_needed <= 6


def test_paired_difference_of_one_seed_has_no_interval() -> None:
    result = paired_difference([0.7], [0.5])
    assert result.mean == pytest.approx(0.2) and result.n == 1
    assert math.isnan(result.lo) and math.isnan(result.hi) and math.isnan(result.sd)
    assert result.seeds_needed is None
    assert isinstance(result, PairedDifference)


def test_paired_difference_needs_aligned_seeds() -> None:
    with pytest.raises(ValueError, match="one score per shared seed, in the same order; got 3 and 2"):
        paired_difference([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"b contains NaN at index \[0\]"):
        paired_difference([0.1], [float("nan")])


def test_seeds_to_resolve_by_hand() -> None:
    # difference 1, sd 2: need t_{0.975, n-1} < sqrt(n) / 2.
    #   n = 17: t_16 = 2.1199 >= sqrt(17) / 2 = 2.0616
    #   n = 18: t_17 = 2.1098 <  sqrt(18) / 2 = 2.1213
    assert seeds_to_resolve(1.0, 2.0) == 18
    assert scipy.stats.t.ppf(0.975, 16) * 2 / math.sqrt(17) >= 1.0
    assert scipy.stats.t.ppf(0.975, 17) * 2 / math.sqrt(18) < 1.0
    assert seeds_to_resolve(-1.0, 2.0) == 18  # the sign does not matter
    assert seeds_to_resolve(1.0, 2.0, confidence=0.99) > 18
    assert seeds_to_resolve(0.3, 0.0) == 2  # no spread: the fewest seeds a t-interval takes
    assert seeds_to_resolve(0.0, 0.1) is None  # no seed count resolves a zero difference
    assert seeds_to_resolve(float("nan"), 0.1) is None
    # tiny differences still end: n ~ (1.96 * sd / difference)^2 = 3.84e6
    assert seeds_to_resolve(1e-3, 1.0) == pytest.approx(1.96**2 * 1e6, rel=1e-3)


# --- stratified bootstrap over tasks -------------------------------------------------------


def test_aggregate_score_is_rliables_iqm_and_mean() -> None:
    # iqm pools every task's runs: [1 .. 8] cut 2 from each end -> [3, 4, 5, 6] -> 4.5
    assert aggregate_score([[1, 2, 3, 4], [5, 6, 7, 8]], "iqm") == pytest.approx(4.5)
    assert aggregate_score([[1, 2, 3, 4], [5, 6, 7, 8]], "iqm") == pytest.approx(
        scipy.stats.trim_mean(np.arange(1, 9), 0.25)
    )
    # the mean is the mean of per-task means, each task weighing the same:
    # (0.3 + 0.9) / 2 = 0.6, not the pooled (0.2 + 0.4 + 0.9) / 3 = 0.5
    assert aggregate_score([[0.2, 0.4], [0.9]], "mean") == pytest.approx(0.6)


def test_stratified_bootstrap_by_hand() -> None:
    by_task = [[0.0, 1.0], [10.0, 10.0]]
    # Task 2 is always [10, 10]; task 1 resamples to mean 0, 0.5 or 1 with chances 1/4, 1/2,
    # 1/4, so the mean of task means is 5, 5.25 or 5.5: 2.5th and 97.5th percentiles 5 and 5.5,
    # 30th and 70th both 5.25
    assert stratified_bootstrap_ci(by_task, "mean", resamples=FAST) == (5.0, 5.5)
    assert stratified_bootstrap_ci(by_task, "mean", confidence=0.4, resamples=FAST) == (5.25, 5.25)
    # IQM of 4 pooled scores keeps the middle 2: [0, 0 | 10, 10] -> 5, [0, 1, 10, 10] -> 5.5,
    # [1, 1, 10, 10] -> 5.5
    assert stratified_bootstrap_ci(by_task, "iqm", resamples=FAST) == (5.0, 5.5)
    # unstratified, a resample may draw only task 1's runs or only task 2's: far wider
    low, high = bootstrap_ci([0.0, 1.0, 10.0, 10.0], "mean", resamples=FAST)
    assert high - low > 5 * 0.5


def test_stratified_bootstrap_of_one_task_is_the_plain_bootstrap() -> None:
    scores = [0.31, 0.52, 0.44, 0.61, 0.38, 0.57]
    for statistic in ("mean", "iqm"):
        for seed in (0, 1):
            assert stratified_bootstrap_ci([scores], statistic, resamples=FAST, seed=seed) == bootstrap_ci(
                scores, statistic, resamples=FAST, seed=seed
            )


def test_stratified_bootstrap_takes_a_callable_and_is_seeded() -> None:
    by_task = [[0.2, 0.5, 0.4], [0.7, 0.9, 0.8, 0.6]]

    def pooled_median(tasks: list[np.ndarray]) -> np.ndarray:
        return np.median(np.concatenate(tasks, axis=-1), axis=-1)

    assert aggregate_score(by_task, pooled_median) == pytest.approx(0.6)
    low, high = stratified_bootstrap_ci(by_task, pooled_median, resamples=FAST, seed=5)
    assert 0.2 <= low <= 0.6 <= high <= 0.9
    assert stratified_bootstrap_ci(by_task, pooled_median, resamples=FAST, seed=5) == (low, high)


@pytest.mark.parametrize(
    ("by_task", "message"),
    [
        ([], "scores_by_task is empty"),
        ([[0.1], []], r"scores_by_task\[1\] is empty"),
        ([[0.1, float("nan")]], r"scores_by_task\[0\] contains NaN at index \[1\]"),
    ],
)
def test_stratified_bootstrap_names_the_bad_task(by_task: list[list[float]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stratified_bootstrap_ci(by_task)
    with pytest.raises(ValueError, match="statistic must be one of \\['iqm', 'mean'\\] or a callable"):
        stratified_bootstrap_ci([[0.1, 0.2]], "median")  # type: ignore[arg-type]


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
    # the mean's interval is the t-interval: t_{0.975, 3} = 3.18245 times the standard error
    # 1.29099 / 2 = 0.645497 gives a half-width of 2.05426
    assert (summary.ci_low, summary.ci_high) == pytest.approx((2.5 - 2.05426, 2.5 + 2.05426), abs=1e-5)
    assert (summary.ci_low, summary.ci_high) == mean_ci([4.0, 1.0, 3.0, 2.0])


def test_summarize_one_seed_has_no_interval() -> None:
    summary = summarize(np.array([0.7]))
    assert (summary.n, summary.mean, summary.iqm, summary.std) == (1, 0.7, 0.7, 0.0)
    assert (summary.min, summary.max) == (0.7, 0.7)
    assert math.isnan(summary.ci_low) and math.isnan(summary.ci_high)  # never a zero-width interval


def test_summarize_rejects_nan() -> None:
    with pytest.raises(ValueError, match=r"NaN at index \[1\]"):
        summarize([1.0, float("nan")])
