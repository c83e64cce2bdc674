"""The ``fast`` protocol of the challenge probes: the same estimators, folds and selection rules as the
``exact`` protocol (scikit-learn's ``GridSearchCV``), computed in torch on the features' device.

- Age (:func:`fast_ridge_search`, here): Ridge with an intercept by centring, alpha chosen by the mean r²
  over the unshuffled K folds, ties to the smaller alpha, refit on every row. Exact, not approximated: per
  fold ONE eigendecomposition of the centred Gram matrix (``X^T X`` or ``X X^T``, the smaller) serves
  the whole alpha grid, in float64. The predictions equal ``GridSearchCV(Ridge())`` to rounding.
- Site: :func:`brainage_core.evaluation.fast_logistic.fast_logistic_search` (the batched L-BFGS), which
  uses this module's folds, scores and fitted models.

The folds reproduce scikit-learn's ``KFold`` (unshuffled, or shuffled by ``numpy.random.RandomState``)
and ``StratifiedKFold`` (unshuffled) exactly, without importing scikit-learn (tests check both).
Nothing here imports scikit-learn; the exact protocol's entry points are in ``probes.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


# -- folds (scikit-learn's, reimplemented) ----------------------------------------------------------
def kfold_indices(n: int, n_splits: int, *, shuffle: bool = False, seed: int | None = None) -> list[np.ndarray]:
    """Test rows of each fold of ``sklearn.model_selection.KFold(n_splits, shuffle, random_state=seed)``."""
    indices = np.arange(n)
    if shuffle:
        np.random.RandomState(seed).shuffle(indices)
    sizes = np.full(n_splits, n // n_splits, dtype=np.int64)
    sizes[: n % n_splits] += 1
    out, start = [], 0
    for size in sizes:
        out.append(np.sort(indices[start : start + size]))
        start += size
    return out


def stratified_kfold_indices(y: np.ndarray, n_splits: int) -> list[np.ndarray]:
    """Test rows of each fold of ``sklearn.model_selection.StratifiedKFold(n_splits)`` (no shuffling):
    classes encoded by order of first appearance, per-class allocation round robin over the sorted codes,
    each class's rows assigned to folds in blocks, in data order."""
    y = np.asarray(y)
    _, first, inverse = np.unique(y, return_index=True, return_inverse=True)
    _, class_perm = np.unique(first, return_inverse=True)
    encoded = class_perm[inverse.reshape(-1)]
    n_classes = first.size
    order = np.sort(encoded)
    allocation = np.asarray([np.bincount(order[i::n_splits], minlength=n_classes) for i in range(n_splits)])
    test_folds = np.empty(y.shape[0], dtype=np.int64)
    for k in range(n_classes):
        test_folds[encoded == k] = np.arange(n_splits).repeat(allocation[:, k])
    return [np.flatnonzero(test_folds == i) for i in range(n_splits)]


def complement_indices(n: int, test: np.ndarray) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask)


def best_index(scores: np.ndarray) -> int:
    """``GridSearchCV``'s choice: the highest mean score, NaN ranked last, ties to the smaller index
    (index 0 when every score is NaN)."""
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).all():
        return 0
    return int(np.argmax(np.where(np.isnan(scores), -np.inf, scores)))


# -- fitted linear models (plain numpy, picklable) --------------------------------------------------
@dataclass
class LinearRegressor:
    """``predict(X) = X @ coef_ + intercept_`` in float64; ``coef_`` (p,), ``alpha`` the Ridge penalty."""

    coef_: np.ndarray
    intercept_: float
    alpha: float

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float64) @ self.coef_ + self.intercept_


@dataclass
class LinearClassifier:
    """``predict(X) = classes_[argmax(X @ coef_.T + intercept_)]``; ``coef_`` (k, p) over the classes of
    ``classes_`` (k,), or (1, p) for two classes (the decision of ``classes_[1]`` against 0), as scikit-learn."""

    coef_: np.ndarray
    intercept_: np.ndarray
    classes_: np.ndarray
    C: float

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float64) @ self.coef_.T + self.intercept_

    def predict(self, X: np.ndarray) -> np.ndarray:
        scores = self.decision_function(X)
        if self.coef_.shape[0] == 1:
            return self.classes_[(scores[:, 0] > 0).astype(np.int64)]
        return self.classes_[np.argmax(scores, axis=1)]


