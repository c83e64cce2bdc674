"""``python study/export.py STUDY_DIR --out ramp-submission/NAME [--rank 1] [--metric val_lc] [--top-k K]``.

Exports a study's best checkpoint(s) as RAMP challenge submissions (``brainage_core.export.ramp``):
``estimator.py`` (self-contained, sanitizer-clean), ``weights.pth`` and ``metadata.pkl``.

``STUDY_DIR`` may be a URI (``s3://bucket/studies/NAME``): its results are read through the study's local
mirror (``study.storage.StudyFolder.materialize``) and the chosen checkpoint is downloaded into the cache.

Ranking: trials are ranked by their best evaluation on a *validation* metric (lower is better; test
metrics are refused) among the evaluations whose checkpoint is still stored (Ray keeps
``checkpoints_to_keep`` per trial, by the study objective). ``--top-k K`` writes ranks 1..K as
``NAME-rank1`` … ``NAME-rankK`` beside each other.

Nothing is exported under a false rank: when a trial that is better on the metric than the one to
export has no stored checkpoint at all (deleted, or never written), the export is refused naming that
trial; ``--fallback`` exports the best stored ones instead, with a warning naming each trial skipped.
An existing, non-empty ``--out`` is refused unless ``--force`` (its files are then overwritten).

``metadata.pkl`` (a plain dict, ``pandas.read_pickle``): ``config`` (the checkpoint's), ``metrics`` (the
exported evaluation's row of ``results.parquet``), ``study``, ``trial_id``, ``epoch``, ``rank``, ``metric``,
``checkpoint``, ``store`` and ``store_fingerprint``, ``age_probe`` (a fitted scikit-learn Ridge: features ->
age in years, fitted on the store's train split minus the validation parts — the rows the ``val_*``
probes were fitted on; with ``evaluation.final_protocol: fast`` the equal
``brainage_core.evaluation.fast_probes.LinearRegressor``), ``age_probe_protocol``, ``age_probe_alpha``,
``bias_correction`` (``slope``, ``intercept`` of
predicted = slope · age + intercept fitted on the validation parts; corrected gap = predicted −
(slope · age + intercept)), ``model_spec`` and ``versions``.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainage_core.errors import BrainageError, ConfigError, DataError
from study.results import read_results
from study.storage import StudyFolder, fetch_tree, is_uri, join_location, location_exists

RESULTS_FILE = "results.parquet"
#: Trial statuses whose evaluations may be exported (study/results.py writes running/completed/pruned/error).
EXPORTABLE_STATUSES = ("completed", "pruned", "terminated", "final")


def _checkpoint_dir(study: StudyFolder, value: Any) -> str | None:
    """The checkpoint folder of a results row as a local path or a URI. Relative paths are relative to
    the study folder; on a remote study, a bucket path without scheme (Ray's ``Checkpoint.path``) gets the
    study's scheme."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value):
        return None
    text = str(value)
    if is_uri(text):
        return text
    text = text[len("file://"):] if text.startswith("file://") else text
    if study.is_remote:
        bucket = study.path.split("/", 1)[0]
        return study.uri_of(text) if text.lstrip("/").startswith(f"{bucket}/") else study.child(text)
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else study.local / path)


def _local_checkpoint(location: str) -> Path:
    """A local folder holding the checkpoint at ``location``: itself, or a download of a URI into the cache
    (``$BRAINAGE_CACHE/checkpoints/<sha1 of the URI>``)."""
    if not is_uri(location):
        return Path(location)
    import hashlib

    from brainage_core.data.sources import cache_dir_of

    digest = hashlib.sha1(location.encode()).hexdigest()[:16]
    return fetch_tree(location, cache_dir_of() / "checkpoints" / digest)


def study_results(study_dir: str | Path) -> pd.DataFrame:
    """The results of the study in ``study_dir`` (``study.results.read_results``; a URI: read from the
    study's local mirror, downloaded first); ``DataError`` naming the folder or file when one is missing."""
    if is_uri(study_dir):
        study_dir = StudyFolder(study_dir).materialize()
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise DataError(f"study folder {study_dir} does not exist; expected a folder written by study/run.py")
    return read_results(study_dir / RESULTS_FILE)


