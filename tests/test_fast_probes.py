"""The fast probe protocol against scikit-learn: folds, Ridge to 1e-6, logistic regression at its optimum,
edge cases and errors under both protocols (docs/probes.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold

from brainage_core.errors import BrainageError
from brainage_core.evaluation import AGE_ALPHAS, SITE_CS, fit_age_probe, fit_site_probe
from brainage_core.evaluation import fast_probes as fp
from brainage_core.evaluation.fast_logistic import fast_logistic_search
from brainage_core.evaluation.scores import balanced_accuracy


def sk_folds(splitter, X, y):
    return [test for _, test in splitter.split(X, y)]


@pytest.mark.parametrize("n", [5, 23, 100])
def test_folds_are_scikit_learns(n):
    rng = np.random.default_rng(n)
    X = np.zeros((n, 1))
    y = rng.integers(0, 3, n)
    y[: min(n, 15)] = np.arange(min(n, 15)) % 3  # every class has >= 5 members when n >= 15
    for got, want in zip(fp.kfold_indices(n, 5), sk_folds(KFold(5), X, y)):
        np.testing.assert_array_equal(got, want)
    shuffled = sk_folds(KFold(5, shuffle=True, random_state=3), X, y)
    for got, want in zip(fp.kfold_indices(n, 5, shuffle=True, seed=3), shuffled):
        np.testing.assert_array_equal(got, want)
    if n >= 15:
        labels = np.array(["b", "a", "c"])[y]  # order of first appearance differs from the sorted order
        for got, want in zip(fp.stratified_kfold_indices(labels, 5), sk_folds(StratifiedKFold(5), X, labels)):
            np.testing.assert_array_equal(got, want)


def sk_ridge(X, y):
    return GridSearchCV(Ridge(), {"alpha": list(AGE_ALPHAS)}, cv=KFold(5), scoring="r2").fit(X, y)


def ridge_cases():
    rng = np.random.default_rng(0)
    ages = rng.uniform(6, 88, 120)
    X = rng.normal(size=(120, 8)) + 0.05 * ages[:, None]
    yield "random", X, ages
    yield "more features than subjects", rng.normal(size=(40, 90)) * 3.0, rng.uniform(6, 88, 40)
    Xc = X.copy()
    Xc[:, 3] = 2.5
    yield "a constant feature", Xc, ages
    const = ages.copy()
    const[:24] = 30.0  # the first unshuffled fold
    yield "a fold with constant ages", X, const
    tiny = rng.normal(size=(10, 3))
    near_copy = tiny[:, :1] + 1e-9 * rng.normal(size=(10, 1))
    yield "near-singular features", np.hstack([tiny, near_copy]), rng.uniform(6, 88, 10)


@pytest.mark.parametrize("case", list(ridge_cases()), ids=lambda c: c[0])
def test_fast_ridge_equals_grid_search_ridge(case):
    _, X, y = case
    want = sk_ridge(X, y)
    probe = fit_age_probe(X, y, protocol="fast")
    assert probe.protocol == "fast" and probe.note is None
    assert probe.param["alpha"] == want.best_params_["alpha"]
    assert probe.cv_score == pytest.approx(want.best_score_, rel=1e-6, abs=1e-9)
    expected = want.predict(X)
    got = probe.estimator.predict(X)
    assert np.max(np.abs(got - expected)) <= 1e-6 * np.max(np.abs(expected))
    fold_scores = fp.fast_ridge_search(torch.as_tensor(X, dtype=torch.float64), y, AGE_ALPHAS, 5)[2]
    np.testing.assert_allclose(fold_scores, want.cv_results_["mean_test_score"], rtol=1e-6, atol=1e-9)


def test_fast_ridge_on_float32_features_and_a_tensor():
    rng = np.random.default_rng(1)
    y = rng.uniform(6, 88, 200)
    X = (rng.normal(size=(200, 16)) + 0.03 * y[:, None]).astype(np.float32)
    exact = fit_age_probe(X, y, protocol="exact")
    fast = fit_age_probe(torch.from_numpy(X), torch.from_numpy(y), protocol="fast")
    assert fast.param == exact.param
    # the exact protocol works in float32 (as the kit): agreement to its precision
    np.testing.assert_allclose(fast.predict(X), exact.predict(X), rtol=1e-4)
    np.testing.assert_allclose(fast.predict(X), sk_ridge(X.astype(np.float64), y).predict(X.astype(np.float64)),
                               rtol=1e-6)


def test_undefined_r2_everywhere_gives_the_same_fallback_under_both_protocols():
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(5, 3)), rng.uniform(6, 88, 5)  # one subject per fold: r² undefined
    exact, fast = fit_age_probe(X, y, protocol="exact"), fit_age_probe(X, y, protocol="fast")
    assert exact.note == fast.note == "r² undefined in every fold: alpha = 1"
    assert fast.param == {"alpha": 1.0} and np.isnan(fast.cv_score)
    np.testing.assert_allclose(fast.predict(X), exact.predict(X), rtol=1e-5)


def site_problem(n=150, p=4, k=3, seed=0, sep=1.2):
    rng = np.random.default_rng(seed)
    sites = np.repeat(np.arange(k), n // k)
    rng.shuffle(sites)
    centres = rng.normal(size=(k, p)) * sep
    return rng.normal(size=(n, p)) + centres[sites], sites


def sk_logistic(X, sites, cv):
    clf = LogisticRegression(solver="lbfgs", max_iter=100_000, tol=1e-12)
    return GridSearchCV(clf, {"C": list(SITE_CS)}, cv=cv, scoring="balanced_accuracy").fit(X, sites)


@pytest.mark.parametrize("k", [2, 3])
def test_fast_logistic_reaches_scikit_learns_converged_solution(k):
    X, sites = site_problem(k=k, sep=0.5)
    labels = np.array(["s07", "s02", "s11"])[sites]
    want = sk_logistic(X, labels, StratifiedKFold(5))
    probe = fit_site_probe(X, labels, protocol="fast")
    assert probe.protocol == "fast" and probe.note is None
    assert probe.param["C"] == want.best_params_["C"]
    assert probe.cv_score == pytest.approx(want.best_score_, abs=1e-12)
    est = want.best_estimator_
    assert probe.estimator.coef_.shape == est.coef_.shape
    np.testing.assert_allclose(probe.estimator.coef_, est.coef_, atol=1e-3)
    centred = probe.estimator.intercept_ - probe.estimator.intercept_.mean() * (k > 2)
    np.testing.assert_allclose(centred, est.intercept_ - est.intercept_.mean() * (k > 2), atol=1e-3)
    np.testing.assert_array_equal(probe.predict(X), est.predict(X))


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_logistic_close_calls_are_scored_at_the_converged_fits(seed):
    """Random labels with nearly as many features as rows: every C scores within a few points, and the fold
    fits at scikit-learn's default tolerance alone choose another C than converged fits do (on these seeds)."""
    rng = np.random.default_rng(seed)
    X, sites = rng.normal(size=(120, 80)), rng.integers(0, 3, 120)
    want = sk_logistic(X, sites, StratifiedKFold(5))
    result = fast_logistic_search(torch.as_tensor(X), sites, SITE_CS, fp.stratified_kfold_indices(sites, 5))
    assert result.refined == list(SITE_CS) and result.converged
    np.testing.assert_allclose(result.mean_scores, want.cv_results_["mean_test_score"], atol=1e-12)
    assert result.best_c == want.best_params_["C"]


