"""The metric vocabulary: every metric an evaluation reports, with its split and direction.

A metric name is ``<split>_<quantity>``: split ``val`` (the validation split carved from ``train``: what
studies select on) or ``test`` (``internal_test`` / ``external_test``: reported, never optimised), and
one of the :data:`QUANTITIES` below (``docs/evaluation.md``). The evaluator
(``brainage_core.evaluation.Evaluator``) returns exactly these names; the search-space validation,
``study/final.py`` and the analysis read their lists and directions from here.

Torch-free on purpose (``brainage_core.evaluation`` imports torch; validating a search space must not).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ERROR_METRICS", "LOWER_IS_BETTER", "METRICS", "QUANTITIES", "SELECTION_QUANTITIES", "SPLITS",
           "TEST_METRICS", "VALIDATION_METRICS", "Metric", "Quantity", "metric_name"]

SPLITS: tuple[str, ...] = ("val", "test")


@dataclass(frozen=True)
class Quantity:
    """What a metric measures. ``direction``: ``min`` (lower is better) or None (descriptive only).
    ``is_error``: an error measure, for which maximising is always a mistake (a study refuses ``max``);
    ``unit``: years, a fraction, or the score's own unit."""

    name: str
    direction: str | None
    is_error: bool
    unit: str
    description: str


#: in the order the evaluator reports them
QUANTITIES: dict[str, Quantity] = {q.name: q for q in (
    Quantity("mae_int", "min", True, "years", "age MAE on the internal part (sites seen in training)"),
    Quantity("mae_ext", "min", True, "years", "age MAE on the external part (sites never seen in training)"),
    Quantity("mae_int_const", None, False, "years",
             "baseline: MAE on the internal part of predicting the fit rows' median age for everyone"),
    Quantity("mae_ext_const", None, False, "years",
             "baseline: MAE on the external part of predicting the fit rows' median age for everyone"),
    Quantity("rmse_int", "min", True, "years", "age RMSE on the internal part"),
    Quantity("rmse_ext", "min", True, "years", "age RMSE on the external part"),
    # lower is better for the challenge (less site leakage), but a study may maximise it on purpose
    Quantity("bacc", "min", False, "fraction", "balanced accuracy of the site probe on the internal part"),
    Quantity("bacc_chance", None, False, "fraction", "chance level of bacc (1 / number of sites scored)"),
    Quantity("lc", "min", True, "score", "challenge score MAE_ext · BAcc^0.3 (current definition)"),
    Quantity("lc_2022_09", "min", True, "score", "challenge score used until 2022-09-19"),
    Quantity("lc_2022_06", "min", True, "score", "challenge score used until 2022-06-17"),
)}

#: the quantities a study may select on (objective, prune_on, export ranking, final.py's top-k)
SELECTION_QUANTITIES: tuple[str, ...] = ("mae_int", "mae_ext", "rmse_int", "rmse_ext", "bacc", "lc")


@dataclass(frozen=True)
class Metric:
    name: str
    split: str
    quantity: Quantity

    @property
    def direction(self) -> str | None:
        return self.quantity.direction


def metric_name(split: str, quantity: str) -> str:
    """``val`` + ``mae_ext`` -> ``val_mae_ext``; ValueError naming what is expected otherwise."""
    if split not in SPLITS or quantity not in QUANTITIES:
        raise ValueError(f"metric {split}_{quantity}: expected a split in {', '.join(SPLITS)} and a quantity in "
                         f"{', '.join(QUANTITIES)}")
    return f"{split}_{quantity}"


METRICS: dict[str, Metric] = {
    metric_name(s, q): Metric(metric_name(s, q), s, QUANTITIES[q]) for s in SPLITS for q in QUANTITIES
}
VALIDATION_METRICS: tuple[str, ...] = tuple(metric_name("val", q) for q in SELECTION_QUANTITIES)
TEST_METRICS: tuple[str, ...] = tuple(metric_name("test", q) for q in SELECTION_QUANTITIES)
#: every metric whose direction is ``min``
LOWER_IS_BETTER: tuple[str, ...] = tuple(n for n, m in METRICS.items() if m.direction == "min")
#: the error metrics (maximising one is refused)
ERROR_METRICS: tuple[str, ...] = tuple(n for n, m in METRICS.items() if m.quantity.is_error)
