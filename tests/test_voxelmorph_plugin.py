"""The ``voxelmorph`` plugin: architecture facts (methods.md §1), the model contract, losses
against hand-computed values, config errors, a learning test and train -> export -> register
through the CLI."""

from __future__ import annotations

import time
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from tfreg.config import method_defaults, resolve
from tfreg.errors import ConfigError
from tfreg.registry import discover

from tfreg_plugins.voxelmorph import METHOD, losses


def config(**dotted):
    """The resolved default config with dotted overrides, e.g. ``config(**{"model.bidir": True})``."""
    return resolve(method_defaults(discover().get("voxelmorph").method), None, dotted)


SMALL = {"model.enc_features": [4, 8, 8, 8], "model.dec_features": [8, 8, 8, 8, 8, 4, 4]}


# --------------------------------------------------------------------------------- registry
def test_discovered_with_voxelmorph_defaults():
    loaded = discover().get("voxelmorph")
    cfg = config()
    # 2**4 for the default 4-level U-Net; 2**5 once a fifth level is configured (from the config)
    assert loaded.method.divisor(cfg) == 16
    assert loaded.method.divisor(config(**{"model.enc_features": [4, 4, 4, 4, 4],
                                           "model.dec_features": [4] * 8})) == 32
    assert cfg["model"]["enc_features"] == [16, 32, 32, 32]
    assert cfg["model"]["dec_features"] == [32, 32, 32, 32, 32, 16, 16]
    assert (cfg["model"]["int_steps"], cfg["model"]["int_resolution"]) == (7, 2)
    assert cfg["train"]["learning_rate"] == 1e-4 and cfg["train"]["batch_size"] == 1
    assert losses.grad_weight({"image": "ncc", "smooth_weight": None}) == 1.0
    assert losses.grad_weight({"image": "mse", "smooth_weight": None}) == 0.01
    assert losses.grad_weight({"image": "mse", "smooth_weight": 0.5}) == 0.5


# ------------------------------------------------------------------------------ architecture
# voxelmorph's VxmDense at 32^3 (methods.md §1): conv kernels (k, k, k, in, out) in graph order.
VXM_DEFAULT_CONVS = [
    ("unet_enc_conv_0_0", (3, 3, 3, 2, 16)),    # concat(moving, fixed), full resolution
    ("unet_enc_conv_1_0", (3, 3, 3, 16, 32)),   # 1/2
    ("unet_enc_conv_2_0", (3, 3, 3, 32, 32)),   # 1/4
    ("unet_enc_conv_3_0", (3, 3, 3, 32, 32)),   # 1/8
    ("unet_dec_conv_3_0", (3, 3, 3, 32, 32)),   # 1/16
    ("unet_dec_conv_2_0", (3, 3, 3, 64, 32)),   # 1/8: 32 upsampled + 32 skip
    ("unet_dec_conv_1_0", (3, 3, 3, 64, 32)),   # 1/4
    ("unet_dec_conv_0_0", (3, 3, 3, 64, 32)),   # 1/2
    ("unet_dec_final_conv_0", (3, 3, 3, 48, 32)),  # full: 32 upsampled + 16 skip
    ("unet_dec_final_conv_1", (3, 3, 3, 32, 16)),
    ("unet_dec_final_conv_2", (3, 3, 3, 16, 16)),
    ("flow", (3, 3, 3, 16, 3)),
]


def _convs(model):
    return [(l.name, tuple(l.kernel.shape), l.strides) for l in model.layers
            if isinstance(l, (keras.layers.Conv2D, keras.layers.Conv3D))]


def test_default_network_matches_voxelmorph():
    model = METHOD.build_model(config(), (32, 32, 32))
    assert [(n, k) for n, k, _ in _convs(model)] == VXM_DEFAULT_CONVS
    assert all(s == (1, 1, 1) for _, _, s in _convs(model))
    pools = [l for l in model.layers if isinstance(l, keras.layers.MaxPooling3D)]
    assert len(pools) == 4 and all(p.pool_size == (2, 2, 2) for p in pools)
    acts = [l for l in model.layers if isinstance(l, keras.layers.LeakyReLU)]
    assert len(acts) == 11 and all(abs(a.negative_slope - 0.2) < 1e-7 for a in acts)
    # every layer carries an explicit name (none of Keras' automatic ones like "conv3d_4")
    auto = [l.name for l in model.layers if l.name.split("_")[0] in
            {"conv3d", "leaky", "max", "up", "concatenate", "rescale", "vec", "spatial"}]
    assert auto == []
    # the flow head starts near zero: kernel ~ N(0, 1e-5), bias 0
    flow = model.get_layer("flow")
    std = float(np.std(flow.kernel.numpy()))
    assert 0.8e-5 < std < 1.2e-5 and not np.any(flow.bias.numpy())
    assert float(np.abs(model.get_layer("unet_enc_conv_0_0").kernel.numpy()).max()) > 1e-2


