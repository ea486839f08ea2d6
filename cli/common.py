"""Helpers shared by the CLI commands: one-line errors, interrupts, and the checks every command
runs before it imports TensorFlow or computes anything.

Every command callback is decorated with `user_errors`, which turns

- a `TfregError` (a user mistake) into ``Error: <one line>`` and exit status 1,
- an `OSError` (a file that cannot be read or written, a full disk) into
  ``Error: <path>: <reason>`` and exit status 1,
- Ctrl-C (`KeyboardInterrupt`) or `tfreg.errors.Interrupted` into a message on its own line and
  exit status 130,

so no user mistake or interrupt ever shows a traceback. Before any work, a command checks its
inputs with `check_inputs` and its outputs with `check_output_file` / `check_output_dir`
(`tfreg.outputs`), so a mistake is answered before TensorFlow is imported.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from tfreg.errors import InputError, Interrupted, TfregError
from tfreg.outputs import (check_empty_or_owned, check_output_dir, check_output_file,
                           os_error_line)

__all__ = ["user_errors", "check_inputs", "check_input_dirs", "check_output_file", "check_output_dir",
           "check_empty_or_owned",
           "INTERRUPT_EXIT"]

#: exit status after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPT_EXIT = 130


class _InterruptExit(click.ClickException):
    """Printed on its own line; exit status 130."""

    exit_code = INTERRUPT_EXIT

    def show(self, file: Any = None) -> None:
        stream = file or sys.stderr
        if stream.isatty():  # a progress bar may hold the cursor mid-line
            click.echo("", file=stream)
        click.echo(self.format_message(), file=stream)


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for command callbacks: user mistakes, file-system errors and Ctrl-C become one
    clear line on stderr (exit 1, or 130 for an interrupt), never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Interrupted as err:
            raise _InterruptExit(str(err)) from None
        except KeyboardInterrupt:
            raise _InterruptExit("interrupted (Ctrl-C)") from None
        except TfregError as err:
            for line in err.details:  # several problems reported at once: listed first
                click.echo(line, err=True)
            raise click.ClickException(str(err)) from None
        except OSError as err:
            raise click.ClickException(os_error_line(err)) from None

    return wrapper


def check_inputs(*paths: str | Path | None) -> None:
    """Check that each given input file exists and is readable (None = not given), quickly:
    no file is opened by a NIfTI reader and nothing heavy is imported.

    Raises:
        InputError: ``"missing.nii.gz: file not found"``, ``"scans: is a folder, not a file"``.
    """
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: file not found")
        if path.is_dir():
            raise InputError(f"{path}: is a folder, not a file")
        if not os.access(path, os.R_OK):
            raise InputError(f"{path}: cannot be read (permission denied)")


def check_input_dirs(*paths: str | Path | None) -> None:
    """Check that each given input folder (e.g. ``--model``) exists (None = not given).

    Raises:
        InputError: ``"models/vxm: folder not found"``, ``"model.keras: is a file, not a folder"``.
    """
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: folder not found")
        if not path.is_dir():
            raise InputError(f"{path}: is a file, not a folder")


class _EchoHandler(logging.Handler):
    """Log records of the "tfreg" logger as ``warning: <message>`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


def show_warnings() -> None:
    """Show warnings of tfreg's core (the "tfreg" logger, e.g. a label map whose header differs
    slightly from its image's) as one line each on stderr. Idempotent."""
    logger = logging.getLogger("tfreg")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler(logging.WARNING))
        logger.propagate = False
