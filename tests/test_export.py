"""``tfreg export`` and `tfreg.export.load_model` on a tiny trained VoxelMorph run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from tfreg.errors import ConfigError, InputError
from tfreg.export import build_from_run, export, load_model
from tfreg_cli.main import cli

from test_engine_toy import TINY_VXM, write_tiny_data

SHAPE = (16, 16, 16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run_dir, model_dir) of a 2-step VoxelMorph run and its export through the CLI."""
    root = tmp_path_factory.mktemp("export")
    spec = write_tiny_data(root / "data")
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "voxelmorph", "--data", str(spec), "--steps", "2",
                                 "--out", str(root / "run"), "--quiet", *TINY_VXM])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["export", str(root / "run"), "-o", str(root / "model")])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {root / 'model'}"
    return root / "run", root / "model"


def _pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.random((1, *SHAPE, 1), dtype=np.float32),
            rng.random((1, *SHAPE, 1), dtype=np.float32))


#: Loads the SavedModel with TensorFlow alone, registers a pair, warps a label map.
PLAIN_TF = """
import sys
import numpy as np
import tensorflow as tf
model_dir, data = sys.argv[1], np.load(sys.argv[2])
loaded = tf.saved_model.load(model_dir + "/saved_model")
out = loaded.signatures["register"](fixed=tf.constant(data["fixed"]),
                                    moving=tf.constant(data["moving"]))
warped = loaded.signatures["warp"](image=tf.constant(data["labels"]),
                                   displacement=tf.constant(data["shift"]))["warped"]
assert not any(name.split(".")[0] in ("tfreg", "tfreg_plugins") for name in sys.modules)
np.savez(sys.argv[3], displacement=out["displacement"].numpy(), warped=out["warped"].numpy(),
         labels_warped=warped.numpy())
"""


def test_savedmodel_in_plain_tensorflow_matches_the_keras_model(trained, tmp_path):
    """A process that never imports tfreg gets the displacement of the in-process Keras model
    (atol 1e-5), and `warp` pulls labels by an integer shift exactly (np.roll inside)."""
    run_dir, model_dir = trained
    fixed, moving = _pair()
    labels = np.random.default_rng(1).integers(0, 5, size=(1, *SHAPE, 1)).astype(np.float32)
    shift = np.zeros((1, *SHAPE, 3), np.float32)
    shift[..., 0], shift[..., 2] = 2.0, -1.0
    np.savez(tmp_path / "in.npz", fixed=fixed, moving=moving, labels=labels, shift=shift)
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_TF)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(script), str(model_dir), str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    out = np.load(tmp_path / "out.npz")

    _, model, _, _ = build_from_run(run_dir)
    expected = model({"fixed": fixed, "moving": moving}, training=False)
    assert out["displacement"].shape == (1, *SHAPE, 3)
    assert np.abs(out["displacement"]).max() > 0  # a non-trivial field is compared
    np.testing.assert_allclose(out["displacement"], expected["disp"], atol=1e-5)
    np.testing.assert_allclose(out["warped"], expected["warped"], atol=1e-5)
    # pull: warped(x) = labels(x + (2, 0, -1)), inside the volume
    want = np.roll(labels, (-2, 1), axis=(1, 3))
    np.testing.assert_array_equal(out["labels_warped"][:, :-2, :, 1:], want[:, :-2, :, 1:])


def test_model_directory_contents(trained):
    run_dir, model_dir = trained
    info = json.loads((model_dir / "tfreg_model.json").read_text())
    assert info["method"] == "voxelmorph" and info["inshape"] == [16, 16, 16]
    assert info["ndims"] == 3 and info["step"] == 2
    assert info["preprocessing"]["normalize"] == "minmax"
    assert info["preprocessing"]["shape"] == [16, 16, 16]
    for name in ("saved_model/saved_model.pb", "model.keras", "model.weights.h5", "config.yaml"):
        assert (model_dir / name).is_file(), name
    assert (model_dir / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]  # temporaries


def test_load_model_registers_numpy_arrays(trained):
    run_dir, model_dir = trained
    model = load_model(model_dir)
    assert model.inshape == SHAPE and model.method == "voxelmorph"
    assert model.config["train"]["steps"] == 2
    assert model.preprocessing["normalize"] == "minmax"
    fixed, moving = _pair(3)
    warped, disp = model.register(fixed[0, ..., 0], moving[0, ..., 0])
    assert warped.shape == SHAPE and disp.shape == (*SHAPE, 3)
    warped_b, disp_b = model.register(fixed, moving)
    assert disp_b.shape == (1, *SHAPE, 3)
    np.testing.assert_allclose(disp_b[0], disp, atol=1e-6)

    # rebuilding through the plugin with the trained settings gives the same field; changing
    # them (no integration of the velocity) gives another
    same = load_model(model_dir, overrides={"model.int_steps": 7})
    assert same.keras_model is not None
    np.testing.assert_allclose(same.register(fixed, moving)[1], disp_b, atol=1e-5)
    other = load_model(model_dir, overrides={"model.int_steps": 0})
    assert other.config["model"]["int_steps"] == 0

    with pytest.raises(InputError) as err:
        model.register(np.zeros((8, 8, 8)), moving)
    assert str(err.value) == "fixed: expected shape (16, 16, 16) or (B, *(16, 16, 16), C), got (8, 8, 8)"
    with pytest.raises(ConfigError, match=r"model\.nope: unknown key"):
        load_model(model_dir, overrides={"model.nope": 1})


