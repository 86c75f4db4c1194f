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


class PeerError(FmtuneError):
    """Rank 0 of a launched run stopped with an error it printed; another rank stops with it, silently."""


class Interrupted(FmtuneError):
    """The user stopped training (Ctrl-C); the message says how to resume."""


class TrainingError(FmtuneError):
    """Training cannot continue (for example the loss became NaN)."""


def brief(error: BaseException, limit: int = 400) -> str:
    """An exception's text for a message, cut at ``limit`` characters (transformers lists every model
    class it knows in some errors: thousands of characters that hide the one line that matters)."""
    text = str(error)
    return text if len(text) <= limit else text[:limit].rstrip() + " ..."
