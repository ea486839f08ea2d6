"""Why the shipped model's recipe learns so slowly: short runs of its network, loss and synthesis
on easier and easier pairs (docs/builtin-model.md, "the diagnosis").

Every case trains the network of ``plugins/voxelmorph/voxelmorph-builtin.yaml`` from scratch in
a plain loop (Adam, batch 1) on pairs synthesised from the aligned SynthSeg maps of
``benchmarks/builtin_maps.py`` at 32x40x32, and reports the hard mean Dice (all labels,
nearest-neighbour warp, as ``val/dice``) of four fixed evaluation pairs before and after, and the
loss averaged over the first and the last 50 steps. Cases:

* ``free``: no network; one free displacement field optimised on the label loss of a held-out
  pair (09 -> 10): the best the training signal can give.
* ``same_small``: two images of one map, each deformed as in the recipe (+/- 0.8 voxel, control
  points 6 voxels apart), random contrasts, the recipe's loss.
* ``same_large``: the same with +/- 2.1 voxels, control points 16 voxels apart.
* ``shift_constant``: one map, one contrast, moving = fixed shifted by (2, 0, 0) voxels at every
  step, loss: image MSE.
* ``shift_random``: the same with a random integer shift in [-2, 2] per axis, loss: MSE between
  the displacement and the true shift (the answer is given).

Usage::

    python benchmarks/builtin_maps.py --out /tmp/maps
    python benchmarks/builtin_learning.py --maps /tmp/maps --steps 300 --threads 1

Results: a table on stdout and ``benchmarks/results/builtin_learning.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("free", "same_small", "same_large", "shift_constant", "shift_random")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps", required=True, help="folder written by builtin_maps.py")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/builtin_learning.json"))
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {', '.join(CASES)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf
    import yaml

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from tfreg import metrics
    from tfreg.config import method_defaults
    from tfreg.data.synth import LabelMapSource, SynthSettings, load_label_maps
    from tfreg.layers import warp
    from tfreg.losses import Grad, LabelLoss
    from tfreg.registry import discover

    shape = (32, 40, 32)
    maps = load_label_maps([Path(args.maps) / f"aligned_seg_{k:02d}.nii.gz" for k in range(1, 11)],
                           shape)
    recipe = yaml.safe_load((ROOT / "plugins/voxelmorph/voxelmorph-builtin.yaml").read_text())
    method = discover().get("voxelmorph").method
    config = method_defaults(method)
    for key in ("model", "loss"):
        config[key].update(recipe[key])
    label_loss = LabelLoss(config["loss"]["labels"], "dice")
    grad = Grad("l2", loss_mult=2.0)

    def source(train, max_disp, spacing):
        return LabelMapSource({"train": train, "val": maps[8:]},
                              SynthSettings(max_disp=max_disp, spacing=spacing, blur=(0.3, 0.6)),
                              "maps", 0)

    def one_contrast(batch, shift):
        """Both images from the fixed image's label means; moving = fixed rolled by `shift`."""
        values = tf.constant(src.values)
        index = tf.searchsorted(values, tf.reshape(batch["fixed_labels"], [-1]))
        flat = tf.reshape(batch["fixed"], [-1])
        means = tf.math.unsorted_segment_sum(flat, index, len(src.values)) / tf.maximum(
            tf.math.unsorted_segment_sum(tf.ones_like(flat), index, len(src.values)), 1.0)
        fixed = tf.reshape(tf.gather(means, index), tf.shape(batch["fixed"]))
        labels = batch["fixed_labels"]
        return {"fixed": fixed, "fixed_labels": labels,
                "moving": tf.roll(fixed, shift, axis=[1, 2, 3]),
                "moving_labels": tf.roll(labels, shift, axis=[1, 2, 3]),
                "true": tf.zeros((*shape, 3)) + tf.cast(shift, tf.float32)}

    def hard_dice(batch, disp):
        moved = warp(batch["moving_labels"], disp, interp="nearest").numpy()[0, ..., 0]
        return metrics.mean_dice(metrics.dice(batch["fixed_labels"].numpy()[0, ..., 0], moved))

    rows = []
    for case in cases:
        tf.keras.utils.set_random_seed(0)
        start = time.perf_counter()
        if case == "free":
            src = source(maps[:8], 0.8, 6)
            batch = next(iter(src.dataset("val", 1, shuffle=False, repeat=False)))
            disp = tf.Variable(tf.zeros((1, *shape, 3)))
            opt = tf.keras.optimizers.Adam(0.05)
            losses = []
            for _ in range(args.steps):
                with tf.GradientTape() as tape:
                    loss = label_loss(batch["fixed_labels"],
                                      label_loss.warped_one_hot(batch["moving_labels"], disp)) \
                        + 0.05 * grad(None, disp)
                opt.apply_gradients(zip(tape.gradient(loss, [disp]), [disp]))
                losses.append(float(loss))
            before = hard_dice(batch, tf.zeros_like(disp))
            after = hard_dice(batch, disp)
            largest = float(tf.reduce_max(tf.abs(disp)))
        else:
            small = case == "same_small"
            src = source(maps[:1], 0.8 if small else 2.1, 6 if small else 16)
            model = method.build_model(config, shape)
            opt = tf.keras.optimizers.Adam(args.lr)
            shifting = case.startswith("shift")
            rng = tf.random.Generator.from_seed(7)

            def shift_of():
                if case == "shift_constant":
                    return tf.constant([2, 0, 0])
                return rng.uniform((3,), -2, 3, dtype=tf.int32)

            def prepare(batch):
                return one_contrast(batch, shift_of()) if shifting else batch

            @tf.function
            def step(batch):
                with tf.GradientTape() as tape:
                    out = model({"moving": batch["moving"], "fixed": batch["fixed"]},
                                training=True)
                    if case == "shift_random":
                        loss = tf.reduce_mean(tf.square(out["disp"] - batch["true"]))
                    elif case == "shift_constant":
                        loss = tf.reduce_mean(tf.square(batch["fixed"] - out["warped"]))
                    else:
                        loss = label_loss(batch["fixed_labels"], label_loss.warped_one_hot(
                            batch["moving_labels"], out["disp"]))
                    total = loss + 0.05 * grad(None, out["preint_flow"])
                grads = tape.gradient(total, model.trainable_variables)
                opt.apply_gradients(zip(grads, model.trainable_variables))
                return loss

            evaluation = [prepare(b) for b in
                          src.dataset("train", 1, seed=123).take(4)]
            before = float(np.mean([hard_dice(b, tf.zeros((1, *shape, 3))) for b in evaluation]))
            data = iter(src.dataset("train", 1, seed=0))
            losses = [float(step(prepare(next(data)))) for _ in range(args.steps)]
            outputs = [model({"moving": b["moving"], "fixed": b["fixed"]}) for b in evaluation]
            after = float(np.mean([hard_dice(b, o["disp"]) for b, o in zip(evaluation, outputs)]))
            largest = max(float(tf.reduce_max(tf.abs(o["disp"]))) for o in outputs)
        rows.append({"case": case, "steps": args.steps, "dice_before": round(before, 4),
                     "dice_after": round(after, 4),
                     "loss_first_50": round(float(np.mean(losses[:50])), 4),
                     "loss_last_50": round(float(np.mean(losses[-50:])), 4),
                     "largest_field_voxels": round(largest, 3),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)

    print(f"\n{'case':16s} {'Dice before':>11s} {'after':>7s} {'loss first':>10s} "
          f"{'last':>8s} {'field':>6s}")
    for r in rows:
        print(f"{r['case']:16s} {r['dice_before']:11.4f} {r['dice_after']:7.4f} "
              f"{r['loss_first_50']:10.4f} {r['loss_last_50']:8.4f} "
              f"{r['largest_field_voxels']:6.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"steps": args.steps, "lr": args.lr,
                                           "threads": args.threads, "rows": rows}, indent=2)
                               + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
