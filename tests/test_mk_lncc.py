"""Multi-kernel LNCC against a brute-force NumPy loop over strided, dilated windows."""
import numpy as np
import pytest
import tensorflow as tf

from tfreg import losses
from tfreg.ops import mk_lncc


def _brute_lncc(i, j, k, d, s, eps=1e-5):
    """1 - mean over valid windows of cross^2 / (var_i var_j + eps); explicit loops."""
    shape = i.shape[1:-1]
    starts = [range(0, n - (k - 1) * d, s) for n in shape]
    vals = []
    for b in range(i.shape[0]):
        for c in range(i.shape[-1]):
            for corner in np.ndindex(*[len(r) for r in starts]):
                sl = tuple(slice(r[q], r[q] + (k - 1) * d + 1, d) for r, q in zip(starts, corner))
                a = i[(b,) + sl + (c,)].astype(np.float64).ravel()
                t = j[(b,) + sl + (c,)].astype(np.float64).ravel()
                assert a.size == k ** len(shape)
                cross = np.sum((a - a.mean()) * (t - t.mean()))
                va, vt = np.sum((a - a.mean()) ** 2), np.sum((t - t.mean()) ** 2)
                vals.append(cross ** 2 / (va * vt + eps))
    return 1.0 - np.mean(vals)


@pytest.mark.parametrize("shape,k,d,s", [((23, 19), 5, 2, 2), ((20, 18), 4, 1, 3),
                                         ((11, 10, 9), 3, 2, 1)])
def test_lncc_matches_brute_force(shape, k, d, s):
    rng = np.random.default_rng(0)
    i = rng.random((2, *shape, 1)).astype(np.float32)
    j = (0.5 * i + 0.5 * rng.random(i.shape)).astype(np.float32)
    got = float(mk_lncc.lncc(tf.constant(i, tf.float64), tf.constant(j, tf.float64), k, d, s))
    np.testing.assert_allclose(got, _brute_lncc(i, j, k, d, s), rtol=1e-9)


def test_dilated_box_sum_matches_slicing():
    x = np.random.default_rng(1).normal(size=(1, 17, 3)).astype(np.float64)
    got = mk_lncc.dilated_box_sum(tf.constant(x), 1, k=4, dilation=3, stride=2).numpy()
    expect = np.stack([x[:, p:p + 10:3].sum(axis=1) for p in range(0, 17 - 9, 2)], 1)
    np.testing.assert_allclose(got, expect, rtol=1e-12)


def test_automatic_windows_follow_the_original_rule():
    w = mk_lncc.auto_windows((160, 192, 224))        # S = 160: 160/16, /8, /4
    assert w.sizes == (10, 20, 40) and w.weights == (0.1, 0.3, 0.6)
    assert w.dilations == (2, 2, 2) and w.strides == (2, 5, 10)
    w = mk_lncc.auto_windows((80, 192, 192))         # OAI: S = 80 -> 20, 40 voxels
    assert w.sizes == (20, 40) and w.weights == (0.3, 0.7) and w.dilations == (2, 2)
    assert w.strides == (5, 10)
    w = mk_lncc.auto_windows((24, 20, 28))
    assert w.sizes == (10,) and w.weights == (1.0,) and w.dilations == (1,) and w.strides == (2,)


def test_loss_class_weights_terms_and_is_zero_for_a_linear_match():
    rng = np.random.default_rng(2)
    i = rng.random((1, 32, 32, 1)).astype(np.float32)
    j = rng.random((1, 32, 32, 1)).astype(np.float32)
    loss = losses.MKLNCC(fractions=(0.25, 0.5), weights=(0.3, 0.7), dilation=1)
    w = loss.windows((32, 32))
    assert w.sizes == (8, 16) and w.strides == (2, 4)
    expect = 0.3 * _brute_lncc(i, j, 8, 1, 2) + 0.7 * _brute_lncc(i, j, 16, 1, 4)
    np.testing.assert_allclose(float(loss(i, j)), expect, rtol=1e-4)
    assert abs(float(losses.MKLNCC()(i, 3 * i + 1))) < 1e-4
    with pytest.raises(ValueError, match="spans"):
        mk_lncc.lncc(tf.constant(i), tf.constant(j), k=12, dilation=3)
    with pytest.raises(ValueError, match="go together"):
        losses.MKLNCC(fractions=(0.5,))


def test_gradient_flows():
    i = tf.constant(np.random.default_rng(3).random((1, 16, 16, 16, 1)), tf.float32)
    j = tf.Variable(tf.random.uniform((1, 16, 16, 16, 1), seed=1))
    with tf.GradientTape() as tape:
        value = losses.MKLNCC()(i, j)
    grad = tape.gradient(value, j)
    assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0
