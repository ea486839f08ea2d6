"""The instance optimisation's Adam (`tfreg.instance._Optimiser`) and the regularity of the
`best` and `accurate` fields where the images carry no information."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from scipy import ndimage

from tfreg import instance, metrics
from tfreg.synthetic import phantom


def _quadratic_optimiser(target: np.ndarray, floor: float) -> instance._Optimiser:
    """Loss ``sum (p - target)^2 / 2`` (gradient ``p - target``), not compiled."""
    goal = tf.constant(target)

    def loss_fn(p, *_):
        loss = 0.5 * tf.reduce_sum(tf.square(p - goal))
        return loss, loss

    return instance._Optimiser(target.shape, loss_fn, jit=False, floor=floor)


def test_floor_zero_is_keras_adam():
    target = np.array([3.0, -0.02, 1e-4, 0.5], np.float32)
    opt = _quadratic_optimiser(target, floor=0.0)
    ref = tf.Variable(tf.zeros(4))
    keras_adam = keras.optimizers.Adam(learning_rate=0.1, epsilon=1e-9)
    for _ in range(12):
        opt.step(tf.constant(0.1), None, None, None)
        keras_adam.apply_gradients([(ref - target, ref)])
    np.testing.assert_allclose(opt.param.numpy(), ref.numpy(), rtol=1e-5, atol=1e-7)
    # reset clears the moments and the step count: the first step again moves every entry by lr
    opt.reset(tf.zeros(4))
    opt.step(tf.constant(0.1), None, None, None)
    np.testing.assert_allclose(np.abs(opt.param.numpy()), 0.1, rtol=1e-3)


def test_floor_shrinks_the_steps_of_small_gradients():
    """First step, by hand: m = 0.1 g, v = 0.001 g^2 and the bias corrections give
    ``lr g / (|g| + floor mean|g|)``: plain Adam moves both entries by lr, the floored one moves
    the entry with a 100x smaller gradient about 100x less."""
    target = np.array([1.0, 0.01], np.float32)  # gradient at 0: -target
    lr, floor = 0.2, 1.0
    mean = np.abs(target).mean()
    expected = lr * target / (np.abs(target) + floor * mean)
    opt = _quadratic_optimiser(target, floor)
    opt.step(tf.constant(lr), None, None, None)
    np.testing.assert_allclose(opt.param.numpy(), expected, rtol=1e-4)
    plain = _quadratic_optimiser(target, 0.0)
    plain.step(tf.constant(lr), None, None, None)
    np.testing.assert_allclose(plain.param.numpy(), [lr, lr], rtol=1e-4)


def test_best_keeps_a_noise_only_background_still():
    """The same object in both images and independent noise (sigma 0.02) around it: the true field
    is zero. NCC windows of pure noise still correlate a little and Adam turns their tiny gradients
    into full steps; `best`'s contrast floor (`ncc_floor` 0.1) weights such windows down and its
    Adam floor (`adam_floor` 1) shrinks the steps of small gradients. Measured (48x48, this
    schedule): mean |u| in the background 0.16 voxel and SDlogJ 0.020 there with `best`; 0.37 and
    0.066 with the former settings (floor 0.03, plain Adam; asserted too, so the bounds can
    fail)."""
    moved, sdlogj = _background_motion("best")
    assert moved < 0.25 and sdlogj < 0.035, (moved, sdlogj)
    moved, sdlogj = _background_motion("best", ncc_floor=0.03, adam_floor=0.0)
    assert moved > 0.25 and sdlogj > 0.035, (moved, sdlogj)


def test_accurate_keeps_a_noise_only_background_still():
    """The same pair with the default preset's settings on one full-resolution level (its
    velocity at half resolution): the contrast floor, the Adam floor and smoothness weight 1 give
    mean |u| 0.20 voxel and SDlogJ 0.028 in the background (measured); the former settings
    (floor 0.03, plain Adam, weight 0.5) 0.52 and 0.14 (asserted too)."""
    moved, sdlogj = _background_motion("accurate")
    assert moved < 0.35 and sdlogj < 0.08, (moved, sdlogj)
    moved, sdlogj = _background_motion("accurate", ncc_floor=0.03, adam_floor=0.0, lam=0.5)
    assert moved > 0.35 and sdlogj > 0.08, (moved, sdlogj)


def _background_motion(preset: str, **changes) -> tuple[float, float]:
    """Mean |u| (voxels) and SDlogJ in the background of a 48x48 pair whose true field is zero:
    the same object in both images, independent noise (sigma 0.02) around it; one level at full
    resolution, 40 steps."""
    rng = np.random.default_rng(0)
    image, labels = phantom((24, 24), rng)
    clean = np.zeros((48, 48), np.float32)
    clean[12:36, 12:36] = image
    brain = np.zeros((48, 48), bool)
    brain[12:36, 12:36] = labels > 0
    fixed, moving = (np.clip(clean + 0.02 * rng.normal(size=clean.shape), 0, 1).astype(np.float32)
                     for _ in range(2))
    background = ~ndimage.binary_dilation(brain, iterations=5)
    cfg = instance.make_config(preset, levels=(0,), iterations=(40,), affine=False, **changes)
    disp = instance.register_arrays(fixed, moving, cfg).disp
    logj = np.log(np.clip(metrics.jacobian_determinant(disp), 1e-3, None))
    return float(np.linalg.norm(disp, axis=-1)[background].mean()), float(logj[background].std())
