"""Final multi-seed evaluation: ``python study/final.py STUDY_DIR --top-k K --seeds N``.

The numbers a paper or a challenge submission should quote. The top ``K`` configurations of a finished
study — ranked by the validation objective (``study.objective``, or ``prune_on`` for a multi-objective
study; ``--metric`` to choose another ``val_*``) at the last evaluation of each *completed* trial — are
retrained on the whole training split (``training.train_on: train``) with ``N`` seeds each
(``training.seed`` = 0..N-1), with the same budget for every configuration and method (the study's
``training.epochs``; one evaluation, at the end, on the test splits: ``evaluation.eval_every`` =
epochs). Each configuration × seed is one Ray Tune trial running the study runner's own trainable
(:func:`study.trial.run_trial`, DDP or in-trial as the study's resources say).

Output, in the study folder:

- ``results.parquet``: one row per configuration × seed appended, ``status = "final"``, ``final = True``,
  ``kind = "final"``, the source trial's ``param.*`` values, ``source_trial_id``, ``final_rank`` (1 =
  best), ``seed`` and the test metrics (``val_*`` are NaN: there is no validation split);
- ``final.parquet`` and ``final_summary.csv``: the per-seed rows (``kind = "seed"``) and one row per
  configuration (``kind = "summary"``) with ``n_seeds`` and, for every test metric, ``<metric>_mean``,
  ``<metric>_std`` and the 95 % t-interval ``<metric>_ci95_low`` / ``<metric>_ci95_high``
  (mean ± t(0.975, n-1) · std / sqrt(n), ``brainage_core.evaluation.intervals``; NaN with a single seed);
- ``final/<run>/``: Ray Tune's experiment folder of the run.

``STUDY_DIR`` may be a URI (``s3://bucket/studies/NAME``): the study's small files are read through its
local mirror (:class:`study.storage.StudyFolder`), the Tune runs and trials write to the URI, and
results.parquet, final.parquet and final_summary.csv are uploaded once written.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from brainage_core.errors import BrainageError, ConfigError, DataError
from brainage_core.evaluation.intervals import t_interval
from brainage_core.metrics import METRICS, TEST_METRICS, VALIDATION_METRICS
from study.results import read_results
from study.space import SearchSpace, load_search_space
from study.storage import StudyFolder

__all__ = ["main", "run_final", "select_top", "final_trials", "summarise", "TEST_METRICS"]



def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python study/final.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("study_dir", help="a study folder written by study/run.py")
    p.add_argument("--top-k", type=int, default=3, help="configurations to retrain (default 3)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per configuration (default 5)")
    p.add_argument("--metric", help="validation metric ranking the trials (default: the study's objective)")
    p.add_argument("--address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    return p.parse_args(argv)


def load_study_space(study_dir: Path) -> SearchSpace:
    """The study's search space as it ran: ``space.yaml`` with the overrides recorded in ``config.yaml``."""
    config_path, space_path = study_dir / "config.yaml", study_dir / "space.yaml"
    for path in (config_path, space_path, study_dir / "results.parquet"):
        if not path.exists():
            raise DataError(f"{study_dir}: {path.name} missing: expected a study folder written by study/run.py")
    overrides = (yaml.safe_load(config_path.read_text()) or {}).get("overrides") or []
    return load_search_space(space_path, overrides)


def select_top(results: pd.DataFrame, metric: str, mode: str, top_k: int, *, source: str = "results") -> pd.DataFrame:
    """The last evaluation of each completed (non-final) trial, best ``top_k`` by ``metric`` first."""
    if metric not in results.columns:
        raise DataError(f"{source}: no column {metric!r}: expected a metric the trials reported")
    rows = results[results["status"] == "completed"]
    if "final" in rows.columns:
        rows = rows[~rows["final"].fillna(False).astype(bool)]
    last = rows.sort_values("epoch").groupby("trial_id", sort=False).tail(1).dropna(subset=[metric])
    if last.empty:
        raise DataError(f"{source}: no completed trial with a finite {metric}: expected a finished study")
    return last.sort_values(metric, ascending=(mode == "min")).head(top_k).reset_index(drop=True)


