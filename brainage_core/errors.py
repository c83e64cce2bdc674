"""The project's exception types.

Every error raised on bad input is one of these (all are ``ValueError`` subclasses, so callers that
expect scikit-learn-like validation errors keep working). Messages are one line: what was found,
where (file, participant id, key path, parameter), and what was expected.
"""


class BrainageError(ValueError):
    """Base class of every input error raised by brainage_core."""


class DataError(BrainageError):
    """A cohort, table or volume is unreadable or invalid (names file and participant id)."""


class StoreError(BrainageError):
    """A prepared store is missing, incomplete or inconsistent (names the store path)."""


class ConfigError(BrainageError):
    """A configuration or search-space file is invalid (names the full key path)."""


class LossError(BrainageError):
    """A loss received an invalid parameter or batch (names the parameter and value)."""


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss (names epoch, step and value)."""