def rank_checkpoints(study_dir: str | Path, metric: str = "val_lc") -> pd.DataFrame:
    """Exportable evaluations ranked best first: per finished trial, the stored checkpoint with the lowest
    ``metric``. Adds ``rank`` (1-based) and ``checkpoint`` (absolute folder, or a URI for a study on an
    object store; ``study_dir`` may be a URI). ``ranked.attrs["unstored"]``: the finished trials left out
    because none of their checkpoints is stored, as ``{trial_id: (best metric value, its epoch, path)}``
    (:func:`skipped_better_trials` tells which of them would rank ahead of an exported row).

    Errors: ``ConfigError`` for a ``test_*`` or unknown metric; ``DataError`` when no trial has finished or
    when no finished evaluation has a stored checkpoint (names the first missing path).
    """
    study = StudyFolder(study_dir)
    study_dir = study.location
    df = study_results(study.materialize())
    metrics = [c for c in df.columns if c.startswith("val_") and pd.api.types.is_numeric_dtype(df[c])]
    if metric.startswith("test_"):
        raise ConfigError(
            f"--metric {metric!r} selects on test data; expected a validation metric ({', '.join(metrics)}): "
            "test metrics are reported, never used for selection"
        )
    if metric not in metrics:
        raise ConfigError(f"unknown metric {metric!r}; expected one of {', '.join(metrics) or '(none in the table)'}")
    status = df["status"].astype(str).str.lower() if "status" in df.columns else pd.Series("completed", index=df.index)
    done = df[status.isin(EXPORTABLE_STATUSES) & df[metric].notna()].copy()
    if done.empty:
        found = ", ".join(sorted(status.unique())) or "no rows"
        raise DataError(
            f"{study.child(RESULTS_FILE)}: no finished trial with a {metric} value (statuses found: {found}); "
            f"expected at least one trial with status {' or '.join(EXPORTABLE_STATUSES[:2])}"
        )
    paths = [_checkpoint_dir(study, v) for v in done.get("checkpoint_path", pd.Series(None, index=done.index))]
    done["checkpoint"] = paths
    stored = done[[p is not None and location_exists(join_location(p, "checkpoint.pt")) for p in paths]]
    if stored.empty:
        missing = next((p for p in paths if p is not None), None)
        what = "no checkpoint_path" if missing is None else f"{missing} has no checkpoint.pt"
        raise DataError(
            f"{study_dir}: no checkpoint stored for any finished trial (e.g. trial {done['trial_id'].iloc[0]} "
            f"epoch {done['epoch'].iloc[0]}: {what}); expected the checkpoint folders named in results.parquet"
        )
    for trial, rows in done.groupby("trial_id"):
        best_all = rows.loc[rows[metric].idxmin()]
        if best_all.name not in stored.index and trial in set(stored["trial_id"]):
            warnings.warn(
                f"trial {trial}: its best {metric} (epoch {best_all['epoch']}) has no stored checkpoint; "
                "the best stored one is ranked instead", stacklevel=2,
            )
    ranked = stored.sort_values([metric, "epoch"], ascending=[True, False]).groupby("trial_id", sort=False).head(1)
    ranked = ranked.reset_index(drop=True)
    ranked.insert(0, "rank", range(1, len(ranked) + 1))
    unstored = {}
    for trial, rows in done[~done["trial_id"].isin(set(stored["trial_id"]))].groupby("trial_id"):
        best = rows.loc[rows[metric].idxmin()]
        unstored[str(trial)] = (float(best[metric]), int(best["epoch"]), best["checkpoint"])
    ranked.attrs["unstored"] = unstored
    return ranked


def skipped_better_trials(ranked: pd.DataFrame, row: pd.Series, metric: str) -> list[str]:
    """One description per finished trial without a stored checkpoint whose best ``metric`` beats ``row``'s
    (so that exporting ``row`` at its rank would silently skip it)."""
    return [f"trial {trial} ({metric} {value:.4g} at epoch {epoch}; checkpoint {path or 'never recorded'} missing)"
            for trial, (value, epoch, path) in sorted(ranked.attrs.get("unstored", {}).items(), key=lambda t: t[1][0])
            if value < float(row[metric])]


