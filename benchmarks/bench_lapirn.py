"""LapIRN benchmark: training steps/s per level and one-pair inference time, next to VoxelMorph.

Every measurement runs in a fresh process (so peak memory is its own):

* ``lapirn:level1`` / ``level2`` / ``level3``: `tfreg.engine.train` on one stage of LapIRN's
  default config (28 features, diffeomorphic), the other levels' stages set to 0 steps and
  ``freeze_steps: 0``, i.e. the cost of a level once the lower levels are unfrozen (the frozen
  first 2000 steps of levels 2 and 3 skip the lower levels' weight gradients and are a little
  cheaper);
* ``lapirn:infer``: the full three-level model, one pair, forward pass only (what the exported
  SavedModel's ``register`` signature runs);
* ``voxelmorph:train`` / ``voxelmorph:infer``: the same for the VoxelMorph plugin with its
  default config, when it is installed.

Training: ``--warmup`` steps (tracing, first batch) are excluded; seconds per step over the next
``--steps`` steps. Inference: median over ``--repeats`` calls after one warm-up call, excluding
file I/O. Inputs are random volumes (timing does not depend on the content), batch 1.

Usage::

    python benchmarks/bench_lapirn.py                          # 160x192x144 on the CPU
    python benchmarks/bench_lapirn.py --shape 80x96x72 --steps 5
    python benchmarks/bench_lapirn.py --device gpu --steps 20 --repeats 20 [--xla]
    python benchmarks/bench_lapirn.py --items lapirn:level3 --merge   # redo one item

Results: a table on stdout and ``benchmarks/results/bench_lapirn.json`` (``--json`` to change).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from common import machine, peak_rss_gib, run_worker, shape_arg, write_report

HERE = Path(__file__).resolve().parent
ITEMS = ("lapirn:level1", "lapirn:level2", "lapirn:level3", "lapirn:infer",
         "voxelmorph:train", "voxelmorph:infer")



def _device_name(tf) -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU ({details.get('device_name', 'unknown')})"
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores, {model})"


def _pipeline(shape: tuple[int, ...]):
    """In-memory data pipeline: the same random pair every step."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    pair = {k: rng.random((*shape, 1)).astype("float32") for k in ("fixed", "moving")}

    def pipeline(spec, split="train", batch_size=1, seed=0, shuffle=True, repeat=True,
                 input_context=None):
        ds = tf.data.Dataset.from_tensors(pair).repeat()
        return ds.batch(batch_size, drop_remainder=True).prefetch(1)

    return pipeline


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this process."""
    import tensorflow as tf

    if args.device == "cpu":
        tf.config.set_visible_devices([], "GPU")
    import numpy as np

    from tfreg.config import method_defaults, resolve
    from tfreg.registry import discover

    method_name, what = args.worker.split(":")
    shape = shape_arg(args.shape)
    loaded = discover().get(method_name)
    config = method_defaults(loaded.method)
    out = {"item": args.worker, "shape": list(shape), "device": _device_name(tf),
           "xla": bool(args.xla)}

    if what == "infer":
        with_model = loaded.method.build_model(config, shape)
        rng = np.random.default_rng(0)
        fixed = tf.constant(rng.random((1, *shape, 1)).astype("float32"))
        moving = tf.constant(rng.random((1, *shape, 1)).astype("float32"))

        @tf.function(jit_compile=bool(args.xla))
        def register(fixed, moving):
            result = with_model({"fixed": fixed, "moving": moving}, training=False)
            return result["warped"], result["disp"]

        start = time.perf_counter()
        _ = [t.numpy() for t in register(fixed, moving)]
        out["first_call_s"] = round(time.perf_counter() - start, 3)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            _ = [t.numpy() for t in register(fixed, moving)]
            times.append(time.perf_counter() - start)
        out["infer_s"] = round(float(np.median(times)), 4)
        out["infer_min_s"] = round(float(np.min(times)), 4)
        out["repeats"] = args.repeats
    else:
        from tfreg.engine import train

        total = args.warmup + args.steps
        sets: dict = {"train": {"checkpoint_every": 10**6, "log_every": 10**6,
                                "image_every": 10**6, "jit_compile": bool(args.xla)}}
        if method_name == "lapirn":
            sets["schedule"] = {f"level{lv}_steps": (total if what == f"level{lv}" else 0)
                                for lv in (1, 2, 3)}
            sets["schedule"]["freeze_steps"] = 0
        else:
            sets["train"]["steps"] = total
        config = resolve(config, sets, None)
        from tfreg.registry import DataSource

        source = DataSource(open=lambda path, config, divisor: None,
                            dataset=lambda data, config, **kwargs: _pipeline(shape)(data, **kwargs))
        method = dataclasses.replace(loaded.method, data=source)
        with tempfile.TemporaryDirectory() as run_dir:
            result = train(method, config, None, run_dir, verbose=0)
        times = [h["time"] for h in result.history]
        sec = (times[-1] - times[args.warmup - 1]) / args.steps
        out.update({"first_step_s": round(times[0], 3), "timed_steps": args.steps,
                    "sec_per_step": round(sec, 4), "steps_per_s": round(1.0 / sec, 4)})
    out["peak_rss_gb"] = round(peak_rss_gib(), 2)
    if tf.config.list_physical_devices("GPU"):
        out["peak_gpu_gb"] = round(tf.config.experimental.get_memory_info("GPU:0")["peak"]
                                   / 2**30, 2)
    return out


def _run_item(item: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", item, "--shape", args.shape, "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--device", args.device] + (["--xla"] if args.xla else [])
    row = run_worker(cmd)
    return {"item": item, **row} if "error" in row else row


def _table(rows: list[dict]) -> str:
    head = f"{'item':<18} {'steps/s':>8} {'s/step':>8} {'infer s':>8} {'first s':>8} {'RSS GB':>7}"
    out = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"{r['item']:<18} error: {r['error'][:100]}")
            continue
        first = r.get("first_step_s", r.get("first_call_s", ""))
        out.append(f"{r['item']:<18} {r.get('steps_per_s', ''):>8} {r.get('sec_per_step', ''):>8} "
                   f"{r.get('infer_s', ''):>8} {first:>8} {r.get('peak_rss_gb', ''):>7}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="160x192x144", help="volume shape, e.g. 160x192x144")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per item")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first training steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed inference calls")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--xla", action="store_true", help="XLA-compile steps and inference")
    parser.add_argument("--items", default=",".join(ITEMS),
                        help=f"comma-separated subset of {','.join(ITEMS)}")
    parser.add_argument("--json", default=str(HERE / "results" / "bench_lapirn.json"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of other items already in --json (same shape, device)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return

    items = [i for i in args.items.split(",") if i]
    unknown = [i for i in items if i not in ITEMS]
    if unknown:
        parser.error(f"unknown item {unknown[0]!r}; choose from {', '.join(ITEMS)}")
    try:
        import tfreg_plugins.voxelmorph  # noqa: F401
    except ImportError:
        items = [i for i in items if not i.startswith("voxelmorph")]
    rows = []
    for item in items:
        start = time.perf_counter()
        row = _run_item(item, args)
        row["wall_s"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(f"{item}: done in {row['wall_s']} s", file=sys.stderr, flush=True)
    path = Path(args.json)
    if args.merge and path.is_file():
        previous = json.loads(path.read_text())
        if (previous.get("shape") == list(shape_arg(args.shape))
                and previous.get("device_setting") == args.device
                and previous.get("xla") == args.xla):
            done = {row["item"] for row in rows}
            kept = [row for row in previous.get("results", []) if row.get("item") not in done]
            rows = sorted(kept + rows, key=lambda row: ITEMS.index(row["item"]))
    result = {"benchmark": "bench_lapirn", "shape": list(shape_arg(args.shape)),
              "device_setting": args.device, "xla": args.xla, "steps": args.steps,
              "warmup": args.warmup, "repeats": args.repeats,
              "machine": machine(), "results": rows}
    print(_table(rows))
    write_report(path, result)


if __name__ == "__main__":
    main()