def test_stride2_variant_is_the_paper_network():
    """2018 network: 4 stride-2 encoder convs; dec[3], dec[4] at 1/2; upsample, concat the input
    (2 channels), dec[5:] at full resolution."""
    model = METHOD.build_model(config(**{"model.variant": "stride2"}), (32, 32, 32))
    convs = _convs(model)
    assert [s for _, _, s in convs[:4]] == [(2, 2, 2)] * 4
    assert [k for _, k, _ in convs] == [
        (3, 3, 3, 2, 16), (3, 3, 3, 16, 32), (3, 3, 3, 32, 32), (3, 3, 3, 32, 32),
        (3, 3, 3, 32, 32), (3, 3, 3, 64, 32), (3, 3, 3, 64, 32),
        (3, 3, 3, 48, 32), (3, 3, 3, 32, 32),   # at 1/2: 32 + skip 16, then 32
        (3, 3, 3, 34, 16), (3, 3, 3, 16, 16),   # full: 32 upsampled + 2 input channels
        (3, 3, 3, 16, 3)]
    assert not [l for l in model.layers if isinstance(l, keras.layers.MaxPooling3D)]


@pytest.mark.parametrize("shape,options,preint", [
    ((32, 32, 32), {}, (16, 16, 16)),
    ((16, 16, 16), {"model.int_steps": 0}, (16, 16, 16)),
    ((32, 48), {"model.bidir": True}, (16, 24)),
    ((32, 32), {"model.svf_resolution": 2, "model.int_resolution": 4}, (8, 8)),
    ((32, 32), {"model.variant": "stride2"}, (16, 16)),
])
def test_model_contract(shape, options, preint):
    model = METHOD.build_model(config(**SMALL, **options), shape)
    n = len(shape)
    rng = np.random.default_rng(0)
    moving = rng.random((2, *shape, 1)).astype("float32")
    fixed = rng.random((2, *shape, 1)).astype("float32")
    out = model({"moving": moving, "fixed": fixed})
    assert out["warped"].shape == (2, *shape, 1)
    assert out["disp"].shape == (2, *shape, n)
    assert out["preint_flow"].shape == (2, *preint, n)
    if options.get("model.bidir"):
        assert out["warped_fixed"].shape == (2, *shape, 1)
        assert out["neg_disp"].shape == (2, *shape, n)
    else:
        assert "warped_fixed" not in out
    # untrained: the field is tiny (flow head init N(0, 1e-5)) and the warp is nearly identity
    assert float(np.abs(out["disp"]).max()) < 0.05
    np.testing.assert_allclose(out["warped"], moving, atol=0.05)


def test_constant_flow_head_gives_that_displacement():
    """Flow conv kernel 0, bias c: the SVF is c everywhere; scaling and squaring of a constant
    field is the same constant, so disp == c and warped(x) = moving(x + c) (border clamp)."""
    model = METHOD.build_model(config(**SMALL), (32, 32))
    flow = model.get_layer("flow")
    c = np.array([2.0, -3.0], np.float32)
    flow.set_weights([np.zeros_like(flow.kernel.numpy()), c])
    moving = np.random.default_rng(1).random((1, 32, 32, 1)).astype("float32")
    out = model({"moving": moving, "fixed": moving})
    np.testing.assert_allclose(out["disp"], np.broadcast_to(c, (1, 32, 32, 2)), atol=1e-5)
    i = np.clip(np.arange(32) + 2, 0, 31)
    j = np.clip(np.arange(32) - 3, 0, 31)
    np.testing.assert_allclose(out["warped"], moving[:, i][:, :, j], atol=1e-5)


