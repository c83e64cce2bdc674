"""How a study fails, seen from its driver: the error registries, the stopper that ends a doomed study,
and the one-line causes ``run_study`` raises or prints.

- :data:`WRITE_ERRORS`: OSErrors met writing the study folder from the driver callback
  (:mod:`study.callback`); the first one stops the study (:class:`DoomedStudyStopper`) and becomes the
  one-line :class:`StudyFailed` of :func:`unwritable`.
- :data:`INPUT_ERRORS`: trials that failed with a deterministic error (``study.trial.TrialInputError``),
  which are not retried (:func:`no_retry_on_input_errors`); two with the same cause before any result
  stop the study.

Both registries belong to the driver process and are cleared by ``run_study`` before each study.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from study.storage import StudyFolder

__all__ = ["INPUT_ERRORS", "WRITE_ERRORS", "DoomedStudyStopper", "StudyFailed", "cause_of", "has_results",
           "no_retry_on_input_errors", "unwritable"]


def unwritable(folder: StudyFolder, reason: str) -> str:
    return (f"study folder {folder.location} became unwritable ({reason}): the study was stopped; the rows written "
            "before are in results.parquet; make the folder writable and continue with --resume")


class StudyFailed(RuntimeError):
    """No trial of the study produced a result; ``str()`` is the one-line cause."""


#: OSErrors met writing the study folder from the driver callback (driver-process registry)
WRITE_ERRORS: list[str] = []

#: Tune trial id -> one-line cause of the deterministic error it failed with (driver-process registry,
#: filled by the patched ``Trial.handle_error``, read by :class:`DoomedStudyStopper`)
INPUT_ERRORS: dict[str, str] = {}


def cause_of(error: BaseException | str | None) -> str:
    """One line saying why a trial failed: the deterministic cause when there is one, else the last
    line of Ray's error text (the exception raised in the trial). ``error`` may be the text alone (Tune's
    ``Result.error`` for a trial whose error could not be unpickled)."""
    from study.trial import input_error_of, one_line

    cause = input_error_of(error)
    if cause is not None:
        return one_line(cause)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def has_results(path: Path) -> bool:
    """Whether the results table at ``path`` (with its journal, ``study.results.read_results``) has a row."""
    from study.results import read_results

    try:
        return len(read_results(path)) > 0
    except Exception:  # noqa: BLE001 - an unreadable or missing table holds no usable result
        return False


def no_retry_on_input_errors() -> None:
    """Make Tune not retry a trial that failed with a deterministic error (``study.trial.TrialInputError``):
    its ``max_failures`` becomes 0 as its error is recorded, before Tune decides on recovery (Ray 2.60 has no
    per-error retry setting). Other failures (a killed worker or trial process) are retried as configured.
    Idempotent; driver process only."""
    from ray.tune.experiment.trial import Trial

    from study.trial import input_error_of, one_line

    if getattr(Trial.handle_error, "_brainage_no_retry", False):
        return
    original = Trial.handle_error

    def handle_error(self: Any, exc: BaseException | None = None) -> None:
        original(self, exc)
        cause = input_error_of(exc)
        if cause is not None:
            self.max_failures = 0
            INPUT_ERRORS[self.trial_id] = one_line(cause)

    handle_error._brainage_no_retry = True  # type: ignore[attr-defined]
    Trial.handle_error = handle_error


def _make_stopper_class() -> type:
    from ray.tune import Stopper

    class DoomedStudyStopperImpl(Stopper):
        """Stops the whole study when it is doomed: no trial has reported a result and the same
        deterministic error ended 2 trials (or every trial of a 1-trial study), so that it does not
        depend on the sampled parameters."""

        def __init__(self, num_samples: int):
            self.needed = min(2, max(1, int(num_samples)))
            self.reported = False

        def __call__(self, trial_id: str, result: dict) -> bool:
            if "epoch" in result:
                self.reported = True
            return False

        def stop_all(self) -> bool:
            if WRITE_ERRORS:
                return True
            if self.reported or not INPUT_ERRORS:
                return False
            counts: dict[str, int] = {}
            for cause in INPUT_ERRORS.values():
                counts[cause] = counts.get(cause, 0) + 1
            if max(counts.values()) >= self.needed:
                print(f"[study] stopping: {max(counts.values())} trial(s) failed with the same error before any "
                      "result; the study cannot succeed", file=sys.stderr, flush=True)
                return True
            return False

    return DoomedStudyStopperImpl


def DoomedStudyStopper(num_samples: int):  # noqa: N802 - a class factory (Ray imported lazily)
    """The study's Tune ``Stopper`` (see ``_make_stopper_class``)."""
    return _make_stopper_class()(num_samples)

