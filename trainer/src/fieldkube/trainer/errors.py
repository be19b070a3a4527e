"""User-facing error types of the trainer: each carries a message that names the file, field or parameter."""

from __future__ import annotations

from fieldkube.contract.errors import ConfigError, TrainerError

__all__ = ["ConfigError", "DataError", "TrainerError", "UserCodeError"]


class DataError(TrainerError):
    """A missing, corrupt or inconsistent dataset file."""


class UserCodeError(TrainerError):
    """User model or dataset code that cannot be imported or does not follow the interface."""
