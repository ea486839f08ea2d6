"""`tfreg register --model`: a model whose output is a known affine field, mapped back through
crop/pad and spacing resampling, against the same field computed independently on the original
grid (NumPy geometry of the documented preprocessing, SciPy resampling).

Preprocessing geometry (docs/data.md, `fit: center`): model voxel ``y`` sits at original voxel
``z y + t`` with ``z = model spacing / original spacing`` and ``t = (S_orig - 1)/2 - z (S - 1)/2``
(rounded down to whole voxels when ``z = 1``: a pure crop/pad). A model displacement ``u'(y)`` in
model voxels is, on the original grid, ``u(x) = z u'((x - t) / z)``.
"""
from __future__ import annotations

import json

import keras
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from scipy import ndimage

from tfreg.export import MODEL_INFO, _Exported
from tfreg.ops.fields import affine_to_disp
from tfreg.ops.sampling import warp
from tfreg.registry import ModelIO
from tfreg_cli.main import cli

INSHAPE = (16, 16, 16)
#: the model's field: a centred affine with rotation/shear/scale and a translation (voxels)
MATRIX = np.array([[1.08, 0.10, -0.05], [-0.07, 0.95, 0.06], [0.04, -0.08, 1.03]])
SHIFT = np.array([1.5, -1.0, 0.75])


class KnownAffine(keras.Model):
    """Ignores its inputs' content: disp = the field of MATRIX/SHIFT on the 16^3 model grid."""

    def call(self, inputs, training=False):
        fixed = inputs["fixed"]
        affine = np.concatenate([MATRIX, SHIFT[:, None]], 1).astype("float32")[None]
        disp = affine_to_disp(tf.tile(tf.constant(affine), [tf.shape(fixed)[0], 1, 1]), INSHAPE)
        return {"disp": disp, "warped": warp(inputs["moving"], disp)}


def _model_field(y: np.ndarray) -> np.ndarray:
    """u'(y) for model voxel positions `y` `(..., 3)` (independent NumPy formula)."""
    c = (np.asarray(INSHAPE) - 1) / 2
    return (y - c) @ MATRIX.T + SHIFT + c - y


@pytest.fixture(scope="module")
def known_model(tmp_path_factory):
    def write(spacing):
        root = tmp_path_factory.mktemp("known")
        module = _Exported(KnownAffine(), INSHAPE, ModelIO(), {})
        tf.saved_model.save(module, str(root / "saved_model"),
                            signatures={"register": module.register, "warp": module.warp})
        prep = {"shape": list(INSHAPE), "spacing": spacing, "fit": "center", "normalize": "minmax"}
        (root / MODEL_INFO).write_text(json.dumps({"method": "voxelmorph", "inshape": list(INSHAPE),
                                                   "ndims": 3, "preprocessing": prep}))
        (root / "config.yaml").write_text("method: voxelmorph\n")
        return root
    return write


@pytest.mark.parametrize("case", ["crop_pad", "spacing"])
def test_known_field_reaches_the_original_grid(known_model, tmp_path, case):
    rng = np.random.default_rng(0)
    shape = (21, 13, 18)  # larger and smaller than the model grid
    voxel = 1.0 if case == "crop_pad" else 1.25
    spacing = None if case == "crop_pad" else [2.0, 2.0, 2.0]
    image = ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32)
    affine = np.diag([voxel, voxel, voxel, 1.0])
    for name in ("fixed", "moving"):
        nib.save(nib.Nifti1Image(image, affine), str(tmp_path / f"{name}.nii.gz"))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["register", str(tmp_path / "fixed.nii.gz"),
                                      str(tmp_path / "moving.nii.gz"), "--model",
                                      str(known_model(spacing)), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    disp = np.asarray(nib.load(str(out / "disp.nii.gz")).dataobj)
    warped = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj)

    zoom = 1.0 if spacing is None else 2.0 / voxel
    t = (np.asarray(shape) - 1) / 2 - zoom * (np.asarray(INSHAPE) - 1) / 2
    if zoom == 1.0:
        t = np.floor(t)
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    y = (x - t) / zoom
    want = zoom * _model_field(y)
    inside = np.all((y >= 0) & (y <= np.asarray(INSHAPE) - 1), axis=-1)
    assert inside.mean() > 0.3 and np.abs(want[inside]).max() > 1.5  # a real test, not ~zero
    np.testing.assert_allclose(disp[inside], want[inside], atol=1e-3)
    # the moving image sampled once through the expected field (SciPy)
    coords = np.moveaxis(x + want, -1, 0)
    expect = ndimage.map_coordinates(image.astype(np.float64), coords, order=1, mode="nearest")
    np.testing.assert_allclose(warped[inside], expect[inside], atol=1e-4)
