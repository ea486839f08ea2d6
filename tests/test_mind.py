"""MIND-SSC (`tfreg.ops.mind`, `tfreg.losses.MIND`) against an independent NumPy/SciPy version."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from tfreg.losses import MIND
from tfreg.ops.mind import mind_distance, mind_ssc


def mind_numpy(image: np.ndarray, sigma: float, dilation: int, truncate: float = 2.0):
    """MIND-SSC written from the paper's definition: pairs of six-neighbours at distance sqrt(2),
    Gaussian patch SSD (scipy), minus the minimum, divided by the mean over pairs."""
    nd = image.ndim
    img = image.astype(np.float64)
    padded = np.pad(img, dilation, mode="edge")

    def at(offset):
        return padded[tuple(slice(dilation + dilation * o, dilation + dilation * o + n)
                            for o, n in zip(offset, img.shape))]

    channels = []
    for i, j in itertools.combinations(range(nd), 2):
        for s, t in itertools.product((-1, 1), repeat=2):
            a = np.zeros(nd, int)
            b = np.zeros(nd, int)
            a[i], b[j] = s, t
            channels.append(ndimage.gaussian_filter((at(a) - at(b)) ** 2, sigma, mode="nearest",
                                                    truncate=truncate))
    dist = np.stack(channels, -1)
    dist -= dist.min(-1, keepdims=True)
    var = dist.mean(-1, keepdims=True)
    var = np.clip(var, 1e-3 * var.mean(), 1e3 * var.mean())
    return np.exp(-dist / var)


@pytest.mark.parametrize("shape,sigma,dilation", [((20, 23), 0.8, 2), ((12, 14, 11), 1.0, 1)])
def test_descriptor_matches_numpy(shape, sigma, dilation):
    img = np.random.default_rng(1).random(shape).astype(np.float32)
    got = mind_ssc(img[None, ..., None], sigma=sigma, dilation=dilation).numpy()[0]
    want = mind_numpy(img, sigma, dilation)
    assert got.shape == want.shape == (*shape, 4 if len(shape) == 2 else 12)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_xla_matches_eager_and_gradient_is_finite():
    img = tf.constant(np.random.default_rng(2).random((1, 14, 12, 1)), tf.float32)
    other = tf.constant(np.random.default_rng(3).random((1, 14, 12, 1)), tf.float32)
    loss = MIND(penalty="l1")

    @tf.function(jit_compile=True)
    def value_and_grad(a, b):
        with tf.GradientTape() as tape:
            tape.watch(b)
            value = loss(a, b)
        return value, tape.gradient(value, b)

    value, grad = value_and_grad(img, other)
    np.testing.assert_allclose(float(value), float(loss(img, other)), rtol=1e-5)
    assert np.isfinite(grad.numpy()).all() and np.abs(grad.numpy()).max() > 0


def test_invariant_to_affine_intensity_maps_including_inversion():
    img = np.random.default_rng(4).random((1, 16, 16, 12, 1)).astype(np.float32)
    base = mind_ssc(img).numpy()
    for scale, offset in ((3.0, 0.5), (-1.0, 1.0), (-0.2, 7.0)):
        np.testing.assert_allclose(mind_ssc(scale * img + offset).numpy(), base, atol=2e-5)
    # but not to a different image: the tolerance above is far below this difference
    assert np.abs(mind_ssc(img ** 3).numpy() - base).mean() > 0.02


def test_distance_l1_l2():
    a = np.zeros((1, 2, 2, 3), np.float32)
    b = np.full((1, 2, 2, 3), 0.5, np.float32)
    assert np.allclose(mind_distance(a, b, "l1").numpy(), 0.5)
    assert np.allclose(mind_distance(a, b, "l2").numpy(), 0.25)
    with pytest.raises(ValueError, match="penalty"):
        mind_distance(a, b, "l3")


def _shift(image: np.ndarray, shift) -> np.ndarray:
    return np.roll(image, shift, axis=tuple(range(image.ndim)))


def test_optimum_at_true_alignment_across_contrasts(blob_labels):
    """Fixed: T1-like intensities; moving: other, non-monotone intensities and a cubic (monotone)
    remap, shifted by (3, -2). Among all integer shifts in [-4, 4]^2, MIND is lowest at the
    shift that undoes the true one."""
    labels = blob_labels((64, 64), n_labels=5, seed=3)
    table_b = np.array([0.0, 0.9, 0.3, 0.1, 0.6, 0.45])
    table_a = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    rng = np.random.default_rng(0)
    fixed = ndimage.gaussian_filter(table_a[labels], 1.0) + rng.normal(0, 0.01, labels.shape)
    moving = ndimage.gaussian_filter(table_b[labels], 1.0) ** 3 + rng.normal(0, 0.001,
                                                                           labels.shape)
    true = (3, -2)
    moving = _shift(moving, true)
    candidates = list(itertools.product(range(-4, 5), repeat=2))
    batch = np.stack([_shift(moving, (-dx, -dy)) for dx, dy in candidates])[..., None]
    fixed_b = np.repeat(fixed[None, ..., None], len(candidates), 0)
    for penalty in ("l1", "l2"):
        per = tf.reduce_mean(mind_distance(mind_ssc(fixed_b.astype(np.float32)),
                                           mind_ssc(batch.astype(np.float32)), penalty),
                             axis=[1, 2, 3]).numpy()
        assert candidates[int(np.argmin(per))] == true
        # the optimum is clearly separated from the second best
        assert np.sort(per)[1] > 1.05 * per.min()


def test_bad_arguments():
    with pytest.raises(ValueError, match="Received: penalty='x'"):
        MIND(penalty="x")
    with pytest.raises(ValueError, match="2 or 3 spatial axes"):
        mind_ssc(np.zeros((1, 8, 1), np.float32))
