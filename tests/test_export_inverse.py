"""Models that output their inverse export it in the `register` signature; VoxelMorph's
bidirectional diffeomorphic model is one, and its inverse composes with its forward field to
the identity."""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfreg import layers
from tfreg.export import RegistrationModel, _Exported
from tfreg.ops.inverse import composition_residual
from tfreg.registry import ModelIO

SHAPE = (16, 16, 16)


def _velocity(seed=0, amplitude=1.5):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    v = np.stack([ndimage.gaussian_filter(rng.normal(size=SHAPE), 2.5) for _ in range(3)], -1)
    return (v * amplitude / np.abs(v).max())[None].astype(np.float32)


def test_register_signature_carries_the_inverse(tmp_path):
    v = tf.constant(_velocity())
    moving = keras.Input((*SHAPE, 1), name="moving")
    fixed = keras.Input((*SHAPE, 1), name="fixed")
    disp = layers.VecInt(7)(keras.layers.Lambda(lambda m: v + 0.0 * m[..., :1])(moving))
    inverse = layers.VecInt(7)(keras.layers.Lambda(lambda m: -v + 0.0 * m[..., :1])(moving))
    warped = layers.SpatialTransformer()([moving, disp])
    model = keras.Model({"moving": moving, "fixed": fixed},
                        {"warped": warped, "disp": disp, "inverse_disp": inverse})
    module = _Exported(model, SHAPE, ModelIO(), {})
    tf.saved_model.save(module, str(tmp_path / "saved_model"),
                        signatures={"register": module.register, "warp": module.warp})
    loaded = tf.saved_model.load(str(tmp_path / "saved_model"))
    z = tf.zeros((1, *SHAPE, 1))
    out = {k: v.numpy() for k, v in loaded.signatures["register"](fixed=z, moving=z).items()}
    assert set(out) == {"warped", "displacement", "inverse_displacement"}
    res = composition_residual(out["displacement"], out["inverse_displacement"]).numpy()
    naive = composition_residual(out["displacement"], -out["displacement"]).numpy()
    inner = (0,) + (slice(3, -3),) * 3
    assert np.abs(res[inner]).max() < 0.05 < np.abs(naive[inner]).max()
    # RegistrationModel passes it on
    reg = RegistrationModel(tmp_path, {"method": "test", "inshape": list(SHAPE)}, {},
                            loaded.signatures["register"], loaded.signatures["warp"])
    _, d, inv = reg.register(np.zeros(SHAPE), np.zeros(SHAPE), inverse=True)
    np.testing.assert_allclose(inv, out["inverse_displacement"][0], atol=1e-6)
    assert len(reg.register(np.zeros(SHAPE), np.zeros(SHAPE))) == 2


def test_voxelmorph_bidirectional_diffeomorphic_model_outputs_its_inverse():
    from tfreg.config import method_defaults
    from tfreg.registry import discover

    method = discover().get("voxelmorph").method
    cfg = method_defaults(method)
    cfg["model"].update(bidir=True, enc_features=[4, 4, 4, 4], dec_features=[4, 4, 4, 4, 4, 4])
    model = method.build_model(cfg, SHAPE)
    flow = model.get_layer("flow")
    kernel, bias = flow.get_weights()
    rng = np.random.default_rng(0)
    flow.set_weights([rng.normal(0, 0.3, kernel.shape).astype(np.float32), bias])
    rng_img = rng.random((1, *SHAPE, 1), dtype=np.float32)
    from scipy import ndimage

    img = ndimage.gaussian_filter(rng_img, (0, 2, 2, 2, 0))
    out = model({"moving": img, "fixed": img[:, ::-1]}, training=False)
    disp, inverse = np.asarray(out["disp"]), np.asarray(out["inverse_disp"])
    assert np.abs(disp).max() > 0.5
    res = composition_residual(disp, inverse).numpy()
    inner = (0,) + (slice(3, -3),) * 3
    assert np.abs(res[inner]).mean() < 0.1 * np.abs(disp[inner]).mean()
    cfg["model"]["int_steps"] = 0   # not diffeomorphic: -flow is no inverse, none is exported
    assert "inverse_disp" not in method.build_model(cfg, SHAPE).output