@pytest.mark.parametrize("options,shape,message", [
    ({"model.variant": "strided"}, (32, 32), "model.variant: expected one of maxpool, stride2, got 'strided'"),
    ({}, (24, 24, 24), "inshape: every size must divide by 16"),
    ({"model.int_resolution": 3}, (32, 32), "model.int_resolution: expected a power of two"),
    ({"model.enc_features": [16, 0]}, (32, 32), "model.enc_features: expected a non-empty list of positive integers"),
    ({"model.dec_features": [8, 8]}, (32, 32), "model.dec_features: needs at least len(enc_features) = 4 entries, got 2"),
    ({"model.variant": "stride2", "model.svf_resolution": 4}, (32, 32), "model.svf_resolution: the stride2 variant"),
    ({"model.variant": "stride2", "model.svf_resolution": 2}, (32, 32), "model.dec_features: the stride2 variant with svf_resolution 2"),
])
def test_model_config_errors(options, shape, message):
    with pytest.raises(ConfigError, match=None) as err:
        METHOD.build_model(config(**options), shape)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ losses
def _ramp_field(shape, a):
    """u_0(x) = a * x_0, other channels 0: forward differences a along axis 0, else 0."""
    n = len(shape)
    u = np.zeros((1, *shape, n), np.float32)
    u[..., 0] = a * np.arange(shape[0]).reshape((-1,) + (1,) * (n - 1))
    return u


def test_mse_and_grad_terms_by_hand():
    rng = np.random.default_rng(2)
    shape = (8, 10, 6)
    fixed, warped = rng.random((2, 1, *shape, 1)).astype("float32")
    fn = METHOD.build_loss(config())
    terms = fn({"fixed": fixed, "moving": fixed}, {"warped": warped, "preint_flow": _ramp_field(shape, 0.3),
                                                 "disp": np.zeros((1, *shape, 3), "float32")}, None)
    assert set(terms) == {"sim", "smooth"}
    np.testing.assert_allclose(float(terms["sim"]), np.mean((fixed - warped) ** 2), rtol=1e-5)
    # Grad l2 = mean_d mean(D_d^2) (channels included) * loss_mult(2); only d = 0, channel 0
    # is non-zero: 0.3^2 / 3 channels / 3 axes; lambda 0.01 for MSE
    np.testing.assert_allclose(float(terms["smooth"]), 0.01 * 2 * 0.09 / 9, rtol=1e-5)


def test_ncc_bidir_and_weights():
    rng = np.random.default_rng(3)
    shape = (12, 12)
    fixed, moving = rng.random((2, 1, *shape, 1)).astype("float32")
    cfg = config(**{"loss.image": "ncc", "loss.ncc_window": 5, "model.bidir": True,
                    "loss.smooth_weight": 0.5})
    fn = METHOD.build_loss(cfg)
    # warped == fixed and warped_fixed == 2 * moving: squared local correlation 1 everywhere
    # (zero padding keeps the linear relation at the borders; no flat windows in random images)
    outputs = {"warped": fixed, "warped_fixed": 2 * moving,
               "preint_flow": _ramp_field(shape, 1.0), "disp": np.zeros((1, *shape, 2), "float32")}
    terms = fn({"fixed": fixed, "moving": moving}, outputs, None)
    np.testing.assert_allclose(float(terms["sim"]), -1.0, atol=1e-4)
    np.testing.assert_allclose(float(terms["smooth"]), 0.5 * 2 * 1.0 / 2 / 2, rtol=1e-5)


def _numpy_dice(a, b, values):
    return np.mean([2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v))
                    for v in values])


