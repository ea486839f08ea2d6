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
   present in both maps; the original's target overlap, the mean over the fixed map's labels of
   ``|W_l & T_l| / |T_l|`` (W warped moving labels, T fixed labels; as its evaluation
   scripts), beside the volume-weighted total overlap ``sum_l |W_l & T_l| / sum_l |T_l|``;
   folding; and the time per pair (the first call of each includes tracing/compilation; both
   the first and the mean of the others are given).

``--evaluate-run WORK`` repeats step 2 only, with the model that an earlier run trained in its
work folder (printed at its start; the training times come from its ``training.json``).

Usage::

    python benchmarks/bench_quicksilver.py                      # defaults below
    python benchmarks/bench_quicksilver.py --shape 24,32,24 --prediction-steps 50
    python benchmarks/bench_quicksilver.py --evaluate-run /tmp/bench_quicksilver_XXXX

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
    """Mean Dice over the labels present in both maps; the original's target overlap: the mean
    over the labels of the fixed map of ``|W_l & T_l| / |T_l|`` (its evaluation scripts: one
    ratio per label, labels absent from the target skipped); the volume-weighted total overlap
    ``sum_l |W_l & T_l| / sum_l |T_l|``; folding."""
    from tfreg import metrics
    from tfreg.ops.sampling import warp

    fixed_l, moving_l = pair["fixed_labels"], pair["moving_labels"]
    warped = warp(moving_l[None, ..., None].astype(np.int32), disp[None].astype(np.float32),
                  interp="nearest").numpy()[0, ..., 0]
    labels = sorted((set(np.unique(fixed_l)) & set(np.unique(moving_l))) - {0})
    dice = metrics.dice(fixed_l, warped, labels=labels)
    target_labels = sorted(set(np.unique(fixed_l)) - {0})
    hits = [int(((warped == lab) & (fixed_l == lab)).sum()) for lab in target_labels]
    sizes = [int((fixed_l == lab).sum()) for lab in target_labels]
    return {"dice": float(np.nanmean(list(dice.values()))),
            "target_overlap": float(np.mean([h / n for h, n in zip(hits, sizes)])),
            "total_overlap": float(sum(hits) / sum(sizes)),
            "folding_percent": float(metrics.folding_percent(disp))}


def _normalise(image: np.ndarray) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    return ((image - low) / max(high - low, 1e-6)).astype(np.float32)


