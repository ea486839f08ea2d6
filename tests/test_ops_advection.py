"""RK4 map advection against analytic solutions, and the multi-Gaussian Fourier smoother against a
spatial periodic convolution."""
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from tfreg.ops import advection, fourier


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)


@pytest.mark.parametrize("shape", [(12, 10), (8, 9, 7)])
def test_constant_velocity_is_an_exact_translation_of_an_affine_map(shape):
    """phi_t = phi_0(x - c t): a constant velocity shifts the map; phi_0 affine stays exact."""
    n = len(shape)
    rng = np.random.default_rng(0)
    c = rng.normal(0, 1.5, n)
    a = np.eye(n) + rng.normal(0, 0.05, (n, n))
    b = rng.normal(0, 1.0, n)
    x = _grid(shape)
    phi0 = x @ a.T + b
    vel = np.broadcast_to(c, (1, *shape, n)).astype(np.float32)
    out = advection.advect_map(vel, (phi0 - x)[None].astype(np.float32), steps=10).numpy()[0]
    expect = (x - c) @ a.T + b - x
    np.testing.assert_allclose(out, expect, atol=2e-4)


def _rotation(shape, omega):
    centre = (np.array(shape) - 1) / 2.0
    x = _grid(shape) - centre
    v = np.zeros(shape + (2,))
    v[..., 0], v[..., 1] = -omega * x[..., 1], omega * x[..., 0]
    return x, v


def test_rotation_field_conserves_distances():
    """v = omega J (x - c): phi_1 is a rotation by -omega, so pairwise distances are kept."""
    shape, omega = (16, 16), np.pi / 4
    x, v = _rotation(shape, omega)
    disp = advection.advect_map(v[None].astype(np.float32), steps=10).numpy()[0]
    phi = (x + disp).reshape(-1, 2)
    pts = x.reshape(-1, 2)
    idx = np.random.default_rng(1).choice(len(pts), (200, 2))
    d0 = np.linalg.norm(pts[idx[:, 0]] - pts[idx[:, 1]], axis=1)
    d1 = np.linalg.norm(phi[idx[:, 0]] - phi[idx[:, 1]], axis=1)
    np.testing.assert_allclose(d1, d0, rtol=1e-5, atol=1e-4)
    # and it is the rotation by -omega (exact map, analytic)
    rot = np.array([[np.cos(omega), np.sin(omega)], [-np.sin(omega), np.cos(omega)]])
    np.testing.assert_allclose(phi, pts @ rot.T, atol=1e-4)


def test_rk4_converges_at_fourth_order():
    """Error against the exact rotation drops ~16x per doubling of the step count (float64)."""
    shape, omega = (8, 8), 2.0
    x, v = _rotation(shape, omega)
    rot = np.array([[np.cos(omega), np.sin(omega)], [-np.sin(omega), np.cos(omega)]])
    exact = x @ rot.T - x
    errors = []
    for steps in (3, 6, 12):
        disp = advection.advect_map(tf.constant(v[None]), steps=steps).numpy()[0]
        errors.append(np.abs(disp - exact).max())
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    assert np.all(ratios > 13.0) and np.all(ratios < 19.0), (errors, ratios)


def test_nonlinear_velocity_matches_characteristics():
    """Smooth non-uniform v: phi_1(x) = X(1) with dX/ds = -v(X), X(0) = x (traced with SciPy)."""
    from scipy.integrate import solve_ivp
    shape = (40, 40)
    x = _grid(shape)
    k = 2 * np.pi / 39.0

    def vel(p):
        return np.stack([1.5 * np.sin(k * p[..., 1]), 1.0 * np.cos(k * p[..., 0])], -1)

    disp = advection.advect_map(vel(x)[None], steps=10).numpy()[0]
    sol = solve_ivp(lambda t, y: -vel(y.reshape(-1, 2)).ravel(), (0, 1), x.ravel(), rtol=1e-9,
                    atol=1e-9)
    expect = sol.y[:, -1].reshape(x.shape) - x
    inner = (slice(4, -4), slice(4, -4))   # away from the one-sided borders
    err = np.abs(disp[inner] - expect[inner]).max()
    assert err < 0.02, err                  # O(h^2) central differences; |u| is ~1.5 voxels
    assert np.abs(expect[inner]).max() > 1.0


def test_advection_checks_shapes():
    with pytest.raises(ValueError, match="ndims"):
        advection.advect_map(tf.zeros((1, 8, 8, 3)))


