"""Choosing the `tf.distribute` strategy: one device, MirroredStrategy or MultiWorkerMirroredStrategy.

Device names are written ``cpu:N`` or ``gpu:N``. Several CPU devices are *logical* devices carved
out of the one physical CPU (`tf.config.set_logical_device_configuration`): this is how the
multi-replica path runs on a machine without GPUs. Logical devices can only be configured before
TensorFlow initialises its devices, so call `configure_devices` (or `make_strategy`) before any
other TensorFlow work in the process.
"""

from __future__ import annotations

import json
import os
import re
import socket

import tensorflow as tf

from tfreg.errors import ConfigError

__all__ = [
    "parse_devices",
    "configure_devices",
    "make_strategy",
    "is_chief",
    "multi_worker_config",
    "loopback_tf_configs",
    "check_global_batch",
]

_DEVICE_RE = re.compile(r"^(?:/?(?:device:)?)(cpu|gpu):(\d+)$")


def parse_devices(text: str | None, source: str = "--devices") -> list[str] | None:
    """Parse ``"cpu:0,cpu:1"`` into ``["cpu:0", "cpu:1"]`` (None or empty text: None).

    Raises:
        ConfigError: a malformed or repeated device name.
    """
    if text is None or not text.strip():
        return None
    names = []
    for item in text.split(","):
        item = item.strip().lower()
        match = _DEVICE_RE.match(item)
        if not match:
            raise ConfigError(f"{source}: '{item}' is not a device name (expected cpu:N or gpu:N)")
        name = f"{match.group(1)}:{int(match.group(2))}"
        if name in names:
            raise ConfigError(f"{source}: device '{name}' is listed twice")
        names.append(name)
    return names


def parse_gpus(text: str | None, source: str = "--gpus") -> list[str] | None:
    """Parse ``--gpus``: ``"all"`` (every GPU TensorFlow sees) or indices ``"0,1"``.

    Raises:
        ConfigError: no GPU is visible, or the text is malformed.
    """
    if text is None or not text.strip():
        return None
    if text.strip().lower() == "all":
        count = len(tf.config.list_physical_devices("GPU"))
        if count == 0:
            raise ConfigError(f"{source} all: TensorFlow sees no GPU on this machine")
        return [f"gpu:{i}" for i in range(count)]
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() for item in items):
        raise ConfigError(f"{source}: expected 'all' or GPU indices like 0,1, got '{text}'")
    return parse_devices(",".join(f"gpu:{item}" for item in items), source)


def configure_devices(devices: list[str] | None, source: str = "--devices") -> list[str] | None:
    """Check device names and create the logical CPU devices they need.

    Args:
        devices: names such as ``["cpu:0", "cpu:1"]`` or ``["gpu:0"]``; None: nothing to do.
        source: option name used in error messages.

    Returns:
        TensorFlow device strings (``"/cpu:0"``...), or None when `devices` is None.

    Raises:
        ConfigError: unknown GPU, CPU and GPU mixed, or logical CPUs requested after TensorFlow
            already initialised its devices with fewer.
    """
    if devices is None:
        return None
    devices = parse_devices(",".join(devices), source)
    kinds = {name.split(":")[0] for name in devices}
    if len(kinds) > 1:
        raise ConfigError(f"{source}: mixing CPU and GPU devices is not supported")
    indices = [int(name.split(":")[1]) for name in devices]
    if kinds == {"gpu"}:
        count = len(tf.config.list_physical_devices("GPU"))
        missing = [name for name, i in zip(devices, indices) if i >= count]
        if missing:
            raise ConfigError(f"{source}: {missing[0]} does not exist (TensorFlow sees {count} GPU(s))")
    else:
        needed = max(indices) + 1
        if needed > 1:
            _ensure_logical_cpus(needed, source)
    return [f"/{name}" for name in devices]


def _ensure_logical_cpus(count: int, source: str) -> None:
    """Split the physical CPU into `count` logical devices (if not done already)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) >= count:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have < count:
            raise ConfigError(
                f"{source}: needs {count} logical CPU devices but TensorFlow already started with "
                f"{have}; choose devices before any other TensorFlow work in this process"
            ) from None


def multi_worker_config() -> dict | None:
    """The parsed ``TF_CONFIG`` environment variable when it describes more than one task.

    Raises:
        ConfigError: ``TF_CONFIG`` is not valid JSON or has no ``cluster``.
    """
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"TF_CONFIG: not valid JSON ({err.msg})") from None
    cluster = parsed.get("cluster") if isinstance(parsed, dict) else None
    if not isinstance(cluster, dict) or not cluster:
        raise ConfigError("TF_CONFIG: expected a JSON object with a 'cluster' entry")
    tasks = sum(len(v) for v in cluster.values() if isinstance(v, list))
    return parsed if tasks > 1 else None


def loopback_tf_configs(workers: int) -> list[str]:
    """``TF_CONFIG`` values for `workers` processes on this machine (a cluster on free localhost
    ports), one per worker in task order: start the same ``tfreg train`` command once with each.

    For trying multi-worker training, tests and benchmarks; the ports are free when chosen, so
    start the workers promptly.
    """
    sockets = [socket.socket() for _ in range(workers)]
    try:
        for sock in sockets:
            sock.bind(("localhost", 0))
        cluster = {"worker": [f"localhost:{sock.getsockname()[1]}" for sock in sockets]}
    finally:
        for sock in sockets:
            sock.close()
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            for index in range(workers)]


def make_strategy(devices: list[str] | None = None) -> tf.distribute.Strategy:
    """The strategy for `devices`.

    * ``TF_CONFIG`` set (more than one task): `tf.distribute.MultiWorkerMirroredStrategy` (every
      local GPU, or the CPU, of each worker); `devices` must then be None.
    * two or more devices: `tf.distribute.MirroredStrategy` over them;
    * one device: `tf.distribute.OneDeviceStrategy` on it;
    * None: `OneDeviceStrategy` on the first GPU, or on the CPU when there is none.

    Raises:
        ConfigError: see `configure_devices` and `multi_worker_config`.
    """
    if multi_worker_config() is not None:
        if devices:
            raise ConfigError(
                "--devices: cannot be combined with TF_CONFIG (multi-worker training uses every "
                "local GPU, or the CPU, of each worker)"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    names = configure_devices(devices)
    if names is None:
        names = ["/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"]
    if len(names) == 1:
        return tf.distribute.OneDeviceStrategy(names[0])
    return tf.distribute.MirroredStrategy(names)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the process that writes the run directory (always true without multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None or task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def check_global_batch(batch_size: int, strategy: tf.distribute.Strategy) -> int:
    """Per-replica batch size; the global batch must divide by the number of replicas.

    Raises:
        ConfigError: ``train.batch_size`` not a positive multiple of the replica count.
    """
    replicas = strategy.num_replicas_in_sync
    if batch_size < 1 or batch_size % replicas:
        raise ConfigError(
            f"train.batch_size: the global batch ({batch_size}) must be a positive multiple of "
            f"the number of replicas ({replicas})"
        )
    return batch_size // replicas
