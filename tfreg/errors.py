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


def reason(err: BaseException) -> str:
    """Why a library call failed, for the end of a one-line message: the first line of `err`
    (at most 160 characters), or the exception's type name when it has no message."""
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__
