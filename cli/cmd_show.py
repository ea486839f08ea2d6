"""``tfreg show``: one PNG overview of a registration result."""

from __future__ import annotations

import click

from tfreg_cli.common import user_errors


@click.command("show", short_help="Write a PNG overview of a registration result.")
@click.argument("result_dir", type=click.Path(file_okay=False))
@click.option("-o", "--out", type=click.Path(dir_okay=False),
              help="PNG to write [default: RESULT_DIR/overview.png].")
@click.option("--fixed", type=click.Path(dir_okay=False),
              help="Fixed image (default: the path recorded in RESULT_DIR/report.json).")
@click.option("--moving", type=click.Path(dir_okay=False),
              help="Moving image (default: the path recorded in RESULT_DIR/report.json).")
@user_errors
def show(result_dir, out, fixed, moving):
    """Middle slices of fixed, moving and warped images, the differences before and after, the
    deformed grid and the Jacobian determinant map, from a 'tfreg register' output folder."""
    from tfreg.visualize import show_result_dir

    written = show_result_dir(result_dir, out, fixed=fixed, moving=moving)
    click.echo(f"wrote {written}")
