"""``python -m brainage_core.data realism STORE [--json]``: does a cohort show the benchmark's phenomenon?

On a prepared store, with linear baselines on pooled voxels (the store's volumes block-averaged to the
6 mm grid, voxels that are non-zero in some training subject):

* site probe — L2 multinomial LogisticRegression fit on train, balanced accuracy (BAcc) on
  internal_test; chance = 1 / number of sites in internal_test;
* age baseline — RidgeCV (α by efficient leave-one-out over a log grid) fit on train; MAE on
  internal_test and external_test, and their ratio MAE_ext / MAE_int.

The external part is only ~10 % of a cohort, so one split is noisy: figures are the mean over
``repartitions`` (default 5) re-partitions of train ∪ internal_test with the same per-site counts
(external_test fixed), reported with their standard deviation over re-partitions and a bootstrap 95 %
interval (basic bootstrap: subjects of each test set resampled with replacement, the mean over
re-partitions recomputed).

The logistic probe runs on the training data's principal-component scores with every component kept:
with an L2 penalty and an unpenalised intercept this is the same optimum as on the centred voxels
(the penalty is rotation-invariant and the optimal weights lie in the span of the training data),
only much cheaper when voxels outnumber subjects.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd

from brainage_core.errors import StoreError
from brainage_core.grids import block_factor

FEATURE_GRID = "6mm"
RIDGE_ALPHAS = np.logspace(-4, 6, 21)
SITE_PROBE_C = 1.0
BOOTSTRAP_SAMPLES = 1000


def pooled_features(array: np.ndarray, grid: str, *, chunk: int = 64) -> np.ndarray:
    """(N, 1, D, H, W) volumes on ``grid`` → float32 (N, V) block-averaged to :data:`FEATURE_GRID`
    (read ``chunk`` subjects at a time, so a memmap is never loaded whole)."""
    from brainage_core.grids import block_average

    factor = block_factor(grid, FEATURE_GRID) if grid != FEATURE_GRID else 1
    rows = []
    for start in range(0, array.shape[0], chunk):
        block = np.asarray(array[start : start + chunk], dtype=np.float32)
        rows.append(block_average(block, factor).reshape(block.shape[0], -1))
    if not rows:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(rows).astype(np.float32, copy=False)


@dataclass
class PartitionResult:
    """Per-subject outcomes of one re-partition (arrays aligned with the test subjects)."""

    site_true: np.ndarray
    site_pred: np.ndarray
    abs_err_int: np.ndarray
    abs_err_ext: np.ndarray
    alpha: float


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    classes, inverse = np.unique(y_true, return_inverse=True)
    hits = np.bincount(inverse, weights=(y_true == y_pred).astype(float), minlength=classes.size)
    return float(np.mean(hits / np.bincount(inverse, minlength=classes.size)))


def _site_probe(x_train: np.ndarray, s_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    mean = x_train.mean(axis=0, dtype=np.float64)
    xc = x_train - mean
    # principal-component scores from the Gram matrix's eigenvectors (cheaper than an SVD when V ≫ N)
    eigval, eigvec = np.linalg.eigh(xc @ xc.T)
    keep = eigval > eigval.max() * 1e-10
    sv = np.sqrt(eigval[keep])
    z_train = eigvec[:, keep] * sv
    z_test = ((x_test - mean) @ xc.T) @ (eigvec[:, keep] / sv)
    probe = LogisticRegression(C=SITE_PROBE_C, max_iter=1000, tol=1e-3)
    probe.fit(z_train, s_train)
    return probe.predict(z_test)


def _age_baseline(x_train: np.ndarray, y_train: np.ndarray, x_int: np.ndarray, x_ext: np.ndarray):
    from sklearn.linear_model import RidgeCV

    model = RidgeCV(alphas=RIDGE_ALPHAS).fit(x_train.astype(np.float64), y_train)
    return model.predict(x_int.astype(np.float64)), model.predict(x_ext.astype(np.float64)), float(model.alpha_)


def repartition(sites: np.ndarray, internal_sites: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask over the pooled train ∪ internal_test subjects: True = internal test. Each site keeps
    its original number of internal test subjects (``internal_sites`` lists one site per original
    internal test subject)."""
    mask = np.zeros(sites.size, bool)
    labels, counts = np.unique(internal_sites, return_counts=True)
    for label, count in zip(labels, counts):
        members = np.flatnonzero(sites == label)
        mask[rng.choice(members, size=count, replace=False)] = True
    return mask


