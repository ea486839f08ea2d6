"""What sets the regularity of `tfreg register`'s field: one pair, in process.

Pair 01->02 of `bench_register.py` built at 48x56x48 (half the benchmark's size, same recipe;
`--full`: 96x112x96), registered by `tfreg.instance.register_arrays` (or, with `--command-path`,
by `tfreg.register.register_volumes` as `tfreg register` does) with the `best` and `accurate`
presets and variants changing one setting each: the smoothness weight, the smoothing of a
full-resolution velocity (`fine_sigma`), the NCC window of the last stage, the velocity's level,
the last stage's step size, the NCC's contrast floor and Adam's floor. Prints Dice (labels present
in both maps), %folding and SDlogJ of the displacement over all voxels, inside the brain
(labels > 0, dilated by 2 voxels) and outside, and CPU seconds; writes
benchmarks/results/bench_register_regularity[_full][_command].json.

Usage::

    python benchmarks/bench_register_regularity.py [--full] [--command-path] [--threads 1]
        [--only "best lam 2,best adam_floor 1"]

Rows of the variants run are merged into the results file (the others are kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))
SHAPE = (48, 56, 48)
FULL_SHAPE = (96, 112, 96)


def variants() -> dict:
    from tfreg.instance import PRESETS

    best, accurate = PRESETS["best"], PRESETS["accurate"]
    r = dataclasses.replace
    return {
        "accurate": accurate,
        "accurate lam 2": r(accurate, lam=2.0),
        "best lam 0.5": r(best, lam=0.5),
        "best lam 1": r(best, lam=1.0),
        "best lam 2": r(best, lam=2.0),
        "best lam 4": r(best, lam=4.0),
        "best lam 0.5, fine_sigma 2": r(best, lam=0.5, fine_sigma=2.0),
        "best lam 0.5, window 7": r(best, lam=0.5, ncc_win=(5, 7)),
        "best lam 0.5, field at 1/2": r(best, lam=0.5, field_level=1),
        "best lam 0.5, last lr 0.05": r(best, lam=0.5, learning_rate=(0.2, 0.05)),
        "best adam_floor 0.1": r(best, adam_floor=0.1),
        "best adam_floor 0.3": r(best, adam_floor=0.3),
        "best adam_floor 1": r(best, adam_floor=1.0),
        "best adam_floor 3": r(best, adam_floor=3.0),
        "best lam 1 + adam_floor 1": r(best, lam=1.0, adam_floor=1.0),
        "accurate adam_floor 1": r(accurate, adam_floor=1.0),
        "best ncc_floor 0.06": r(best, ncc_floor=0.06),
        "best ncc_floor 0.1": r(best, ncc_floor=0.1),
        "best ncc_floor 0.1 + adam_floor 1": r(best, ncc_floor=0.1, adam_floor=1.0),
        "best ncc_floor 0.1 + adam_floor 3": r(best, ncc_floor=0.1, adam_floor=3.0),
        "best ncc_floor 0.2": r(best, ncc_floor=0.2),
        "accurate ncc_floor 0.1 + adam_floor 1": r(accurate, ncc_floor=0.1, adam_floor=1.0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated variant names")
    parser.add_argument("--out", help="results JSON (default results/bench_register_regularity"
                                      ".json, or ..._full.json with --full)")
    parser.add_argument("--full", action="store_true",
                        help="the benchmark's full size (96x112x96) instead of half")
    parser.add_argument("--command-path", action="store_true",
                        help="register as `tfreg register` does (tfreg.register.register_volumes: "
                             "world-space initialisation, intensity normalisation) instead of "
                             "calling tfreg.instance.register_arrays on the raw arrays")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow threads (default 1)")
    args = parser.parse_args(argv)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import bench_register
    from scipy import ndimage

    from tfreg import instance, metrics
    from tfreg.io import Volume
    from tfreg.register import register_volumes
    from tfreg.synthetic import warp_numpy

    if not (bench_register.DATA / "synthseg_label_maps").is_dir():
        print(f"skipped: benchmark data not found at {bench_register.DATA}")
        return 0
    shape = FULL_SHAPE if args.full else SHAPE
    pair = bench_register.build_pair("01", "02", shape=shape)
    labels = sorted((set(np.unique(pair["fixed_labels"]))
                     & set(np.unique(pair["moving_labels"]))) - {0})
    brain = ndimage.binary_dilation(pair["fixed_labels"] > 0, iterations=2)
    chosen = args.only.split(",") if args.only else None
    rows = {}
    print(f"{'variant':<30}{'Dice':>7}{'fold%':>8}{'SDlogJ':>8}{'in':>7}{'out':>7}{'cpu s':>8}")
    for name, cfg in variants().items():
        if chosen and name not in chosen:
            continue
        c0 = time.process_time()
        if args.command_path:
            affine = np.diag(list(pair["spacing"]) + [1.0])
            res = register_volumes(Volume(pair["fixed"], affine), Volume(pair["moving"], affine),
                                   moving_labels=Volume(pair["moving_labels"], affine),
                                   config=cfg)
            warped = res.warped_labels
        else:
            res = instance.register_arrays(pair["fixed"], pair["moving"], cfg)
            warped = warp_numpy(pair["moving_labels"], res.disp, order=0)
        cpu = time.process_time() - c0
        dice = metrics.dice(pair["fixed_labels"], warped, labels=labels)
        logj = np.log(np.clip(metrics.jacobian_determinant(res.disp), metrics.LOG_FLOOR, None))
        rows[name] = {"dice": float(np.nanmean(list(dice.values()))),
                      "folding": metrics.folding_percent(res.disp),
                      "sdlogj": float(logj.std()), "sdlogj_brain": float(logj[brain].std()),
                      "sdlogj_outside": float(logj[~brain].std()), "cpu_seconds": cpu}
        row = rows[name]
        print(f"{name:<30}{row['dice']:>7.3f}{row['folding']:>8.3f}{row['sdlogj']:>8.3f}"
              f"{row['sdlogj_brain']:>7.3f}{row['sdlogj_outside']:>7.3f}{cpu:>8.1f}", flush=True)
    out = Path(args.out or Path(__file__).resolve().parent / "results" / (
        "bench_register_regularity" + ("_full" if args.full else "")
        + ("_command" if args.command_path else "") + ".json"))
    kept = json.loads(out.read_text())["results"] if out.is_file() else {}
    kept.update(rows)  # rows of variants not run this time are kept
    out.write_text(json.dumps({"pair": "01-02", "shape": shape, "results": kept}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
