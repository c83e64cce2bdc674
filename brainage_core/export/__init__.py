"""Export of trained models: RAMP challenge submissions (:mod:`brainage_core.export.ramp`)."""

from __future__ import annotations

from brainage_core.export.ramp import (
    ESTIMATOR_FILE,
    METADATA_FILE,
    SANITIZER_WORDS,
    WEIGHTS_FILE,
    ExportError,
    ModelSpec,
    check_sanitizer,
    estimator_source,
    forbidden_words,
    model_from_spec,
    model_spec,
    write_submission,
)

__all__ = [
    "ESTIMATOR_FILE",
    "METADATA_FILE",
    "SANITIZER_WORDS",
    "WEIGHTS_FILE",
    "ExportError",
    "ModelSpec",
    "check_sanitizer",
    "estimator_source",
    "forbidden_words",
    "model_from_spec",
    "model_spec",
    "write_submission",
]