def measure(
    x: dict[str, np.ndarray],
    tables: dict[str, pd.DataFrame],
    *,
    repartitions: int = 5,
    seed: int = 0,
) -> tuple[dict, list[PartitionResult]]:
    """Realism figures from pooled features ``x[split]`` (N, V) and participants ``tables[split]``
    (``age``, ``site`` columns, rows aligned). Needs train, internal_test and external_test.
    ``repartitions=0`` uses the original split only."""
    pool_x = np.concatenate([x["train"], x["internal_test"]])
    pool_age = np.concatenate([tables["train"]["age"].to_numpy(float), tables["internal_test"]["age"].to_numpy(float)])
    pool_site = np.concatenate(
        [tables["train"]["site"].astype(str).to_numpy(), tables["internal_test"]["site"].astype(str).to_numpy()]
    )
    n_train = len(tables["train"])
    ext_x, ext_age = x["external_test"], tables["external_test"]["age"].to_numpy(float)
    original = np.zeros(pool_site.size, bool)
    original[n_train:] = True
    internal_sites = pool_site[original]
    # features: voxels non-zero in some pooled subject (same set for every partition)
    used = np.flatnonzero(np.any(pool_x != 0, axis=0))
    pool_x, ext_x = pool_x[:, used], ext_x[:, used]

    masks = (
        [original]
        if repartitions == 0
        else [
            repartition(pool_site, internal_sites, np.random.default_rng([int(seed), r])) for r in range(repartitions)
        ]
    )
    results = []
    for test in masks:
        train = ~test
        site_pred = _site_probe(pool_x[train], pool_site[train], pool_x[test])
        pred_int, pred_ext, alpha = _age_baseline(pool_x[train], pool_age[train], pool_x[test], ext_x)
        results.append(
            PartitionResult(
                site_true=pool_site[test],
                site_pred=site_pred,
                abs_err_int=np.abs(pred_int - pool_age[test]),
                abs_err_ext=np.abs(pred_ext - ext_age),
                alpha=alpha,
            )
        )
    return summarise(results, seed=seed) | {
        "n_subjects": int(pool_site.size + ext_age.size),
        "n_features": int(used.size),
        "n_internal_sites": int(np.unique(internal_sites).size),
        "n_external_sites": int(tables["external_test"]["site"].nunique()),
    }, results


