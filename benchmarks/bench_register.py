"""Pairwise registration benchmark: `tfreg register` (no model) against ANTs, side by side.

Every registration is one command in a fresh process, run on NIfTI files, timed twice: the
registration alone (tfreg's reported `runtime_seconds`; ANTs' `ants.registration` call) and the
whole command from start to exit (interpreter, imports, file I/O; `/usr/bin/time`, which also
gives the peak memory). Scores are computed afterwards from the written outputs, the same way for
every method: Dice and HD95 (mm) over the labels present in both label maps, %folding, SDlogJ and
NDV of the displacement (for ANTs its deformable warp: the affine part only adds a constant to
log det J), global NCC of the warped image.

Pairs:

* ``01-02`` ... (six): inter-subject pairs built from real anatomy (the SynthSeg label maps) with
  a synthetic T1-like intensity, following the recipe in `../shared/data/README.md`: drop labels
  >= 500, crop both maps to the union bounding box of the brain, resample to 96x112x96 (nearest
  neighbour), intensity of each label = its mean in the voxelmorph sample subject, Gaussian blur
  0.7 voxel, noise 0.01;
* ``oasis``: the real OASIS pair (A fixed, B moving; 160x192x144, 1 mm; 2 coarse classes);
* ``vxm-mni`` / ``mni-vxm``: the voxelmorph sample subject (160x192x224, FreeSurfer LIA grid)
  and the MNI152 2009a symmetric template (197x233x189, RAS), each way round, on their own grids;
  tissue labels GM = 1, WM = 2: the template's from its GM/WM probability maps (the larger one,
  where it exceeds 0.5), the subject's from its aseg (cortex, cerebellar cortex and deep grey
  nuclei -> GM; cerebral and cerebellar white matter and brainstem -> WM).

Methods: tfreg's presets (``accurate``, ``fast``, ``best``) through the `tfreg register` command;
ANTs through antspyx in its own environment (a benchmark-only dependency:
``python -m venv /tmp/antsenv && /tmp/antsenv/bin/pip install antspyx nibabel numpy``, see
``--ants-python``): ``syn`` (antspyx defaults, ``type_of_transform="SyN"``), ``syn100``
(``reg_iterations=(100, 70, 50)``) and ``syns`` (``"antsRegistrationSyN[s]"``, the
antsRegistrationSyN.sh recipe: rigid + affine with MI, then symmetric SyN with CC radius 4, four
levels 8/4/2/1 with 100x70x50x20 iterations). Both tools get the same thread count (``--threads``,
default 2: ``TF_NUM_INTRAOP_THREADS``/``TF_NUM_INTEROP_THREADS`` for TensorFlow,
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` for ANTs).

Usage::

    python benchmarks/bench_register.py --pairs 01-02,03-04 --methods accurate,best,syn,syn100,syns
    python benchmarks/bench_register.py --pairs oasis,vxm-mni,mni-vxm --methods accurate,best,syn

Results: a table on stdout and `benchmarks/results/bench_register.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
REAL_PAIRS = ["oasis", "vxm-mni", "mni-vxm"]
SHAPE = (96, 112, 96)
TFREG_METHODS = {
    "accurate": "tfreg register --preset accurate (default)",
    "fast": "tfreg register --preset fast",
    "best": "tfreg register --preset best",
}
ANTS_METHODS = {
    "syn": ("ANTs SyN, antspyx defaults", {"type_of_transform": "SyN"}),
    "syn100": ("ANTs SyN, reg_iterations=(100, 70, 50)",
               {"type_of_transform": "SyN", "reg_iterations": (100, 70, 50)}),
    "syns": ("ANTs antsRegistrationSyN[s] (rigid + affine + SyN, CC 4, 100x70x50x20)",
             {"type_of_transform": "antsRegistrationSyN[s]"}),
}
METHODS = {**TFREG_METHODS, **{k: v[0] for k, v in ANTS_METHODS.items()}}
#: FreeSurfer aseg labels -> tissue class (1 grey matter, 2 white matter) for the template pairs.
ASEG_GM = (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58, 28, 60)
ASEG_WM = (2, 41, 7, 46, 16)


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
    """The real OASIS pair (A fixed, B moving): images in [0, 1], 2-class label maps, 1 mm RAS
    (the image header; A's label map has a slightly wrong one)."""
    import nibabel as nib

    base = DATA / "oasis_pair"
    out = {}
    for name, letter in (("fixed", "A"), ("moving", "B")):
        img = nib.load(base / f"image_{letter}_160x192x144.nii.gz")
        out[name] = np.asarray(img.dataobj, dtype=np.float32)
        out[name + "_affine"] = img.affine
        out[name + "_labels"] = np.asarray(
            nib.load(base / f"image_{letter}_160x192x144_seg.nii.gz").dataobj).astype(np.int32)
    return out


def load_subject_and_template() -> tuple[dict, dict]:
    """The voxelmorph subject and the MNI152 2009a template: image, tissue labels, affine each."""
    import nibabel as nib

    scan = np.load(DATA / "voxelmorph_subject" / "test_scan.npz")
    seg = scan["seg"].astype(np.int32)
    tissue = np.zeros(seg.shape, np.int32)
    tissue[np.isin(seg, ASEG_GM)] = 1
    tissue[np.isin(seg, ASEG_WM)] = 2
    # FreeSurfer's conformed LIA grid, 1 mm, centred (array axes: left, inferior, anterior)
    lia = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
    lia[:3, 3] = -lia[:3, :3] @ ((np.asarray(seg.shape) - 1) / 2.0)
    subject = {"image": scan["vol"].astype(np.float32), "labels": tissue, "affine": lia}
    base = DATA / "mni152"
    t1 = nib.load(base / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    gm = np.asarray(nib.load(base / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").dataobj,
                    np.float32) / 255.0
    wm = np.asarray(nib.load(base / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").dataobj,
                    np.float32) / 255.0
    labels = np.where((gm > 0.5) & (gm >= wm), 1, np.where(wm > 0.5, 2, 0)).astype(np.int32)
    template = {"image": np.asarray(t1.dataobj, np.float32), "labels": labels,
                "affine": t1.affine}
    return subject, template


def load_pair(name: str) -> dict:
    """Arrays and affines of a named pair: `fixed`, `moving`, `*_labels`, `*_affine`."""
    if name == "oasis":
        return load_oasis()
    if name in ("vxm-mni", "mni-vxm"):
        subject, template = load_subject_and_template()
        first, second = (subject, template) if name == "vxm-mni" else (template, subject)
        return {"fixed": first["image"], "fixed_labels": first["labels"],
                "fixed_affine": first["affine"], "moving": second["image"],
                "moving_labels": second["labels"], "moving_affine": second["affine"]}
    pair = build_pair(*name.split("-"))
    affine = np.diag(list(pair.pop("spacing")) + [1.0])
    return {**pair, "fixed_affine": affine, "moving_affine": affine}


# ----------------------------------------------------------------------------------------------
# scoring (tfreg's environment)
# ----------------------------------------------------------------------------------------------
def ncc_global(a: np.ndarray, b: np.ndarray) -> float:
    """Global normalised cross-correlation of two images."""
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def score(folder: Path, warped_labels: np.ndarray, warped: np.ndarray | None = None,
          disp: np.ndarray | None = None) -> dict:
    """Dice/HD95 over the labels present in both maps; %folding, SDlogJ, NDV of `disp`; NCC."""
    from tfreg import metrics
    from tfreg.io import load_volume

    fixed = load_volume(folder / "fixed.nii.gz")
    fixed_l = load_volume(folder / "fixed_labels.nii.gz", label=True).data
    moving_l = load_volume(folder / "moving_labels.nii.gz", label=True).data
    labels = sorted((set(np.unique(fixed_l)) & set(np.unique(moving_l))) - {0})
    dice = metrics.dice(fixed_l, warped_labels, labels=labels)
    hd = metrics.hd95(fixed_l, warped_labels, spacing=fixed.spacing, labels=labels)
    hd_values = [v for v in hd.values() if np.isfinite(v)]
    out = {"dice": float(np.nanmean(list(dice.values()))),
           "hd95": float(np.mean(hd_values)) if hd_values else float("nan")}
    if disp is not None:
        out.update(folding=float(metrics.folding_percent(disp)),
                   sdlogj=float(metrics.sdlogj(disp)), ndv=float(metrics.ndv_percent(disp)))
    if warped is not None:
        out["ncc"] = ncc_global(fixed.data, warped)
    return out


def score_before(folder: Path) -> dict:
    """Scores of the moving labels and image resampled onto the fixed grid by the headers."""
    from tfreg.io import load_volume, resample_to_grid

    fixed = load_volume(folder / "fixed.nii.gz")
    moving = load_volume(folder / "moving.nii.gz")
    labels = load_volume(folder / "moving_labels.nii.gz", label=True)
    return score(folder, resample_to_grid(labels, fixed.affine, fixed.shape, order=0),
                 resample_to_grid(moving, fixed.affine, fixed.shape, order=1))


def score_tfreg(folder: Path, out: Path) -> dict:
    from tfreg.io import load_volume

    report = json.loads((out / "report.json").read_text())
    res = score(folder, load_volume(out / "warped_labels.nii.gz", label=True).data,
                load_volume(out / "warped.nii.gz").data,
                load_volume(out / "disp.nii.gz", allow_vector=True).data)
    res.update(seconds=report["runtime_seconds"], stages=report.get("stage_seconds"),
               initialisation=(report.get("initialisation") or {}).get("method"),
               warnings=report.get("warnings"))
    return res


def score_ants(folder: Path, out: Path) -> dict:
    from tfreg.io import load_volume
    from tfreg.transforms_io import read_transform

    fixed = load_volume(folder / "fixed.nii.gz")
    disp = read_transform(out / "itk_warp.nii.gz", reference=fixed).data
    res = score(folder, load_volume(out / "warped_labels.nii.gz", label=True).data,
                load_volume(out / "warped.nii.gz").data, disp)
    res.update(json.loads((out / "timing.json").read_text()))
    return res


# ----------------------------------------------------------------------------------------------
# commands (one fresh process each)
# ----------------------------------------------------------------------------------------------
def ants_worker(method: str, folder: str, out: str) -> None:
    """Run in the ANTs environment (no tfreg there): register, write warped image and labels,
    the deformable warp and `timing.json`."""
    import ants

    folder, out = Path(folder), Path(out)
    fixed = ants.image_read(str(folder / "fixed.nii.gz"))
    moving = ants.image_read(str(folder / "moving.nii.gz"))
    t0, c0 = time.perf_counter(), time.process_time()
    reg = ants.registration(fixed, moving, **ANTS_METHODS[method][1])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    labels = ants.image_read(str(folder / "moving_labels.nii.gz"))
    warped_labels = ants.apply_transforms(fixed, labels, reg["fwdtransforms"],
                                          interpolator="nearestNeighbor")
    out.mkdir(parents=True, exist_ok=True)
    ants.image_write(reg["warpedmovout"], str(out / "warped.nii.gz"))
    ants.image_write(warped_labels, str(out / "warped_labels.nii.gz"))
    warp = [t for t in reg["fwdtransforms"] if t.endswith(".nii.gz")][0]
    shutil.copy(warp, out / "itk_warp.nii.gz")
    (out / "timing.json").write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu}))


#: runs `tfreg register` (argv after the JSON) with `PRESETS[--preset]` replaced by a variant.
_VARIANT_RUNNER = """
import dataclasses, json, sys
from tfreg import instance
from tfreg_cli.main import main
overrides, argv = json.loads(sys.argv[1]), sys.argv[2:]
preset = argv[argv.index("--preset") + 1]
instance.PRESETS[preset] = dataclasses.replace(instance.PRESETS[preset], **overrides)
sys.argv = ["tfreg"] + argv
sys.exit(main())
"""


def parse_variant(method: str) -> tuple[str, dict]:
    """``'accurate+ncc_floor=0.1+adam_floor=1'`` -> ``('accurate', {'ncc_floor': 0.1, ...})``:
    a tfreg preset with some `InstanceConfig` fields replaced (numbers, or tuples as ``5/9``)."""
    preset, *items = method.split("+")
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        parts = [float(v) if "." in v else int(v) for v in value.split("/")]
        overrides[key] = tuple(parts) if "/" in value else parts[0]
    return preset, overrides


def is_tfreg(method: str) -> bool:
    """Whether `method` is a tfreg preset or a variant of one (``preset+key=value...``)."""
    return method.split("+")[0] in TFREG_METHODS


def _timed(cmd: list[str], env: dict, timeout: float) -> tuple[int, str, dict]:
    """Run `cmd` under /usr/bin/time: (exit code, output tail, {command_seconds (wall),
    command_cpu_seconds (user + system), peak_mb (peak resident memory)})."""
    stats = Path(os.environ.get("TMPDIR", "/tmp")) / f"tfreg-bench-time-{os.getpid()}.txt"
    prefix = ["/usr/bin/time", "-f", "%e %M %U %S", "-o", str(stats)] \
        if Path("/usr/bin/time").exists() else []
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(prefix + cmd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"timeout after {timeout:.0f} s", {}
    out = {"command_seconds": time.perf_counter() - t0}
    if prefix and stats.exists():
        try:
            wall, kb, user, system = (float(v) for v in stats.read_text().split()[-4:])
            out = {"command_seconds": wall, "peak_mb": kb / 1024.0,
                   "command_cpu_seconds": user + system}
        except ValueError:
            pass
        stats.unlink()
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
    return proc.returncode, tail[0][:300], out


def run_method(method: str, folder: Path, args) -> dict:
    """One registration command, then the scores of its outputs."""
    out = folder / f"out_{method}"
    shutil.rmtree(out, ignore_errors=True)
    threads = str(args.threads)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTRAOP_THREADS=threads,
               TF_NUM_INTEROP_THREADS=threads, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=threads,
               OMP_NUM_THREADS=threads)
    if is_tfreg(method):
        preset, overrides = parse_variant(method)
        cmd = [str(Path(sys.executable).with_name("tfreg")), "register"]
        if overrides:
            # the same command, with the preset's settings replaced in its process first
            cmd = [sys.executable, "-c", _VARIANT_RUNNER, json.dumps(overrides), "register"]
        cmd += [str(folder / "fixed.nii.gz"),
                str(folder / "moving.nii.gz"), "-o", str(out), "--preset", preset, "-q",
                "--moving-labels", str(folder / "moving_labels.nii.gz")]
    else:
        env["PYTHONPATH"] = ""
        cmd = [args.ants_python, str(Path(__file__).resolve()), "--ants-worker", method,
               str(folder), str(out)]
    code, tail, timing = _timed(cmd, env, args.timeout)
    if code != 0:
        return {"error": tail or f"exit {code}"}
    res = score_tfreg(folder, out) if is_tfreg(method) else score_ants(folder, out)
    res.update(timing)
    return res


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    import tempfile

    path = Path(tempfile.gettempdir()) / "tfreg-bench-register"
    path.mkdir(parents=True, exist_ok=True)
    return path


def pair_folder(name: str) -> Path:
    """Build (once) a pair's NIfTI files in the temp folder: fixed, moving and their labels."""
    import nibabel as nib

    folder = _cache_dir() / f"pair_{name}"
    if not (folder / "moving_labels.nii.gz").exists():
        pair = load_pair(name)
        folder.mkdir(parents=True, exist_ok=True)
        for side in ("fixed", "moving"):
            affine = np.asarray(pair[side + "_affine"], np.float64)
            nib.save(nib.Nifti1Image(pair[side].astype(np.float32), affine),
                     str(folder / f"{side}.nii.gz"))
            nib.save(nib.Nifti1Image(pair[side + "_labels"].astype(np.int16), affine),
                     str(folder / f"{side}_labels.nii.gz"))
    return folder


def _fmt(value, digits=3) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


COLUMNS = (("Dice", "dice", 3), ("HD95", "hd95", 2), ("fold%", "folding", 4),
           ("SDlogJ", "sdlogj", 3), ("NDV%", "ndv", 4), ("NCC", "ncc", 3),
           ("reg s", "seconds", 1), ("reg cpu", "cpu_seconds", 1), ("cmd s", "command_seconds", 1),
           ("cmd cpu", "command_cpu_seconds", 1), ("peak MB", "peak_mb", 0))


def _row(name: str, method: str, res: dict) -> str:
    cells = "".join(f"{_fmt(res.get(key), d):>9}" for _, key, d in COLUMNS)
    return f"{name:<9}{method:<10}{cells}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default=",".join(PAIRS),
                        help=f"comma-separated pairs: 'fixed-moving' SynthSeg ids (default: the "
                             f"six), or {', '.join(REAL_PAIRS)}")
    parser.add_argument("--methods", default="accurate,fast,best,syn,syn100,syns",
                        help=f"comma-separated subset of {', '.join(METHODS)}; a tfreg "
                             f"preset may carry InstanceConfig changes, e.g. "
                             f"'accurate+ncc_floor=0.1+adam_floor=1' (tuples as 5/9)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for each tool (TensorFlow intra/inter-op, ITK)")
    parser.add_argument("--ants-python", default="/tmp/antsenv/bin/python",
                        help="Python of the environment with antspyx")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per command")
    parser.add_argument("--out", default=str(RESULTS / "bench_register.json"))
    parser.add_argument("--reuse", metavar="JSON[,JSON]",
                        help="take the results of these pairs and methods from earlier runs' "
                             "JSON files where they have them (marked 'reused_from' with that "
                             "run's start time) instead of running them again")
    parser.add_argument("--no-run", action="store_true",
                        help="with --reuse: only gather the earlier results into one table and "
                             "JSON, run nothing")
    parser.add_argument("--ants-worker", nargs=3, metavar=("METHOD", "PAIR_DIR", "OUT_DIR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ants_worker:
        ants_worker(*args.ants_worker)
        return 0
    if not (DATA / "synthseg_label_maps").is_dir():
        print(f"skipped: benchmark data not found at {DATA} (needs ../shared/data)")
        return 0
    methods = [m for m in args.methods.split(",") if m]
    unknown = {m for m in methods if m not in METHODS and not is_tfreg(m)}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    pairs = [p for p in args.pairs.split(",") if p]
    results: dict = {"started": _utc_now(), "machine": _machine(),
                     "threads_per_tool": args.threads,
                     "methods": {m: METHODS.get(m, f"{TFREG_METHODS[m.split('+')[0]]}, with "
                                              f"{parse_variant(m)[1]}") for m in methods},
                     "pairs": {}}
    earlier = _earlier_results(args.reuse.split(",") if args.reuse else [])
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'pair':<9}{'method':<10}" + "".join(f"{c:>9}" for c, _, _ in COLUMNS), flush=True)
    for name in pairs:
        folder = pair_folder(name)
        entry = {"before": score_before(folder)}
        print(_row(name, "before", entry["before"]), flush=True)
        for method in methods:
            old = earlier.get((name, method))
            if old:
                res = old
            elif args.no_run:
                continue
            else:
                res = {**run_method(method, folder, args), "finished": _utc_now()}
            entry[method] = res
            print(f"{name:<9}{method:<10} error: {res['error']}" if "error" in res
                  else _row(name, method, res), flush=True)
            results["pairs"][name] = entry
            results["averages"] = _averages(results["pairs"], ["before"] + methods)
            out_path.write_text(json.dumps(results, indent=1) + "\n")
    print("\nmean over the inter-subject pairs measured (synthetic-intensity pairs only)")
    for method, avg in results.get("averages", {}).items():
        print(_row(f"n={avg['n']}", method, avg))
    print(f"\nwrote {out_path}")
    return 0


def _averages(pairs: dict, methods: list[str]) -> dict:
    out = {}
    for method in methods:
        rows = [p[method] for name, p in pairs.items()
                if name not in REAL_PAIRS and method in p and "error" not in p[method]]
        if not rows:
            continue
        avg = {"n": len(rows)}
        for _, key, _ in COLUMNS:
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                avg[key] = float(np.mean(vals))
        out[method] = avg
    return out


def _earlier_results(paths: list[str]) -> dict:
    """``{(pair, method): result}`` from earlier runs' JSON files (the first file that has a
    result without error wins), each marked with its run's start time in ``reused_from``."""
    out: dict = {}
    for path in paths:
        run = json.loads(Path(path).read_text())
        for name, entry in run.get("pairs", {}).items():
            for method, res in entry.items():
                if method != "before" and "error" not in res and (name, method) not in out:
                    out[(name, method)] = {**res, "reused_from": res.get("reused_from")
                                           or run.get("started", path)}
    return out


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _machine() -> dict:
    import platform

    info = {"cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "python": platform.python_version()}
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


if __name__ == "__main__":
    sys.exit(main())
