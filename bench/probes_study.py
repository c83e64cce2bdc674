"""Benchmark, part (b) of the probes benchmark (docs/probes.md): ``exact`` vs ``fast`` on the features of
real checkpoints.

For every trial of a finished study (``study/run.py``; at least 10 trials for the rank correlation), the
checkpoint of its last evaluation is loaded (``brainage_core.training.load_model_from_checkpoint``: its
config and weights), and the trial's own evaluator (``brainage_core.evaluation.Evaluator``, built from that config:
the same store, validation split and seed as in training) evaluates the model twice on the CPU, once with
``protocol="exact"`` (scikit-learn, the challenge kit's probes) and once with ``protocol="fast"``.

Reports, per trial, both protocols' ``val_*`` and ``test_*`` metrics and the wall / CPU seconds of each
evaluation (feature extraction included, so the difference is the probes'); across trials, the largest
|Δ MAE| per split (``val_mae_int``, ``val_mae_ext``, ``test_mae_int``, ``test_mae_ext``), the largest
|Δ BAcc| (``val_bacc``, ``test_bacc``) and the Spearman rank correlation of ``val_lc`` (and of
``val_mae_ext``, the search objective) between the protocols. Writes JSON with the machine and command.

``--converged``: also, per trial, the site probe alone on its training features (captured from the fast
evaluation): each protocol's fit time, chosen C and CV BAcc, and scikit-learn's ``lbfgs`` run to convergence
(``max_iter`` 20,000, ``tol`` 1e-8) under the same grid search, with each protocol's max |coefficient
difference| to it (where it chose the same C), plus the features' row norm and the spread of their
covariance eigenvalues (decades): which protocol finds the optimum on an encoder's real features.

Run: ``python bench/probes_study.py STUDY_DIR --out docs/measurements/probes_study.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("val_mae_int", "val_mae_ext", "val_bacc", "val_lc", "test_mae_int", "test_mae_ext", "test_bacc",
            "test_lc")


def last_checkpoints(study_dir: Path) -> list[dict[str, Any]]:
    """One entry per trial: its last evaluation's row with a checkpoint (``trial_id``, ``epoch``, path)."""
    from study.results import read_results

    df = read_results(study_dir / "results.parquet")
    df = df[df["checkpoint_path"].notna()].sort_values(["trial_id", "epoch"])
    last = df.groupby("trial_id").tail(1)
    return [{"trial_id": r.trial_id, "epoch": int(r.epoch), "checkpoint": str(r.checkpoint_path)}
            for r in last.itertuples()]


