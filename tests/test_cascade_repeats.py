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


def test_register_cascades_k_on_distinct_cascades(tmp_path):
    """`register --cascades K` on a model of n = 2 distinct cascades: K = 4 runs each twice (the
    table has 4 steps, none marked trained), K = 3 is refused with one line."""
    import json

    from click.testing import CliRunner

    from tfreg_plugins.cascade.report import recursion_overrides
    from tfreg.synthetic import write_collection
    from tfreg_cli.main import cli

    assert recursion_overrides({"model": {"cascades": 2}}, {"recursions": 6}) == {
        "model.repeats": 3}
    assert recursion_overrides({"model": {"cascades": 2, "shared_weights": True}},
                               {"recursions": 5}) == {"model.cascades": 5}
    spec = write_collection(tmp_path / "data", n=2, shape=(32, 32, 32), seed=1)
    args = ["train", "cascade", "--data", str(spec), "--steps", "1", "-q", "--out",
            str(tmp_path / "run")]
    for key, value in SMALL.items():
        args += ["--set", f"model.{key}={str(value).lower()}"]
    runner = CliRunner()
    assert runner.invoke(cli, args).exit_code == 0
    assert runner.invoke(cli, ["export", str(tmp_path / "run"), "-o",
                               str(tmp_path / "m")]).exit_code == 0
    images = sorted((tmp_path / "data" / "images").glob("*.nii.gz"))
    base = ["register", str(images[0]), str(images[1]), "--model", str(tmp_path / "m"), "-q"]
    result = runner.invoke(cli, base + ["--cascades", "4", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "o" / "report.json").read_text())["recursions"]
    assert [r["recursions"] for r in rows] == [1, 2, 3, 4]
    assert not any(r["trained"] for r in rows)
    result = runner.invoke(cli, base + ["--cascades", "3", "-o", str(tmp_path / "o3")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == ("Error: --cascades: 3 is not a multiple of the 2 distinct "
                                     "cascades of this model (each cascade runs K/2 times; use "
                                     "K = 2, 4, 6, ...)")
