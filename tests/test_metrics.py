"""brainage_core.metrics: the one metric vocabulary agrees with what the evaluator reports and with
what studies accept."""

from __future__ import annotations

import pytest

from brainage_core import metrics


def test_the_evaluator_reports_exactly_the_vocabulary():
    from brainage_core.evaluation import METRIC_SUFFIXES

    assert tuple(metrics.QUANTITIES) == tuple(METRIC_SUFFIXES)


def test_names_splits_and_directions():
    assert metrics.metric_name("val", "lc") == "val_lc"
    with pytest.raises(ValueError, match="expected a split"):
        metrics.metric_name("train", "lc")
    assert metrics.METRICS["test_mae_ext"].split == "test"
    assert metrics.METRICS["val_bacc"].direction == "min"  # less site leakage is better
    assert metrics.METRICS["val_bacc_chance"].direction is None
    assert "val_bacc" not in metrics.ERROR_METRICS and "val_lc" in metrics.ERROR_METRICS
    assert all(m.startswith("val_") for m in metrics.VALIDATION_METRICS)
    assert [m[len("test_"):] for m in metrics.TEST_METRICS] == [m[len("val_"):] for m in metrics.VALIDATION_METRICS]

