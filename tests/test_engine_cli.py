"""``tfreg train``: config merging, help, one-line user errors, and kill-and-resume of a real
process (SIGINT) with the VoxelMorph plugin on 16^3 synthetic data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tfreg_cli.main import cli

from test_engine_toy import TINY_VXM, write_tiny_data


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("cli") / "data")


def _invoke(*args: str):
    return CliRunner().invoke(cli, ["train", *args])


def test_help_describes_every_option():
    result = _invoke("--help")
    assert result.exit_code == 0
    for option in ("METHOD", "--data", "--config", "--set", "--out", "--resume", "--steps",
                   "--epochs", "--batch-size", "--seed", "--lr", "--precision",
                   "--deterministic", "--xla / --no-xla", "--devices", "--gpus", "--quiet",
                   "float32|mixed_float16", "cpu:0,cpu:1", "tfreg train --resume"):
        assert option in result.output, option


def test_config_layers_and_shortcuts(spec, tmp_path):
    """defaults < --config < --set < shortcut options; the resolved config (with the method
    and the absolute data spec path) is saved in the default run directory."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  learning_rate: 0.01\n  seed: 5\n  log_every: 4\n")
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path) as cwd:
        result = runner.invoke(cli, ["train", "voxelmorph", "--data", str(spec), "--config",
                                     str(cfg), "--set", "train.seed=7", "--set",
                                     "train.log_every=3", "--seed", "9", "--steps", "0",
                                     "--quiet", *TINY_VXM])
        assert result.exit_code == 0, result.output
        runs = list((Path(cwd) / "runs").iterdir())
        assert len(runs) == 1 and runs[0].name.startswith("voxelmorph-")
        config = yaml.safe_load((runs[0] / "config.yaml").read_text())
    assert config["method"] == "voxelmorph" and config["data"] == str(spec.resolve())
    train = config["train"]
    assert (train["learning_rate"], train["seed"], train["log_every"], train["steps"]) == \
        (0.01, 9, 3, 0)
    assert train["checkpoint_every"] == 500  # untouched default
    assert config["model"]["enc_features"] == [4, 4, 4, 4]
    assert f"run directory: {runs[0].resolve()}" in result.output


