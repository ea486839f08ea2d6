"""Quicksilver against optimisation-based LDDMM on inter-subject pairs, in one run.

Pairs follow the recipe of `../shared/data/README.md` (`bench_register.build_pair`: SynthSeg
label maps, labels >= 500 dropped, union bounding box, T1-like intensities, blur 0.7, noise
0.01), downsampled to `--shape` (default 24x28x24) so that the whole run fits a shared 2-core
CPU. The test pairs are two of the shared inter-subject pairs (01->02, 03->04: fixed 01, moving
02, ...); the training pairs are built from the other subjects only (05-06, 07-08, 09-10, 06-07
by default), so every test subject is unseen.

1. ``tfreg.engine.train`` of the ``quicksilver`` method on the training pairs: the data source
   optimises (and caches) their LDDMM momenta, then the prediction and correction stages run
   `--prediction-steps` and `--correction-steps` steps.
2. On each test pair: optimisation LDDMM (`tfreg.ops.lddmm.register_pair`, the same settings as
   the training targets), the prediction network alone (whole-image momentum, shot), and
   prediction + correction (the exported model's output). Scores: mean Dice over the labels
   present in both maps, the original's target overlap ``sum_l |W_l & T_l| / sum_l |T_l|``
   (W warped moving labels, T fixed labels), and the time per pair (the first call of each
   includes tracing/compilation; both the first and the mean of the others are given).

Usage::

    python benchmarks/bench_quicksilver.py                      # defaults below
    python benchmarks/bench_quicksilver.py --shape 24,32,24 --prediction-steps 50

Results: a table on stdout and `benchmarks/results/bench_quicksilver.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

TRAIN = ["05-06", "07-08", "09-10", "06-07"]
TEST = ["01-02", "03-04"]


def _write_pairs(folder: Path, names: list[str], shape) -> list[dict]:
    import nibabel as nib

    from bench_register import build_pair

    pairs, rows = [], []
    for name in names:
        f, m = name.split("-")
        pair = build_pair(f, m, shape=shape)
        for role in ("fixed", "moving"):
            affine = np.diag([*pair["spacing"], 1.0])
            nib.save(nib.Nifti1Image(pair[role], affine), str(folder / f"{name}_{role}.nii.gz"))
            nib.save(nib.Nifti1Image(pair[role + "_labels"].astype(np.int16), affine),
                     str(folder / f"{name}_{role}_seg.nii.gz"))
        rows.append(f"{name}_fixed.nii.gz,{name}_moving.nii.gz,{name}_fixed_seg.nii.gz,"
                    f"{name}_moving_seg.nii.gz")
        pairs.append(pair)
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return pairs


def _scores(pair: dict, disp: np.ndarray) -> dict:
    from tfreg import metrics
    from tfreg.ops.sampling import warp

    fixed_l, moving_l = pair["fixed_labels"], pair["moving_labels"]
    warped = warp(moving_l[None, ..., None].astype(np.int32), disp[None].astype(np.float32),
                  interp="nearest").numpy()[0, ..., 0]
    labels = sorted((set(np.unique(fixed_l)) & set(np.unique(moving_l))) - {0})
    dice = metrics.dice(fixed_l, warped, labels=labels)
    overlap = sum(int(((warped == lab) & (fixed_l == lab)).sum()) for lab in labels) / \
        sum(int((fixed_l == lab).sum()) for lab in labels)
    return {"dice": float(np.nanmean(list(dice.values()))), "target_overlap": float(overlap),
            "folding_percent": float(metrics.folding_percent(disp))}


def _normalise(image: np.ndarray) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    return ((image - low) / max(high - low, 1e-6)).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="24,28,24")
    parser.add_argument("--train-pairs", default=",".join(TRAIN))
    parser.add_argument("--test-pairs", default=",".join(TEST))
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20, help="LDDMM optimisation")
    parser.add_argument("--jit", action="store_true", help="XLA-compile the LDDMM optimisation")
    parser.add_argument("--prediction-steps", type=int, default=100)
    parser.add_argument("--correction-steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))

    import tensorflow as tf

    from tfreg.config import method_defaults, parse_set, resolve
    from tfreg.engine import train
    from tfreg.ops import lddmm
    from tfreg.registry import discover
    from tfreg_plugins.quicksilver.data import lddmm_config

    work = Path(tempfile.mkdtemp(prefix="bench_quicksilver_"))
    train_pairs = _write_pairs(work, args.train_pairs.split(","), shape)
    test_dir = work / "test"
    test_dir.mkdir()
    test_names = args.test_pairs.split(",")
    test_pairs = _write_pairs(test_dir, test_names, shape)
    (work / "spec.yaml").write_text("pairing: pairs\npairs: pairs.csv\n")

    loaded = discover().get("quicksilver")
    sets = [f"model.features={args.features}", "model.patch_batch=32",
            f"lddmm.iterations={args.iterations}", f"targets.cache={work / 'cache'}",
            f"schedule.prediction_steps={args.prediction_steps}",
            f"schedule.correction_steps={args.correction_steps}", "schedule.patches_per_pair=8",
            f"lddmm.jit={'true' if args.jit else 'false'}", "train.batch_size=2",
            f"train.learning_rate={args.learning_rate}",
            "train.checkpoint_every=100000", "train.image_every=100000"]
    config = resolve(method_defaults(loaded.method), None, parse_set(sets))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    data = loaded.method.data_source.open(work / "spec.yaml", config, 1)
    target_seconds = time.perf_counter() - t0
    print(f"targets: {target_seconds:.0f} s ({data.counts})", flush=True)
    t0 = time.perf_counter()
    result = train(loaded, config, data, work / "run", verbose=0)
    train_seconds = time.perf_counter() - t0
    print(f"training: {train_seconds:.0f} s", flush=True)
    model = result.model
    networks, shoot = model.get_layer("networks"), model.get_layer("shoot")
    predict_only = tf.function(lambda mov, fix: shoot(networks.whole_image(mov, fix))[1])
    full = tf.function(lambda mov, fix: model(loaded.method.io.model_inputs(config, fix, mov),
                                              training=False)["disp"])
    cfg = lddmm_config(config)
    rows = {"before": [], "lddmm": [], "prediction": [], "prediction+correction": []}
    times = {k: [] for k in rows if k != "before"}
    for name, pair in zip(test_names, test_pairs):
        fixed, moving = _normalise(pair["fixed"]), _normalise(pair["moving"])
        rows["before"].append(_scores(pair, np.zeros((*shape, 3), np.float32)))
        t0 = time.perf_counter()
        opt = lddmm.register_pair(fixed, moving, None, cfg)
        times["lddmm"].append(time.perf_counter() - t0)
        rows["lddmm"].append(_scores(pair, opt.disp))
        mov = tf.constant(moving[None, ..., None])
        fix = tf.constant(fixed[None, ..., None])
        for key, fn in (("prediction", predict_only), ("prediction+correction", full)):
            t0 = time.perf_counter()
            disp = fn(mov, fix).numpy()[0]
            times[key].append(time.perf_counter() - t0)
            rows[key].append(_scores(pair, disp))
        print(f"{name}: " + ", ".join(f"{k} Dice {v[-1]['dice']:.3f}" for k, v in rows.items()),
              flush=True)

    load_end = os.getloadavg()[0]
    summary = {}
    for key, values in rows.items():
        entry = {m: float(np.mean([v[m] for v in values])) for m in values[0]}
        if key in times:
            entry["seconds_first"] = times[key][0]
            entry["seconds_rest"] = float(np.mean(times[key][1:])) if len(times[key]) > 1 \
                else None
        summary[key] = entry
    print(f"\nQuicksilver vs LDDMM, {len(test_names)} unseen test pairs at {list(shape)}, "
          f"{len(train_pairs)} training pairs; load average {load:.1f} at the start, "
          f"{load_end:.1f} at the end, {os.cpu_count()} CPUs")
    print(f"targets: {target_seconds:.0f} s ({data.counts}); training: {train_seconds:.0f} s "
          f"({args.prediction_steps} + {args.correction_steps} steps, features "
          f"{args.features})")
    print(f"{'method':<24}{'Dice':>8}{'overlap':>9}{'fold %':>8}{'s first':>9}{'s next':>8}")
    for key, entry in summary.items():
        first = entry.get("seconds_first")
        rest = entry.get("seconds_rest")
        print(f"{key:<24}{entry['dice']:>8.3f}{entry['target_overlap']:>9.3f}"
              f"{entry['folding_percent']:>8.2f}"
              f"{'' if first is None else f'{first:9.1f}'}"
              f"{'' if rest is None else f'{rest:8.1f}'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"shape": list(shape), "train_pairs": args.train_pairs.split(","),
           "test_pairs": test_names, "features": args.features,
           "lddmm_iterations": args.iterations, "prediction_steps": args.prediction_steps,
           "correction_steps": args.correction_steps, "learning_rate": args.learning_rate,
           "target_seconds": target_seconds, "train_seconds": train_seconds,
           "load_average": load, "load_average_end": load_end, "cpus": os.cpu_count(), "machine": platform.processor(),
           "per_pair": rows, "seconds": times, "summary": summary}
    (RESULTS / "bench_quicksilver.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
