"""Benchmark: the ``exact`` vs the ``fast`` probe protocol (docs/probes.md) — time and agreement.

Synthetic features with age and site structure (:func:`make_features`): 64 sites, of which 6 are
held out as an external test part; ``n`` training subjects over the other 58 (at least 5 each, sizes
log-normal), an internal test part of 362 subjects from the training sites and an external one of 395
from the 6 held-out sites (the sizes of OpenBHB's public test splits). Each row: site centre + a
non-linear function of age along a few directions + noise, L2-normalised (a contrastive projection), then
scaled to norm ``--scale`` (default 1). ``--collinear D`` then mixes the features by a random matrix whose
column scales fall over D decades, times 20, plus a random common offset: an encoder's unnormalised, nearly
collinear outputs (D = 4: feature-covariance eigenvalues spanning ~14 decades), the ill-conditioned case.

For each ``n`` x ``p`` asked for (``--sizes``), on the CPU (and on CUDA when available, fast only):

- ``exact``: ``fit_age_probe`` / ``fit_site_probe`` with ``protocol="exact"`` (scikit-learn, saga with
  150 iterations); ``fast``: ``protocol="fast"``. Wall seconds of each fit (fast timed after one
  warm-up call on a tiny problem, so that import and first-call costs are not counted).
- agreement: chosen alpha and C, max relative difference of the age predictions, MAE on the internal
  and external parts, site BAcc on the internal part, cross-validated BAcc, and their differences.
- ``--reference SIZE``: on those sizes, the site probe also with scikit-learn's ``lbfgs`` run to
  convergence (``max_iter`` 20,000, ``tol`` 1e-8) under the same grid search: the converged optimum of
  the same objective. Reports each protocol's distance to it (max |coefficient difference| of the refit
  and |ΔBAcc|).

Every fit records wall seconds, CPU seconds of the process (``time.process_time``: with one thread,
about what the fit takes on an idle core, which a shared machine's wall time is not) and the load
average before and after. Separate invocations (e.g. one size each, run side by side) are merged with
``--merge A.json B.json --out OUT.json``. Writes JSON (default ``docs/measurements/probes.json``).
Run: ``python bench/probes.py --threads 1`` (the exact protocol at 3,227 x 128 takes ~100 s on an idle core).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainage_core.evaluation import SITE_CS, balanced_accuracy, fit_age_probe, fit_site_probe, mae

N_SITES = 64
N_EXTERNAL_SITES = 6
N_INTERNAL = 362
N_EXTERNAL = 395


def make_features(n: int, p: int, *, site_strength: float = 0.6, scale: float = 1.0, collinear: float = 0.0,
                  seed: int = 0) -> dict[str, Any]:
    """Features (float32) and labels of the train / internal / external parts (see the module docstring)."""
    rng = np.random.default_rng(seed)
    train_sites = N_SITES - N_EXTERNAL_SITES
    weights = rng.lognormal(0.0, 0.8, train_sites)
    sizes = rng.multinomial(n + N_INTERNAL - 5 * train_sites, weights / weights.sum()) + 5
    site = rng.permutation(np.repeat(np.arange(train_sites), sizes))
    ext_site = rng.integers(train_sites, N_SITES, N_EXTERNAL)
    sites = np.concatenate([site, ext_site])
    site_age = rng.uniform(10, 70, N_SITES)
    ages = np.clip(site_age[sites] + rng.normal(0, 10, sites.size), 6, 88)
    centres = rng.normal(size=(N_SITES, p)) / np.sqrt(p)
    directions = rng.normal(size=(3, p)) / np.sqrt(p)
    z = (ages - 45) / 20
    X = (
        rng.normal(size=(sites.size, p)) / np.sqrt(p)
        + site_strength * centres[sites]
        + np.stack([np.tanh(z), z**2 / 4, np.sin(z)], axis=1) @ directions * 3.0
    )
    X *= scale / np.linalg.norm(X, axis=1, keepdims=True)
    if collinear:
        mix = np.random.default_rng(seed + 1).normal(size=(p, p)) * np.logspace(0, -collinear, p)[None, :]
        X = X @ mix.T * 20.0 + 5.0 * np.random.default_rng(seed + 2).normal(size=p)
    X = X.astype(np.float32)
    # the internal test part: N_INTERNAL subjects of the training sites, each site keeping >= 5 in training
    order = rng.permutation(site.size)
    kept = np.bincount(site, minlength=train_sites)
    internal = []
    for i in order:
        if len(internal) == N_INTERNAL:
            break
        if kept[site[i]] > 5:
            internal.append(i)
            kept[site[i]] -= 1
    internal = np.sort(np.asarray(internal))
    train = np.setdiff1d(np.arange(site.size), internal)
    external = np.arange(site.size, sites.size)
    return {"X": X, "ages": ages, "sites": sites, "train": train, "internal": internal, "external": external}


def load_average() -> float:
    return os.getloadavg()[0]


def timed(fn, *args, **kwargs) -> tuple[Any, float, float, list[float]]:
    """``fn``'s result, wall seconds, CPU seconds of this process and the load average before/after."""
    before = load_average()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, time.process_time() - cpu, [before, load_average()]


