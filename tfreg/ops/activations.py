"""Leaky ReLU whose gradient is computed from its output, so its input need not be kept.

``leaky_relu(z) = z if z > 0 else slope * z``. With ``0 < slope``, the output has the sign of
the input, so the derivative (1 or ``slope``) can be read off the output. TensorFlow's own
gradient (``LeakyReluGrad``) reads the input, which keeps every pre-activation tensor alive
until the backward pass: one extra full-size tensor per convolution layer. With this form
only the output is kept, and the output is also what the next convolution keeps for its
kernel gradient, so a conv + activation layer holds one tensor instead of two.
"""

from __future__ import annotations

import tensorflow as tf

from tfreg.ops.scheduling import after

__all__ = ["leaky_relu"]


def leaky_relu(z: tf.Tensor, slope: float = 0.2) -> tf.Tensor:
    """Leaky ReLU of ``z`` (any shape, floating); ``slope`` in (0, 1]. Same values as
    `tf.nn.leaky_relu`; the gradient is computed from the output."""
    slope = float(slope)
    if not 0.0 < slope <= 1.0:
        raise ValueError(f"tfreg.ops.leaky_relu: slope must be in (0, 1], got {slope}")

    @tf.custom_gradient
    def _leaky(z):
        y = tf.maximum(z, tf.constant(slope, z.dtype) * z)  # slope <= 1

        def grad(g):
            return g * tf.where(after(g, y) > 0, tf.ones((), g.dtype), tf.constant(slope, g.dtype))
        return y, grad

    return _leaky(tf.convert_to_tensor(z))
