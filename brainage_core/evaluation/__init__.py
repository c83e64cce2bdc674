"""Evaluation as the OpenBHB challenge scores it: features, linear probes, metrics, validation split.

See ``docs/evaluation.md`` ("Probes", "Challenge scores") and ``docs/interfaces.md`` (Evaluation).
This package never imports Ray.
"""

from __future__ import annotations

from brainage_core.evaluation.evaluator import METRIC_SUFFIXES, Evaluator, training_rows
from brainage_core.evaluation.features import extract_features
from brainage_core.evaluation.probes import AGE_ALPHAS, SITE_CS, FittedProbe, fit_age_probe, fit_site_probe
from brainage_core.evaluation.scores import (
    CHALLENGE_N_SITES,
    balanced_accuracy,
    challenge_scores,
    chance_balanced_accuracy,
    mae,
    rmse,
)
from brainage_core.evaluation.validation import ValidationSplit, make_validation_split

__all__ = [
    "AGE_ALPHAS",
    "CHALLENGE_N_SITES",
    "Evaluator",
    "FittedProbe",
    "METRIC_SUFFIXES",
    "SITE_CS",
    "ValidationSplit",
    "balanced_accuracy",
    "challenge_scores",
    "chance_balanced_accuracy",
    "extract_features",
    "fit_age_probe",
    "fit_site_probe",
    "mae",
    "make_validation_split",
    "rmse",
    "training_rows",
]
