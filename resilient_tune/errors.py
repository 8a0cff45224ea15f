"""Exceptions raised by resilient-tune.

Every error message names the thing, the value and the fix. The CLI maps :class:`UsageError` to exit
status 2 (the arguments are wrong) and every other :class:`ResilientTuneError` to exit status 1 (the
inputs could not be merged).
"""

from __future__ import annotations

__all__ = [
    "CheckpointFormatError",
    "IncompatibleModelsError",
    "NonFiniteError",
    "ResilientTuneError",
    "UsageError",
]


class ResilientTuneError(Exception):
    """Base class of every error resilient-tune raises on purpose."""


class UsageError(ResilientTuneError, ValueError):
    """An argument is invalid: wrong count, out of range, unknown name, destination exists, ..."""


class CheckpointFormatError(ResilientTuneError, ValueError):
    """A checkpoint file is missing, truncated, malformed or in a format that needs an opt-in."""


class IncompatibleModelsError(ResilientTuneError, ValueError):
    """The models cannot be merged: different keys, shapes or architectures."""


class NonFiniteError(ResilientTuneError, ValueError):
    """A tensor (input or result) holds NaN or Inf."""
