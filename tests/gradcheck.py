"""Gradient check shared by the layer and op tests: tape gradients against float64 central
differences along random directions."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf


def check_directional_derivatives(fn: Callable, inputs: Sequence[np.ndarray],
                                  rng: np.random.Generator, n_dirs: int = 6, h: float = 1e-4,
                                  graph: bool = True) -> None:
    """Assert that the tape gradient of ``L = sum(w * fn(*inputs))`` (random weights `w`) matches
    ``(L(x + h d) - L(x - h d)) / 2h`` along `n_dirs` random directions `d` of every input.

    Inputs must be float64: the O(h^2) truncation and ~1e-12 rounding are then far below the
    1e-6 relative tolerance. `graph`: evaluate `L` as a `tf.function` (False: eagerly, so ops
    take their eager paths).
    """
    inputs = [tf.constant(x) for x in inputs]
    weight = tf.constant(rng.normal(size=fn(*inputs).shape))

    def loss(*xs):
        return tf.reduce_sum(weight * fn(*xs))

    if graph:
        loss = tf.function(loss)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        value = loss(*inputs)
    grads = tape.gradient(value, inputs)
    for k, (x, g) in enumerate(zip(inputs, grads)):
        for _ in range(n_dirs):
            d = rng.normal(size=x.shape)
            plus = [xi + h * d if i == k else xi for i, xi in enumerate(inputs)]
            minus = [xi - h * d if i == k else xi for i, xi in enumerate(inputs)]
            numeric = (loss(*plus) - loss(*minus)) / (2 * h)
            np.testing.assert_allclose(float(tf.reduce_sum(g * d)), float(numeric),
                                       rtol=1e-6, atol=1e-9)
