"""Quicksilver at full size: seconds and peak resident memory of each training stage's step and of
one training target (optimisation LDDMM), each in a fresh process.

* ``prediction``: one step of the ``prediction`` stage (the prediction network on
  ``train.batch_size x schedule.patches_per_pair`` patches; the whole images only feed the patch
  gather);
* ``correction``: one step of the ``correction`` stage, which also runs, without gradients, the
  whole-image prediction (`model.patch_batch` patches per call) and its shooting, and warps the
  fixed image back before cutting the correction network's patches;
* ``targets``: `tfreg.ops.lddmm.register_pair` with the plugin's ``lddmm:`` settings and
  ``--iterations`` iterations (the first includes XLA compilation with ``lddmm.jit``; the
  default config runs 50 per training pair).

Inputs are random: images in [0, 1], momentum targets N(0, 1e-3), patch starts uniform (the time
and memory of a step do not depend on the values). Training runs through `tfreg.engine.train`
with the default config; ``--warmup`` untimed steps (tracing) before ``--steps`` timed ones.

Usage::

    python benchmarks/probe_quicksilver_memory.py --shape 160x192x224
    python benchmarks/probe_quicksilver_memory.py --shape 96x112x96 --items prediction,targets

Results: a table on stdout and ``benchmarks/results/probe_quicksilver_memory.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from common import machine, peak_rss_gib, run_worker, shape_arg, write_report

HERE = Path(__file__).resolve().parent
ITEMS = ("prediction", "correction", "targets")


def _random_method(shape, config):
    """The quicksilver method reading one random pair (images, momentum target, patch starts)."""
    import numpy as np
    import tensorflow as tf

    from tfreg import registry

    method = registry.discover().get("quicksilver").method
    rng = np.random.default_rng(0)
    ndims = len(shape)
    patch = int(config["model"]["patch"])
    count = int(config["schedule"]["patches_per_pair"])
    element = {"fixed": rng.random((*shape, 1)).astype("float32"),
               "moving": rng.random((*shape, 1)).astype("float32"),
               "momentum": rng.normal(0, 1e-3, (*shape, ndims)).astype("float32")}

    def dataset(data, config=None, *, split="train", batch_size=1, seed=0, shuffle=True,
                repeat=True, input_context=None):
        def starts(_):
            high = tf.constant([s - patch + 1 for s in shape], tf.int32)
            return tf.random.uniform((count, ndims), 0, 2**30, tf.int32) % high

        ds = tf.data.Dataset.from_tensors(element).repeat()
        ds = ds.map(lambda e: {**e, "starts": starts(0)})
        return ds.batch(batch_size, drop_remainder=True).prefetch(1)

    source = registry.DataSource(open=lambda path, config, div: None, dataset=dataset,
                                 inshape=lambda data: tuple(shape))
    return dataclasses.replace(method, data=source)


def worker(args: argparse.Namespace) -> dict:
    import numpy as np

    from tfreg.config import method_defaults, resolve
    from tfreg.registry import discover

    shape = shape_arg(args.shape)
    defaults = method_defaults(discover().get("quicksilver").method)
    out = {"item": args.worker, "shape": list(shape)}
    if args.worker == "targets":
        from tfreg.ops import lddmm
        from tfreg_plugins.quicksilver.data import lddmm_config

        config = resolve(defaults, {"lddmm": {"iterations": args.iterations}}, None)
        cfg = lddmm_config(config)
        rng = np.random.default_rng(0)
        fixed, moving = (rng.random(shape).astype("float32") for _ in range(2))
        start = time.perf_counter()
        lddmm.register_pair(fixed, moving, None, cfg)
        out.update({"iterations": args.iterations, "jit": bool(cfg.jit),
                    "seconds": round(time.perf_counter() - start, 2)})
    else:
        from tfreg.engine import train

        total = args.warmup + args.steps
        never = {"checkpoint_every": 10**6, "log_every": 10**6, "image_every": 10**6,
                 "val_pairs": 0}
        steps = {"prediction_steps": total if args.worker == "prediction" else 0,
                 "correction_steps": total if args.worker == "correction" else 0}
        config = resolve(defaults, {"train": never, "schedule": steps}, None)
        method = _random_method(shape, config)
        with tempfile.TemporaryDirectory() as run_dir:
            result = train(method, config, None, run_dir, verbose=0)
        times = [h["time"] for h in result.history]
        out.update({"first_step_s": round(times[0], 2),
                    "sec_per_step": round((times[-1] - times[args.warmup - 1]) / args.steps, 3),
                    "patches_per_step": int(config["train"]["batch_size"])
                    * int(config["schedule"]["patches_per_pair"])})
    out["peak_rss_gb"] = round(peak_rss_gib(), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="160x192x224")
    parser.add_argument("--items", default=",".join(ITEMS))
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first training steps")
    parser.add_argument("--iterations", type=int, default=2, help="LDDMM iterations (targets)")
    parser.add_argument("--json", default=str(HERE / "results" / "probe_quicksilver_memory.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    rows = []
    for item in args.items.split(","):
        if item not in ITEMS:
            sys.exit(f"--items: unknown item {item!r} (choose from {', '.join(ITEMS)})")
        cmd = [sys.executable, __file__, "--worker", item, "--shape", args.shape, "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--iterations", str(args.iterations)]
        start = time.perf_counter()
        row = run_worker(cmd)
        rows.append({"item": item, **row, "wall_s": round(time.perf_counter() - start, 1)})
        write_report(args.json, {"machine": machine(), "args": vars(args), "rows": rows}, quiet=True)
    print(f"{'item':<12} {'s/step':>8} {'first s':>8} {'seconds':>8} {'RSS GB':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['item']:<12} error: {r['error'][:100]}")
            continue
        print(f"{r['item']:<12} {r.get('sec_per_step', ''):>8} {r.get('first_step_s', ''):>8} "
              f"{r.get('seconds', ''):>8} {r.get('peak_rss_gb', ''):>7}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
