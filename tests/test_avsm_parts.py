"""AVSM parts against independent expectations: affine algebra, the network's shapes, the vSVF
transform and the loss terms."""
import numpy as np
import pytest
import tensorflow as tf

from tfreg.config import method_defaults, resolve
from tfreg.layers import affine_to_disp, compose_affine, warp
from tfreg.registry import discover
from tfreg_plugins.avsm import affine, losses, model, vsvf


def _homogeneous(theta, n):
    h = np.eye(n + 1)
    h[:n, :n] = theta[:n * n].reshape(n, n)
    h[:n, n] = theta[n * n:]
    return h


@pytest.mark.parametrize("ndims", [2, 3])
def test_composing_steps_equals_the_single_composed_affine(ndims):
    """t updates composed step by step = one product of homogeneous matrices, and warping once by
    the composed voxel affine = warping t times by each step's affine (smooth image, interior)."""
    rng = np.random.default_rng(0)
    steps = [affine.identity_params(ndims) + rng.normal(0, 0.05, ndims * (ndims + 1))
             for _ in range(4)]
    theta = tf.constant(steps[0][None], tf.float32)
    for update in steps[1:]:
        theta = affine.compose_params(tf.constant(update[None], tf.float32), theta, ndims)
    expect = np.eye(ndims + 1)
    for update in steps:                       # x -> A_4 (A_3 (A_2 (A_1 x + b_1) ...)
        expect = _homogeneous(update, ndims) @ expect
    np.testing.assert_allclose(_homogeneous(theta.numpy()[0], ndims), expect, atol=1e-5)

    shape = (20, 18) if ndims == 2 else (12, 11, 10)
    composed = affine.to_voxel_affine(theta, shape)
    # the same product in tfreg's voxel convention: compose_affine(first, second) samples
    # T_first(T_second(x)), so each update acts on the points the previous map produced
    chain = affine.to_voxel_affine(tf.constant(steps[0][None], tf.float32), shape)
    for update in steps[1:]:
        chain = compose_affine(affine.to_voxel_affine(tf.constant(update[None]), shape), chain)
    np.testing.assert_allclose(composed.numpy(), chain.numpy(), atol=1e-5)


def test_voxel_affine_is_the_normalised_map_on_the_grid():
    """[D^-1 A D | D^-1 b] reproduces y_n = A x_n + b with x_n = 2 i / (S - 1) - 1 per axis."""
    shape = (9, 13)
    theta = np.array([1.1, 0.2, -0.1, 0.9, 0.05, -0.1], np.float32)
    disp = affine_to_disp(affine.to_voxel_affine(theta[None], shape), shape).numpy()[0]
    i = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    scale = 2.0 / (np.array(shape) - 1)
    xn = i * scale - 1
    yn = xn @ theta[:4].reshape(2, 2).T + theta[4:]
    np.testing.assert_allclose(i + disp, (yn + 1) / scale, atol=1e-4)


@pytest.mark.parametrize("shape,flat", [((48, 40), 4 * 2 * 2), ((80, 192, 192), 4 * 3 * 6 * 6),
                                        ((16, 16, 16), 4)])
def test_affine_fc_input_follows_the_shape(shape, flat):
    """The original's knee data 80x192x192 gives its 432; other shapes their own size."""
    import keras
    net = affine.AffineStepNet(len(shape))
    m = keras.Input((*shape, 1))
    f = keras.Input((*shape, 1))
    theta = net(m, f)
    assert tuple(theta.shape) == (None, len(shape) * (len(shape) + 1))
    assert net.head.input.shape[-1] == 32
    assert net.body[-2].output.shape[-1] == flat


def _config(name, **over):
    method = discover().get(name).method
    return resolve(method_defaults(method), None, over)


def test_untrained_models_start_near_the_identity_and_momentum_is_half_resolution():
    cfg = _config("avsm", model={"momentum_features": [4, 4, 4, 4, 4]})
    net = model.build_avsm_model(cfg, (32, 32))
    x = np.random.default_rng(1).random((2, 32, 32, 1)).astype("float32")
    out = net({"moving": x, "fixed": x[::-1]})
    assert out["vsvf_momentum_1"].shape == (2, 16, 16, 2)
    assert out["affine"].shape == (2, 2, 3)
    np.testing.assert_allclose(out["affine"].numpy()[:, :, :2], np.broadcast_to(np.eye(2), (2, 2, 2)),
                               atol=0.05)
    assert float(tf.reduce_max(tf.abs(out["disp"]))) < 1.0
    with pytest.raises(Exception, match="multiple of 16"):
        model.build_avsm_model(cfg, (40, 32))


