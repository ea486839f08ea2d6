"""Training engine, single process, one device: run directory, stages, freezing, checkpoints,
interruption and resume, mixed precision, learning-rate schedules, gradient clipping, logging.

All runs use the toy method of `test_engine_toy` at 16^3 (a few steps each)."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from dataclasses import dataclass
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from tfreg.engine import (TrainingInterrupted, check_global_batch, configure_devices,
                          learning_rate_at, parse_devices, train)
from tfreg.engine.logging import TrainLogger
from tfreg.errors import ConfigError
from tfreg.registry import LoadedMethod, Stage

from test_engine_toy import (ToySpec, build_toy_loss, build_toy_model, read_events, toy_config,
                             toy_images, toy_method, toy_pipeline, weights_by_name)

SPEC = ToySpec(shape=(16, 16, 16), n=8)


def _restored_model(run_dir, step: int) -> keras.Model:
    """A fresh toy model holding the weights of checkpoint `ckpt-<step>` of a run."""
    model = build_toy_model({}, SPEC.shape)
    tf.train.Checkpoint(model=model).restore(str(run_dir / "checkpoints" / f"ckpt-{step}")
                                             ).expect_partial()
    return model


def _restore(run_dir, step: int) -> dict[str, np.ndarray]:
    """Weights of checkpoint `ckpt-<step>` of a run, restored into a fresh toy model."""
    return weights_by_name(_restored_model(run_dir, step))


def _pair_losses(model: keras.Model) -> np.ndarray:
    """Toy loss (sim + smooth) of `model` on each of the toy pipeline's pairs (i, i+1 mod n)."""
    images = toy_images(SPEC)
    moving = np.roll(images, -1, axis=0)
    loss_fn = build_toy_loss({})
    out = []
    for i in range(SPEC.n):
        batch = {"fixed": images[i:i + 1], "moving": moving[i:i + 1]}
        out.append(float(sum(loss_fn(batch, model(batch), None).values())))
    return np.array(out)


def test_single_stage_run_directory(tmp_path):
    config = toy_config(steps=4, checkpoint_every=2, keep_checkpoints=3, image_every=2)
    result = train(toy_method(), config, SPEC, tmp_path / "run", verbose=0)
    run = tmp_path / "run"

    assert result.step == 4 and result.finished
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    state = json.loads((run / "state.json").read_text())
    assert state["finished"] and state["step"] == 4 and state["inshape"] == [16, 16, 16]
    assert state["stages"] == ["train"] and state["checkpoint"] == "checkpoints/ckpt-4"
    assert yaml.safe_load((run / "config.yaml").read_text()) == config
    versions = yaml.safe_load((run / "versions.yaml").read_text())
    assert versions["tensorflow"] == tf.__version__ and versions["keras"] == keras.__version__
    assert versions["plugin"] == {"method": "toy", "distribution": "tfreg-tests", "version": "0"}
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith("ckpt-4")
    assert (run / "checkpoints" / "ckpt-2.index").exists()
    assert not list(run.glob(".*"))  # no temporary (hidden) files left behind

    # the final files hold the trained model
    reloaded = keras.saving.load_model(run / "model.keras")
    x = {"fixed": toy_images(SPEC)[:1], "moving": toy_images(SPEC)[1:2]}
    np.testing.assert_allclose(reloaded(x)["disp"], result.model(x)["disp"], atol=1e-6)
    fresh = build_toy_model({}, SPEC.shape)
    fresh.load_weights(run / "model.weights.h5")
    np.testing.assert_allclose(fresh(x)["disp"], result.model(x)["disp"], atol=1e-6)

    # TensorBoard: every term each step (log_every=1), mid-slice images every 2 steps
    events = read_events(run / "logs")
    for tag in ("loss/sim", "loss/smooth", "loss/total", "learning_rate", "steps_per_sec"):
        assert sorted(events[tag]) == [1, 2, 3, 4], tag
    for h in result.history:
        assert float(events["loss/total"][h["step"]]) == pytest.approx(h["total"], rel=1e-6)
        assert float(events["learning_rate"][h["step"]]) == pytest.approx(1e-3, rel=1e-6)
    for name in ("fixed", "moving", "warped"):
        image = events[f"images/{name}"]
        assert sorted(image) == [2, 4]
        width, height, png = image[2]
        assert (int(width), int(height)) == (16, 16)
        assert tf.io.decode_png(png).shape == (16, 16, 1)