def test_dice_term_on_warped_labels():
    rng = np.random.default_rng(4)
    shape = (16, 16)
    fixed_lab = rng.integers(0, 4, (1, *shape, 1)).astype("int32")
    moving_lab = rng.integers(0, 4, (1, *shape, 1)).astype("int32")
    image = np.zeros((1, *shape, 1), "float32")
    cfg = config(**{"loss.dice_weight": 2.0, "loss.labels": [1, 2, 3]})
    fn = METHOD.build_loss(cfg)
    outputs = {"warped": image, "preint_flow": np.zeros((1, 8, 8, 2), "float32"),
               "disp": np.zeros((1, *shape, 2), "float32")}
    batch = {"fixed": image, "moving": image, "fixed_labels": fixed_lab, "moving_labels": moving_lab}
    terms = fn(batch, outputs, None)
    want = -2.0 * _numpy_dice(fixed_lab, moving_lab, [1, 2, 3])   # identity warp
    np.testing.assert_allclose(float(terms["dice"]), want, rtol=1e-5)
    # a one-voxel shift along axis 1 (pull): warped labels = moving shifted, border clamped
    disp = np.zeros((1, *shape, 2), "float32")
    disp[..., 1] = 1.0
    terms = fn(batch, {**outputs, "disp": disp}, None)
    shifted = moving_lab[:, :, np.clip(np.arange(16) + 1, 0, 15)]
    np.testing.assert_allclose(float(terms["dice"]), -2.0 * _numpy_dice(fixed_lab, shifted, [1, 2, 3]),
                               rtol=1e-5)
    # no label maps in the batch: no Dice term
    assert "dice" not in fn({"fixed": image, "moving": image}, outputs, None)


def test_labels_null_reads_label_values_from_the_data(tmp_path):
    from tfreg.synthetic import write_collection

    spec = write_collection(tmp_path, n=3, shape=(32, 32), seed=1)
    labels = set()
    for path in sorted((tmp_path / "labels").glob("*.nii.gz"))[:3]:
        labels |= set(np.unique(np.asarray(nib.load(path).dataobj)).astype(int).tolist())
    labels.discard(0)
    cfg = {**config(**{"loss.dice_weight": 1.0}), "data": str(spec)}
    assert losses.labels_from_data(cfg) == sorted(labels)
    assert set(losses.labels_from_data(cfg)) <= {1, 2, 3, 4, 5, 6}
    with pytest.raises(ConfigError, match="^loss.labels: null takes the label values from the data"):
        METHOD.build_loss(config(**{"loss.dice_weight": 1.0}))


@pytest.mark.parametrize("options,message", [
    ({"loss.image": "ssd"}, "loss.image: expected one of ncc, mse, mind, nmi, none, got 'ssd'"),
    ({"loss.image": "ncc", "loss.ncc_window": 4}, "loss.ncc_window: expected an odd integer >= 1, got 4"),
    ({"loss.smooth_weight": -1.0}, "loss.smooth_weight: expected a number >= 0, got -1.0"),
    ({"loss.grad_penalty": "l3"}, "loss.grad_penalty: expected l1 or l2, got 'l3'"),
    ({"loss.labels": [1, 1]}, "loss.labels: has duplicates: [1, 1]"),
])
def test_loss_config_errors(options, message):
    with pytest.raises(ConfigError) as err:
        METHOD.build_loss(config(**options))
    assert str(err.value) == message


# ------------------------------------------------------------------------------ learning test
def _field(shape, amp, rng, ctrl=4):
    """Smooth random displacement: N(0, amp) voxels on a ctrl^N grid, cubic-upsampled."""
    from scipy import ndimage

    n = len(shape)
    coarse = rng.normal(0.0, amp, (ctrl,) * n + (n,))
    return np.stack([ndimage.zoom(coarse[..., d], [s / ctrl for s in shape], order=3,
                                  mode="nearest") for d in range(n)], -1)


def _subject(shape, seed, amp=1.5):
    """The canonical phantom deformed by a smooth random field (std 1.5 voxels), plus noise."""
    from tfreg.synthetic import phantom, warp_numpy

    rng = np.random.default_rng(seed)
    image, labels = phantom(shape, rng, jitter=0.0)
    disp = _field(shape, amp, rng)
    image = warp_numpy(image, disp, order=1) + 0.01 * rng.normal(size=shape)
    labels = warp_numpy(labels, disp, order=0).astype(np.int32)
    return np.clip(image, 0, 1).astype("float32")[None, ..., None], labels


