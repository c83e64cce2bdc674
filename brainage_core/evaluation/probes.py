"""The challenge's linear probes on frozen features (``docs/evaluation.md``, "Probes").

- Age: ``Ridge``, alpha in {0.01, 0.1, 1, 10, 100}, chosen by 5-fold grid search on r².
- Site: ``LogisticRegression(solver="saga", max_iter=150)``, C in {0.01, 0.1, 1, 10, 100}, chosen by
  5-fold grid search on balanced accuracy.
- No feature scaling; fit on training features only (never on test subjects: callers pass only the
  training rows).

The folds are scikit-learn's defaults for ``cv=5`` as in the challenge kit (KFold for the Ridge,
StratifiedKFold for the classifier, no shuffling). When a site has fewer than 5 members, stratified
folds are impossible; the site probe then uses shuffled KFold (seeded) and says so in ``note``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from brainage_core.errors import BrainageError

# scikit-learn is imported where a probe is fitted, not here: importing it costs ~0.7 s, and every DDP rank
# imports this module while only rank 0 ever fits a probe (bench/study_overhead.py).

AGE_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0)
SITE_CS = (0.01, 0.1, 1.0, 10.0, 100.0)
N_FOLDS = 5
SITE_MAX_ITER = 150


@dataclass
class FittedProbe:
    """A fitted probe: ``estimator`` (refit on all training rows with the best parameter), the chosen
    ``param`` (``{"alpha": ...}`` or ``{"C": ...}``), its mean cross-validated ``cv_score`` (r² or
    balanced accuracy; NaN when no search was possible) and a ``note`` on any departure from the
    challenge protocol (fold fallback, non-convergence, a single class), else None."""

    estimator: Any
    param: dict[str, float]
    cv_score: float
    note: str | None = None

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.estimator.predict(np.asarray(X, dtype=np.float32))


def _check_features(X: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X)
    y = np.asarray(y).reshape(-1)
    if X.ndim != 2:
        raise BrainageError(f"{what}: features of shape {X.shape}; expected (n_subjects, n_features)")
    if X.shape[0] != y.shape[0]:
        raise BrainageError(f"{what}: {X.shape[0]} feature rows but {y.shape[0]} labels; expected the same number")
    if X.shape[0] < 2:
        raise BrainageError(f"{what}: {X.shape[0]} training subject(s); expected at least 2 to fit a probe")
    if not np.isfinite(X).all():
        bad = int(np.argwhere(~np.isfinite(X).all(axis=1))[0, 0])
        raise BrainageError(f"{what}: non-finite features (first at training row {bad}); expected finite values")
    return X.astype(np.float32, copy=False), y


def load_estimators() -> None:
    """Import the scikit-learn estimators the probes use (about 0.7 s), e.g. during set-up on the rank
    that will evaluate, so that the first evaluation's ``eval_s`` measures fitting, not importing."""
    import sklearn.dummy  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import sklearn.model_selection  # noqa: F401


def _search(
    estimator: Any,
    grid: dict[str, list[float]],
    cv: Any,
    scoring: str,
    X: np.ndarray,
    y: np.ndarray,
    n_jobs: int | None,
):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV

    search = GridSearchCV(estimator, grid, cv=cv, scoring=scoring, error_score=np.nan, n_jobs=n_jobs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        search.fit(X, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return search, converged


def fit_age_probe(X: np.ndarray, y: np.ndarray, *, n_jobs: int | None = None) -> FittedProbe:
    """Ridge age probe (alpha by 5-fold grid search on r²) fit on training features ``X`` (n, p) and ages ``y`` (n,).

    ``n_jobs``: processes for the grid search (scikit-learn's meaning; None = 1).
    """
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold

    X, y = _check_features(X, y, "fit_age_probe")
    y = y.astype(np.float64)
    if not np.isfinite(y).all():
        raise BrainageError("fit_age_probe: non-finite ages; expected finite ages in years")
    n_splits = min(N_FOLDS, X.shape[0])
    note = None if n_splits == N_FOLDS else f"{X.shape[0]} subjects: {n_splits}-fold search instead of {N_FOLDS}"
    search, _ = _search(Ridge(), {"alpha": list(AGE_ALPHAS)}, KFold(n_splits), "r2", X, y, n_jobs)
    score = float(search.best_score_)
    if np.isnan(search.cv_results_["mean_test_score"]).all():  # r² undefined (e.g. constant ages in a fold)
        estimator = Ridge(alpha=1.0).fit(X, y)
        return FittedProbe(estimator, {"alpha": 1.0}, float("nan"), "r² undefined in every fold: alpha = 1")
    return FittedProbe(search.best_estimator_, {"alpha": float(search.best_params_["alpha"])}, score, note)


def fit_site_probe(X: np.ndarray, sites: np.ndarray, *, seed: int = 0, n_jobs: int | None = None) -> FittedProbe:
    """Logistic-regression site probe (saga, max_iter 150, C by 5-fold grid search on balanced accuracy).

    ``sites``: (n,) labels (codes or strings). ``seed`` only drives the shuffled-KFold fallback and
    saga's sampling order; ``n_jobs`` as in :func:`fit_age_probe`. Cost: the 25 saga fits dominate an
    evaluation (about 100 s for 2,600 x 128 features and 58 sites on one busy CPU core).
    """
    from sklearn.dummy import DummyClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, StratifiedKFold

    X, sites = _check_features(X, sites, "fit_site_probe")
    labels, counts = np.unique(sites, return_counts=True)
    if labels.size == 1:
        est = DummyClassifier(strategy="most_frequent").fit(X, sites)
        return FittedProbe(est, {"C": float("nan")}, float("nan"), f"one site only ({labels[0]}): constant prediction")
    notes = []
    n_splits = min(N_FOLDS, X.shape[0])
    if counts.min() >= N_FOLDS:
        cv: Any = StratifiedKFold(N_FOLDS)
    else:
        cv = KFold(n_splits, shuffle=True, random_state=seed)
        notes.append(
            f"{int((counts < N_FOLDS).sum())} site(s) with fewer than {N_FOLDS} subjects: "
            f"shuffled {n_splits}-fold search instead of stratified"
        )
    clf = LogisticRegression(solver="saga", max_iter=SITE_MAX_ITER, random_state=seed)
    search, converged = _search(clf, {"C": list(SITE_CS)}, cv, "balanced_accuracy", X, sites, n_jobs)
    if not converged:
        notes.append(f"saga did not converge in {SITE_MAX_ITER} iterations for some fits (as in the challenge)")
    best_c = float(search.best_params_["C"])
    return FittedProbe(search.best_estimator_, {"C": best_c}, float(search.best_score_), "; ".join(notes) or None)


__all__ = ["AGE_ALPHAS", "SITE_CS", "FittedProbe", "fit_age_probe", "fit_site_probe"]