def test_training_reduces_the_loss(tmp_path):
    """20 Adam steps on the 8 toy pairs lower the mean total loss over all pairs."""
    config = toy_config(steps=20, learning_rate=1e-2, checkpoint_every=100, log_every=100,
                        image_every=100)
    images = toy_images(SPEC)
    pairs = {"fixed": images, "moving": np.roll(images, -1, axis=0)}
    before = float(np.mean((build_toy_model({}, SPEC.shape)(pairs)["warped"] - images) ** 2))
    result = train(toy_method(), config, SPEC, tmp_path / "run", verbose=0)
    after = float(np.mean((result.model(pairs)["warped"] - images) ** 2))
    assert after < 0.9 * before


def test_stages_outputs_learning_rates_and_freezing(tmp_path):
    """Stage 'aux' trains only the aux head (+ 'enc', frozen for its first step) at lr 1e-2;
    stage 'main' trains everything at the config's 1e-3."""
    config = toy_config(steps=2, checkpoint_every=1, keep_checkpoints=10)
    result = train(toy_method(staged=True), config, SPEC, tmp_path / "run", verbose=0)
    run = tmp_path / "run"
    assert result.step == 4
    assert [h["lr"] for h in result.history] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])
    assert [h["stage"] for h in result.history] == [0, 0, 1, 1]
    assert "sim" not in result.history[0] and "sim" in result.history[2]  # stage outputs

    init = weights_by_name(build_toy_model({}, SPEC.shape))
    w1, w2, w4 = _restore(run, 1), _restore(run, 2), _restore(run, 4)

    def same(a, b, prefix):
        return all(np.array_equal(a[k], b[k]) for k in a if k.startswith(prefix))

    assert same(w1, init, "enc/") and not same(w1, init, "aux/")   # enc frozen at step 1
    assert same(w1, init, "flow/") and same(w2, init, "flow/")     # flow not in stage 'aux'
    assert not same(w2, w1, "enc/")                                # unfrozen at step 2
    assert not same(w4, w2, "flow/") and not same(w4, w2, "enc/")  # stage 'main'
    assert same(w4, w2, "aux/")                                    # aux not in stage 'main'
    state = json.loads((run / "state.json").read_text())
    assert state["stages"] == ["aux", "main"] and state["finished"]


@dataclass(frozen=True)
class _PreparedSpec(ToySpec):
    """The toy data after `Stage.prepare`: batches also hold ``moving_prepared``."""


def _prepared_method(calls: list, built: list | None = None) -> LoadedMethod:
    """The toy with stages ``first`` (the model) and ``second`` (prepared data, a training model
    reading ``moving_prepared`` instead of ``moving``); `calls` records the weights of
    ``flow`` seen by each `prepare` call, `built` each training model."""

    def prepare(model, data, config):
        calls.append(model.get_layer("flow").kernel.numpy().copy())
        return _PreparedSpec(data.shape, data.n)

    def training_model(model):
        if built is not None:
            built.append(1)
        fixed = keras.Input(model.input["fixed"].shape[1:], name="fixed")
        moving = keras.Input(model.input["moving"].shape[1:], name="moving_prepared")
        features = model.get_layer("enc")(model.get_layer("concat")([moving, fixed]))
        disp = model.get_layer("disp")(model.get_layer("flow")(features))
        warped = model.get_layer("transformer")([moving, disp])
        return keras.Model({"fixed": fixed, "moving_prepared": moving},
                           {"warped": warped, "disp": disp})

    def dataset(data, config, **kwargs):
        ds = toy_pipeline(data, **kwargs)
        if isinstance(data, _PreparedSpec):
            ds = ds.map(lambda b: {**b, "moving_prepared": b["moving"]})
        return ds

    def stages(config):
        steps = config["train"]["steps"]
        return [Stage("first", 2), Stage("second", steps, prepare=prepare,
                                         training_model=training_model)]

    base = toy_method().method
    method = dataclasses.replace(base, stages=stages,
                                 data=dataclasses.replace(base.data, dataset=dataset))
    return LoadedMethod(method, "tfreg-tests", "0")