@pytest.mark.parametrize("shape", [(20, 17), (12, 10, 9)])
def test_multi_gaussian_equals_spatial_periodic_gaussian(shape):
    """Fourier multi-Gaussian smoothing = sum of normalised spatial Gaussian convolutions
    (SciPy, mode='wrap'), sigma a fraction of each axis in units of 1 / (S - 1)."""
    rng = np.random.default_rng(2)
    field = rng.normal(size=(1, *shape, 2)).astype(np.float32)
    sigmas, weights = (0.05, 0.1, 0.15), (0.2, 0.3, 0.5)
    mult = fourier.multi_gaussian_multiplier(shape, sigmas, weights)
    out = fourier.apply_multiplier(field, mult).numpy()[0]
    expect = np.zeros(shape + (2,))
    offsets = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, len(shape))
    for s, w in zip(sigmas, weights):
        # sampled Gaussian at the periodic distance, in voxels (sigma * (S - 1)), sum 1
        dist = np.minimum(offsets, np.array(shape) - offsets)
        kern = np.exp(-0.5 * np.sum((dist / (s * (np.array(shape) - 1))) ** 2, axis=1))
        kern /= kern.sum()
        for off, kv in zip(offsets, kern):      # circular convolution: sum_y k(y) f(x - y)
            expect += w * kv * np.roll(field[0], tuple(off), axis=tuple(range(len(shape))))
    np.testing.assert_allclose(out, expect, atol=2e-5)


def test_gaussian_multiplier_preserves_the_mean():
    mult = fourier.multi_gaussian_multiplier((16, 12, 10), (0.05, 0.1, 0.15, 0.2, 0.25),
                                             np.arange(1, 6) / 15)
    assert abs(mult[0, 0, 0] - 1.0) < 1e-12
    assert np.all(np.abs(mult) <= 1.0 + 1e-12)


def test_symmetric_multiplier_gradient_is_the_filter_in_3d_and_matches_autodiff_in_2d():
    """3D: d sum(w * K x) / dx = K w (self-adjoint); 2D: equals TensorFlow's own FFT gradient."""
    rng = np.random.default_rng(5)
    for shape in ((8, 7, 6), (10, 9)):
        mult = fourier.multi_gaussian_multiplier(shape, (0.1, 0.2), (0.4, 0.6))
        x = tf.Variable(rng.normal(size=(1, *shape, 2)).astype(np.float32))
        w = tf.constant(rng.normal(size=(1, *shape, 2)).astype(np.float32))
        with tf.GradientTape() as tape:
            y = tf.reduce_sum(w * fourier.apply_symmetric_multiplier(x, mult))
        grad = tape.gradient(y, x).numpy()
        np.testing.assert_allclose(grad, fourier.apply_multiplier(w, mult).numpy(), atol=1e-5)
        if len(shape) == 2:
            with tf.GradientTape() as tape:
                y = tf.reduce_sum(w * fourier.apply_multiplier(x, mult))
            np.testing.assert_allclose(grad, tape.gradient(y, x).numpy(), atol=1e-5)


def test_unrolled_steps_equal_the_loop_and_auto_unrolls_large_grids():
    """loop=False runs the same RK4 steps (values and gradients); "auto" builds no loop from
    UNROLL_MIN_VOXELS voxels up and keeps it below."""
    rng = np.random.default_rng(7)
    vel = tf.constant(rng.normal(0, 0.8, (1, 9, 11, 2)).astype(np.float32))
    init = tf.constant(rng.normal(0, 0.5, (1, 9, 11, 2)).astype(np.float32))
    out = []
    for loop in (True, False):
        with tf.GradientTape() as tape:
            tape.watch([vel, init])
            disp = advection.advect_map(vel, init, steps=5, loop=loop)
            loss = tf.reduce_sum(tf.sin(disp))
        out.append([disp.numpy(), *[g.numpy() for g in tape.gradient(loss, [vel, init])]])
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    def ops(shape):
        fn = tf.function(lambda v: advection.advect_map(v, steps=3))
        graph = fn.get_concrete_function(tf.TensorSpec((1, *shape, 2), tf.float32)).graph
        return {op.type for op in graph.get_operations()}

    side = int(np.ceil(np.sqrt(advection.UNROLL_MIN_VOXELS)))
    assert not {"While", "StatelessWhile"} & ops((side, side))
    assert {"While", "StatelessWhile"} & ops((16, 16))
    with pytest.raises(ValueError, match="loop"):
        advection.advect_map(vel, loop="yes")
