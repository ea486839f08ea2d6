"""``tfreg show``: one figure (PNG, JPEG, PDF or SVG) overview of a registration result."""

from __future__ import annotations

import click

from tfreg_cli.common import check_inputs, check_output_file, user_errors


@click.command("show", short_help="Write a figure overview of a registration result.")
@click.argument("result_dir", type=click.Path(file_okay=False))
@click.option("-o", "--out", type=click.Path(dir_okay=False),
              help="Figure to write; its suffix picks the format: .png, .jpg, .pdf or .svg "
                   "[default: RESULT_DIR/overview.png].")
@click.option("--fixed", type=click.Path(dir_okay=False),
              help="Fixed image (default: the path recorded in RESULT_DIR/report.json, relative "
                   "to that folder).")
@click.option("--moving", type=click.Path(dir_okay=False),
              help="Moving image (default: the path recorded in RESULT_DIR/report.json, relative "
                   "to that folder).")
@user_errors
def show(result_dir, out, fixed, moving):
    """Middle slices of fixed, moving and warped images, the differences before and after, the
    deformed grid and the Jacobian determinant map, from a 'tfreg register' output folder."""
    from pathlib import Path

    from tfreg.errors import InputError
    from tfreg.visualize import image_format, show_result_dir

    if not Path(result_dir).is_dir():
        raise InputError(f"{result_dir}: not a folder (expected the output folder of "
                         "'tfreg register')")
    check_inputs(fixed, moving)
    target = Path(out) if out else Path(result_dir) / "overview.png"
    image_format(target)
    check_output_file(target, "-o")
    written = show_result_dir(result_dir, target, fixed=fixed, moving=moving)
    click.echo(f"wrote {written}")