def test_stage_prepare_and_training_model(tmp_path):
    """A stage with `prepare` gets data computed once from the model trained so far, and
    trains its `training_model` (shared layers) on batches of that data; resuming into the
    stage prepares again."""
    calls: list = []
    built: list = []
    run = tmp_path / "run"
    init = build_toy_model({}, SPEC.shape).get_layer("flow").kernel.numpy()
    result = train(_prepared_method(calls, built), toy_config(steps=2, checkpoint_every=1), SPEC,
                   run, verbose=0)
    assert result.step == 4 and [h["stage"] for h in result.history] == [0, 0, 1, 1]
    assert len(calls) == 1 and not np.array_equal(calls[0], init)    # after stage 'first'
    assert len(built) == 1                                           # stage 'second' only
    after_first = _restore(run, 2)
    assert np.array_equal(calls[0], after_first["flow/kernel"])
    assert not np.array_equal(_restore(run, 4)["flow/kernel"], after_first["flow/kernel"])

    again = train(_prepared_method(calls), toy_config(steps=3, checkpoint_every=1), SPEC, run,
                  resume=True, verbose=0)
    assert again.step == 5 and len(calls) == 2
    assert np.array_equal(calls[1], _restore(run, 4)["flow/kernel"])  # the resumed weights


def test_stage_batches_without_a_training_model_input_is_one_line_error(tmp_path):
    from tfreg.errors import MethodError

    loaded = _prepared_method([])
    method = dataclasses.replace(
        loaded.method, data=dataclasses.replace(loaded.method.data,
                                                dataset=lambda data, config, **kw:
                                                toy_pipeline(data, **kw)))
    with pytest.raises(MethodError, match="stage 'second': its batches lack the model input "
                                          "'moving_prepared'"):
        train(LoadedMethod(method, "tfreg-tests", "0"), toy_config(steps=1), SPEC,
              tmp_path / "run", verbose=0)


def test_stage_training_model_and_outputs_are_exclusive():
    with pytest.raises(ValueError, match="exclusive"):
        Stage("s", 1, outputs=("disp",), training_model=lambda model: model)
    with pytest.raises(ValueError, match="callable"):
        Stage("s", 1, prepare="not a function")


def test_interrupt_saves_checkpoint_then_resume_finishes(tmp_path, monkeypatch):
    """A SIGINT during step 3 of 6 stops after that step with a checkpoint; resuming runs steps
    4-6 from it with the same config."""
    run = tmp_path / "run"
    config = toy_config(steps=6, checkpoint_every=100)
    original = TrainLogger.update

    def update(self, stage_step, terms):
        original(self, stage_step, terms)
        if stage_step == 3:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(TrainLogger, "update", update)
    with pytest.raises(TrainingInterrupted, match=r"^SIGINT: training stopped at step 3, "
                       r"checkpoint saved; continue with: tfreg train --resume .*run$"):
        train(toy_method(), config, SPEC, run, verbose=0)
    monkeypatch.setattr(TrainLogger, "update", original)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    state = json.loads((run / "state.json").read_text())
    assert state["step"] == 3 and not state["finished"]
    assert tf.train.latest_checkpoint(str(run / "checkpoints")).endswith("ckpt-3")
    assert not (run / "model.weights.h5").exists()
    saved_config = (run / "config.yaml").read_text()
    w3 = _restore(run, 3)

    with pytest.raises(ConfigError, match="already holds checkpoints; resume it"):
        train(toy_method(), config, SPEC, run, verbose=0)

    result = train(toy_method(), config, SPEC, run, resume=True, verbose=0)
    assert result.step == 6 and [h["step"] for h in result.history] == [4, 5, 6]
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == 6 and state["finished"]
    assert (run / "config.yaml").read_text() == saved_config
    # the resumed run started from the step-3 weights: the loss of its first step (computed
    # before that step's update) is the step-3 model's loss on one of the toy pairs (the resumed
    # pipeline draws another order), and none of the untrained model's
    first = result.history[0]["total"]
    at_step3 = _pair_losses(_restored_model(run, 3))
    untrained = _pair_losses(build_toy_model({}, SPEC.shape))
    assert np.isclose(at_step3, first, rtol=1e-5, atol=0).any(), (first, at_step3)
    assert not np.isclose(untrained, first, rtol=1e-5, atol=0).any(), (first, untrained)
    assert not all(np.array_equal(v, weights_by_name(result.model)[k]) for k, v in w3.items())
    # its optimizer state was restored too: Adam's iteration counter continues from 3
    ckpt_opt = keras.optimizers.Adam()
    model = build_toy_model({}, SPEC.shape)
    ckpt_opt.build(model.trainable_variables)
    tf.train.Checkpoint(model=model, optimizer=ckpt_opt).restore(
        str(run / "checkpoints" / "ckpt-6")).expect_partial()
    assert int(ckpt_opt.iterations.numpy()) == 6

    # resuming a finished run does nothing more; with more steps it trains further
    again = train(toy_method(), config, SPEC, run, resume=True, verbose=0)
    assert again.step == 6 and again.history == []
    longer = toy_config(steps=8, checkpoint_every=100)
    again = train(toy_method(), longer, SPEC, run, resume=True, verbose=0)
    assert [h["step"] for h in again.history] == [7, 8]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 8


