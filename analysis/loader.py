"""Read one or several study folders into one tidy DataFrame.

A study folder (``docs/interfaces.md``) holds ``results.parquet`` (one row per trial × evaluation),
the resolved ``config.yaml`` and ``optuna.db``. :func:`load_studies` concatenates the results of
several folders and adds, per row:

- ``study`` (the folder name) and ``study_dir`` (its absolute path, or its URI for a study on an object
  store: such folders are read through their local mirror, ``study.storage``);
- ``method``, ``backbone``, ``grid``, ``modality``: the searched value (``param.loss.method`` …) when the
  key was searched, else the study's resolved configuration;
- ``cohort``: ``"synthetic cohort"`` when the configuration generates one, else ``"<layout> cohort"``;
- ``final`` (bool): rows written by ``study/final.py`` (a ``final`` column, or ``status == "final"``);
- ``config_key``: one string naming the configuration (study, method and every searched parameter
  except seeds), so that trials differing only by their seed are grouped together.

Every metric column (``val_*``, ``test_*``) is lower-is-better (MAE, RMSE, site BAcc, Lc).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from brainage_core.errors import ConfigError, DataError

RESULTS_FILE = "results.parquet"
CONFIG_FILE = "config.yaml"
OPTUNA_FILE = "optuna.db"
PARAM_PREFIX = "param."
METRIC_PREFIXES: tuple[str, ...] = ("val_", "test_")

#: Trial statuses (compared lower-case) whose evaluations count as finished results. Ray Tune marks a
#: trial that ran to its end or was stopped by ASHA ``TERMINATED``; Optuna's names are accepted too.
FINISHED_STATUSES: frozenset[str] = frozenset(
    {"terminated", "complete", "completed", "finished", "done", "pruned", "stopped", "final"}
)

#: Configuration keys exposed as plain columns: column -> dotted key of the experiment YAML.
CONFIG_COLUMNS: dict[str, str] = {
    "method": "loss.method",
    "backbone": "model.backbone",
    "grid": "data.grid",
    "modality": "data.modality",
}

_SEED_PARAMS = ("training.seed", "seed")


@dataclass(frozen=True)
class Study:
    """One study folder, read: ``results`` is ``results.parquet`` as written, ``config`` the resolved YAML."""

    path: Path
    config: dict
    results: pd.DataFrame
    #: where the study lives: ``str(path)``, or its URI (``s3://...``) when ``path`` is the local mirror
    location: str = ""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def optuna_path(self) -> Path:
        return self.path / OPTUNA_FILE


def flatten_config(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def load_study(path: str | Path) -> Study:
    """Read one study folder: a local path, or a URI (``s3://bucket/studies/NAME``, ``gs://...``) whose
    small files are downloaded into its local mirror first (``study.storage.StudyFolder.materialize``).

    Raises ``DataError`` when the folder, its ``results.parquet`` or ``config.yaml`` is missing or
    unreadable, or when the results lack a ``trial_id`` or ``epoch`` column.
    """
    from study.storage import StudyFolder, is_uri

    location = str(path) if is_uri(path) else None
    path = StudyFolder(path).materialize() if location else Path(path).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"study folder {path} does not exist; expected a folder written by study/run.py")
    results_path = path / RESULTS_FILE
    from study.results import read_results

    results = read_results(results_path)  # with the journal of a study that is running or was killed
    config_path = path / CONFIG_FILE
    config: dict = {}
    if config_path.is_file():
        try:
            loaded = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as exc:
            raise DataError(f"{config_path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise DataError(f"{config_path} holds a {type(loaded).__name__}; expected a mapping")
        config = loaded or {}
    return Study(path=path, config=config, results=results, location=location or str(path))


def param_columns(df: pd.DataFrame) -> list[str]:
    """The searched-parameter columns (``param.<dotted.key>``), in table order."""
    return [c for c in df.columns if c.startswith(PARAM_PREFIX)]


def metric_columns(df: pd.DataFrame, prefixes: Sequence[str] = METRIC_PREFIXES) -> list[str]:
    """The numeric metric columns (``val_*``/``test_*``), in table order."""
    return [
        c
        for c in df.columns
        if c.startswith(tuple(prefixes)) and pd.api.types.is_numeric_dtype(df[c]) and df[c].dtype != bool
    ]


def _format_param(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _tidy(study: Study) -> pd.DataFrame:
    df = study.results.copy()
    df.insert(0, "study", study.name)
    df.insert(1, "study_dir", study.location or str(study.path))
    flat = flatten_config(study.config)
    for column, key in CONFIG_COLUMNS.items():
        param = PARAM_PREFIX + key
        default = flat.get(key)
        if param in df.columns:
            df[column] = df[param].where(df[param].notna(), default)
        elif column not in df.columns:
            df[column] = default
    synthetic = any(k.startswith("data.synthetic") and v is not None for k, v in flat.items())
    df["cohort"] = "synthetic cohort" if synthetic else f"{flat.get('data.layout', 'unknown')} cohort"
    if "final" in df.columns:
        df["final"] = df["final"].fillna(False).astype(bool)
    elif "status" in df.columns:
        df["final"] = df["status"].astype(str).str.lower().eq("final")
    else:
        df["final"] = False
    if "leaked" not in df.columns:
        df["leaked"] = False
    df["leaked"] = df["leaked"].fillna(False).astype(bool)
    if "status" not in df.columns:
        df["status"] = "unknown"
    if "seed" not in df.columns:
        df["seed"] = flat.get("training.seed", 0)
    key_params = [c for c in param_columns(df) if c[len(PARAM_PREFIX):] not in _SEED_PARAMS]

    def key_of(row: pd.Series) -> str:
        parts = [f"{c[len(PARAM_PREFIX):]}={_format_param(row[c])}" for c in key_params if pd.notna(row[c])]
        return " ".join([f"{row['study']}/{row['method']}", *parts])

    df["config_key"] = df.apply(key_of, axis=1) if len(df) else pd.Series(dtype=str)
    return df


def load_studies(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate the results of several study folders into one tidy DataFrame (see the module doc).

    Raises ``DataError`` (see :func:`load_study`) and ``ConfigError`` when ``paths`` is empty.
    """
    studies = [load_study(p) for p in paths]
    if not studies:
        raise ConfigError("no study folder given; expected at least one STUDY_DIR")
    names = [s.name for s in studies]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    frames = []
    for s in studies:
        df = _tidy(s)
        if duplicated and s.name in duplicated:  # keep study names unique across storages
            df["study"] = f"{s.path.parent.name}/{s.name}"
        frames.append(df)
    return pd.concat(frames, ignore_index=True, sort=False)


def finished(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of trials whose status is a finished one (see :data:`FINISHED_STATUSES`)."""
    return df[df["status"].astype(str).str.lower().isin(FINISHED_STATUSES)]


def check_metric(df: pd.DataFrame, metric: str, *, validation_only: bool = False) -> str:
    """Return ``metric`` if it is a metric column of ``df``, else raise ``ConfigError`` listing the valid ones.

    With ``validation_only`` a ``test_*`` metric is refused: selection must use validation data only.
    """
    available = metric_columns(df)
    if validation_only and metric.startswith("test_"):
        raise ConfigError(
            f"--metric {metric!r} selects on test data; expected a validation metric "
            f"({', '.join(c for c in available if c.startswith('val_')) or 'val_lc'}): test metrics are reported, "
            "never used for selection"
        )
    if metric not in available:
        raise ConfigError(f"unknown metric {metric!r}; expected one of {', '.join(available) or '(none in the table)'}")
    return metric


def best_rows(df: pd.DataFrame, metric: str = "val_lc", *, finished_only: bool = True) -> pd.DataFrame:
    """One row per (study, trial): the evaluation with the lowest ``metric`` (ties: the later epoch).

    Trials whose ``metric`` is NaN at every evaluation are dropped. Sorted best first, with a 1-based
    ``rank`` column. ``ConfigError`` for an unknown metric.
    """
    check_metric(df, metric)
    rows = finished(df) if finished_only else df
    rows = rows[rows[metric].notna()]
    if rows.empty:
        return rows.assign(rank=pd.Series(dtype=int))
    rows = rows.sort_values(["study", "trial_id", metric, "epoch"], ascending=[True, True, True, False])
    best = rows.groupby(["study", "trial_id"], sort=False).head(1)
    best = best.sort_values([metric, "study", "trial_id"]).reset_index(drop=True)
    best.insert(0, "rank", range(1, len(best) + 1))
    return best


def resolve_checkpoint(study_dir: str | Path, checkpoint_path: object) -> Path | None:
    """Absolute checkpoint folder of a results row (relative paths are relative to the study folder)."""
    if checkpoint_path is None or (isinstance(checkpoint_path, float) and math.isnan(checkpoint_path)):
        return None
    text = str(checkpoint_path)
    if not text or text.lower() in ("none", "nan"):
        return None
    if text.startswith("file://"):
        text = text[len("file://"):]
    p = Path(text).expanduser()
    return p if p.is_absolute() else Path(study_dir) / p
