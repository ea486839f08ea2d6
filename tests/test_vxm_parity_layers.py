"""tfreg.layers defaults reproduce voxelmorph's TensorFlow layers (stored reference outputs).

The reference arrays were produced by voxelmorph 0.2 (see the fixture folder's README); tfreg never
imports voxelmorph. Tolerance: 1e-5 relative to the reference's largest magnitude (at least 1e-5
absolute), i.e. float32 rounding of coordinates and values of a few tens of voxels.
"""

from __future__ import annotations

import numpy as np
import pytest

from tfreg import layers as L


@pytest.fixture(scope="module", params=["layers_2d", "layers_3d"])
def ref(request, vxm_fixtures):
    with np.load(vxm_fixtures / f"{request.param}.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _close(got, want):
    got = np.asarray(got)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def test_affine_is_full_matrix_not_residual(ref):
    # the stored affine has a diagonal near 1: voxelmorph's matrix includes the identity
    ndims = ref["affine"].shape[1]
    np.testing.assert_allclose(np.diag(ref["affine"][0, :, :ndims]), 1.0, atol=0.2)


def test_spatial_transformer_linear(ref):
    _close(L.SpatialTransformer()([ref["img"], ref["disp"]]), ref["st_linear"])
    _close(L.SpatialTransformer()([ref["img2"], ref["disp"]]), ref["st_linear_2ch"])


def test_spatial_transformer_nearest(ref):
    got = np.asarray(L.SpatialTransformer("nearest")([ref["lab"], ref["disp"]]))
    np.testing.assert_array_equal(got, ref["st_nearest"])
    # integer label maps give the same labels
    got = np.asarray(L.SpatialTransformer("nearest")([ref["lab"].astype("int32"), ref["disp"]]))
    np.testing.assert_array_equal(got, ref["st_nearest"].astype("int32"))


def test_spatial_transformer_affine_shift_center(ref):
    _close(L.SpatialTransformer()([ref["img"], ref["affine"]]), ref["st_affine_shift_center"])


def test_spatial_transformer_fill_value(ref):
    _close(L.SpatialTransformer(fill_value=0)([ref["img"], 3 * ref["disp"]]), ref["st_fill0"])


def test_vecint_ss7(ref):
    _close(L.VecInt(7)(ref["vel"]), ref["vecint_ss7"])


@pytest.mark.parametrize("factor", [0.5, 2])
def test_rescale_transform(ref, factor):
    _close(L.RescaleTransform(factor)(ref["disp"]), ref[f"rescale_{factor}"])
    # the "origin" grid is a different (documented) choice: it must not match
    got = np.asarray(L.RescaleTransform(factor, align="origin")(ref["disp"]))
    assert np.abs(got - ref[f"rescale_{factor}"]).max() > 0.1


def test_compose_transform(ref):
    # voxelmorph ComposeTransform()([disp, vel]): apply disp first, then vel
    _close(L.ComposeTransform()([ref["disp"], ref["vel"]]), ref["compose_disp_disp"])


def test_affine_to_field_shift_center(ref):
    shape = ref["img"].shape[1:-1]
    _close(L.AffineToField(shape)(ref["affine"]), ref["affine_to_dense_shift_center"])
