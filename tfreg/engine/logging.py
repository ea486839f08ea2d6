"""Progress display, TensorBoard summaries and the versions file of a run."""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import yaml

import tfreg
from tfreg.io import atomic_path

__all__ = ["versions", "write_versions", "TrainLogger", "mid_slice", "write_scalar", "write_image",
           "distribution", "record_distribution", "format_duration"]


def _metadata(plugin: str) -> bytes:
    """Serialized `SummaryMetadata` naming the TensorBoard plugin that displays a summary."""
    from tensorflow.core.framework import summary_pb2

    meta = summary_pb2.SummaryMetadata()
    meta.plugin_data.plugin_name = plugin
    return meta.SerializeToString()


def write_scalar(tag: str, value: float, step: int) -> None:
    """A TensorBoard scalar through `tf.summary.write` (the `tensorboard` package is only
    needed to view the logs, not to write them)."""
    tf.summary.write(tag, tf.constant(float(value), tf.float32), step=step,
                     metadata=_metadata("scalars"))


def write_image(tag: str, image: np.ndarray, step: int) -> None:
    """A TensorBoard image from a `(H, W, 1)` float array in [0, 1] (PNG, images plugin)."""
    pixels = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)
    png = tf.io.encode_png(pixels)
    height, width = int(image.shape[0]), int(image.shape[1])
    tensor = tf.stack([tf.as_string(width), tf.as_string(height), png])
    tf.summary.write(tag, tensor, step=step, metadata=_metadata("images"))


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions(method=None) -> dict:
    """Versions of tfreg, TensorFlow, Keras, NumPy, Python and (if given) the method's plugin.

    Args:
        method: a `LoadedMethod` (``.method.name``, ``.dist_name``, ``.dist_version``) or None.
    """
    info = {
        "tfreg": tfreg.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    if method is not None:
        info["plugin"] = {
            "method": method.method.name,
            "distribution": getattr(method, "dist_name", None),
            "version": getattr(method, "dist_version", None),
        }
    return info


def write_versions(run_dir: str | Path, method=None) -> Path:
    """Write ``run_dir/versions.yaml`` atomically."""
    path = Path(run_dir) / "versions.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(versions(method), sort_keys=False), encoding="utf-8")
    return path


def mid_slice(volume: np.ndarray) -> np.ndarray:
    """`(B, *S, C)` → `(B, H, W, 1)` image in [0, 1]: the middle slice along the last spatial axis
    (3D) or the image itself (2D), first channel, min-max scaled per sample."""
    volume = np.asarray(volume, dtype=np.float32)[..., :1]
    if volume.ndim == 5:
        volume = volume[:, :, :, volume.shape[3] // 2, :]
    low = volume.min(axis=(1, 2, 3), keepdims=True)
    high = volume.max(axis=(1, 2, 3), keepdims=True)
    return (volume - low) / np.maximum(high - low, 1e-8)


def distribution(strategy: tf.distribute.Strategy, global_batch: int) -> dict:
    """How a run is distributed: strategy, devices, replicas, workers, per-replica batch."""
    replicas = int(strategy.num_replicas_in_sync)
    try:
        devices = [str(d) for d in strategy.extended.worker_devices]
    except (AttributeError, RuntimeError):  # the default strategy: TensorFlow's placement
        devices = []
    workers = 1
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None:
        try:
            workers = max(len(resolver.cluster_spec().as_dict().get("worker", [])), 1)
        except (AttributeError, ValueError, RuntimeError):
            workers = 1
    return {"strategy": type(strategy).__name__, "devices": devices, "replicas": replicas,
            "workers": workers, "global_batch": int(global_batch),
            "per_replica_batch": int(global_batch) // max(replicas, 1)}


def record_distribution(run_dir: str | Path, info: dict, step: int) -> Path:
    """Append this part of the run (``from_step``, start time and `distribution` `info`) to
    ``run_dir/distribution.yaml`` atomically: one entry per call of `train`, so every resumed part
    of a run says how it was trained."""
    path = Path(run_dir) / "distribution.yaml"
    parts = []
    if path.is_file():
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        parts = list(loaded.get("parts", [])) if isinstance(loaded, dict) else []
    parts.append({"from_step": int(step), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  **info})
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump({"parts": parts}, sort_keys=False), encoding="utf-8")
    return path


def describe_distribution(info: dict) -> str:
    """One console line for a `distribution` dict."""
    devices = ", ".join(d.rsplit("/", 1)[-1].replace("device:", "") for d in info["devices"])
    return (f"distribution: {info['strategy']}, {info['replicas']} replica"
            f"{'s' if info['replicas'] != 1 else ''} ({devices or 'default device'}), "
            f"{info['workers']} worker{'s' if info['workers'] != 1 else ''}, batch "
            f"{info['per_replica_batch']} per replica ({info['global_batch']} global)")


def format_duration(seconds: float) -> str:
    """``"45s"``, ``"3m05s"``, ``"2h04m"``."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class TrainLogger:
    """Console progress per stage plus TensorBoard scalars and images (chief only).

    On a terminal: a Keras progress bar per stage. Otherwise (a log file, nohup, a cluster job):
    one plain line every `every` steps and at the end of each stage, with the loss terms, the
    newest validation Dice, steps/s and the ETA, and no control characters. Validation Dice
    gets a line of its own in both cases. `verbose=0` (``-q``) drops the bar and the periodic
    lines but keeps stage headers, validation and messages.

    Scalars: ``loss/<term>`` for each loss term, ``loss/total``, ``learning_rate`` and
    ``steps_per_sec``; images: ``images/fixed``, ``images/moving``, ``images/warped``.

    Args:
        log_dir: TensorBoard folder (``run_dir/logs``).
        enabled: False on non-chief workers: nothing is shown or written.
        verbose: 0 no progress, 1 progress.
        plain: plain lines instead of a bar (default: when stdout is not a terminal).
        every: steps between plain lines (default: about 20 lines per stage).
    """

    def __init__(self, log_dir: str | Path, enabled: bool = True, verbose: int = 1,
                 plain: bool | None = None, every: int | None = None):
        self.enabled = enabled
        self.verbose = verbose if enabled else 0
        self.plain = (not _isatty(sys.stdout)) if plain is None else plain
        self.every = every
        self.writer = (tf.summary.create_file_writer(str(log_dir)) if enabled
                       else tf.summary.create_noop_writer())
        self.progbar: keras.utils.Progbar | None = None
        self._last_time = time.perf_counter()
        self._last_step = 0
        self._stage_steps = 0
        self._stage_label = ""
        self._stage_every = 1
        self._rate_start: tuple[float, int] = (time.perf_counter(), 0)
        self._val: float | None = None

    def start_stage(self, name: str, index: int, count: int, steps: int, start: int, step: int) -> None:
        """Show a header and open a progress bar for a stage resumed at `start` of `steps`."""
        label = f"stage {index + 1}/{count} '{name}'" if count > 1 else "training"
        if self.enabled:
            resumed = f", resuming at step {start}" if start else ""
            print(f"{label}: {steps} steps{resumed}", flush=True)
        self._stage_label = f"stage {index + 1}/{count}" if count > 1 else "step"
        self._stage_steps = steps
        self._stage_every = self.every or max(1, -(-max(steps - start, 1) // 20))
        self._rate_start = (time.perf_counter(), start)
        self.progbar = None
        if self.verbose and not self.plain:
            self.progbar = keras.utils.Progbar(steps, verbose=1, unit_name="step")
            if start:
                self.progbar.update(start)
        self._last_time = time.perf_counter()
        self._last_step = step

    def update(self, stage_step: int, terms: dict[str, float]) -> None:
        """Advance the bar (or print a plain line) to `stage_step` with the current loss terms."""
        if self.progbar is not None:
            self.progbar.update(stage_step, values=list(terms.items()))
        elif self.verbose and self.plain and (stage_step % self._stage_every == 0
                                              or stage_step == self._stage_steps):
            print(self._plain_line(stage_step, terms), flush=True)

    def _plain_line(self, stage_step: int, terms: dict[str, float]) -> str:
        began, first = self._rate_start
        done = stage_step - first
        rate = done / max(time.perf_counter() - began, 1e-9)
        eta = (self._stage_steps - stage_step) / rate if rate > 0 else 0.0
        prefix = (f"step {stage_step}/{self._stage_steps}" if self._stage_label == "step"
                  else f"{self._stage_label} step {stage_step}/{self._stage_steps}")
        loss = "  ".join(f"{k} {v:.4g}" for k, v in terms.items())
        val = f"  val Dice {self._val:.4f}" if self._val is not None else ""
        return f"{prefix}  {loss}{val}  {rate:.2f} steps/s  ETA {format_duration(eta)}"

    def scalars(self, step: int, terms: dict[str, float], total: float, lr: float) -> None:
        """Write loss terms, total, learning rate and steps/s at global `step`."""
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        with self.writer.as_default(step=step):
            for name, value in terms.items():
                write_scalar(f"loss/{name}", value, step)
            write_scalar("loss/total", total, step)
            write_scalar("learning_rate", lr, step)
            write_scalar("steps_per_sec", rate, step)

    def value(self, tag: str, value: float, step: int) -> None:
        """Write one scalar (e.g. ``val/dice``); validation Dice is also printed on its own line."""
        if not self.enabled:
            return
        with self.writer.as_default(step=step):
            write_scalar(tag, value, step)
        if tag == "val/dice":
            self._val = float(value)
            self.message(f"step {step}: validation Dice {value:.4f}", own_line=True)

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """Write mid slices of the given `(B, *S, C)` volumes (first sample)."""
        if not self.enabled:
            return
        with self.writer.as_default(step=step):
            for name, volume in images.items():
                write_image(f"images/{name}", mid_slice(volume)[0], step)

    def message(self, text: str, own_line: bool = True) -> None:
        """Print one line (chief only), on a line of its own even while a bar is drawn."""
        if not self.enabled:
            return
        if own_line and self.progbar is not None and not self.plain:
            print("", flush=True)
        print(text, flush=True)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
