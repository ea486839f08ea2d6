"""model.recompute (VoxelMorph): the integration recomputed in the backward pass gives the
outputs and weight gradients of plain autodiff, and the model saves and loads."""
from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreg.config import method_defaults
from tfreg.errors import ConfigError
from tfreg.layers import VecInt
from tfreg.registry import discover

SHAPE = (16, 16, 16)


def _model(recompute: bool, bidir: bool = False) -> keras.Model:
    method = discover().get("voxelmorph").method
    config = method_defaults(method)
    config["model"].update(recompute=recompute, bidir=bidir)
    return method.build_model(config, SHAPE)


def _inputs():
    rng = np.random.default_rng(0)
    return {k: tf.constant(rng.random((1, *SHAPE, 1), np.float32)) for k in ("moving", "fixed")}


def _outputs_and_grads(model, inputs):
    @tf.function
    def run():
        with tf.GradientTape() as tape:
            out = model(inputs, training=True)
            loss = (tf.reduce_mean((out["warped"] - inputs["fixed"]) ** 2)
                    + tf.reduce_mean(out["preint_flow"] ** 2))
        return out, tape.gradient(loss, model.trainable_variables)
    return run()


def test_gradients_equal_plain_autodiff():
    plain, recomputed = _model(False, bidir=True), _model(True, bidir=True)  # both integrations
    assert [layer.recompute for layer in recomputed.layers if isinstance(layer, VecInt)] == \
        [True, True]
    # a field large enough that the squarings interpolate between voxels
    weights = [w * 5000.0 if w.ndim == 5 and w.shape[-1] == 3 else w for w in plain.get_weights()]
    plain.set_weights(weights)
    recomputed.set_weights(weights)
    inputs = _inputs()
    out_p, grads_p = _outputs_and_grads(plain, inputs)
    out_r, grads_r = _outputs_and_grads(recomputed, inputs)
    assert float(tf.reduce_max(tf.abs(out_p["disp"]))) > 0.5
    for key in out_p:
        np.testing.assert_allclose(out_r[key].numpy(), out_p[key].numpy(), rtol=1e-6, atol=1e-6)
    for gp, gr in zip(grads_p, grads_r):
        assert float(tf.reduce_max(tf.abs(gp))) > 0
        np.testing.assert_allclose(gr.numpy(), gp.numpy(), rtol=1e-5,
                                   atol=1e-6 * float(tf.reduce_max(tf.abs(gp))))


def test_saves_and_loads(tmp_path):
    model = _model(True)
    inputs = _inputs()
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.get_layer("flow_int").recompute is True
    np.testing.assert_allclose(loaded(inputs)["disp"], model(inputs)["disp"], rtol=1e-6, atol=1e-7)


def test_bad_value_is_refused():
    method = discover().get("voxelmorph").method
    config = method_defaults(method)
    config["model"]["recompute"] = "yes"
    with pytest.raises(ConfigError, match="model.recompute"):
        method.build_model(config, SHAPE)
    with pytest.raises(ValueError, match="recompute"):
        VecInt(7, recompute="yes")