def test_close_calls_are_refined_until_every_c_near_the_best_is_scored_at_the_tight_tolerance():
    from brainage_core.evaluation.fast_logistic import _to_refine

    assert _to_refine(np.array([0.5, 0.6, 0.9, 0.7, 0.8]), []) == []  # one C within 0.05 of the best: decided
    assert _to_refine(np.array([np.nan] * 5), []) == []
    # bench/probes.py's collinear set: the weakly regularised fits, stopped early, score above their optimum
    first = np.array([0.5077, 0.5723, 0.5903, 0.6021, 0.6452])
    assert _to_refine(first, []) == [3, 4]
    # refined, C = 10 and 100 fall: C = 0.1 and 1 are within the margin of the new best, and refined in turn
    assert _to_refine(np.array([0.5077, 0.5723, 0.5903, 0.5901, 0.5825]), [3, 4]) == [1, 2]
    assert _to_refine(np.array([0.5077, 0.5740, 0.5855, 0.5901, 0.5825]), [1, 2, 3, 4]) == []
    # once any C was refined, a sole contender that was not is refined too
    assert _to_refine(np.array([0.1, 0.2, 0.9, 0.5, 0.4]), [3, 4]) == [2]


@pytest.mark.parametrize("preconditioner", ["class blocks", "Kronecker factors"])
def test_fast_logistic_model_converges_under_either_preconditioner(preconditioner, monkeypatch):
    from brainage_core.evaluation import fast_logistic

    if preconditioner == "Kronecker factors":
        monkeypatch.setattr(fast_logistic, "CLASS_BLOCKS_MAX_FEATURES", 0)
    assert fast_logistic._class_blocks_pay(4, torch.device("cpu")) == (preconditioner == "class blocks")
    X, sites = site_problem(n=240, k=4, seed=6, sep=1.5)
    want = sk_logistic(X, sites, StratifiedKFold(5))
    probe = fit_site_probe(X, sites, protocol="fast")
    assert probe.param["C"] == want.best_params_["C"]
    np.testing.assert_allclose(probe.estimator.coef_, want.best_estimator_.coef_, atol=1e-3)
    np.testing.assert_array_equal(probe.predict(X), want.best_estimator_.predict(X))


