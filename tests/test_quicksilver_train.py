"""``tfreg train quicksilver`` on tiny 2D pairs whose momenta are known.

Each pair is a textured blob (moving) and the same blob moved by shooting a known momentum
(fixed; a constant momentum, i.e. the same translation for every pair, so that a run of a few
dozen steps can learn it: these tests check the method's machinery, not its accuracy), so the optimised LDDMM momentum the data source would compute is replaced by
that known momentum (`tfreg.ops.lddmm.register_pair` is swapped for a lookup that counts its
calls; the optimisation itself is tested in tests/test_lddmm.py). Checked: targets are cached and
reused (no call, file untouched) and recomputed for a changed input; batches are patches on the
stride grid with their targets; a short run learns (the whole-image momentum is closer to the
known one than zero momentum, the identity, and the shot result matches the fixed image better
than no registration) and the correction network reduces the remaining momentum error;
export + ``tfreg register --model`` of the probabilistic variant writes an uncertainty map;
user errors are one line.
"""
from __future__ import annotations

import json
import os

import keras
import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from scipy import ndimage

from tfreg.config import method_defaults, parse_set, resolve
from tfreg.ops import lddmm
from tfreg.ops.sampling import warp
from tfreg.registry import discover
from tfreg_cli.main import cli

SHAPE = (24, 24)
N_PAIRS = 4


