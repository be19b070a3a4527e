"""User-facing error types of the trainer: each carries a message that names the file, field or parameter."""

from __future__ import annotations


class TrainerError(Exception):
    """A user mistake (bad config, bad data, bad user code): reported as one line, never a traceback."""


class ConfigError(TrainerError):
    """An invalid training configuration value or file."""


class DataError(TrainerError):
    """A missing, corrupt or inconsistent dataset file."""


class UserCodeError(TrainerError):
    """User model or dataset code that cannot be imported or does not follow the interface."""
