"""tfreg's default losses reproduce voxelmorph's TF losses on stored reference outputs (2D and 3D).

The fixture README names the voxelmorph call behind each stored value. voxelmorph returns one value
per batch entry (shape (1,)); tfreg returns the batch mean (a scalar), identical for batch size 1 —
the last test shows that difference with a batch of two.
"""

from __future__ import annotations

import numpy as np
import pytest

from tfreg import losses

# float32 window sums in a different order (separable pooling vs voxelmorph's dense convolution):
# agreement to ~1e-6 measured, 1e-5 allowed.
ATOL = 1e-5


@pytest.fixture(scope="module", params=["layers_2d.npz", "layers_3d.npz"])
def ref(request, vxm_fixtures):
    with np.load(vxm_fixtures / request.param, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def test_ncc_win9(ref):
    got = float(losses.NCC()(ref["img"], ref["st_linear"]))  # defaults: win 9, squared, clamp, eps 1e-5
    assert got == pytest.approx(float(ref["loss_ncc_win9"][0]), abs=ATOL)


def test_mse(ref):
    assert float(losses.MSE()(ref["img"], ref["st_linear"])) == pytest.approx(float(ref["loss_mse"]), abs=ATOL)


@pytest.mark.parametrize("key,penalty,mult", [("loss_grad_l1", "l1", 1), ("loss_grad_l2", "l2", 1),
                                              ("loss_grad_l2_mult2", "l2", 2)])
def test_grad(ref, key, penalty, mult):
    got = float(losses.Grad(penalty, loss_mult=mult)(None, ref["disp"]))
    assert got == pytest.approx(float(ref[key][0]), abs=ATOL)


def test_grad_default_penalty_is_l1_as_voxelmorph(ref):
    assert float(losses.Grad()(None, ref["disp"])) == pytest.approx(float(ref["loss_grad_l1"][0]), abs=ATOL)


def test_soft_dice(ref):
    # the reference one-hot covers labels 0..3 (background included), as voxelmorph's script did
    got = float(losses.Dice()(losses.one_hot(ref["lab"], 4), losses.one_hot(ref["st_nearest"], 4)))
    assert got == pytest.approx(float(ref["loss_dice_soft"]), abs=ATOL)


def test_batch_reduction_differs_deliberately(ref):
    """voxelmorph's NCC gives per-sample values; tfreg averages them over the batch.

    Sample 0 is the fixture pair (voxelmorph's value); sample 1 pairs the image with itself,
    whose squared local correlation is 1 in every window (flat windows too: both clamps give
    eps^2 / eps^2), so its loss is -1. NCC is symmetric, so the two samples must differ in
    content, not only in order, for the mean to be distinguishable from either sample.
    """
    img, moved = ref["img"], ref["st_linear"]
    batch_true = np.concatenate([img, img], 0)
    batch_pred = np.concatenate([moved, img], 0)
    want = (float(ref["loss_ncc_win9"][0]) + -1.0) / 2
    assert float(losses.NCC()(batch_true, batch_pred)) == pytest.approx(want, abs=ATOL)
