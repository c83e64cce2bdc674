"""The published OpenBHB figures (``docs/evaluation.md``), for side-by-side comparison.

These are **OpenBHB private-test** numbers (ResNet-18 on VBM unless noted, server-side test set of
664 internal + 720 external subjects). They are not comparable with numbers measured on the synthetic
cohort or on the public test splits; every table built from them says so in its ``source`` column.
"""

from __future__ import annotations

import pandas as pd

#: Label carried by every reference row.
REFERENCE_SOURCE = "OpenBHB private test (published)"

#: (method, loss family, MAE int (years), MAE ext (years), BAcc (fraction), Lc) as published.
_REFERENCE_ROWS: tuple[tuple[str, str, float, float, float, float], ...] = (
    ("L^exp (expw, rbf σ=2, τ=0.1) — the paper", "expw", 2.55, 3.76, 0.051, 1.540),
    ("L^exp, best leaderboard run", "expw", 2.61, 3.56, 0.052, 1.468),
    ("L^thr (threshold)", "threshold", 2.95, 4.10, 0.057, 1.738),
    ("y-aware", "yaware", 2.67, 4.10, 0.066, 1.815),
    ("L1 baseline (official)", "l1", 2.67, 4.18, 0.067, 1.86),
    ("L1, well tuned", "l1", 2.79, 3.49, 0.070, 1.572),
    ("L1 baseline on quasi-raw", "l1", 2.60, 2.85, 0.076, 1.315),
)


def reference_table() -> pd.DataFrame:
    """The published figures as a DataFrame.

    Columns: ``method`` (as published), ``loss`` (this project's loss name), ``mae_int``, ``mae_ext``
    (years), ``bacc`` (fraction, chance 1/64), ``lc`` (MAE_ext·BAcc^0.3, as published), ``source``.
    """
    df = pd.DataFrame(_REFERENCE_ROWS, columns=["method", "loss", "mae_int", "mae_ext", "bacc", "lc"])
    df["source"] = REFERENCE_SOURCE
    return df