def test_changed_setting_changes_a_non_trivial_field(trained, tmp_path):
    """A 2-step model's field is ~1e-5 voxels, where exp(v) and v differ by ~1e-10: scale its flow
    head so the field reaches ~2 voxels; then skipping the integration must change it by a
    measurable amount (the squarings' second-order term), far above float32 noise (~1e-6)."""
    _, model_dir = trained
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    fixed, moving = _pair(3)
    keras_model = load_model(copy, overrides={"model.int_steps": 7}).keras_model
    before = np.abs(keras_model({"fixed": fixed, "moving": moving})["disp"]).max()
    flow = keras_model.get_layer("flow")
    flow.set_weights([w * (2.0 / before) for w in flow.get_weights()])
    keras_model.save_weights(str(copy / "model.weights.h5"))
    integrated = load_model(copy, overrides={"model.int_steps": 7}).register(fixed, moving)[1]
    plain = load_model(copy, overrides={"model.int_steps": 0}).register(fixed, moving)[1]
    assert 1.0 < np.abs(integrated).max() < 4.0
    assert np.abs(plain - integrated).max() > 0.02


def test_export_falls_back_to_the_newest_checkpoint(trained, tmp_path):
    """Without model.weights.h5 (an interrupted run) the newest checkpoint is exported; here it
    is the final step, so the SavedModel equals the first export (atol 1e-6)."""
    run_dir, model_dir = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "model.weights.h5").unlink()
    export(copy, tmp_path / "model")
    fixed, moving = _pair(5)
    np.testing.assert_allclose(load_model(tmp_path / "model").register(fixed, moving)[1],
                               load_model(model_dir).register(fixed, moving)[1], atol=1e-6)

    shutil.rmtree(copy / "checkpoints")
    with pytest.raises(ConfigError) as err:
        export(copy, tmp_path / "model2")
    assert str(err.value) == (f"{copy}: no trained weights (neither model.weights.h5 nor a "
                              "checkpoint)")


def test_export_user_errors_are_one_line(trained, tmp_path):
    run_dir, _ = trained
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(run_dir), "-o", str(foreign)])
    assert result.exit_code == 1
    assert result.output == (f"Error: {foreign}: exists and is not an exported tfreg model; "
                             "choose another output folder\n")
    assert (foreign / "notes.txt").read_text() == "mine"

    result = runner.invoke(cli, ["export", str(tmp_path), "-o", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path}: no config.yaml (not a tfreg run directory)\n"

    result = runner.invoke(cli, ["export", "--help"])
    assert result.exit_code == 0
    for text in ("RUN_DIR", "-o, --out", "--checkpoint", "register(fixed, moving)"):
        assert text in result.output


def _damage(run_dir, what):
    """Break one file of a copied run directory the way a user (or a full disk) might."""
    if what == "state.json":
        (run_dir / "state.json").write_text("{truncated")
    elif what == "weights":
        (run_dir / "model.weights.h5").write_text("not HDF5")
    elif what == "config key":
        config = (run_dir / "config.yaml").read_text()
        (run_dir / "config.yaml").write_text(config.replace("int_steps:", "int_stepz:"))
    elif what == "config type":
        config = (run_dir / "config.yaml").read_text()
        (run_dir / "config.yaml").write_text(config.replace("int_steps: 7", "int_steps: seven"))
    elif what == "no data":
        (run_dir / "state.json").unlink()
        config = (run_dir / "config.yaml").read_text()
        (run_dir / "config.yaml").write_text(
            "\n".join(line for line in config.splitlines() if not line.startswith("data:")))


@pytest.mark.parametrize("what, message", [
    ("state.json", "{run}/state.json: not a readable tfreg run state (Expecting property name "
                   "enclosed in double quotes: line 1 column 2 (char 1))"),
    ("weights", "{run}/model.weights.h5: cannot load these weights into the model (<h5py's "
                "reason>)"),
    ("config key", "{run}/config.yaml: model.int_stepz: unknown key (did you mean "
                   "'int_steps'?)"),
    ("config type", "{run}/config.yaml: model.int_steps: expected an integer, got 'seven'"),
    ("no data", "{run}/config.yaml: data: no data spec recorded"),
])
def test_export_of_a_damaged_run_is_one_line(trained, tmp_path, what, message):
    """Each damaged file is named with its problem: exit 1, one line, nothing written.
    (``<...>`` stands for a library's own wording, which varies between versions.)"""
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    _damage(run, what)
    result = CliRunner().invoke(cli, ["export", str(run), "-o", str(tmp_path / "model")])
    assert result.exit_code == 1
    want = re.escape(f"Error: {message.format(run=run)}\n")
    assert re.fullmatch(re.sub(r"<[^>]*>", "[^\\n]+", want), result.output), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_load_model_of_a_damaged_model_directory(trained, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(trained[1], model_dir)
    (model_dir / "tfreg_model.json").write_text("{")
    with pytest.raises(ConfigError) as err:
        load_model(model_dir)
    assert str(err.value) == (f"{model_dir / 'tfreg_model.json'}: not valid JSON (Expecting "
                              "property name enclosed in double quotes: line 1 column 2 (char 1))")
    shutil.copy(trained[1] / "tfreg_model.json", model_dir / "tfreg_model.json")
    (model_dir / "model.weights.h5").write_text("not HDF5")
    with pytest.raises(InputError, match=r"^.*model\.weights\.h5: cannot load these weights"):
        load_model(model_dir, overrides={"model.int_steps": 5})

