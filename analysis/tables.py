"""Tables built from the tidy results of :mod:`analysis.loader`: leaderboard, Pareto front, seed
aggregates with confidence intervals, Optuna hyper-parameter importances.

All metrics are lower-is-better. Test metrics are shown next to validation metrics but never used to
rank; a row whose training set included test subjects has ``leaked=True`` and its test metrics must not
be read as clean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.loader import CONFIG_COLUMNS, OPTUNA_FILE, best_rows, finished, metric_columns, param_columns

#: Metrics shown in the leaderboard, in this order, when present.
LEADERBOARD_METRICS: tuple[str, ...] = (
    "val_mae_int",
    "val_mae_ext",
    "val_bacc",
    "val_lc",
    "test_mae_int",
    "test_mae_ext",
    "test_bacc",
    "test_lc",
)

#: Metrics aggregated over seeds.
SEED_METRICS: tuple[str, ...] = ("val_mae_int", "val_mae_ext", "val_bacc", "val_lc", *LEADERBOARD_METRICS[4:])

#: metric -> the column holding its constant baseline (the evaluator's ``*_const``: MAE of predicting the
#: probe rows' median age) or its chance level (``*_bacc_chance``: 1 / sites present in the scored part).
BASELINE_OF: dict[str, str] = {
    f"{split}_{m}": f"{split}_{m}_const" for split in ("val", "test") for m in ("mae_int", "mae_ext")
} | {f"{split}_bacc": f"{split}_bacc_chance" for split in ("val", "test")}

#: Fewer epochs than this and a study is called smoke-sized, whatever its figures say (a heuristic). On the
#: 6 mm synthetic cohort: 3-epoch ResNet-18 trials were worse than the constant baseline on every split,
#: 12 epochs (base width 8, 600 subjects) beat it on val_mae_int (0.68x) but not on test_mae_int, and
#: 30 epochs (base width 16, 1,200 subjects) learned (test MAE int about 0.5x the constant).
MIN_LEARNING_EPOCHS = 10


def _with_baselines(metrics: list[str], columns) -> list[str]:
    """``metrics`` with each one's baseline column (when present) right after it."""
    out: list[str] = []
    for m in metrics:
        out.append(m)
        if BASELINE_OF.get(m) in columns:
            out.append(BASELINE_OF[m])
    return out

NEEDS_FINAL = (
    "one seed per configuration: confidence intervals need several seeds per configuration — run "
    "`python study/final.py STUDY_DIR --top-k K --seeds N` and rebuild the report"
)


def leaderboard(df: pd.DataFrame, metric: str = "val_lc", top: int | None = None) -> pd.DataFrame:
    """One row per finished trial (its best evaluation by ``metric``), best first.

    Columns: ``rank``, ``study``, ``trial_id``, ``method``, the searched parameters (``param.`` dropped),
    ``epoch``, the validation and test metrics each followed by its baseline when the results have it
    (``*_mae_*_const``: predicting the training median age; ``*_bacc_chance``), ``beats_const`` (True
    when every validation MAE is below its constant baseline; absent without baselines), ``protocol``
    (the probe protocol of that evaluation, ``exact`` or ``fast``; ``exact`` for results written before
    the column existed), ``leaked``.
    """
    best = best_rows(df, metric)
    if top is not None:
        best = best.head(top)
    shown_already = {"param." + key for key in CONFIG_COLUMNS.values()}  # e.g. the method column
    params = [c for c in param_columns(best) if best[c].notna().any() and c not in shown_already]
    metrics = [m for m in LEADERBOARD_METRICS if m in best.columns]
    if metric not in metrics:
        metrics.insert(0, metric)
    metrics = _with_baselines(metrics, best.columns)
    extra = []
    if "val_mae_int_const" in best.columns or "val_mae_ext_const" in best.columns:
        best = best.assign(beats_const=beats_constant(best))
        extra = ["beats_const"]
    best = best.assign(protocol=best["protocol"].fillna("exact") if "protocol" in best.columns else "exact")
    table = best[["rank", "study", "trial_id", "method", *params, "epoch", *metrics, *extra, "protocol", "leaked"]]
    return table.rename(columns={c: c[len("param."):] for c in params}).reset_index(drop=True)


