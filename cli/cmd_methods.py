"""``tfreg methods``: list the installed registration methods."""

from __future__ import annotations

import click

from tfreg_cli.common import user_errors


def format_table(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns separated by two spaces (no trailing spaces)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


@click.command("methods", short_help="List the installed registration methods.")
@user_errors
def methods() -> None:
    """List the registration methods found in the 'tfreg.methods' entry-point group.

    Prints a table of name, one-line description, and the distribution (and its version) that
    provides each method. tfreg's built-in methods and third-party plugins are found the same way.
    Methods whose plugin failed to load are listed after the table with the reason; the others
    still work. Exits 0 whenever the listing itself succeeds.
    """
    from tfreg.registry import discover

    registry = discover()
    if registry.methods:
        rows = [("NAME", "DESCRIPTION", "DISTRIBUTION", "VERSION")]
        for name in registry.names():
            loaded = registry.methods[name]
            rows.append((name, loaded.method.summary, loaded.dist_name, loaded.dist_version))
        for line in format_table(rows):
            click.echo(line)
    else:
        click.echo("no methods installed")
    if registry.failures:
        click.echo("")
        click.echo("failed to load:")
        for name in sorted(registry.failures):
            click.echo(f"  {name}: {registry.failures[name]}")