def run_protocol(data: dict[str, Any], protocol: str, device: str | None) -> dict[str, Any]:
    X, ages, sites = data["X"], data["ages"], data["sites"]
    tr, vi, ve = data["train"], data["internal"], data["external"]
    Xtr = torch.as_tensor(X[tr], device=device) if device else X[tr]
    age, t_age, cpu_age, load_age = timed(fit_age_probe, Xtr, ages[tr], protocol=protocol)
    site, t_site, cpu_site, load_site = timed(fit_site_probe, Xtr, sites[tr], protocol=protocol)
    pred_int, pred_ext = age.predict(X[vi]), age.predict(X[ve])
    return {
        "age_s": t_age,
        "site_s": t_site,
        "total_s": t_age + t_site,
        "age_cpu_s": cpu_age,
        "site_cpu_s": cpu_site,
        "total_cpu_s": cpu_age + cpu_site,
        "load_average": {"age": load_age, "site": load_site},
        "alpha": age.param["alpha"],
        "age_cv_r2": age.cv_score,
        "C": site.param["C"],
        "site_cv_bacc": site.cv_score,
        "mae_int": mae(ages[vi], pred_int),
        "mae_ext": mae(ages[ve], pred_ext),
        "bacc": balanced_accuracy(sites[vi], site.predict(X[vi])),
        "notes": [n for n in (age.note, site.note) if n],
        "_age_pred": np.concatenate([pred_int, pred_ext]),
        "_site": site,
    }


def ridge_float64_diff(data: dict[str, Any], fast_pred: np.ndarray) -> float:
    """Max relative difference of the fast age predictions to ``GridSearchCV(Ridge())`` on float64 features
    (the exact protocol itself works in float32, as the kit does)."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, KFold

    from brainage_core.evaluation import AGE_ALPHAS

    X, ages, tr = data["X"].astype(np.float64), data["ages"], data["train"]
    search = GridSearchCV(Ridge(), {"alpha": list(AGE_ALPHAS)}, cv=KFold(5), scoring="r2").fit(X[tr], ages[tr])
    want = search.predict(X[np.concatenate([data["internal"], data["external"]])])
    return float(np.max(np.abs(fast_pred - want) / np.maximum(np.abs(want), 1e-12)))


def converged_reference(data: dict[str, Any], fast_site: Any, exact_site: Any) -> dict[str, Any]:
    """scikit-learn lbfgs to convergence on the same grid search; distances of both protocols to it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    X, sites, tr, vi = data["X"], data["sites"], data["train"], data["internal"]
    clf = LogisticRegression(solver="lbfgs", max_iter=20_000, tol=1e-8)
    start = time.perf_counter()
    search = GridSearchCV(clf, {"C": list(SITE_CS)}, cv=StratifiedKFold(5), scoring="balanced_accuracy")
    search.fit(X[tr].astype(np.float64), sites[tr])
    seconds = time.perf_counter() - start
    ref = search.best_estimator_
    bacc = balanced_accuracy(sites[vi], ref.predict(X[vi]))
    out = {"seconds": seconds, "C": float(search.best_params_["C"]), "site_cv_bacc": float(search.best_score_),
           "bacc": bacc, "cv_bacc_per_C": search.cv_results_["mean_test_score"].tolist()}
    for name, probe in (("fast", fast_site), ("exact", exact_site)):
        est = probe.estimator
        entry = {"C": probe.param["C"], "bacc_diff": abs(balanced_accuracy(sites[vi], probe.predict(X[vi])) - bacc)}
        if probe.param["C"] == out["C"]:
            entry["max_coef_diff"] = float(np.max(np.abs(np.asarray(est.coef_) - ref.coef_)))
            entry["max_coef_ref"] = float(np.max(np.abs(ref.coef_)))
        out[name] = entry
    return out


