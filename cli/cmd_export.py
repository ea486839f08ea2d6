"""``tfreg export``: turn a training run into a self-contained model directory."""

from __future__ import annotations

import click

from tfreg_cli.common import check_empty_or_owned, check_output_dir, user_errors


@click.command("export", short_help="Export a trained run as a TF SavedModel.")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "model_dir", required=True, type=click.Path(file_okay=False),
              help="Model directory to write (replaced if it holds an earlier export; another "
                   "non-empty folder is refused).")
@click.option("--checkpoint", type=str, metavar="PREFIX",
              help="Export this checkpoint (e.g. RUN_DIR/checkpoints/ckpt-500) instead of the "
                   "final weights [default: model.weights.h5, else the newest checkpoint].")
@user_errors
def export(run_dir: str, model_dir: str, checkpoint: str | None) -> None:
    """Export the model trained in RUN_DIR into the model directory given by -o.

    \b
    MODEL_DIR gets:
      saved_model/      TF SavedModel, loadable without tfreg (tf.saved_model.load):
                          register(fixed, moving) -> {warped, displacement}
                          warp(image, displacement) -> {warped}  (nearest, for labels)
                        inputs float32 (B, *S, 1) at the training shape S; displacement
                        (B, *S, N) in voxels of the fixed grid, pull convention
                        warped(x) = moving(x + displacement(x))
      model.keras       the Keras model (needs tfreg and the method's plugin)
      model.weights.h5  its weights
      config.yaml       the run's resolved config
      tfreg_model.json  method, input shape, preprocessing, versions

    The model is rebuilt in float32 whatever precision it was trained with. The write is
    atomic: MODEL_DIR appears complete or not at all.
    """
    check_empty_or_owned(model_dir, ("tfreg_model.json",), "-o", "model folder")
    check_output_dir(model_dir, "-o")
    from tfreg.export import export as run_export

    written = run_export(run_dir, model_dir, checkpoint=checkpoint)
    click.echo(f"wrote {written}")
