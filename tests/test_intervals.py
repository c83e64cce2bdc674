"""brainage_core/evaluation/intervals.py: Student-t interval of a mean, Welch difference of two means."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from brainage_core.evaluation.intervals import finite_values, t_interval, welch_difference

#: Student-t quantiles from a printed table: t(0.975; 2) and t(0.975; 3)
T_975_2 = 4.302653
T_975_3 = 3.182446


def test_t_interval_hand_computed():
    # [1, 2, 3]: mean 2, s = 1, interval 2 ± t(0.975; 2) · 1/√3
    iv = t_interval([1.0, 2.0, 3.0])
    assert (iv.n, iv.mean, iv.std) == (3, pytest.approx(2.0), pytest.approx(1.0))
    assert (iv.low, iv.high) == pytest.approx((2 - T_975_2 / math.sqrt(3), 2 + T_975_2 / math.sqrt(3)))


def test_t_interval_matches_scipy_and_other_levels():
    values = [3.1, 2.7, 3.6, 2.9]
    iv = t_interval(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert iv.std == pytest.approx(np.std(values, ddof=1))
    assert (iv.low, iv.high) == pytest.approx(ref)
    assert iv.high - iv.mean == pytest.approx(T_975_3 * stats.sem(values))
    narrow = t_interval(values, confidence=0.5)
    assert iv.low < narrow.low < narrow.mean < narrow.high < iv.high


def test_t_interval_one_value_none_and_nan():
    one = t_interval([2.0])
    assert one.n == 1 and one.mean == 2.0 and all(math.isnan(v) for v in (one.std, one.low, one.high))
    empty = t_interval([])
    assert empty.n == 0 and math.isnan(empty.mean)
    # a failed / diverged seed (None, NaN, inf) is left out, the rest counts
    mixed = t_interval([1.0, None, float("nan"), 2.0, float("inf"), 3.0])
    assert mixed == t_interval([1.0, 2.0, 3.0])
    assert finite_values([np.float32(1.5), None, np.nan, -np.inf]) == [1.5]
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], confidence=95)


def test_welch_difference_hand_computed():
    # a = [1, 2, 3], b = [2, 4, 6]: va = 1/3, vb = 4/3, ν = (5/3)² / ((1/3)²/2 + (4/3)²/2) = 50/17
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]
    w = welch_difference(a, b)
    assert w.diff == pytest.approx(-2.0)
    assert w.dof == pytest.approx(50 / 17)
    half = stats.t.ppf(0.975, 50 / 17) * math.sqrt(5 / 3)
    assert (w.low, w.high) == pytest.approx((-2 - half, -2 + half))
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w.p_value == pytest.approx(ref.pvalue)
    assert not w.significant and w.low < 0 < w.high


def test_welch_difference_significant_and_degenerate():
    a, b = [4.1, 4.5, 3.9, 4.4], [5.0, 5.6, 5.2]
    w = welch_difference(a, b)
    assert w.p_value == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert w.significant and w.high < 0
    short = welch_difference([1.0, float("nan")], [2.0, 3.0])  # one finite value on a side
    assert math.isnan(short.diff) and not short.significant
    flat = welch_difference([1.0, 1.0], [2.0, 2.0, None])  # no spread: the difference, no interval
    assert flat.diff == pytest.approx(-1.0) and math.isnan(flat.low) and math.isnan(flat.p_value)
    assert not flat.significant