def check_out(out: str | Path, force: bool) -> None:
    """ConfigError unless ``out`` is absent or empty, or ``force`` allows overwriting it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; expected a submission folder (absent or empty)")
    if not force and out.is_dir() and any(out.iterdir()):
        names = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise ConfigError(f"--out {out}: already holds {names}; expected an absent or empty folder, or --force "
                          "to overwrite it")


def _open_study_store(config: dict, store: str | Path | None):
    from brainage_core.data.store import open_store

    path = store or (config.get("data") or {}).get("store")
    if path is None:
        from brainage_core.data.sources import resolve_store

        return resolve_store(config.get("data") or {})
    return open_store(path)


def _fit_probe_and_bias(model, store, config: dict, *, device: str, batch_size: int) -> dict[str, Any]:
    """Age probe on the train split minus the validation parts; bias correction on the validation parts.

    ``model`` must see the inputs the network was trained on: pass it behind
    ``brainage_core.export.ramp.centered_view`` (the trial's z-scoring / centred crop), as the evaluator does.
    """
    from brainage_core.evaluation import extract_features, fit_age_probe, fit_bias_correction, validation_split_of

    ecfg = config.get("evaluation") or {}
    table = store.table("train")
    split = validation_split_of(table, ecfg)
    ages = table.set_index("row")["age"]
    array = store.array("train")
    train_rows = split.train_rows
    val_rows = np.sort(np.concatenate([split.val_internal_rows, split.val_external_rows]))
    x_train = extract_features(model, array, train_rows, batch_size=batch_size, device=device)
    protocol = str(ecfg.get("final_protocol", "exact"))
    probe = fit_age_probe(x_train, ages.loc[train_rows].to_numpy(), protocol=protocol,
                          device=device if protocol == "fast" else None)
    out: dict[str, Any] = {
        "age_probe": probe.estimator,
        "age_probe_protocol": protocol,
        "age_probe_alpha": probe.param.get("alpha"),
        "age_probe_cv_r2": probe.cv_score,
        "age_probe_rows": int(train_rows.size),
    }
    if val_rows.size >= 2:
        x_val = extract_features(model, array, val_rows, batch_size=batch_size, device=device)
        predicted = probe.predict(x_val)
        true = ages.loc[val_rows].to_numpy(dtype=float)
        out["bias_correction"] = {
            **fit_bias_correction(true, predicted),
            "fitted_on": "validation parts of the train split (internal + external)",
            "network_trained_on_them": (config.get("training") or {}).get("train_on", "train_minus_val")
            != "train_minus_val",
        }
    else:
        out["bias_correction"] = None
    return out


def export_submission(
    study_dir: str | Path,
    out: str | Path,
    *,
    rank: int = 1,
    metric: str = "val_lc",
    store: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    ranked: pd.DataFrame | None = None,
    fallback: bool = False,
    force: bool = False,
) -> Path:
    """Export the trial at ``rank`` (by ``metric``) of ``study_dir`` into the submission folder ``out``.

    ``store``: the prepared store the study trained on (default: the checkpoint config's ``data.store``).
    ``study_dir`` may be a URI: the checkpoint is downloaded into the cache.
    ``fallback``: export even when a better trial has no stored checkpoint (a warning names it; else a
    DataError). ``force``: overwrite a non-empty ``out`` (else a ConfigError, before anything is read).
    Errors: see :func:`rank_checkpoints`; ``ConfigError`` for a rank beyond the ranked trials or a non-VBM
    model; checkpoint errors from ``brainage_core.training``.
    """
    from brainage_core.export import model_spec, write_submission
    from brainage_core.export.ramp import centered_view
    from brainage_core.training import load_model_from_checkpoint

    check_out(out, force)
    study = StudyFolder(study_dir)
    ranked = rank_checkpoints(study.location, metric) if ranked is None else ranked
    row = _chosen_trial(study, ranked, rank, metric, fallback=fallback)
    model, config = load_model_from_checkpoint(_local_checkpoint(row["checkpoint"]))
    data_store = _checked_store(config, store, row)
    spec = model_spec(model.cpu(), config, grid=data_store.grid, batch_size=batch_size)
    # the probe reads the features of the inputs the network was trained on (training.augment's
    # deterministic transform), exactly as estimator.py and the training's evaluator do
    view = centered_view(model.to(device).eval(), spec)
    probe = _fit_probe_and_bias(
        view, data_store, config, device=device, batch_size=int((config.get("evaluation") or {}).get("batch_size", 8))
    )
    metadata = _metadata(study, row, rank=rank, metric=metric, config=config, data_store=data_store, probe=probe)
    summary = f"study {study.name}, trial {row['trial_id']} epoch {int(row['epoch'])}, rank {rank} by {metric}"
    return write_submission(model.cpu(), spec, out, metadata=metadata, summary=summary)


def _chosen_trial(study: StudyFolder, ranked: pd.DataFrame, rank: int, metric: str, *, fallback: bool) -> pd.Series:
    """The row of ``ranked`` at ``rank``; a better trial without a stored checkpoint is a DataError, or
    with ``fallback`` a warning naming it."""
    if not isinstance(rank, int) or rank < 1 or rank > len(ranked):
        raise ConfigError(f"--rank {rank}: the study has {len(ranked)} exportable trial(s); expected 1..{len(ranked)}")
    row = ranked.iloc[rank - 1]
    skipped = skipped_better_trials(ranked, row, metric)
    if skipped and not fallback:
        raise DataError(
            f"{study.location}: rank {rank} by {metric} would be trial {row['trial_id']}, but better "
            f"{'trials have' if len(skipped) > 1 else 'trial has'} no stored checkpoint: {'; '.join(skipped)}; "
            "expected their checkpoint folders, or --fallback to export the best stored checkpoints instead"
        )
    for text in skipped:  # stacklevel 3: the caller of export_submission
        warnings.warn(f"--fallback: skipped {text}; exporting trial {row['trial_id']} as rank {rank}", stacklevel=3)
    return row


def _checked_store(config: dict, store: str | Path | None, row: pd.Series):
    """The trial's store (VBM only); a warning when its fingerprint is not the one the trial trained on."""
    data_store = _open_study_store(config, store)
    if data_store.manifest.get("modality", "vbm") != "vbm":
        modality = data_store.manifest.get("modality")
        raise ConfigError(f"data.modality = {modality!r}: the export handles VBM models only; expected 'vbm'")
    fingerprint = row.get("store_fingerprint")
    if isinstance(fingerprint, str) and fingerprint and fingerprint != data_store.fingerprint:
        warnings.warn(
            f"store {data_store.path} has fingerprint {data_store.fingerprint[:12]}, the trial trained on "
            f"{fingerprint[:12]}: the age probe is fitted on different data", stacklevel=3,
        )
    return data_store


def _metadata(study: StudyFolder, row: pd.Series, *, rank: int, metric: str, config: dict, data_store: Any,
              probe: dict[str, Any]) -> dict[str, Any]:
    """``metadata.pkl`` of the submission: where the model comes from, its metrics, the probe and versions."""
    import torch

    metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.drop(labels=["checkpoint"]).items()}
    return {
        "study": study.name,
        "study_dir": study.location,
        "trial_id": str(row["trial_id"]),
        "epoch": int(row["epoch"]),
        "rank": int(rank),
        "metric": metric,
        "metric_value": float(row[metric]),
        "metrics": metrics,
        "leaked": bool(row.get("leaked", False)),
        "config": config,
        "checkpoint": str(row["checkpoint"]),
        "store": str(data_store.path),
        "store_fingerprint": data_store.fingerprint,
        **probe,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "scikit-learn": __import__("sklearn").__version__},
    }