@pytest.fixture(scope="module")
def float32_history(tmp_path_factory):
    config = toy_config(steps=3, learning_rate=1e-2)
    return train(toy_method(), config, SPEC, tmp_path_factory.mktemp("f32"), verbose=0).history


@pytest.mark.parametrize("precision, compute, rtol", [("mixed_float16", "float16", 1e-2),
                                                       ("mixed_bfloat16", "bfloat16", 5e-2)])
def test_mixed_precision_trains_without_nan(tmp_path, float32_history, precision, compute, rtol):
    """3 steps without NaN; the first step's loss (same weights and batch) matches float32 to the
    compute type's precision (rtol 1e-2 for float16, 5e-2 for bfloat16's 8-bit mantissa)."""
    config = toy_config(steps=3, precision=precision, learning_rate=1e-2)
    result = train(toy_method(), config, SPEC, tmp_path / "run", verbose=0)
    assert all(math.isfinite(h["total"]) for h in result.history)
    assert all(np.isfinite(w).all() for w in weights_by_name(result.model).values())
    enc = result.model.get_layer("enc")
    assert enc.compute_dtype == compute and enc.kernel.dtype == "float32"
    assert result.history[0]["sim"] == pytest.approx(float32_history[0]["sim"], rel=rtol)
    out = result.model({"fixed": toy_images(SPEC)[:1], "moving": toy_images(SPEC)[1:2]})
    assert out["disp"].dtype == "float32" and out["warped"].dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"  # global policy restored


def test_gradient_clipping_limits_the_first_adam_step(tmp_path):
    """Adam's first update is ``lr * g / (|g| + eps)`` per weight (eps = 1e-7): unclipped it is
    about ``lr`` wherever the gradient is not tiny; with the global gradient norm clipped to
    1e-10 every ``|g| <= 1e-10`` so no weight moves more than ``lr * 1e-10 / 1e-7 = 1e-3 lr``."""
    init = weights_by_name(build_toy_model({}, SPEC.shape))
    lr = 1e-2

    def largest_change(clip):
        config = toy_config(steps=1, learning_rate=lr, clip_norm=clip)
        result = train(toy_method(), config, SPEC, tmp_path / f"run-{clip}", verbose=0)
        final = weights_by_name(result.model)
        return max(float(np.abs(final[k] - init[k]).max()) for k in init)

    assert largest_change(None) > 0.5 * lr
    assert largest_change(1e-10) <= 1e-3 * lr * 1.001


def test_learning_rate_schedules():
    cfg = {"lr_schedule": "cosine", "lr_decay_rate": 0.5, "lr_decay_steps": 10}
    assert learning_rate_at(cfg, 1.0, 0, 100) == pytest.approx(1.0)
    assert learning_rate_at(cfg, 1.0, 50, 100) == pytest.approx(0.5)
    assert learning_rate_at(cfg, 1.0, 100, 100) == pytest.approx(0.0, abs=1e-12)
    cfg["lr_schedule"] = "exponential"
    assert learning_rate_at(cfg, 2.0, 10, 100) == pytest.approx(1.0)
    assert learning_rate_at(cfg, 2.0, 25, 100) == pytest.approx(2.0 * 0.5**2.5)
    cfg["lr_schedule"] = "constant"
    assert learning_rate_at(cfg, 3e-4, 77, 100) == 3e-4