def final_trials(space: SearchSpace, top: pd.DataFrame, seeds: int) -> list[dict[str, Any]]:
    """One Tune config per configuration × seed: the Optuna-named parameters of the source trial plus
    the final-run overrides (``study.trial.EXTRA_OVERRIDES``) and a ``_final`` record."""
    from study.trial import EXTRA_OVERRIDES

    epochs = space.config.training.epochs
    final_protocol = space.config.evaluation.final_protocol  # the one evaluation of a final run
    items = []
    for rank, row in enumerate(top.to_dict("records"), start=1):
        values = {k: row.get(f"param.{k}") for k in space.keys}
        sampled = space.sampled_from_values(values)
        for seed in range(seeds):
            extra = {"training.train_on": "train", "training.seed": seed, "training.epochs": epochs,
                     "evaluation.eval_every": epochs, "evaluation.test": True,
                     "evaluation.protocol": final_protocol}
            items.append({**sampled, EXTRA_OVERRIDES: extra,
                          "_final": {"rank": rank, "source_trial_id": str(row["trial_id"]), "seed": seed,
                                     "params": {k: v for k, v in values.items() if _present(v)}}})
    return items


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def summarise(per_seed: pd.DataFrame, param_keys: Sequence[str]) -> pd.DataFrame:
    """One ``kind = "summary"`` row per ``final_rank`` (see the module docstring)."""
    rows = []
    for rank, g in per_seed.groupby("final_rank", sort=True):
        ok = g[g["status"] == "final"]
        row: dict[str, Any] = {"kind": "summary", "status": "final", "final": True, "final_rank": int(rank),
                               "source_trial_id": g["source_trial_id"].iloc[0], "n_seeds": int(len(ok)),
                               "n_failed": int(len(g) - len(ok))}
        for key in param_keys:
            row[f"param.{key}"] = g[f"param.{key}"].iloc[0] if f"param.{key}" in g else None
        for m in TEST_METRICS:
            if m in ok.columns:
                iv = t_interval(ok[m].tolist())
                row.update({f"{m}_mean": iv.mean, f"{m}_std": iv.std, f"{m}_ci95_low": iv.low,
                            f"{m}_ci95_high": iv.high})
        rows.append(row)
    return pd.DataFrame(rows)


def run_final_trial(config: dict[str, Any], spec: Any) -> None:
    """The Tune trainable of a final run: the study runner's :func:`study.trial.run_trial`."""
    from study.trial import run_trial

    run_trial(config["final"], spec)


def _final_space(space: SearchSpace) -> SearchSpace:
    """The study's space with settings fit for final runs: no ASHA, checkpoints ranked by epoch (the
    validation objective is not computed without a validation split), one checkpoint kept."""
    study = dataclasses.replace(space.study, objective="epoch", mode="max", asha=None, objectives=(), modes=(),
                                checkpoints_to_keep=1)
    return dataclasses.replace(space, study=study)


def run_final(study_dir: str | Path, *, top_k: int, seeds: int, metric: str | None = None,
              address: str | None = None) -> pd.DataFrame:
    """Run the final evaluation (see the module docstring); returns the summary rows."""
    if top_k < 1 or seeds < 1:
        raise ConfigError(f"--top-k {top_k} --seeds {seeds}: expected integers >= 1")
    folder = StudyFolder(study_dir)
    if folder.is_remote:
        folder.check_writable()
    study_dir = folder.materialize()  # the local folder, or a remote one's mirror
    space = load_study_space(study_dir)
    metric, mode = _ranking(space, metric)
    results = read_results(study_dir / "results.parquet")
    top = select_top(results, metric, mode, top_k, source=str(study_dir / "results.parquet"))
    items = final_trials(space, top, seeds)

    from brainage_core.config import config_from_dict
    from brainage_core.data.sources import resolve_store
    from study.trial import TrialSpec, trial_config_dict

    store = resolve_store(space.config.data, progress=True)
    spec = TrialSpec(space=_final_space(space), study_dir=folder.location, store_path=str(store.path))
    for item in items:  # every configuration is valid before anything starts
        where = f"{study_dir} (final, trial {item['_final']['source_trial_id']})"
        config_from_dict(trial_config_dict(spec, item), where)
    print(f"[final] {len(top)} configuration(s) x {seeds} seed(s), ranked by {metric} ({mode}); "
          f"{space.config.training.epochs} epochs each on the whole training split", flush=True)

    grid = _run_grid(space, spec, items, folder, address=address)
    seed_df = pd.DataFrame(_record_results(grid, space, store, study_dir, on_write=folder.upload))
    summary = summarise(seed_df, space.keys)
    pd.concat([seed_df, summary], ignore_index=True).to_parquet(study_dir / "final.parquet", index=False)
    summary.to_csv(study_dir / "final_summary.csv", index=False)
    if folder.is_remote:
        for rel in ("final.parquet", "final_summary.csv"):  # results.parquet: published by its table
            folder.upload(rel)
    _print_summary(summary)
    print(f"[final] rows in {folder.child('results.parquet')} (status final); summary in "
          f"{folder.child('final.parquet')} and final_summary.csv", flush=True)
    return summary


