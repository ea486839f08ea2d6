"""Training logs that read well in a file, and the record of how a run was distributed."""

from __future__ import annotations

import re

import tensorflow as tf
import yaml

from tfreg.engine.logging import (TrainLogger, describe_distribution, distribution,
                                  format_duration, record_distribution)


def test_plain_lines_every_n_steps_with_validation(tmp_path, capsys):
    log = TrainLogger(tmp_path / "logs", verbose=1, plain=True, every=3)
    log.start_stage("level1", 0, 2, steps=7, start=0, step=0)
    for s in range(1, 8):
        if s == 4:
            log.value("val/dice", 0.7125, s)
        log.update(s, {"ncc": -0.5 + s / 100, "total": -0.4})
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "stage 1/2 'level1': 7 steps"
    progress = [line for line in lines if line.startswith("stage 1/2 step")]
    # every 3 steps and the stage's last step
    assert [re.match(r"stage 1/2 step (\d+)/7", p).group(1) for p in progress] == ["3", "6", "7"]
    assert "step 4: validation Dice 0.7125" in lines
    assert "val Dice 0.7125" in progress[1] and "val Dice" not in progress[0]
    for line in progress:
        assert re.search(r"ncc -0\.\d+  total -0\.4 .* [\d.]+ steps/s  ETA \d+s$", line), line
    assert not any(ch in "".join(lines) for ch in "\r\x1b\b")


def test_quiet_keeps_validation_and_messages(tmp_path, capsys):
    log = TrainLogger(tmp_path / "logs", verbose=0, plain=True, every=1)
    log.start_stage("train", 0, 1, steps=2, start=0, step=0)
    log.update(1, {"total": 1.0})
    log.value("val/dice", 0.5, 1)
    log.message("finished: 2 steps")
    log.close()
    assert capsys.readouterr().out.splitlines() == [
        "training: 2 steps", "step 1: validation Dice 0.5000", "finished: 2 steps"]


def test_distribution_is_recorded_per_part(tmp_path):
    info = distribution(tf.distribute.OneDeviceStrategy("/cpu:0"), global_batch=2)
    assert info["strategy"] == "OneDeviceStrategy" and info["devices"][0].endswith("CPU:0")
    assert info["replicas"] == 1 and info["workers"] == 1 and info["per_replica_batch"] == 2
    record_distribution(tmp_path, info, step=0)
    record_distribution(tmp_path, {**info, "replicas": 2, "per_replica_batch": 1}, step=40)
    parts = yaml.safe_load((tmp_path / "distribution.yaml").read_text())["parts"]
    assert [p["from_step"] for p in parts] == [0, 40]
    assert [p["replicas"] for p in parts] == [1, 2]
    line = describe_distribution({**info, "strategy": "MirroredStrategy", "replicas": 2,
                                  "per_replica_batch": 1,
                                  "devices": ["/job:localhost/replica:0/task:0/device:CPU:0",
                                              "/job:localhost/replica:0/task:0/device:CPU:1"]})
    assert line == ("distribution: MirroredStrategy, 2 replicas (CPU:0, CPU:1), 1 worker, "
                    "batch 1 per replica (2 global)")


def test_format_duration():
    assert [format_duration(s) for s in (4.4, 185, 7440)] == ["4s", "3m05s", "2h04m"]
