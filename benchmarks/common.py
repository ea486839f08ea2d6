"""What every benchmark script needs: a fresh worker process per measurement, peak memory, a
description of the machine, and an atomically written JSON report.

The scripts run as ``python benchmarks/<name>.py``, so this module is imported as ``common``.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
from pathlib import Path

# before anything imports TensorFlow, so that every benchmark runs with the switches tfreg sets
# for its users (TensorFlow's oneDNN kernels: `tfreg/__init__.py`); peers' environments
# (torch, ANTs) run workers that import this module without tfreg
try:
    import tfreg  # noqa: F401
except ImportError:
    pass

__all__ = ["RESULTS", "shape_arg", "peak_rss_gib", "machine", "run_worker", "write_report",
           "mse_grad_step", "layer_gradients"]

RESULTS = Path(__file__).resolve().parent / "results"


def shape_arg(text: str) -> tuple[int, ...]:
    """``"96x112x96"`` -> ``(96, 112, 96)``."""
    return tuple(int(s) for s in text.lower().split("x"))


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, GiB (``ru_maxrss``)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def machine() -> dict:
    """Platform, CPU count, Python and (when importable) TensorFlow and Keras versions."""
    info = {"platform": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "load_average_1min": os.getloadavg()[0]}
    try:
        import keras
        import tensorflow as tf

        from tfreg.ops.convolution import onednn_enabled

        info.update(tensorflow=tf.__version__, keras=keras.__version__, onednn=onednn_enabled())
    except ImportError:
        pass
    return info


def run_worker(command: list[str], marker: str = "RESULT ", env: dict | None = None) -> dict:
    """Run one measurement in a fresh process; its result is the JSON after the last line that
    starts with `marker` on its stdout (``env``: variables to set, None to unset). On failure ``{"error": reason}`` (the signal when killed,
    e.g. by the kernel's out-of-memory killer, else the last line of stderr)."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    full_env = {key: value for key, value in full_env.items() if value is not None}  # None: unset
    proc = subprocess.run(command, capture_output=True, text=True, env=full_env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(marker)]
    if proc.returncode != 0 or not lines:
        if proc.returncode < 0:
            return {"error": f"killed by signal {-proc.returncode} (out of memory?)",
                    "exit_status": proc.returncode}
        tail = (proc.stderr or proc.stdout).strip().splitlines() or ["?"]
        return {"error": tail[-1], "exit_status": proc.returncode}
    return json.loads(lines[-1][len(marker):])


def write_report(path: str | Path, report: dict, quiet: bool = False) -> Path:
    """Write `report` as indented JSON, atomically (a reader never sees half a file)."""
    from tfreg.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    if not quiet:
        print(f"wrote {path}")
    return path


def mse_grad_step(model, mse, grad, optimizer, field: str = "preint_flow"):
    """One training step of a registration model taking ``{"moving", "fixed"}``: MSE of the
    warped image + 0.01 Grad of ``outputs[field]``, one `optimizer` update; returns the loss
    (a plain function: wrap it in ``tf.function`` to compile it).

    The optimizer's slots are created here, before the first call, as `tfreg.engine.train`
    does (a `tf.function` that creates variables in its first call may trace twice; at
    96x112x96 this made no measurable difference to the first step)."""
    import tensorflow as tf

    optimizer.build(model.trainable_variables)

    def step(fixed, moving):
        with tf.GradientTape() as tape:
            out = model({"moving": moving, "fixed": fixed}, training=True)
            loss = mse(fixed, out["warped"]) + 0.01 * grad(None, out[field])
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def layer_gradients(layer, x):
    """Gradients of ``sum(layer(x)^2)`` with respect to `x` and the layer's weights: one
    layer's forward and backward pass, for per-layer timing and memory."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * y)
    return tape.gradient(loss, [x, *layer.trainable_variables])
