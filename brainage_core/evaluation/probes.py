"""The challenge's linear probes on frozen features (``docs/evaluation.md``, "Probes").

- Age: ``Ridge``, alpha in {0.01, 0.1, 1, 10, 100}, chosen by 5-fold grid search on r².
- Site: ``LogisticRegression(solver="saga", max_iter=150)``, C in {0.01, 0.1, 1, 10, 100}, chosen by
  5-fold grid search on balanced accuracy.
- No feature scaling; fit on training features only (never on test subjects: callers pass only the
  training rows).

The folds are scikit-learn's defaults for ``cv=5`` as in the challenge kit (KFold for the Ridge,
StratifiedKFold for the classifier, no shuffling). When a site has fewer than 5 members, stratified
folds are impossible; the site probe then uses shuffled KFold (seeded) and says so in ``note``.

Two protocols (``protocol=``), see ``docs/probes.md``:

- ``"exact"``: scikit-learn's ``GridSearchCV`` as the challenge kit runs it (saga's 150 iterations
  included), on the CPU. What the challenge server would score.
- ``"fast"``: the same estimators, folds and selection rules in torch on ``device``: Ridge computed
  exactly (:mod:`brainage_core.evaluation.fast_probes`; its predictions equal the exact protocol's to
  rounding), the logistic fits batched and run to convergence (:mod:`brainage_core.evaluation.fast_logistic`;
  saga's 150 iterations usually stop short of it, so site BAcc may differ slightly from the exact protocol's).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from brainage_core.errors import BrainageError

# scikit-learn is imported where a probe is fitted, not here: importing it costs ~0.7 s, and every DDP rank
# imports this module while only rank 0 ever fits a probe (bench/study_overhead.py).

AGE_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0)
SITE_CS = (0.01, 0.1, 1.0, 10.0, 100.0)
N_FOLDS = 5
SITE_MAX_ITER = 150
PROTOCOLS = ("exact", "fast")


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
    protocol: str = "exact"

    def predict(self, X: Any) -> np.ndarray:
        """Ages in years (n,) / site labels (n,) of features ``X`` (n, p): numpy or a torch tensor."""
        return self.estimator.predict(np.asarray(_to_numpy(X), dtype=np.float32))


def _to_numpy(X: Any) -> np.ndarray:
    if isinstance(X, torch.Tensor):
        return X.detach().cpu().numpy()
    return np.asarray(X)


def _check_protocol(protocol: str, what: str) -> None:
    if protocol not in PROTOCOLS:
        raise BrainageError(f"{what}: protocol = {protocol!r}; expected one of {', '.join(PROTOCOLS)}")


def _fast_input(X: np.ndarray, device: Any, original: Any) -> torch.Tensor:
    """``X`` as float64 on ``device`` (None: the original tensor's device, else the CPU)."""
    if device is None:
        device = original.device if isinstance(original, torch.Tensor) else "cpu"
    if isinstance(original, torch.Tensor):
        return original.detach().to(device=torch.device(device), dtype=torch.float64)
    return torch.as_tensor(np.asarray(X, dtype=np.float64), device=torch.device(device))


def _check_features(X: Any, y: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    X = _to_numpy(X)
    y = _to_numpy(y).reshape(-1)
    if X.ndim != 2:
        raise BrainageError(f"{what}: features of shape {X.shape}; expected (n_subjects, n_features)")
    if X.shape[0] != y.shape[0]:
        raise BrainageError(f"{what}: {X.shape[0]} feature rows but {y.shape[0]} labels; expected the same number")
    if X.shape[0] < 2:
        raise BrainageError(f"{what}: {X.shape[0]} training subject(s); expected at least 2 to fit a probe")
    if not np.isfinite(X).all():
        bad = int(np.argwhere(~np.isfinite(X).all(axis=1))[0, 0])
        raise BrainageError(f"{what}: non-finite features (first at training row {bad}); expected finite values")
    return X, y


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


def fit_age_probe(
    X: Any, y: Any, *, protocol: str = "exact", device: Any = None, n_jobs: int | None = None
) -> FittedProbe:
    """Ridge age probe (alpha by 5-fold grid search on r²) fit on training features ``X`` (n, p) and ages ``y`` (n,).

    ``X``: numpy or a torch tensor. ``protocol``: ``"exact"`` (scikit-learn, CPU) or ``"fast"`` (the same
    search computed exactly in float64 on ``device``: a torch device, or None for ``X``'s device when it
    is a tensor, else the CPU). ``n_jobs``: processes for the exact grid search (scikit-learn's meaning;
    None = 1). ``predict`` gives ages in years.
    """
    _check_protocol(protocol, "fit_age_probe")
    original = X
    X, y = _check_features(X, y, "fit_age_probe")
    y = y.astype(np.float64)
    if not np.isfinite(y).all():
        raise BrainageError("fit_age_probe: non-finite ages; expected finite ages in years")
    n_splits = min(N_FOLDS, X.shape[0])
    note = None if n_splits == N_FOLDS else f"{X.shape[0]} subjects: {n_splits}-fold search instead of {N_FOLDS}"
    undefined = "r² undefined in every fold: alpha = 1"
    if protocol == "fast":
        from brainage_core.evaluation.fast_probes import fast_ridge_search

        Xt = _fast_input(X, device, original)
        model, score, mean_scores = fast_ridge_search(Xt, y, AGE_ALPHAS, n_splits)
        if np.isnan(mean_scores).all():
            model, _, _ = fast_ridge_search(Xt, y, (1.0,), n_splits)
            return FittedProbe(model, {"alpha": 1.0}, float("nan"), undefined, protocol)
        return FittedProbe(model, {"alpha": model.alpha}, score, note, protocol)

    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold

    X = X.astype(np.float32, copy=False)
    search, _ = _search(Ridge(), {"alpha": list(AGE_ALPHAS)}, KFold(n_splits), "r2", X, y, n_jobs)
    score = float(search.best_score_)
    if np.isnan(search.cv_results_["mean_test_score"]).all():  # r² undefined (e.g. a single subject per fold)
        estimator = Ridge(alpha=1.0).fit(X, y)
        return FittedProbe(estimator, {"alpha": 1.0}, float("nan"), undefined, protocol)
    return FittedProbe(search.best_estimator_, {"alpha": float(search.best_params_["alpha"])}, score, note, protocol)


def fit_site_probe(
    X: Any,
    sites: Any,
    *,
    protocol: str = "exact",
    device: Any = None,
    seed: int = 0,
    n_jobs: int | None = None,
) -> FittedProbe:
    """Logistic-regression site probe (C by 5-fold grid search on balanced accuracy) on features ``X`` (n, p).

    ``sites``: (n,) labels (codes or strings). ``protocol``/``device`` as in :func:`fit_age_probe`:
    ``"exact"`` is scikit-learn's saga with ``max_iter`` 150 (as the challenge kit); ``"fast"`` the same
    objective, C grid and folds, every fold x C fit batched into one L-BFGS problem on the device and run
    to convergence. ``seed`` drives the shuffled-KFold fallback (both protocols) and saga's sampling
    order; ``n_jobs`` as in :func:`fit_age_probe`. Cost of the exact protocol: the 25 saga fits dominate
    an evaluation (about 100 s for 2,600 x 128 features and 58 sites on one busy CPU core).
    """
    _check_protocol(protocol, "fit_site_probe")
    original = X
    X, sites = _check_features(X, sites, "fit_site_probe")
    labels, counts = np.unique(sites, return_counts=True)
    if labels.size == 1:
        note = f"one site only ({labels[0]}): constant prediction"
        if protocol == "fast":
            from brainage_core.evaluation.fast_probes import ConstantClassifier

            return FittedProbe(ConstantClassifier(labels[0]), {"C": float("nan")}, float("nan"), note, protocol)
        from sklearn.dummy import DummyClassifier

        est = DummyClassifier(strategy="most_frequent").fit(X, sites)
        return FittedProbe(est, {"C": float("nan")}, float("nan"), note, protocol)
    notes = []
    n_splits = min(N_FOLDS, X.shape[0])
    stratified = bool(counts.min() >= N_FOLDS)
    if not stratified:
        notes.append(
            f"{int((counts < N_FOLDS).sum())} site(s) with fewer than {N_FOLDS} subjects: "
            f"shuffled {n_splits}-fold search instead of stratified"
        )
    if protocol == "fast":
        from brainage_core.evaluation.fast_logistic import LOGISTIC_CV_GTOL, LOGISTIC_GTOL, fast_logistic_search
        from brainage_core.evaluation.fast_probes import kfold_indices, stratified_kfold_indices

        folds = (
            stratified_kfold_indices(sites, N_FOLDS)
            if stratified
            else kfold_indices(X.shape[0], n_splits, shuffle=True, seed=seed)
        )
        result = fast_logistic_search(_fast_input(X, device, original), sites, SITE_CS, folds)
        if not result.converged:
            notes.append(
                f"L-BFGS stopped short of convergence (gradient max-norm: the model {result.max_gradient:.2g}, "
                f"tolerance {LOGISTIC_GTOL:g}; the fold fits {result.max_cv_gradient:.2g}, tolerance "
                f"{LOGISTIC_CV_GTOL:g}; at most {result.iterations} iterations)"
            )
        return FittedProbe(result.model, {"C": result.best_c}, result.best_score, "; ".join(notes) or None, protocol)

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, StratifiedKFold

    X = X.astype(np.float32, copy=False)
    cv: Any = StratifiedKFold(N_FOLDS) if stratified else KFold(n_splits, shuffle=True, random_state=seed)
    clf = LogisticRegression(solver="saga", max_iter=SITE_MAX_ITER, random_state=seed)
    search, converged = _search(clf, {"C": list(SITE_CS)}, cv, "balanced_accuracy", X, sites, n_jobs)
    if not converged:
        notes.append(f"saga did not converge in {SITE_MAX_ITER} iterations for some fits (as in the challenge)")
    best_c = float(search.best_params_["C"])
    return FittedProbe(
        search.best_estimator_, {"C": best_c}, float(search.best_score_), "; ".join(notes) or None, protocol
    )


__all__ = ["AGE_ALPHAS", "PROTOCOLS", "SITE_CS", "FittedProbe", "fit_age_probe", "fit_site_probe"]
