"""The training state (``state.json``) and the checkpoint manager.

A checkpoint (`tf.train.Checkpoint`) holds the model, the optimizer of the stage in progress (with
its slot variables and loss scale; every stage may have its own), and three counters: the global
step, the index of the current stage and the steps done inside it. `state.json` mirrors the counters for people and tools; the checkpoint is the
source of truth on resume. TensorFlow writes checkpoint data to a temporary name and renames it,
and updates the `checkpoint` index file atomically, so an interrupted save leaves the previous
checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tensorflow as tf

from tfreg.errors import ConfigError, reason
from tfreg.io import atomic_path

__all__ = ["RunState", "Checkpointer"]


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
        with atomic_path(Path(run_dir) / "state.json") as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunState | None":
        """Read ``run_dir/state.json``; None when it does not exist.

        Raises:
            ConfigError: ``"<run_dir>/state.json: ..."`` when it is not a JSON object.
        """
        path = Path(run_dir) / "state.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not a readable tfreg run state ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a readable tfreg run state (expected a JSON object)")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Checkpointer:
    """Saves and restores model + optimizer + counters with `tf.train.CheckpointManager`.

    In multi-worker training every worker must take part in a save; only the chief writes into
    ``run_dir/checkpoints``, the others write into a temporary folder that is deleted on `close`.

    Args:
        run_dir: the run directory.
        model: the Keras model.
        optimizer: the (built) Keras optimizer of the current stage, or None until
            `set_optimizer` is called.
        keep: number of checkpoints kept.
        chief: whether this process writes the run directory.
    """

    def __init__(self, run_dir: str | Path, model, optimizer, keep: int, chief: bool = True):
        self.run_dir = Path(run_dir)
        self.chief = chief
        self.model = model
        self.keep = max(1, int(keep))
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.stage = tf.Variable(0, dtype=tf.int64, trainable=False, name="stage")
        self.stage_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="stage_step")
        if chief:
            self.directory = self.run_dir / "checkpoints"
            self._temp = None
        else:
            self._temp = tempfile.mkdtemp(prefix="tfreg-worker-ckpt-")
            self.directory = Path(self._temp)
        self.set_optimizer(optimizer)

    def set_optimizer(self, optimizer) -> None:
        """Checkpoint `optimizer` (the current stage's) from now on, with the model and counters."""
        self.optimizer = optimizer
        objects = dict(model=self.model, step=self.step, stage=self.stage,
                       stage_step=self.stage_step)
        if optimizer is not None:
            objects["optimizer"] = optimizer
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(self.directory), max_to_keep=self.keep, checkpoint_name="ckpt",
        )

    def counters(self) -> tuple[int, int, int] | None:
        """`(step, stage, stage_step)` of the newest checkpoint (nothing else is restored), or
        None without one; tells which stage's optimizer the checkpoint holds."""
        latest = self.latest
        if latest is None:
            return None
        counters = tf.train.Checkpoint(step=tf.Variable(0, dtype=tf.int64),
                                       stage=tf.Variable(0, dtype=tf.int64),
                                       stage_step=tf.Variable(0, dtype=tf.int64))
        try:
            counters.restore(latest).expect_partial()
        except (ValueError, tf.errors.OpError) as err:
            raise ConfigError(f"{latest}: not a readable tfreg checkpoint "
                              f"({reason(err)})") from None
        return (int(counters.step.numpy()), int(counters.stage.numpy()),
                int(counters.stage_step.numpy()))

    @property
    def latest(self) -> str | None:
        """Prefix of the newest checkpoint in the run directory, or None."""
        return tf.train.latest_checkpoint(str(self.run_dir / "checkpoints"))

    def restore(self) -> tuple[int, int, int] | None:
        """Restore the newest checkpoint of the run; returns `(step, stage, stage_step)` or None.

        Raises:
            ConfigError: the checkpoint does not fit the model and optimizer (e.g. ``--set``
                changed the network on resume).
        """
        latest = self.latest
        if latest is None:
            return None
        try:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as err:
            raise ConfigError(f"{latest}: does not fit the model built from the run's config "
                              f"(was the network changed with --set?): {reason(err)}") from None
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
