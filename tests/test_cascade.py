"""The cascade plugin (recursive cascaded networks): composition, structure, losses, training."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreg.errors import ConfigError
from tfreg.layers import affine_to_disp, compose, warp
from tfreg.synthetic import deformed_subject, phantom, warp_numpy
from tfreg_plugins.cascade import METHOD, losses, network


def small_config(**model) -> dict:
    """A tiny architecture for fast tests (8-channel VTN with 3 levels, small U-Net)."""
    base = dict(base="vtn", cascades=2, shared_weights=True, affine_stem=True, flow_multiplier=None,
                vtn_channels=4, vtn_levels=3, unet_enc_features=[4, 8, 8], unet_dec_features=[8, 8, 8, 8, 4],
                fill_value=None)
    base.update(model)
    return {"model": base, "loss": {"similarity": "gncc", "ncc_window": 9, "smooth_weight": 1.0,
                                    "det_weight": 0.1, "ortho_weight": 0.1}}


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)


def _rotation(ndims, degrees):
    th = np.deg2rad(degrees)
    rot = np.eye(ndims)
    rot[:2, :2] = [[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]
    return rot


# ---------------------------------------------------------------- composition

@pytest.mark.parametrize("ndims", [2, 3])
def test_compose_after_affine_is_exact(ndims):
    """T(x + f(x)) - x with T(x) = A (x - c) + b + c, computed directly in NumPy."""
    shape = (12, 10, 8)[:ndims]
    rng = np.random.default_rng(0)
    mat = _rotation(ndims, 7) * 1.05
    shift = rng.normal(size=ndims)
    flow = rng.normal(size=(1, *shape, ndims))
    x = _grid(shape)
    c = (np.array(shape) - 1) / 2
    want = (x + flow[0] - c) @ mat.T + shift + c - x
    affine = np.concatenate([mat, shift[:, None]], 1)[None]
    got = network.compose_after_affine(tf.constant(affine, tf.float32), tf.constant(flow, tf.float32))
    np.testing.assert_allclose(got.numpy()[0], want, atol=1e-4)  # float32 coordinates up to ~12


@pytest.mark.parametrize("ndims", [2, 3])
def test_two_known_fields_compose_like_direct_warping(ndims):
    """warp(warp(I, f1), f2) = warp(I, f2 + f1(x + f2)) for a ramp I and an affine f1.

    Linear interpolation is exact for the ramp and for the linear f1, so both routes are exact
    (away from the border, where the border clamp would differ).
    """
    shape = (20, 18, 16)[:ndims]
    x = _grid(shape)
    rng = np.random.default_rng(1)
    slope = np.array([0.3, -0.2, 0.1][:ndims])
    centre = (np.array(shape) - 1) / 2
    mat = 0.04 * rng.normal(size=(ndims, ndims))

    def f1_of(points):  # linear field, evaluated anywhere
        return (points - centre) @ mat.T + 0.5

    ramp = (x @ slope + 1.0)[None, ..., None].astype("float32")
    f2 = np.stack([1.5 * np.sin(x[..., d] / 3.0 + d) for d in range(ndims)], -1)
    f1 = f1_of(x)[None].astype("float32")
    f2 = f2[None].astype("float32")
    twice = warp(warp(ramp, f1), f2).numpy()
    once = warp(ramp, compose(f1, f2)).numpy()
    inner = (0,) + (slice(4, -4),) * ndims
    np.testing.assert_allclose(once[inner], twice[inner], atol=1e-4)  # float32 values up to ~8
    # both equal the analytic composition ramp(x + f2(x) + f1(x + f2(x)))
    y = x + f2[0]
    analytic = ((y + f1_of(y)) @ slope + 1.0)[..., None]
    np.testing.assert_allclose(once[inner], analytic[inner[1:]], atol=1e-4)


def _random_weights(model, scale):
    rng = np.random.default_rng(3)
    for var in model.trainable_variables:
        var.assign(rng.normal(size=var.shape).astype("float32") * scale)


@pytest.mark.parametrize("ndims", [2, 3])
def test_model_resamples_once_from_the_original(ndims):
    """The outputs obey the composition rules: agg_1 = A f_1 + u_A, agg_2 = compose(agg_1, f_2),
    warped_k = warp(moving, agg_k) from the original moving image."""
    shape = (16,) * ndims
    cfg = small_config(cascades=2, shared_weights=False)
    model = network.build(cfg, shape)
    _random_weights(model, 0.05)
    rng = np.random.default_rng(4)
    batch = {"fixed": rng.random((1, *shape, 1)).astype("float32"),
             "moving": rng.random((1, *shape, 1)).astype("float32")}
    out = {k: v.numpy() for k, v in model(batch).items()}
    assert np.abs(out["flow_1"]).max() > 0.1 and np.abs(out["flow_2"]).max() > 0.1  # non-trivial fields
    agg1 = network.compose_after_affine(out["affine"], out["flow_1"])
    agg2 = compose(agg1, out["flow_2"])
    np.testing.assert_allclose(out["disp"], agg2.numpy(), atol=1e-4)
    np.testing.assert_allclose(out["disp_1"], agg1.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["disp_2"], out["disp"], atol=0)
    np.testing.assert_allclose(out["warped_1"], warp(batch["moving"], agg1).numpy(), atol=1e-5)
    np.testing.assert_allclose(out["warped"], warp(batch["moving"], out["disp"]).numpy(), atol=1e-5)
    np.testing.assert_allclose(out["warped_0"], warp(batch["moving"], affine_to_disp(out["affine"], shape)).numpy(),
                               atol=1e-5)


# ---------------------------------------------------------------- structure and weight sharing

@pytest.mark.parametrize("base", ["vtn", "voxelmorph"])
def test_cascade_count_and_weight_sharing(base):
    shape = (32, 32)
    cfg = small_config(base=base)
    arch = network.Architecture.from_config(cfg)
    make = network.vtn if base == "vtn" else network.unet
    per_net = len(make(shape, arch, "probe").trainable_variables)
    stem = len(network.affine_stem(shape, arch).trainable_variables)
    assert per_net > 0 and stem > 0
    for n, shared in [(1, True), (3, True), (3, False), (2, False)]:
        model = network.build(small_config(base=base, cascades=n, shared_weights=shared), shape)
        want = stem + (per_net if shared else n * per_net)
        assert len(model.trainable_variables) == want, (n, shared)
        assert sorted(k for k in model.output if k.startswith("flow_")) == [f"flow_{k}" for k in range(1, n + 1)]
        nets = {layer.name for layer in model.layers if layer.name.startswith("cascade")}
        assert nets == ({"cascade"} if shared else {f"cascade_{k}" for k in range(n)})
    no_stem = network.build(small_config(base=base, cascades=2, affine_stem=False), shape)
    assert len(no_stem.trainable_variables) == per_net and "affine" not in no_stem.output


def test_more_recursions_reuse_the_trained_weights(tmp_path):
    """A shared-weight model rebuilt with K > n cascades loads the same weights and keeps the
    training flow factor 1/n (stored in the weights), independent of K."""
    shape = (32, 32)
    model = network.build(small_config(cascades=2), shape)
    _random_weights(model, 0.02)
    path = tmp_path / "model.weights.h5"
    model.save_weights(path)
    rng = np.random.default_rng(5)
    batch = {"fixed": rng.random((1, *shape, 1)).astype("float32"),
             "moving": rng.random((1, *shape, 1)).astype("float32")}
    ref = model(batch)
    for k in (1, 2, 5):
        again = network.build(small_config(cascades=k), shape)
        again.load_weights(path)
        (factor,) = [v for v in again.non_trainable_variables if v.path.endswith("factor")]
        assert float(factor.numpy()) == pytest.approx(network.VTN_FLOW_GAIN / 2)  # 20 * (1/2)
        out = again(batch)
        assert sorted(k2 for k2 in out if k2.startswith("warped_")) == [f"warped_{i}" for i in range(k + 1)]
        for i in range(min(k, 2) + 1):  # the first recursions are the trained model's
            np.testing.assert_allclose(out[f"warped_{i}"].numpy(), ref[f"warped_{i}"].numpy(), atol=1e-5)


def test_keras_round_trip(tmp_path):
    shape = (32, 32)
    model = network.build(small_config(base="voxelmorph", cascades=2), shape)
    _random_weights(model, 0.02)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    batch = {"fixed": np.ones((1, *shape, 1), "float32"), "moving": np.zeros((1, *shape, 1), "float32")}
    batch["moving"][0, 8:20, 10:24] = 1.0
    np.testing.assert_allclose(loaded(batch)["disp"].numpy(), model(batch)["disp"].numpy(), atol=1e-6)


def test_method_and_default_config():
    from tfreg.config import method_defaults
    from tfreg.registry import discover

    loaded = discover().get("cascade")
    assert loaded.method.name == METHOD.name == "cascade"
    defaults = method_defaults(loaded.method)
    assert defaults["model"]["cascades"] == 3 and defaults["loss"]["similarity"] == "gncc"
    model = network.build(defaults, (32, 32))  # the defaults build in 2D at the method's divisor
    assert len([k for k in model.output if k.startswith("flow_")]) == 3
    loss_fn = losses.build(defaults)
    batch = {"fixed": np.random.default_rng(0).random((1, 32, 32, 1)).astype("float32")}
    batch["moving"] = batch["fixed"]
    terms = loss_fn(batch, model(batch), None)
    assert set(terms) == {"sim", "smooth", "det", "ortho"}


@pytest.mark.parametrize("model,message", [
    (dict(base="vnet"), "model.base: expected one of vtn, voxelmorph, got 'vnet'"),
    (dict(cascades=0, affine_stem=False),
     "model.cascades: 0 cascades need model.affine_stem: true (the model would not register anything)"),
    (dict(cascades=-1), "model.cascades: expected an integer >= 0, got -1"),
    (dict(flow_multiplier=0), "model.flow_multiplier: expected null or a number > 0, got 0"),
    (dict(unet_dec_features=[8, 8]),
     "model.unet_dec_features: needs at least 4 values for 3 encoder levels, got [8, 8]"),
])
def test_bad_model_config(model, message):
    with pytest.raises(ConfigError) as err:
        network.build(small_config(**model), (32, 32))
    assert str(err.value) == message


def test_shape_not_divisible():
    with pytest.raises(ConfigError, match=r"^model.vtn_levels: 3 stride-2 levels need every size divisible "
                                          r"by 8, got shape \[32, 20\]$"):
        network.build(small_config(), (32, 20))


# ---------------------------------------------------------------- losses

@pytest.mark.parametrize("ndims", [2, 3])
def test_flow_smoothness_linear_field(ndims):
    """f_0 = k x_0: differences along axis 0 are k on (X-1) * prod(rest) voxels, channel 0 only."""
    shape = (6, 5, 4)[:ndims]
    k = 0.7
    flow = np.zeros((1, *shape, ndims), "float32")
    flow[..., 0] = k * _grid(shape)[..., 0]
    want = 0.5 * k ** 2 * (shape[0] - 1) * np.prod(shape[1:]) / (np.prod(shape) * ndims)
    assert float(losses.flow_smoothness(flow)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("ndims", [2, 3])
def test_affine_terms(ndims):
    eps = losses.ORTHO_EPS
    rot = np.concatenate([_rotation(ndims, 20), np.ones((ndims, 1))], 1)[None].astype("float32")
    det, ortho = losses.affine_terms(rot)
    assert float(det) == pytest.approx(0.0, abs=1e-10)
    assert float(ortho) == pytest.approx(0.0, abs=1e-5)  # float32 inverse of a near-identity C
    s = 1.3
    scaled = np.concatenate([np.diag([s] + [1.0] * (ndims - 1)), np.zeros((ndims, 1))], 1)[None]
    det, ortho = losses.affine_terms(scaled.astype("float32"))
    assert float(det) == pytest.approx(0.5 * (s - 1) ** 2, rel=1e-5)
    # eigenvalues of C = diag(s^2 + eps, 1 + eps, ...): only the first is off its optimum 1 + eps
    lam = s ** 2 + eps
    assert float(ortho) == pytest.approx(lam + (1 + eps) ** 2 / lam - 2 * (1 + eps), rel=1e-5)


def test_ortho_matches_symmetric_polynomial_form_3d():
    """3D: tr(C^-1) = s2 / s3 (the original's form), for a general matrix."""
    a = np.array([[1.1, 0.2, -0.1], [0.05, 0.9, 0.3], [-0.2, 0.1, 1.2]])
    c = a.T @ a + 1e-5 * np.eye(3)
    s1 = np.trace(c)
    s2 = sum(c[i, i] * c[j, j] - c[i, j] * c[j, i] for i, j in ((0, 1), (1, 2), (2, 0)))
    s3 = np.linalg.det(c)
    want = s1 + (1 + 1e-5) ** 2 * s2 / s3 - 6 * (1 + 1e-5)
    affine = np.concatenate([a, np.zeros((3, 1))], 1)[None].astype("float32")
    assert float(losses.affine_terms(affine)[1]) == pytest.approx(want, rel=1e-4)


def test_loss_terms_and_weights():
    shape = (8, 8)
    rng = np.random.default_rng(6)
    fixed = rng.random((2, *shape, 1)).astype("float32")
    k1, k2 = 0.5, -1.0
    x0 = _grid(shape)[..., 0]
    flow1 = np.zeros((2, *shape, 2), "float32")
    flow1[..., 0] = k1 * x0
    flow2 = np.zeros_like(flow1)
    flow2[..., 0] = k2 * x0
    outputs = {"warped": 3 * fixed + 1, "flow_1": flow1, "flow_2": flow2,
               "affine": np.tile(np.eye(2, 3, dtype="float32"), (2, 1, 1))}
    cfg = small_config()
    cfg["loss"]["smooth_weight"] = 2.0
    terms = losses.build(cfg)({"fixed": fixed, "moving": fixed}, outputs, None)
    assert set(terms) == {"sim", "smooth", "det", "ortho"}
    assert float(terms["sim"]) == pytest.approx(0.0, abs=1e-4)  # 1 - r with r = 1 (eps 1e-6 on var ~1/12)
    per_k2 = 0.5 * (7 * 8) / (64 * 2)  # R(f) / k^2 from the linear-field formula
    assert float(terms["smooth"]) == pytest.approx(2.0 * per_k2 * (k1 ** 2 + k2 ** 2), rel=1e-6)
    assert float(terms["det"]) == pytest.approx(0.0, abs=1e-10)
    assert float(terms["ortho"]) == pytest.approx(0.0, abs=1e-5)
    cfg["loss"]["similarity"] = "ncc"
    terms = losses.build(cfg)({"fixed": fixed, "moving": fixed}, {**outputs, "warped": 2 * fixed}, None)
    assert float(terms["sim"]) == pytest.approx(0.0, abs=1e-5)  # 1 + NCC(I, 2I) = 1 - 1
    cfg["loss"]["similarity"] = "mi"
    with pytest.raises(ConfigError, match="^loss.similarity: expected one of gncc, ncc, got 'mi'$"):
        losses.build(cfg)


# ---------------------------------------------------------------- training

def _train(model, loss_fn, fixed, moving, pairs, steps, lr, seed=0):
    opt = keras.optimizers.Adam(lr)

    @tf.function
    def step(f, m):
        with tf.GradientTape() as tape:
            out = model({"fixed": f, "moving": m}, training=True)
            total = tf.add_n(list(loss_fn({"fixed": f, "moving": m}, out, None).values()))
        grads = tape.gradient(total, model.trainable_variables)
        opt.apply(grads, model.trainable_variables)
        return total

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        i, j = pairs[rng.integers(len(pairs))]
        step(fixed[i:i + 1], moving[j:j + 1])


def _pearson(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.mark.parametrize("shape,base", [((64, 64), "voxelmorph"),
                                        pytest.param((32, 32, 32), "vtn", marks=pytest.mark.slow)])
def test_brief_training_beats_identity(shape, base):
    """Synthetic subjects (jittered phantoms, smooth random deformations up to 3 voxels): after 150
    Adam steps on pairs among 4 subjects, the correlation r with the fixed image is higher than
    without registration, on the training pairs and on a held-out pair (both directions)."""
    keras.utils.set_random_seed(0)  # weights as well as pair order: the check is on learning, not luck
    images = np.stack([deformed_subject(shape, seed, max_disp=3.0)[0] for seed in range(6)])[..., None]
    cfg = small_config(base=base, cascades=2, shared_weights=True, affine_stem=False, vtn_channels=8,
                       unet_enc_features=[8, 16, 16], unet_dec_features=[16, 16, 16, 16, 8])
    model = network.build(cfg, shape)
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
    _train(model, losses.build(cfg), images, images, pairs, steps=150, lr=1e-3)
    for group in (pairs, [(4, 5), (5, 4)]):
        before = np.mean([_pearson(images[i], images[j]) for i, j in group])
        after = np.mean([_pearson(images[i], model({"fixed": images[i:i + 1], "moving": images[j:j + 1]})
                                  ["warped"]) for i, j in group])
        # at least 5% of the remaining mismatch 1 - r removed. Measured for the 2D U-Net base over weight
        # seeds 0-3: 35-51% after 150 steps (after 80 steps 11-33%, and 3.5% once on a 2-core machine:
        # 80 steps sat at the start of learning); 3D VTN: 18-28%. Numerical noise in r is ~1e-6.
        assert (after - before) / (1 - before) > 0.05, (before, after)


def test_affine_stem_recovers_a_known_affine():
    """Moving images are phantoms moved by T^-1 (6 degree rotation, translation (2, -1.5) voxels);
    the affine-only model trained on 4 subjects predicts T for a fifth."""
    shape = (64, 64)
    rot = _rotation(2, 6)
    shift = np.array([2.0, -1.5])
    c = (np.array(shape) - 1) / 2
    x = _grid(shape)
    inverse = (x - c - shift) @ rot + c - x  # T^-1(y) = R^T (y - c - t) + c, as a displacement
    fixed, moving = [], []
    for seed in range(5):
        image, _ = phantom(shape, np.random.default_rng(seed), jitter=1.0)
        fixed.append(image)
        moving.append(warp_numpy(image, inverse))
    fixed = np.stack(fixed)[..., None].astype("float32")
    moving = np.stack(moving)[..., None].astype("float32")
    cfg = small_config(cascades=0, affine_stem=True, vtn_channels=8, vtn_levels=4)
    model = network.build(cfg, shape)
    _train(model, losses.build(cfg), fixed, moving, [(i, i) for i in range(4)], steps=200, lr=1e-3)
    affine = model({"fixed": fixed[4:5], "moving": moving[4:5]})["affine"].numpy()[0]
    np.testing.assert_allclose(affine[:, :2], rot, atol=0.01)  # measured error ~1e-3
    np.testing.assert_allclose(affine[:, 2], shift, atol=0.2)  # voxels; measured ~0.02
