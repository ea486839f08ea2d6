"""VoxelMorph variants: the MICCAI 2018 network, the probabilistic diffeomorphic model and its KL
loss, and the shipped configs that build them."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreg.config import load_yaml, method_defaults, resolve
from tfreg.errors import ConfigError
from tfreg.layers import GaussianSample
from tfreg.losses import KL, degree_map
from tfreg.registry import discover
import tfreg_plugins.voxelmorph
from tfreg_plugins.voxelmorph import METHOD, losses

#: the method's shipped variant configs live beside its code
PLUGIN_DIR = Path(tfreg_plugins.voxelmorph.__file__).parent


def _config(name: str | None = None, **dotted):
    defaults = method_defaults(discover().get("voxelmorph").method)
    file_cfg = load_yaml(PLUGIN_DIR / name) if name else None
    return resolve(defaults, file_cfg, dotted)


def _convs(model):
    return [(l.name, tuple(l.kernel.shape), l.strides) for l in model.layers
            if isinstance(l, (keras.layers.Conv2D, keras.layers.Conv3D))]


# ------------------------------------------------------------------------------------ KL loss

def test_kl_hand_value_2d():
    # 3x4 grid, N = 2: degrees 2 (4 corners), 3 (6 edge voxels), 4 (2 inside) -> mean 34/12.
    # log_var = 0: sigma term = prior_lambda * 34/12. mean channel 0 = 2 * x0, channel 1 = 0:
    # squared forward differences 4 along axis 0 for channel 0 -> mean over the (2, 4, 2)
    # difference array 2, along axis 1 0; prec = 0.5 * (2 + 0) / 2 = 0.5.
    # KL = N/2 * (25 * 34/12 + 25 * 0.5) = 83.333...
    np.testing.assert_array_equal(degree_map((3, 4)), [[2, 3, 3, 2], [3, 4, 4, 3], [2, 3, 3, 2]])
    mean = np.zeros((1, 3, 4, 2), np.float32)
    mean[..., 0] = 2.0 * np.arange(3)[:, None]
    params = np.concatenate([mean, np.zeros_like(mean)], -1)
    assert float(KL(25.0)(None, params)) == pytest.approx(25 * (34 / 12 + 0.5), rel=1e-6)
    # log_var = log 0.1 everywhere, zero mean: KL = N/2 * mean(lambda D 0.1 - log 0.1)
    params = np.concatenate([np.zeros_like(mean), np.full_like(mean, np.log(0.1))], -1)
    expected = 1.0 * (10 * 0.1 * 34 / 12 - np.log(0.1))
    assert float(KL(10.0)(None, params)) == pytest.approx(expected, rel=1e-6)


def test_kl_3d_degree_and_minimum():
    # 3D interior degree is 6; d/dlog_var of lambda D exp(log_var) - log_var is 0 at
    # exp(log_var) = 1 / (lambda D): the KL is smallest there (voxelmorph's optimal variance).
    assert degree_map((4, 4, 4))[1, 1, 1] == 6 and degree_map((4, 4, 4))[0, 0, 0] == 3
    lam = 25.0
    degree = degree_map((4, 4, 4))[None, ..., None]
    best = np.log(1.0 / (lam * degree)) * np.ones((1, 4, 4, 4, 3))
    zero = np.zeros((1, 4, 4, 4, 3))
    at_best = float(KL(lam)(None, np.concatenate([zero, best], -1).astype("float32")))
    for shift in (-0.3, 0.3):
        other = np.concatenate([zero, best + shift], -1).astype("float32")
        assert float(KL(lam)(None, other)) > at_best


# ------------------------------------------------------------------------------- sampling layer

def test_gaussian_sample_training_and_inference():
    mean = np.full((1, 64, 64, 2), 3.0, np.float32)
    log_var = np.full_like(mean, np.log(4.0))  # std 2
    layer = GaussianSample(seed=1)
    np.testing.assert_array_equal(layer([mean, log_var], training=False), mean)
    sample = np.asarray(layer([mean, log_var], training=True))
    assert abs(sample.mean() - 3.0) < 0.1 and abs(sample.std() - 2.0) < 0.1
    # differentiable in mean (slope 1) and log_var (slope noise * std / 2)
    m, lv = tf.constant(mean[:, :4, :4]), tf.constant(log_var[:, :4, :4])
    with tf.GradientTape() as tape:
        tape.watch([m, lv])
        out = layer([m, lv], training=True)
    g_mean, g_lv = tape.gradient(out, [m, lv])
    np.testing.assert_allclose(g_mean, 1.0)
    np.testing.assert_allclose(g_lv, (np.asarray(out) - 3.0) / 2.0, rtol=1e-5)


# ------------------------------------------------------------------------------ MICCAI 2018

def test_miccai2018_config_builds_the_2018_network():
    """miccai2018_net (2018 code, full_size=False): stride-2 convs 16, 32, 32, 32 at 1/2 .. 1/16;
    decoder 32 at 1/16, x2 + skip (1/8 enc, 32) -> 32, x2 + skip (1/4 enc, 32) -> 32,
    x2 + skip (1/2 enc, 16) -> 32, then 16 at 1/2; heads flow (mean) and log_sigma, 16 -> N at 1/2,
    log_sigma kernel N(0, 1e-10) and bias -10; integration at 1/2, then resized to full."""
    cfg = _config("voxelmorph-miccai2018.yaml")
    model = METHOD.build_model(cfg, (32, 32, 32))
    convs = _convs(model)
    assert [k for _, k, _ in convs] == [
        (3, 3, 3, 2, 16), (3, 3, 3, 16, 32), (3, 3, 3, 32, 32), (3, 3, 3, 32, 32),
        (3, 3, 3, 32, 32), (3, 3, 3, 64, 32), (3, 3, 3, 64, 32),
        (3, 3, 3, 48, 32), (3, 3, 3, 32, 16),
        (3, 3, 3, 16, 3), (3, 3, 3, 16, 3)]
    assert [s for _, _, s in convs] == [(2, 2, 2)] * 4 + [(1, 1, 1)] * 7
    assert [n for n, _, _ in convs][-2:] == ["flow", "log_sigma"]
    log_sigma = model.get_layer("log_sigma")
    assert float(np.abs(log_sigma.kernel.numpy()).max()) < 1e-8
    np.testing.assert_array_equal(log_sigma.bias.numpy(), -10.0)
    rng = np.random.default_rng(0)
    batch = {"moving": rng.random((1, 32, 32, 32, 1), np.float32),
             "fixed": rng.random((1, 32, 32, 32, 1), np.float32)}
    out = model(batch, training=False)
    assert out["flow_params"].shape == (1, 16, 16, 16, 6)
    assert out["preint_flow"].shape == (1, 16, 16, 16, 3)
    assert out["disp"].shape == (1, 32, 32, 32, 3)
    # inference uses the mean: deterministic, and preint_flow is the mean head
    again = model(batch, training=False)
    np.testing.assert_array_equal(out["disp"], again["disp"])
    np.testing.assert_array_equal(out["preint_flow"], out["flow_params"][..., :3])
    # training samples around it: std exp(-10/2) = 6.7e-3 with the initial log_sigma head
    train = model(batch, training=True)
    noise = np.asarray(train["preint_flow"]) - np.asarray(train["flow_params"][..., :3])
    assert 5e-3 < noise.std() < 9e-3


def test_probabilistic_loss_terms_by_hand():
    cfg = _config("voxelmorph-miccai2018.yaml")
    loss_fn = losses.build(cfg)
    rng = np.random.default_rng(2)
    fixed = rng.random((1, 16, 16, 16, 1), np.float32)
    warped = rng.random((1, 16, 16, 16, 1), np.float32)
    mean = rng.normal(0, 0.5, (1, 8, 8, 8, 3)).astype("float32")
    log_var = rng.normal(-4, 0.5, (1, 8, 8, 8, 3)).astype("float32")
    outputs = {"warped": warped, "disp": np.zeros((1, 16, 16, 16, 3), np.float32),
               "preint_flow": mean, "flow_params": np.concatenate([mean, log_var], -1)}
    terms = loss_fn({"fixed": fixed, "moving": fixed}, outputs)
    assert set(terms) == {"sim", "kl"}
    # recon: MSE / 0.01^2; KL recomputed in NumPy from its definition (prior_lambda 25, weight 1)
    assert float(terms["sim"]) == pytest.approx(np.mean((fixed - warped) ** 2) / 1e-4, rel=1e-5)
    degree = degree_map((8, 8, 8))[None, ..., None]
    sigma = np.mean(25 * degree * np.exp(log_var) - log_var)
    prec = 25 * 0.5 * np.mean([np.mean(np.diff(mean, axis=a) ** 2) for a in (1, 2, 3)])
    assert float(terms["kl"]) == pytest.approx(1.5 * (sigma + prec), rel=1e-5)


def test_probabilistic_config_on_the_current_network():
    cfg = _config("voxelmorph-probabilistic.yaml")
    model = METHOD.build_model(cfg, (32, 32))
    out = model({"moving": np.zeros((1, 32, 32, 1), np.float32),
                 "fixed": np.zeros((1, 32, 32, 1), np.float32)}, training=True)
    assert out["flow_params"].shape == (1, 32, 32, 4)   # heads at full resolution
    assert out["preint_flow"].shape == (1, 16, 16, 2)   # sample resized to 1/int_resolution
    terms = losses.build(cfg)({"fixed": np.zeros((1, 32, 32, 1), np.float32),
                               "moving": np.zeros((1, 32, 32, 1), np.float32)}, out)
    assert set(terms) == {"sim", "kl"}
    assert losses.grad_weight(cfg["loss"], probabilistic=True) == 0.01


@pytest.mark.parametrize("options,message", [
    ({"model.probabilistic": True, "model.int_steps": 0}, "model.probabilistic: the probabilistic"),
    ({"model.probabilistic": "yes"}, "overrides: model.probabilistic: expected true or false"),
])
def test_probabilistic_config_errors(options, message):
    with pytest.raises(ConfigError) as err:
        METHOD.build_model(_config(**options), (32, 32))  # config or build refuses it
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_miccai2018_trains_exports_and_registers_with_the_mean(tmp_path):
    from click.testing import CliRunner

    from tfreg.export import load_model
    from tfreg.synthetic import write_collection
    from tfreg_cli.main import cli

    spec = write_collection(tmp_path / "data", n=3, shape=(16, 16, 16), seed=0)
    spec.write_text(spec.read_text() + "sampling: replacement\n")
    run = CliRunner().invoke(cli, [str(a) for a in [
        "train", "voxelmorph", "--config", str(PLUGIN_DIR / "voxelmorph-miccai2018.yaml"),
        "--data", spec, "--steps", "2", "--out", tmp_path / "run", "--quiet",
        "--set", "model.enc_features=[4, 4, 4, 4]", "--set", "model.dec_features=[4, 4, 4, 4, 4]"]])
    assert run.exit_code == 0, run.output
    events = [p for p in (tmp_path / "run").rglob("events.out.tfevents*")]
    assert any(b"loss/kl" in p.read_bytes() for p in events)  # the KL term was trained
    run = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), "-o", str(tmp_path / "m")])
    assert run.exit_code == 0, run.output
    model = load_model(tmp_path / "m")
    rng = np.random.default_rng(0)
    fixed, moving = rng.random((2, 16, 16, 16), np.float32)
    first = model.register(fixed, moving)[1]
    np.testing.assert_array_equal(first, model.register(fixed, moving)[1])  # the mean, no noise
