"""Cost of the cross-contrast similarities: MIND-SSC and NMI (and NCC, MSE for scale).

Each measure runs in a fresh process (so the peak memory is its own) on one random pair at
``--shape`` (default 160x192x224), forward and gradient with respect to the moving image, as a
`tf.function` (``--jit``: XLA-compiled). The table gives the first call (tracing/compilation),
the best of ``--repeats`` later calls, and the process's peak RSS above the baseline of building
the inputs (`base`), so the NMI figure shows whether its chunked Parzen histogram keeps memory
independent of voxels x bins (a dense one-hot of 160x192x224 voxels x 32 bins x 2 images would
take 1.8 GB in float32, plus its gradient).

    python benchmarks/bench_similarity.py [--shape 160x192x224] [--threads 1] [--jit]

Results: a table on stdout and ``benchmarks/results/bench_similarity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import machine, peak_rss_gib, run_worker, shape_arg, write_report

HERE = Path(__file__).resolve().parent
MEASURES = ("base", "mse", "ncc", "mind", "nmi")


def worker(measure: str, shape: tuple[int, ...], threads: int, repeats: int, jit: bool) -> dict:
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    from tfreg.losses import MIND, MSE, NCC, NMI

    rng = np.random.default_rng(0)
    fixed = tf.constant(rng.random((1, *shape, 1), np.float32))
    moving = tf.constant(rng.random((1, *shape, 1), np.float32))
    if measure == "base":
        np.asarray(fixed + moving)
        return {"peak_rss_gib": peak_rss_gib()}
    loss = {"mse": MSE(), "ncc": NCC(win=9), "mind": MIND(), "nmi": NMI(bins=32)}[measure]

    @tf.function(jit_compile=jit)
    def value_and_grad(f, m):
        with tf.GradientTape() as tape:
            tape.watch(m)
            value = loss(f, m)
        return value, tape.gradient(value, m)

    t0 = time.perf_counter()
    np.asarray(value_and_grad(fixed, moving)[1])
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.asarray(value_and_grad(fixed, moving)[1])
        times.append(time.perf_counter() - t0)
    return {"first_s": round(first, 3), "best_s": round(min(times), 3),
            "peak_rss_gib": peak_rss_gib(), "version": f"tensorflow {tf.__version__}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="160x192x224")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--jit", action="store_true", help="XLA-compile each measure")
    parser.add_argument("--measures", default=",".join(MEASURES[1:]))
    parser.add_argument("--json", default=str(HERE / "results" / "bench_similarity.json"))
    parser.add_argument("--worker", choices=MEASURES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = shape_arg(args.shape)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, shape, args.threads, args.repeats,
                                            args.jit)), flush=True)
        return
    results = {}
    for measure in ["base"] + [m for m in args.measures.split(",") if m]:
        cmd = [sys.executable, __file__, "--worker", measure, "--shape", args.shape,
               "--threads", str(args.threads), "--repeats", str(args.repeats)]
        if args.jit:
            cmd.append("--jit")
        results[measure] = run_worker(cmd, env={"TF_CPP_MIN_LOG_LEVEL": "3"})
        results[measure]["load_average_1min"] = round(os.getloadavg()[0], 2)
    base = results["base"].get("peak_rss_gib", 0.0)
    print(f"value + gradient at {args.shape}, {args.threads} thread(s), jit={args.jit}")
    print(f"{'measure':>8} {'first s':>8} {'best s':>7} {'peak RSS':>9} {'above base':>11}")
    for measure, r in results.items():
        if measure == "base" or "error" in r:
            if "error" in r:
                print(f"{measure:>8} failed: {r['error']}")
            continue
        r["above_base_gib"] = round(r["peak_rss_gib"] - base, 3)
        print(f"{measure:>8} {r['first_s']:8.2f} {r['best_s']:7.2f} {r['peak_rss_gib']:8.2f}G "
              f"{r['above_base_gib']:10.2f}G")
    write_report(args.json, {"benchmark": "bench_similarity", "shape": list(shape),
                             "threads": args.threads, "jit": args.jit, "machine": machine(),
                             "results": results})


if __name__ == "__main__":
    main()