def _ranking(space: SearchSpace, metric: str | None) -> tuple[str, str]:
    """``(metric, mode)`` the configurations are ranked by: ``--metric`` (a validation metric) or the
    study's objective."""
    st = space.study
    metric = metric or st.objective
    if metric not in VALIDATION_METRICS:
        raise ConfigError(f"--metric {metric}: trials are ranked on validation data only: expected one of "
                          f"{', '.join(VALIDATION_METRICS)}")
    mode = (st.mode if metric == st.objective else
            dict(zip(st.objectives, st.modes)).get(metric, METRICS[metric].direction or "min"))
    return metric, mode


def _run_grid(space: SearchSpace, spec: Any, items: list[dict[str, Any]], folder: StudyFolder, *,
              address: str | None) -> Any:
    """Train every (configuration, seed) of ``items`` as one Tune grid (``<study>/final/final-<time>/``);
    returns Tune's result grid."""
    import ray
    from ray import tune

    from study.ray_runtime import start_ray
    from study.run import _forwarded_env

    st = space.study
    res = st.resources
    info = start_ray(res, st.max_concurrent_trials, env=_forwarded_env(folder.is_remote), address=address)
    trainable = tune.with_parameters(run_final_trial, spec=spec)
    trainable = tune.with_resources(trainable, {"cpu": 1} if res.num_workers > 1 else
                                    {"cpu": res.cpus_per_worker, "gpu": 1 if res.use_gpu else 0})
    run_name = f"final-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        tuner = tune.Tuner(
            trainable,
            param_space={"final": tune.grid_search(items)},
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=st.max_concurrent_trials),
            run_config=tune.RunConfig(name=run_name, storage_path=folder.child("final"), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=min(1, st.max_failures)),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
        return tuner.fit()
    finally:
        if info.started_here:
            ray.shutdown()


def _record_results(grid: Any, space: SearchSpace, store: Any, study_dir: Path,
                    on_write: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Append one ``results.parquet`` row (status ``final``, or ``error``) per final run and return them
    as the per-seed rows of ``final.parquet``; a failed run is said on stderr. ``on_write``: the table's
    publisher (``StudyFolder.upload``: the table and its journal reach an object store as they are written)."""
    from study.results import ResultsTable, git_commit, package_versions

    table = ResultsTable(study_dir / "results.parquet", param_keys=space.keys, resume=True,
                         static={"store_fingerprint": store.fingerprint, "git_commit": git_commit(),
                                 "versions": package_versions()}, on_write=on_write)
    per_seed = []
    for result in grid:
        final = result.config["final"]["_final"]
        metrics = {k: v for k, v in (result.metrics or {}).items()
                   if not isinstance(v, dict | list) and k not in ("config", "done", "should_checkpoint")}
        trial_id = str(metrics.get("trial_id") or Path(result.path).name)
        ok = result.error is None and "epoch" in metrics
        metrics.setdefault("epoch", 0)
        extra = {"final": True, "kind": "final", "source_trial_id": final["source_trial_id"],
                 "final_rank": final["rank"]}
        keep = {k: v for k, v in metrics.items() if k.startswith(("test_", "val_", "train_")) or k in (
            "epoch", "leaked", "wall_s", "compute_s", "node_id", "checkpoint_path")}
        row = table.add(trial_id, final["params"], {**keep, **extra}, seed=final["seed"],
                        status="final" if ok else "error")
        per_seed.append({**row, "kind": "seed"})
        if not ok:
            print(f"[final] trial {trial_id} (rank {final['rank']}, seed {final['seed']}) failed: "
                  f"{str(result.error).splitlines()[0] if result.error else 'no evaluation reported'}",
                  file=sys.stderr, flush=True)
    table.flush()
    return per_seed


def _print_summary(summary: pd.DataFrame) -> None:
    for row in summary.to_dict("records"):
        parts = []
        for m in ("test_mae_int", "test_mae_ext", "test_bacc", "test_lc"):
            if f"{m}_mean" in row:
                parts.append(f"{m} {row[f'{m}_mean']:.3f} [{row[f'{m}_ci95_low']:.3f}, {row[f'{m}_ci95_high']:.3f}]")
        print(f"[final] #{row['final_rank']} (trial {row['source_trial_id']}, {row['n_seeds']} seeds): "
              + "; ".join(parts), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        run_final(args.study_dir, top_k=args.top_k, seeds=args.seeds, metric=args.metric, address=args.address)
    except BrainageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
