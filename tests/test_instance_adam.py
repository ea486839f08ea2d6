"""The instance optimisation's Adam (`tfreg.instance._Optimiser`) and its relative floor."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfreg import instance


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
