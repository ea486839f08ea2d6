"""Correctness of tfreg.layers against independent expectations (2D and 3D)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import keras
from scipy import ndimage

from gradcheck import check_directional_derivatives
from tfreg import layers as L
from tfreg.synthetic import smooth_random_field

SHAPES = {2: (14, 17), 3: (10, 12, 9)}
ndims_param = pytest.mark.parametrize("ndims", [2, 3])


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype("float64")


def _scipy_warp(img, disp, order=1):
    """(B,*S,C), (B,*S,N) -> SciPy map_coordinates with clamped (nearest) border."""
    out = np.empty(disp.shape[:-1] + img.shape[-1:], "float64")
    for b in range(img.shape[0]):
        loc = np.moveaxis(_grid(disp.shape[1:-1]) + disp[b], -1, 0)
        for c in range(img.shape[-1]):
            out[b, ..., c] = ndimage.map_coordinates(img[b, ..., c].astype("float64"), loc,
                                                     order=order, mode="nearest")
    return out


def _smooth(shape, max_disp, seed, smoothness=3.0):
    return smooth_random_field(shape, max_disp, smoothness, np.random.default_rng(seed))


# ---------------------------------------------------------------------------------------------
# SpatialTransformer / warp
# ---------------------------------------------------------------------------------------------
@ndims_param
def test_integer_shift_equals_roll_in_interior(ndims):
    rng = np.random.default_rng(0)
    shape = SHAPES[ndims]
    img = rng.normal(size=(1, *shape, 2)).astype("float32")
    shift = np.arange(1, ndims + 1)  # voxels along axes i, j(, k)
    disp = np.broadcast_to(shift, (1, *shape, ndims)).astype("float32")
    got = np.asarray(L.SpatialTransformer()([img, disp]))
    want = np.roll(img, tuple(-shift), axis=tuple(range(1, ndims + 1)))  # pull: img(x + s)
    inside = (0, *(slice(0, n - s) for n, s in zip(shape, shift)))
    # integer coordinates: one corner has weight exactly 1 -> exact up to float rounding
    np.testing.assert_allclose(got[inside], want[inside], atol=1e-6)
    # outside, the border voxel is repeated (clamp)
    last = (0, *(slice(n - 1, n) for n in shape))
    np.testing.assert_allclose(got[last], img[(0, *(slice(n - 1, n) for n in shape))], atol=1e-6)


@ndims_param
@pytest.mark.parametrize("interp", ["linear", "nearest"])
def test_identity_returns_input_exactly(ndims, interp):
    rng = np.random.default_rng(1)
    img = rng.normal(size=(2, *SHAPES[ndims], 3)).astype("float32")
    disp = np.zeros((2, *SHAPES[ndims], ndims), "float32")
    np.testing.assert_array_equal(np.asarray(L.warp(img, disp, interp)), img)
    eye = np.tile(np.eye(ndims, ndims + 1, dtype="float32"), (2, 1, 1))
    np.testing.assert_array_equal(np.asarray(L.SpatialTransformer(interp)([img, eye])), img)


@ndims_param
def test_rotation_affine_equals_rot90(ndims):
    rng = np.random.default_rng(2)
    shape = (11, 11) if ndims == 2 else (9, 9, 6)  # axes 0, 1 square so rot90 stays on the grid
    img = rng.normal(size=(1, *shape, 1)).astype("float32")
    # centred affine: y - c = R (x - c); R=[[0,1],[-1,0]] gives y = (x1, n-1-x0) = np.rot90 (axes 0,1)
    rot = np.eye(ndims, ndims + 1)
    rot[:2, :2] = [[0, 1], [-1, 0]]
    got = np.asarray(L.SpatialTransformer()([img, rot[None].astype("float32")]))
    want = np.rot90(img, k=1, axes=(1, 2))
    np.testing.assert_allclose(got, want, atol=1e-5)  # coordinates integral up to float rounding


@ndims_param
def test_linear_ramp_exact_under_fractional_shift(ndims):
    shape = SHAPES[ndims]
    slope = np.array([0.7, -1.3, 0.4][:ndims])
    img = (_grid(shape) @ slope + 2.0)[None, ..., None].astype("float32")
    rng = np.random.default_rng(3)
    disp = (rng.uniform(-1.5, 1.5, size=(1, *shape, ndims))).astype("float32")
    got = np.asarray(L.warp(img, disp))[0, ..., 0]
    loc = _grid(shape) + disp[0]
    want = loc @ slope + 2.0
    inside = np.all((loc >= 0) & (loc <= np.array(shape) - 1), axis=-1)
    assert inside.mean() > 0.5
    # linear interpolation reproduces a linear function exactly; float32 values up to ~30
    np.testing.assert_allclose(got[inside], want[inside], atol=1e-4)
    # constant fractional shift
    s = np.array([0.25, 0.6, 0.4][:ndims])
    got = np.asarray(L.warp(img, np.broadcast_to(s, (1, *shape, ndims)).astype("float32")))[0, ..., 0]
    want = (_grid(shape) + s) @ slope + 2.0
    interior = tuple(slice(0, n - 1) for n in shape)
    np.testing.assert_allclose(got[interior], want[interior], atol=1e-4)


@ndims_param
@pytest.mark.parametrize("channels", [1, 3])
def test_matches_scipy_map_coordinates(ndims, channels):
    rng = np.random.default_rng(4)
    shape = SHAPES[ndims]
    img = rng.random((2, *shape, channels)).astype("float32")
    disp = np.stack([_smooth(shape, 3.0, s) for s in (5, 6)]).astype("float32")
    want = _scipy_warp(img, disp)
    np.testing.assert_allclose(np.asarray(L.warp(img, disp)), want, atol=1e-5)  # float32 rounding
    # also under XLA (the fast path)
    jit = tf.function(L.warp, jit_compile=True)
    np.testing.assert_allclose(np.asarray(jit(img, disp)), want, atol=1e-5)


@ndims_param
def test_image_and_field_on_different_grids(ndims):
    rng = np.random.default_rng(5)
    img = rng.random((1, *[n + 3 for n in SHAPES[ndims]], 2)).astype("float32")
    disp = (rng.normal(size=(1, *SHAPES[ndims], ndims)) * 2).astype("float32")
    want = _scipy_warp(img, disp)
    got = np.asarray(L.SpatialTransformer()([img, disp]))
    assert got.shape == (1, *SHAPES[ndims], 2)
    np.testing.assert_allclose(got, want, atol=1e-5)


@ndims_param
def test_nearest_labels_only_existing_labels(ndims):
    rng = np.random.default_rng(6)
    shape = SHAPES[ndims]
    labels = rng.choice(np.array([0, 3, 7, 42], "int32"), size=(1, *shape, 1))
    disp = (rng.normal(size=(1, *shape, ndims)) * 2).astype("float32")
    got = np.asarray(L.SpatialTransformer("nearest")([labels, disp]))
    assert got.dtype == np.int32
    assert set(np.unique(got)) <= {0, 3, 7, 42}
    # independent reference: SciPy order 0 (no exact .5 ties in a random normal field)
    np.testing.assert_array_equal(got, _scipy_warp(labels, disp, order=0).astype("int32"))


@ndims_param
def test_nearest_rounding_of_ties(ndims):
    shape = SHAPES[ndims]
    img = _grid(shape)[None, ..., :1].astype("float32")  # value = index along axis 0
    disp = np.zeros((1, *shape, ndims), "float32")
    disp[..., 0] = 0.5
    half_even = np.asarray(L.warp(img, disp, "nearest"))[0, :-1, ..., 0]
    half_up = np.asarray(L.warp(img, disp, "nearest", rounding="half_up"))[0, :-1, ..., 0]
    i = np.arange(shape[0] - 1).reshape((-1,) + (1,) * (ndims - 1))
    # round half to even (tf.round, numpy.round): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 ...
    np.testing.assert_array_equal(half_even, np.broadcast_to(np.round(i + 0.5), half_even.shape))
    np.testing.assert_array_equal(half_up, np.broadcast_to(i + 1.0, half_up.shape))


@ndims_param
def test_fill_value_constant_outside(ndims):
    rng = np.random.default_rng(7)
    shape = SHAPES[ndims]
    img = rng.random((1, *shape, 2)).astype("float32")
    disp = np.stack([_smooth(shape, 6.0, 8)]).astype("float32")
    loc = _grid(shape) + disp[0]
    outside = np.any((loc < 0) | (loc > np.array(shape) - 1), axis=-1)
    assert 0.05 < outside.mean() < 0.9
    got = np.asarray(L.SpatialTransformer(fill_value=-3.0)([img, disp]))[0]
    want = _scipy_warp(img, disp)[0]
    np.testing.assert_allclose(got[~outside], want[~outside], atol=1e-5)
    np.testing.assert_array_equal(got[outside], -3.0)


@ndims_param
def test_batch_elements_use_their_own_field(ndims):
    rng = np.random.default_rng(8)
    shape = SHAPES[ndims]
    img = rng.random((3, *shape, 1)).astype("float32")
    disp = (rng.normal(size=(3, *shape, ndims)) * 2).astype("float32")
    got = np.asarray(L.warp(img, disp))
    for b in range(3):
        np.testing.assert_allclose(got[b:b + 1], np.asarray(L.warp(img[b:b + 1], disp[b:b + 1])),
                                   atol=0)


# ---------------------------------------------------------------------------------------------
# affine, integration, composition, rescaling
# ---------------------------------------------------------------------------------------------
@ndims_param
def test_affine_to_field_matches_numpy(ndims):
    rng = np.random.default_rng(9)
    shape = SHAPES[ndims]
    aff = np.eye(ndims, ndims + 1) + rng.normal(scale=0.1, size=(ndims, ndims + 1))
    aff[:, -1] = rng.normal(scale=2, size=ndims)
    c = (np.array(shape) - 1) / 2
    x = _grid(shape)
    want = (x - c) @ aff[:, :ndims].T + aff[:, -1] + c - x
    got = np.asarray(L.AffineToField(shape)(aff[None].astype("float32")))[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    # homogeneous (N+1, N+1) input is accepted and gives the same field
    hom = np.eye(ndims + 1)
    hom[:ndims] = aff
    np.testing.assert_allclose(np.asarray(L.affine_to_disp(hom[None], shape))[0], want, atol=1e-5)
    # SpatialTransformer with the affine equals warping by its dense field
    img = rng.random((1, *shape, 1)).astype("float32")
    np.testing.assert_allclose(np.asarray(L.SpatialTransformer()([img, aff[None].astype("float32")])),
                               _scipy_warp(img, want[None]), atol=1e-5)


@ndims_param
def test_vecint_of_constant_field_is_translation(ndims):
    shape = SHAPES[ndims]
    v = np.broadcast_to(np.array([1.7, -2.3, 0.6][:ndims]), (1, *shape, ndims)).astype("float32")
    got = np.asarray(L.VecInt(7)(v))
    np.testing.assert_allclose(got, v, atol=1e-5)  # u + u exactly doubles: only rounding
    np.testing.assert_array_equal(np.asarray(L.VecInt(0)(v)), v)


@ndims_param
def test_exp_v_and_exp_minus_v_compose_to_identity(ndims):
    shape = (32, 32) if ndims == 2 else (20, 20, 20)
    v = _smooth(shape, 2.0, 10, smoothness=4.0)[None]  # <= 2 voxels, Gaussian sigma 4 voxels
    fwd, bwd = L.integrate_svf(v, 7), L.integrate_svf(-v, 7)
    residual = np.asarray(L.compose(fwd, bwd))[0]
    interior = tuple(slice(4, n - 4) for n in shape)  # away from the clamped border
    err = np.linalg.norm(residual[interior], axis=-1)
    # stated a priori: interpolation error of a smooth field << 0.1 voxel; mean << 0.02 voxel
    assert err.max() < 0.1, err.max()
    assert err.mean() < 0.02, err.mean()
    assert np.abs(np.asarray(fwd)).max() > 0.5  # not a trivial field


@ndims_param
def test_compose_two_translations_is_their_sum(ndims):
    shape = SHAPES[ndims]
    a = np.broadcast_to(np.array([1.5, -0.5, 2.0][:ndims]), (1, *shape, ndims)).astype("float32")
    b = np.broadcast_to(np.array([-0.25, 1.0, 0.75][:ndims]), (1, *shape, ndims)).astype("float32")
    np.testing.assert_allclose(np.asarray(L.ComposeTransform()([a, b])), a + b, atol=1e-6)


@ndims_param
def test_compose_order_matches_sequential_warps(ndims):
    shape = (32, 32) if ndims == 2 else (20, 20, 20)
    slope = np.array([0.5, 0.25, -0.3][:ndims])
    img = (_grid(shape) @ slope)[None, ..., None].astype("float32")  # linear image
    first = _smooth(shape, 1.5, 11)[None]  # |component| <= 1.5 voxels
    second = _smooth(shape, 1.5, 12)[None]
    seq = np.asarray(L.warp(L.warp(img, first), second))
    one = np.asarray(L.warp(img, L.compose(first, second)))
    # For a linear image, interp(img o (id + first)) = img + slope . interp(first), so both routes
    # agree exactly wherever nothing is clamped: 4 voxels from the border (2 x 1.5 + 1 corner).
    interior = (0, *(slice(4, n - 4) for n in shape))
    np.testing.assert_allclose(one[interior], seq[interior], atol=1e-5)  # float32 rounding, values < 20
    assert np.abs(one - img).max() > 0.5  # the fields do move the image


@ndims_param
def test_affine_compose_equals_matrix_product(ndims):
    shape = SHAPES[ndims]
    rng = np.random.default_rng(13)

    def rand_aff():
        a = np.eye(ndims, ndims + 1) + rng.normal(scale=0.05, size=(ndims, ndims + 1))
        a[:, -1] = rng.normal(scale=1.0, size=ndims)
        return a

    a1, a2 = rand_aff(), rand_aff()
    # apply a1 then a2: warped(x) = img(T1(T2(x))), both about the same centre
    h1, h2 = np.eye(ndims + 1), np.eye(ndims + 1)
    h1[:ndims], h2[:ndims] = a1, a2
    prod = (h1 @ h2)[:ndims]
    # two affines -> their matrix product (as an affine)
    got = np.asarray(L.ComposeTransform()([a1[None].astype("float32"), a2[None].astype("float32")]))
    np.testing.assert_allclose(got[0], prod, atol=1e-6)
    # dense first, affine second -> dense; affine fields are linear, so composing by linear
    # interpolation is exact where the intermediate point is inside (no clamping)
    dense1 = L.affine_to_disp(a1[None].astype("float32"), shape)
    got = np.asarray(L.ComposeTransform()([dense1, a2[None].astype("float32")]))
    want = np.asarray(L.affine_to_disp(prod[None], shape))
    loc_mid = _grid(shape) + np.asarray(L.affine_to_disp(a2[None], shape))[0]
    inside = np.all((loc_mid >= 0) & (loc_mid <= np.array(shape) - 1), axis=-1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(got[0][inside], want[0][inside], atol=1e-5)  # float32, values < 20


@ndims_param
@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_rescale_linear_field_is_exact(ndims, factor):
    shape = (8, 12) if ndims == 2 else (8, 12, 6)
    slope = np.array([0.3, -0.2, 0.5][:ndims])
    # a field whose every component is the same linear function of the voxel position
    field = np.repeat((_grid(shape) @ slope)[..., None], ndims, -1)[None].astype("float32")
    got = np.asarray(L.RescaleTransform(factor)(field))
    out_shape = tuple(int(n * factor) for n in shape)
    assert got.shape == (1, *out_shape, ndims)
    # "corners" grid: output voxel i samples input i * (n_in - 1) / (n_out - 1)
    coords = np.stack(np.meshgrid(*[np.linspace(0, n - 1, m) for n, m in zip(shape, out_shape)],
                                  indexing="ij"), -1)
    want = factor * (coords @ slope)
    np.testing.assert_allclose(got[0], np.repeat(want[..., None], ndims, -1), atol=1e-5)
    # "origin" grid: output voxel i samples input i / factor (clamped at the far border)
    got = np.asarray(L.rescale_field(field, factor, align="origin"))
    coords = np.stack(np.meshgrid(*[np.minimum(np.arange(m) / factor, n - 1)
                                    for n, m in zip(shape, out_shape)], indexing="ij"), -1)
    want = factor * (coords @ slope)
    np.testing.assert_allclose(got[0], np.repeat(want[..., None], ndims, -1), atol=1e-5)


@ndims_param
def test_resize_to_shape_and_constant(ndims):
    shape = SHAPES[ndims]
    img = np.full((2, *shape, 3), 4.5, "float32")
    out_shape = tuple(n + 5 for n in shape)
    got = np.asarray(L.resize(img, out_shape))
    assert got.shape == (2, *out_shape, 3)
    np.testing.assert_allclose(got, 4.5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
@ndims_param
@pytest.mark.parametrize("channels", [1, 2])
def test_gradients_match_finite_differences_float64(ndims, channels):
    rng = np.random.default_rng(14)
    shape = (6, 7) if ndims == 2 else (5, 6, 4)
    img = rng.random((2, *shape, channels))
    # sample points with fractional parts in [0.2, 0.8], some outside the volume (clamped): steps
    # of h=1e-4 along a direction never cross a voxel edge or the border (kinks of the sampler)
    cells = rng.integers(-2, np.array(shape) + 1, size=(2, *shape, ndims))
    disp = cells + rng.uniform(0.2, 0.8, (2, *shape, ndims)) - _grid(shape)[None]
    check_directional_derivatives(L.warp, [img, disp], rng)
    # clamped coordinates get no gradient, like clipping the coordinate
    d = tf.constant(disp)
    with tf.GradientTape() as tape:
        tape.watch(d)
        loss = tf.reduce_sum(L.warp(tf.constant(img), d))
    grad = np.asarray(tape.gradient(loss, d))
    loc = _grid(shape)[None] + disp
    clamped = (loc < 0) | (loc > np.array(shape) - 1)
    assert clamped.any() and np.all(grad[clamped] == 0)
    vel = _smooth(shape, 0.6, 22).astype("float64")[None]
    check_directional_derivatives(lambda v: L.integrate_svf(v, 3), [vel], rng)


@ndims_param
def test_layers_differentiable_in_float32(ndims):
    rng = np.random.default_rng(15)
    shape = SHAPES[ndims]
    img = tf.constant(rng.random((1, *shape, 1)).astype("float32"))
    vel = tf.constant(_smooth(shape, 1.0, 16)[None])
    with tf.GradientTape() as tape:
        tape.watch([img, vel])
        disp = L.VecInt(4)(vel)
        out = L.SpatialTransformer()([img, L.RescaleTransform(1.0)(disp)])
        loss = tf.reduce_sum(out * out)
    g_img, g_vel = tape.gradient(loss, [img, vel])
    assert g_img is not None and g_vel is not None
    assert np.all(np.isfinite(g_img)) and np.abs(np.asarray(g_vel)).sum() > 0


# ---------------------------------------------------------------------------------------------
# precision, serialisation, export
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def mixed_precision():
    old = keras.config.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    yield
    keras.mixed_precision.set_dtype_policy(old)


def test_mixed_precision_keeps_float32(mixed_precision):
    shape = (160, 4, 4)  # coordinates up to 159: float16 spacing there is 0.125 voxel
    rng = np.random.default_rng(17)
    img = rng.random((1, *shape, 1)).astype("float32")
    disp = rng.uniform(-0.5, 0.5, (1, *shape, 3)).astype("float32")
    x, u = keras.Input(shape + (1,)), keras.Input(shape + (3,))
    half_u = keras.layers.Activation("linear")(u)  # a float16 layer under the policy
    assert half_u.dtype == "float16"
    warped = L.SpatialTransformer()([x, half_u])
    field = L.VecInt(3)(half_u)
    resized = L.RescaleTransform(0.5)(field)
    composed = L.ComposeTransform()([field, half_u])
    model = keras.Model([x, u], [warped, field, resized, composed])
    assert all(o.dtype == "float32" for o in model.outputs)
    out = model([img, disp])
    assert all(o.dtype == tf.float32 for o in out)
    # float16 rounding of the *field* is unavoidable (it came from a float16 layer); the
    # coordinates themselves must stay float32: compare to SciPy with the float16-rounded field
    want = _scipy_warp(img, disp.astype("float16").astype("float64"))
    np.testing.assert_allclose(np.asarray(out[0]), want, atol=1e-5)


@pytest.mark.parametrize("ndims", [2, 3])
def test_keras_save_load_round_trip(tmp_path, ndims):
    shape = (8, 10) if ndims == 2 else (8, 10, 6)
    x = keras.Input(shape + (1,))
    v = keras.Input(shape + (ndims,))
    a = keras.Input((ndims, ndims + 1))
    u = L.VecInt(3)(v)
    small = L.RescaleTransform(0.5)(u)
    big = L.RescaleTransform(2.0, name="up")(small)
    comp = L.ComposeTransform()([u, big])
    aff = L.AffineToField(shape)(a)
    out = L.SpatialTransformer(fill_value=0.5)([x, comp])
    lab = L.SpatialTransformer("nearest", rounding="half_up")([x, aff])
    model = keras.Model([x, v, a], [out, lab])
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    rng = np.random.default_rng(18)
    inputs = [rng.random((2, *shape, 1)).astype("float32"),
              _smooth(shape, 1.5, 19)[None].repeat(2, 0),
              np.tile(np.eye(ndims, ndims + 1, dtype="float32"), (2, 1, 1)) + 0.01]
    for w, g in zip(model(inputs), loaded(inputs)):
        np.testing.assert_array_equal(np.asarray(w), np.asarray(g))
    cfg = [(layer.__class__.__name__, layer.get_config()) for layer in loaded.layers]
    st = sorted((c["interp"], c["fill_value"], c["rounding"]) for n, c in cfg if n == "SpatialTransformer")
    assert st == [("linear", 0.5, "half_even"), ("nearest", None, "half_up")]
    assert [c["steps"] for n, c in cfg if n == "VecInt"] == [3]
    assert [c["shape"] for n, c in cfg if n == "AffineToField"] == [list(shape)]
    assert sorted(c["factor"] for n, c in cfg if n == "RescaleTransform") == [0.5, 2.0]


@pytest.mark.parametrize("shape", [(12, 10), (8, 9, 7)])
def test_spatial_transformer_lean_gradient_matches_autodiff_and_round_trips(shape, tmp_path):
    """`lean_gradient=True` warps to the same values with the same gradients (image and field) as
    the default layer, and keeps the setting through saving."""
    rng = np.random.default_rng(3)
    ndims = len(shape)
    img = tf.constant(rng.random((2, *shape, 2)), tf.float32)
    disp = tf.constant(rng.normal(0, 2.0, (2, *shape, ndims)), tf.float32)
    weights = tf.constant(rng.normal(size=(2, *shape, 2)), tf.float32)
    grads = []
    for lean in (False, True):
        layer = L.SpatialTransformer(lean_gradient=lean, jit=False)
        with tf.GradientTape() as tape:
            tape.watch([img, disp])
            out = layer([img, disp])
            total = tf.reduce_sum(out * weights)
        grads.append([out.numpy(), *[g.numpy() for g in tape.gradient(total, [img, disp])]])
    for plain, lean in zip(*grads):
        np.testing.assert_allclose(lean, plain, rtol=1e-5, atol=1e-5)
    assert np.abs(grads[0][2]).max() > 0.1
    x = keras.Input((*shape, 2))
    u = keras.Input((*shape, ndims))
    model = keras.Model([x, u], L.SpatialTransformer(lean_gradient=True)([x, u]))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert [layer.lean_gradient for layer in loaded.layers
            if isinstance(layer, L.SpatialTransformer)] == [True]
    with pytest.raises(ValueError, match="lean_gradient"):
        L.SpatialTransformer(lean_gradient="yes")


def test_saved_model_export_round_trip(tmp_path):
    shape = (8, 10, 6)

    class Warper(tf.Module):
        def __init__(self):
            super().__init__()
            self.st = L.SpatialTransformer()
            self.vecint = L.VecInt(4)

        @tf.function(input_signature=[tf.TensorSpec((None, *shape, 1), tf.float32),
                                      tf.TensorSpec((None, *shape, 3), tf.float32)])
        def register(self, image, velocity):
            disp = self.vecint(velocity)
            return {"warped": self.st([image, disp]), "displacement": disp}

    module = Warper()
    tf.saved_model.save(module, str(tmp_path / "sm"))
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    rng = np.random.default_rng(20)
    img = rng.random((1, *shape, 1)).astype("float32")
    vel = _smooth(shape, 1.0, 21)[None]
    got = loaded.register(img, vel)
    disp = L.integrate_svf(vel, 4)
    np.testing.assert_allclose(np.asarray(got["displacement"]), np.asarray(disp), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["warped"]), _scipy_warp(img, np.asarray(disp)),
                               atol=1e-5)


# ---------------------------------------------------------------------------------------------
# argument validation: one clear line naming the argument
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: L.SpatialTransformer(interp="cubic"),
         "`interp` must be one of 'linear', 'nearest'. Received: interp='cubic'"),
        (lambda: L.SpatialTransformer(fill_value="zero"),
         "`fill_value` must be None or a number. Received: fill_value='zero'"),
        (lambda: L.VecInt(-1), "`steps` must be an int >= 0. Received: steps=-1"),
        (lambda: L.VecInt(2.5), "`steps` must be an int >= 0. Received: steps=2.5"),
        (lambda: L.RescaleTransform(0), "`factor` must be a number > 0. Received: factor=0"),
        (lambda: L.AffineToField((4,)), "`shape` must be 2 or 3 positive ints. Received: shape=(4,)"),
    ],
)
def test_bad_arguments_raise_one_clear_line(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value) == message


def test_bad_shapes_raise_value_error():
    img3 = np.zeros((1, 4, 4, 4, 1), "float32")
    with pytest.raises(ValueError, match=r"Received: transform_shape=\(1, 4, 4, 4, 2\)"):
        L.SpatialTransformer()([img3, np.zeros((1, 4, 4, 4, 2), "float32")])
    with pytest.raises(ValueError, match=r"Received: input_shape=\(1, 4, 4, 4, 2\)"):
        L.VecInt()(np.zeros((1, 4, 4, 4, 2), "float32"))
    with pytest.raises(ValueError, match=r"Received: image_shape=\(1, 4, 1\)"):
        L.SpatialTransformer()([np.zeros((1, 4, 1)), np.zeros((1, 4, 1))])
    with pytest.raises(ValueError, match=r"Received: disp.shape=\(1, 4, 4, 3\)"):
        L.warp(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match=r"Received: affine.shape=\(1, 3, 3\)"):
        L.affine_to_disp(np.zeros((1, 3, 3)), (4, 4, 4))
    with pytest.raises(ValueError, match=r"Received: input_shape=\(1, 2, 3\)"):
        L.AffineToField((4, 4, 4))(np.zeros((1, 2, 3), "float32"))
    with pytest.raises(ValueError, match=r"Received: first.shape=\(1, 4, 4, 2\), second.shape"):
        L.compose(np.zeros((1, 4, 4, 2)), np.zeros((1, 5, 4, 2)))


# ---------------------------------------------------------------------------------------------
# jit=True: the op runs as its own XLA function
# ---------------------------------------------------------------------------------------------
@ndims_param
def test_jit_option_matches_plain_ops_and_gradients(ndims):
    shape = SHAPES[ndims]
    rng = np.random.default_rng(23)
    img = tf.constant(rng.random((2, *shape, 2)).astype("float32"))
    vel = tf.constant(np.stack([_smooth(shape, 1.5, 24), _smooth(shape, 1.5, 25)]))

    def run(jit):
        with tf.GradientTape() as tape:
            tape.watch([img, vel])
            disp = L.integrate_svf(vel, 5, jit=jit)
            comp = L.compose(disp, vel, jit=jit)
            out = L.warp(img, comp, jit=jit)
            loss = tf.reduce_sum(out * out)
        return [out, disp, comp, *tape.gradient(loss, [img, vel])]

    # XLA may reorder float32 sums: agreement to ~1e-5 relative (values and gradients of order 1-100)
    for plain, compiled in zip(run(False), tf.function(lambda: run(True))()):
        np.testing.assert_allclose(np.asarray(compiled), np.asarray(plain),
                                   rtol=1e-5, atol=1e-5 * float(np.abs(plain).max()))


def test_jit_layers_save_and_export(tmp_path):
    shape = (8, 10, 6)
    x, v = keras.Input(shape + (1,)), keras.Input(shape + (3,))
    disp = L.VecInt(4, jit=True)(v)
    out = L.SpatialTransformer(jit=True)([x, L.ComposeTransform(jit=True)([disp, disp])])
    model = keras.Model([x, v], out)
    rng = np.random.default_rng(26)
    inputs = [rng.random((1, *shape, 1)).astype("float32"), _smooth(shape, 1.0, 27)[None]]
    d = L.integrate_svf(inputs[1], 4)
    want = np.asarray(L.warp(inputs[0], L.compose(d, d)))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert [lay.get_config()["jit"] for lay in loaded.layers if hasattr(lay, "jit")] == [True] * 3
    np.testing.assert_allclose(np.asarray(loaded(inputs)), want, atol=1e-5)
    export = tf.function(lambda a, b: model([a, b]),
                         input_signature=[tf.TensorSpec((None, *shape, 1)), tf.TensorSpec((None, *shape, 3))])
    module = tf.Module()
    module.f = export
    tf.saved_model.save(module, str(tmp_path / "sm"))
    np.testing.assert_allclose(np.asarray(tf.saved_model.load(str(tmp_path / "sm")).f(*inputs)), want,
                               atol=1e-5)


def test_jit_must_be_bool_or_auto():
    with pytest.raises(ValueError) as info:
        L.VecInt(jit="yes")
    assert str(info.value) == "`jit` must be True, False or 'auto'. Received: jit='yes'"
