"""The project's own error types. Every module imports them from here (nothing imports the CLI).

* :class:`SSBSNError` — the base; ``ssbsn`` (the command) reports it as one line.
* :class:`UserError` — a problem with what the user asked for (a bad option, an existing
  output, a folder that cannot be written). A ``ValueError``, so callers that catch
  ``ValueError`` keep working.
* :class:`UsageError` — a command line that cannot be served as written (an option out of its
  range, options that contradict each other, a missing argument): ``ssbsn`` exits with 2.
* :class:`CheckpointError`, :class:`ImageError`, :class:`DataError`, :class:`ConfigError` — a
  checkpoint, an image, a dataset or a saved configuration that cannot be used.
* :class:`TrainingDiverged` — the loss or the weights became NaN or Inf (a ``RuntimeError``).
* :class:`StorageError` — a file could not be written (the disk is full, ...): an ``OSError``
  whose message names the file and what was kept.
"""
from __future__ import annotations


class SSBSNError(Exception):
    """Base of the errors that mean "this input or request cannot be served", not a bug."""


class UserError(SSBSNError, ValueError):
    """A problem with what the user asked for."""


class UsageError(UserError):
    """A command line (or call) whose options are out of range or contradict each other."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model."""


class ImageError(UserError):
    """An image that cannot be read, written or used."""


class DataError(UserError):
    """A dataset file or folder that is not in the expected layout."""


class ConfigError(UserError):
    """A model or training configuration with unknown keys, wrong types or values out of range."""


class TrainingDiverged(SSBSNError, RuntimeError):
    """The loss or the weights became NaN or Inf; the run stops, its checkpoints stay good."""


class StorageError(SSBSNError, OSError):
    """A file could not be written; ``errno`` is the system's reason (e.g. ``errno.ENOSPC``)."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno

    def __str__(self) -> str:
        return self.args[0]


__all__ = ["CheckpointError", "ConfigError", "DataError", "ImageError", "SSBSNError",
           "StorageError", "TrainingDiverged", "UsageError", "UserError"]