def beats_constant(rows: pd.DataFrame, prefix: str = "val") -> pd.Series:
    """Per row: True when each of ``{prefix}_mae_int`` / ``{prefix}_mae_ext`` that has a baseline is below
    it (a model that learned something about age); False when one is not or is NaN."""
    ok = pd.Series(True, index=rows.index)
    checked = False
    for m in (f"{prefix}_mae_int", f"{prefix}_mae_ext"):
        const = BASELINE_OF[m]
        if m in rows.columns and const in rows.columns and rows[const].notna().any():
            ok &= rows[m].lt(rows[const]).fillna(False)
            checked = True
    return ok if checked else pd.Series(False, index=rows.index)


def baseline_levels(df: pd.DataFrame) -> dict[str, float]:
    """metric -> its baseline (median over rows of the baseline column; the validation split is fixed per
    study, so this is the study's value), for the metrics whose baseline column has a value."""
    return {m: float(df[b].median()) for m, b in BASELINE_OF.items() if b in df.columns and df[b].notna().any()}


@dataclass
class SmokeVerdict:
    """Whether a study's figures can be read as findings. ``smoke`` True: they cannot (``reasons`` say
    why, in plain words); ``message`` is the text a report shows."""

    smoke: bool
    reasons: list[str]
    n_trials: int
    n_beating: int | None
    max_epoch: int | None

    @property
    def message(self) -> str:
        if not self.smoke:
            return ""
        return ("Smoke-sized study: these figures do not say which configuration is better, and the ranking "
                "below is noise. " + " ".join(self.reasons))


def smoke_verdict(df: pd.DataFrame, metric: str = "val_lc", min_epochs: int = MIN_LEARNING_EPOCHS) -> SmokeVerdict:
    """Flag a study whose trials learned nothing measurable.

    Smoke-sized when no finished trial's best evaluation (by ``metric``) has every validation MAE below
    its constant baseline (``beats_constant``), or when the longest trial ran fewer than ``min_epochs``
    epochs. Results without baseline columns (older studies) are judged on epochs alone and say so.
    """
    best = best_rows(df, metric)
    reasons: list[str] = []
    n_beating: int | None = None
    max_epoch = int(best["epoch"].max()) if len(best) and best["epoch"].notna().any() else None
    if "val_mae_int_const" in best.columns or "val_mae_ext_const" in best.columns:
        n_beating = int(beats_constant(best).sum())
        if n_beating == 0:
            const = ", ".join(f"{m} {v:.2f}" for m, v in baseline_levels(best).items() if m.startswith("val_mae"))
            reasons.append(f"No trial is below the constant baseline (predicting the training median age: {const} "
                           "years): no model learned age.")
    else:
        reasons.append("(These results have no constant-baseline columns: only the epoch count was checked.)")
    longest = int(df["epoch"].max()) if "epoch" in df.columns and df["epoch"].notna().any() else None
    if longest is not None and longest < min_epochs:
        reasons.append(f"The longest trial ran {longest} epoch(s), fewer than the {min_epochs} it takes to learn "
                       "on this kind of data.")
    smoke = bool(n_beating == 0 or (longest is not None and longest < min_epochs))
    if not smoke:
        reasons = [r for r in reasons if r.startswith("(")]
    return SmokeVerdict(smoke=smoke, reasons=reasons, n_trials=len(best), n_beating=n_beating, max_epoch=max_epoch)


def style_leaderboard(table: pd.DataFrame):
    """A pandas Styler of :func:`leaderboard`'s table: 3 decimals, leaked rows' test cells marked."""
    numeric = [c for c in table.columns if c.startswith(("val_", "test_")) and pd.api.types.is_numeric_dtype(table[c])]
    test_cols = [c for c in numeric if c.startswith("test_")]

    def mark_leaked(row: pd.Series) -> list[str]:
        style = "background-color: #f8d7da; text-decoration: line-through" if row.get("leaked", False) else ""
        return [style if c in test_cols else "" for c in row.index]

    return table.style.format("{:.3f}", subset=numeric, na_rep="–").apply(mark_leaked, axis=1).hide(axis="index")


def pareto_front(points: pd.DataFrame, x: str = "val_mae_ext", y: str = "val_bacc") -> pd.DataFrame:
    """Rows of ``points`` not dominated in (``x``, ``y``), both minimised, sorted by ``x``.

    A row is dominated when another row is ≤ on both and < on at least one. Rows with NaN in ``x`` or
    ``y`` are ignored.
    """
    pts = points[points[x].notna() & points[y].notna()].sort_values([x, y])
    keep = []
    best_y = np.inf
    for idx, value in pts[y].items():  # sorted by x then y: non-dominated iff y strictly improves
        if value < best_y:
            keep.append(idx)
            best_y = value
    return pts.loc[keep]


