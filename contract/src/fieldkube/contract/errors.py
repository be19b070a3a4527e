"""The trainer's user-error types that the contract raises too: one line for the user, never a traceback."""

from __future__ import annotations


class TrainerError(Exception):
    """A user mistake (bad config, bad data, bad user code): reported as one line, never a traceback."""


class ConfigError(TrainerError):
    """An invalid training configuration value, file or document."""
