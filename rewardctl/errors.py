"""Errors a user can act on. The CLI prints them as one clear line and exits non-zero, without a traceback."""

from __future__ import annotations


class RewardctlError(Exception):
    """Base class for problems in the user's config, data or environment (not bugs in rewardctl)."""


class ConfigError(RewardctlError):
    """A config value is invalid; the message starts with the full key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.reason = message
        super().__init__(f"{key}: {message}")

    def __reduce__(self):
        return (ConfigError, (self.key, self.reason))


class DataError(RewardctlError):
    """A data file or row is unusable; the message names the source, the row and the field."""

    def __init__(self, source: str, message: str, *, row: int | None = None, field: str | None = None) -> None:
        self.source = source
        self.row = row
        self.field = field
        self.reason = message
        where = source
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # keeps the error intact when raised inside a datasets.map worker process
        return (_rebuild_data_error, (self.source, self.reason, self.row, self.field))


class RowError(ValueError):
    """Raised while featurising one row; the data layer adds the source and the row number."""

    def __init__(self, field: str | None, message: str) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"field '{field}': {message}" if field else message)

    def __reduce__(self):
        return (RowError, (self.field, self.reason))


def _rebuild_data_error(source: str, message: str, row: int | None, field: str | None) -> DataError:
    return DataError(source, message, row=row, field=field)


class ModelMismatchError(RewardctlError):
    """A saved model is not what the method expects (other outputs or labels). The command that
    opened it names its own key (``run_dir``, ``checkpoint``); modeling knows no command keys."""
