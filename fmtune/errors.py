"""Exceptions a user can cause. Each message names the file, row, column or key at fault."""


class FmtuneError(Exception):
    """Base class: the CLI prints these as one clear message, without a traceback."""


class ConfigError(FmtuneError):
    """A config key is unknown, has the wrong type or an invalid value."""


class DataError(FmtuneError):
    """An input file is missing, empty, malformed, or its contents do not fit the task."""


class ModelError(FmtuneError):
    """A model name or path cannot be resolved or loaded."""


class RunDirError(FmtuneError):
    """A run directory is missing, incomplete, or would be overwritten."""


class Interrupted(FmtuneError):
    """The user stopped training (Ctrl-C); the message says how to resume."""


class TrainingError(FmtuneError):
    """Training cannot continue (for example the loss became NaN)."""