def export_top_k(
    study_dir: str | Path, out: str | Path, *, top_k: int, metric: str = "val_lc", **kwargs: Any
) -> list[Path]:
    """Export ranks 1..``top_k`` as ``<out>-rank<r>``; fewer when the study has fewer exportable trials."""
    if top_k < 1:
        raise ConfigError(f"--top-k {top_k}: expected an integer >= 1")
    ranked = rank_checkpoints(study_dir, metric)
    out = Path(out)
    for r in range(1, min(top_k, len(ranked)) + 1):  # refuse before writing any of them
        check_out(out.with_name(f"{out.name}-rank{r}"), bool(kwargs.get("force")))
    return [
        export_submission(
            study_dir, out.with_name(f"{out.name}-rank{r}"), rank=r, metric=metric, ranked=ranked, **kwargs
        )
        for r in range(1, min(top_k, len(ranked)) + 1)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python study/export.py", description=__doc__.splitlines()[0],
        allow_abbrev=False)
    parser.add_argument("study_dir", metavar="STUDY_DIR", help="study folder written by study/run.py")
    parser.add_argument("--out", required=True, help="submission folder, e.g. ramp-submission/NAME")
    parser.add_argument("--rank", type=int, default=1, help="which trial to export (1 = best; default 1)")
    parser.add_argument("--metric", default="val_lc", help="validation metric that ranks trials (default val_lc)")
    parser.add_argument("--top-k", type=int, default=None, help="export ranks 1..K as OUT-rank1 … OUT-rankK")
    parser.add_argument("--store", default=None, help="prepared store of the study (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu", help="device for the age-probe features (default cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass in estimator.py (default 8)")
    parser.add_argument("--fallback", action="store_true",
                        help="when a better trial's checkpoint is gone, export the best stored one (with a warning)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing, non-empty --out")
    args = parser.parse_args(argv)
    kwargs = {"metric": args.metric, "store": args.store, "device": args.device, "batch_size": args.batch_size,
              "fallback": args.fallback, "force": args.force}
    try:
        if args.top_k is not None:
            paths = export_top_k(args.study_dir, args.out, top_k=args.top_k, **kwargs)
        else:
            paths = [export_submission(args.study_dir, args.out, rank=args.rank, **kwargs)]
    except BrainageError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        meta = pd.read_pickle(path / "metadata.pkl")
        print(f"{path}: trial {meta['trial_id']} epoch {meta['epoch']} {meta['metric']}={meta['metric_value']:.4g}")
    print("try it with the challenge kit: copy the folder into the kit's submissions/ and run "
          "`ramp-test --submission NAME` (VBM_MASK/QUASIRAW_MASK point at the kit's masks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
