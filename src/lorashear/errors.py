"""Exceptions that mean "the user asked for something we cannot do".

The CLI turns a :class:`LorashearError` into a one-line message on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LorashearError(Exception):
    """Base class for errors caused by bad input or an unusable environment."""


class ModelNotFoundError(LorashearError):
    """A model name or path could not be resolved to loadable weights."""


class DataError(LorashearError):
    """A data source could not be read or produced no usable text."""


class ConfigError(LorashearError):
    """A configuration value is out of range or inconsistent."""


class UnsupportedArchitectureError(LorashearError):
    """Structure discovery met an operator or module it cannot reason about."""


class NotImplementedYetError(LorashearError):
    """A planned subcommand that does not exist yet."""


class CheckpointError(LorashearError):
    """A checkpoint is corrupt, incomplete, or belongs to another run."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is missing, truncated or unreadable (an earlier checkpoint may still be usable)."""


class OutputError(LorashearError):
    """The output directory cannot be used: a file, not writable, someone else's files, or in use."""
