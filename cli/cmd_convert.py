"""``tfreg convert``: a transform from one convention to another (tfreg, world mm, ITK/ANTs, L2R)."""

from __future__ import annotations

import click

from tfreg_cli.common import check_output_file, user_errors

FORMATS = ("tfreg", "world", "itk", "l2r")


@click.command("convert", short_help="Convert a displacement field between conventions.")
@click.argument("source", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--to", "to", type=click.Choice(FORMATS), required=True,
              help="Output convention: tfreg (voxels of the fixed grid, array axes, pull), "
                   "world (mm, RAS, fixed grid), itk (mm, LPS, 5D vector NIfTI as "
                   "antsApplyTransforms reads it), l2r (Learn2Reg: voxels, float16 precision).")
@click.option("--reference", type=click.Path(dir_okay=False),
              help="The fixed image: the output grid (needed for an affine alone; a world or "
                   "ITK field on another grid is resampled onto it).")
@click.option("--affine", type=click.Path(dir_okay=False),
              help="ITK/ANTs affine (.mat/.txt) applied after SOURCE's warp, as ANTs' "
                   "transformlist=[warp, affine]; composed into the output field.")
@user_errors
def convert(source, out, to, reference, affine):
    """Convert the transform SOURCE and write it to OUT in the convention --to.

    SOURCE is a displacement field: tfreg's disp.nii.gz (or a Learn2Reg file), a world-space
    field written by tfreg, or an ITK/ANTs warp ((X,Y,Z,1,3) vector NIfTI, LPS mm); or an
    ITK/ANTs affine file (.mat/.txt, with --reference). The format of SOURCE is detected from
    its layout; see docs/transforms.md.

    \b
    tfreg convert out/disp.nii.gz disp_world.nii.gz --to world
    tfreg convert out/disp.nii.gz warp_itk.nii.gz --to itk
    tfreg convert 1Warp.nii.gz disp.nii.gz --to tfreg --reference fixed.nii.gz --affine 0GenericAffine.mat
    """
    from pathlib import Path

    check_output_file(out, "OUT")  # inputs: read_transform names a missing or unusable one
    from tfreg import transforms_io as tio

    field, affine_file = source, affine
    if Path(source).suffix.lower() in (".mat", ".txt", ".tfm"):
        if affine is not None:
            raise click.UsageError("--affine: SOURCE is already an affine file")
        field, affine_file = None, source
    transform = tio.read_transform(field, affine=affine_file, reference=reference)
    written = tio.save_field(out, transform.data, transform.affine, to)
    click.echo(f"wrote {written} ({to})")
