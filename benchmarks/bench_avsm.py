"""AVSM benchmark: training step time and peak memory next to VoxelMorph and LapIRN, inference time,
and Dice on the shared inter-subject pairs after a short training run.

Every measurement runs in a fresh process (its peak RSS is its own):

* ``avsm:affine``: one step of the ``affine_multi`` stage (3-step affine chain, symmetric batch);
* ``avsm:vsvf``: one step of the ``vsvf_sym`` stage (frozen 7-step affine, two vSVF steps with 10
  RK4 steps each, mk-LNCC, inverse consistency; the (s, t), (t, s) batch holds 2 pairs);
* ``avsm:infer``: the exported graph's one-pass registration (7-step affine + 2 vSVF steps);
* ``voxelmorph:train`` / ``voxelmorph:infer``, ``lapirn:level3`` / ``lapirn:infer``: the same for the
  other methods with their default configs;
* ``avsm:dice`` (only with ``--dice``): trains ``avsm`` for ``--train-steps`` steps per stage on
  SynthSeg pairs other than the six evaluation pairs (recipe of ``bench_register.py`` and
  ``../shared/data/README.md``), then registers the six pairs and reports mean Dice of the affine
  part and of the full method.

Training: ``--warmup`` steps (tracing) are excluded; seconds per step over the next ``--steps``
steps, batch 1 (a symmetric avsm batch computes 2 pairs). Inference: median of ``--repeats`` calls
after one warm-up call. Inputs are random volumes (timing does not depend on content).

Usage::

    python benchmarks/bench_avsm.py                              # 96x112x96, CPU
    python benchmarks/bench_avsm.py --items avsm:vsvf,avsm:infer --steps 2
    python benchmarks/bench_avsm.py --dice --train-steps 200      # + the short training run
    python benchmarks/bench_avsm.py --items avsm:vsvf --no-symmetric   # one pair per batch

Results: a table on stdout and ``benchmarks/results/bench_avsm.json`` (``--json`` to change).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import machine, peak_rss_gib, run_worker, shape_arg, write_report

HERE = Path(__file__).resolve().parent
ITEMS = ("avsm:affine", "avsm:vsvf", "avsm:infer", "voxelmorph:train", "voxelmorph:infer",
         "lapirn:level3", "lapirn:infer")
#: avsm stage -> its ``schedule:`` key
AVSM_STAGES = {"affine_ncc": "affine_ncc_steps", "affine_task": "affine_task_steps",
               "affine_sym": "affine_sym_steps", "affine_multi": "affine_multi_steps",
               "vsvf": "vsvf_one_steps", "vsvf_two": "vsvf_two_steps", "vsvf_sym": "vsvf_sym_steps"}
EVAL_PAIRS = ("01-02", "03-04", "05-06", "02-03", "04-05", "06-01")



def _with_data(method, pairs: list[dict], symmetric: bool):
    """`method` reading in-memory pairs (cycled, shuffled), doubled as (s, t), (t, s) if asked."""
    import dataclasses

    import numpy as np
    import tensorflow as tf

    from tfreg import registry

    fixed = np.stack([p["fixed"][..., None] for p in pairs])
    moving = np.stack([p["moving"][..., None] for p in pairs])

    def dataset(data, config=None, *, split="train", batch_size=1, seed=0, shuffle=True, repeat=True,
                input_context=None):
        ds = tf.data.Dataset.from_tensor_slices({"fixed": fixed, "moving": moving})
        ds = ds.shuffle(len(pairs), seed=seed).repeat().batch(batch_size, drop_remainder=True)
        if symmetric:
            from tfreg_plugins.avsm.losses import symmetric_batch
            ds = ds.map(symmetric_batch)
        return ds.prefetch(1)

    if hasattr(registry, "DataSource"):
        source = registry.DataSource(open=lambda path, config, div: None, dataset=dataset,
                                     inshape=lambda data: tuple(fixed.shape[1:-1]))
        return dataclasses.replace(method, data=source)
    return dataclasses.replace(method, data_pipeline=dataset)


def _train(method_name: str, sets: dict, pairs: list[dict]):
    from tfreg.config import method_defaults, resolve
    from tfreg.engine import train
    from tfreg.registry import discover

    loaded = discover().get(method_name)
    config = resolve(method_defaults(loaded.method), sets, None)
    symmetric = method_name == "avsm" and (sets.get("loss") or {}).get("symmetric", True)
    method = _with_data(loaded.method, pairs, symmetric=symmetric)
    with tempfile.TemporaryDirectory() as run_dir:
        return train(method, config, None, run_dir, verbose=0), config


def _random_pairs(shape, n=1):
    import numpy as np

    rng = np.random.default_rng(0)
    return [{k: rng.random(shape).astype("float32") for k in ("fixed", "moving")} for _ in range(n)]


def _only(stage: str, total: int) -> dict:
    return {key: (total if name == stage else 0) for name, key in AVSM_STAGES.items()}


def worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import tensorflow as tf

    if args.device == "cpu":
        tf.config.set_visible_devices([], "GPU")
    from tfreg.config import method_defaults
    from tfreg.registry import discover

    method_name, what = args.worker.split(":")
    shape = shape_arg(args.shape)
    out = {"item": args.worker, "shape": list(shape)}
    never = {"checkpoint_every": 10**6, "log_every": 10**6, "image_every": 10**6, "val_pairs": 0}
    if what == "dice":
        out.update(_dice(args, shape, never))
    elif what == "infer":
        loaded = discover().get(method_name)
        model = loaded.method.build_model(method_defaults(loaded.method), shape)
        pair = _random_pairs((1, *shape, 1))[0]

        @tf.function
        def register(fixed, moving):
            result = model({"fixed": fixed, "moving": moving}, training=False)
            return result["warped"], result["disp"]

        start = time.perf_counter()
        _ = [t.numpy() for t in register(pair["fixed"], pair["moving"])]
        out["first_call_s"] = round(time.perf_counter() - start, 3)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            _ = [t.numpy() for t in register(pair["fixed"], pair["moving"])]
            times.append(time.perf_counter() - start)
        out["infer_s"] = round(float(np.median(times)), 4)
    else:
        total = args.warmup + args.steps
        sets: dict = {"train": dict(never)}
        if method_name == "avsm":
            sets["schedule"] = _only("affine_multi" if what == "affine" else "vsvf_sym", total)
            if args.no_symmetric:
                sets["loss"] = {"symmetric": False}
        elif method_name == "lapirn":
            sets["schedule"] = {"level1_steps": 0, "level2_steps": 0, "level3_steps": total,
                                "freeze_steps": 0}
        else:
            sets["train"]["steps"] = total
        result, _ = _train(method_name, sets, _random_pairs(shape))
        times = [h["time"] for h in result.history]
        sec = (times[-1] - times[args.warmup - 1]) / args.steps
        out.update({"first_step_s": round(times[0], 3), "sec_per_step": round(sec, 4)})
    out["peak_rss_gb"] = round(peak_rss_gib(), 2)
    if tf.config.list_physical_devices("GPU"):
        out["peak_gpu_gb"] = round(tf.config.experimental.get_memory_info("GPU:0")["peak"]
                                   / 2**30, 2)
    return out


def _dice(args, shape, never) -> dict:
    """Short training on SynthSeg pairs outside the evaluation set, then Dice on the six pairs."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from bench_register import build_pair, score

    from tfreg.layers import affine_to_disp
    from tfreg.synthetic import warp_numpy

    ids = [f"{i:02d}" for i in range(1, 11)]
    held = {tuple(p.split("-")) for p in EVAL_PAIRS}
    train_ids = [(a, b) for a in ids for b in ids if a != b and (a, b) not in held][::6]
    pairs = [build_pair(a, b, shape, seed=k) for k, (a, b) in enumerate(train_ids)]
    n = args.train_steps
    sets = {"train": dict(never), "schedule": {
        "affine_ncc_steps": n // 4, "affine_task_steps": n // 4, "affine_sym_steps": n // 4,
        "affine_multi_steps": n // 4, "vsvf_one_steps": n // 2, "vsvf_two_steps": n // 4,
        "vsvf_sym_steps": n // 4}, "loss": {"affine_reg_epoch": max(n // 40, 1)}}
    start = time.perf_counter()
    result, _ = _train("avsm", sets, pairs)
    train_s = time.perf_counter() - start
    rows = []
    for name in EVAL_PAIRS:
        pair = build_pair(*name.split("-"), shape)
        res = result.model({"fixed": pair["fixed"][None, ..., None],
                            "moving": pair["moving"][None, ..., None]}, training=False)
        aff = affine_to_disp(res["affine"], shape).numpy()[0]
        disp = res["disp"].numpy()[0]
        rows.append({"pair": name,
                     "identity": score(pair, pair["moving_labels"], None)["dice"],
                     "affine": score(pair, warp_numpy(pair["moving_labels"], aff, order=0),
                                     None)["dice"],
                     "avsm": score(pair, warp_numpy(pair["moving_labels"], disp, order=0),
                                   disp)["dice"]})
    return {"train_pairs": len(pairs), "train_steps": int(result.step),
            "train_s": round(train_s, 1), "pairs": rows,
            **{k: round(float(np.mean([r[k] for r in rows])), 4)
               for k in ("identity", "affine", "avsm")}}


def _run_item(item: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", item, "--shape", args.shape, "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--device", args.device, "--train-steps", str(args.train_steps)]
    if args.no_symmetric:
        cmd.append("--no-symmetric")
    row = run_worker(cmd)
    return {"item": item, **row} if "error" in row else row


def _table(rows: list[dict]) -> str:
    head = f"{'item':<18} {'s/step':>8} {'infer s':>8} {'first s':>8} {'RSS GB':>7} {'Dice':>22}"
    out = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"{r['item']:<18} error: {r['error'][:100]}")
            continue
        first = r.get("first_step_s", r.get("first_call_s", ""))
        dice = (f"id {r['identity']:.3f} aff {r['affine']:.3f} avsm {r['avsm']:.3f}"
                if "avsm" in r else "")
        out.append(f"{r['item']:<18} {r.get('sec_per_step', ''):>8} {r.get('infer_s', ''):>8} "
                   f"{first:>8} {r.get('peak_rss_gb', ''):>7} {dice:>22}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="96x112x96")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per item")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first training steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed inference calls")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--items", default=",".join(ITEMS))
    parser.add_argument("--dice", action="store_true", help="also the short training + Dice run")
    parser.add_argument("--train-steps", type=int, default=200,
                        help="--dice: steps of the affine stages together (the vSVF stages "
                             "get as many)")
    parser.add_argument("--no-symmetric", action="store_true",
                        help="avsm training items with loss.symmetric: false (one pair per "
                             "batch, no symmetry or inverse-consistency terms)")
    parser.add_argument("--json", default=str(HERE / "results" / "bench_avsm.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.train_steps < 8:
        parser.error("--warmup, --steps must be >= 1 and --train-steps >= 8")
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    items = [i for i in args.items.split(",") if i]
    unknown = [i for i in items if i not in ITEMS]
    if unknown:
        parser.error(f"unknown item {unknown[0]!r}; choose from {', '.join(ITEMS)}")
    if args.dice:
        items.append("avsm:dice")
    path = Path(args.json)
    result = {"benchmark": "bench_avsm", "shape": list(shape_arg(args.shape)),
              "device_setting": args.device, "steps": args.steps, "warmup": args.warmup,
              "repeats": args.repeats, "symmetric": not args.no_symmetric, "machine": machine(),
              "results": []}
    rows = result["results"]
    for item in items:
        start = time.perf_counter()
        row = _run_item(item, args)
        row["wall_s"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(f"{item}: done in {row['wall_s']} s", file=sys.stderr, flush=True)
        write_report(path, result, quiet=True)  # after every item: a long run keeps what it measured
    print(_table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
