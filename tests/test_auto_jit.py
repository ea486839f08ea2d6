"""jit="auto", the default of the warping/integration ops and layers: large inputs run as their own
XLA functions (checked here on tiny volumes by lowering the size threshold), with the values of
independent references (SciPy, an analytic field), float64 gradients that match finite
differences, no nesting inside compiled callers, and models that still save and export."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from gradcheck import check_directional_derivatives
from tfreg import layers as L
from tfreg.ops import compile_cache, fields, sampling


@pytest.fixture
def auto_everywhere(monkeypatch):
    """Make "auto" compile every op, whatever its size; start from an empty cache."""
    monkeypatch.setattr(compile_cache, "AUTO_MIN_VOXELS", 1)
    compile_cache.clear()
    yield
    compile_cache.clear()


def _cached_ops() -> set:
    """Names of the ops that have a compiled function in the cache."""
    return {key[1][0] for key in list(compile_cache._ENTRIES) if key[0] == "tf.function"}


def _smooth(shape, scale, seed):
    rng = np.random.default_rng(seed)
    field = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 2.0) for _ in shape], -1)
    return (field * scale / field.std()).astype("float32")


def _scipy_warp(img, disp):
    grid = np.meshgrid(*[np.arange(n) for n in img.shape], indexing="ij")
    coords = [g + disp[..., d] for d, g in enumerate(grid)]
    return ndimage.map_coordinates(img.astype("float64"), coords, order=1, mode="nearest")


def test_auto_compiles_only_from_the_size_threshold():
    compile_cache.clear()
    rng = np.random.default_rng(0)
    small = (1, 16, 16, 16)
    img, disp = rng.random((*small, 1)).astype("float32"), _smooth(small[1:], 1.5, 1)[None]
    sampling.warp(img, disp)
    fields.integrate_svf(disp, 3)
    assert _cached_ops() == set()  # 16^3 < AUTO_MIN_VOXELS: plain ops
    big = (44, 40, 40)  # 70400 voxels >= 2^16
    img, disp = rng.random((1, *big, 1)).astype("float32"), _smooth(big, 1.5, 2)[None]
    got = sampling.warp(img, disp).numpy()[0, ..., 0]
    fields.integrate_svf(disp, 3)
    fields.compose(disp, disp)
    assert _cached_ops() == {"warp", "integrate_svf", "compose"}
    np.testing.assert_allclose(got, _scipy_warp(img[0, ..., 0], disp[0]), atol=1e-5)
    assert not compile_cache.use_jit(False, 10**9) and compile_cache.use_jit(True, 1)
    compile_cache.clear()


def test_auto_path_values_match_references(auto_everywhere):
    rng = np.random.default_rng(3)
    shape = (12, 10, 9)
    img = rng.random((2, *shape, 2)).astype("float32")
    disp = np.stack([_smooth(shape, 2.0, 4), _smooth(shape, 2.0, 5)])
    got = L.SpatialTransformer()([img, disp]).numpy()
    for b in range(2):
        for c in range(2):
            np.testing.assert_allclose(got[b, ..., c], _scipy_warp(img[b, ..., c], disp[b]),
                                       atol=1e-5)
    # a constant velocity integrates to itself (every squaring adds a constant shift)
    vel = np.full((1, *shape, 3), 0.75, "float32")
    np.testing.assert_allclose(L.VecInt(7)(vel).numpy(), vel, atol=1e-5)
    assert _cached_ops() == {"warp", "integrate_svf"}


def test_auto_path_gradients_match_finite_differences_float64(auto_everywhere):
    rng = np.random.default_rng(6)
    shape = (5, 6, 4)
    img = rng.random((1, *shape, 2))
    # fractional parts in [0.2, 0.8]: steps of h never cross a voxel edge (kinks of the sampler)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    cells = rng.integers(0, np.array(shape) - 1, size=(1, *shape, 3))
    disp = cells + rng.uniform(0.2, 0.8, (1, *shape, 3)) - grid[None]
    eager = dict(n_dirs=2, graph=False)  # the ops' own (auto-compiled) eager paths
    check_directional_derivatives(sampling.warp, [img, disp], rng, **eager)
    vel = _smooth(shape, 0.6, 7).astype("float64")[None]
    check_directional_derivatives(lambda v: fields.integrate_svf(v, 3), [vel], rng, **eager)
    check_directional_derivatives(lambda v: fields.integrate_svf(v, 3, recompute=True), [vel], rng,
                                  **eager)
    assert _cached_ops() == {"warp", "integrate_svf"}
    # and the compiled functions ran in float64 (a float32 trace would miss 1e-6 relative)
    assert sampling.warp(img, disp).dtype == tf.float64


def test_auto_does_not_nest_inside_compiled_functions(auto_everywhere):
    vel = tf.constant(_smooth((8, 8, 8), 1.0, 8)[None])
    outer = compile_cache.jit_function(lambda v: sampling.warp(v, fields.integrate_svf(v, 3)))
    plain = sampling.warp(vel, fields.integrate_svf(vel, 3, jit=False), jit=False)
    compile_cache.clear()
    np.testing.assert_allclose(outer(vel).numpy(), plain.numpy(), atol=1e-5)
    assert _cached_ops() == set()
    # jit=False is obeyed at any size
    fields.integrate_svf(vel, 3, jit=False)
    assert _cached_ops() == set()


def test_auto_layers_in_tf_data_and_saved_models(auto_everywhere, tmp_path):
    shape = (8, 10, 6)
    rng = np.random.default_rng(9)
    image = rng.random((1, *shape, 1)).astype("float32")
    vel = _smooth(shape, 1.0, 10)[None]
    d = fields.integrate_svf(vel, 4, jit=False)
    want = sampling.warp(image, d, jit=False).numpy()

    ds = tf.data.Dataset.from_tensors((image[0], vel[0])).map(
        lambda i, v: sampling.warp(i[None], fields.integrate_svf(v[None], 4))[0])
    np.testing.assert_allclose(next(iter(ds)).numpy()[None], want, atol=1e-5)

    x, v = keras.Input(shape + (1,)), keras.Input(shape + (3,))
    model = keras.Model([x, v], L.SpatialTransformer()([x, L.VecInt(4)(v)]))
    assert [lay.get_config()["jit"] for lay in model.layers if hasattr(lay, "jit")] == ["auto"] * 2
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded([image, vel]).numpy(), want, atol=1e-5)
    module = tf.Module()
    module.f = tf.function(lambda a, b: model([a, b]),
                           input_signature=[tf.TensorSpec((None, *shape, 1)),
                                            tf.TensorSpec((None, *shape, 3))])
    tf.saved_model.save(module, str(tmp_path / "sm"))
    np.testing.assert_allclose(tf.saved_model.load(str(tmp_path / "sm")).f(image, vel).numpy(),
                               want, atol=1e-5)
