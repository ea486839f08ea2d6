"""Typed errors for user mistakes. The CLI prints ``str(err)`` as one line and exits non-zero.

Messages name the source first: ``"<file or option>: <problem>"``.
"""


class TfregError(Exception):
    """Base class for errors caused by user input (files, configs, options)."""


class InputError(TfregError):
    """A data file is missing, unreadable, or has the wrong shape, rank or values."""


class ConfigError(TfregError):
    """A config file, data spec or ``--set`` override is invalid."""


class MethodError(TfregError):
    """A registration method is unknown, failed to load, or is declared twice."""
