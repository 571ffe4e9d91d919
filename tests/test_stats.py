"""Seed statistics of `atdiff compare`: the paired bootstrap interval against answers known in
closed form, and the verdict it allows."""

import numpy as np
import pytest

from atdiff.eval.stats import paired_bootstrap_interval, paired_t_interval, summarize, t_quantile_975, verdict


def test_three_seeds_exact_bootstrap():
    # Differences 0, 1, 2: each of the 27 equally likely resamples has probability 1/27 = 3.7%, so
    # the all-0 and all-2 resamples lie beyond the 2.5% tails by themselves: the interval is [0, 2].
    assert paired_bootstrap_interval([10.0, 11.0, 12.0], [10.0, 10.0, 10.0]) == (0.0, 2.0)


def test_four_seeds_binomial_answer():
    # Differences 0, 0, 0, 4: a resample's mean is the number k of draws of the 4, k ~ Binomial(4, 1/4).
    # P(k = 0) = 81/256 >= 2.5%, P(k <= 2) = 243/256 < 97.5% <= P(k <= 3) = 255/256: the interval is [0, 3].
    assert paired_bootstrap_interval([4.0, 0.0, 0.0, 0.0], [0.0] * 4) == (0.0, 3.0)


def test_equal_differences_give_a_point_and_pairing_removes_shared_seed_effects():
    # Seeds differ a lot (10, 50, 90) but the candidate is always 2 lower: paired, that is certain.
    assert paired_bootstrap_interval([8.0, 48.0, 88.0], [10.0, 50.0, 90.0]) == (-2.0, -2.0)


def test_many_seeds_monte_carlo_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    baseline = rng.normal(100, 5, size=40)
    candidate = baseline + 5 + rng.normal(0, 1, size=40)  # 40 seeds: Monte-Carlo resampling
    low, high = paired_bootstrap_interval(candidate.tolist(), baseline.tolist())
    differences = candidate - baseline
    half_width = 1.96 * differences.std(ddof=1) / np.sqrt(40)
    assert low < differences.mean() < high
    assert high - low == pytest.approx(2 * half_width, rel=0.15)
    assert paired_bootstrap_interval(candidate.tolist(), baseline.tolist()) == (low, high)  # seeded: reproducible


def test_one_seed_gives_no_interval_and_unpaired_lengths_are_refused():
    assert paired_bootstrap_interval([1.0], [2.0]) is None
    with pytest.raises(ValueError, match="same seeds"):
        paired_bootstrap_interval([1.0, 2.0], [1.0])


@pytest.mark.parametrize(
    "intervals, lower_is_better, expected",
    [
        ([(-3.0, -0.5)], True, "better"),
        ([(0.5, 3.0)], True, "worse"),
        ([(-3.0, 0.5)], True, "not distinguishable"),
        ([(0.0, 2.0)], True, "not distinguishable"),  # touching 0 is not excluding it
        ([(0.5, 3.0)], False, "better"),  # e.g. a precision, where higher is better
        ([None], True, "not distinguishable"),  # one seed
        ([(-3.0, -0.5), (-4.0, 1.0)], True, "not distinguishable"),  # every interval must exclude 0
        ([(-3.0, -0.5), (-4.0, -0.1)], True, "better"),
    ],
)
def test_verdict(intervals, lower_is_better, expected):
    assert verdict(*intervals, lower_is_better=lower_is_better) == expected


def test_t_interval_guards_against_the_narrow_bootstrap_of_few_seeds():
    # Three seeds that happen to agree in sign: the bootstrap interval is their range, [-3, -0.5],
    # and would call it; the t interval (mean -1.5, sd 1.32, t_2 = 4.303) is -1.5 +- 3.28.
    candidate, baseline = [7.0, 9.0, 9.5], [10.0, 10.0, 10.0]
    bootstrap, t = paired_bootstrap_interval(candidate, baseline), paired_t_interval(candidate, baseline)
    assert bootstrap == (-3.0, -0.5)
    sd = np.std([-3.0, -1.0, -0.5], ddof=1)
    assert t == pytest.approx((-1.5 - 4.303 * sd / np.sqrt(3), -1.5 + 4.303 * sd / np.sqrt(3)))
    assert verdict(bootstrap, t) == "not distinguishable"
    # a large, consistent difference is called even with three seeds
    clear = [-20.0, -19.0, -21.0]
    assert verdict(paired_bootstrap_interval(clear, [0.0] * 3), paired_t_interval(clear, [0.0] * 3)) == "better"


def test_t_quantile_table_meets_the_expansion():
    assert t_quantile_975(2) == 4.303 and t_quantile_975(30) == 2.042
    assert t_quantile_975(31) == pytest.approx(2.040, abs=1e-3) and t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)


def test_summary_uses_the_sample_standard_deviation():
    summary = summarize([1.0, 2.0, 3.0])
    assert (summary.mean, summary.std, summary.n) == (2.0, 1.0, 3)
    assert summarize([5.0]).std is None
