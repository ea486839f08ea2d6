"""Helpers shared by the CLI commands."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from tfreg.errors import TfregError


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for command callbacks: a `TfregError` (a user mistake) becomes one clear line on
    stderr and exit status 1, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TfregError as err:
            raise click.ClickException(str(err)) from None

    return wrapper