def metrics_by_epoch(df: pd.DataFrame, metrics: tuple[str, ...] = ("val_mae_int", "val_mae_ext", "val_bacc", "val_lc")):
    """Long table (study, trial_id, method, epoch, metric, value) of every evaluation, for curves."""
    present = [m for m in metrics if m in df.columns]
    if "train_loss" in df.columns:
        present.append("train_loss")
    long = df.melt(id_vars=["study", "trial_id", "method", "epoch"], value_vars=present, var_name="metric")
    return long.dropna(subset=["value"]).sort_values(["study", "trial_id", "metric", "epoch"])


@dataclass
class SeedSummary:
    """Seeds aggregated per configuration: ``table`` has, per ``config_key`` and metric, ``n`` (seeds),
    ``mean``, ``std``, ``ci_low``, ``ci_high`` (95 % Student-t interval of the mean; NaN when n < 2).
    ``message`` says when intervals are unavailable."""

    table: pd.DataFrame
    has_intervals: bool
    message: str = field(default="")


def seed_summary(df: pd.DataFrame, metric: str = "val_lc", confidence: float = 0.95) -> SeedSummary:
    """Aggregate seeds per configuration.

    Rows written by ``study/final.py`` (``final``) are used when present (their test metrics are the
    ones to quote); otherwise each finished trial contributes its best evaluation by ``metric``.
    """
    final_rows = df[df["final"]]
    if not final_rows.empty:
        # final.py evaluates each seed once at the end: keep each trial's last evaluation
        per_seed = final_rows.sort_values("epoch").groupby(["study", "trial_id"]).tail(1)
        source = "final"
    else:
        per_seed = best_rows(df, metric)
        source = "search"
    metrics = [m for m in SEED_METRICS if m in per_seed.columns and per_seed[m].notna().any()]
    records = []
    for key, group in per_seed.groupby("config_key", sort=False):
        for m in metrics:
            values = group[m].dropna().to_numpy(dtype=float)
            n = len(values)
            mean = float(values.mean()) if n else np.nan
            std = float(values.std(ddof=1)) if n > 1 else np.nan
            if n > 1:
                half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / np.sqrt(n))
                low, high = mean - half, mean + half
            else:
                low = high = np.nan
            records.append(
                {
                    "config_key": key,
                    "method": group["method"].iloc[0],
                    "metric": m,
                    "n": n,
                    "mean": mean,
                    "std": std,
                    "ci_low": low,
                    "ci_high": high,
                    "leaked": bool(group["leaked"].any()) and m.startswith("test_"),
                    "source": source,
                }
            )
    table = pd.DataFrame.from_records(
        records, columns=["config_key", "method", "metric", "n", "mean", "std", "ci_low", "ci_high", "leaked", "source"]
    )
    has_intervals = bool((table["n"] >= 2).any()) if len(table) else False
    return SeedSummary(table=table, has_intervals=has_intervals, message="" if has_intervals else NEEDS_FINAL)


@dataclass
class Importances:
    """Optuna hyper-parameter importances of one study: ``table`` (study, param, importance) or, when
    they cannot be computed, an empty table and ``reason``."""

    study: str
    table: pd.DataFrame
    reason: str = ""


def optuna_importances(study_dir: str | Path, study_name: str | None = None) -> list[Importances]:
    """``optuna.importance.get_param_importances`` (fANOVA) for each Optuna study in ``study_dir/optuna.db``.

    Needs at least two COMPLETE trials and one parameter that varies; otherwise the returned entry has
    an empty table and says why (never raises for a missing or short database).
    """
    import optuna

    label = study_name or Path(study_dir).name
    db = Path(study_dir) / OPTUNA_FILE
    empty = pd.DataFrame(columns=["study", "param", "importance"])
    if not db.is_file():
        return [Importances(label, empty, f"{db} not found: the study has no Optuna storage")]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{db}"
    try:
        names = optuna.study.get_all_study_names(storage=storage)
    except Exception as exc:  # sqlite/alembic errors of an unreadable database
        return [Importances(label, empty, f"{db} is not a readable Optuna database: {exc}")]
    if not names:
        return [Importances(label, empty, f"{db} holds no Optuna study")]
    out = []
    for name in names:
        title = label if len(names) == 1 else f"{label}:{name}"
        study = optuna.load_study(study_name=name, storage=storage)
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(complete) < 2:
            out.append(Importances(title, empty, f"{len(complete)} COMPLETE trial(s) in {db}; importances need ≥ 2"))
            continue
        if len(study.directions) > 1:
            target_note = " (first objective)"
            target = lambda t: t.values[0]  # noqa: E731
        else:
            target_note, target = "", None
        try:
            imp = optuna.importance.get_param_importances(study, target=target)
        except (RuntimeError, ValueError) as exc:
            out.append(Importances(title, empty, f"optuna could not compute importances: {exc}"))
            continue
        if not imp:
            out.append(Importances(title, empty, "no searched parameter varies across the COMPLETE trials"))
            continue
        table = pd.DataFrame({"study": title + target_note, "param": list(imp), "importance": list(imp.values())})
        out.append(Importances(title, table))
    return out