@dataclass
class ConstantClassifier:
    """Predicts ``label`` for every row (one class only)."""

    label: object

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.full(np.asarray(X).shape[0], self.label, dtype=np.asarray([self.label]).dtype)


# -- scores as scikit-learn computes them -----------------------------------------------------------
def r2_scores(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """``sklearn.metrics.r2_score`` for each column of ``y_pred`` (n, a): NaN for fewer than 2 rows; with a
    constant ``y_true``, 1 for a perfect prediction and 0 otherwise (scikit-learn's ``force_finite``)."""
    if y_true.shape[0] < 2:
        return np.full(y_pred.shape[1], np.nan)
    y_true = y_true.reshape(-1, 1)
    numerator = ((y_true - y_pred) ** 2).sum(axis=0)
    denominator = np.broadcast_to(((y_true - np.average(y_true, axis=0)) ** 2).sum(axis=0), numerator.shape)
    out = np.ones(y_pred.shape[1])
    valid = (numerator != 0) & (denominator != 0)
    out[valid] = 1.0 - numerator[valid] / denominator[valid]
    out[(numerator != 0) & (denominator == 0)] = 0.0
    return out


def balanced_accuracy_codes(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """``sklearn.metrics.balanced_accuracy_score``: the mean recall over the classes present in ``y_true``."""
    labels, inverse = np.unique(y_true, return_inverse=True)
    hits = np.bincount(inverse, weights=(y_true == y_pred).astype(np.float64), minlength=labels.size)
    return float(np.mean(hits / np.bincount(inverse, minlength=labels.size)))


# -- Ridge -------------------------------------------------------------------------------------------
def _ridge_coefs(X: torch.Tensor, y: torch.Tensor, alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (p, a) and intercepts (a,) of Ridge with an intercept by centring, for every alpha,
    from one eigendecomposition of the smaller centred Gram matrix."""
    x_mean = X.mean(dim=0)
    y_mean = y.mean()
    Xc = X - x_mean
    yc = y - y_mean
    n, p = Xc.shape
    if p <= n:
        evals, evecs = torch.linalg.eigh(Xc.T @ Xc)
        proj = evecs.T @ (Xc.T @ yc)  # (r,)
        coefs = evecs @ (proj[:, None] / (evals[:, None] + alphas[None, :]))
    else:  # kernel form: w = Xc^T (Xc Xc^T + alpha I)^-1 yc
        evals, evecs = torch.linalg.eigh(Xc @ Xc.T)
        proj = evecs.T @ yc
        coefs = Xc.T @ (evecs @ (proj[:, None] / (evals[:, None] + alphas[None, :])))
    intercepts = y_mean - x_mean @ coefs
    return coefs, intercepts


def fast_ridge_search(
    X: torch.Tensor, y: np.ndarray, alphas: tuple[float, ...], n_splits: int
) -> tuple[LinearRegressor, float, np.ndarray]:
    """Grid search of Ridge over ``alphas`` by the mean r² of ``n_splits`` unshuffled folds, refit on all rows.

    ``X`` (n, p) float64 on the device; ``y`` (n,) float64 numpy. Returns the refit model (with the chosen
    alpha; alpha chosen by :func:`best_index`), the best mean r² (NaN when r² is undefined in some fold)
    and the mean r² per alpha.
    """
    n = X.shape[0]
    alpha_t = torch.tensor(alphas, dtype=torch.float64, device=X.device)
    y_t = torch.as_tensor(y, dtype=torch.float64, device=X.device)
    fold_scores = []
    for test in kfold_indices(n, n_splits):
        train = complement_indices(n, test)
        tr = torch.as_tensor(train, device=X.device)
        te = torch.as_tensor(test, device=X.device)
        coefs, intercepts = _ridge_coefs(X[tr], y_t[tr], alpha_t)
        pred = (X[te] @ coefs + intercepts).cpu().numpy()
        fold_scores.append(r2_scores(y[test], pred))
    mean_scores = np.mean(np.stack(fold_scores), axis=0)
    best = best_index(mean_scores)
    coefs, intercepts = _ridge_coefs(X, y_t, alpha_t[best : best + 1])
    model = LinearRegressor(coefs[:, 0].cpu().numpy(), float(intercepts[0].item()), float(alphas[best]))
    return model, float(mean_scores[best]), mean_scores
