"""Backward-pass work waits for the incoming gradient (tfreg.ops.scheduling.after).

In a traced graph the executor runs an op as soon as its inputs exist; a gradient op that
reads only forward tensors would run during the forward pass and hold its result until the
backward pass. The independent expectation: of the ops that produce volume-sized tensors
without depending on the incoming gradient, each is an op of the forward-only graph."""
from __future__ import annotations

from collections import Counter

import numpy as np
import tensorflow as tf

from tfreg.ops.activations import leaky_relu
from tfreg.ops.convolution import conv
from tfreg.ops.scheduling import after

SHAPE = (1, 10, 11, 12, 4)
NO_COPY = {"Identity", "IdentityN", "Reshape", "Placeholder", "NoOp"}


def _net(x, k1, k2):
    return leaky_relu(conv(leaky_relu(conv(x, k1)), k2, "valid"))


def _specs():
    return (tf.TensorSpec(SHAPE, tf.float32), tf.TensorSpec((3, 3, 3, 4, 5), tf.float32),
            tf.TensorSpec((3, 3, 3, 5, 3), tf.float32))


def _large_ops(graph, exclude_after=None) -> Counter:
    """Types of ops with a used, volume-sized output (>= one channel of SHAPE) that do not depend,
    through data or control edges, on the op named ``exclude_after``."""
    depends: dict[str, bool] = {}

    def dep(op) -> bool:
        if op.name not in depends:
            depends[op.name] = op.name == exclude_after or any(
                dep(t.op) for t in op.inputs) or any(dep(c) for c in op.control_inputs)
        return depends[op.name]

    voxels = int(np.prod(SHAPE[1:-1]))
    found = Counter()
    for op in graph.get_operations():
        large = any(t.shape.is_fully_defined() and t.shape.num_elements() >= voxels
                    and t.consumers() for t in op.outputs)  # unused ops are pruned
        if large and op.type not in NO_COPY and not dep(op):
            found[op.type] += 1
    return found


def test_gradient_ops_wait_for_the_incoming_gradient():
    forward = tf.function(_net).get_concrete_function(*_specs()).graph

    def backward(x, k1, k2, g):
        with tf.GradientTape() as tape:
            tape.watch([x, k1, k2])
            y = _net(x, k1, k2)
        return tape.gradient(y, [x, k1, k2], output_gradients=g)

    g_spec = tf.TensorSpec((1, 8, 9, 10, 3), tf.float32, name="g")
    traced = tf.function(backward).get_concrete_function(*_specs(), g_spec).graph
    g_op = [op.name for op in traced.get_operations() if op.type == "Placeholder"][-1]
    assert _large_ops(traced, g_op) == _large_ops(forward)
    assert _large_ops(forward)["Conv3D"] == 2


def test_after_is_the_value_itself():
    x = tf.constant(np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(after(tf.constant(1.0), x), x)
    ordered = tf.function(lambda s, x: after(s, x) * 2)(tf.constant(1.0), x)
    np.testing.assert_array_equal(ordered, 2 * np.arange(6.0).reshape(2, 3))
