"""The method protocol's engine guarantees, each against an independent expectation: fresh
optimizer state per stage, the steps a loss sees, float32 fields under mixed precision, partial
checkpoints refused, the divisibility rule from the config, and a core that names no method."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreg.config import TRAIN_DEFAULTS, method_defaults, resolve
from tfreg.engine import check_model, dtype_policy, train
from tfreg.errors import InputError, MethodError
from tfreg.registry import DataSource, LoadedMethod, Method, ModelIO, Stage, discover

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (8, 8)


class Bias(keras.layers.Layer):
    """A scalar trainable offset (starts at 0) added to its input."""

    def build(self, input_shape):
        self.value = self.add_weight(shape=(), initializer="zeros", name="value")

    def call(self, x):
        return x + self.value


def linear_model(config: dict, inshape: tuple[int, ...]) -> keras.Model:
    """disp = a + b everywhere (two scalar parameters 'a' and 'b'), warped = moving."""
    fixed = keras.Input((*inshape, 1), name="fixed")
    moving = keras.Input((*inshape, 1), name="moving")
    zero = keras.layers.Concatenate()([fixed * 0.0] * len(inshape))
    disp = Bias(name="b")(Bias(name="a")(zero))
    warped = keras.layers.Identity(name="warped")(moving)
    return keras.Model({"fixed": fixed, "moving": moving}, {"warped": warped, "disp": disp})


def constant_pairs(data, config, *, split, batch_size, seed, shuffle, repeat,
                   input_context=None):
    image = tf.zeros((*SHAPE, 1))
    return tf.data.Dataset.from_tensors({"fixed": image, "moving": image}).repeat() \
        .batch(batch_size)


DATA = DataSource(open=lambda path, config, divisor: None, dataset=constant_pairs)


def make_method(loss, stages, **kwargs) -> LoadedMethod:
    return LoadedMethod(Method(name="lin", summary="Linear test model.", default_config="x.yaml",
                               build_model=linear_model, build_loss=lambda config: loss,
                               stages=lambda config: stages, data=DATA, **kwargs), "tests", "0")


def config(**train) -> dict:
    cfg = {"method": "lin", "data": None, **copy.deepcopy(TRAIN_DEFAULTS)}
    cfg["train"].update({"learning_rate": 1e-3, "log_every": 1000, "image_every": 1000,
                         "checkpoint_every": 1000, **train})
    return cfg


def value(model, name):
    return float(model.get_layer(name).value.numpy())


# ----------------------------------------------------------------------- fresh optimizer per stage
def test_first_update_of_a_later_stage_parameter_is_a_fresh_adams(tmp_path):
    """Loss = mean(disp) = a + b: a constant gradient of 1 for both. 'b' is frozen for the 200
    steps of stage 1 and trains from stage 2 on. A fresh Adam's first step is
    lr * m_hat / (sqrt(v_hat) + eps) = lr * 1 / (1 + 1e-7) = lr exactly for a constant gradient
    (bias-corrected moments equal g and g^2); one Adam shared with stage 1 (iterations = 200,
    b's moments zero) would step (0.1 / (1 - 0.9**201)) / sqrt(0.001 / (1 - 0.999**201))
    = 1.35 lr (3.16 lr after 30000 steps, LapIRN's level 1)."""
    def loss(batch, outputs, ctx):
        return {"lin": tf.reduce_mean(outputs["disp"])}

    stages = [Stage("one", 200, frozen=("b",), freeze_steps=200), Stage("two", 1)]
    result = train(make_method(loss, stages), config(), None, tmp_path / "run", verbose=0)
    lr = 1e-3
    assert value(result.model, "a") == pytest.approx(-201 * lr, rel=1e-4)
    assert value(result.model, "b") == pytest.approx(-lr, rel=1e-4)


def test_keep_optimizer_continues_the_previous_stage_state(tmp_path):
    """With keep_optimizer the second stage continues stage 1's Adam: b's first step is the
    closed form of a shared Adam after 20 steps, lr * (1 - 0.9) / (1 - 0.9**21) /
    sqrt((1 - 0.999) / (1 - 0.999**21)) = 0.512 lr, not lr."""
    def loss(batch, outputs, ctx):
        return {"lin": tf.reduce_mean(outputs["disp"])}

    stages = [Stage("one", 20, frozen=("b",), freeze_steps=20), Stage("two", 1,
                                                                    keep_optimizer=True)]
    result = train(make_method(loss, stages), config(), None, tmp_path / "run", verbose=0)
    expected = (0.1 / (1 - 0.9**21)) / np.sqrt(0.001 / (1 - 0.999**21))
    assert value(result.model, "b") == pytest.approx(-1e-3 * expected, rel=1e-3)


# ------------------------------------------------------------------------------- steps in the loss
def test_loss_sees_global_and_in_stage_steps(tmp_path):
    """Terms equal to ctx.step and ctx.stage_step are logged per step: 0..4 over two stages of
    2 and 3 steps, the in-stage counter restarting at 0."""
    def loss(batch, outputs, ctx):
        return {"global": tf.cast(ctx.step, tf.float32),
                "in_stage": tf.cast(ctx.stage_step, tf.float32),
                "lin": 0.0 * tf.reduce_mean(outputs["disp"])}

    stages = [Stage("one", 2), Stage("two", 3)]
    result = train(make_method(loss, stages), config(), None, tmp_path / "run", verbose=0)
    assert [h["global"] for h in result.history] == [0, 1, 2, 3, 4]
    assert [h["in_stage"] for h in result.history] == [0, 1, 0, 1, 2]


def test_fast_dev_run_trains_every_stage_n_steps(tmp_path):
    def loss(batch, outputs, ctx):
        return {"lin": tf.reduce_mean(outputs["disp"])}

    stages = [Stage("one", 500), Stage("two", 0), Stage("three", 700)]
    result = train(make_method(loss, stages), config(), None, tmp_path / "run", verbose=0,
                   fast_dev_run=2)
    assert [h["stage"] for h in result.history] == [0, 0, 1, 1, 2, 2]
    assert (tmp_path / "run" / "model.weights.h5").is_file()


# ------------------------------------------------------------------------------ model checks
def test_model_that_does_not_match_its_io_is_refused():
    method = Method(name="lin", summary="s", default_config="x.yaml", build_model=linear_model,
                    build_loss=lambda c: None, io=ModelIO(inputs=("fixed", "moving", "hyper"),
                                                          inference_inputs=lambda c, f, m: {}))
    with pytest.raises(MethodError) as err:
        check_model(linear_model({}, SHAPE), method, "float32")
    assert str(err.value) == ("method 'lin': the model's inputs are ['fixed', 'moving'], its "
                              "ModelIO declares ['fixed', 'hyper', 'moving'] (build a model "
                              "with dict inputs)")


def _builtin(name: str, **model) -> tuple[Method, dict]:
    method = discover().get(name).method
    cfg = method_defaults(method)
    cfg["model"].update(model)
    return method, cfg


def test_bfloat16_voxelmorph_negated_field_is_exact():
    """Plain displacement, bidirectional: neg_disp = -disp exactly when the negation runs in
    float32 (a bfloat16 negation would round |disp| to 8 bits)."""
    method, cfg = _builtin("voxelmorph", int_steps=0, bidir=True, enc_features=[4, 4, 4, 4],
                           dec_features=[4] * 7)
    with dtype_policy("mixed_bfloat16"):
        model = method.build_model(cfg, (16, 16))
    check_model(model, method, "mixed_bfloat16")
    flow = model.get_layer("flow")
    flow.set_weights([w + 0.37 for w in flow.get_weights()])  # a field of a few voxels
    rng = np.random.default_rng(0)
    batch = {k: rng.uniform(size=(1, 16, 16, 1)).astype("float32") for k in ("fixed", "moving")}
    out = model(batch)
    assert out["disp"].dtype == "float32" and out["neg_disp"].dtype == "float32"
    disp = out["disp"].numpy()
    assert np.abs(disp).max() > 1.0
    np.testing.assert_array_equal(out["neg_disp"].numpy(), -disp)


def test_bfloat16_lapirn_level_sum_is_float32():
    """velocity_l2 = increment + upsampled velocity_l1, summed in float32: equal to the NumPy
    float32 sum of the two inputs of the Add layer (a bfloat16 sum differs by ~2^-8 relative)."""
    method, cfg = _builtin("lapirn", features=4, res_blocks=1)
    with dtype_policy("mixed_bfloat16"):
        model = method.build_model(cfg, (16, 16))
    check_model(model, method, "mixed_bfloat16")
    add = model.get_layer("lapirn_l2_velocity")
    parts = keras.Model(model.input, [*add.input, model.output["velocity_l2"]])
    rng = np.random.default_rng(1)
    batch = {k: rng.uniform(size=(1, 16, 16, 1)).astype("float32") for k in ("fixed", "moving")}
    a, b, total = (t.numpy() for t in parts(batch))
    assert total.dtype == np.float32 and np.abs(total).max() > 0
    np.testing.assert_array_equal(total, a.astype(np.float32) + b.astype(np.float32))


def test_bfloat16_cascade_affine_head_is_float32():
    """The affine stem's translation head b = features @ W_b runs in float32: equal to a float64
    NumPy product within float32 rounding (bfloat16 would be off by ~4e-3 relative)."""
    method, cfg = _builtin("cascade", cascades=1, vtn_levels=2, vtn_channels=4)
    with dtype_policy("mixed_bfloat16"):
        model = method.build_model(cfg, (16, 16))
    check_model(model, method, "mixed_bfloat16")
    stem = model.get_layer("affine_stem")
    head = stem.get_layer("head_b")
    head.set_weights([np.full(w.shape, 0.05, "float32") for w in head.get_weights()])
    features = keras.Model(stem.input, stem.get_layer("flatten").output)
    rng = np.random.default_rng(2)
    fixed, moving = (rng.uniform(size=(1, 16, 16, 1)).astype("float32") for _ in range(2))
    feats = np.asarray(features([fixed, moving]), np.float64)
    expected = feats @ head.get_weights()[0].astype(np.float64)
    affine = model({"fixed": fixed, "moving": moving})["affine"].numpy()
    assert affine.dtype == np.float32
    np.testing.assert_allclose(affine[0, :, -1], expected[0], rtol=1e-5)


# --------------------------------------------------------------------------- partial checkpoint
def test_checkpoint_missing_a_weight_is_refused(tmp_path):
    from tfreg.export import restore_checkpoint

    full = linear_model({}, SHAPE)
    fixed = keras.Input((*SHAPE, 1), name="fixed")
    moving = keras.Input((*SHAPE, 1), name="moving")
    half = keras.Model({"fixed": fixed, "moving": moving}, Bias(name="a")(fixed))
    prefix = tf.train.Checkpoint(model=half).save(str(tmp_path / "ckpt"))
    with pytest.raises(InputError) as err:
        restore_checkpoint(full, prefix)
    message = str(err.value)
    assert message.startswith(f"{prefix}: the checkpoint does not hold every weight of the model")
    assert "\n" not in message
    whole = tf.train.Checkpoint(model=full).save(str(tmp_path / "whole"))
    restore_checkpoint(linear_model({}, SHAPE), whole)  # a complete one restores


# ------------------------------------------------------------------------------ divisibility
def test_divisibility_comes_from_the_config_and_is_checked_before_the_data(tmp_path):
    """A 5-level U-Net needs 32: refused naming the spec, before any volume is decoded (a
    volume with truncated voxel data would otherwise be the first error: deep validation)."""
    from click.testing import CliRunner

    from tfreg.synthetic import write_collection
    from tfreg_cli.main import cli

    spec = write_collection(tmp_path / "data", n=3, shape=(16, 16, 16), seed=0)
    victim = sorted((spec.parent / "images").glob("*.nii.gz"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2])  # header readable, voxels truncated
    result = CliRunner().invoke(cli, ["train", "voxelmorph", "--data", str(spec), "--steps", "1",
                                      "--set", "model.enc_features=[4,4,4,4,4]",
                                      "--set", "model.dec_features=[4,4,4,4,4,4,4,4]",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert result.output.strip().startswith(f"Error: {spec}: shape: [16, 16, 16] is not "
                                            "divisible by 32")


# --------------------------------------------------------------------------- the core names none
METHOD_NAMES = {"voxelmorph", "lapirn", "cascade", "avsm", "quicksilver"}


def _core_violations() -> list[str]:
    """Rule: the core (tfreg/, cli/) may mention methods in docstrings and comments (e.g. the
    voxelmorph conventions it follows), but never imports a plugin module or holds a string
    literal equal to a method name (a lookup, a config file or an output named after one)."""
    found = []
    for folder in ("tfreg", "cli"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            docstrings = {id(node.value) for node in ast.walk(tree)
                          if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
            for node in ast.walk(tree):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                    if any(n.startswith("tfreg_plugins") for n in names):
                        found.append(f"{where}: imports a plugin")
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and id(node) not in docstrings:
                    text = node.value.strip().lower()
                    if text in METHOD_NAMES or text.rsplit(".", 1)[0] in METHOD_NAMES \
                            or "tfreg_plugins" in text:
                        found.append(f"{where}: literal {node.value!r}")
    return found


def test_core_names_no_method():
    assert _core_violations() == []


def test_core_name_check_can_fail(tmp_path, monkeypatch):
    """The checker itself finds a lookup by name and a plugin import."""
    fake = tmp_path / "tfreg"
    fake.mkdir()
    (fake / "bad.py").write_text('"""voxelmorph conventions are fine here."""\n'
                                 'from tfreg_plugins.cascade import report\n'
                                 'NAME = "lapirn"\nCFG = "voxelmorph.yaml"\n')
    (tmp_path / "cli").mkdir()
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert _core_violations() == ["tfreg/bad.py:2: imports a plugin",
                                  "tfreg/bad.py:3: literal 'lapirn'",
                                  "tfreg/bad.py:4: literal 'voxelmorph.yaml'"]