def _training_record(work: Path, shape, train_names: list[str]) -> dict | None:
    """Target and training times of the run in `work`: its ``training.json``, else the results
    file of that run when its shape and training pairs match (None if neither)."""
    for path in (work / "training.json", RESULTS / "bench_quicksilver.json"):
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("shape") == list(shape) and record.get("train_pairs") == train_names:
                keys = ("target_seconds", "train_seconds", "load_average", "load_average_start",
                        "load_average_end", "summary")
                return {("summary_of_that_run" if k == "summary" else k): record[k]
                        for k in keys if k in record}
    return None


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
    parser.add_argument("--evaluate-run", metavar="WORK",
                        help="skip targets and training: evaluate the model trained by an earlier "
                             "run of this script in its work folder WORK (printed at the start)")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from tfreg.config import method_defaults, parse_set, resolve
    from tfreg.engine import train
    from tfreg.ops import lddmm
    from tfreg.registry import discover
    from tfreg_plugins.quicksilver.data import lddmm_config

    test_names = args.test_pairs.split(",")
    load = os.getloadavg()[0]
    if args.evaluate_run:
        from tfreg.export import build_from_run

        work = Path(args.evaluate_run)
        loaded, model, config, state = build_from_run(work / "run")
        shape = tuple(int(s) for s in state.inshape[:3])
        train_names = [row.split("_fixed")[0]
                       for row in (work / "pairs.csv").read_text().split()]
        training = _training_record(work, shape, train_names)
    else:
        shape = tuple(int(s) for s in args.shape.split(","))
        train_names = args.train_pairs.split(",")
        work = Path(tempfile.mkdtemp(prefix="bench_quicksilver_"))
        print(f"work folder: {work}", flush=True)
        _write_pairs(work, train_names, shape)
        (work / "spec.yaml").write_text("pairing: pairs\npairs: pairs.csv\n")
        loaded = discover().get("quicksilver")
        sets = [f"model.features={args.features}", "model.patch_batch=32",
                f"lddmm.iterations={args.iterations}", f"targets.cache={work / 'cache'}",
                f"schedule.prediction_steps={args.prediction_steps}",
                f"schedule.correction_steps={args.correction_steps}",
                "schedule.patches_per_pair=8", f"lddmm.jit={'true' if args.jit else 'false'}",
                "train.batch_size=2", f"train.learning_rate={args.learning_rate}",
                "train.checkpoint_every=100000", "train.image_every=100000"]
        config = resolve(method_defaults(loaded.method), None, parse_set(sets))
        t0 = time.perf_counter()
        data = loaded.method.data_source.open(work / "spec.yaml", config, 1)
        target_seconds = time.perf_counter() - t0
        print(f"targets: {target_seconds:.0f} s ({data.counts})", flush=True)
        t0 = time.perf_counter()
        model = train(loaded, config, data, work / "run", verbose=0).model
        training = {"target_seconds": target_seconds,
                    "train_seconds": time.perf_counter() - t0, "load_average_start": load,
                    "load_average_end": os.getloadavg()[0], "shape": list(shape),
                    "train_pairs": train_names}
        (work / "training.json").write_text(json.dumps(training, indent=2) + "\n")
        print(f"training: {training['train_seconds']:.0f} s", flush=True)
    test_dir = work / "test"
    test_dir.mkdir(exist_ok=True)
    test_pairs = _write_pairs(test_dir, test_names, shape)
    networks, shoot = model.get_layer("networks"), model.get_layer("shoot")
    predict_only = tf.function(lambda mov, fix: shoot(networks.whole_image(mov, fix))[1])
    full = tf.function(lambda mov, fix: model(loaded.method.io.model_inputs(config, fix, mov),
                                              training=False)["disp"])
    cfg = lddmm_config(config)
    load = os.getloadavg()[0]
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
    settings = {"features": int(config["model"]["features"]),
                "lddmm_iterations": int(config["lddmm"]["iterations"]),
                "lddmm_optimizer": config["lddmm"]["optimizer"],
                "prediction_steps": int(config["schedule"]["prediction_steps"]),
                "correction_steps": int(config["schedule"]["correction_steps"]),
                "learning_rate": float(config["train"]["learning_rate"])}
    print(f"\nQuicksilver vs LDDMM, {len(test_names)} unseen test pairs at {list(shape)}, "
          f"{len(train_names)} training pairs; evaluation load average {load:.1f} at the start, "
          f"{load_end:.1f} at the end, {os.cpu_count()} CPUs")
    if training:
        print(f"targets: {training['target_seconds']:.0f} s, training: "
              f"{training['train_seconds']:.0f} s")
    print(f"settings: {settings}")
    print(f"{'method':<24}{'Dice':>8}{'overlap':>9}{'total':>8}{'fold %':>8}{'s first':>9}"
          f"{'s next':>8}")
    for key, entry in summary.items():
        first = entry.get("seconds_first")
        rest = entry.get("seconds_rest")
        print(f"{key:<24}{entry['dice']:>8.3f}{entry['target_overlap']:>9.3f}"
              f"{entry['total_overlap']:>8.3f}{entry['folding_percent']:>8.2f}"
              f"{'' if first is None else f'{first:9.1f}'}"
              f"{'' if rest is None else f'{rest:8.1f}'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"shape": list(shape), "train_pairs": train_names, "test_pairs": test_names,
           **settings, "training": training, "evaluated_separately": bool(args.evaluate_run),
           "load_average_start": load, "load_average_end": load_end, "cpus": os.cpu_count(),
           "machine": platform.processor(), "per_pair": rows, "seconds": times,
           "summary": summary}
    (RESULTS / "bench_quicksilver.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
