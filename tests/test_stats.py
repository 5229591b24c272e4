"""Paired comparison statistics against direct computations."""

import numpy as np
import pytest

from rlhf.stats import compare_paired


def test_means_and_rates_by_hand():
    base = np.array([1.0, 2.0, 3.0, 4.0])
    cand = np.array([1.5, 2.0, 2.0, 5.0])  # diffs 0.5, 0, -1, 1
    result = compare_paired(base, cand, tie_tolerance=0.0)
    assert result.mean_diff == pytest.approx(0.125)
    assert (result.win_rate, result.tie_rate, result.loss_rate) == (0.5, 0.25, 0.25)
    assert result.base_mean == 2.5 and result.candidate_mean == 2.625
    assert compare_paired(base, cand, tie_tolerance=0.6).win_rate == 0.25


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = compare_paired(np.zeros(20), rng.normal(1.0, 1.0, 20))
    large = compare_paired(np.zeros(2000), rng.normal(1.0, 1.0, 2000))
    assert small.ci_low < small.mean_diff < small.ci_high
    assert large.ci_low < 1.0 < large.ci_high
    assert (large.ci_high - large.ci_low) < (small.ci_high - small.ci_low) / 5
    # Standard error of the mean for n = 2000, sd 1: the 95% CI is about +-1.96 * 0.0224.
    assert large.ci_high - large.ci_low == pytest.approx(2 * 1.96 / np.sqrt(2000), rel=0.15)


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        compare_paired(np.zeros(3), np.zeros(4))


def test_t_quantiles_match_the_published_table():
    """Student's t 0.975 quantiles as printed in every statistics table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)."""
    from rlhf.stats import t_quantile

    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 7: 2.365, 11: 2.201, 30: 2.042}
    for df, value in table.items():
        assert abs(t_quantile(0.975, df) - value) < 1e-3, df
    assert abs(t_quantile(0.95, 10) - 1.812) < 1e-3


def test_mean_interval_is_mean_plus_minus_t_times_standard_error():
    from rlhf.stats import mean_interval

    mean, low, high = mean_interval(np.array([0.30, 0.32, 0.25]))
    se = np.std([0.30, 0.32, 0.25], ddof=1) / np.sqrt(3)  # written out: ddof = 1, n = 3, t(0.975, 2) = 4.303
    assert mean == pytest.approx(0.29) and high - mean == pytest.approx(4.303 * se, rel=1e-3)
    assert mean - low == pytest.approx(high - mean)
    single = mean_interval(np.array([0.4]))
    assert single[0] == 0.4 and np.isnan(single[1]) and np.isnan(single[2])
