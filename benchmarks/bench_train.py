"""Training throughput benchmark: VoxelMorph (default network) steps/s and peak memory.

For each volume shape and device setting, a fresh process trains the VoxelMorph plugin with its
default config (U-Net 16/32 features, SVF with 7 squarings at half resolution, MSE + Grad) on
synthetic phantoms through `tfreg.engine.train`, one sample per replica:

* ``cpu1``: one device (the CPU), batch 1;
* ``cpu2``: two logical CPU devices (MirroredStrategy), global batch 2 -- both share the same
  physical cores, so this measures the cost of the multi-replica path, not a speed-up;
* ``cpu1-b2``: one device (the CPU, every core), global batch 2 -- the reference for ``mw2``;
* ``cpu1-xla``, ``cpu2-xla``: as ``cpu1``, ``cpu2`` with the whole step XLA-compiled
  (``train.jit_compile: true``), which needs far less memory on CPU;
* ``mw2``: two worker processes on loopback (MultiWorkerMirroredStrategy through ``TF_CONFIG``),
  each pinned to one core with one TensorFlow thread, global batch 2 (one sample per worker);
  the chief's step times are reported, peak RSS is the larger of the two workers';
* ``gpu1``: the first GPU, batch 1 (only where TensorFlow sees a GPU);
* ``gpu1-xla``: the same with ``train.jit_compile: true``.

``--method NAME`` trains another plugin with its default config the same way (e.g. the cascade).

Reported per setting: seconds per step and steps/s over the timed steps (after `--warmup` steps
that include tracing), samples/s, the first step's time (tracing + first batch), peak resident
memory of the process (``ru_maxrss``) and, on GPU, TensorFlow's peak GPU memory.

Usage::

    python benchmarks/bench_train.py                              # 96x112x96, cpu1 + cpu2
    python benchmarks/bench_train.py --shapes 96x112x96,160x192x224 --settings cpu1,cpu2
    python benchmarks/bench_train.py --settings gpu1,gpu1-xla --steps 20
    python benchmarks/bench_train.py --method cascade --shapes 160x192x224 --settings cpu1

Results: a table on stdout and ``benchmarks/results/bench_train.json`` (``--json`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import machine, peak_rss_gib, run_worker, shape_arg, write_report

HERE = Path(__file__).resolve().parent
SETTINGS = ("cpu1", "cpu2", "cpu1-b2", "cpu1-xla", "cpu2-xla", "mw2", "gpu1", "gpu1-xla")
GLOBAL_BATCH = {"cpu2": 2, "cpu1-b2": 2, "mw2": 2}



def worker(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process."""
    setting = args.setting
    devices = {"cpu1": ["cpu:0"], "cpu2": ["cpu:0", "cpu:1"], "cpu1-b2": ["cpu:0"],
               "cpu1-xla": ["cpu:0"], "cpu2-xla": ["cpu:0", "cpu:1"], "mw2": None,
               "gpu1": ["gpu:0"], "gpu1-xla": ["gpu:0"]}[setting]
    import tensorflow as tf

    if setting == "mw2":  # one core and one thread per worker, before TensorFlow starts
        os.sched_setaffinity(0, {args.task % os.cpu_count()})
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    from tfreg.engine import configure_devices, make_strategy

    if devices is not None:
        configure_devices(devices)
    strategy = make_strategy(devices)

    from tfreg.config import method_defaults
    from tfreg.data import DataSpec
    from tfreg.engine import train
    from tfreg.registry import discover

    loaded = discover().get(args.method)
    config = method_defaults(loaded.method)
    replicas = strategy.num_replicas_in_sync
    config["train"].update({
        "steps": args.warmup + args.steps, "batch_size": GLOBAL_BATCH.get(setting, replicas),
        "checkpoint_every": 10**6,
        "log_every": 10**6, "image_every": 10**6, "jit_compile": setting.endswith("xla"),
    })
    spec = DataSpec.from_yaml(args.data)
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(loaded, config, spec, run_dir, strategy=strategy, verbose=0)
    batch = config["train"]["batch_size"]
    times = [h["time"] for h in result.history]
    timed = times[-1] - times[args.warmup - 1]
    sec_per_step = timed / args.steps
    out = {
        "shape": list(shape_arg(args.shape)), "setting": setting, "replicas": replicas,
        "global_batch": batch, "timed_steps": args.steps,
        "sec_per_step": round(sec_per_step, 4), "steps_per_s": round(1 / sec_per_step, 4),
        "samples_per_s": round(batch / sec_per_step, 4),
        "first_step_s": round(times[0], 2),
        "peak_rss_gib": peak_rss_gib(),
        "final_loss": round(result.history[-1]["total"], 6),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if setting.startswith("gpu"):
        info = tf.config.experimental.get_memory_info("GPU:0")
        out["peak_gpu_gib"] = round(info["peak"] / 2**30, 3)
        out["gpu"] = tf.config.experimental.get_device_details(
            tf.config.list_physical_devices("GPU")[0]).get("device_name")
    return out


def _run_setting(command: list[str], setting: str) -> dict:
    """One setting's result: its worker process, or for ``mw2`` two workers on a loopback
    cluster at once (the chief's row, with the larger peak memory of the two)."""
    if setting != "mw2":
        # one process, whatever the shell has (an empty TF_CONFIG is not valid JSON for
        # MirroredStrategy's cluster resolver)
        return run_worker(command, env={"TF_CONFIG": None})
    from concurrent.futures import ThreadPoolExecutor

    from tfreg.engine import loopback_tf_configs

    configs = loopback_tf_configs(2)
    with ThreadPoolExecutor(len(configs)) as pool:
        rows = list(pool.map(lambda task: run_worker(command + ["--task", str(task)],
                                                     env={"TF_CONFIG": configs[task]}),
                             range(len(configs))))
    failed = [row for row in rows if "error" in row]
    if failed:
        return failed[0]
    return {**rows[0], "peak_rss_gib": max(row["peak_rss_gib"] for row in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="96x112x96",
                        help="comma-separated volume shapes, e.g. 96x112x96,160x192x224")
    parser.add_argument("--settings", default="cpu1,cpu2",
                        help=f"comma-separated settings among {', '.join(SETTINGS)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (tracing)")
    parser.add_argument("--method", default="voxelmorph",
                        help="plugin trained with its default config (default voxelmorph)")
    parser.add_argument("--json", default=str(HERE / "results" / "bench_train.json"),
                        help="where to write the results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--task", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    from tfreg.synthetic import write_collection

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown {unknown[0]!r}; choose from {', '.join(SETTINGS)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for text in args.shapes.split(","):
            shape = shape_arg(text)
            spec = write_collection(Path(tmp) / text, n=3, shape=shape, seed=0)
            for setting in settings:
                started = time.perf_counter()
                command = [sys.executable, __file__, "--worker", "--setting", setting, "--shape",
                           text, "--data", str(spec), "--steps", str(args.steps), "--warmup",
                           str(args.warmup), "--method", args.method]
                row = _run_setting(command, setting)
                if "error" in row:
                    print(f"{text} {setting}: failed ({row['error']})", flush=True)
                    results.append({"shape": list(shape), "setting": setting, **row})
                    continue
                row["process_wall_s"] = round(time.perf_counter() - started, 1)
                results.append(row)
                print(f"{text:>12} {setting:>9}: {row['sec_per_step']:8.3f} s/step "
                      f"{row['samples_per_s']:7.3f} samples/s  first step {row['first_step_s']:6.1f} s"
                      f"  peak RSS {row['peak_rss_gib']:.2f} GiB"
                      + (f"  peak GPU {row['peak_gpu_gib']:.2f} GiB" if "peak_gpu_gib" in row
                         else ""), flush=True)

    report = {"benchmark": "bench_train", "method": f"{args.method} (default config)",
              "machine": machine(), "warmup_steps": args.warmup, "results": results}
    write_report(args.json, report)


if __name__ == "__main__":
    main()
