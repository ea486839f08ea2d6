"""tfreg.ops against independent references (NumPy/SciPy, hand-computed values)."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from tfreg.ops import compile_cache, differences, fields, filters, intensity, sampling, similarity


# ------------------------------------------------------------------------------ sampling
def test_warp_rejects_batch_mismatch_naming_both_shapes():
    img = np.zeros((2, 8, 8, 1), "float32")
    disp = np.zeros((1, 8, 8, 2), "float32")
    with pytest.raises(ValueError, match=r"image.shape=\(2, 8, 8, 1\), disp.shape=\(1, 8, 8, 2\)"):
        sampling.warp(img, disp)
    with pytest.raises(ValueError, match="same batch size"):
        sampling.warp(img[:1], np.zeros((2, 8, 8, 2), "float32"), jit=True)


def test_warp_batch_mismatch_in_graph_and_xla():
    spec = [tf.TensorSpec([None, 8, 8, 1]), tf.TensorSpec([None, 8, 8, 2])]
    img, disp = tf.ones((2, 8, 8, 1)), tf.zeros((1, 8, 8, 2))
    graph = tf.function(sampling.warp, input_signature=spec)
    with pytest.raises(tf.errors.InvalidArgumentError, match="same batch size"):
        graph(img, disp)
    xla = tf.function(sampling.warp, input_signature=spec, jit_compile=True)
    out = xla(img, disp).numpy()
    assert np.isnan(out).all()  # not silently the first image only
    ok = xla(img, tf.zeros((2, 8, 8, 2))).numpy()
    np.testing.assert_array_equal(ok, 1.0)


def test_warp_matches_scipy_map_coordinates():
    rng = np.random.default_rng(0)
    img = rng.random((2, 12, 10, 1)).astype("float32")
    disp = rng.normal(0, 1.5, (2, 12, 10, 2)).astype("float32")
    out = sampling.warp(img, disp).numpy()
    grid = np.stack(np.meshgrid(np.arange(12), np.arange(10), indexing="ij"), -1)
    for b in range(2):
        coords = np.moveaxis(grid + disp[b], -1, 0)
        want = ndimage.map_coordinates(img[b, ..., 0].astype(np.float64), coords, order=1,
                                       mode="nearest")
        np.testing.assert_allclose(out[b, ..., 0], want, atol=1e-5)


# ------------------------------------------------------------------------------ fields
def test_affine_after_disp_equals_composed_warps():
    shape = (9, 11)
    theta = np.array([[[0.9, 0.2, 1.5], [-0.1, 1.1, -2.0]]], "float32")
    flow = np.random.default_rng(1).normal(0, 0.7, (1, *shape, 2)).astype("float32")
    got = fields.affine_after_disp(theta, flow).numpy()[0]
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    c = (np.asarray(shape) - 1) / 2
    want = (x + flow[0] - c) @ theta[0, :, :2].T + theta[0, :, 2] + c - x
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_integrate_svf_modes_agree():
    v = np.random.default_rng(2).normal(0, 1.0, (1, 12, 12, 2)).astype("float32")
    plain = fields.integrate_svf(v, 5)
    for kwargs in ({"recompute": True}, {"loop": True}, {"jit": True}):
        np.testing.assert_allclose(fields.integrate_svf(v, 5, **kwargs), plain, atol=1e-5)
    vt = tf.constant(v)
    grads = []
    for kwargs in ({}, {"recompute": True}):
        with tf.GradientTape() as tape:
            tape.watch(vt)
            loss = tf.reduce_sum(fields.integrate_svf(vt, 4, **kwargs) ** 2)
        grads.append(tape.gradient(loss, vt).numpy())
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-5)


def test_upsample_level_inverts_pool_geometry():
    # a linear ramp on the coarse grid (voxel q at fine 2q) is reproduced exactly inside
    coarse = np.arange(5, dtype="float32")[None, :, None, None] * np.ones((1, 5, 3, 1), "float32")
    fine = fields.upsample_level(coarse, (9, 5)).numpy()[0, :, 0, 0]
    np.testing.assert_allclose(fine, np.arange(9) / 2.0)


# ------------------------------------------------------------------------------ filters
def test_gaussian_matches_scipy():
    x = np.random.default_rng(3).random((1, 20, 17, 1)).astype("float32")
    got = filters.gaussian(x, 1.5, truncate=3.0).numpy()[0, ..., 0]
    want = ndimage.gaussian_filter(x[0, ..., 0].astype(np.float64), 1.5, mode="constant",
                                   truncate=3.0)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_box_sum_and_pool_half_by_hand():
    x = np.arange(6, dtype="float32").reshape(1, 6, 1, 1)
    np.testing.assert_allclose(filters.box_sum(x, (3, 1)).numpy().ravel(), [1, 3, 6, 9, 12, 9])
    np.testing.assert_allclose(filters.pool_half(x).numpy().ravel(), [0.5, 2.0, 4.0])


# ------------------------------------------------------------------------------ differences
@pytest.mark.parametrize("ndims", [2, 3])
def test_central_jacobian_determinant_matches_numpy(ndims):
    shape = (7, 6, 5)[:ndims]
    u = np.random.default_rng(4).normal(0, 0.4, (*shape, ndims))
    det = differences.jacobian_determinant(u[None], "central").numpy()[0]
    jac = np.empty(shape + (ndims, ndims))
    for c in range(ndims):
        g = np.gradient(u[..., c], axis=tuple(range(ndims)))
        for d in range(ndims):
            jac[..., c, d] = g[d] + (c == d)
    np.testing.assert_allclose(det, np.linalg.det(jac), atol=1e-12)


def test_forward_jacobian_of_affine_is_exact():
    a = np.array([[1.2, 0.3], [-0.2, 0.7]])
    x = np.stack(np.meshgrid(np.arange(6.0), np.arange(5.0), indexing="ij"), -1)
    u = x @ (a - np.eye(2)).T
    det = differences.jacobian_determinant(u[None], "forward").numpy()[0]
    assert det.shape == (5, 4)
    np.testing.assert_allclose(det, np.linalg.det(a), atol=1e-12)


# ------------------------------------------------------------------------------ similarity
def test_signed_local_ncc_by_hand():
    # one 3x3 window at the centre of a 3x3 image: Pearson r of the nine values
    rng = np.random.default_rng(5)
    a, b = rng.random((3, 3)), rng.random((3, 3))
    cc, _ = similarity.local_ncc_map(a[None, ..., None], b[None, ..., None], 3, squared=False,
                                     eps=1e-12, eps_mode="add")
    r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert float(cc[0, 1, 1, 0]) == pytest.approx(r, abs=1e-5)


@pytest.mark.parametrize("shape,win", [((1, 14, 12, 2), 5), ((2, 9, 10, 8, 1), (3, 5, 3))])
@pytest.mark.parametrize("squared,eps_mode", [(True, "clamp"), (False, "add"), (False, "clamp")])
@pytest.mark.parametrize("jit", [False, True])
def test_local_ncc_with_precomputed_fixed_stats(shape, win, squared, eps_mode, jit):
    """`fixed_window_stats` computed once give the same map, weights and gradient (with respect
    to the moving image) as the five window sums of every call, plain and compiled; the fixed
    image's statistics equal NumPy's window sums."""
    rng = np.random.default_rng(11)
    fixed = tf.constant(rng.random(shape, np.float32))
    moving = tf.constant(rng.random(shape, np.float32))
    stats = similarity.fixed_window_stats(fixed, win)
    ndims = len(shape) - 2
    wins = (win,) * ndims if isinstance(win, int) else win
    f64 = fixed.numpy().astype(np.float64)
    pad = [(0, 0)] + [((w - 1) // 2, w // 2) for w in wins] + [(0, 0)]
    s_i = ndimage.uniform_filter(np.pad(f64, pad), (1, *wins, 1), mode="constant")
    s_ii = ndimage.uniform_filter(np.pad(f64 ** 2, pad), (1, *wins, 1), mode="constant")
    crop = (slice(None),) + tuple(slice((w - 1) // 2, (w - 1) // 2 + n)
                                  for w, n in zip(wins, shape[1:-1])) + (slice(None),)
    n = float(np.prod(wins) * shape[-1])
    s_i = s_i[crop].sum(-1) * np.prod(wins)
    s_ii = s_ii[crop].sum(-1) * np.prod(wins)
    np.testing.assert_allclose(stats[..., 0].numpy(), s_i, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats[..., 1].numpy(), s_ii - s_i ** 2 / n, rtol=1e-4, atol=1e-3)

    def value_and_grad(fixed_stats):
        with tf.GradientTape() as tape:
            tape.watch(moving)
            cc, var = similarity.local_ncc_map(fixed, moving, win, squared=squared, eps=1e-3,
                                               eps_mode=eps_mode, jit=jit,
                                               fixed_stats=fixed_stats)
            loss = similarity.local_ncc(fixed, moving, win, squared=squared, eps=1e-3,
                                        eps_mode=eps_mode, contrast_floor=0.05, jit=jit,
                                        fixed_stats=fixed_stats)
        return cc, var, loss, tape.gradient(loss, moving)

    plain, pre = value_and_grad(None), value_and_grad(stats)
    for a, b in zip(plain, pre):
        scale = float(tf.reduce_max(tf.abs(a))) + 1e-6
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=2e-5 * scale)
    assert float(tf.reduce_max(tf.abs(plain[3]))) > 0


@pytest.mark.parametrize("shape,win", [((1, 20, 18, 2), 5), ((2, 10, 12, 9, 1), (3, 5, 3))])
@pytest.mark.parametrize("squared,eps_mode", [(True, "clamp"), (False, "add")])
def test_local_ncc_compiled_matches_plain_graph(monkeypatch, shape, win, squared, eps_mode):
    """With ``jit="auto"`` a large enough NCC runs as its own XLA function even inside a plain
    (non-XLA) graph such as a training step; values and gradients equal the plain graph's."""
    monkeypatch.setattr(compile_cache, "AUTO_MIN_VOXELS", 64)  # these tiny images count as large
    compile_cache.clear()
    rng = np.random.default_rng(8)
    fixed = tf.constant(rng.random(shape, np.float32))
    moving = tf.Variable(rng.random(shape, np.float32))

    def value_and_grad(jit):
        @tf.function  # a plain graph, as the training step is
        def step():
            with tf.GradientTape() as tape:
                loss = similarity.local_ncc(fixed, moving, win, squared=squared, eps=1e-3,
                                            eps_mode=eps_mode, contrast_floor=0.05, jit=jit)
            return loss, tape.gradient(loss, moving)
        return step()

    plain_loss, plain_grad = value_and_grad(False)
    assert compile_cache.size() == 0
    auto_loss, auto_grad = value_and_grad("auto")
    assert compile_cache.size() == 1  # the compiled NCC
    assert float(auto_loss) == pytest.approx(float(plain_loss), rel=1e-5)
    scale = float(tf.reduce_max(tf.abs(plain_grad)))
    assert scale > 0
    np.testing.assert_allclose(auto_grad.numpy(), plain_grad.numpy(), atol=1e-4 * scale)


