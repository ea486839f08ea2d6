"""Speed and peak memory of tfreg's SpatialTransformer (warp) and VecInt, next to SciPy.

Every case runs in its own subprocess so that its peak memory (VmHWM, reset after setup through
/proc/self/clear_refs where the kernel allows it) belongs to that case alone: "peak MB" is the
process peak (TensorFlow itself takes ~0.7 GB); "+1st MB" the peak of the first call (tracing, XLA
compilation and one run) and "+run MB" the peak of the timed calls, both above the resident size
after setup (data, imports). Buffers of more than 32 MB are returned to the system when freed, so
"+run MB" shows the memory a call needs at full size; small volumes may reuse retained memory.
Per-call times exclude compilation/tracing, which is reported separately (first call minus the
median steady call). Cases whose estimated memory exceeds 80 % of what the machine has available
are skipped and say so.

Usage:
    python benchmarks/bench_layers.py                      # 160x192x224, writes results JSON
    python benchmarks/bench_layers.py --shape 64,64,64     # quicker
    python benchmarks/bench_layers.py --cases warp_xla_fwd,scipy_fwd
    python benchmarks/bench_layers.py --rounds 3 \
        --cases scipy_fwd,warp_default_fwd,warp_layer_fwd,vecint_default_fwd,vecint_layer_fwd

Data: one image channel (uniform noise) and a smooth 3-channel field of std ~1.5 voxels (random
noise on a 1/8 grid, cubic zoom to full size, rescaled). VecInt integrates the same field as a
velocity with 7 squaring steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_layers.json"

#: case -> (op, mode, backward). op "scipy" is map_coordinates(order=1).
#: mode "xla": the whole timed function is tf.function(jit_compile=True); "jit": a plain
#: tf.function calling the op with jit=True (only the op runs under XLA, as in an uncompiled
#: training step); "tf": a plain tf.function, jit=False (no XLA); "default": the functional op
#: called eagerly with its default arguments (jit="auto"); "layer": the Keras layer
#: (SpatialTransformer() / VecInt(7)) built with its defaults and called eagerly.
#: backward: False, "field" (gradient w.r.t. the displacement/velocity only; for warp this is
#: training with a fixed moving image) or "both" (warp: also w.r.t. the image, a scatter-add).
CASES = {
    "scipy_fwd": ("scipy", None, False),
    "warp_default_fwd": ("warp", "default", False),
    "warp_layer_fwd": ("warp", "layer", False),
    "warp_default_fwdbwd": ("warp", "default", "field"),
    "vecint_default_fwd": ("vecint", "default", False),
    "vecint_layer_fwd": ("vecint", "layer", False),
    "vecint_default_fwdbwd": ("vecint", "default", "field"),
    "warp_xla_fwd": ("warp", "xla", False),
    "warp_jit_fwd": ("warp", "jit", False),
    "warp_tf_fwd": ("warp", "tf", False),
    "warp_xla_fwdbwd": ("warp", "xla", "field"),
    "warp_jit_fwdbwd": ("warp", "jit", "field"),
    "warp_tf_fwdbwd": ("warp", "tf", "field"),
    "warp_jit_fwdbwd_both": ("warp", "jit", "both"),
    "warp_tf_fwdbwd_both": ("warp", "tf", "both"),
    "vecint_xla_fwd": ("vecint", "xla", False),
    "vecint_jit_fwd": ("vecint", "jit", False),
    "vecint_tf_fwd": ("vecint", "tf", False),
    "vecint_xla_fwdbwd": ("vecint", "xla", "field"),
    "vecint_jit_fwdbwd": ("vecint", "jit", "field"),
    "vecint_tf_fwdbwd": ("vecint", "tf", "field"),
}

#: voxelmorph-TF on the same 2-core machine and shape (fixture README): seconds per call
VXM_ANCHORS = {"warp_fwd": 0.445, "vecint_fwd": 3.25}


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _make_data(shape: tuple[int, ...], std: float, seed: int = 0):
    import numpy as np
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    image = rng.random(shape, dtype=np.float32)
    coarse = [max(2, n // 8) for n in shape]
    field = np.stack(
        [ndimage.zoom(rng.normal(size=coarse), [n / c for n, c in zip(shape, coarse)], order=3)
         for _ in shape], axis=-1)
    field = field[tuple(slice(0, n) for n in shape)]
    field = (field * (std / field.std())).astype(np.float32)
    return image, field


def _worker(case: str, shape: tuple[int, ...], repeats: int, std: float) -> dict:
    op, mode, backward = CASES[case]
    image, field = _make_data(shape, std)
    if op == "scipy":
        import numpy as np
        from scipy import ndimage

        grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
        coords = np.stack([g + field[..., d] for d, g in enumerate(grid)])
        del grid

        def run():
            return ndimage.map_coordinates(image, coords, order=1, mode="nearest")

    else:
        import tensorflow as tf

        from tfreg import layers

        img_t = tf.constant(image[None, ..., None])
        field_t = tf.constant(field[None])

        jit = mode == "jit"
        if mode == "layer":
            layer = layers.SpatialTransformer() if op == "warp" else layers.VecInt(7)

            def forward(img, disp):
                return layer([img, disp]) if op == "warp" else layer(disp)
        elif mode == "default":
            def forward(img, disp):
                return layers.warp(img, disp) if op == "warp" else layers.integrate_svf(disp, 7)
        elif op == "warp":
            def forward(img, disp):
                return layers.warp(img, disp, jit=jit)
        else:
            def forward(img, disp):
                return layers.integrate_svf(disp, 7, jit=jit)

        if backward:
            def step(img, disp):
                with tf.GradientTape() as tape:
                    tape.watch([img, disp])
                    loss = tf.reduce_sum(tf.square(forward(img, disp)))
                grads = tape.gradient(loss, [img, disp] if backward == "both" else [disp])
                return [loss, *grads]
        else:
            step = forward
        fn = step if mode in ("default", "layer") else tf.function(step, jit_compile=mode == "xla")

        def run():
            return tf.nest.map_structure(lambda t: t.numpy(), fn(img_t, field_t))

    rss_setup = _status_kb("VmRSS")
    reset = _reset_peak()  # the peak mark then covers the case, not the setup
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    peak_first = _status_kb("VmHWM")  # first call: tracing + compilation + one run
    rss_warm = _status_kb("VmRSS")
    _reset_peak()
    walls, cpus = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        run()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    median = statistics.median(walls)
    peak_steady = _status_kb("VmHWM")
    return {
        "case": case,
        "op": op,
        "mode": mode,
        "backward": backward,
        "compile_s": max(0.0, first - median) if op != "scipy" else 0.0,
        "wall_min_s": min(walls),
        "wall_median_s": median,
        "cpu_min_s": min(cpus),
        "walls_s": walls,
        "peak_rss_mb": max(peak_first or 0, peak_steady or 0) / 1024,
        "peak_first_call_mb": (peak_first or 0) / 1024,
        "peak_steady_mb": (peak_steady or 0) / 1024,
        "setup_rss_mb": (rss_setup or 0) / 1024,
        "warm_rss_mb": (rss_warm or 0) / 1024,
        "peak_reset_after_setup": reset,
    }


#: rough peak memory per voxel of the bigger cases (GB per 160x192x224 volume), measured with
#: this script; a case is skipped when the machine has less memory available (shared machines)
NEED_GB_FULL = {"vecint_xla_fwdbwd": 12.5, "vecint_jit_fwdbwd": 16.0, "vecint_tf_fwdbwd": 13.5}


def _available_gb() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _run_case(case: str, args) -> dict:
    shape = tuple(int(s) for s in args.shape.split(","))
    need = NEED_GB_FULL.get(case, 0.0) * float(np.prod(shape)) / (160 * 192 * 224)
    avail = _available_gb()
    if avail is not None and need > 0.8 * avail:
        return {"case": case, "error": f"skipped: needs ~{need:.1f} GB, {avail:.1f} GB available"}
    cmd = [sys.executable, __file__, "--worker", case, "--shape", args.shape,
           "--repeats", str(args.repeats), "--std", str(args.std)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"case": case, "error": "error: " + (" | ".join(tail) or f"exit {proc.returncode}")}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_before"] = load_before
    result["load_after"] = os.getloadavg()[0]
    return result


def _write_json(path: Path, payload: dict) -> None:
    from tfreg.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))


def _table(results: list[dict]) -> str:
    head = (f"{'case':20s} {'min s':>8s} {'median s':>9s} {'cpu s':>7s} {'compile s':>9s} "
            f"{'peak MB':>8s} {'+1st MB':>8s} {'+run MB':>8s} {'load':>5s}")
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:20s} {r['error']}")
            continue
        lines.append(
            f"{r['case']:20s} {r['wall_min_s']:8.3f} {r['wall_median_s']:9.3f} {r['cpu_min_s']:7.3f} "
            f"{r['compile_s']:9.2f} {r['peak_rss_mb']:8.0f} "
            f"{r['peak_first_call_mb'] - r['setup_rss_mb']:8.0f} "
            f"{r['peak_steady_mb'] - r['setup_rss_mb']:8.0f} {r['load_before']:5.1f}"
        )
    return "\n".join(lines)


def _ratios(results: list[dict], shape: tuple[int, ...]) -> dict:
    """Speed ratios from each case's best run over all rounds, plus, for SciPy against the
    default-argument cases, the ratio within each round (cases run back to back, A/B)."""
    by: dict[str, dict] = {}
    for r in results:
        if "error" not in r and (r["case"] not in by
                                 or r["wall_min_s"] < by[r["case"]]["wall_min_s"]):
            by[r["case"]] = r
    out = {}
    full = shape == (160, 192, 224)  # the voxelmorph anchors were measured at this shape only
    warps = ("warp_default_fwd", "warp_layer_fwd", "warp_xla_fwd", "warp_jit_fwd", "warp_tf_fwd")
    if "scipy_fwd" in by:
        ref = by["scipy_fwd"]["wall_min_s"]
        for case in warps:
            if case in by:
                out[f"scipy_fwd / {case}"] = ref / by[case]["wall_min_s"]
        for case in ("warp_default_fwd", "warp_layer_fwd"):
            per_round = []
            for rnd in sorted({r.get("round", 0) for r in results}):
                pair = {r["case"]: r for r in results
                        if r.get("round", 0) == rnd and "error" not in r}
                if "scipy_fwd" in pair and case in pair:
                    per_round.append(pair["scipy_fwd"]["wall_min_s"] / pair[case]["wall_min_s"])
            if per_round:
                out[f"scipy_fwd / {case}, per round"] = per_round
    for case in warps:
        if case in by and full:
            out[f"voxelmorph warp {VXM_ANCHORS['warp_fwd']} s / {case}"] = (
                VXM_ANCHORS["warp_fwd"] / by[case]["wall_min_s"])
    for case in ("vecint_default_fwd", "vecint_layer_fwd", "vecint_xla_fwd", "vecint_jit_fwd",
                 "vecint_tf_fwd"):
        if case in by and full:
            out[f"voxelmorph VecInt(7) {VXM_ANCHORS['vecint_fwd']} s / {case}"] = (
                VXM_ANCHORS["vecint_fwd"] / by[case]["wall_min_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="160,192,224", help="spatial shape, e.g. 64,64,64")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case")
    parser.add_argument("--std", type=float, default=1.5, help="field std in voxels")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the case list this many times, cases alternating")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    if args.worker:
        print(json.dumps(_worker(args.worker, shape, args.repeats, args.std)))
        return 0
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    results = []
    for rnd in range(args.rounds):
        for case in args.cases.split(","):
            results.append({**_run_case(case, args), "round": rnd})
            print(_table(results[-1:]).splitlines()[-1], flush=True)
    ratios = _ratios(results, shape)
    print()
    print(_table(results))
    for name, value in ratios.items():
        shown = ", ".join(f"{v:.2f}" for v in value) if isinstance(value, list) else f"{value:.2f}"
        print(f"{name}: {shown}x")
    from importlib.metadata import version

    _write_json(args.out, {
        "shape": list(shape),
        "field_std_voxels": args.std,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor()},
        "tensorflow": version("tensorflow"),
        "note": "wall times on a shared machine; see load_before/load_after per case",
        "results": results,
        "ratios": ratios,
        "voxelmorph_anchors_s": VXM_ANCHORS,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