@pytest.mark.slow
def test_learning_raises_validation_dice_above_identity():
    """300 Adam steps (lr 2e-3, MSE + 0.01 Grad, half-width features) on pairs of 16 training
    subjects at 32^3; 6 validation pairs of 4 other subjects. Measured: identity Dice 0.405,
    after training 0.517 (CPU, seed 0, ~45 s); required: at least +0.05 and 5 of 6 pairs improved."""
    from tfreg.layers import warp
    from tfreg.metrics import dice, mean_dice

    start = time.time()
    keras.utils.set_random_seed(0)
    shape = (32, 32, 32)
    subjects = [_subject(shape, 100 + i) for i in range(20)]
    cfg = config(**{"model.enc_features": [8, 16, 16, 16],
                    "model.dec_features": [16, 16, 16, 16, 16, 8, 8]})
    model = METHOD.build_model(cfg, shape)
    loss_fn = METHOD.build_loss(cfg)
    optimizer = keras.optimizers.Adam(2e-3)

    @tf.function
    def step(moving, fixed):
        with tf.GradientTape() as tape:
            out = model({"moving": moving, "fixed": fixed}, training=True)
            loss = tf.add_n(list(loss_fn({"moving": moving, "fixed": fixed}, out, None).values()))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    rng = np.random.default_rng(0)
    for _ in range(300):
        m, f = rng.choice(16, 2, replace=False)
        step(subjects[m][0], subjects[f][0])

    val = [(16, 17), (17, 18), (18, 19), (19, 16), (16, 18), (17, 19)]
    identity, registered = [], []
    for m, f in val:
        disp = model({"moving": subjects[m][0], "fixed": subjects[f][0]})["disp"]
        assert np.isfinite(disp.numpy()).all()
        warped = warp(subjects[m][1][None, ..., None], disp, "nearest").numpy()[0, ..., 0]
        identity.append(mean_dice(dice(subjects[f][1], subjects[m][1])))
        registered.append(mean_dice(dice(subjects[f][1], warped)))
    gain = np.mean(registered) - np.mean(identity)
    print(f"identity {np.mean(identity):.3f} -> registered {np.mean(registered):.3f} "
          f"({time.time() - start:.0f} s)")
    assert gain > 0.05, (identity, registered)
    assert sum(r > i for r, i in zip(registered, identity)) >= 5


# ------------------------------------------------------------------------ CLI end to end
AFFINE = np.array([[1.2, 0, 0, -14.0], [0, 1.0, 0, -12.0], [0, 0, 1.5, -18.0], [0, 0, 0, 1]])


def _write_collection(folder: Path, n: int = 4, shape=(24, 24, 24)) -> Path:
    """Synthetic 24^3 scans with labels (non-identity affine); network shape 32^3 (padded)."""
    from tfreg.synthetic import deformed_subject

    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for i in range(n):
        image, labels = deformed_subject(shape, seed=i)
        nib.save(nib.Nifti1Image(image, AFFINE), folder / "images" / f"sub-{i}.nii.gz")
        nib.save(nib.Nifti1Image(labels, AFFINE), folder / "labels" / f"sub-{i}.nii.gz")
    spec = folder / "data.yaml"
    spec.write_text("images: images/*.nii.gz\nlabels: labels/{stem}.nii.gz\n"
                    "shape: [32, 32, 32]\npairing: scan-to-scan\n")
    return spec


def test_cli_train_export_register(tmp_path):
    from tfreg_cli.main import cli

    spec = _write_collection(tmp_path / "data")
    run, model_dir, out = tmp_path / "run", tmp_path / "model", tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "voxelmorph", "--data", str(spec), "--steps", "3",
                                 "--out", str(run), "--quiet", "--set", "loss.dice_weight=0.5",
                                 *[a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["export", str(run), "-o", str(model_dir)])
    assert result.exit_code == 0, result.output
    fixed = tmp_path / "data" / "images" / "sub-0.nii.gz"
    moving = tmp_path / "data" / "images" / "sub-1.nii.gz"
    result = runner.invoke(cli, ["register", str(fixed), str(moving), "--model", str(model_dir),
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    warped, disp = nib.load(out / "warped.nii.gz"), nib.load(out / "disp.nii.gz")
    assert warped.shape == (24, 24, 24)
    assert disp.shape in ((24, 24, 24, 3), (24, 24, 24, 1, 3))
    for volume in (warped, disp):
        np.testing.assert_allclose(volume.affine, AFFINE, atol=1e-5)
    field = np.asarray(disp.dataobj)
    assert np.isfinite(field).all() and 0 < np.abs(field).max() < 5
    assert np.isfinite(np.asarray(warped.dataobj)).all()