def test_contrast_weighting_ignores_flat_windows():
    rng = np.random.default_rng(6)
    fixed = np.zeros((1, 32, 32, 1), "float32")
    fixed[:, :, :16] = rng.random((1, 32, 16, 1))
    moving = fixed.copy()
    moving[:, :, 16:] = rng.random((1, 32, 16, 1))  # unrelated texture where fixed is flat
    plain = float(similarity.local_ncc(fixed, moving, 5, squared=False, eps=1e-3, eps_mode="add"))
    weighted = float(similarity.local_ncc(fixed, moving, 5, squared=False, eps=1e-3,
                                          eps_mode="add", contrast_floor=0.03))
    # the plain mean counts the unrelated half (about 0.5); weighting leaves the border windows
    assert weighted > 0.85 and plain < 0.6


# ------------------------------------------------------------------------------ intensity
def test_intensity_modes():
    x = np.arange(101, dtype=np.float32)
    np.testing.assert_allclose(intensity.normalize_percentile(x, 10, 90)[[0, 50, 100]], [0, 0.5, 1])
    m = intensity.fit_intensity_map(x, "zscore")
    assert abs(m.apply(x).mean()) < 1e-5 and m.apply(x).std() == pytest.approx(1, abs=1e-5)
    assert intensity.fit_intensity_map(np.full(5, 3.0), "minmax").apply(np.full(5, 3.0)).max() == 0


