"""Data-parallel training: 2 logical CPU replicas (MirroredStrategy) against 1 device, and 2
worker processes on loopback (MultiWorkerMirroredStrategy with TF_CONFIG).

Both need fresh processes: logical devices and the multi-worker runtime must be set up before
TensorFlow initialises, so the runs happen in subprocesses running `WORKER_SCRIPT`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tfreg.engine import loopback_tf_configs, train

from test_engine_toy import ToySpec, toy_config, toy_method, weights_by_name

TESTS = Path(__file__).resolve().parent

#: Trains the toy and saves ``history.json`` and ``weights.npz`` into OUT.
#: usage: python script.py RUN_DIR OUT DEVICES(comma list or 'none') CONFIG_JSON
WORKER_SCRIPT = """
import json, sys
import numpy as np
run_dir, out, devices, config = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
from tfreg.engine import loopback_tf_configs, train
from test_engine_toy import ToySpec, toy_method, weights_by_name
devices = None if devices == "none" else devices.split(",")
result = train(toy_method(), config, ToySpec(shape=(16, 16, 16), n=8), run_dir,
               devices=devices, verbose=0)
np.savez(f"{out}/weights.npz", **{k.replace("/", "__"): v
                                  for k, v in weights_by_name(result.model).items()})
with open(f"{out}/history.json", "w") as handle:
    json.dump({"history": result.history,
               "replicas": result.strategy.num_replicas_in_sync}, handle)
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _command(tmp_path: Path, run_dir: Path, out: Path, devices: str, config: dict) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    out.mkdir(parents=True, exist_ok=True)
    return [sys.executable, str(script), str(run_dir), str(out), devices, json.dumps(config)]


def _load(out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    history = json.loads((out / "history.json").read_text())
    with np.load(out / "weights.npz") as data:
        weights = {k.replace("__", "/"): data[k] for k in data.files}
    return history, weights


def test_two_replicas_match_one_device_on_the_same_global_batch(tmp_path):
    """Global batch 2 split over cpu:0 and cpu:1 (1 sample each) follows the same loss
    trajectory as both samples on one device: each replica contributes half the global mean
    and the optimizer sums the gradients. The gradient is clipped (global norm 1e-5, below its
    size here), so the clipping must see the global-batch gradient too. Tolerance: float32
    summation order only, rtol 1e-5 on losses, atol 1e-5 on weights after 4 steps."""
    config = toy_config(steps=4, batch_size=2, clip_norm=1e-5, log_every=100, image_every=100,
                        checkpoint_every=100)
    out = tmp_path / "two"
    proc = subprocess.run(_command(tmp_path, tmp_path / "run2", out, "cpu:0,cpu:1", config),
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, two_weights = _load(out)
    assert two["replicas"] == 2

    one = train(toy_method(), config, ToySpec(shape=(16, 16, 16), n=8), tmp_path / "run1",
                verbose=0)
    assert one.strategy.num_replicas_in_sync == 1
    np.testing.assert_allclose([h["total"] for h in two["history"]],
                               [h["total"] for h in one.history], rtol=1e-5)
    np.testing.assert_allclose([h["sim"] for h in two["history"]],
                               [h["sim"] for h in one.history], rtol=1e-5)
    one_weights = weights_by_name(one.model)
    assert set(one_weights) == set(two_weights)
    for name, value in one_weights.items():
        np.testing.assert_allclose(two_weights[name], value, atol=1e-5, err_msg=name)


def test_two_workers_on_loopback_agree_on_weights(tmp_path):
    """Two processes with TF_CONFIG train 3 synchronous steps (global batch 2, one sample per
    worker, each worker reading its own shard); both end with identical weights (atol 1e-7).
    Only the chief (worker 0) writes the run directory."""
    config = toy_config(steps=3, batch_size=2, checkpoint_every=2)
    procs, outs = [], []
    for index, tf_config in enumerate(loopback_tf_configs(2)):
        out = tmp_path / f"out{index}"
        outs.append(out)
        procs.append(subprocess.Popen(
            _command(tmp_path, tmp_path / f"run{index}", out, "none", config),
            env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=300)
            results.append((proc.returncode, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for code, stderr in results:
        assert code == 0, stderr[-3000:]

    (chief, chief_w), (worker, worker_w) = _load(outs[0]), _load(outs[1])
    assert chief["replicas"] == worker["replicas"] == 2
    assert [h["step"] for h in chief["history"]] == [1, 2, 3]
    np.testing.assert_allclose([h["total"] for h in chief["history"]],
                               [h["total"] for h in worker["history"]], rtol=1e-6)
    for name, value in chief_w.items():
        np.testing.assert_allclose(worker_w[name], value, atol=1e-7, err_msg=name)
    initial = weights_by_name(__import__("test_engine_toy").build_toy_model({}, (16, 16, 16)))
    assert not np.array_equal(chief_w["flow/kernel"], initial["flow/kernel"])  # it trained

    chief_dir, worker_dir = tmp_path / "run0", tmp_path / "run1"
    state = json.loads((chief_dir / "state.json").read_text())
    assert state["step"] == 3 and state["finished"]
    assert (chief_dir / "checkpoints" / "ckpt-2.index").exists()
    assert (chief_dir / "model.weights.h5").exists()
    assert not (worker_dir / "checkpoints").exists() and not (worker_dir / "state.json").exists()
