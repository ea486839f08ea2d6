"""Where a VoxelMorph training step spends its time: each part alone, forward + backward.

Parts of tfreg's default VoxelMorph step (batch 1, MSE + 0.01 Grad, Adam), each timed as its own
`tf.function` (forward and gradient) on the same shape: the U-Net convolutions (+ flow head), the
integration (`VecInt(7)` at half resolution, with the rescalings), the full-resolution warp, the
losses, the Adam update, and the whole step; with the layers' default ``jit="auto"`` and with
``jit=False`` (the plain graph, the default before). The input pipeline is measured separately
by `bench_data.py` (never the bottleneck on this CPU).

``--pairwise`` profiles the network configured as voxelmorph-torch's ``VxmPairwise``
(`bench_train_vs_torch.PAIRWISE`: one convolution per level, velocity at full resolution) instead
of the default; ``--layers`` adds each convolution layer alone (forward + both gradients, on its
own input shape).

Usage: ``python benchmarks/profile_train_step.py [--shape 96x112x96] [--steps 3] [--threads N]
[--pairwise] [--layers]``; prints a table and writes ``benchmarks/results/profile_train_step.json``
(``--json`` to change).
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


def _time(fn, args, steps: int) -> dict:
    fn(*args)  # trace and compile
    walls, cpus = [], []
    for _ in range(steps):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn(*args)
        [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {"wall_s": round(statistics.median(walls), 3), "cpu_s": round(statistics.median(cpus), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="96x112x96")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow threads (0: all)")
    parser.add_argument("--pairwise", action="store_true", help="VxmPairwise's architecture")
    parser.add_argument("--layers", action="store_true", help="also time each convolution")
    parser.add_argument("--json", default=str(HERE / "results" / "profile_train_step.json"))
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split("x"))
    import keras
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from tfreg import layers
    from tfreg.config import method_defaults
    from common import layer_gradients
    from tfreg.losses import MSE, Grad
    from tfreg.registry import discover

    method = discover().get("voxelmorph").method
    config = method_defaults(method)
    if args.pairwise:
        from bench_train_vs_torch import PAIRWISE
        config["model"].update(PAIRWISE)
    model = method.build_model(config, shape)
    rng = np.random.default_rng(0)
    fixed = tf.constant(rng.random((1, *shape, 1), np.float32))
    moving = tf.constant(rng.random((1, *shape, 1), np.float32))
    half = tuple(n // 2 for n in shape)
    vel_half = tf.constant(rng.normal(0, 0.5, (1, *half, 3)).astype(np.float32))
    disp = tf.constant(rng.normal(0, 1.0, (1, *shape, 3)).astype(np.float32))
    mse, grad = MSE(), Grad("l2")
    optimizer = keras.optimizers.Adam(1e-4)
    rows = {}
    for jit in ("auto", False):
        def integrate(v):
            with tf.GradientTape() as tape:
                tape.watch(v)
                d = layers.RescaleTransform(2.0)(layers.VecInt(7, jit=jit)(v))
                loss = tf.reduce_sum(d * d)
            return tape.gradient(loss, v)

        def warp(d):
            with tf.GradientTape() as tape:
                tape.watch(d)
                loss = tf.reduce_sum(layers.SpatialTransformer(jit=jit)([moving, d]) ** 2)
            return tape.gradient(loss, d)

        rows[f"VecInt(7) at 1/2 + rescale, fwd+bwd, jit={jit}"] = _time(
            tf.function(integrate), (vel_half,), args.steps)
        rows[f"warp full res, fwd+bwd, jit={jit}"] = _time(tf.function(warp), (disp,), args.steps)

    unet = keras.Model(model.inputs, model.get_layer("flow").output) \
        if any(lay.name == "flow" for lay in model.layers) else None

    def convs(f, m):
        with tf.GradientTape() as tape:
            out = unet({"moving": m, "fixed": f}, training=True)
            loss = tf.reduce_sum(out * out)
        return tape.gradient(loss, unet.trainable_variables)

    if unet is not None:
        rows["U-Net + flow head, fwd+bwd"] = _time(tf.function(convs), (fixed, moving), args.steps)

    if args.layers:
        for layer in model.layers:
            if not isinstance(layer, keras.layers.Conv3D):
                continue
            x = tf.constant(rng.random((1, *layer.input.shape[1:]), np.float32))

            def one(x, layer=layer):
                return layer_gradients(layer, x)

            size = "x".join(str(n) for n in layer.input.shape[1:-1])
            rows[f"  {layer.name} {size} {layer.input.shape[-1]}->{layer.filters}"] = _time(
                tf.function(one), (x,), args.steps)

    def losses(f, w, v):
        with tf.GradientTape() as tape:
            tape.watch([w, v])
            loss = mse(f, w) + 0.01 * grad(None, v)
        return tape.gradient(loss, [w, v])

    rows["MSE + Grad, fwd+bwd"] = _time(tf.function(losses), (fixed, moving, vel_half), args.steps)

    from common import mse_grad_step

    step = mse_grad_step(model, mse, grad, optimizer)
    rows["whole step (default layers)"] = _time(tf.function(step), (fixed, moving), args.steps)
    width = max(len(k) for k in rows)
    print(f"{'part':{width}s}  wall s   cpu s   (load {os.getloadavg()[0]:.1f})")
    for name, r in rows.items():
        print(f"{name:{width}s}  {r['wall_s']:6.3f}  {r['cpu_s']:6.3f}")
    from tfreg.io import atomic_path

    with atomic_path(args.json) as out:
        out.write_text(json.dumps({"shape": list(shape), "pairwise": args.pairwise,
                                   "threads": args.threads, "rows": rows,
                                   "load": os.getloadavg()[0]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