def degenerate_site_features(case):
    X, sites = site_problem(n=90, p=5, k=3, seed=2, sep=0.8)
    if case == "a constant feature":
        return np.column_stack([X, np.full(len(X), 3.0)]), sites
    if case == "a duplicated feature and an offset":  # collinear columns, features far from the origin
        return np.column_stack([X, X[:, 0]]) + 50.0, sites
    rng = np.random.default_rng(5)  # more features than the training rows of a fold
    return np.column_stack([X, rng.normal(size=(len(X), 80))]), sites


@pytest.mark.parametrize("case", ["a constant feature", "a duplicated feature and an offset",
                                  "more features than subjects"])
def test_fast_logistic_on_degenerate_features_reaches_the_converged_solution(case):
    X, sites = degenerate_site_features(case)
    want = sk_logistic(X, sites, StratifiedKFold(5))
    probe = fit_site_probe(X, sites, protocol="fast")
    assert probe.note is None and probe.param["C"] == want.best_params_["C"]
    assert probe.cv_score == pytest.approx(want.best_score_, abs=1e-12)
    est = want.best_estimator_
    np.testing.assert_allclose(probe.estimator.coef_, est.coef_, atol=1e-3 * max(1.0, np.abs(est.coef_).max()))
    np.testing.assert_array_equal(probe.predict(X), est.predict(X))


def test_fast_logistic_when_a_training_fold_misses_a_class():
    X, sites = site_problem(n=60, k=3, seed=4)
    sites[:3] = 3  # a site of 3 subjects: shuffled KFold, some training folds lack it
    exact = fit_site_probe(X, sites, protocol="exact", seed=1)
    fast = fit_site_probe(X, sites, protocol="fast", seed=1)
    assert fast.note == exact.note and "shuffled 5-fold search instead of stratified" in fast.note
    folds = sk_folds(KFold(5, shuffle=True, random_state=1), X, sites)
    want = sk_logistic(X, sites, KFold(5, shuffle=True, random_state=1))
    result = fast_logistic_search(torch.as_tensor(X), sites, SITE_CS, folds)
    np.testing.assert_allclose(result.mean_scores, want.cv_results_["mean_test_score"], atol=1e-12)
    assert fast.param["C"] == want.best_params_["C"]


def test_fast_site_probe_edge_cases_match_the_exact_protocol():
    X, _ = site_problem(n=18)
    one = np.full(18, "siteA")
    exact, fast = fit_site_probe(X, one, protocol="exact"), fit_site_probe(X, one, protocol="fast")
    assert fast.note == exact.note == "one site only (siteA): constant prediction"
    assert (fast.predict(X) == "siteA").all() and np.isnan(fast.param["C"])
    X, sites = site_problem(n=300, p=6, k=5, seed=3, sep=3.0)
    fast = fit_site_probe(X, sites, protocol="fast")
    assert balanced_accuracy(sites, fast.predict(X)) > 0.9


@pytest.mark.parametrize("protocol", ["exact", "fast"])
def test_bad_inputs_give_the_same_errors_under_both_protocols(protocol):
    with pytest.raises(BrainageError, match=r"fit_age_probe: non-finite features \(first at training row 2\)"):
        X = np.zeros((10, 2))
        X[2, 1] = np.inf
        fit_age_probe(X, np.arange(10.0), protocol=protocol)
    with pytest.raises(BrainageError, match="fit_site_probe: 10 feature rows but 9 labels"):
        fit_site_probe(np.zeros((10, 2)), np.arange(9), protocol=protocol)
    with pytest.raises(BrainageError, match="fit_age_probe: non-finite ages"):
        fit_age_probe(np.zeros((10, 2)), np.full(10, np.nan), protocol=protocol)
    with pytest.raises(BrainageError, match=r"features of shape \(10,\)"):
        fit_site_probe(np.zeros(10), np.arange(10), protocol=protocol)


def test_unknown_protocol_is_one_clear_error():
    with pytest.raises(BrainageError, match="fit_site_probe: protocol = 'quick'; expected one of exact, fast"):
        fit_site_probe(np.zeros((10, 2)), np.arange(10), protocol="quick")
