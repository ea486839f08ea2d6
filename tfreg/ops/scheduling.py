"""Ordering of backward-pass work in a traced graph.

In a ``tf.function`` the forward and backward passes are one graph, and TensorFlow's executor
runs every op as soon as its inputs exist. A gradient's op that reads only forward tensors (a
padded copy of a convolution's input, an activation's sign mask) therefore runs during the
forward pass, and its result stays in memory until the backward pass reaches it: one extra
tensor per layer, all alive at the backward's start. `after` ties such work to the incoming
gradient, so it runs when the backward pass gets there and is freed right after.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["after"]


def after(signal: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """``x`` (unchanged, no copy), available in a graph only once ``signal`` is computed.

    Eagerly it is ``x`` itself (ops run in program order there)."""
    if tf.executing_eagerly():
        return x
    with tf.control_dependencies([signal]):
        return tf.identity(x)
