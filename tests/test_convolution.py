"""tfreg.ops.convolution.conv: the same values as tf.nn.convolution, gradients checked against
float64 finite differences and against TensorFlow's own convolution gradients; the layers
built on it keep Keras' weights and save/load."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from gradcheck import check_directional_derivatives
from tfreg.layers import Conv2D, Conv3D, conv_layer
from tfreg.ops import convolution
from tfreg.ops.convolution import (MIN_VOXELS, ONEDNN_MIN_CHANNELS, _aligned_channels, conv,
                                   supports)

CASES = [  # kernel, padding, input shape (batch, *spatial), channels in -> out
    ((3, 3, 3), "same", (2, 7, 8, 9), (3, 4)),
    ((3, 3, 3), "valid", (1, 7, 8, 9), (2, 5)),
    ((1, 1, 1), "same", (1, 5, 6, 7), (4, 3)),
    ((3, 3), "same", (2, 11, 12), (3, 4)),
    ((5, 3), "valid", (1, 11, 12), (2, 2)),
    ((2, 4), "valid", (1, 11, 12), (3, 1)),
    # input channels padded to 64-byte rows inside the kernel gradient (float64: 6 -> 8, 12 -> 16)
    ((3, 3, 3), "same", (1, 5, 6, 7), (6, 2)),
    ((3, 3), "same", (2, 9, 10), (12, 3)),
    # more output channels than (padded) input rows: the kernel gradient's products keep their
    # order (fewer: the narrower operand, the output gradient, goes first)
    ((3, 3), "same", (1, 9, 10), (2, 9)),
]


def _inputs(case, seed=0):
    ks, _, shape, (cin, cout) = case
    rng = np.random.default_rng(seed)
    return rng.normal(size=(*shape, cin)), rng.normal(size=(*ks, cin, cout))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}")
def test_gradients_match_finite_differences(case):
    x, w = _inputs(case)
    check_directional_derivatives(lambda x, w: conv(x, w, case[1]), [x, w],
                                  np.random.default_rng(1), n_dirs=3)


@pytest.mark.parametrize("slab_bytes", [None, 1], ids=["one-slab", "plane-slabs"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}")
def test_values_and_gradients_match_tensorflow(case, slab_bytes, monkeypatch):
    if slab_bytes is not None:  # the kernel gradient summed over one output plane at a time
        monkeypatch.setattr(convolution, "SLAB_BYTES", slab_bytes)
    x, w = (tf.constant(a) for a in _inputs(case, seed=2))
    pad = case[1]

    def value_and_grads(fn):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = fn(x, w)
            loss = tf.reduce_sum(y * tf.sin(y))  # a non-constant output gradient
        return [y, *tape.gradient(loss, [x, w])]

    ours = value_and_grads(lambda x, w: conv(x, w, pad))
    # TensorFlow's own kernels (graph mode: its eager float64 Conv3D gradient is broken)
    theirs = tf.function(lambda: value_and_grads(
        lambda x, w: tf.nn.convolution(x, w, padding=pad.upper())))()
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}")
def test_bias_value_and_gradients_match_tensorflow(case):
    x, w = (tf.constant(a) for a in _inputs(case, seed=5))
    b = tf.constant(np.random.default_rng(6).normal(size=case[3][1]))
    pad = case[1]

    def value_and_grads(fn):
        with tf.GradientTape() as tape:
            tape.watch([x, w, b])
            y = fn(x, w, b)
            loss = tf.reduce_sum(y * tf.sin(y))
        return [y, *tape.gradient(loss, [x, w, b])]

    ours = tf.function(lambda: value_and_grads(lambda x, w, b: conv(x, w, pad, bias=b)))()
    theirs = tf.function(lambda: value_and_grads(
        lambda x, w, b: tf.nn.convolution(x, w, padding=pad.upper()) + b))()
    for a, e in zip(ours, theirs):
        assert a.shape == e.shape
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-10, atol=1e-10)


def test_float32_kernel_gradient_in_a_compiled_function():
    x, w = (tf.constant(a, tf.float32) for a in _inputs(CASES[0], seed=3))

    @tf.function(jit_compile=True)
    def grads(x, w):
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss = tf.reduce_sum(conv(x, w) ** 2)
        return tape.gradient(loss, w)

    expected = 2 * tf.raw_ops.Conv3DBackpropFilterV2(
        input=tf.cast(x, tf.float64), filter_sizes=w.shape, out_backprop=tf.nn.convolution(
            tf.cast(x, tf.float64), tf.cast(w, tf.float64), padding="SAME"),
        strides=[1] * 5, padding="SAME")
    np.testing.assert_allclose(grads(x, w).numpy(), expected.numpy(), rtol=1e-4, atol=1e-3)


def test_aligned_channels():
    # float32 rows padded to 16 channels (64 bytes) where that adds at most half the channels
    assert [_aligned_channels(c, 4) for c in (28, 56, 16, 12, 5, 2)] == [32, 64, 16, 16, 5, 2]
    assert [_aligned_channels(c, 8) for c in (6, 3, 28)] == [8, 3, 32]


def test_supports():
    assert supports(3, (3, 3, 3), (1, 1, 1), (1, 1, 1), "same")
    assert not supports(3, (3, 3, 3), (2, 2, 2), (1, 1, 1), "same")   # strided: Keras' path
    assert not supports(3, (2, 2, 2), (1, 1, 1), (1, 1, 1), "same")   # even kernel, same
    assert not supports(2, (3, 3), (1, 1), (2, 2), "valid")           # dilated
    # small volumes stay with TensorFlow's kernels (faster there); unknown sizes do not
    assert not supports(3, (3, 3, 3), (1,) * 3, (1,) * 3, "same", spatial_shape=(16, 16, 16))
    assert supports(3, (3, 3, 3), (1,) * 3, (1,) * 3, "same", spatial_shape=(32, 32, 32))
    assert supports(3, (3, 3, 3), (1,) * 3, (1,) * 3, "same", spatial_shape=(None, 8, 8))
    with pytest.raises(ValueError, match="unsupported"):
        conv(tf.zeros((1, 4, 4, 1)), tf.zeros((2, 2, 1, 1)), "same")


@pytest.mark.parametrize("onednn", [True, False])
def test_supports_leaves_few_channels_to_onednn(onednn, monkeypatch):
    monkeypatch.setattr(convolution, "_ONEDNN", onednn)
    args = (3, (3, 3, 3), (1,) * 3, (1,) * 3, "same")
    assert supports(*args, in_channels=ONEDNN_MIN_CHANNELS)
    assert supports(*args, in_channels=ONEDNN_MIN_CHANNELS - 1) is not onednn
    assert supports(*args, in_channels=2) is not onednn


def test_training_hints_when_onednn_is_off_by_import_order(monkeypatch):
    from tfreg.engine.loop import onednn_hint

    monkeypatch.setattr(convolution, "_ONEDNN", False)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    assert "import tfreg first" in onednn_hint()
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")  # the user's choice: no hint
    assert onednn_hint() is None
    monkeypatch.setattr(convolution, "_ONEDNN", True)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    assert onednn_hint() is None


def test_tfreg_turns_onednn_on_unless_the_user_set_it():
    """Importing tfreg before TensorFlow turns TensorFlow's oneDNN kernels on (off by default
    on CPUs without AVX-512 VNNI/AMX, where they make 3D convolutions 2-3x faster); a value the
    user set wins."""
    import subprocess
    import sys

    code = ("import tfreg, tensorflow; from tfreg.ops.convolution import onednn_enabled; "
            "print(onednn_enabled())")
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    seen = [subprocess.run([sys.executable, "-c", code], env=dict(env, **extra), check=True,
                           capture_output=True, text=True).stdout.split()[-1]
            for extra in ({}, {"TF_ENABLE_ONEDNN_OPTS": "0"})]
    assert seen == ["True", "False"]


@pytest.mark.parametrize("ndims", [2, 3])
def test_layers_match_keras_and_round_trip(ndims, tmp_path):
    import keras
    assert conv_layer(ndims) is (Conv2D if ndims == 2 else Conv3D)
    side = int(np.ceil(MIN_VOXELS ** (1 / ndims)))  # large enough for tfreg's gradient path
    shape = (1, *([side] * ndims), ONEDNN_MIN_CHANNELS)  # (also with oneDNN on)
    x = np.random.default_rng(4).normal(size=shape).astype("float32")
    ours = conv_layer(ndims)(3, 3, padding="same", name="c")
    theirs = getattr(keras.layers, f"Conv{ndims}D")(3, 3, padding="same", name="c")
    ours.build(shape)
    theirs.build(shape)
    theirs.set_weights(ours.get_weights())
    assert [w.path for w in ours.weights] == [w.path for w in theirs.weights]
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    grads = []
    for layer in (ours, theirs):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x) ** 2)
        grads.append(tape.gradient(loss, [layer.kernel, layer.bias]))
    for ours_grad, their_grad in zip(*grads):
        np.testing.assert_allclose(ours_grad, their_grad, rtol=1e-4, atol=1e-3)
    # strided: falls back to Keras' convolution
    strided = conv_layer(ndims)(3, 3, strides=2, padding="same")
    assert strided(x).shape == (1, *([(side + 1) // 2] * ndims), 3)
    inp = keras.Input(shape[1:])
    model = keras.Model(inp, ours(inp))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.layers[-1]) is type(ours)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)


def test_xla_compiled_functions_use_xla_gradients():
    """Under jit_compile the layer leaves the gradient to XLA (no per-tap products); the
    gradients agree with the uncompiled fast path."""
    side = int(np.ceil(MIN_VOXELS ** (1 / 3)))
    shape = (1, side, side, side, ONEDNN_MIN_CHANNELS)  # tfreg's path also with oneDNN on
    x = tf.constant(np.random.default_rng(7).normal(size=shape), tf.float32)
    layer = Conv3D(3, 3, padding="same")
    layer.build(x.shape)
    seen = []

    def grads(x):
        seen.append(convolution.in_xla_compilation())
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x) ** 2)
        return tape.gradient(loss, [layer.kernel, layer.bias])

    ops = {}
    results = {}
    for jit in (False, True):
        fn = tf.function(grads, jit_compile=jit)
        ops[jit] = {op.type for op in fn.get_concrete_function(x).graph.get_operations()}
        results[jit] = fn(x)
    assert seen[:2] == [False, True]
    assert "MatMul" in ops[False] and "Conv3DBackpropFilterV2" not in ops[False]
    assert "Conv3DBackpropFilterV2" in ops[True] and "MatMul" not in ops[True]
    for a, b in zip(results[True], results[False]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
