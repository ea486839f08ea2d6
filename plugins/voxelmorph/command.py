"""``tfreg import-voxelmorph``: convert a voxelmorph TensorFlow ``.h5`` model (VxmDense).

A top-level command provided by this plugin through the ``tfreg.commands`` entry-point group;
tfreg's command line turns its `tfreg.errors.TfregError` into one line and exit status 1.
"""

from __future__ import annotations

import click

from tfreg_cli.common import check_empty_or_owned, check_output_dir, user_errors

NORMALIZE = ("minmax", "zscore", "percentile", "none")


def _parse_args(items: tuple[str, ...]) -> dict:
    """``--arg key=value`` (value in YAML, e.g. ``inshape=[160,192,224]``) -> dict."""
    import yaml

    from tfreg.errors import ConfigError

    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--arg {item}: expected NAME=VALUE, e.g. inshape=[160,192,224]")
        try:
            out[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--arg {item}: the value is not valid YAML") from None
    return out


@click.command("import-voxelmorph",
               short_help="Convert a voxelmorph TF .h5 model (VxmDense) to a tfreg model.")
@click.argument("h5_file", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "model_dir", required=True, type=click.Path(file_okay=False),
              help="Model directory to write (for 'tfreg register --model'); replaced if it "
                   "holds an earlier export, another non-empty folder is refused.")
@click.option("--arg", "args", multiple=True, metavar="NAME=VALUE",
              help="VxmDense constructor argument replacing the stored one (YAML value), e.g. "
                   "--arg inshape=[160,192,224]. Needed for weights-only files. Repeatable.")
@click.option("--normalize", type=click.Choice(NORMALIZE), default="minmax", show_default=True,
              help="Intensity normalisation 'tfreg register' applies to inputs (voxelmorph "
                   "models expect intensities in [0, 1]).")
def import_voxelmorph(h5_file: str, model_dir: str, args: tuple[str, ...], normalize: str) -> None:
    """Convert H5_FILE, a VxmDense model saved by voxelmorph's TensorFlow code (Keras 2 HDF5),
    into a tfreg model directory. voxelmorph is not needed: the file is read with h5py.

    \b
    The stored constructor arguments (inshape, nb_unet_features, int_steps, int_resolution /
    int_downsize, svf_resolution / unet_half_res, bidir, nb_unet_conv_per_level, fill_value)
    define the network; the weights are matched by role (encoder, decoder, flow head) and
    checked shape by shape. Unsupported: use_probs, hyp_model (HyperMorph), input_model,
    src_feats/trg_feats other than 1, and classes other than VxmDense.
    """
    check_output_dir(model_dir, "-o")
    from .vxm_h5 import import_voxelmorph as run_import

    written = run_import(h5_file, model_dir, _parse_args(args), normalize=normalize)
    click.echo(f"wrote {written}")