def test_vsvf_transform_translates_by_a_constant_momentum():
    """A constant momentum m: K keeps constants (sum-1 kernels), so v = m, and the map after unit
    time is the translation by -m in unit coordinates: -m (s - 1) voxels of the momentum grid,
    -m (S - 1) voxels of the image grid."""
    layer = vsvf.VSVFTransform((32, 24), steps=10)
    m = np.zeros((1, 16, 12, 2), np.float32)
    m[..., 0], m[..., 1] = 0.05, -0.1
    out = layer([tf.constant(m), tf.zeros_like(m)])
    np.testing.assert_allclose(out["velocity"].numpy(), m, atol=1e-6)
    np.testing.assert_allclose(out["disp_low"].numpy()[0, 3, 4], [-0.05 * 15, 0.1 * 11], atol=1e-4)
    np.testing.assert_allclose(out["disp"].numpy()[0, 7, 9], [-0.05 * 31, 0.1 * 23], atol=1e-4)


def test_vsvf_regulariser_is_the_clamped_elementwise_sum():
    rng = np.random.default_rng(2)
    m = rng.normal(size=(2, 5, 4, 2)).astype(np.float32)
    v = rng.normal(size=(2, 5, 4, 2)).astype(np.float32)
    expect = np.mean([np.sum(np.maximum(v[b] * m[b], 0)) for b in range(2)]) / (4 * 3)
    np.testing.assert_allclose(float(losses.vsvf_regulariser(tf.constant(m), tf.constant(v))),
                               expect, rtol=1e-5)


def test_affine_symmetry_and_reg_weight():
    n = 2
    a = np.array([[1.1, 0.1], [0.0, 0.95]])
    b = np.array([0.1, -0.2])
    inv = np.linalg.inv(a)
    st = np.concatenate([a.ravel(), b])
    ts = np.concatenate([inv.ravel(), -inv @ b])               # the exact inverse: loss 0
    other = np.concatenate([np.eye(2).ravel(), [0.3, 0.0]])
    theta = tf.constant(np.stack([st, st, ts, other]), tf.float32)
    sym = float(losses.affine_symmetry(theta, n))
    off = np.sum((a - np.eye(2)) ** 2) + np.sum((a @ [0.3, 0.0] + b) ** 2)
    np.testing.assert_allclose(sym, 0.5 * off, rtol=1e-5)
    # the original's sigmoid decay: weight 10 * 3 / (3 + exp((e - 10) / 3)), floor 1e-3
    w = [float(losses.affine_reg_weight(e, 10.0, 10.0, 1e-3)) for e in (0, 10, 20, 60)]
    np.testing.assert_allclose(w[:3], [10 * 3 / (3 + np.exp(-10 / 3)), 7.5,
                                       10 * 3 / (3 + np.exp(10 / 3))], rtol=1e-5)
    assert w[3] == pytest.approx(1e-3)


def test_inverse_consistency_of_exact_inverse_translations_is_zero():
    shape = (16, 12)
    st = np.broadcast_to(np.array([1.5, -2.0], np.float32), (1, *shape, 2))
    disp = tf.constant(np.concatenate([st, -st]))
    assert float(losses.inverse_consistency(disp)) < 1e-10
    wrong = tf.constant(np.concatenate([st, st]))
    # residual 2 u in voxels -> (2 u_d / (S_d - 1))^2 averaged over channels
    expect = np.mean([(3.0 / 15) ** 2, (4.0 / 11) ** 2])
    np.testing.assert_allclose(float(losses.inverse_consistency(wrong)), expect, rtol=1e-5)


@pytest.mark.parametrize("shape", [(14, 12), (8, 10, 6)])
def test_recomputed_inverse_consistency_matches_the_plain_term(shape):
    """recompute=True (recomputed, lean interpolation gradient) gives the plain term's value and
    gradient; the fields are smooth and large enough that the gradient is far from zero."""
    rng = np.random.default_rng(5)
    ndims = len(shape)
    grids = np.meshgrid(*[np.linspace(0, np.pi, s) for s in shape], indexing="ij")
    fields = [np.stack([1.5 * np.sin(g + k + d) for d, g in enumerate(grids)], -1) for k in (0, 2)]
    disp = tf.constant(np.stack(fields).astype(np.float32)
                       + rng.normal(0, 0.1, (2, *shape, ndims)).astype(np.float32))
    results = []
    for recompute in (False, True):
        with tf.GradientTape() as tape:
            tape.watch(disp)
            value = losses.inverse_consistency(disp, recompute=recompute)
        results.append((float(value), tape.gradient(value, disp).numpy()))
    (plain, g_plain), (lean, g_lean) = results
    assert plain > 1e-3 and np.abs(g_plain).max() > 1e-4
    np.testing.assert_allclose(lean, plain, rtol=1e-6)
    np.testing.assert_allclose(g_lean, g_plain, rtol=1e-4, atol=1e-6 * np.abs(g_plain).max())