@pytest.mark.parametrize("key, value, message", [
    ("lr_schedule", "linear", "train.lr_schedule: expected one of constant, cosine, "
                              "exponential, got 'linear'"),
    ("precision", "float16", "train.precision: expected one of float32, mixed_float16, "
                             "mixed_bfloat16, got 'float16'"),
    ("batch_size", 0, "train.batch_size: expected an integer >= 1, got 0"),
    ("clip_norm", -1.0, "train.clip_norm: expected a number > 0, got -1.0"),
])
def test_invalid_train_values_are_one_line_errors(tmp_path, key, value, message):
    with pytest.raises(ConfigError) as err:
        train(toy_method(), toy_config(**{key: value}), SPEC, tmp_path / "run", verbose=0)
    assert str(err.value) == message


def test_global_batch_must_divide_by_replicas():
    two = SimpleNamespace(num_replicas_in_sync=2)
    assert check_global_batch(4, two) == 2
    with pytest.raises(ConfigError) as err:
        check_global_batch(3, two)
    assert str(err.value) == ("train.batch_size: the global batch (3) must be a positive "
                              "multiple of the number of replicas (2)")


@pytest.mark.parametrize("text, message", [
    ("cpu:0,tpu:1", "--devices: 'tpu:1' is not a device name (expected cpu:N or gpu:N)"),
    ("cpu:0,cpu:0", "--devices: device 'cpu:0' is listed twice"),
    ("cpu:0,gpu:0", "--devices: mixing CPU and GPU devices is not supported"),
])
def test_device_errors(text, message):
    with pytest.raises(ConfigError) as err:
        configure_devices(parse_devices(text))
    assert str(err.value) == message


def test_missing_gpu_is_reported():
    count = len(tf.config.list_physical_devices("GPU"))
    with pytest.raises(ConfigError) as err:
        configure_devices([f"gpu:{count}"])
    assert str(err.value) == (f"--devices: gpu:{count} does not exist "
                              f"(TensorFlow sees {count} GPU(s))")


def test_parse_devices_normalises_names():
    assert parse_devices(" CPU:0, /device:cpu:1 ") == ["cpu:0", "cpu:1"]
    assert parse_devices(None) is None and parse_devices("") is None


def test_validation_dice_at_checkpoints(tmp_path):
    """With labels and a val split, the mean Dice of the val pairs is logged at each checkpoint;
    it equals the Dice of the moving labels warped with SciPy (nearest) by the model's field."""
    from tfreg.config import method_defaults
    from tfreg.data import DataSpec, make_dataset
    from tfreg.metrics import dice, mean_dice
    from tfreg.registry import discover
    from tfreg.synthetic import warp_numpy

    from test_engine_toy import write_tiny_data

    path = write_tiny_data(tmp_path / "data", n=6)
    path.write_text(path.read_text() + "split: {train: 0.5, val: 0.5, seed: 0}\n")
    spec = DataSpec.from_yaml(path)
    loaded = discover().get("voxelmorph")
    config = method_defaults(loaded.method)
    config["model"].update({"enc_features": [4, 4, 4, 4], "dec_features": [4] * 7})
    config["train"].update({"steps": 2, "checkpoint_every": 1, "val_pairs": 4,
                            "learning_rate": 1e-2})
    result = train(loaded, config, spec, tmp_path / "run", verbose=0)
    assert [s for s, _ in result.validation] == [1, 2]

    scores = []
    for batch in make_dataset(spec, "val", batch_size=1, shuffle=False, repeat=False):
        disp = result.model({"fixed": batch["fixed"], "moving": batch["moving"]})["disp"]
        warped = warp_numpy(batch["moving_labels"].numpy()[0, ..., 0], disp.numpy()[0], order=0)
        scores.append(mean_dice(dice(batch["fixed_labels"].numpy()[0, ..., 0],
                                     warped.astype(np.int32))))
    assert len(scores) == len(spec.pairs("val")) >= 2
    assert result.validation[-1][1]["dice"] == pytest.approx(np.mean(scores), abs=1e-3)
    logged = read_events(tmp_path / "run" / "logs")["val/dice"]
    assert sorted(logged) == [1, 2]
    assert float(logged[2]) == pytest.approx(result.validation[-1][1]["dice"], rel=1e-6)
