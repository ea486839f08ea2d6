"""Run-directory files written atomically, the training state and the checkpoint manager.

A checkpoint (`tf.train.Checkpoint`) holds the model, the optimizer (with its slot variables and
loss scale), and three counters: the global step, the index of the current stage and the steps
done inside it. `state.json` mirrors the counters for people and tools; the checkpoint is the
source of truth on resume. TensorFlow writes checkpoint data to a temporary name and renames it,
and updates the `checkpoint` index file atomically, so an interrupted save leaves the previous
checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tensorflow as tf

__all__ = ["atomic_write_text", "atomic_save", "RunState", "Checkpointer"]


def _temp_name(path: Path) -> Path:
    """A hidden temporary name beside `path` that keeps its suffixes (Keras checks them)."""
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_save(path: str | Path, writer: Callable[[str], object]) -> Path:
    """Call ``writer(temp_path)`` and move the result onto `path` (file or folder) atomically.

    The temporary path sits in the same folder and ends like `path` (``.keras``, ``.weights.h5``).
    """
    path = Path(path)
    tmp = _temp_name(path)
    try:
        writer(str(tmp))
        if path.is_dir() and tmp.is_dir():
            old = path.with_name(f".old-{os.getpid()}-{path.name}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return path


@dataclass
class RunState:
    """Contents of ``state.json``.

    Attributes:
        step: training steps done over all stages.
        stage: index of the stage in progress (equal to the number of stages when finished).
        stage_name: its name (empty when finished).
        stage_step: steps done inside that stage.
        finished: True once every stage is done and the final model is saved.
        stages: names of all stages, in order.
        inshape: spatial input shape of the model.
        checkpoint: file prefix of the latest checkpoint, relative to the run directory.
        preprocessing: the data spec's preprocessing settings (recorded for export).
    """

    step: int = 0
    stage: int = 0
    stage_name: str = ""
    stage_step: int = 0
    finished: bool = False
    stages: list[str] = field(default_factory=list)
    inshape: list[int] = field(default_factory=list)
    checkpoint: str | None = None
    preprocessing: dict | None = None

    def save(self, run_dir: str | Path) -> None:
        """Write ``run_dir/state.json`` atomically."""
        atomic_write_text(Path(run_dir) / "state.json", json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunState | None":
        """Read ``run_dir/state.json``; None when it does not exist."""
        path = Path(run_dir) / "state.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Checkpointer:
    """Saves and restores model + optimizer + counters with `tf.train.CheckpointManager`.

    In multi-worker training every worker must take part in a save; only the chief writes into
    ``run_dir/checkpoints``, the others write into a temporary folder that is deleted on `close`.

    Args:
        run_dir: the run directory.
        model: the Keras model.
        optimizer: the (built) Keras optimizer.
        keep: number of checkpoints kept.
        chief: whether this process writes the run directory.
    """

    def __init__(self, run_dir: str | Path, model, optimizer, keep: int, chief: bool = True):
        self.run_dir = Path(run_dir)
        self.chief = chief
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.stage = tf.Variable(0, dtype=tf.int64, trainable=False, name="stage")
        self.stage_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="stage_step")
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, step=self.step, stage=self.stage,
            stage_step=self.stage_step,
        )
        if chief:
            self.directory = self.run_dir / "checkpoints"
            self._temp = None
        else:
            self._temp = tempfile.mkdtemp(prefix="tfreg-worker-ckpt-")
            self.directory = Path(self._temp)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(self.directory), max_to_keep=max(1, int(keep)),
            checkpoint_name="ckpt",
        )

    @property
    def latest(self) -> str | None:
        """Prefix of the newest checkpoint in the run directory, or None."""
        return tf.train.latest_checkpoint(str(self.run_dir / "checkpoints"))

    def restore(self) -> tuple[int, int, int] | None:
        """Restore the newest checkpoint of the run; returns `(step, stage, stage_step)` or None."""
        latest = self.latest
        if latest is None:
            return None
        self.checkpoint.restore(latest).assert_existing_objects_matched()
        return int(self.step.numpy()), int(self.stage.numpy()), int(self.stage_step.numpy())

    def save(self, step: int, stage: int, stage_step: int) -> str | None:
        """Save a checkpoint at the given counters; returns its prefix relative to the run dir
        (None on non-chief workers)."""
        self.step.assign(step)
        self.stage.assign(stage)
        self.stage_step.assign(stage_step)
        path = self.manager.save(checkpoint_number=step)
        if not self.chief:
            return None
        return os.path.relpath(path, self.run_dir)

    def close(self) -> None:
        """Remove a non-chief worker's temporary folder."""
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None
