"""LapIRN's Learn2Reg-era variants: fields in voxels (``units: voxels``, range_flow 60), the
shipped configs that reproduce the original scripts, and the resized-OASIS data spec."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from tfreg.config import load_yaml, method_defaults, resolve
from tfreg.data import Preprocessing
from tfreg.errors import ConfigError
from tfreg.io import Volume
from tfreg.registry import discover
from tfreg_configs import config_path
import tfreg_plugins.lapirn
from tfreg_plugins.lapirn import losses, network

#: the method's shipped variant configs live beside its code
PLUGIN_DIR = Path(tfreg_plugins.lapirn.__file__).parent


METHOD = discover().get("lapirn").method


def _config(name: str | None = None, **sections) -> dict:
    file_cfg = load_yaml(PLUGIN_DIR / name) if name else {}
    for key, value in sections.items():
        file_cfg.setdefault(key, {}).update(value)
    return resolve(method_defaults(METHOD), file_cfg, None)


def _pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.random((1, *shape, 1)).astype("float32") for k in ("moving", "fixed")}


def test_voxel_units_bound_every_level_by_range_flow_voxels():
    # saturated heads: level 1 reaches +-range_flow voxels on every axis (not range_flow*(n-1)/2),
    # and each later level adds up to range_flow to twice the upsampled previous field
    shape = (32, 24)
    cfg = _config("lapirn-l2r-disp.yaml", model={"range_flow": 1.5, "features": 4,
                                                 "res_blocks": 1})
    model = network.build_model(cfg, shape)
    for level in (1, 2, 3):
        head = model.get_layer(f"lapirn_l{level}_head_conv2")
        head.kernel.assign(np.full(head.kernel.shape, 1e4, "float32"))
    out = model(_pair(shape, seed=1))
    reach = [np.abs(out[f"disp_l{l}"].numpy()).reshape(-1, 2).max(axis=0) for l in (1, 2, 3)]
    np.testing.assert_allclose(reach[0], [1.5, 1.5], rtol=1e-3)
    assert np.all(reach[1] <= 2 * reach[0] + 1.5 + 1e-4)
    # the previous field enters the CRN unscaled: no normalising layer in the graph
    names = [l.name for l in model.layers]
    assert not any("field_to_normalised" in n for n in names)
    assert any("field_to_normalised" in n for n in
               (l.name for l in network.build_model(_config(), (16, 16)).layers))


def test_voxel_units_smoothness_has_factor_one():
    # u_0 = 0.5 * x_0 in voxels: forward differences 0.5 along axis 0, 0 along axis 1 and in
    # channel 1 -> R = (1/N) sum_k mean(diff^2) = (0.25 / 2 + 0) / 2 = 0.0625 (factor 1), and 4x that
    # for the normalised-unit models
    u = np.zeros((1, 8, 8, 2), np.float32)
    u[..., 0] = 0.5 * np.arange(8)[:, None]
    assert float(losses.smoothness(u, 1.0)) == pytest.approx(0.0625)
    assert float(losses.smoothness(u)) == pytest.approx(0.25)
    assert losses.loss_options(_config("lapirn-l2r-disp.yaml")).smooth_factor == 1.0
    assert losses.loss_options(_config("lapirn-l2r-diff.yaml")).smooth_factor == 4.0


@pytest.mark.parametrize("name,expected", [
    ("lapirn-l2r-disp.yaml", dict(variant="displacement", features=24, range_flow=60.0,
                                  units="voxels", smooth=1.0, steps=(20000, 20000, 60000),
                                  checkpoint=1000)),
    ("lapirn-l2r-diff.yaml", dict(variant="diffeomorphic", features=24, range_flow=0.4,
                                  units="normalised", smooth=3.5, steps=(30000, 30000, 60000),
                                  checkpoint=5000)),
])
def test_learn2reg_configs_hold_the_original_scripts_values(name, expected):
    cfg = _config(name)
    opts = network.model_options(cfg)
    assert (opts.variant, opts.features, opts.range_flow, opts.units) == (
        expected["variant"], expected["features"], expected["range_flow"], expected["units"])
    assert losses.loss_options(cfg).smooth == expected["smooth"]
    sched = cfg["schedule"]
    # the original loops run steps 0..N inclusive (20001 iterations): N steps here
    assert (sched["level1_steps"], sched["level2_steps"], sched["level3_steps"]) == expected["steps"]
    assert sched["freeze_steps"] == 2000 and cfg["train"]["checkpoint_every"] == expected["checkpoint"]
    # start_channel 6: every CRN conv has 24 features; the level-3 head has 48 -> 24 -> 3
    model = network.build_model(cfg, (16, 16, 16))
    head = model.get_layer("lapirn_l3_head_conv1")
    assert tuple(head.kernel.shape) == (3, 3, 3, 48, 24)


def test_units_config_error():
    with pytest.raises(ConfigError, match=r"model\.units: expected one of normalised, voxels"):
        network.model_options({"model": {"units": "mm"}})


def test_resized_oasis_spec_matches_the_original_resize():
    # LapIRN resizes 160x192x224 to 144x160x192 with trilinear interpolate(align_corners=False):
    # output voxel i samples input (i + 0.5) * n_in / n_out - 0.5. The data spec's spacing gives
    # the same grid on Learn2Reg's axis order 160x224x192 -> 144x192x160.
    spec = load_yaml(config_path("data/oasis-lapirn-resized.yaml"))
    prep = Preprocessing.from_dict({**spec["preprocess"], "shape": spec["shape"]}, "spec")
    record = prep.plan(Volume(np.zeros((160, 224, 192), np.float32), np.eye(4), None, "oasis"))
    assert tuple(record.shape) == (144, 192, 160)
    for axis, (n_in, n_out) in enumerate(((160, 144), (224, 192), (192, 160))):
        i = np.arange(n_out)
        src = record.matrix[axis, axis] * i + record.matrix[axis, 3]
        np.testing.assert_allclose(src, (i + 0.5) * n_in / n_out - 0.5, atol=1e-5)
