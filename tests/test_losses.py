"""tfreg.losses against analytic values and independent NumPy references, 2D and 3D."""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreg import losses

SHAPES = {2: (14, 12), 3: (12, 10, 9)}


def _rand(shape, seed=0, channels=1):
    rng = np.random.default_rng(seed)
    return rng.random((1, *shape, channels)).astype("float32")


def _np_box_sum(x: np.ndarray, win) -> np.ndarray:
    """Reference 'same' box sum with zero padding by summing shifted copies (float64).

    x: (B, *S, C). For an even window the extra voxel lies after the centre (TensorFlow 'SAME').
    """
    ndims = x.ndim - 2
    pads = [(0, 0)] + [((w - 1) // 2, w - 1 - (w - 1) // 2) for w in win] + [(0, 0)]
    xp = np.pad(x.astype(np.float64), pads)
    out = np.zeros(x.shape, np.float64)
    for offs in itertools.product(*[range(w) for w in win]):
        idx = (slice(None),) + tuple(slice(o, o + n) for o, n in zip(offs, x.shape[1:1 + ndims])) + (slice(None),)
        out += xp[idx]
    return out


def _np_local_cc(i, j, win, eps=1e-5, squared=True):
    """Per-voxel voxelmorph-style local correlation, written from the formula (float64)."""
    n = np.prod(win) * i.shape[-1]
    s = {k: _np_box_sum(v, win).sum(-1, keepdims=True)
         for k, v in dict(i=i, j=j, ii=i * i, jj=j * j, ij=i * j).items()}
    cross = s["ij"] - s["i"] * s["j"] / n
    var_i = np.maximum(s["ii"] - s["i"] ** 2 / n, eps)
    var_j = np.maximum(s["jj"] - s["j"] ** 2 / n, eps)
    if squared:
        cross = np.maximum(cross, eps)
        return cross ** 2 / (var_i * var_j)
    return cross / np.sqrt(var_i * var_j)


# ---------------------------------------------------------------- local NCC

@pytest.mark.parametrize("ndims", [2, 3])
def test_ncc_of_scaled_image_is_minus_one(ndims):
    img = _rand(SHAPES[ndims])
    # J = 3 I: zero padding keeps J = 3 I outside too, so every window correlates perfectly.
    got = float(losses.NCC(win=5)(img, 3.0 * img))
    assert got == pytest.approx(-1.0, abs=1e-5)  # float32 sums of ~125 terms: 1e-5


@pytest.mark.parametrize("ndims", [2, 3])
def test_ncc_affine_intensity_map_interior(ndims):
    """J = a I + b correlates perfectly in windows that do not touch the zero padding."""
    img = _rand(SHAPES[ndims], seed=1)
    win = 5
    inner = (0,) + (slice(win // 2, -(win // 2)),) * ndims + (0,)
    cc = losses.NCC(win=win).local_cc(img, 0.5 * img + 2.0).numpy()
    np.testing.assert_allclose(cc[inner], 1.0, atol=1e-4)  # var/cross of ~2 with float32 sums of 125 terms
    # a border window sees zeros from the padding in J but not "a*0 + b": correlation drops there
    assert cc[(0,) * (ndims + 1) + (0,)] < 0.99
    # signed correlation with a negative slope is -1 inside; the squared (voxelmorph) form clamps
    # negative cross-correlation to eps, so anti-correlation gives ~0, not 1.
    signed = losses.NCC(win=win, squared=False).local_cc(img, -2.0 * img + 1.0).numpy()
    np.testing.assert_allclose(signed[inner], -1.0, atol=1e-4)
    clamped = losses.NCC(win=win).local_cc(img, -2.0 * img + 1.0).numpy()
    assert np.all(clamped[inner] < 1e-4)
    lapirn_form = losses.NCC(win=win, eps_mode="add").local_cc(img, -2.0 * img + 1.0).numpy()
    np.testing.assert_allclose(lapirn_form[inner], 1.0, atol=1e-4)


@pytest.mark.parametrize("ndims,win", [(2, (3, 4)), (3, (3, 5, 2)), (3, 9), (2, 9)])
def test_ncc_matches_numpy_reference(ndims, win):
    """Random images, anisotropic and even windows, 2 channels: per-voxel map and loss."""
    i = _rand(SHAPES[ndims], seed=2, channels=2)
    j = np.clip(i + 0.3 * _rand(SHAPES[ndims], seed=3, channels=2), 0, None)
    winv = (win,) * ndims if isinstance(win, int) else win
    for squared in (True, False):
        want = _np_local_cc(i, j, winv, squared=squared)
        got = losses.NCC(win=win, squared=squared).local_cc(i, j).numpy()
        np.testing.assert_allclose(got, want, atol=2e-5)  # float32 vs float64 window sums
        assert float(losses.NCC(win=win, squared=squared)(i, j)) == pytest.approx(-want.mean(), abs=1e-5)


def test_box_sum_matches_reference_3d():
    x = _rand((7, 6, 5), seed=4, channels=3)
    np.testing.assert_allclose(losses.box_sum(tf.constant(x), (4, 3, 1)).numpy(),
                               _np_box_sum(x, (4, 3, 1)), atol=1e-5)


@pytest.mark.parametrize("known", ["batch unknown", "all unknown"])
def test_box_sum_and_pool_half_in_graphs_of_unknown_shape(known):
    # a model traced with an unknown batch (a SavedModel signature) or unknown spatial sizes
    x = _rand((7, 6, 5), seed=7, channels=2)
    spec = tf.TensorSpec([None, 7, 6, 5, 2] if known == "batch unknown" else [None] * 5)
    box = tf.function(lambda t: losses.box_sum(t, (4, 3, 5)), input_signature=[spec])
    pool = tf.function(losses.avg_pool_half, input_signature=[spec])
    np.testing.assert_allclose(box(tf.constant(x)).numpy(), _np_box_sum(x, (4, 3, 5)), atol=1e-5)
    np.testing.assert_allclose(pool(tf.constant(x)).numpy(), _np_pool_half(x), atol=1e-6)


@pytest.mark.parametrize("op", ["box_sum", "pool_half"])
def test_box_sum_and_pool_half_compiled_match_reference_with_gradients(op):
    # XLA-compiled (box_sum: pooling ops) and plain (shifted slices) formulations: same values
    # as NumPy, and the same gradient of a weighted sum (the adjoint of the filter)
    x = tf.constant(_rand((7, 6, 5), seed=5, channels=2))
    weights = tf.constant(_rand((7, 6, 5) if op == "box_sum" else (4, 3, 3), seed=6, channels=2))
    fn = (lambda t: losses.box_sum(t, (4, 3, 5))) if op == "box_sum" else losses.avg_pool_half
    want = _np_box_sum(x.numpy(), (4, 3, 5)) if op == "box_sum" else _np_pool_half(x.numpy())

    def value_and_grad(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = fn(t)
            loss = tf.reduce_sum(y * weights)
        return y, tape.gradient(loss, t)

    plain = value_and_grad(x)
    xla = tf.function(value_and_grad, jit_compile=True)(x)
    for got in (plain, xla):
        np.testing.assert_allclose(got[0].numpy(), want, atol=1e-5)
    np.testing.assert_allclose(xla[1].numpy(), plain[1].numpy(), atol=1e-5)
    # a linear filter's gradient is its adjoint: <x, grad> = <F x, w>
    assert float(tf.reduce_sum(x * plain[1])) == pytest.approx(float(np.sum(want * weights)),
                                                               rel=1e-5)
    assert float(tf.reduce_max(tf.abs(plain[1]))) > 0.1


@pytest.mark.parametrize("ndims", [2, 3])
def test_ncc_xla_and_gradient(ndims):
    i = tf.constant(_rand(SHAPES[ndims], seed=5))
    j = tf.constant(_rand(SHAPES[ndims], seed=6))
    loss = losses.NCC(win=5)

    def value_and_grad(a, b):
        with tf.GradientTape() as tape:
            tape.watch(b)
            v = loss(a, b)
        return v, tape.gradient(v, b)

    v0, g0 = value_and_grad(i, j)
    v1, g1 = tf.function(value_and_grad, jit_compile=True)(i, j)
    assert float(v1) == pytest.approx(float(v0), abs=1e-6)
    np.testing.assert_allclose(g1.numpy(), g0.numpy(), atol=1e-6)  # same math, XLA op fusion only
    # directional derivative against central finite differences (step 1e-2; loss is smooth there)
    direction = tf.constant(np.random.default_rng(7).normal(size=j.shape).astype("float32"))
    h = 1e-2
    fd = (float(loss(i, j + h * direction)) - float(loss(i, j - h * direction))) / (2 * h)
    analytic = float(tf.reduce_sum(g0 * direction))
    assert analytic == pytest.approx(fd, rel=2e-2)  # O(h^2) truncation plus float32 rounding


def test_ncc_float16_inputs_give_float32():
    img = _rand(SHAPES[3], seed=8)
    out = losses.NCC(win=3)(img.astype("float16"), (2 * img).astype("float16"))
    assert out.dtype == tf.float32
    assert float(out) == pytest.approx(-1.0, abs=1e-3)  # inputs rounded to float16 (~1e-3 relative)


def test_ncc_under_mixed_precision_policy():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        x = keras.ops.cast(_rand(SHAPES[2], seed=9), "float16")
        assert losses.NCC()(x, x).dtype == tf.float32
        assert losses.MSE()(x, x).dtype == tf.float32
    finally:
        keras.config.set_dtype_policy(previous)


def test_multi_resolution_ncc():
    img = _rand((16, 16, 12), seed=10)
    # pooling is linear, so J = 2 I stays 2 I at every scale: -(1 + 1/2 + 1/4)
    got = float(losses.MultiResolutionNCC(wins=(7, 5, 3))(img, 2 * img))
    assert got == pytest.approx(-1.75, abs=1e-4)
    # the sum of single-scale losses on images pooled by the reference pooling below
    j = _rand((16, 16, 12), seed=11)
    want = 0.0
    a, b = img, j
    for s, (w, weight) in enumerate(zip((5, 3), (1.0, 0.3))):
        if s:
            a, b = _np_pool_half(a), _np_pool_half(b)
        want += weight * float(losses.NCC(win=w)(a, b))
    got = float(losses.MultiResolutionNCC(wins=(5, 3), weights=(1.0, 0.3))(img, j))
    assert got == pytest.approx(want, abs=1e-5)


def _np_pool_half(x: np.ndarray) -> np.ndarray:
    """Kernel 3, stride 2, pad 1, mean over the in-volume voxels only (count_include_pad=False)."""
    spatial = x.shape[1:-1]
    out_shape = [(n + 1) // 2 for n in spatial]
    out = np.zeros((x.shape[0], *out_shape, x.shape[-1]))
    for q in itertools.product(*[range(n) for n in out_shape]):
        idx = tuple(slice(max(2 * c - 1, 0), min(2 * c + 2, n)) for c, n in zip(q, spatial))
        out[(slice(None), *q, slice(None))] = x[(slice(None), *idx, slice(None))].mean(
            axis=tuple(range(1, len(spatial) + 1)))
    return out.astype("float32")


@pytest.mark.parametrize("shape", [(9, 8), (7, 6, 5)])
def test_avg_pool_half_matches_reference(shape):
    x = _rand(shape, seed=12, channels=2)
    np.testing.assert_allclose(losses.avg_pool_half(tf.constant(x)).numpy(), _np_pool_half(x), atol=1e-6)


@pytest.mark.parametrize("args,message", [
    (dict(win=0), "`win` must be a positive int or a sequence of positive ints. Received: win=0"),
    (dict(win=(3, -1)), "`win` must be a positive int or a sequence of positive ints. Received: win=(3, -1)"),
    (dict(eps=0), "`eps` must be > 0. Received: eps=0"),
    (dict(eps_mode="sum"), "`eps_mode` must be 'clamp' or 'add'. Received: eps_mode='sum'"),
])
def test_ncc_bad_arguments(args, message):
    with pytest.raises(ValueError) as err:
        losses.NCC(**args)
    assert str(err.value) == message


def test_ncc_window_rank_mismatch():
    with pytest.raises(ValueError, match=r"^`win` needs one size per spatial axis \(2\). Received: win=\(3, 3, 3\)$"):
        losses.NCC(win=(3, 3, 3))(_rand((8, 8)), _rand((8, 8)))


@pytest.mark.parametrize("loss", [losses.NCC(), losses.GlobalNCC(), losses.MSE(), losses.Dice()])
def test_shape_mismatch_is_refused(loss):
    with pytest.raises(ValueError, match=r"^`y_true` and `y_pred` must have the same shape. Received: "
                                         r"y_true.shape=\(1, 8, 8, 1\), y_pred.shape=\(1, 8, 6, 1\)$"):
        loss(np.zeros((1, 8, 8, 1), "float32"), np.zeros((1, 8, 6, 1), "float32"))


# ---------------------------------------------------------------- global NCC, MSE

@pytest.mark.parametrize("ndims", [2, 3])
def test_global_ncc(ndims):
    rng = np.random.default_rng(13)
    i = rng.random((2, *SHAPES[ndims], 1)).astype("float32")
    # positive affine intensity map: r = 1; eps=1e-6 against variance 1/12 shifts r by ~1e-5
    assert float(losses.GlobalNCC()(i, 4 * i - 1)) == pytest.approx(-1.0, abs=1e-4)
    assert float(losses.GlobalNCC()(i, -4 * i - 1)) == pytest.approx(1.0, abs=1e-4)
    j = (i + rng.random(i.shape)).astype("float32")
    want = np.mean([np.corrcoef(i[b].ravel(), j[b].ravel())[0, 1] for b in range(2)])
    assert float(losses.GlobalNCC(eps=0)(i, j)) == pytest.approx(-want, abs=1e-5)


@pytest.mark.parametrize("ndims", [2, 3])
def test_mse(ndims):
    a = np.zeros((2, *SHAPES[ndims], 1), "float32")
    b = np.full_like(a, 3.0)
    b[0] = 1.0
    # mean of (1^2 and 3^2) = 5; divided by sigma^2 = 4
    assert float(losses.MSE()(a, b)) == pytest.approx(5.0, rel=1e-6)
    assert float(losses.MSE(sigma=2.0)(a, b)) == pytest.approx(1.25, rel=1e-6)


# ---------------------------------------------------------------- regularisers

def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)


@pytest.mark.parametrize("ndims", [2, 3])
def test_grad_linear_field(ndims):
    """u_c(x) = k_c x_c: forward differences along d are k_d in channel d, 0 elsewhere."""
    k = np.array([0.5, -2.0, 1.5][:ndims])
    u = (_grid(SHAPES[ndims]) * k)[None].astype("float32")
    # mean over channels of |D_d| = |k_d| / N, then averaged over the N axes
    want_l1 = np.sum(np.abs(k) / ndims) / ndims
    want_l2 = np.sum(k ** 2 / ndims) / ndims
    assert float(losses.Grad("l1")(None, u)) == pytest.approx(want_l1, rel=1e-6)
    assert float(losses.Grad("l2")(None, u)) == pytest.approx(want_l2, rel=1e-6)
    assert float(losses.Grad("l2", loss_mult=2)(None, u)) == pytest.approx(2 * want_l2, rel=1e-6)


@pytest.mark.parametrize("ndims", [2, 3])
def test_bending_energy_quadratic_field(ndims):
    """u_c = sum_{i<=j} a^c_ij x_i x_j: Hessian H_ii = 2 a_ii, H_ij = a_ij, constant everywhere."""
    rng = np.random.default_rng(14)
    x = _grid(SHAPES[ndims]) / 4.0  # keep values moderate (float32)
    a = rng.normal(size=(ndims, ndims, ndims))  # a[c, i, j], only i <= j used
    u = np.zeros(x.shape)
    want = 0.0
    for c in range(ndims):
        for i in range(ndims):
            for j in range(i, ndims):
                u[..., c] += a[c, i, j] * x[..., i] * x[..., j]
                # derivatives per voxel: the grid step is 1/4 in x, so d/dvoxel = d/dx / 4
                h = (2 * a[c, i, i] if i == j else a[c, i, j]) / 16.0
                want += h ** 2 if i == j else 2 * h ** 2
    want /= ndims  # mean over components
    got = float(losses.BendingEnergy()(None, u[None].astype("float32")))
    assert got == pytest.approx(want, rel=1e-4)  # float32 second differences of values up to ~10
    # an affine field bends nothing
    affine = (_grid(SHAPES[ndims]) @ rng.normal(size=(ndims, ndims)) + 1.0)[None].astype("float32")
    assert abs(float(losses.BendingEnergy()(None, affine))) < 1e-8  # float32 rounding of values ~30


# ---------------------------------------------------------------- Dice and one_hot

def test_one_hot_non_contiguous_labels():
    labels = np.array([[[[4], [0], [7]], [[9], [7], [4]]]])  # (1, 2, 3, 1)
    got = losses.one_hot(labels, [0, 4, 7]).numpy()
    assert got.shape == (1, 2, 3, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0, 0], [[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(got[0, 1], [[0, 0, 0], [0, 0, 1], [0, 1, 0]])  # 9 is not listed
    np.testing.assert_array_equal(losses.one_hot(labels.astype("float32"), 10).numpy().argmax(-1)[0],
                                  labels[0, ..., 0])


def test_one_hot_bad_input():
    with pytest.raises(ValueError, match="^`labels` must end in a channel axis of size 1"):
        losses.one_hot(np.zeros((1, 4, 4, 2), "int32"), 3)
    with pytest.raises(ValueError, match="duplicates"):
        losses.one_hot(np.zeros((1, 4, 4, 1), "int32"), [1, 1])


@pytest.mark.parametrize("ndims", [2, 3])
def test_soft_dice_hand_counts(ndims):
    shape = (6,) * ndims
    t = np.zeros((1, *shape, 1), "int32")
    p = np.zeros_like(t)
    t[(0, slice(0, 2)) + (slice(None),) * (ndims - 1)] = 1  # label 1: first 2 rows
    p[(0, slice(0, 3)) + (slice(None),) * (ndims - 1)] = 1  # label 1: first 3 rows
    # label 1: |T|=2r, |P|=3r, overlap 2r -> 4/5. label 0: |T|=4r, |P|=3r, overlap 3r -> 6/7
    want = -(4 / 5 + 6 / 7) / 2
    got = float(losses.Dice()(losses.one_hot(t, 2), losses.one_hot(p, 2)))
    assert got == pytest.approx(want, rel=1e-6)
    # an empty channel in both (label 5) gives 0 by the no-NaN division, lowering the mean
    got3 = float(losses.Dice()(losses.one_hot(t, [0, 1, 5]), losses.one_hot(p, [0, 1, 5])))
    assert got3 == pytest.approx(-(4 / 5 + 6 / 7) / 3, rel=1e-6)