def machine_info(threads: int) -> dict[str, Any]:
    import sklearn

    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                            cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000x128,3227x128,1000x512,3227x512",
                        help="comma-separated n x p training sizes (default: %(default)s)")
    parser.add_argument("--exact", default=None,
                        help="sizes on which to run the exact protocol too (default: every size)")
    parser.add_argument("--reference", default="1000x128", help="sizes with the converged lbfgs reference ('' none)")
    parser.add_argument("--site-strength", type=float, nargs="+", default=[0.6],
                        help="site-structure strengths of the feature sets (default 0.6)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="norm of every feature row (default 1, unit rows); large values (e.g. 50) with a "
                             "strong site structure give the nearly separable, weakly regularised fits of an "
                             "unnormalised encoder's features, the hard case of the logistic solver")
    parser.add_argument("--collinear", type=float, default=0.0,
                        help="decades over which the features' mixing scales fall, with an offset (default 0: "
                             "none); 4 gives the ill-conditioned features of an unnormalised encoder")
    parser.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path("docs/measurements/probes.json"))
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="merge the runs of these JSON files (written by separate invocations) into --out")
    args = parser.parse_args(argv)
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        merged = {"machine": parts[0]["machine"], "commands": [p["command"] for p in parts],
                  "wall_s": [p.get("wall_s") for p in parts], "runs": [r for p in parts for r in p["runs"]]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(merged, indent=2))
        print(f"wrote {args.out} ({len(merged['runs'])} runs)")
        return 0
    torch.set_num_threads(args.threads)
    sizes = [s for s in args.sizes.split(",") if s]
    exact_sizes = set(sizes if args.exact is None else [s for s in args.exact.split(",") if s])
    reference_sizes = {s for s in args.reference.split(",") if s}
    for s in sizes:
        try:
            n, p = (int(v) for v in s.lower().split("x"))
        except ValueError:
            print(f"bench/probes.py: --sizes entry {s!r}: expected N x P such as 3227x128", file=sys.stderr)
            return 2
    # warm-up: imports and first calls
    warm = make_features(300, 8)
    for protocol in ("exact", "fast"):
        fit_age_probe(warm["X"][:60], warm["ages"][:60], protocol=protocol)
    fit_site_probe(warm["X"][:60], warm["sites"][:60] % 3, protocol="fast")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report: dict[str, Any] = {"machine": machine_info(args.threads), "command": " ".join(sys.argv), "runs": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for strength in args.site_strength:
        for s in sizes:
            n, p = (int(v) for v in s.lower().split("x"))
            data = make_features(n, p, site_strength=strength, scale=args.scale, collinear=args.collinear)
            n_train_sites = int(np.unique(data["sites"][data["train"]]).size)
            entry: dict[str, Any] = {"n": int(data["train"].size), "p": p, "sites": n_train_sites,
                                     "site_strength": strength, "scale": args.scale, "collinear": args.collinear}
            results = {}
            for device in devices:
                results[f"fast_{device}"] = run_protocol(data, "fast", device if device != "cpu" else None)
            if s in exact_sizes:
                results["exact"] = run_protocol(data, "exact", None)
                fast, exact = results["fast_cpu"], results["exact"]
                denom = np.maximum(np.abs(exact["_age_pred"]), 1e-12)
                entry["agreement"] = {
                    "age_pred_max_rel_diff": float(np.max(np.abs(fast["_age_pred"] - exact["_age_pred"]) / denom)),
                    "age_pred_max_rel_diff_vs_float64_sklearn": ridge_float64_diff(data, fast["_age_pred"]),
                    "same_alpha": fast["alpha"] == exact["alpha"],
                    "abs_diff_mae_int": abs(fast["mae_int"] - exact["mae_int"]),
                    "abs_diff_mae_ext": abs(fast["mae_ext"] - exact["mae_ext"]),
                    "same_C": fast["C"] == exact["C"],
                    "abs_diff_bacc": abs(fast["bacc"] - exact["bacc"]),
                    "abs_diff_site_cv_bacc": abs(fast["site_cv_bacc"] - exact["site_cv_bacc"]),
                    "speedup_total": exact["total_s"] / fast["total_s"],
                    "speedup_site": exact["site_s"] / fast["site_s"],
                    "speedup_age": exact["age_s"] / fast["age_s"],
                    "speedup_cpu_total": exact["total_cpu_s"] / fast["total_cpu_s"],
                    "speedup_cpu_site": exact["site_cpu_s"] / fast["site_cpu_s"],
                    "speedup_cpu_age": exact["age_cpu_s"] / fast["age_cpu_s"],
                }
                if s in reference_sizes:
                    entry["converged_reference"] = converged_reference(data, fast["_site"], exact["_site"])
            entry["results"] = {k: {a: b for a, b in v.items() if not a.startswith("_")} for k, v in results.items()}
            report["runs"].append(entry)
            report["wall_s"] = time.perf_counter() - t0
            args.out.write_text(json.dumps(report, indent=2, default=float))
            print(json.dumps({k: v for k, v in entry.items() if k != "results"}, default=float), flush=True)
            for k, v in entry["results"].items():
                print(f"  {k}: age {v['age_s']:.2f} s ({v['age_cpu_s']:.2f} CPU s), site {v['site_s']:.2f} s "
                      f"({v['site_cpu_s']:.2f} CPU s), alpha {v['alpha']}, C {v['C']}, "
                      f"bacc {v['bacc']:.4f}, mae_int {v['mae_int']:.4f}, mae_ext {v['mae_ext']:.4f}", flush=True)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
