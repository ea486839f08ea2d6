"""Augmentation cannot fold: many random draws at the validated limit, Jacobian determinant > 0.

The bound (tfreg.data.augment module doc) is derived, not fitted; these draws check it with the
Jacobian determinant of `tfreg.metrics` (central differences) and show that the test can fail:
at twice the bound, and at the old limit (max_disp < spacing / 2), draws do fold.
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfreg.data.augment import Augmentation, fold_bound, random_disp
from tfreg.metrics import jacobian_determinant


def _min_det(shape, aug, draws, seed=0):
    worst = np.inf
    for k in range(draws):
        disp = random_disp(shape, aug, tf.constant([seed, k], tf.int64)).numpy()[0]
        worst = min(worst, float(jacobian_determinant(disp).min()))
    return worst


CASES = {  # ndims: (shape, draws)
    2: ((40, 36), 40),
    3: ((20, 18, 16), 8),
}


@pytest.mark.parametrize("ndims", [2, 3])
def test_validated_settings_never_fold(ndims):
    shape, draws = CASES[ndims]
    # strongest affine settings with a deformation just inside the bound
    for spacing, scale, shear in ((6.0, 0.0, 0.0), (8.0, 0.2, 0.15)):
        bound = fold_bound(ndims, spacing, scale, shear)
        aug = Augmentation.from_dict({"affine": {"rotate": 30, "scale": scale, "shear": shear},
                                      "deform": {"max_disp": 0.99 * bound, "spacing": spacing}},
                                     "test", ndims=ndims)
        assert _min_det(shape, aug, draws) > 0


@pytest.mark.parametrize("ndims", [2, 3])
def test_beyond_the_bound_folds(ndims):
    shape, draws = CASES[ndims]
    with pytest.raises(Exception, match="max_disp: must be <"):
        Augmentation.from_dict({"deform": {"max_disp": 3.9, "spacing": 8}}, "test", ndims=ndims)
    # the old limit, accepted before: spacing 8, max_disp 3.9 (constructed past validation)
    assert _min_det(shape, Augmentation(max_disp=3.9, spacing=8), draws) <= 0
    if ndims == 2:
        # twice the derived bound with a strong shear folds too: the bound is not vacuous (in 3D
        # the worst case is rarely drawn, so 12 draws need not find it)
        aug = Augmentation(max_disp=2 * fold_bound(ndims, 8.0, 0.0, 0.3), spacing=8.0, shear=0.3)
        assert _min_det(shape, aug, draws) <= 0


def test_short_axis_shrinks_the_amplitude():
    # a 5-voxel axis with spacing 8 has one control cell of 4 voxels: amplitude x 4/8
    aug = Augmentation(max_disp=1.0, spacing=8.0)
    disp = random_disp((5, 40), aug, tf.constant([3, 4], tf.int64)).numpy()
    assert np.abs(disp).max() <= 0.5 + 1e-6