def _texture(rng) -> np.ndarray:
    """Smoothed noise in [0.2, 1] inside a disc of radius 9, 0 outside (background)."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1)
    disc = ((grid - 11.5) ** 2).sum(-1) < 81
    noise = ndimage.gaussian_filter(rng.random(SHAPE), 1.5)
    noise = (noise - noise.min()) / np.ptp(noise)
    return (np.where(disc, 0.2 + 0.8 * noise, 0.0)).astype(np.float32)


def _momentum(rng, kernel) -> np.ndarray:
    """A constant momentum: the geodesic is the translation by ``m / gamma`` voxels
    (tests/test_lddmm.py checks this analytically); the same (1.2, -0.8) voxels for every pair."""
    return np.broadcast_to(np.array([1.2, -0.8], np.float32) * 0.001,
                           (*SHAPE, 2)).astype(np.float32)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """`N_PAIRS` pairs on disk (images, labels, pairs.csv, spec.yaml) and their momenta."""
    folder = tmp_path_factory.mktemp("quicksilver")
    rng = np.random.default_rng(0)
    kernel = lddmm.FluidKernel.create(SHAPE)
    moving = np.stack([_texture(rng) for _ in range(N_PAIRS)])
    momenta = np.stack([_momentum(rng, kernel) for _ in range(N_PAIRS)])
    shoot = tf.function(lambda m: lddmm.shoot(m, kernel, 10, 5).inverse)
    fixed = warp(tf.constant(moving[..., None]), shoot(tf.constant(momenta))).numpy()[..., 0]
    rows = []
    for k in range(N_PAIRS):
        for name, image in (("m", moving[k]), ("f", fixed[k])):
            image = image / image.max()                       # as minmax preprocessing leaves it
            nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)),
                     str(folder / f"{name}{k}.nii.gz"))
            nib.save(nib.Nifti1Image((image > 0.55).astype(np.int16), np.eye(4)),
                     str(folder / f"{name}{k}_seg.nii.gz"))
        rows.append(f"f{k}.nii.gz,m{k}.nii.gz,f{k}_seg.nii.gz,m{k}_seg.nii.gz")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    (folder / "spec.yaml").write_text("pairing: pairs\npairs: pairs.csv\n")
    return {"folder": folder, "spec": folder / "spec.yaml", "momenta": momenta,
            "moving": np.stack([m / m.max() for m in moving]),
            "fixed": np.stack([f / f.max() for f in fixed])}


@pytest.fixture()
def known_targets(pairs, monkeypatch):
    """`register_pair` replaced by the known momentum of the pair with that moving image."""
    calls = []

    def lookup(fixed, moving, spacing=None, cfg=None, **kwargs):
        calls.append(1)
        k = int(np.argmin([np.abs(moving - m).sum() for m in pairs["moving"]]))
        zero = np.zeros((*SHAPE, 2), np.float32)
        return lddmm.LddmmResult(pairs["momenta"][k], zero, zero, moving, [(0.0, 0.0)], 0.0)

    monkeypatch.setattr(lddmm, "register_pair", lookup)
    return calls


def _config(tmp_path, *sets):
    method = discover().get("quicksilver").method
    base = ["model.features=8", "model.patch_batch=8", f"targets.cache={tmp_path / 'cache'}",
            "schedule.patches_per_pair=8", "schedule.train_stride=3", "train.batch_size=2"]
    return method, resolve(method_defaults(method), None, parse_set([*base, *sets]))


def test_targets_cached_reused_and_invalidated_and_batches(pairs, known_targets, tmp_path,
                                                           capsys):
    method, config = _config(tmp_path)
    source = method.data_source
    data = source.open(pairs["spec"], config, 1)
    assert data.counts == {"optimised": N_PAIRS, "reused": 0} and len(known_targets) == N_PAIRS
    assert "momentum targets: 4/4 pairs (0 reused, 4 optimised)" in capsys.readouterr().out
    np.testing.assert_array_equal(data.momentum, pairs["momenta"])
    files = sorted((tmp_path / "cache").glob("*.h5"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert len(files) == N_PAIRS

    again = source.open(pairs["spec"], config, 1)                 # unchanged: all reused
    assert again.counts == {"optimised": 0, "reused": N_PAIRS} and len(known_targets) == N_PAIRS
    assert [f.stat().st_mtime_ns for f in files] == stamps
    np.testing.assert_array_equal(again.momentum, pairs["momenta"])

    image = pairs["folder"] / "m2.nii.gz"                          # a changed input: recomputed
    nib.save(nib.Nifti1Image(pairs["moving"][2], np.eye(4)), str(image))
    os.utime(image, ns=(10**9, 10**9))
    third = source.open(pairs["spec"], config, 1)
    assert third.counts == {"optimised": 1, "reused": N_PAIRS - 1}
    assert len(known_targets) == N_PAIRS + 1

    batch = next(iter(source.dataset(data, config, split="train", batch_size=2, seed=0,
                                     shuffle=True, repeat=True)))
    assert batch["moving"].shape == (2, *SHAPE, 1) and batch["momentum"].shape == (2, *SHAPE, 2)
    starts = batch["starts"].numpy()
    assert starts.shape == (2, 8, 2) and starts.dtype == np.int32
    assert set(np.unique(starts)) <= {0, 3, 6, 9}                 # the stride-3 grid (+ end 9)
    for b in range(2):                                            # momentum belongs to the pair
        k = int(np.argmin([np.abs(batch["moving"][b, ..., 0] - m).sum()
                           for m in pairs["moving"]]))
        np.testing.assert_array_equal(batch["momentum"][b], pairs["momenta"][k])


def test_correction_stage_inputs_computed_once_match_the_full_model(pairs, known_targets,
                                                                   tmp_path):
    """The correction stage trains on inputs computed once per pair (`Stage.prepare`): its loss
    and gradients equal those of the full model, which predicts, shoots and warps back in the
    step itself."""
    from tfreg.registry import LossContext

    method, config = _config(tmp_path, "lddmm.predict_inverse_iterations=5", "lddmm.steps=5")
    data = method.data_source.open(pairs["spec"], config, 1)
    model = method.build_model(config, SHAPE)
    rng = np.random.default_rng(1)
    for variable in model.get_layer("networks").trainable_variables:  # zero-initialised heads
        variable.assign(rng.normal(0.0, 0.1, variable.shape).astype(np.float32))
    stage = method.resolve_stages(config)[1]
    assert stage.name == "correction"
    prepared = stage.prepare(model, data, config)
    assert prepared.momentum is None and prepared.residual.shape == data.momentum.shape
    # the random prediction network is far from zero and its shooting moves the fixed image
    # by more than the tolerances below: forgetting either would fail the comparison
    assert np.abs(data.momentum - prepared.residual).max() > 0.1 * np.abs(data.momentum).max()
    assert np.abs(prepared.fixed_back - data.fixed).max() > 1e-2

    batch = next(iter(method.data_source.dataset(prepared, config, split="train", batch_size=2,
                                                 seed=0, shuffle=True, repeat=True)))
    assert "momentum" not in batch and batch["fixed_back"].shape == (2, *SHAPE, 1)
    index = [int(np.argmin([np.abs(batch["moving"][b, ..., 0] - m).sum()
                            for m in pairs["moving"]])) for b in range(2)]
    reference = {"moving": batch["moving"], "fixed": batch["fixed"], "starts": batch["starts"],
                 "momentum": tf.constant(data.momentum[index])}
    full = keras.Model(model.input, {k: model.output[k]
                                     for k in ("patch_correction", "patch_predicted")})
    trained = stage.training_model(model)
    assert set(trained.input) == {"moving", "fixed_back", "starts"}
    loss_fn = method.build_loss(config)
    ctx = LossContext(stage, 0, 0)
    weights = model.get_layer("networks").correction_network.trainable_variables
    results = []
    for net, feed in ((full, reference), (trained, batch)):
        with tf.GradientTape() as tape:
            inputs = {name: feed[name] for name in net.input}
            value = loss_fn(feed, net(inputs, training=True), ctx)["l1_correction"]
        results.append((float(value), tape.gradient(value, weights)))
    (want, want_grads), (got, got_grads) = results
    assert got == pytest.approx(want, rel=1e-5)
    for g_want, g_got in zip(want_grads, got_grads):
        np.testing.assert_allclose(g_got.numpy(), g_want.numpy(), rtol=1e-4,
                                   atol=1e-6 * float(np.abs(g_want.numpy()).max()))


def _l1(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).mean())


@pytest.mark.slow
def test_training_beats_identity_and_correction_improves(pairs, known_targets, tmp_path):
    from tfreg.engine import train

    method, config = _config(tmp_path, "schedule.prediction_steps=25",
                             "schedule.correction_steps=25", "train.learning_rate=2e-3",
                             "lddmm.predict_inverse_iterations=5", "lddmm.steps=5",
                             "train.checkpoint_every=1000", "train.image_every=100000")
    data = method.data_source.open(pairs["spec"], config, 1)
    result = train(discover().get("quicksilver"), config, data, tmp_path / "run", verbose=0)
    model = result.model
    moving = tf.constant(pairs["moving"][..., None])
    fixed = tf.constant(pairs["fixed"][..., None])
    out = model(method.io.model_inputs(config, fixed, moving), training=False)
    predicted = model.get_layer("networks").whole_image(moving, fixed).numpy()
    truth = pairs["momenta"]
    identity = _l1(0.0, truth)
    first, final = _l1(predicted, truth), _l1(out["momentum"].numpy(), truth)
    before = float(np.mean((pairs["moving"] - pairs["fixed"]) ** 2))
    after = float(np.mean((out["warped"].numpy()[..., 0] - pairs["fixed"]) ** 2))
    print("momentum L1 (identity, prediction, + correction):", identity, first, final,
          "image MSE (before, after):", before, after)
    # momentum L1, mean over voxels and components (zero momentum = the identity); with 40 +
    # 40 steps measured 0.18 x identity, then 0.63 x that with the correction
    assert first < 0.7 * identity, (first, identity)
    assert final < 0.9 * first, (final, first)
    # the shot result: mean squared image error against no registration
    assert after < 0.7 * before, (after, before)


def test_cli_train_export_register_probabilistic_uncertainty(pairs, known_targets, tmp_path):
    runner = CliRunner()
    run, model = tmp_path / "run", tmp_path / "model"
    sets = ["model.features=4", "model.patch_batch=8", "model.dropout=0.2",
            "model.correction=false", "model.mc_samples=3", f"targets.cache={tmp_path / 'c'}",
            "schedule.patches_per_pair=4"]
    args = ["train", "quicksilver", "--data", str(pairs["spec"]), "--fast-dev-run", "2",
            "--out", str(run), "-q"]
    for item in sets:
        args += ["--set", item]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["export", str(run), "-o", str(model)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "reg"
    folder = pairs["folder"]
    result = runner.invoke(cli, ["register", str(folder / "f0.nii.gz"), str(folder / "m0.nii.gz"),
                                 "--model", str(model), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "model quicksilver"
    assert report["uncertainty"]["samples"] == 3
    assert "uncertainty" in report["outputs"]
    spread = nib.load(str(out / "uncertainty.nii.gz")).get_fdata()
    disp = nib.load(str(out / "disp.nii.gz")).get_fdata()
    assert spread.shape == SHAPE and disp.shape == (*SHAPE, 2)
    assert np.isfinite(spread).all() and spread.min() >= 0.0 and spread.max() > 0.0
    assert report["uncertainty"]["max"] == pytest.approx(spread.max(), rel=1e-3)


@pytest.mark.parametrize("setting,spec,message", [
    ([], "images: [missing.nii.gz]\n", "missing.nii.gz: file not found"),
    (["model.dropout=0.2"], None, "model.correction: the probabilistic variant"),
    (["model.patch=14"], None, "model.patch: expected one of 7, 15, 31, got 14"),
    (["model.patch=31"], None, "has an axis shorter than the 31-voxel patch"),
])
def test_cli_user_errors_are_one_line(pairs, tmp_path, setting, spec, message):
    path = pairs["spec"]
    if spec is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(spec)
    args = ["train", "quicksilver", "--data", str(path), "--out", str(tmp_path / "r")]
    for item in [*setting, f"targets.cache={tmp_path / 'c'}"]:
        args += ["--set", item]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "c").exists() and "Traceback" not in result.output
