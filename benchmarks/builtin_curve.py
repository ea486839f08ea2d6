"""Learning curve of a builtin-model training run on held-out label maps (docs/builtin-model.md).

Scores every checkpoint of a ``tfreg train`` run, the untrained network of its config (step 0)
and no registration (identity) on the same pairs synthesised from the validation maps (09 and
10 of ``benchmarks/builtin_maps.py``): both orders, ``--seeds`` draws of deformation and
contrast each. Dice: mean over the labels of the fixed map (background excluded) after a
nearest-neighbour warp of the moving labels, as ``val/dice``. Also reports the share of voxels
with a non-positive Jacobian determinant and the largest displacement.

Usage::

    python benchmarks/builtin_curve.py --run runs/builtin --data DIR/synthseg-aligned-corr.yaml

Results: a table on stdout and ``benchmarks/results/builtin_curve.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="training run folder")
    parser.add_argument("--data", required=True, help="the run's label-map data YAML")
    parser.add_argument("--seeds", type=int, default=4, help="draws per map order")
    parser.add_argument("--every", type=int, default=1, help="score every k-th checkpoint")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/builtin_curve.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from tfreg import metrics
    from tfreg.data.synth import LabelMapSource
    from tfreg.export import build_from_run
    from tfreg.layers import warp

    source = LabelMapSource.from_yaml(args.data)
    pairs = [batch for seed in range(args.seeds)
             for batch in source.dataset("val", seed=1000 + seed, shuffle=False, repeat=False)]
    run = Path(args.run)
    prefixes = sorted({p.with_suffix("").as_posix() for p in (run / "checkpoints").glob(
        "ckpt-*.index")}, key=lambda p: int(re.search(r"ckpt-(\d+)$", p).group(1)))
    prefixes = prefixes[::-1][::args.every][::-1]

    def score(model) -> dict:
        dice, folds, largest = [], [], []
        for b in pairs:
            if model is None:
                disp = tf.zeros((*b["fixed"].shape[:-1], source.ndims))
            else:
                disp = model({"moving": b["moving"], "fixed": b["fixed"]}, training=False)["disp"]
            warped = warp(tf.cast(b["moving_labels"], tf.float32), disp, interp="nearest")
            d = metrics.dice(b["fixed_labels"].numpy()[0, ..., 0],
                             warped.numpy()[0, ..., 0].astype(np.int32))
            dice.append(metrics.mean_dice(d))
            field = np.asarray(disp)[0]
            folds.append(float(metrics.folding_percent(field)))
            largest.append(float(np.abs(field).max()))
        return {"dice": float(np.mean(dice)), "dice_pairs": [round(x, 4) for x in dice],
                "folding_percent": float(np.mean(folds)), "max_disp": float(np.max(largest))}

    rows = [{"step": "identity", **score(None)}]
    loaded, model, config, _ = build_from_run(run, checkpoint=prefixes[0] if prefixes else None)
    fresh = loaded.method.build_model(config, source.shape)
    rows.append({"step": 0, **score(fresh)})
    for prefix in prefixes:
        t = time.time()
        _, model, _, _ = build_from_run(run, checkpoint=prefix)
        temp = [w for w in model.weights if "log_temperature" in w.path]
        rows.append({"step": int(prefix.rsplit("-", 1)[1]), **score(model),
                     "temperature": float(np.exp(temp[0].numpy())) if temp else None})
        print(f"  scored {prefix} in {time.time() - t:.1f} s", file=sys.stderr, flush=True)
    print(f"{len(pairs)} held-out pairs (maps 09/10, both orders, {args.seeds} draws): "
          f"{args.data}")
    print(f"| step | mean Dice | gain over identity | folding % | largest field (voxels) |")
    print("|---|---|---|---|---|")
    base = rows[0]["dice"]
    for row in rows:
        print(f"| {row['step']} | {row['dice']:.4f} | {row['dice'] - base:+.4f} | "
              f"{row['folding_percent']:.3f} | {row['max_disp']:.2f} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": str(run), "data": args.data, "pairs": len(pairs),
                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