def status_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Trials per study and status (one trial counted once, with its last status)."""
    last = df.sort_values("epoch").groupby(["study", "trial_id"]).tail(1)
    return last.groupby(["study", "status"]).size().rename("trials").reset_index()


def study_overview(df: pd.DataFrame) -> pd.DataFrame:
    """Per study: trials, finished trials, evaluations, methods, leaked rows, metrics present."""
    rows = []
    for name, g in df.groupby("study", sort=False):
        rows.append(
            {
                "study": name,
                "trials": g["trial_id"].nunique(),
                "finished trials": finished(g)["trial_id"].nunique(),
                "evaluations": len(g),
                "methods": ", ".join(sorted(map(str, g["method"].dropna().unique()))),
                "leaked rows": int(g["leaked"].sum()),
                "final rows": int(g["final"].sum()),
                "metrics": len(metric_columns(g)),
            }
        )
    return pd.DataFrame(rows)


def comparison_table(df: pd.DataFrame, reference: pd.DataFrame, metric: str = "val_lc") -> pd.DataFrame:
    """This study's best trial per loss (selected on ``metric``) next to the published figures.

    Test metrics are used when present (validation metrics otherwise); the ``source`` column says which
    split and cohort each row comes from, and marks leaked test metrics. Columns: ``method``, ``mae_int``,
    ``mae_ext``, ``bacc``, ``lc``, ``split``, ``source``.
    """
    best = best_rows(df, metric)
    rows = []
    for method, g in best.groupby(best["method"].astype(str), sort=True):
        top = g.iloc[0]
        prefix = "test_" if pd.notna(top.get("test_mae_ext", np.nan)) else "val_"
        split = "public test splits" if prefix == "test_" else "validation split"
        leaked = prefix == "test_" and bool(top["leaked"])
        source = f"this study ({top['study']}, {top['cohort']}, {split}{', LEAKED' if leaked else ''})"
        rows.append(
            {
                "method": method,
                "mae_int": top.get(prefix + "mae_int", np.nan),
                "mae_ext": top.get(prefix + "mae_ext", np.nan),
                "bacc": top.get(prefix + "bacc", np.nan),
                "lc": top.get(prefix + "lc", np.nan),
                "split": split,
                "source": source,
            }
        )
    ours = pd.DataFrame(rows, columns=["method", "mae_int", "mae_ext", "bacc", "lc", "split", "source"])
    ref = reference.rename(columns={"loss": "family"}).assign(split="OpenBHB private test")
    return pd.concat([ours, ref[["method", "mae_int", "mae_ext", "bacc", "lc", "split", "source"]]], ignore_index=True)


def seed_table_wide(summary: SeedSummary) -> pd.DataFrame:
    """:func:`seed_summary`'s table as one row per configuration: ``n`` and, per metric, ``mean [low, high]``
    (the mean alone when n < 2; ``LEAKED`` appended to leaked test metrics)."""
    t = summary.table
    if t.empty:
        return pd.DataFrame(columns=["config_key", "method", "n"])

    def cell(row: pd.Series) -> str:
        text = f"{row['mean']:.3f}"
        if row["n"] >= 2:
            text += f" [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        return text + (" LEAKED" if row["leaked"] else "")

    t = t.assign(cell=t.apply(cell, axis=1))
    wide = t.pivot(index="config_key", columns="metric", values="cell")
    wide = wide[[m for m in dict.fromkeys(t["metric"])]]
    meta = t.groupby("config_key", sort=False).agg(method=("method", "first"), n=("n", "max"))
    return meta.join(wide).reset_index().sort_values(["n", "config_key"], ascending=[False, True], ignore_index=True)
