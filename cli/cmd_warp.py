"""``tfreg warp``: apply a displacement field to an image or label map."""

from __future__ import annotations

import click

from tfreg_cli.common import check_inputs, check_output_file, user_errors


@click.command("warp", short_help="Apply a displacement field to an image.")
@click.argument("moving", type=click.Path(dir_okay=False))
@click.argument("disp", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Output NIfTI (.nii.gz or .nii); it gets the grid and affine of DISP.")
@click.option("--nearest", is_flag=True, default=False,
              help="Nearest-neighbour interpolation, for label maps (default: linear).")
@click.option("--affine", type=click.Path(dir_okay=False),
              help="ITK/ANTs affine (.mat/.txt) applied after DISP's warp, as ANTs' "
                   "transformlist=[warp, affine].")
@click.option("--reference", type=click.Path(dir_okay=False),
              help="Fixed image defining the output grid (needed when DISP is an affine file; "
                   "a world or ITK field on another grid is resampled onto it).")
@user_errors
def warp(moving, disp, out, nearest, affine, reference):
    """Warp MOVING by DISP: out(x) = moving(x + disp(x)).

    DISP is a displacement field in voxels of its own grid (the fixed image's), channel d along
    array axis d, as written by `tfreg register` (disp.nii.gz); or a world-space field (mm, RAS),
    an ITK/ANTs warp (LPS mm; add --affine for its affine), or an ITK/ANTs affine file with
    --reference (see docs/transforms.md). MOVING may be on another grid: it is sampled through
    the two affines.
    """
    from pathlib import Path

    from tfreg.errors import InputError

    check_inputs(moving, disp, affine, reference)
    if not out.lower().endswith((".nii.gz", ".nii")):
        raise InputError(f"{out}: output must end in .nii.gz or .nii")
    check_output_file(out, "-o")
    from tfreg.register import warp_file

    if Path(disp).suffix.lower() in (".mat", ".txt", ".tfm"):
        if affine is not None:
            raise click.UsageError("--affine: DISP is already an affine file")
        disp, affine = None, disp
    written = warp_file(moving, disp, out, nearest=nearest, affine=affine, reference=reference)
    click.echo(f"wrote {written}")
