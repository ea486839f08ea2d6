"""The shipped model (`--model builtin`, `--init builtin`) against the default `tfreg register`
and ANTs SyN, side by side in one run, same contrast and T2-like to T1-like.

Pairs: the inter-subject recipe of `../shared/data/README.md` (`bench_contrasts.build_pair`:
SynthSeg label maps, 96x112x96, T1-like fixed image, T1-like and T2-like moving images). The
model was trained on maps 01-08 and validated on 09-10, so pairs 09-10 and 10-09 are held out;
pairs among 01-08 (e.g. 01-02) show anatomy the model was trained on (with other deformations
and intensities) and are reported separately.

Methods (per contrast; ``same``: T1 -> T1, ``t2``: T2 -> T1):

* ``before``: no registration;
* ``default``: `tfreg register` defaults (accurate preset, NCC);
* ``mind``: `tfreg register --similarity mind` (t2 only: the setting for different contrasts);
* ``init``: `tfreg register --init builtin` (affine stage, network, finest-level refinement, NCC);
* ``init_mind``: the same with `--similarity mind` (t2 only);
* ``model``: `tfreg register --model builtin` (the network alone);
* ``syn``: ANTs SyN with antspyx defaults (affine + SyN, Mattes mutual information), in the
  benchmark-only environment ``--ants-python`` (default /tmp/antsenv/bin/python; skipped with a
  note when it is missing).

tfreg runs in this process (compilation of each setting in the first pair's time: compare the
later pairs' times), ANTs in a subprocess with ITK threads = the CPU count.

Usage::

    python benchmarks/bench_builtin.py                          # pairs 09-10, 10-09, 01-02
    python benchmarks/bench_builtin.py --pairs 09-10 --contrasts t2 --methods before,init_mind
    python benchmarks/bench_builtin.py --pairs 09-10 --skip t2:default,t2:init   # MIND across contrasts

Results: a table on stdout and `benchmarks/results/bench_builtin.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_contrasts as bc  # noqa: E402  (pair recipe shared with that benchmark)
import bench_register as br  # noqa: E402

RESULTS = HERE / "results"
PAIRS = ["09-10", "10-09", "01-02"]
HELD_OUT = {"09-10", "10-09"}
CONTRASTS = {"same": "moving", "t2": "moving_t2"}
METHODS = {
    "before": "no registration",
    "default": "tfreg register (defaults: accurate preset, NCC)",
    "mind": "tfreg register --similarity mind",
    "init": "tfreg register --init builtin (NCC refinement)",
    "init_mind": "tfreg register --init builtin --similarity mind",
    "model": "tfreg register --model builtin (network alone)",
    "syn": "ANTs SyN, antspyx defaults (Mattes MI)",
}
T2_ONLY = {"mind", "init_mind"}


def dice_score(fixed_labels: np.ndarray, warped_labels: np.ndarray, moving_labels: np.ndarray
               ) -> float:
    """Mean Dice over the labels present in both original maps (background excluded)."""
    from tfreg import metrics

    labels = sorted((set(np.unique(fixed_labels)) & set(np.unique(moving_labels))) - {0})
    values = metrics.dice(fixed_labels, warped_labels, labels=labels)
    return float(np.nanmean(list(values.values())))


def run_tfreg(pair: dict, moving_key: str, method: str) -> dict:
    from tfreg import builtin, instance
    from tfreg.io import Volume
    from tfreg.metrics import folding_percent
    from tfreg.register import register_volumes
    from tfreg.synthetic import warp_numpy

    similarity = "mind" if method in ("mind", "init_mind") else "ncc"
    cfg = instance.make_config("accurate", similarity=similarity)
    kwargs: dict = {}
    if method in ("init", "init_mind"):
        kwargs = dict(model=builtin.verify(), model_init=True,
                      finetune=builtin.refine_steps(cfg))
    elif method == "model":
        kwargs = dict(model=builtin.verify())
    affine = np.diag(list(pair["spacing"]) + [1.0])
    t0 = time.perf_counter()
    result = register_volumes(Volume(pair["fixed"], affine, path="fixed"),
                              Volume(pair[moving_key], affine, path="moving"), config=cfg,
                              **kwargs)
    wall = time.perf_counter() - t0
    warped = warp_numpy(pair["moving_labels"], result.disp, order=0)
    return {"dice": dice_score(pair["fixed_labels"], warped, pair["moving_labels"]),
            "seconds": result.report["runtime_seconds"], "wall": wall,
            "folding": float(folding_percent(result.disp)),
            "warnings": result.report.get("warnings", [])}


def run_ants(pair: dict, moving_key: str, python: str, timeout: float) -> dict:
    """ANTs SyN (antspyx defaults) in the benchmark-only environment `python`."""
    if not Path(python).exists():
        return {"error": f"{python}: not found (ANTs not installed)"}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "pair.npz", Path(tmp) / "out.npz"
        np.savez(src, spacing=np.asarray(pair["spacing"]), fixed=pair["fixed"],
                 moving=pair[moving_key], moving_labels=pair["moving_labels"])
        env = dict(os.environ)
        env.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(os.cpu_count() or 1))
        try:
            proc = subprocess.run([python, "-c", bc._ANTS_CODE, str(src), str(dst)], env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as err:
            return {"error": f"{type(err).__name__}: {err}"[:300]}
        if proc.returncode != 0 or not dst.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": tail[0][:300]}
        info = json.loads(Path(str(dst) + ".json").read_text())
        warped = np.load(dst)["warped_labels"]
        return {"dice": dice_score(pair["fixed_labels"], warped, pair["moving_labels"]), **info}


def _fmt(value, digits=3) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def summarise(rows: dict, pairs: list[str], contrasts: list[str], methods: list[str]) -> dict:
    """Mean Dice and seconds per (pair group, contrast, method); group = held_out | trained."""
    out: dict = {}
    groups = {"held_out": [p for p in pairs if p in HELD_OUT],
              "trained": [p for p in pairs if p not in HELD_OUT]}
    for group, names in groups.items():
        for contrast in contrasts:
            for method in methods:
                cells = [rows[p][contrast].get(method) for p in names]
                cells = [c for c in cells if c and "dice" in c]
                if not cells:
                    continue
                secs = [c["seconds"] for c in cells if c.get("seconds") is not None]
                later = [c["seconds"] for c in cells[1:] if c.get("seconds") is not None]
                out.setdefault(group, {}).setdefault(contrast, {})[method] = {
                    "pairs": len(cells),
                    "mean_dice": float(np.mean([c["dice"] for c in cells])),
                    "mean_seconds": float(np.mean(secs)) if secs else None,
                    "mean_seconds_after_first": float(np.mean(later)) if later else None,
                    "pairs_warned": int(sum(bool(c.get("warnings")) for c in cells))}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--contrasts", default=",".join(CONTRASTS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ants-python",
                        default=os.environ.get("TFREG_ANTS_PYTHON", "/tmp/antsenv/bin/python"))
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--skip", default="",
                        help="contrast:method cells to leave out, e.g. t2:default,t2:init")
    parser.add_argument("--json", default=str(RESULTS / "bench_builtin.json"))
    args = parser.parse_args(argv)
    pairs = [p for p in args.pairs.split(",") if p]
    contrasts = [c for c in args.contrasts.split(",") if c]
    methods = [m for m in args.methods.split(",") if m]
    unknown = (set(methods) - set(METHODS)) | (set(contrasts) - set(CONTRASTS))
    if unknown:
        parser.error(f"unknown method(s)/contrast(s) {', '.join(sorted(unknown))}")
    skip = {tuple(c.split(":", 1)) for c in args.skip.split(",") if c}
    if any(len(c) != 2 or c[0] not in CONTRASTS or c[1] not in METHODS for c in skip):
        parser.error(f"--skip {args.skip}: expected contrast:method cells, e.g. t2:default")
    from tfreg import builtin

    results: dict = {
        "benchmark": "bench_builtin", "machine": br._machine(),
        "builtin_version": builtin.version(),
        "conditions": f"{os.environ.get('TFREG_BENCH_CONDITIONS', 'shared, loaded 2-core CPU')}; tfreg in one process (compilation in the first "
                      "pair's time), ANTs in a subprocess; times are wall seconds of "
                      "register_volumes (report runtime_seconds) and of ants.registration",
        "methods": {m: METHODS[m] for m in methods}, "held_out_pairs": sorted(HELD_OUT)}
    rows: dict = {}
    for name in pairs:
        pair = bc.build_pair(name)
        rows[name] = {}
        for contrast in contrasts:
            rows[name][contrast] = {}
            for method in methods:
                if (method in T2_ONLY and contrast != "t2") or (contrast, method) in skip:
                    continue
                key = CONTRASTS[contrast]
                if method == "before":
                    row = {"dice": dice_score(pair["fixed_labels"], pair["moving_labels"],
                                              pair["moving_labels"])}
                elif method == "syn":
                    row = run_ants(pair, key, args.ants_python, args.timeout)
                else:
                    row = run_tfreg(pair, key, method)
                rows[name][contrast][method] = row
                _write(args.json, {**results, "pairs": rows, "complete": False})
                print(f"{name} {contrast:<4} {method:<9} dice {_fmt(row.get('dice'))} "
                      f"{_fmt(row.get('seconds'), 1):>6} s"
                      f"{'  ' + row['error'] if 'error' in row else ''}", flush=True)
    results["pairs"] = rows
    results["complete"] = True
    results["summary"] = summarise(rows, pairs, contrasts, methods)
    print(f"\n{'pairs':<9}{'contrast':<9}{'method':<10}{'n':>2}{'mean Dice':>10}{'s/pair':>8}"
          f"{'s (2nd+)':>9}{'warned':>7}")
    for group, by_contrast in results["summary"].items():
        for contrast, by_method in by_contrast.items():
            for method, row in by_method.items():
                print(f"{group:<9}{contrast:<9}{method:<10}{row['pairs']:>2}"
                      f"{_fmt(row['mean_dice']):>10}{_fmt(row['mean_seconds'], 1):>8}"
                      f"{_fmt(row['mean_seconds_after_first'], 1):>9}{row['pairs_warned']:>7}")
    print(f"wrote {_write(args.json, results)}")
    return 0


def _write(path: str, results: dict) -> Path:
    """Write the results atomically (after every row too, so a stopped run keeps its rows)."""
    from tfreg.io import atomic_path

    target = Path(path)
    with atomic_path(target, suffix=".json") as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=float) + "\n")
    return target


if __name__ == "__main__":
    sys.exit(main())
