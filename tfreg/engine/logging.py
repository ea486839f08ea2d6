"""Progress display, TensorBoard summaries and the versions file of a run."""

from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import yaml

import tfreg
from tfreg.io import atomic_path

__all__ = ["versions", "write_versions", "TrainLogger", "mid_slice", "write_scalar", "write_image"]


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


class TrainLogger:
    """Keras progress bar per stage plus TensorBoard scalars and images (chief only).

    Scalars: ``loss/<term>`` for each loss term, ``loss/total``, ``learning_rate`` and
    ``steps_per_sec``; images: ``images/fixed``, ``images/moving``, ``images/warped``.

    Args:
        log_dir: TensorBoard folder (``run_dir/logs``).
        enabled: False on non-chief workers: nothing is shown or written.
        verbose: progress bar verbosity (0 silent, 1 bar).
    """

    def __init__(self, log_dir: str | Path, enabled: bool = True, verbose: int = 1):
        self.enabled = enabled
        self.verbose = verbose if enabled else 0
        self.writer = (tf.summary.create_file_writer(str(log_dir)) if enabled
                       else tf.summary.create_noop_writer())
        self.progbar: keras.utils.Progbar | None = None
        self._last_time = time.perf_counter()
        self._last_step = 0

    def start_stage(self, name: str, index: int, count: int, steps: int, start: int, step: int) -> None:
        """Show a header and open a progress bar for a stage resumed at `start` of `steps`."""
        if self.verbose:
            resumed = f", resuming at step {start}" if start else ""
            label = f"stage {index + 1}/{count} '{name}'" if count > 1 else "training"
            print(f"{label}: {steps} steps{resumed}", flush=True)
        self.progbar = keras.utils.Progbar(steps, verbose=self.verbose, unit_name="step")
        if start:
            self.progbar.update(start)
        self._last_time = time.perf_counter()
        self._last_step = step

    def update(self, stage_step: int, terms: dict[str, float]) -> None:
        """Advance the bar to `stage_step` with the current loss terms."""
        if self.progbar is not None:
            self.progbar.update(stage_step, values=list(terms.items()))

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
        """Write one scalar (e.g. ``val/dice``)."""
        if self.enabled:
            with self.writer.as_default(step=step):
                write_scalar(tag, value, step)

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """Write mid slices of the given `(B, *S, C)` volumes (first sample)."""
        if not self.enabled:
            return
        with self.writer.as_default(step=step):
            for name, volume in images.items():
                write_image(f"images/{name}", mid_slice(volume)[0], step)

    def message(self, text: str) -> None:
        """Print one line (chief only)."""
        if self.enabled and self.verbose:
            print(text, flush=True)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
