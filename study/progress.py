"""The driver's progress table: one line per trial, best first (printed by :mod:`study.callback`).

Printed at most every :data:`PROGRESS_TABLE_EVERY_S` seconds with the best :data:`PROGRESS_TABLE_ROWS`
trials, and once, whole, at the end of the study.
"""

from __future__ import annotations

import math
from typing import Any

from study.space import SearchSpace

__all__ = ["PROGRESS_TABLE_EVERY_S", "PROGRESS_TABLE_ROWS", "fmt", "progress_table"]

#: the driver's progress table: printed at most this often (seconds; and once, whole, at the end) ...
PROGRESS_TABLE_EVERY_S = 30.0
#: ... showing the best this many trials
PROGRESS_TABLE_ROWS = 20


def fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits, None as ``-``."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _fmt_pair(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(v) else (f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}")


def progress_table(df: Any, space: SearchSpace, max_rows: int | None = None) -> str:
    """One line per trial: status, last epoch, parameters, the last evaluation's validation MAEs next to
    their constant baselines and BAcc next to chance (``4.1/9.3``: model/baseline, when the results have
    them), last and best objective; best trial marked. ``max_rows``: only the best that many trials, then
    a line saying how many more there are."""
    st = space.study
    if df is None or len(df) == 0:
        return "[study] no results yet"
    lines = []
    pairs = [(m, b) for m, b in (("val_mae_int", "val_mae_int_const"), ("val_mae_ext", "val_mae_ext_const"),
                                 ("val_bacc", "val_bacc_chance")) if m in df.columns and b in df.columns]
    header = ["trial", "status", "epoch", *space.keys, *[f"{m[4:]}/{'chance' if 'bacc' in m else 'const'}"
                                                           for m, _ in pairs], st.objective, f"best {st.objective}"]
    rows = []
    best_trial, best_value = None, None
    for trial_id, g in df.groupby("trial_id", sort=False):
        g = g.sort_values("epoch")
        values = g[st.objective].dropna()
        trial_best = (values.min() if st.mode == "min" else values.max()) if len(values) else None
        last = g.iloc[-1]
        rows.append([trial_id, last["status"], last["epoch"], *[last.get(f"param.{k}") for k in space.keys],
                     *[f"{_fmt_pair(last.get(m))}/{_fmt_pair(last.get(b))}" for m, b in pairs],
                     last.get(st.objective), trial_best])
        if trial_best is not None and (best_value is None or (trial_best < best_value if st.mode == "min"
                                                              else trial_best > best_value)):
            best_trial, best_value = trial_id, trial_best
    sign = 1 if st.mode == "min" else -1
    rows.sort(key=lambda r: (r[-1] is None, sign * r[-1] if r[-1] is not None else 0.0))  # leaderboard order
    done = sum(1 for r in rows if r[1] in ("completed", "pruned"))
    hidden = len(rows) - max_rows if max_rows is not None and len(rows) > max_rows else 0
    if hidden:
        rows = rows[:max_rows]
    cells = [header] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        mark = " *" if i and rows[i - 1][0] == best_trial else ""
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + mark)
    if hidden:
        lines.append(f"... {hidden} more trial(s): every row is in results.parquet")
    return (f"[study] {done}/{st.num_samples} trials done; best {st.objective} = {fmt(best_value)} "
            f"(trial {best_trial}, marked *)\n" + "\n".join(lines))

