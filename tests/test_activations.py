"""tfreg.ops.activations.leaky_relu and tfreg.layers.LeakyReLU against NumPy's definition."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from tfreg.layers import LeakyReLU
from tfreg.ops.activations import leaky_relu


@pytest.mark.parametrize("slope", [0.2, 0.1, 1.0])
def test_values_and_gradient_match_the_definition(slope):
    z = np.random.default_rng(0).normal(size=(2, 5, 6, 3))
    w = np.random.default_rng(1).normal(size=z.shape)
    zt = tf.constant(z)
    with tf.GradientTape() as tape:
        tape.watch(zt)
        loss = tf.reduce_sum(leaky_relu(zt, slope) * w)
    expected = np.where(z > 0, z, slope * z)
    np.testing.assert_allclose(leaky_relu(zt, slope).numpy(), expected, rtol=0, atol=1e-15)
    # d/dz sum(w * f(z)) = w * (1 if z > 0 else slope)
    np.testing.assert_allclose(tape.gradient(loss, zt).numpy(), w * np.where(z > 0, 1.0, slope),
                               rtol=0, atol=1e-15)


def test_second_order_use_through_a_product():
    # the gradient of y * z (y = f(z)) needs f'(z) read from the output: 2 z or 2 slope z
    z = tf.constant([-2.0, -0.5, 0.5, 3.0], tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(z)
        loss = tf.reduce_sum(leaky_relu(z, 0.2) * z)
    np.testing.assert_allclose(tape.gradient(loss, z).numpy(), [-0.8, -0.2, 1.0, 6.0], atol=1e-15)


def test_bad_slope_is_refused():
    with pytest.raises(ValueError, match="slope"):
        leaky_relu(tf.zeros(3), 0.0)


def test_layer_matches_keras_and_round_trips(tmp_path):
    x = np.random.default_rng(2).normal(size=(1, 6, 7, 2)).astype("float32")
    inp = keras.Input((6, 7, 2))
    model = keras.Model(inp, LeakyReLU(negative_slope=0.2, name="act")(inp))
    np.testing.assert_allclose(model(x).numpy(),
                               keras.layers.LeakyReLU(negative_slope=0.2)(x).numpy(), atol=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("act"), LeakyReLU)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=0)
