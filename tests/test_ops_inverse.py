"""Fixed-point inversion of displacement fields against analytic inverses and a SciPy resampler."""
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from tfreg.ops import inverse as inv


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)


def _sample(field, points):
    """Linear interpolation of each component of `field` (*S, N) at `points` (*S, N), SciPy."""
    coords = np.moveaxis(points, -1, 0)
    return np.stack([ndimage.map_coordinates(field[..., c], coords, order=1, mode="nearest")
                     for c in range(field.shape[-1])], -1)


def test_translation_inverse_is_exact_negation():
    u = np.zeros((1, 12, 10, 2), np.float32) + np.array([1.5, -2.25], np.float32)
    w = inv.invert_displacement(u).numpy()
    np.testing.assert_allclose(w, -u, atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 36), (20, 18, 16)])
def test_affine_field_inverse_matches_analytic(shape):
    """u(x) = (A - I)(x - c): the inverse is (A^-1 - I)(y - c); linear interpolation of a linear
    field is exact, so away from the border the iteration must reach the analytic inverse."""
    n = len(shape)
    rng = np.random.default_rng(0)
    a = np.eye(n) + rng.uniform(-0.15, 0.15, (n, n))   # |A - I| < 1: contraction
    c = (np.asarray(shape) - 1) / 2
    x = _grid(shape) - c
    u = x @ (a - np.eye(n)).T
    w = inv.invert_displacement(u[None].astype(np.float32), iterations=200, tolerance=1e-5)
    expect = x @ (np.linalg.inv(a) - np.eye(n)).T
    inner = tuple(slice(s // 4, s - s // 4) for s in shape)  # where y + w(y) stays inside
    np.testing.assert_allclose(w.numpy()[0][inner], expect[inner], atol=1e-3)


def test_smooth_field_residual_with_independent_resampler():
    """phi(phi^-1(y)) - y, evaluated with SciPy's map_coordinates, is below the tolerance; the
    residual helper agrees with SciPy; the naive inverse -u is much worse (the test can fail)."""
    shape = (32, 28, 24)
    rng = np.random.default_rng(1)
    u = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 3.0) for _ in range(3)], -1)
    u *= 4.0 / np.abs(u).max()    # up to 4 voxels, max |grad u| ~ 0.5
    w = inv.invert_displacement(u[None].astype(np.float32), iterations=100, tolerance=1e-4)
    w = w.numpy()[0].astype(np.float64)
    res = w + _sample(u, _grid(shape) + w)
    naive = -u + _sample(u, _grid(shape) - u)
    assert np.abs(res).max() < 2e-3
    assert np.abs(naive).max() > 0.3
    helper = inv.composition_residual(u[None], w[None]).numpy()[0]
    np.testing.assert_allclose(helper, res, atol=1e-4)
    # in mm on an anisotropic grid: components scaled by the spacing
    stats = inv.residual_mm(np.ones((2, 2, 2, 3)), np.diag([2.0, 3.0, 6.0, 1.0]))
    assert stats["mean_mm"] == pytest.approx(7.0) and stats["max_mm"] == pytest.approx(7.0)


def test_inverse_undoes_warp_of_image_and_runs_under_xla():
    shape = (48, 40)
    yy, xx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    image = np.exp(-((yy - 24) ** 2 + (xx - 20) ** 2) / 60.0)
    u = np.stack([2.5 * np.sin(2 * np.pi * xx / 40), 2.0 * np.cos(2 * np.pi * yy / 48)], -1)
    u = u[None].astype(np.float32)
    fn = tf.function(lambda d: inv.invert_displacement(d, 60, 1e-4), jit_compile=True)
    w = fn(tf.constant(u)).numpy()
    warped = _sample(image[..., None], _grid(shape) + u[0])            # image(x + u(x))
    back = _sample(warped, _grid(shape) + w[0])[..., 0]              # warped(y + w(y))
    inner = (slice(6, -6), slice(6, -6))
    assert np.abs(back - image)[inner].max() < 0.02
    assert np.abs(warped[..., 0] - image)[inner].max() > 0.2          # the warp did move it
    # a warm start from the answer stays there
    again = inv.invert_displacement(u, 5, 0.0, init=w).numpy()
    np.testing.assert_allclose(again, w, atol=1e-3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="iterations"):
        inv.invert_displacement(np.zeros((1, 4, 4, 2), np.float32), iterations=0)
    with pytest.raises(ValueError, match="init"):
        inv.invert_displacement(np.zeros((1, 4, 4, 2), np.float32), init=np.zeros((1, 4, 5, 2)))
