"""Point metrics and the OpenBHB challenge scores (``docs/evaluation.md``, "Challenge scores").

All ages are in years; MAE/RMSE are in years; balanced accuracy (BAcc) is a fraction in [0, 1].
Lower challenge scores are better.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from brainage_core.errors import BrainageError

#: Number of site labels (siteXacq) of the challenge; the older score definitions divide by it.
CHALLENGE_N_SITES = 64


def _pair(y_true: np.ndarray, y_pred: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if t.shape != p.shape:
        raise BrainageError(f"{what}: {t.size} true values but {p.size} predictions; expected the same number")
    return t, p


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute error (years); NaN for an empty part."""
    t, p = _pair(y_true, y_pred, "mae")
    return float(np.mean(np.abs(t - p))) if t.size else math.nan


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Root mean squared error (years); NaN for an empty part."""
    t, p = _pair(y_true, y_pred, "rmse")
    return float(np.sqrt(np.mean((t - p) ** 2))) if t.size else math.nan


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (a fraction); NaN for an empty part.

    Predictions of classes absent from ``y_true`` count as errors (scikit-learn's definition, which the
    challenge uses); the warning scikit-learn emits about them is silenced.
    """
    t = np.asarray(y_true).reshape(-1)
    p = np.asarray(y_pred).reshape(-1)
    if t.shape != p.shape:
        raise BrainageError(f"balanced_accuracy: {t.size} labels but {p.size} predictions; expected the same number")
    if t.size == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from sklearn.metrics import balanced_accuracy_score  # imported here: see probes.py

        return float(balanced_accuracy_score(t, p))


def chance_balanced_accuracy(y_true: np.ndarray) -> float:
    """Chance level of the balanced accuracy: 1 / (number of classes present); NaN when empty."""
    n = len(np.unique(np.asarray(y_true)))
    return 1.0 / n if n else math.nan


def challenge_scores(mae_int: float, mae_ext: float, bacc: float, n_sites: int = CHALLENGE_N_SITES) -> dict[str, float]:
    """The challenge scores, lower is better (BAcc as a fraction, MAEs in years).

    - ``lc``: the current definition, MAE_ext · BAcc^0.3;
    - ``lc_2022_09``: MAE_ext · BAcc^0.3 + (1/n_sites)^0.3 · MAE_int (used until 2022-09-19);
    - ``lc_2022_06``: MAE_ext · BAcc + MAE_int / n_sites (used until 2022-06-17).

    ``n_sites`` is 64 on the challenge; on a validation split, the number of sites of the training data.
    NaN inputs give NaN scores (e.g. no external part).
    """
    if n_sites < 1:
        raise BrainageError(f"challenge_scores: n_sites = {n_sites}; expected an integer >= 1")
    for name, value in (("mae_int", mae_int), ("mae_ext", mae_ext), ("bacc", bacc)):
        if not math.isnan(value) and value < 0:
            raise BrainageError(f"challenge_scores: {name} = {value}; expected a value >= 0")
    if not math.isnan(bacc) and bacc > 1:
        raise BrainageError(f"challenge_scores: bacc = {bacc}; expected a fraction in [0, 1] (not a percentage)")
    lc = mae_ext * bacc**0.3
    return {
        "lc": float(lc),
        "lc_2022_09": float(lc + (1.0 / n_sites) ** 0.3 * mae_int),
        "lc_2022_06": float(mae_ext * bacc + mae_int / n_sites),
    }
