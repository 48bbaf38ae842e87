"""lmforge.stats: bootstrap and Wilson intervals cover what they claim, paired tests find real
differences and not noise, every draw follows the seed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmforge import stats


def test_mean_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, hits = 200, 0
    for t in range(trials):
        sample = rng.exponential(1.0, size=80)  # skewed, true mean 1
        fig = stats.mean(sample, seed=t, resamples=500)
        hits += fig.low <= 1.0 <= fig.high
    # Percentile bootstrap at n=80 on a skewed law: a little under 95%; far from 50% or 100%.
    assert 0.88 <= hits / trials <= 0.99, hits / trials


def test_figure_fields_and_text():
    fig = stats.mean([1.0, 2.0, 3.0, 4.0], seed=1)
    assert fig.value == 2.5 and fig.n == 4 and fig.low < 2.5 < fig.high
    assert set(fig.fields("x")) == {"x", "x_ci_low", "x_ci_high"}
    assert str(fig).startswith("2.5000 [")
    assert math.isnan(stats.mean([]).value) and stats.mean([]).n == 0


def test_same_seed_same_interval_other_seed_other_draws():
    data = np.random.default_rng(1).normal(size=50)
    assert stats.mean(data, seed=3) == stats.mean(data, seed=3)
    assert stats.mean(data, seed=3) != stats.mean(data, seed=4)


def test_ratio_is_a_token_weighted_mean_resampled_by_item():
    sums, counts = [10.0, 30.0, 5.0], [5, 10, 5]
    fig = stats.ratio(sums, counts, seed=0)
    assert fig.value == pytest.approx(45 / 20) and fig.n == 3
    assert (
        min(s / c for s, c in zip(sums, counts))
        <= fig.low
        <= fig.high
        <= max(s / c for s, c in zip(sums, counts))
    )
    with pytest.raises(ValueError, match="numerators"):
        stats.ratio([1.0], [1.0, 2.0])


def test_wilson_interval_is_honest_at_the_edges():
    all_ones = stats.proportion([1] * 64)
    assert all_ones.value == 1.0 and all_ones.high == 1.0 and all_ones.low == pytest.approx(0.9434, abs=1e-4)
    half = stats.proportion([1, 0] * 50)
    assert half.low == pytest.approx(0.4038, abs=1e-3) and half.high == pytest.approx(0.5962, abs=1e-3)
    with pytest.raises(ValueError, match="0 or 1"):
        stats.proportion([0.5])


def test_paired_test_finds_a_real_difference_and_not_noise():
    rng = np.random.default_rng(2)
    base = rng.normal(size=200)
    better = base + 0.3 + rng.normal(scale=0.5, size=200)
    same = base + rng.normal(scale=0.5, size=200)
    found = stats.paired(base, better, seed=0)
    assert found.p_value < 0.01 and found.difference.low > 0
    assert set(found.fields("gain")) == {"gain", "gain_ci_low", "gain_ci_high", "gain_p"}
    # Under no difference, p < 0.05 about 5% of the time.
    false_alarms = sum(
        stats.paired(base, base + rng.normal(scale=0.5, size=200), seed=s, resamples=400).p_value < 0.05
        for s in range(100)
    )
    assert false_alarms <= 12, false_alarms
    assert (
        stats.paired(base, same, seed=0).difference.low < 0 < stats.paired(base, same, seed=0).difference.high
    )
    assert stats.paired([1.0, 2.0], [1.0, 2.0]).p_value == 1.0
    with pytest.raises(ValueError, match="same"):
        stats.paired([1.0], [1.0, 2.0])


def test_paired_0_1_outcomes_get_mcnemars_exact_test():
    # 10 items only the second side gets right, none the other way: p = 2 / 2**10
    a, b = [0] * 10 + [1] * 5 + [0] * 5, [1] * 10 + [1] * 5 + [0] * 5
    assert stats.mcnemar(a, b) == pytest.approx(2 / 1024)
    assert stats.paired(a, b).p_value == pytest.approx(2 / 1024)
    assert stats.paired(a, b).difference.value == pytest.approx(0.5)
    # 3 against 14 discordant items: the binomial's two-sided tail (scipy.stats.binomtest: 0.012726)
    assert stats.mcnemar([1] * 3 + [0] * 14, [0] * 3 + [1] * 14) == pytest.approx(0.0127258, abs=1e-6)
    assert stats.mcnemar([1, 0, 1], [0, 1, 1]) == 1.0  # one each way: no evidence
    assert stats.mcnemar([1, 0], [1, 0]) == 1.0  # no item differs
    # Under no difference the exact test's false alarms stay at or under 5%.
    rng = np.random.default_rng(0)
    alarms = sum(stats.mcnemar(rng.integers(0, 2, 200), rng.integers(0, 2, 200)) < 0.05 for _ in range(300))
    assert alarms <= 0.07 * 300, alarms
