"""The voxelmorph plugin's correlation-matching network (``model.matching: correlation``), in 2D."""

from __future__ import annotations

import copy

import keras
import numpy as np
import pytest
from scipy import ndimage

from tfreg.config import method_defaults
from tfreg.errors import ConfigError
from tfreg.export import export_model, load_model
from tfreg.registry import discover

SHAPE = (32, 32)
SHIFT = (2, -2)   # voxels of the input grid: one voxel of the half grid the matching runs on


@pytest.fixture(scope="module")
def loaded():
    return discover().get("voxelmorph")


@pytest.fixture(scope="module")
def config(loaded):
    cfg = method_defaults(loaded.method)
    cfg["model"]["matching"] = "correlation"
    return cfg


@pytest.fixture(scope="module")
def model(loaded, config):
    return loaded.method.build_model(config, SHAPE)


def _pair() -> tuple[np.ndarray, np.ndarray]:
    """A smooth random image and its copy with moving(y) = fixed(y - SHIFT) (wrapped): the true
    pull displacement is SHIFT everywhere."""
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.random(SHAPE), 1.5)
    image = (image - image.min()) / (image.max() - image.min())
    fixed = image[None, ..., None].astype(np.float32)
    return fixed, np.roll(fixed, SHIFT, axis=(1, 2))


INNER = (0, slice(6, -6), slice(6, -6))


def test_untrained_network_recovers_a_known_shift(model):
    fixed, moving = _pair()
    out = model({"moving": moving, "fixed": fixed})
    disp = out["disp"].numpy()[INNER]
    assert disp.shape[-1] == 2
    np.testing.assert_allclose(np.median(disp.reshape(-1, 2), axis=0), SHIFT, atol=0.3)
    before = np.mean((moving - fixed)[INNER] ** 2)
    after = np.mean((out["warped"].numpy() - fixed)[INNER] ** 2)
    assert after < 0.1 * before, (before, after)


def test_outputs_weights_and_divisor(loaded, config, model):
    assert loaded.method.divisor(config) == 2
    fixed, moving = _pair()
    out = model({"moving": moving, "fixed": fixed})
    assert tuple(out["disp"].shape) == (1, *SHAPE, 2)
    assert tuple(out["preint_flow"].shape) == (1, 16, 16, 2)
    assert tuple(out["warped"].shape) == (1, *SHAPE, 1)
    names = {w.path.split("/")[0] for w in model.trainable_weights}
    assert "soft_argmax" in names and "feat_conv_0" in names and "refine_out" in names


def test_keras_file_and_export_round_trip(loaded, config, model, tmp_path):
    fixed, moving = _pair()
    weights = model.get_weights()
    rng = np.random.default_rng(1)
    # non-trivial weights: learned features and refinement contribute
    model.set_weights([w + 0.05 * rng.standard_normal(w.shape).astype(w.dtype) for w in weights])
    try:
        expected = model({"moving": moving, "fixed": fixed})["disp"].numpy()
        model.save(tmp_path / "m.keras")
        again = keras.saving.load_model(tmp_path / "m.keras")
        np.testing.assert_allclose(again({"moving": moving, "fixed": fixed})["disp"].numpy(),
                                   expected, atol=1e-5)
        export_model(model, config, tmp_path / "exported", method=loaded, inshape=SHAPE,
                     preprocessing=None)
        _, disp = load_model(tmp_path / "exported").register(fixed, moving)
        np.testing.assert_allclose(disp, expected, atol=1e-5)
    finally:
        model.set_weights(weights)


@pytest.mark.parametrize("key, value, message", [
    ("matching", "nope", "model.matching: expected one of unet, correlation"),
    ("correlation.radius", 0, "model.correlation.radius: expected an integer >= 1"),
    ("correlation.metric", "l1", "model.correlation.metric"),
    ("correlation.temperature", 0.0, "model.correlation.temperature"),
    ("bidir", True, "model.matching: correlation has no bidir"),
])
def test_bad_settings_are_one_line(loaded, config, key, value, message):
    cfg = copy.deepcopy(config)
    section = cfg["model"]
    *parents, last = key.split(".")
    for p in parents:
        section = section[p]
    section[last] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        loaded.method.build_model(cfg, SHAPE)
