"""Brain-age gap and its usual linear bias correction.

The gap of a subject is ``brain_age − age`` (years). Age probes regress towards the mean age, so the raw
gap correlates with age; the correction fits, on data with known ages (the validation parts of the train
split at export), the least-squares line ``brain_age ≈ slope · age + intercept`` and then reports

    corrected gap       = brain_age − (slope · age + intercept)
    corrected brain age = age + corrected gap

The fitted correction is the plain dict ``{"slope", "intercept", "n"}`` (stored in a submission's
``metadata.pkl`` under ``bias_correction``, possibly with descriptive keys beside these).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from brainage_core.errors import DataError

__all__ = ["apply_bias_correction", "brain_age_gap", "fit_bias_correction"]


def brain_age_gap(brain_age: np.ndarray, age: np.ndarray) -> np.ndarray:
    """``brain_age − age`` as float (NaN where the age is unknown); both (N,) in years."""
    return np.asarray(brain_age, dtype=float) - np.asarray(age, dtype=float)


def fit_bias_correction(age: np.ndarray, brain_age: np.ndarray) -> dict[str, Any]:
    """Least-squares ``brain_age ≈ slope · age + intercept`` over N ≥ 2 subjects: ``{"slope", "intercept", "n"}``.

    ``age``, ``brain_age``: (N,) finite, in years. ``DataError`` for other lengths or fewer than 2 subjects.
    """
    age = np.asarray(age, dtype=float)
    brain_age = np.asarray(brain_age, dtype=float)
    if age.shape != brain_age.shape or age.ndim != 1:
        raise DataError(f"fit_bias_correction: age {age.shape} and brain_age {brain_age.shape}; expected two (N,) "
                        "arrays of the same subjects")
    if age.size < 2:
        raise DataError(f"fit_bias_correction: {age.size} subject(s); expected at least 2 to fit a line")
    slope, intercept = np.polyfit(age, brain_age, 1)
    return {"slope": float(slope), "intercept": float(intercept), "n": int(age.size)}


def apply_bias_correction(
    brain_age: np.ndarray, age: np.ndarray, bias: Mapping[str, Any] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(corrected gap, corrected brain age), each (N,) float in years, of :func:`fit_bias_correction`'s ``bias``.

    NaN where the age is unknown, and everywhere when ``bias`` is ``None`` or empty (no correction fitted).
    """
    brain_age = np.asarray(brain_age, dtype=float)
    if not bias:
        nan = np.full_like(brain_age, np.nan, dtype=float)
        return nan, nan.copy()
    age = np.asarray(age, dtype=float)
    gap = brain_age - (float(bias["slope"]) * age + float(bias["intercept"]))
    return gap, age + gap
