"""The `best` preset and the full-resolution smoothing option (no optimisation runs here)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfreg import instance
from tfreg.ops import filters


def test_best_preset_uses_a_full_resolution_field_with_ants_window():
    cfg = instance.make_config("best")
    assert cfg.field_level == 0 and cfg.levels[-1] == 0
    assert cfg.ncc_win[-1] == 9  # ANTs' CC radius 4
    # --levels 3 keeps the finest level's window and adds a coarser level with the coarsest's
    three = instance.make_config("best", levels=3)
    assert three.levels == (2, 1, 0) and three.ncc_win == (5, 5, 9)


def test_fine_sigma_smooths_only_a_full_resolution_velocity():
    """`fine_sigma` replaces `smooth_sigma` for a velocity on level 0 only: a unit impulse
    smoothed with each has the variance of three box passes of the odd width nearest
    sqrt(4 sigma^2 + 1), 3 (w^2 - 1) / 12 (the box filter's documented rule)."""
    cfg = instance.make_config("accurate", field_level=0, fine_sigma=2.0)
    assert instance._sigma(cfg, 0) == 2.0 and instance._sigma(cfg, 1) == cfg.smooth_sigma
    impulse = np.zeros((1, 41, 41, 1), np.float32)
    impulse[0, 20, 20, 0] = 1.0
    x = np.arange(41) - 20.0
    variances = []
    for vlevel, width in ((0, 5), (1, 3)):  # sigma 2 -> w 5; sigma 1 -> w 3
        out = filters.box_gaussian(tf.constant(impulse), instance._sigma(cfg, vlevel)).numpy()
        weights = out[0, :, :, 0].sum(axis=1) / out.sum()
        variances.append(float((weights * x * x).sum()))
        assert abs(variances[-1] - 3 * (width ** 2 - 1) / 12) < 1e-3, (vlevel, variances[-1])
