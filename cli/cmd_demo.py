"""``tfreg demo``: register a built-in sample pair end to end, offline."""

from __future__ import annotations

import click

from tfreg_cli.cmd_register import StageProgress
from tfreg_cli.common import check_output_dir, user_errors


@click.command("demo", short_help="Register a built-in sample pair (offline) and show it.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="tfreg-demo",
              show_default=True, help="Folder for the sample inputs, the outputs and the PNG.")
@click.option("--preset", type=click.Choice(["accurate", "fast"]), default="accurate",
              show_default=True, help="Instance-optimisation preset.")
@click.option("--size", type=click.IntRange(24, 256), default=64, show_default=True,
              help="Size of the sample volumes: SIZE x 1.125*SIZE x SIZE voxels of 1.5 mm.")
@click.option("--device", default=None, metavar="cpu|gpu|gpu:N",
              help="Where to compute (default: a GPU if TensorFlow sees one, else the CPU).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@user_errors
def demo(out_dir, preset, size, device, quiet):
    """Build a synthetic brain-like pair with label maps, register it without a trained model,
    score it (Dice per structure before and after, folding) and write an overview PNG."""
    check_output_dir(out_dir, "-o")
    from tfreg.demo import format_demo, run_demo

    progress = StageProgress(enabled=not quiet)
    try:
        shape = (size, int(round(size * 1.125)), size)
        summary = run_demo(out_dir, preset=preset, shape=shape, device=device, progress=progress,
                           echo=lambda text: click.echo(text, err=True))
    finally:
        progress.close()
    click.echo(format_demo(summary))
