"""What sets the regularity of `tfreg register`'s field: one pair at reduced size, in process.

Pair 01->02 of `bench_register.py` built at 48x56x48 (half the benchmark's size, same recipe),
registered by `tfreg.instance.register_arrays` with the `best` and `accurate` presets and variants
changing one setting each: the smoothness weight, the smoothing of a full-resolution velocity
(`fine_sigma`), the NCC window of the last stage, the velocity's level and the last stage's step
size. Prints Dice (labels present in both maps), %folding and SDlogJ of the displacement over all
voxels, inside the brain (labels > 0, dilated by 2 voxels) and outside, and CPU seconds; writes
benchmarks/results/bench_register_regularity.json.

Usage::

    TF_NUM_INTRAOP_THREADS=1 python benchmarks/bench_register_regularity.py [--only best,lam2]
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
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated variant names")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"
                                             / "bench_register_regularity.json"))
    args = parser.parse_args(argv)
    import bench_register
    from scipy import ndimage

    from tfreg import instance, metrics
    from tfreg.synthetic import warp_numpy

    if not (bench_register.DATA / "synthseg_label_maps").is_dir():
        print(f"skipped: benchmark data not found at {bench_register.DATA}")
        return 0
    pair = bench_register.build_pair("01", "02", shape=SHAPE)
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
        res = instance.register_arrays(pair["fixed"], pair["moving"], cfg)
        cpu = time.process_time() - c0
        warped = warp_numpy(pair["moving_labels"], res.disp, order=0)
        dice = metrics.dice(pair["fixed_labels"], warped, labels=labels)
        logj = np.log(np.clip(metrics.jacobian_determinant(res.disp), metrics.LOG_FLOOR, None))
        rows[name] = {"dice": float(np.nanmean(list(dice.values()))),
                      "folding": metrics.folding_percent(res.disp),
                      "sdlogj": float(logj.std()), "sdlogj_brain": float(logj[brain].std()),
                      "sdlogj_outside": float(logj[~brain].std()), "cpu_seconds": cpu}
        row = rows[name]
        print(f"{name:<30}{row['dice']:>7.3f}{row['folding']:>8.3f}{row['sdlogj']:>8.3f}"
              f"{row['sdlogj_brain']:>7.3f}{row['sdlogj_outside']:>7.3f}{cpu:>8.1f}", flush=True)
    Path(args.out).write_text(json.dumps({"pair": "01-02", "shape": SHAPE, "results": rows},
                                         indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