def summarise(results: list[PartitionResult], *, seed: int = 0) -> dict:
    """Means over re-partitions, their SD, and bootstrap 95 % intervals of the means."""
    bacc = np.array([balanced_accuracy(r.site_true, r.site_pred) for r in results])
    mae_int = np.array([r.abs_err_int.mean() for r in results])
    mae_ext = np.array([r.abs_err_ext.mean() for r in results])
    ratio = mae_ext / mae_int
    chance = float(np.mean([1.0 / np.unique(r.site_true).size for r in results]))

    rng = np.random.default_rng([int(seed), 10**6])
    boot_ratio = np.zeros(BOOTSTRAP_SAMPLES)
    boot_bacc = np.zeros(BOOTSTRAP_SAMPLES)
    for r in results:
        n_i, n_e = r.abs_err_int.size, r.abs_err_ext.size
        ii = rng.integers(0, n_i, (BOOTSTRAP_SAMPLES, n_i))
        ee = rng.integers(0, n_e, (BOOTSTRAP_SAMPLES, n_e))
        boot_ratio += r.abs_err_ext[ee].mean(axis=1) / r.abs_err_int[ii].mean(axis=1)
        boot_bacc += [balanced_accuracy(r.site_true[i], r.site_pred[i]) for i in ii]
    boot_ratio /= len(results)
    boot_bacc /= len(results)

    def ci(estimate: float, values: np.ndarray) -> list[float]:
        # basic (reverse-percentile) bootstrap interval: corrects the resampling bias of BAcc
        lo, hi = np.percentile(values, [2.5, 97.5])
        return [round(float(2 * estimate - hi), 4), round(float(2 * estimate - lo), 4)]

    return {
        "site_bacc": round(float(bacc.mean()), 4),
        "site_bacc_sd": round(float(bacc.std(ddof=1)) if bacc.size > 1 else 0.0, 4),
        "site_bacc_ci95": ci(float(bacc.mean()), boot_bacc),
        "chance": round(chance, 4),
        "bacc_over_chance": round(float(bacc.mean()) / chance, 2),
        "mae_int": round(float(mae_int.mean()), 3),
        "mae_int_sd": round(float(mae_int.std(ddof=1)) if mae_int.size > 1 else 0.0, 3),
        "mae_ext": round(float(mae_ext.mean()), 3),
        "mae_ext_sd": round(float(mae_ext.std(ddof=1)) if mae_ext.size > 1 else 0.0, 3),
        "ratio": round(float(ratio.mean()), 4),
        "ratio_sd": round(float(ratio.std(ddof=1)) if ratio.size > 1 else 0.0, 4),
        "ratio_ci95": ci(float(ratio.mean()), boot_ratio),
        "repartitions": len(results),
        "ridge_alphas": [float(r.alpha) for r in results],
    }


def measure_store(store: object, *, repartitions: int = 5, seed: int = 0) -> dict:
    """:func:`measure` on a prepared store (a :class:`~brainage_core.data.store.Store` or its path)."""
    from brainage_core.data.store import Store, open_store

    if not isinstance(store, Store):
        store = open_store(store)
    missing = [s for s in ("train", "internal_test", "external_test") if s not in store.splits]
    if missing:
        raise StoreError(
            f"{store.path}: realism needs the splits train, internal_test and external_test; missing "
            f"{', '.join(missing)}"
        )
    x = {s: pooled_features(store.array(s), store.grid) for s in ("train", "internal_test", "external_test")}
    tables = {s: store.table(s) for s in x}
    figures, _ = measure(x, tables, repartitions=repartitions, seed=seed)
    return figures | {"grid": store.grid, "feature_grid": FEATURE_GRID, "store": str(store.path)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="prepared store folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repartitions", type=int, default=5, help="re-partitions of train/internal (0 = original)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the re-partitions and the bootstrap")


def run(args: argparse.Namespace) -> int:
    from brainage_core.errors import BrainageError

    try:
        fig = measure_store(args.store, repartitions=args.repartitions, seed=args.seed)
    except BrainageError as exc:
        print(f"realism: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(fig))
        return 0
    print(
        f"store {fig['store']} (grid {fig['grid']}, {fig['n_subjects']} subjects, "
        f"{fig['n_features']} pooled {fig['feature_grid']} voxels, {fig['repartitions']} re-partitions)"
    )
    print(
        f"site BAcc   {fig['site_bacc']:.3f} ± {fig['site_bacc_sd']:.3f}  95% CI {fig['site_bacc_ci95']}  "
        f"chance {fig['chance']:.3f} ({fig['n_internal_sites']} internal sites)  "
        f"→ {fig['bacc_over_chance']:.1f}× chance"
    )
    print(
        f"ridge MAE   internal {fig['mae_int']:.2f} ± {fig['mae_int_sd']:.2f} y   "
        f"external {fig['mae_ext']:.2f} ± {fig['mae_ext_sd']:.2f} y"
    )
    print(f"ratio ext/int {fig['ratio']:.3f} ± {fig['ratio_sd']:.3f}  95% CI {fig['ratio_ci95']}")
    return 0
