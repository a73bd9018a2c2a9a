"""Errors that mmpo reports to the user as one clear paragraph (never a traceback)."""

from __future__ import annotations


class MMPOError(Exception):
    """Base class for errors caused by the user's input (config, data, files)."""


class ConfigError(MMPOError, ValueError):
    """A config file or override is wrong: unknown key, wrong type, missing file, ..."""


class UnknownNameError(ConfigError):
    """A registry lookup with a name that is not registered."""


class DataError(MMPOError, ValueError):
    """A data file or row does not fit the expected layout."""


class TrainingError(MMPOError, RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row)."""


class CheckpointError(MMPOError, RuntimeError):
    """A checkpoint or model folder is damaged (a file truncated, missing or changed since it was written)."""
