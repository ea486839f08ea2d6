"""Test-time recursion of a model with n distinct cascades: each cascade applied R times in a row
(the original's ``[deform_i] * rep for i in range(n)``), checked against the cascades' own
networks applied one after another by hand."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfreg.config import method_defaults, resolve
from tfreg.layers import warp
from tfreg.registry import discover

METHOD = discover().get("cascade").method
SMALL = {"cascades": 2, "shared_weights": False, "affine_stem": False, "vtn_levels": 3,
         "vtn_channels": 4}


def _config(**model) -> dict:
    return resolve(method_defaults(METHOD), {"model": {**SMALL, **model}}, None)


def test_repeats_apply_each_cascade_r_times_in_order():
    shape = (32, 32)
    trained = METHOD.build_model(_config(), shape)
    rng = np.random.default_rng(0)
    # larger random weights than the init so that each cascade moves the image noticeably
    trained.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype)
                         for w in trained.get_weights()])
    repeated = METHOD.build_model(_config(repeats=2), shape)
    repeated.set_weights(trained.get_weights())  # the same distinct networks, same weights
    assert {l.name for l in repeated.layers if l.name.startswith("cascade_")} == {
        "cascade_0", "cascade_1"}

    fixed = rng.random((1, *shape, 1)).astype("float32")
    moving = rng.random((1, *shape, 1)).astype("float32")
    out = repeated({"fixed": fixed, "moving": moving}, training=False)

    # by hand: cascade_0, cascade_0, cascade_1, cascade_1; compose u <- u o (x + f) + f and
    # always warp the original moving image
    nets = [trained.get_layer("cascade_0")] * 2 + [trained.get_layer("cascade_1")] * 2
    warped, total = tf.constant(moving), None
    for k, net in enumerate(nets, start=1):
        flow = net([tf.constant(fixed), warped])
        total = flow if total is None else warp(total, flow) + flow
        warped = warp(tf.constant(moving), total)
        np.testing.assert_allclose(out[f"disp_{k}"], total, atol=1e-4)
    np.testing.assert_allclose(out["disp"], total, atol=1e-4)
    assert "disp_5" not in out
    assert float(np.abs(np.asarray(out["disp_4"]) - np.asarray(out["disp_2"])).max()) > 1e-3
