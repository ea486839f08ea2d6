"""Quicksilver at full size: seconds and peak resident memory of each training stage's step and of
one training target (optimisation LDDMM), each in a fresh process.

* ``prediction``: one step of the ``prediction`` stage (the prediction network on
  ``train.batch_size x schedule.patches_per_pair`` patches; the whole images only feed the patch
  gather);
* ``correction``: the ``correction`` stage: its data, prepared once per training pair when the
  stage starts (``prepare_s``: the whole-image prediction, `model.patch_batch` patches per
  call, its shooting and the fixed image warped back), then its steps (the correction network
  on the patches);
* ``targets``: `tfreg.ops.lddmm.register_pair` with the plugin's ``lddmm:`` settings and
  ``--iterations`` iterations (the first includes XLA compilation with ``lddmm.jit``; the
  default config runs 50 per training pair).

Inputs are random: images in [0, 1], momentum targets N(0, 1e-3), patch starts drawn by the
plugin's dataset on the training grid (the time and memory of a step do not depend on the
values). Training runs through `tfreg.engine.train`
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


def _random_method(shape, config, timings: dict):
    """The quicksilver method reading one random pair (images, momentum target) through the
    plugin's own dataset (patch starts on the training grid); the correction stage's `prepare`
    (once per pair) is timed into `timings`."""
    import numpy as np

    from tfreg import registry
    from tfreg_plugins.quicksilver import data as qs_data
    from tfreg_plugins.quicksilver import patches

    method = registry.discover().get("quicksilver").method
    rng = np.random.default_rng(0)
    ndims = len(shape)
    fixed, moving = (rng.random((1, *shape)).astype("float32") for _ in range(2))
    starts = patches.foreground_starts(moving[0], fixed[0], int(config["model"]["patch"]),
                                       int(config["schedule"]["train_stride"]))
    pair = qs_data.QuicksilverData(
        spec=None, fixed=fixed, moving=moving,
        momentum=rng.normal(0, 1e-3, (1, *shape, ndims)).astype("float32"), starts=[starts],
        counts={}, cache_dir=Path("."))

    def stages(config):
        out = []
        for stage in method.stages(config):
            if stage.prepare is not None:
                def prepare(model, data, config, _inner=stage.prepare):
                    start = time.perf_counter()
                    prepared = _inner(model, data, config)
                    timings["prepare_s"] = round(time.perf_counter() - start, 2)
                    return prepared

                stage = dataclasses.replace(stage, prepare=prepare)
            out.append(stage)
        return out

    source = registry.DataSource(open=lambda path, config, div: pair,
                                 dataset=qs_data.QUICKSILVER_DATA.dataset,
                                 inshape=lambda data: tuple(shape))
    return dataclasses.replace(method, data=source, stages=stages)


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
        timings: dict = {}
        method = _random_method(shape, config, timings)
        with tempfile.TemporaryDirectory() as run_dir:
            result = train(method, config, method.data.open(None, config, 1), run_dir,
                           verbose=0)
        times = [h["time"] for h in result.history]
        out.update(timings)
        out.update({"first_step_s": round(times[0] - timings.get("prepare_s", 0.0), 2),
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
    print(f"{'item':<12} {'s/step':>8} {'first s':>8} {'prepare s':>9} {'seconds':>8} "
          f"{'RSS GB':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['item']:<12} error: {r['error'][:100]}")
            continue
        print(f"{r['item']:<12} {r.get('sec_per_step', ''):>8} {r.get('first_step_s', ''):>8} "
              f"{r.get('prepare_s', ''):>9} "
              f"{r.get('seconds', ''):>8} {r.get('peak_rss_gb', ''):>7}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
