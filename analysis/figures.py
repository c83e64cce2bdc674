"""Matplotlib figures of a study report. Each function returns a ``Figure`` (nothing is shown or saved
here); the notebook displays them, and the HTML export embeds them as PNG."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: the report runs without a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from analysis.tables import BASELINE_OF, Importances  # noqa: E402


def _method_colors(methods) -> dict:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(sorted(map(str, set(methods))))}


def _level(rows: pd.DataFrame, metric: str) -> float | None:
    """The baseline of ``metric`` in ``rows`` (median of its ``BASELINE_OF`` column), None when absent."""
    col = BASELINE_OF.get(metric)
    if col is None or col not in rows.columns or not rows[col].notna().any():
        return None
    return float(rows[col].median())


def _chance_label(value: float) -> str:
    n = round(1 / value) if value > 0 else 0
    return f"chance (1/{n} sites)" if n and abs(1 / n - value) < 1e-9 else f"chance ({value:.3f})"


def pareto_figure(best: pd.DataFrame, front: pd.DataFrame, x: str = "val_mae_ext", y: str = "val_bacc") -> Figure:
    """Scatter of every trial's best evaluation in (``x``, ``y``), coloured by loss, the Pareto front as a line;
    the constant baseline of ``x`` and the chance level of ``y`` (from the cohort's own sites) when the
    results have them."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = _method_colors(best["method"].astype(str))
    for method, g in best.groupby(best["method"].astype(str)):
        ax.scatter(g[x], g[y] * 100, label=method, color=colors[method], alpha=0.8)
    if len(front):
        ax.step(front[x], front[y] * 100, where="post", color="k", lw=1.2, label="Pareto front")
        ax.scatter(front[x], front[y] * 100, facecolors="none", edgecolors="k", s=90)
    chance = _level(best, y)
    if chance is not None:
        ax.axhline(chance * 100, color="grey", ls=":", lw=1, label=_chance_label(chance))
    const = _level(best, x)
    if const is not None:
        ax.axvline(const, color="tab:red", ls="--", lw=1, label=f"constant: median age ({const:.2f})")
    ax.set_xlabel(f"{x} (years, lower is better)")
    ax.set_ylabel(f"{y} (%, lower is better)")
    ax.set_title("External MAE against site balanced accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def epoch_figure(long: pd.DataFrame, baselines: dict[str, float] | None = None) -> Figure:
    """One panel per metric, one line per trial (colour = loss), metric against epoch; ``baselines``
    (metric -> level, e.g. :func:`analysis.tables.baseline_levels`) drawn as a dashed line in its panel."""
    metrics = list(dict.fromkeys(long["metric"]))
    n = max(len(metrics), 1)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = _method_colors(long["method"].astype(str))
    for ax, metric in zip(axes.flat, metrics):
        g = long[long["metric"] == metric]
        for (_study, _trial, method), t in g.groupby(["study", "trial_id", g["method"].astype(str)]):
            ax.plot(t["epoch"], t["value"], marker="o", ms=3, color=colors[method], alpha=0.7, label=method)
        level = (baselines or {}).get(metric)
        if level is not None:
            label = _chance_label(level) if metric.endswith("bacc") else f"constant ({level:.2f})"
            ax.axhline(level, color="tab:red" if "mae" in metric else "grey", ls="--", lw=1, label=label)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def importance_figure(importances: list[Importances]) -> Figure:
    """Horizontal bars of the Optuna importances, one panel per study that has them."""
    available = [imp for imp in importances if len(imp.table)]
    n = max(len(available), 1)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 0.4 * max((len(i.table) for i in available), default=2) + 1.8),
                             squeeze=False)
    for ax, imp in zip(axes.flat, available):
        t = imp.table.sort_values("importance")
        ax.barh(t["param"], t["importance"], color="tab:blue")
        ax.set_xlabel("importance (fANOVA, sums to 1)")
        ax.set_title(str(t["study"].iloc[0]), fontsize=9)
    fig.tight_layout()
    return fig


def reference_figure(ours: pd.DataFrame, reference: pd.DataFrame) -> Figure:
    """Two panels, MAE_ext against BAcc: this study's best trial per loss (left) and the published
    figures (right). Separate panels on purpose: the published numbers are OpenBHB private-test figures,
    not comparable with synthetic-cohort or public-test numbers."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colors = _method_colors(list(ours["method"].astype(str)) + list(reference["loss"].astype(str)))
    for _, row in ours.iterrows():
        left.scatter(row["mae_ext"], row["bacc"] * 100, color=colors[str(row["method"])], label=str(row["method"]))
    left.set_title(f"this study ({ours['split'].iloc[0] if len(ours) else 'no data'})", fontsize=9)
    for _, row in reference.iterrows():
        right.scatter(row["mae_ext"], row["bacc"] * 100, color=colors[str(row["loss"])], label=str(row["loss"]))
        right.annotate(str(row["method"])[:28], (row["mae_ext"], row["bacc"] * 100), fontsize=6)
    right.set_title("published: OpenBHB private test (not comparable)", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("MAE ext (years)")
        ax.set_ylabel("site BAcc (%)")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        if unique:
            ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.tight_layout()
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of ``fig`` (closes it)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def show_figure(fig: Figure) -> None:
    """Display ``fig`` as one ``image/png`` output (whatever the kernel's matplotlib backend), then close it."""
    from IPython.display import Image, display

    display(Image(data=figure_png(fig), format="png"))
