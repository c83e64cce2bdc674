"""study/final.py: the selection of the top configurations. The final run itself (the top configuration of a
real smoke study retrained with several seeds) is tested in tests/test_smoke_study.py, on the smoke study
that the report and export tests read too.
"""

from __future__ import annotations

import pandas as pd
import pytest

from brainage_core.errors import DataError
from study.final import select_top


def test_select_top_uses_completed_trials_last_evaluation():
    df = pd.DataFrame([
        {"trial_id": "a", "epoch": 1, "val_mae_ext": 1.0, "status": "completed"},  # best early, worse at the end
        {"trial_id": "a", "epoch": 2, "val_mae_ext": 9.0, "status": "completed"},
        {"trial_id": "b", "epoch": 2, "val_mae_ext": 5.0, "status": "completed"},
        {"trial_id": "c", "epoch": 1, "val_mae_ext": 0.5, "status": "pruned"},
    ])
    top = select_top(df, "val_mae_ext", "min", 5)
    assert top["trial_id"].tolist() == ["b", "a"]
    with pytest.raises(DataError, match="no completed trial"):
        select_top(df[df["status"] == "pruned"], "val_mae_ext", "min", 1)
