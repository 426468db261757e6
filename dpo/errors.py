"""Errors caused by the user's config, data or files.

`train.py` prints these as one line and exits non-zero, with no traceback: the message
itself must name the key, file or row at fault and say how to fix it.
"""


class UserError(Exception):
    """Bad input from the user (config, data or checkpoint), explained in one sentence."""


class ConfigError(UserError):
    """A config value is missing, unknown or out of range."""


class DataError(UserError):
    """A dataset is missing, malformed or unusable."""


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


class RunDirError(UserError):
    """The run directory cannot be created, written, or is already in use."""


class TrainingError(UserError):
    """Training went bad (a non-finite loss or gradient) and was stopped before it could do harm."""