def test_symmetric_batch_swaps_directions():
    batch = {"moving": tf.constant([[1.0]]), "fixed": tf.constant([[2.0]])}
    out = losses.symmetric_batch(batch)
    assert out["moving"].numpy().ravel().tolist() == [1.0, 2.0]
    assert out["fixed"].numpy().ravel().tolist() == [2.0, 1.0]


def test_stages_follow_the_schedule_and_freeze_the_affine_net():
    cfg = _config("avsm")
    stages = discover().get("avsm").method.resolve_stages(cfg)
    names = [s.name for s in stages]
    assert names == ["affine_ncc", "affine_task", "affine_sym", "affine_multi", "vsvf",
                     "vsvf_two", "vsvf_sym"]
    assert [s.steps for s in stages] == [40000, 40000, 40000, 80000, 40000, 40000, 120000]
    assert stages[3].learning_rate == pytest.approx(5e-5)
    assert all(s.frozen == ("avsm_affine",) and s.freeze_steps == s.steps for s in stages[4:])
    assert "vsvf_warped_2" in stages[5].outputs and "vsvf_warped_2" not in stages[4].outputs


@pytest.mark.parametrize("ndims", [2, 3])
@pytest.mark.parametrize("recompute", [True, False])
def test_shared_conv_pool_is_keras_conv_then_max_pooling(ndims, recompute):
    """The shared layer = Keras convolution + ReLU, then 2x max pooling: same values and the same
    gradients for the input, kernel and bias (recomputed or not)."""
    import keras
    shape = (2, 12, 10, 1) if ndims == 2 else (2, 8, 10, 6, 1)
    x = tf.constant(np.random.default_rng(3).normal(size=shape).astype(np.float32))
    cls = affine.SharedConvPool2D if ndims == 2 else affine.SharedConvPool3D
    layer = cls(4, 3, padding="same", activation="relu", recompute=recompute)
    plain = (keras.layers.Conv2D if ndims == 2 else keras.layers.Conv3D)(
        4, 3, padding="same", activation="relu")
    pool = keras.layers.MaxPooling2D(2) if ndims == 2 else keras.layers.MaxPooling3D(2)
    layer.build(x.shape)
    plain.build(x.shape)
    rng = np.random.default_rng(4)
    weights = [rng.normal(0, 0.5, w.shape).astype(np.float32) for w in layer.get_weights()]
    layer.set_weights(weights)
    plain.set_weights(weights)
    grads = []
    for fn, variables in ((layer, layer.trainable_variables),
                          (lambda t: pool(plain(t)), plain.trainable_variables)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
            loss = tf.reduce_sum(tf.sin(y) * y)
        grads.append((y.numpy(), tape.gradient(loss, [x, *variables])))
    (y1, g1), (y2, g2) = grads
    assert y1.shape == (x.shape[0], *[s // 2 for s in x.shape[1:-1]], 4)
    np.testing.assert_allclose(y1, y2, atol=1e-5)
    for a, b in zip(g1, g2):
        assert float(tf.reduce_max(tf.abs(b))) > 1e-3           # the gradient is not trivially 0
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4, rtol=1e-4)
    assert layer.compute_output_shape(x.shape) == y2.shape
    assert cls.from_config(layer.get_config()).recompute is recompute


def test_vsvf_transform_recomputed_has_the_same_values_and_gradients():
    shape, low = (16, 16), (8, 8)
    rng = np.random.default_rng(5)
    momentum = tf.constant(rng.normal(0, 0.3, (1, *low, 2)).astype(np.float32))
    initial = tf.constant(rng.normal(0, 0.3, (1, *low, 2)).astype(np.float32))
    out = []
    for recompute in (True, False):
        layer = vsvf.VSVFTransform(shape, steps=4, recompute=recompute)
        with tf.GradientTape() as tape:
            tape.watch([momentum, initial])
            disp = layer([momentum, initial])["disp"]
            loss = tf.reduce_sum(tf.square(disp))
        out.append([disp.numpy(), *[g.numpy() for g in tape.gradient(loss, [momentum, initial])]])
    for a, b in zip(*out):
        assert np.abs(b).max() > 1e-3
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
