"""Parzen-window NMI (`tfreg.ops.mutual_information`, `tfreg.losses.NMI`) against NumPy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from tfreg.losses import NMI
from tfreg.ops.mutual_information import joint_histogram, normalized_mutual_information


def joint_numpy(a: np.ndarray, b: np.ndarray, bins: int, sigma: float) -> np.ndarray:
    """Dense float64 Parzen joint histogram: every voxel's normalised Gaussian weights over the
    bin centres, outer products averaged over voxels (each image scaled by its min and max)."""
    def weights(x):
        x = x.ravel().astype(np.float64)
        t = (x - x.min()) / (x.max() - x.min()) * (bins - 1)
        w = np.exp(-((t[:, None] - np.arange(bins)[None]) ** 2) / (2 * sigma ** 2))
        return w / w.sum(1, keepdims=True)

    return weights(a).T @ weights(b) / a.size


def nmi_numpy(a, b, bins=32, sigma=0.5) -> float:
    p = joint_numpy(a, b, bins, sigma)

    def h(q):
        q = q[q > 0]
        return -(q * np.log(q)).sum()

    return (h(p.sum(1)) + h(p.sum(0))) / h(p)


@pytest.mark.parametrize("shape,bins,chunk", [((15, 13), 16, 7), ((9, 8, 7), 32, 100),
                                               ((9, 8, 7), 8, 10 ** 6)])
def test_histogram_and_nmi_match_numpy(shape, bins, chunk):
    rng = np.random.default_rng(0)
    a = rng.random(shape).astype(np.float32)
    b = (np.sin(4 * a) + 0.3 * rng.random(shape)).astype(np.float32)
    got = joint_histogram(a[None, ..., None], b[None, ..., None], bins, 0.5, chunk=chunk)
    np.testing.assert_allclose(got.numpy()[0], joint_numpy(a, b, bins, 0.5), atol=1e-6)
    nmi = normalized_mutual_information(a[None, ..., None], b[None, ..., None], bins, chunk=chunk)
    np.testing.assert_allclose(float(nmi[0]), nmi_numpy(a, b, bins), rtol=1e-5)


def test_gradient_matches_finite_differences_of_numpy():
    """d NMI / d b at a few voxels (not the image's min or max, which set the bin range)."""
    rng = np.random.default_rng(1)
    a = rng.random((12, 11))
    b = np.cos(3 * a) + 0.2 * rng.random(a.shape)
    tb = tf.constant(b[None, ..., None], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(tb)
        value = normalized_mutual_information(tf.constant(a[None, ..., None], tf.float32), tb,
                                              bins=12, sigma=0.7, chunk=17)
    grad = tape.gradient(value, tb).numpy()[0, ..., 0]
    order = np.argsort(b.ravel())
    for flat in order[[5, 40, 77, 120]]:
        idx = np.unravel_index(flat, b.shape)
        h = 1e-5
        plus, minus = b.copy(), b.copy()
        plus[idx] += h
        minus[idx] -= h
        fd = (nmi_numpy(a, plus, 12, 0.7) - nmi_numpy(a, minus, 12, 0.7)) / (2 * h)
        assert abs(grad[idx] - fd) < 2e-3 * max(1.0, abs(fd)) + 1e-4, (idx, grad[idx], fd)
    assert np.abs(grad).max() > 1e-3


def test_bijective_intensity_maps_leave_nmi_unchanged(blob_labels):
    labels = blob_labels((40, 36), n_labels=3, margin=4, seed=1)  # values 0..3
    bins = 16
    levels = np.array([0.0, 5.0, 10.0, 15.0]) / 15.0  # on bin centres, 5 bins apart
    fixed = levels[labels] + np.random.default_rng(2).normal(0, 0.02, labels.shape)
    moving = levels[np.roll(labels, 2, axis=0)]
    base = float(normalized_mutual_information(fixed[None, ..., None], moving[None, ..., None],
                                               bins)[0])
    # a non-monotone permutation of the levels and an inversion: same NMI
    for table in (levels[[0, 2, 1, 3]], levels[::-1]):
        remapped = table[np.roll(labels, 2, axis=0)]
        value = float(normalized_mutual_information(fixed[None, ..., None],
                                                    remapped[None, ..., None], bins)[0])
        assert abs(value - base) < 1e-5
    # continuous intensities: an inversion maps bin coordinates t -> bins - 1 - t exactly
    rng = np.random.default_rng(3)
    x, y = rng.random((2, 1, 20, 20, 1)).astype(np.float32)
    assert abs(float(normalized_mutual_information(x, y)[0]) -
               float(normalized_mutual_information(x, 1 - y)[0])) < 1e-5
    # a map that merges levels does change it (the check above can fail)
    merged = levels[[0, 1, 1, 3]][np.roll(labels, 2, axis=0)]
    assert abs(float(normalized_mutual_information(fixed[None, ..., None],
                                                   merged[None, ..., None], bins)[0]) - base) > 1e-3


def test_optimum_at_true_alignment_across_contrasts(blob_labels):
    labels = blob_labels((56, 56), n_labels=5, seed=5)
    table_a = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    table_b = np.array([0.0, 0.9, 0.3, 0.1, 0.6, 0.45])
    rng = np.random.default_rng(1)
    fixed = ndimage.gaussian_filter(table_a[labels], 1.0) + rng.normal(0, 0.01, labels.shape)
    moving = np.roll(ndimage.gaussian_filter(table_b[labels], 1.0), (3, -2), axis=(0, 1))
    candidates = list(itertools.product(range(-4, 5), repeat=2))
    batch = np.stack([np.roll(moving, (-dx, -dy), axis=(0, 1)) for dx, dy in candidates])
    fixed_b = np.repeat(fixed[None], len(candidates), 0)
    nmi = normalized_mutual_information(fixed_b[..., None], batch[..., None]).numpy()
    assert candidates[int(np.argmax(nmi))] == (3, -2)
    assert nmi.max() - np.sort(nmi)[-2] > 0.01


def test_loss_xla_and_batch():
    rng = np.random.default_rng(4)
    a = tf.constant(rng.random((2, 10, 9, 8, 1)), tf.float32)
    b = tf.constant(rng.random((2, 10, 9, 8, 1)), tf.float32)
    loss = NMI(bins=16, chunk=64)
    eager = float(loss(a, b))

    @tf.function(jit_compile=True, autograph=False)
    def value_and_grad(x, y):
        with tf.GradientTape() as tape:
            tape.watch(y)
            value = loss(x, y)
        return value, tape.gradient(value, y)

    value, grad = value_and_grad(a, b)
    np.testing.assert_allclose(float(value), eager, rtol=1e-5)
    per = normalized_mutual_information(a, b, 16).numpy()
    np.testing.assert_allclose(eager, -per.mean(), rtol=1e-5)
    assert grad.shape == b.shape and np.isfinite(grad.numpy()).all()
    assert float(NMI()(a, a)) < float(NMI()(a, b)) - 0.2  # identical images score far better


def test_bad_arguments():
    with pytest.raises(ValueError, match="Received: bins=1"):
        NMI(bins=1)
    with pytest.raises(ValueError, match="same shape"):
        joint_histogram(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 5, 1)))