@pytest.mark.parametrize("args, message", [
    (["voxelmorf", "--data", "{spec}"], "Error: unknown method 'voxelmorf' (did you mean "
                                        "'voxelmorph'?); available: "),
    (["voxelmorph", "--data", "{spec}", "--set", "train.stepz=3"],
     "Error: --set train.stepz=3: train.stepz: unknown key (did you mean 'steps'?)"),
    (["voxelmorph", "--data", "{spec}", "--devices", "cpu:0", "--gpus", "all"],
     "Error: --devices and --gpus: give one of them, not both"),
    (["voxelmorph", "--data", "{spec}", "--gpus", "0,x"],
     "Error: --gpus: expected 'all' or GPU indices like 0,1, got '0,x'"),
    (["voxelmorph", "--data", "{spec}", "--devices", "tpu:0"],
     "Error: --devices: 'tpu:0' is not a device name (expected cpu:N or gpu:N)"),
    (["voxelmorph", "--data", "{tmp}/missing.yaml"], "Error: {tmp}/missing.yaml: file not found"),
    (["--resume", "{tmp}"], "Error: --resume {tmp}: no config.yaml in this folder (not a tfreg "
                            "run directory)"),
    (["--resume", "{tmp}", "--config", "{spec}"], "Error: --config: cannot be combined with "
                                                  "--resume (the run's config.yaml is used; "
                                                  "change values with --set)"),
])
def test_user_errors_are_one_line(spec, tmp_path, args, message):
    args = [a.format(spec=spec, tmp=tmp_path) for a in args]
    result = _invoke(*args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert lines[0].startswith(message.format(tmp=tmp_path)), lines[0]


def test_shape_not_divisible_is_reported(tiny_collection):
    """The shared 24^3 collection does not divide by VoxelMorph's 16."""
    result = _invoke("voxelmorph", "--data", str(tiny_collection), "--steps", "1")
    assert result.exit_code == 1
    # 24 rounded up to the next multiple of 16 is 32
    assert result.output == (f"Error: {tiny_collection}: shape: [24, 24, 24] is not divisible "
                             "by 16, which the method needs; use e.g. [32, 32, 32] (crop/pad "
                             "is automatic)\n")


def test_invalid_model_setting_leaves_no_run_directory(spec, tmp_path):
    """A config the method refuses stops before anything is written."""
    run = tmp_path / "run"
    result = _invoke("voxelmorph", "--data", str(spec), "--out", str(run),
                     "--set", "model.int_resolution=3", *TINY_VXM)
    assert result.exit_code == 1
    assert result.output == ("Error: model.int_resolution: expected a power of two (1, 2, 4, "
                             "...), got 3\n")
    assert not run.exists()


def test_resume_errors_are_one_line(spec, tmp_path):
    """--resume of a run whose state.json is damaged, or with --set changing the network."""
    run = tmp_path / "run"
    result = _invoke("voxelmorph", "--data", str(spec), "--out", str(run), "--steps", "1",
                     "--quiet", *TINY_VXM)
    assert result.exit_code == 0, result.output
    config = (run / "config.yaml").read_text()

    result = _invoke("--resume", str(run), "--steps", "2", "--set",
                     "model.enc_features=[8, 4, 4, 4]")
    assert result.exit_code == 1
    assert result.output.startswith(
        f"Error: {run}/checkpoints/ckpt-1: does not fit the model built from the run's config "
        "(was the network changed with --set?): ")
    assert len(result.output.strip().splitlines()) == 1
    assert (run / "config.yaml").read_text() == config  # not rewritten

    state = run / "state.json"
    state.write_text(state.read_text()[:-10])
    result = _invoke("--resume", str(run), "--steps", "2")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {state}: not a readable tfreg run state (")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["voxelmorph"], []])
def test_missing_arguments_are_usage_errors(args):
    result = _invoke(*args)
    assert result.exit_code == 2
    assert "--data" in result.output or "METHOD" in result.output


def test_sigint_saves_then_resume_reaches_the_same_step_count(spec, tmp_path):
    """A real `tfreg train` process gets SIGINT after its first checkpoint: it finishes the step,
    saves, says so on one line and gives the resume command on the next, exits 130; `--resume`
    then finishes all 30 steps with the unchanged config."""
    run = tmp_path / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tfreg_cli.main", "train", "voxelmorph", "--data", str(spec),
         "--steps", "30", "--out", str(run), "--quiet", "--set", "train.checkpoint_every=2",
         *TINY_VXM], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and not (run / "state.json").exists():
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        assert proc.poll() is None, "training ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]
    state = json.loads((run / "state.json").read_text())
    assert not state["finished"] and 2 <= state["step"] < 30
    assert stderr.strip().splitlines()[-3:] == [
        "stopping after the current step (Ctrl-C again to stop at once)",
        f"SIGINT: training stopped at step {state['step']}, checkpoint saved in "
        f"{run / 'checkpoints'}",
        f"resume with: tfreg train --resume {run}"]
    config_before = (run / "config.yaml").read_text()

    result = _invoke("--resume", str(run), "--quiet")
    assert result.exit_code == 0, result.output
    state = json.loads((run / "state.json").read_text())
    assert state["finished"] and state["step"] == 30
    assert (run / "config.yaml").read_text() == config_before
    assert (run / "model.weights.h5").is_file()

    result = _invoke("voxelmorph", "--data", str(spec), "--out", str(run), *TINY_VXM)
    assert result.exit_code == 1
    assert result.output == (f"Error: {run}: already holds checkpoints; resume it (--resume) "
                             "or choose another output folder\n")


@pytest.mark.parametrize("resumable", [True, False])
def test_second_ctrl_c_says_what_was_kept(spec, tmp_path, monkeypatch, resumable):
    """A second Ctrl-C stops without saving: one line on what was kept, the resume command on its
    own line only when there is a checkpoint to resume from; exit 130."""
    import tfreg.engine
    from tfreg.engine import TrainingInterrupted

    run = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted("interrupted twice", signal.SIGINT, run, 7, saved=False,
                                  resumable=resumable)

    monkeypatch.setattr(tfreg.engine, "train", interrupted)
    result = _invoke("voxelmorph", "--data", str(spec), "--out", str(run), *TINY_VXM)
    assert result.exit_code == 130
    if resumable:
        assert result.stderr.splitlines() == [
            "interrupted twice at step 7: stopped at once without saving; the newest checkpoint "
            f"in {run / 'checkpoints'} is kept", f"resume with: tfreg train --resume {run}"]
    else:
        assert result.stderr.splitlines() == [
            "interrupted twice at step 7: stopped at once without saving; no checkpoint was "
            "saved"]
