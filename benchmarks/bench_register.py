"""Pairwise registration benchmark: `tfreg register` (no model) against ANTs SyN, side by side.

Pairs are built from real anatomy (the SynthSeg training label maps) with a synthetic T1-like
intensity, following the recipe in `../shared/data/README.md`:

* drop labels >= 500, crop both maps of a pair to the union bounding box of the brain, resample to
  96x112x96 (nearest neighbour, voxel sizes recorded in the affine, in mm);
* intensity of each label = mean intensity of that label in the voxelmorph sample subject
  (FreeSurfer aseg), Gaussian blur sigma 0.7 voxel, Gaussian noise sigma 0.01;
* Dice over the labels present in both maps, HD95 in mm, %folding of the displacement field.

Times are registration only: arrays already in memory, no file I/O, no interpreter start, but
including TensorFlow tracing and XLA compilation. Every registration runs in a fresh process, so
nothing compiled for an earlier pair is reused. For tfreg the time is the `runtime_seconds` it
reports (resampling check, normalisation, compilation, optimisation, warping; not the regularity
metrics computed afterwards); the CPU seconds cover the whole call.

ANTs (antspyx, a benchmark-only dependency: `pip install antspyx`) is run with its defaults
(`type_of_transform="SyN"`) and with `reg_iterations=(100, 70, 50)`.

Usage::

    python benchmarks/bench_register.py                 # six pairs; tfreg x2, ANTs x2
    python benchmarks/bench_register.py --pairs 01-02 --methods fast,syn
    python benchmarks/bench_register.py --oasis         # also the real OASIS pair

Results: a table on stdout and `benchmarks/results/bench_register.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
PAIRS = ["01-02", "03-04", "05-06", "02-03", "04-05", "06-01"]
SHAPE = (96, 112, 96)
METHODS = {
    "accurate": "tfreg register, --preset accurate (default)",
    "fast": "tfreg register --preset fast",
    "syn": "ANTs SyN, antspyx defaults",
    "syn100": "ANTs SyN, reg_iterations=(100, 70, 50)",
}


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def label_intensities() -> dict[int, float]:
    """Mean intensity of each FreeSurfer label in the voxelmorph sample subject (T1, [0, 1])."""
    scan = np.load(DATA / "voxelmorph_subject" / "test_scan.npz")
    vol, seg = scan["vol"].astype(np.float64), scan["seg"].astype(np.int64)
    sums = np.bincount(seg.ravel(), weights=vol.ravel())
    counts = np.bincount(seg.ravel())
    return {int(lab): float(sums[lab] / counts[lab]) for lab in np.nonzero(counts)[0]}


def load_label_map(index: str) -> tuple[np.ndarray, np.ndarray]:
    """SynthSeg label map `training_seg_<index>`, labels >= 500 set to 0: (labels, affine)."""
    import nibabel as nib

    img = nib.load(DATA / "synthseg_label_maps" / f"training_seg_{index}.nii.gz")
    labels = np.asarray(img.dataobj).astype(np.int32)
    labels[labels >= 500] = 0
    return labels, img.affine


def build_pair(fixed_id: str, moving_id: str, shape=SHAPE, seed: int = 0) -> dict:
    """Fixed and moving image/label arrays for one benchmark pair, on one 96x112x96 grid.

    Returns:
        dict with `fixed`, `moving` (float32 `shape`), `fixed_labels`, `moving_labels` (int32) and
        `spacing` (mm per voxel along each array axis of the resampled grid).
    """
    from scipy import ndimage

    lut = label_intensities()
    maps = [load_label_map(i)[0] for i in (fixed_id, moving_id)]
    lo = np.min([np.min(np.nonzero(m), axis=1) for m in maps], axis=0)
    hi = np.max([np.max(np.nonzero(m), axis=1) for m in maps], axis=0) + 1
    extent = hi - lo
    out = {"spacing": tuple(float(e / s) for e, s in zip(extent, shape))}
    rng = np.random.default_rng(seed)
    for name, m in zip(("fixed", "moving"), maps):
        crop = m[tuple(slice(a, b) for a, b in zip(lo, hi))]
        # nearest-neighbour resampling of voxel centres to the target grid
        idx = [np.minimum(((np.arange(s) + 0.5) * e / s).astype(int), e - 1)
               for s, e in zip(shape, extent)]
        labels = crop[np.ix_(*idx)].astype(np.int32)
        known = np.array(sorted(lut))
        table = np.zeros(int(labels.max()) + 1, np.float32)
        for lab in np.unique(labels):
            # labels absent from the reference subject get the intensity of the nearest label id
            table[lab] = lut.get(int(lab), lut[int(known[np.argmin(np.abs(known - lab))])])
        image = ndimage.gaussian_filter(table[labels], 0.7)
        image = image + 0.01 * rng.normal(size=shape)
        out[name] = np.clip(image, 0, 1).astype(np.float32)
        out[name + "_labels"] = labels
    return out


def load_oasis() -> dict:
    """The real OASIS pair (A fixed, B moving): images in [0, 1], 2-class label maps, 1 mm RAS."""
    import nibabel as nib

    base = DATA / "oasis_pair"
    out = {"spacing": (1.0, 1.0, 1.0)}
    for name, letter in (("fixed", "A"), ("moving", "B")):
        out[name] = np.asarray(nib.load(base / f"image_{letter}_160x192x144.nii.gz").dataobj,
                               dtype=np.float32)
        out[name + "_labels"] = np.asarray(
            nib.load(base / f"image_{letter}_160x192x144_seg.nii.gz").dataobj).astype(np.int32)
    return out


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------
def score(pair: dict, warped_labels: np.ndarray, disp: np.ndarray | None) -> dict:
    """Mean Dice over labels present in both maps, mean HD95 (mm), %folding of `disp`."""
    from tfreg import metrics

    fixed_l, moving_l = pair["fixed_labels"], pair["moving_labels"]
    labels = sorted((set(np.unique(fixed_l)) & set(np.unique(moving_l))) - {0})
    dice = metrics.dice(fixed_l, warped_labels, labels=labels)
    hd = metrics.hd95(fixed_l, warped_labels, spacing=pair["spacing"], labels=labels)
    hd_values = [v for v in hd.values() if np.isfinite(v)]
    result = {"dice": float(np.nanmean(list(dice.values()))),
              "hd95": float(np.mean(hd_values)) if hd_values else float("nan")}
    if disp is not None:
        result["folding"] = float(metrics.folding_percent(disp))
        result["sdlogj"] = float(metrics.sdlogj(disp))
    return result


def ncc_global(a: np.ndarray, b: np.ndarray) -> float:
    """Global normalised cross-correlation of two images."""
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


# ----------------------------------------------------------------------------------------------
# workers (one fresh process per pair and method: nothing compiled or cached is shared)
# ----------------------------------------------------------------------------------------------
def _worker_tfreg(pair: dict, preset: str) -> dict:
    from tfreg import instance
    from tfreg.io import Volume
    from tfreg.register import register_volumes

    affine = np.diag(list(pair["spacing"]) + [1.0])
    fixed = Volume(pair["fixed"], affine, path="fixed")
    moving = Volume(pair["moving"], affine, path="moving")
    cfg = instance.make_config(preset)
    t0, c0 = time.perf_counter(), time.process_time()
    result = register_volumes(fixed, moving, config=cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # tfreg's reported runtime: resampling check, normalisation, tracing + XLA compilation,
    # optimisation, warping; not the regularity metrics computed afterwards (`wall` has them)
    seconds = result.report["runtime_seconds"]
    from tfreg.synthetic import warp_numpy

    warped_labels = warp_numpy(pair["moving_labels"], result.disp, order=0)
    out = score(pair, warped_labels, result.disp)
    out.update(seconds=seconds, cpu_seconds=cpu, wall_with_metrics=wall,
               ncc_after=ncc_global(pair["fixed"], result.warped),
               stages=result.report.get("stage_seconds"))
    return out


def _worker_ants(pair: dict, iterations: tuple[int, ...] | None) -> dict:
    import ants

    spacing = tuple(pair["spacing"])
    fixed = ants.from_numpy(pair["fixed"], spacing=spacing)
    moving = ants.from_numpy(pair["moving"], spacing=spacing)
    kwargs = {} if iterations is None else {"reg_iterations": iterations}
    t0, c0 = time.perf_counter(), time.process_time()
    reg = ants.registration(fixed, moving, type_of_transform="SyN", **kwargs)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    labels = ants.from_numpy(pair["moving_labels"].astype(np.float32), spacing=spacing)
    warped_labels = ants.apply_transforms(fixed, labels, reg["fwdtransforms"],
                                          interpolator="nearestNeighbor").numpy()
    out = score(pair, np.rint(warped_labels).astype(np.int32), None)
    # %folding of ANTs' deformable part (its Jacobian determinant image, physical space)
    jac = ants.create_jacobian_determinant_image(fixed, reg["fwdtransforms"][0]).numpy()
    out.update(folding=float(100.0 * np.mean(jac <= 0)), seconds=seconds, cpu_seconds=cpu,
               ncc_after=ncc_global(pair["fixed"], reg["warpedmovout"].numpy()))
    return out


def worker(method: str, pair_file: str, out_file: str) -> None:
    """Register one pair with one method and write the scores as JSON."""
    data = np.load(pair_file)
    pair = {k: data[k] for k in data.files}
    pair["spacing"] = tuple(float(s) for s in pair["spacing"])
    if method in ("accurate", "fast"):
        out = _worker_tfreg(pair, method)
    elif method == "syn":
        out = _worker_ants(pair, None)
    elif method == "syn100":
        out = _worker_ants(pair, (100, 70, 50))
    else:
        raise SystemExit(f"unknown method {method!r}")
    out["ncc_before"] = ncc_global(pair["fixed"], pair["moving"])
    Path(out_file).write_text(json.dumps(out))


def _run_worker(method: str, pair_file: Path, timeout: float) -> dict:
    out_file = pair_file.with_suffix(f".{method}.json")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(os.cpu_count() or 1))
    cmd = [sys.executable, __file__, "--worker", method, str(pair_file), str(out_file)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0 or not out_file.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0][:300]}
    return json.loads(out_file.read_text())


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    import tempfile

    path = Path(tempfile.gettempdir()) / "tfreg-bench-register"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pair_file(name: str) -> Path:
    """Build (once) and cache the arrays of a benchmark pair as .npz in the temp folder."""
    path = _cache_dir() / f"pair_{name}.npz"
    if not path.exists():
        if name == "oasis":
            pair = load_oasis()
        else:
            pair = build_pair(*name.split("-"))
        arrays = {k: v for k, v in pair.items() if k != "spacing"}
        np.savez_compressed(path, spacing=np.asarray(pair["spacing"]), **arrays)
    return path


def _fmt(value, digits=3) -> str:
    return "   -  " if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default=",".join(PAIRS),
                        help="comma-separated pairs 'fixed-moving' (default: the six pairs)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--oasis", action="store_true", help="also the real OASIS pair")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per registration")
    parser.add_argument("--out", default=str(RESULTS / "bench_register.json"))
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "PAIR", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    if not (DATA / "synthseg_label_maps").is_dir():
        print(f"skipped: benchmark data not found at {DATA} (needs ../shared/data)")
        return 0
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    pairs = [p for p in args.pairs.split(",") if p] + (["oasis"] if args.oasis else [])
    results: dict = {"machine": _machine(), "methods": {m: METHODS[m] for m in methods},
                     "pairs": {}}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    header = f"{'pair':<8}{'method':<10}{'Dice':>7}{'HD95':>8}{'fold%':>8}{'time s':>8}{'cpu s':>8}"
    print(header)
    for name in pairs:
        pair_file = _pair_file(name)
        data = np.load(pair_file)
        pair = {k: data[k] for k in data.files}
        pair["spacing"] = tuple(float(s) for s in pair["spacing"])
        before = score(pair, pair["moving_labels"], None)
        entry = {"before": {**before, "ncc": ncc_global(pair["fixed"], pair["moving"])}}
        print(f"{name:<8}{'before':<10}{_fmt(before['dice']):>7}{_fmt(before['hd95'], 2):>8}")
        for method in methods:
            res = _run_worker(method, pair_file, args.timeout)
            entry[method] = res
            if "error" in res:
                print(f"{name:<8}{method:<10} error: {res['error']}")
            else:
                print(f"{name:<8}{method:<10}{_fmt(res['dice']):>7}{_fmt(res['hd95'], 2):>8}"
                      f"{_fmt(res.get('folding'), 3):>8}{res['seconds']:>8.1f}"
                      f"{res['cpu_seconds']:>8.1f}", flush=True)
        results["pairs"][name] = entry
        results["averages"] = _averages(results["pairs"], methods)
        out_path.write_text(json.dumps(results, indent=1) + "\n")
    print("\naverage over the six inter-subject pairs")
    for method, avg in results["averages"].items():
        print(f"{method:<10}Dice {_fmt(avg['dice'])}  HD95 {_fmt(avg['hd95'], 2)}  "
              f"folding {_fmt(avg.get('folding'), 3)}%  time {_fmt(avg.get('seconds'), 1)} s "
              f"(n={avg['n']})")
    print(f"\nwrote {out_path}")
    return 0


def _averages(pairs: dict, methods: list[str]) -> dict:
    out = {}
    for method in ["before"] + methods:
        rows = [p[method] for name, p in pairs.items()
                if name != "oasis" and method in p and "error" not in p[method]]
        if not rows:
            continue
        avg = {"n": len(rows)}
        for key in ("dice", "hd95", "folding", "seconds", "cpu_seconds"):
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                avg[key] = float(np.mean(vals))
        out[method] = avg
    return out


def _machine() -> dict:
    import platform

    info = {"cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "python": platform.python_version()}
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    for module in ("tensorflow", "ants", "tfreg"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - optional
            info[module] = None
    return info


if __name__ == "__main__":
    sys.exit(main())