def evaluate_both(checkpoint: str) -> dict[str, Any]:
    """The checkpoint's model evaluated with each protocol by the trial's own evaluator."""
    from brainage_core.config import config_from_dict
    from brainage_core.data.sources import resolve_store
    from brainage_core.evaluation import Evaluator
    from brainage_core.evaluation.probes import load_estimators
    from brainage_core.training import load_model_from_checkpoint

    model, config = load_model_from_checkpoint(checkpoint)
    cfg = config_from_dict(config, source=f"{checkpoint} (config)", expand_env=False)
    store = resolve_store(cfg.data, progress=False)
    evaluator = Evaluator(store, cfg.evaluation, train_on=cfg.training.train_on, seed=cfg.training.seed)
    load_estimators()
    out: dict[str, Any] = {}
    for protocol in ("exact", "fast"):
        wall, cpu = time.perf_counter(), time.process_time()
        metrics = evaluator.evaluate(model, "cpu", protocol=protocol)
        out[protocol] = {"metrics": {k: float(metrics[k]) for k in COMPARED if k in metrics},
                         "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    return out


@contextlib.contextmanager
def site_probe_features() -> Iterator[dict[str, np.ndarray]]:
    """Within it, the evaluator's site-probe fits record their training features and sites (the last fit's)."""
    import brainage_core.evaluation.evaluator as evaluator_module
    from brainage_core.evaluation import fit_site_probe

    captured: dict[str, np.ndarray] = {}

    def capture(X: Any, sites: Any, **kwargs: Any) -> Any:
        captured["X"] = np.asarray(X.cpu() if isinstance(X, torch.Tensor) else X, dtype=np.float64)
        captured["sites"] = np.asarray(sites)
        return fit_site_probe(X, sites, **kwargs)

    evaluator_module.fit_site_probe = capture
    try:
        yield captured
    finally:
        evaluator_module.fit_site_probe = fit_site_probe


def converged_site_probe(X: np.ndarray, sites: np.ndarray) -> dict[str, Any]:
    """The site probe on training features ``X`` (n, p): exact, fast and scikit-learn converged."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from brainage_core.evaluation import SITE_CS, fit_site_probe

    eig = np.linalg.eigvalsh(np.cov(X.T))
    out: dict[str, Any] = {"rows": X.shape[0], "features": X.shape[1], "sites": int(np.unique(sites).size),
                           "mean_row_norm": float(np.linalg.norm(X, axis=1).mean()),
                           "covariance_eigenvalue_decades": float(np.log10(eig.max() / max(eig.min(), 1e-300)))}
    coefs = {}
    for protocol in ("exact", "fast"):
        cpu = time.process_time()
        probe = fit_site_probe(X, sites, protocol=protocol)
        out[protocol] = {"cpu_s": time.process_time() - cpu, "C": probe.param["C"], "cv_bacc": probe.cv_score}
        coefs[protocol] = probe.estimator.coef_
    cpu = time.process_time()
    search = GridSearchCV(LogisticRegression(solver="lbfgs", max_iter=20_000, tol=1e-8), {"C": list(SITE_CS)},
                          cv=StratifiedKFold(5), scoring="balanced_accuracy").fit(X, sites)
    ref = search.best_estimator_.coef_
    out["converged"] = {"cpu_s": time.process_time() - cpu, "C": search.best_params_["C"],
                        "cv_bacc": search.best_score_, "cv_bacc_per_C": search.cv_results_["mean_test_score"].tolist(),
                        "max_abs_coef": float(np.abs(ref).max())}
    for protocol in ("exact", "fast"):
        same = out[protocol]["C"] == out["converged"]["C"] and coefs[protocol].shape == ref.shape
        out[protocol]["max_coef_diff"] = float(np.abs(coefs[protocol] - ref).max()) if same else None
    return out


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir", type=Path, help="a finished study folder (results.parquet, checkpoints)")
    parser.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (default 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "measurements" / "probes_study.json")
    parser.add_argument("--converged", action="store_true",
                        help="also fit the site probe alone, and scikit-learn's converged lbfgs, per trial")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    trials = last_checkpoints(args.study_dir)
    if len(trials) < 2:
        raise SystemExit(f"{args.study_dir}: {len(trials)} trial(s) with a checkpoint; expected at least 2 "
                         "(10 for the rank correlation the issue asks for)")
    started = time.perf_counter()
    for i, trial in enumerate(trials, 1):
        with site_probe_features() if args.converged else contextlib.nullcontext({}) as features:
            trial.update(evaluate_both(trial["checkpoint"]))  # features: its fast evaluation's, with --converged
        print(f"[probes-study] {i}/{len(trials)} trial {trial['trial_id']}: exact {trial['exact']['cpu_s']:.1f} "
              f"CPU s, fast {trial['fast']['cpu_s']:.1f} CPU s", flush=True)
        if args.converged:
            c = trial["site_probe"] = converged_site_probe(features["X"], features["sites"])
            print(f"[probes-study]   site probe: exact C {c['exact']['C']:g} CV BAcc {c['exact']['cv_bacc']:.4f} "
                  f"({c['exact']['cpu_s']:.1f} s), fast C {c['fast']['C']:g} {c['fast']['cv_bacc']:.4f} "
                  f"({c['fast']['cpu_s']:.1f} s), converged C {c['converged']['C']:g} {c['converged']['cv_bacc']:.4f} "
                  f"({c['converged']['cpu_s']:.1f} s)", flush=True)
    summary: dict[str, Any] = {}
    for key in COMPARED:
        pairs = [(t["exact"]["metrics"].get(key), t["fast"]["metrics"].get(key)) for t in trials]
        pairs = [(e, f) for e, f in pairs if e is not None and f is not None and np.isfinite(e) and np.isfinite(f)]
        if not pairs:
            continue
        diffs = [abs(e - f) for e, f in pairs]
        summary[key] = {"n": len(pairs), "max_abs_diff": max(diffs), "mean_abs_diff": float(np.mean(diffs)),
                        "spearman": spearman([e for e, _ in pairs], [f for _, f in pairs]) if len(pairs) > 2
                        else None}
    cpu = {p: float(np.sum([t[p]["cpu_s"] for t in trials])) for p in ("exact", "fast")}
    report = {
        "command": " ".join(["python", "bench/probes_study.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": args.threads,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_avg_1min_before": os.getloadavg()[0]},
        "study": args.study_dir.name, "trials": len(trials), "wall_s": time.perf_counter() - started,
        "evaluation_cpu_s_total": cpu, "summary": summary,
        "per_trial": [{k: v for k, v in t.items() if k != "checkpoint"} for t in trials],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for key, s in summary.items():
        rho = "-" if s["spearman"] is None else f"{s['spearman']:.3f}"
        print(f"[probes-study] {key}: max |exact - fast| {s['max_abs_diff']:.4g}, Spearman {rho} (n={s['n']})")
    print(f"[probes-study] -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