# ------------------------------------------------------------------------------ compile cache
def test_compile_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(compile_cache, "MAX_ENTRIES", 3)
    compile_cache.clear()
    built = []
    for k in range(5):
        compile_cache.cached(("t", k), lambda k=k: built.append(k) or k)
    assert compile_cache.size() == 3
    assert compile_cache.cached(("t", 4), lambda: -1) == 4  # still there
    assert compile_cache.cached(("t", 0), lambda: -1) == -1  # evicted, rebuilt
    compile_cache.clear()


@pytest.mark.parametrize("shape,out_shape,channels,jit", [
    ((7, 9), (7, 9), 1, False), ((5, 6, 7), (5, 6, 7), 3, False), ((1, 6, 7), (1, 6, 7), 2, False),
    ((5, 6, 7), (4, 3, 5), 1, False), ((5, 6, 7), (4, 3, 5), 3, True)])
def test_warp_lean_gradient_matches_autodiff_and_finite_differences(shape, out_shape, channels,
                                                                    jit):
    """`warp(lean_gradient=True)`: the hand-written backward equals autodiff through the gathers
    (float64; displacements inside, outside (clamped: no gradient) and on integer positions,
    where both take the same one-sided derivative) and central differences along random
    directions (away from integer positions, where the interpolant has kinks)."""
    rng = np.random.default_rng(0)
    image = tf.constant(rng.normal(size=(2, *shape, channels)))
    disp = tf.constant(rng.normal(0, 3, (2, *out_shape, len(shape))))     # another grid too
    dy = tf.constant(rng.normal(size=(2, *out_shape, channels)))

    def loss(img, d, lean):
        return tf.reduce_sum(sampling.warp(img, d, jit=jit, lean_gradient=lean) * dy)

    def gradients(d, lean):
        with tf.GradientTape() as tape:
            tape.watch([image, d])
            value = loss(image, d, lean)
        return [g.numpy() for g in tape.gradient(value, [image, d])]

    rounded = tf.constant(np.round(disp.numpy()))               # integer sample positions
    for d in (disp, rounded):
        for auto, lean in zip(gradients(d, False), gradients(d, True)):
            np.testing.assert_allclose(lean, auto, rtol=1e-10, atol=1e-12)
    grads = {True: gradients(disp, True)}
    assert np.abs(grads[True][1]).max() > 0.1
    eps = 1e-6
    for _ in range(2):
        d_img, d_disp = rng.normal(size=image.shape), rng.normal(size=disp.shape)
        numeric = (float(loss(image + eps * d_img, disp + eps * d_disp, True))
                   - float(loss(image - eps * d_img, disp - eps * d_disp, True))) / (2 * eps)
        analytic = float((grads[True][0] * d_img).sum() + (grads[True][1] * d_disp).sum())
        assert analytic == pytest.approx(numeric, rel=1e-5)
