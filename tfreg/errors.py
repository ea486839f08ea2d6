"""Typed errors for user mistakes. The CLI prints ``str(err)`` as one line and exits non-zero.

Messages name the source first: ``"<file or option>: <problem>"``.
"""


class TfregError(Exception):
    """Base class for errors caused by user input (files, configs, options).

    `details`: lines shown before the one-line message, used when several problems are
    reported at once (see `all_problems`)."""

    details: tuple[str, ...] = ()


class InputError(TfregError):
    """A data file is missing, unreadable, or has the wrong shape, rank or values."""


class ConfigError(TfregError):
    """A config file, data spec or ``--set`` override is invalid."""


class MethodError(TfregError):
    """A registration method is unknown, failed to load, or is declared twice."""


class Interrupted(TfregError):
    """The user interrupted the work (Ctrl-C); the message says what was kept and how to go on.
    The CLI prints it on its own line and exits 130."""


def all_problems(problems: list[TfregError], summary: str) -> None:
    """Raise every problem found in one go: nothing when `problems` is empty, the problem itself
    when there is one, else an error of the first problem's type whose message is one summary
    line (`summary`, the count and the first problem) and whose `details` are the numbered
    problems (``"  1. a.nii.gz: ..."``), which the CLI prints before the summary."""
    if not problems:
        return
    if len(problems) == 1:
        raise problems[0]
    err = type(problems[0])(f"{summary}: {len(problems)} problems, listed above; the first: "
                            f"{problems[0]}")
    err.details = tuple(f"{i:>3}. {p}" for i, p in enumerate(problems, 1))
    raise err


def reason(err: BaseException) -> str:
    """Why a library call failed, for the end of a one-line message: the first line of `err`
    (at most 160 characters), or the exception's type name when it has no message."""
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__
