"""Fourier filtering against a direct periodic convolution in space (SciPy, mode='wrap')."""
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from tfreg.ops import fourier


@pytest.mark.parametrize("shape", [(12, 10), (8, 10, 6)])
def test_matrix_multiplier_equals_periodic_convolution(shape):
    """A non-symmetric 3^n kernel, applied per channel through the complex matrix route."""
    rng = np.random.default_rng(0)
    n = len(shape)
    x = rng.normal(size=(2, *shape, 3)).astype(np.float32)
    small = rng.random((3,) * n)
    kernel = np.zeros(shape)
    kernel[(slice(0, 3),) * n] = small
    kernel = np.roll(kernel, [-1] * n, axis=tuple(range(n)))   # kernel centre at index 0
    spec = np.fft.rfftn(kernel)
    mat = np.zeros(fourier.half_shape(shape) + (3, 3), np.complex64)
    for c in range(3):
        mat[..., c, c] = spec
    out = fourier.apply_matrix_multiplier(x, mat).numpy()
    expect = np.stack([np.stack([ndimage.convolve(x[b, ..., c], small, mode="wrap")
                                 for c in range(3)], -1) for b in range(2)])
    np.testing.assert_allclose(out, expect, atol=1e-4)


def test_symmetric_kernel_multiplier_equals_gaussian_filter():
    shape = (9, 8, 7)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, *shape, 2)).astype(np.float32)
    impulse = np.zeros(shape)
    impulse[4, 4, 3] = 1.0
    centred = ndimage.gaussian_filter(impulse, 1.0, mode="wrap")
    mult = fourier.multiplier_from_kernel(np.fft.ifftshift(centred))
    out = fourier.apply_multiplier(x, mult).numpy()
    expect = np.stack([ndimage.gaussian_filter(x[0, ..., c], 1.0, mode="wrap") for c in range(2)], -1)
    np.testing.assert_allclose(out, expect[None], atol=1e-4)


def test_wavenumbers_layout():
    k = fourier.wavenumbers((9, 8, 7))
    assert [a.shape for a in k] == [(9, 1, 1), (1, 8, 1), (1, 1, 4)]
    np.testing.assert_array_equal(k[0].ravel(), np.fft.fftfreq(9, 1 / 9))
    np.testing.assert_array_equal(k[2].ravel(), [0, 1, 2, 3])


def test_runs_under_xla_and_rejects_bad_multiplier():
    x = tf.random.normal((1, 8, 8, 2))
    mult = np.full(fourier.half_shape((8, 8)), 2.0)
    f = tf.function(lambda t: fourier.apply_multiplier(t, mult), jit_compile=True)
    np.testing.assert_allclose(f(x).numpy(), 2 * x.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="half spectrum"):
        fourier.apply_multiplier(x, np.ones((8, 8)))
