"""Instance optimisation (`tfreg.instance`) on tiny synthetic volumes with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from tfreg import instance
from tfreg.errors import ConfigError, InputError
from tfreg.metrics import dice, folding_percent, mean_dice
from tfreg.synthetic import phantom, smooth_random_field, warp_numpy

SHAPE3 = (32, 32, 32)
#: a short schedule for tests (32^3 runs it at half and full resolution), compiled once per shape.
QUICK = dict(levels=(2, 1), iterations=(40, 30), affine_iterations=30)


def _quick(**changes) -> instance.InstanceConfig:
    return instance.make_config("fast", **{**QUICK, **changes})


def _rigid_affine(shape, degrees: float, shift) -> np.ndarray:
    """Centred `(N, N+1)` affine: rotation in the plane of axes 0 and 1, then `shift` (voxels)."""
    ndims = len(shape)
    a = np.deg2rad(degrees)
    mat = np.eye(ndims)
    mat[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return np.concatenate([mat, np.asarray(shift, float)[:, None]], axis=1)


def _affine_disp(shape, affine) -> np.ndarray:
    """Dense displacement of a centred affine, computed here in NumPy (independent of tfreg)."""
    ndims = len(shape)
    c = (np.asarray(shape) - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    moved = (grid - c) @ affine[:, :ndims].T + affine[:, ndims] + c
    return (moved - grid).astype(np.float32)


def test_identical_images_give_a_near_zero_field():
    image, _ = phantom(SHAPE3)
    result = instance.register_arrays(image, image, _quick())
    # sub-voxel everywhere (measured: max 0.34, mean 0.16 voxel; local NCC of nearly flat windows
    # still pulls a little)
    norm = np.linalg.norm(result.disp, axis=-1)
    assert norm.max() < 0.5 and norm.mean() < 0.2, (norm.max(), norm.mean())
    np.testing.assert_allclose(result.affine, np.eye(3, 4), atol=0.02)
    assert result.similarity > 0.98


def test_known_smooth_deformation_is_recovered():
    rng = np.random.default_rng(3)
    fixed, fixed_labels = phantom(SHAPE3, rng, jitter=0.0)
    truth = smooth_random_field(SHAPE3, max_disp=7.0, smoothness=5.0, rng=rng)
    # moving(y) = fixed(y - truth(y)), so moving(x + truth(x)) ~ fixed(x) for a smooth, small
    # field: the registration should find disp ~ truth
    moving = warp_numpy(fixed, -truth, order=1)
    moving_labels = warp_numpy(fixed_labels, -truth, order=0)
    before = mean_dice(dice(fixed_labels, moving_labels))
    result = instance.register_arrays(fixed, moving, _quick(iterations=(60, 60)))
    warped_labels = warp_numpy(moving_labels, result.disp, order=0)
    after = mean_dice(dice(fixed_labels, warped_labels))
    # measured: before 0.88, after 0.93
    assert after > before + 0.03, (before, after)
    assert after > 0.9
    assert folding_percent(result.disp) < 0.1
    # the field itself, where the image has structure (labels > 0): mean error vs truth
    inside = fixed_labels > 0
    err = np.linalg.norm(result.disp - truth, axis=-1)[inside].mean()
    size = np.linalg.norm(truth, axis=-1)[inside].mean()
    assert err < 0.5 * size, (err, size)


def test_affine_stage_recovers_a_rigid_transform():
    fixed, _ = phantom(SHAPE3)
    truth = _rigid_affine(SHAPE3, 6.0, (2.0, -1.5, 1.0))
    moving = warp_numpy(fixed, _affine_disp(SHAPE3, np.linalg.inv(
        np.vstack([truth, [0, 0, 0, 1]]))[:3]), order=1)
    cfg = instance.make_config("fast", levels=(), affine_iterations=150)
    result = instance.register_arrays(fixed, moving, cfg)
    # moving(A x) ~ fixed(x) with A = truth: the recovered transform maps fixed to moving
    # measured: translation within 0.05 voxel, matrix entries within 0.014
    np.testing.assert_allclose(result.affine[:, 3], truth[:, 3], atol=0.25)
    np.testing.assert_allclose(result.affine[:, :3], truth[:, :3], atol=0.03)


@pytest.mark.parametrize("shape, max_disp", [((48, 40), 6.0), ((27, 30, 25), 9.0)])
def test_any_shape_and_2d(shape, max_disp):
    rng = np.random.default_rng(1)
    fixed, labels = phantom(shape, rng, jitter=0.0)
    truth = smooth_random_field(shape, max_disp=max_disp, smoothness=5.0, rng=rng)
    moving = warp_numpy(fixed, -truth, order=1)
    moving_labels = warp_numpy(labels, -truth, order=0)
    result = instance.register_arrays(fixed, moving, _quick())
    assert result.disp.shape == (*shape, len(shape))
    before = mean_dice(dice(labels, moving_labels))
    after = mean_dice(dice(labels, warp_numpy(moving_labels, result.disp, order=0)))
    # measured: 2D 0.74 -> 0.92, 27x30x25: 0.76 -> 0.92
    assert after > before + 0.1 and after > 0.88, (before, after)


def test_bad_settings_and_inputs():
    with pytest.raises(ConfigError, match="unknown preset 'slow'"):
        instance.make_config("slow")
    with pytest.raises(ConfigError, match="iterations: expected 2 values"):
        instance.make_config("accurate", levels=(2, 1), iterations=(1, 2, 3))
    with pytest.raises(ConfigError, match="similarity"):
        instance.make_config("accurate", similarity="mi")
    with pytest.raises(InputError, match="differs from fixed shape"):
        instance.register_arrays(np.zeros((8, 8, 8)), np.zeros((8, 8, 9)))
    with pytest.raises(InputError, match="too small"):
        instance.register_arrays(np.ones((3, 8, 8)), np.ones((3, 8, 8)), _quick())


def test_schedule_options_and_adaptation():
    acc = instance.make_config("accurate", levels=3)
    assert acc.levels == (2, 1, 0) and len(acc.iterations) == len(acc.ncc_win) == 3
    assert instance.make_config("fast", levels=2).levels == (2, 1)
    assert instance.make_config("accurate", iterations=7).iterations == (7, 7)
    # brain-sized images keep the preset; small ones move to finer levels
    assert instance.adapt_to_shape(acc, (96, 112, 96)) == acc
    small = instance.adapt_to_shape(acc, (32, 32, 32))
    assert small.levels == (1, 0) and small.affine_level == 0  # 8^3 and 16^3 are too coarse
    tiny = instance.adapt_to_shape(instance.PRESETS["fast"], (24, 24, 24))
    assert tiny.levels == (0,) and tiny.iterations == instance.PRESETS["fast"].iterations
