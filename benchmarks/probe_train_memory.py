"""Peak resident memory of a VoxelMorph training step and of its full-resolution layers.

A sampling thread reads the process's resident set every 2 ms while one call runs, so the peak
of that call alone is seen (``ru_maxrss`` only gives the process's lifetime maximum):

* ``layers``: each layer with weights whose output is at full resolution, alone on a random input
  of its shape: the forward pass, then forward + the gradients of its input and weights;
* ``step``: whole training steps of the default network (MSE + 0.01 Grad, Adam), the first one
  including tracing and compilation.

``--old-conv-gradients`` traces with the convolution gradients of before 2026-12-01 (kernel
gradient over the whole padded volume at once, input gradient through a padded copy of the
output gradient), for the A/B of `tfreg.ops.convolution`'s slabs.

Usage: ``python benchmarks/probe_train_memory.py --shape 160x192x224 --mode layers|step
[--steps 1] [--only NAME,...] [--old-conv-gradients]``; one line per measurement, and a JSON
report (``--json``, default ``benchmarks/results/probe_train_memory.json``).
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


class PeakRSS:
    """Context manager: ``base`` and ``peak`` resident GiB of the process during the block."""

    def __enter__(self):
        self.base = self.peak = _rss_gib()
        self._run = True

        def loop():
            while self._run:
                self.peak = max(self.peak, _rss_gib())
                time.sleep(0.002)
        self._thread = threading.Thread(target=loop)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._run = False
        self._thread.join()
        self.peak = max(self.peak, _rss_gib())


def _tensor_peak_gib(reset: bool = False) -> float | None:
    """Peak bytes of TensorFlow's CPU allocator since the last reset (GiB), when it keeps
    statistics (``TF_CPU_ALLOCATOR_USE_BFC=true``); else None."""
    import tensorflow as tf

    try:
        if reset:
            tf.config.experimental.reset_memory_stats("CPU:0")
            return None
        return round(tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**30, 2)
    except (ValueError, RuntimeError, tf.errors.OpError):
        return None


def _old_conv_gradients() -> None:
    import tensorflow as tf

    from tfreg.ops import convolution

    convolution.SLAB_BYTES = 2 ** 62  # one slab: the whole padded volume

    def input_grad(g, kernel, padding):
        ndims = len(kernel.shape) - 2
        ks = list(kernel.shape[:ndims])
        flipped = tf.reverse(kernel, axis=list(range(ndims)))
        flipped = tf.transpose(flipped, list(range(ndims)) + [ndims + 1, ndims])
        full = [k - 1 - p for k, p in zip(ks, convolution._pads(ks, padding))]
        g = tf.pad(g, [[0, 0]] + [[f, f] for f in full] + [[0, 0]])
        return tf.nn.convolution(g, flipped, padding="VALID")

    convolution._input_grad = input_grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="160x192x224")
    parser.add_argument("--mode", choices=("layers", "step"), default="step")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated layer names (layers mode)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--old-conv-gradients", action="store_true")
    parser.add_argument("--json", default=str(HERE / "results" / "probe_train_memory.json"))
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split("x"))
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    from tfreg.config import method_defaults
    from tfreg.losses import MSE, Grad
    from tfreg.registry import discover
    from common import layer_gradients

    if args.old_conv_gradients:
        _old_conv_gradients()
    method = discover().get("voxelmorph").method
    model = method.build_model(method_defaults(method), shape)
    rng = np.random.default_rng(0)
    rows = []
    if args.mode == "layers":
        only = {n for n in args.only.split(",") if n}
        for layer in model.layers:
            if (not layer.trainable_weights or layer.output.shape[1] != shape[0]
                    or (only and layer.name not in only)):
                continue
            x = tf.constant(rng.normal(0, 0.5, (1, *layer.input.shape[1:])).astype(np.float32))

            def both(x, layer=layer):
                return layer_gradients(layer, x)

            for part, fn in (("forward", lambda x, layer=layer: tf.reduce_sum(layer(x))),
                             ("forward+backward", both)):
                with PeakRSS() as p:
                    [np.asarray(o) for o in tf.nest.flatten(tf.function(fn)(x))]
                rows.append({"layer": layer.name, "channels": [int(layer.input.shape[-1]),
                                                               int(layer.output.shape[-1])],
                             "part": part, "base_gib": round(p.base, 2),
                             "above_base_gib": round(p.peak - p.base, 2)})
                print(f"{layer.name:26s} {rows[-1]['channels']} {part:17s} "
                      f"+{rows[-1]['above_base_gib']:.2f} GiB", flush=True)
    else:
        mse, grad = MSE(), Grad("l2")
        optimizer = keras.optimizers.Adam(1e-4)
        fixed = tf.constant(rng.random((1, *shape, 1), np.float32))
        moving = tf.constant(rng.random((1, *shape, 1), np.float32))

        from common import mse_grad_step

        step = tf.function(mse_grad_step(model, mse, grad, optimizer))

        for i in range(args.steps):
            t0 = time.perf_counter()
            tensors = _tensor_peak_gib(reset=True)
            with PeakRSS() as p:
                float(step(fixed, moving))
            tensors = _tensor_peak_gib()
            rows.append({"step": i, "s": round(time.perf_counter() - t0, 1),
                         "base_gib": round(p.base, 2), "peak_gib": round(p.peak, 2),
                         "tensor_peak_gib": tensors})
            extra = "" if tensors is None else f", tensors' peak {tensors:.2f} GiB"
            print(f"step {i}: {rows[-1]['s']} s, peak {p.peak:.2f} GiB (base {p.base:.2f})"
                  f"{extra}", flush=True)
    from tfreg.io import atomic_path

    with atomic_path(args.json) as out:
        out.write_text(json.dumps({"shape": list(shape), "mode": args.mode,
                                   "old_conv_gradients": args.old_conv_gradients,
                                   "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
