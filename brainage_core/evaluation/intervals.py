"""Interval statistics of per-seed results: the Student-t interval of a mean and Welch's difference.

Both are used to report metrics over a handful of seeds (``study/final.py``'s summary rows,
``bench/loss_benchmark.py``'s table); neither is used for selection.

Missing values (``None``) and non-finite ones (NaN, ±inf: a seed that failed or diverged) are dropped
before anything is computed; ``n`` counts the values kept.

**Mean.** For n values with mean m and sample standard deviation s (ddof 1), the two-sided interval at
level c is ``m ± t(1 − (1 − c)/2; n − 1) · s / √n`` with t the Student-t quantile. With n = 1 the mean is
returned and the spread is NaN; with n = 0 everything is NaN.

**Difference.** For samples a and b, with squared standard errors va = s_a²/n_a and vb = s_b²/n_b, the
difference mean(a) − mean(b) has the interval ``diff ± t(1 − (1 − c)/2; ν) · √(va + vb)`` with the
Welch–Satterthwaite degrees of freedom ``ν = (va + vb)² / (va²/(n_a − 1) + vb²/(n_b − 1))``, and the
two-sided p-value ``2 · P(T_ν > |diff| / √(va + vb))`` (scipy's ``ttest_ind(equal_var=False)``). It is
``significant`` when the interval excludes 0. With fewer than 2 values on either side everything is NaN;
when neither side has any spread (va + vb = 0) the difference is given and the rest is NaN; in both cases
it is not significant.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["MeanInterval", "WelchDifference", "finite_values", "t_interval", "welch_difference"]


@dataclass(frozen=True)
class MeanInterval:
    """``n`` values kept, their ``mean``, ``std`` (ddof 1) and the interval ``[low, high]`` of the mean."""

    n: int
    mean: float
    std: float
    low: float
    high: float


@dataclass(frozen=True)
class WelchDifference:
    """``diff`` = mean(a) − mean(b), its interval ``[low, high]``, ``dof`` (ν), ``p_value``, ``significant``."""

    diff: float
    low: float
    high: float
    dof: float
    p_value: float
    significant: bool


def finite_values(values: Iterable[float | None]) -> list[float]:
    """``values`` as floats, ``None`` and non-finite values dropped."""
    out = []
    for v in values:
        if v is None:
            continue
        x = float(v)
        if math.isfinite(x):
            out.append(x)
    return out


def _mean_and_var(v: list[float]) -> tuple[float, float]:
    """Mean and sample variance (ddof 1) of at least 2 values."""
    mean = sum(v) / len(v)
    return mean, sum((x - mean) ** 2 for x in v) / (len(v) - 1)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence = {confidence!r}; expected a level strictly between 0 and 1")


def t_interval(values: Iterable[float | None], confidence: float = 0.95) -> MeanInterval:
    """The two-sided Student-t interval of the mean of ``values`` at level ``confidence`` (module docstring)."""
    from scipy import stats

    _check_confidence(confidence)
    v = finite_values(values)
    n = len(v)
    if n < 2:
        mean = v[0] if n else math.nan
        return MeanInterval(n, mean, math.nan, math.nan, math.nan)
    mean, var = _mean_and_var(v)
    std = math.sqrt(var)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return MeanInterval(n, mean, std, mean - half, mean + half)


def welch_difference(
    a: Iterable[float | None], b: Iterable[float | None], confidence: float = 0.95
) -> WelchDifference:
    """mean(a) − mean(b) with its Welch–Satterthwaite interval and p-value (module docstring)."""
    from scipy import stats

    _check_confidence(confidence)
    a, b = finite_values(a), finite_values(b)
    if len(a) < 2 or len(b) < 2:
        return WelchDifference(math.nan, math.nan, math.nan, math.nan, math.nan, False)
    ma, var_a = _mean_and_var(a)
    mb, var_b = _mean_and_var(b)
    va, vb = var_a / len(a), var_b / len(b)
    diff = ma - mb
    if va + vb == 0:
        return WelchDifference(diff, math.nan, math.nan, math.nan, math.nan, False)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    se = math.sqrt(va + vb)
    half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * se
    p = float(2 * stats.t.sf(abs(diff) / se, dof))
    return WelchDifference(diff, diff - half, diff + half, dof, p, bool(diff - half > 0 or diff + half < 0))
