"""Where a LapIRN training step spends its time: each layer alone, forward and forward + backward.

Builds LapIRN's default three-level model (`plugins/lapirn`) at ``--shape`` and times every layer
with weights, every integration, warp, field rescaling and image pooling as its own
`tf.function` on random inputs of that layer's shape (forward alone, then forward + the gradients
of its inputs and weights), then one whole training step (all levels trained, MSE on the final
warped image + 0.01 Grad on the final displacement, Adam). The per-layer sum against the whole
step shows how much of the step the parts explain.

``--ab-alignment N`` first times N whole steps with the kernel gradient's input rows padded to
64 bytes (`tfreg.ops.convolution._aligned_channels`, the default) alternating with N steps traced
without it (28-channel rows, the code before), in this one process, so that both see the same load.

Usage: ``python benchmarks/profile_lapirn_step.py [--shape 64x64x64] [--steps 2] [--threads 1]
[--ab-alignment 3] [--no-layers]``;
prints one line per layer, per-level totals by kind, and writes
``benchmarks/results/profile_lapirn_step.json`` (``--json`` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _time(fn, args, steps: int) -> float:
    fn(*args)  # trace
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = fn(*args)
        [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def _kind(layer) -> str:
    name = type(layer).__name__
    if name in ("Conv3D", "Conv2D"):
        return "conv (strided)" if max(layer.strides) > 1 else "conv"
    return {"Conv3DTranspose": "conv transpose", "Conv2DTranspose": "conv transpose",
            "RecomputedVecInt": "integration", "SpatialTransformer": "warp",
            "RescaleTransform": "field upsampling", "HalfPool": "image pooling"}.get(name, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64x64x64")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ab-alignment", type=int, default=0,
                        help="whole steps per side of the aligned/unaligned A/B (0: none)")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    parser.add_argument("--json", default=str(HERE / "results" / "profile_lapirn_step.json"))
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split("x"))
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    from tfreg.config import method_defaults
    from tfreg.losses import MSE, Grad
    from tfreg.registry import discover

    method = discover().get("lapirn").method
    model = method.build_model(method_defaults(method), shape)
    rng = np.random.default_rng(0)
    mse, grad = MSE(), Grad("l2")
    optimizer = keras.optimizers.Adam(1e-4)
    fixed = tf.constant(rng.random((1, *shape, 1), np.float32))
    moving = tf.constant(rng.random((1, *shape, 1), np.float32))

    from common import mse_grad_step

    step = tf.function(mse_grad_step(model, mse, grad, optimizer, field="disp"))
    ab = {}
    if args.ab_alignment:
        from tfreg.ops import convolution

        aligned = convolution._aligned_channels
        step_unaligned = tf.function(step_fn)
        step(fixed, moving)  # trace with 64-byte rows
        convolution._aligned_channels = lambda channels, itemsize: channels
        step_unaligned(fixed, moving)  # trace with the channel count as rows (before)
        convolution._aligned_channels = aligned
        ab = {"aligned_s": [], "unaligned_s": []}
        for _ in range(args.ab_alignment):
            for key, fn in (("aligned_s", step), ("unaligned_s", step_unaligned)):
                t0 = time.perf_counter()
                float(fn(fixed, moving))
                ab[key].append(round(time.perf_counter() - t0, 3))
        print(f"A/B whole step, aligned rows {ab['aligned_s']} s, unaligned {ab['unaligned_s']} s; "
              f"median ratio unaligned/aligned "
              f"{statistics.median(ab['unaligned_s']) / statistics.median(ab['aligned_s']):.2f}",
              flush=True)
    timed = ("conv", "conv (strided)", "conv transpose", "integration", "warp",
             "field upsampling", "image pooling")
    rows = []
    for layer in [] if args.no_layers else model.layers:
        kind = _kind(layer)
        if kind not in timed:
            continue
        ins = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        xs = [tf.constant(rng.normal(0, 0.5, (1, *i.shape[1:])).astype(np.float32)) for i in ins]

        def fwd(*xs, layer=layer):
            return layer(list(xs) if len(xs) > 1 else xs[0])

        def both(*xs, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(xs)
                y = layer(list(xs) if len(xs) > 1 else xs[0])
                loss = tf.reduce_sum(y * y)
            return tape.gradient(loss, [*xs, *layer.trainable_variables])

        row = {"layer": layer.name, "kind": kind, "level": int(layer.name[len("lapirn_l")]),
               "input": [int(n) for n in ins[0].shape[1:]],
               "forward_s": round(_time(tf.function(fwd), xs, args.steps), 4),
               "forward_backward_s": round(_time(tf.function(both), xs, args.steps), 4)}
        rows.append(row)
        print(f"{row['layer']:28s} {kind:16s} {'x'.join(map(str, row['input'])):>14s}  "
              f"fwd {row['forward_s']:7.3f}  fwd+bwd {row['forward_backward_s']:7.3f}", flush=True)

    whole = _time(step, (fixed, moving), args.steps)
    totals: dict[str, float] = {}
    for row in rows:
        key = f"level {row['level']}: {row['kind']}"
        totals[key] = round(totals.get(key, 0.0) + row["forward_backward_s"], 3)
    print("\nforward + backward per level and kind (s):")
    for key in sorted(totals):
        print(f"  {key:34s} {totals[key]:7.3f}")
    parts = sum(r["forward_backward_s"] for r in rows)
    print(f"sum of parts {parts:.2f} s, whole step {whole:.2f} s (load {os.getloadavg()[0]:.1f})")
    from tfreg.io import atomic_path

    with atomic_path(args.json) as out:
        out.write_text(json.dumps({"shape": list(shape), "threads": args.threads,
                                   "whole_step_s": round(whole, 3), "ab_alignment": ab, "sum_of_parts_s": round(parts, 3),
                                   "totals": totals, "layers": rows,
                                   "load": os.getloadavg()[0]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
