"""Registration across contrasts: `tfreg register --similarity ncc|mind|nmi` against ANTs SyN with
mutual information, side by side on T2-like-to-T1-like pairs, plus the memory of Parzen NMI.

Pairs follow the recipe of `../shared/data/README.md` (`bench_register.build_pair`: SynthSeg
label maps, labels >= 500 dropped, union bounding box, 96x112x96, blur 0.7 voxel, noise 0.01),
with two intensity tables:

* T1-like: the mean intensity of each label in the voxelmorph sample subject (WM bright, CSF dark);
* T2-like: a table by tissue class with CSF bright (1.0), cortex and deep grey matter mid
  (0.45-0.65), white matter dark (0.3), not a monotone function of the T1 table.

The fixed image is T1-like, the moving image T2-like ("T2 to T1"); the same-contrast reference
registers the T1-like moving image of the same pair. Dice over the labels present in both maps.

Methods (all on the same pairs in one run):

* ``before``: no registration;
* ``ncc``: `tfreg register` default (`--similarity ncc`, local NCC), T2 to T1;
* ``mind``: `tfreg register --similarity mind`, T2 to T1;
* ``nmi``: `tfreg register --similarity nmi`, T2 to T1;
* ``ncc_same``: `tfreg register` default, T1 to T1 (same contrast);
* ``syn_mi``: ANTs SyN with antspyx defaults (`type_of_transform="SyN"`: affine and SyN stages,
  both with the Mattes mutual information metric), T2 to T1.

ANTs is a benchmark-only tool: install it into its own environment
(``python -m venv /tmp/antsenv && /tmp/antsenv/bin/pip install antspyx nibabel``) and pass
``--ants-python /tmp/antsenv/bin/python`` (default: that path, or ``$TFREG_ANTS_PYTHON``). It runs
in a subprocess on NumPy files; tfreg runs in this process (one compilation per image shape and
setting, reused by later pairs: the first pair's time includes it).

Usage::

    python benchmarks/bench_contrasts.py                       # pairs 01-02, 03-04, 05-06
    python benchmarks/bench_contrasts.py --pairs 01-02 --methods before,mind,syn_mi
    python benchmarks/bench_contrasts.py --memory-only         # NMI memory at 160x192x224

Results: a table on stdout and `benchmarks/results/bench_contrasts.json`.
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
import bench_register as br  # noqa: E402  (pair recipe and scoring shared with that benchmark)

RESULTS = HERE / "results"
PAIRS = ["01-02", "03-04", "05-06"]
METHODS = {
    "before": "no registration",
    "ncc": "tfreg register (default, --similarity ncc), T2 -> T1",
    "mind": "tfreg register --similarity mind, T2 -> T1",
    "nmi": "tfreg register --similarity nmi, T2 -> T1",
    "ncc_same": "tfreg register (default), T1 -> T1 (same contrast)",
    "syn_mi": "ANTs SyN, antspyx defaults (Mattes MI), T2 -> T1",
}
#: FreeSurfer label -> T2-like intensity (CSF bright, WM dark).
T2_CLASSES = {
    1.0: (4, 5, 14, 15, 24, 43, 44, 72),                     # ventricles, CSF
    0.3: (2, 41, 7, 46, 77, 85),                             # white matter, cerebellar WM
    0.62: (3, 42, 17, 18, 53, 54, 8, 47),                    # cortex, hippocampus, amygdala
    0.5: (11, 50, 12, 51, 26, 58),                           # caudate, putamen, accumbens
    0.38: (13, 52, 16, 28, 60),                              # pallidum, brainstem, ventral DC
    0.45: (10, 49),                                          # thalamus
    0.75: (31, 63),                                          # choroid plexus
}


def t2_table() -> dict[int, float]:
    return {lab: value for value, labels in T2_CLASSES.items() for lab in labels}


def build_pair(name: str, seed: int = 0) -> dict:
    """`bench_register.build_pair` (T1-like images) plus a T2-like moving image `moving_t2`."""
    from scipy import ndimage

    pair = br.build_pair(*name.split("-"), seed=seed)
    table = t2_table()
    lut = np.zeros(int(pair["moving_labels"].max()) + 1, np.float32)
    for lab in np.unique(pair["moving_labels"]):
        lut[lab] = table.get(int(lab), 0.5) if lab else 0.0
    rng = np.random.default_rng(seed + 1)
    image = ndimage.gaussian_filter(lut[pair["moving_labels"]], 0.7) + \
        0.01 * rng.normal(size=pair["moving_labels"].shape)
    pair["moving_t2"] = np.clip(image, 0, 1).astype(np.float32)
    return pair


# ----------------------------------------------------------------------------------------------
def run_tfreg(pair: dict, similarity: str, moving_key: str) -> dict:
    from tfreg import instance
    from tfreg.io import Volume
    from tfreg.register import register_volumes
    from tfreg.synthetic import warp_numpy

    affine = np.diag(list(pair["spacing"]) + [1.0])
    cfg = instance.make_config("accurate", similarity=similarity)
    t0 = time.perf_counter()
    result = register_volumes(Volume(pair["fixed"], affine, path="fixed"),
                              Volume(pair[moving_key], affine, path="moving"), config=cfg)
    wall = time.perf_counter() - t0
    out = br.score(pair, warp_numpy(pair["moving_labels"], result.disp, order=0), result.disp)
    report = result.report
    out.update(seconds=report["runtime_seconds"], wall=wall,
               warnings=report.get("warnings", []), contrast=report.get("contrast"))
    return out


_ANTS_CODE = r"""
import json, sys, time
import numpy as np, ants
data = np.load(sys.argv[1])
spacing = tuple(float(s) for s in data["spacing"])
fixed = ants.from_numpy(data["fixed"], spacing=spacing)
moving = ants.from_numpy(data["moving"], spacing=spacing)
t0 = time.perf_counter()
reg = ants.registration(fixed, moving, type_of_transform="SyN")
seconds = time.perf_counter() - t0
labels = ants.from_numpy(data["moving_labels"].astype(np.float32), spacing=spacing)
warped = ants.apply_transforms(fixed, labels, reg["fwdtransforms"],
                               interpolator="nearestNeighbor").numpy()
jac = ants.create_jacobian_determinant_image(fixed, reg["fwdtransforms"][0]).numpy()
np.savez_compressed(sys.argv[2], warped_labels=np.rint(warped).astype(np.int32))
json.dump({"seconds": seconds, "folding": float(100.0 * np.mean(jac <= 0))},
          open(sys.argv[2] + ".json", "w"))
"""


def run_ants(pair: dict, python: str, timeout: float) -> dict:
    """ANTs SyN (defaults: Mattes MI) in the benchmark-only environment `python`."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "pair.npz", Path(tmp) / "out.npz"
        np.savez(src, spacing=np.asarray(pair["spacing"]), fixed=pair["fixed"],
                 moving=pair["moving_t2"], moving_labels=pair["moving_labels"])
        env = dict(os.environ)
        env.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(os.cpu_count() or 1))
        try:
            proc = subprocess.run([python, "-c", _ANTS_CODE, str(src), str(dst)], env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as err:
            return {"error": f"{type(err).__name__}: {err}"[:300]}
        if proc.returncode != 0 or not dst.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": tail[0][:300]}
        info = json.loads(Path(str(dst) + ".json").read_text())
        out = br.score(pair, np.load(dst)["warped_labels"], None)
        out.update(info)
        return out


# ----------------------------------------------------------------------------------------------
def nmi_memory(shape=(160, 192, 224), bins: int = 32) -> dict:
    """Peak resident memory of one NMI value and gradient at `shape` (fresh process), against
    the same process holding only the inputs."""
    code = r"""
import json, resource, sys, time
import numpy as np, tensorflow as tf
from tfreg.ops.mutual_information import normalized_mutual_information
shape, bins, run = tuple(json.loads(sys.argv[1])), int(sys.argv[2]), sys.argv[3] == "1"
rng = np.random.default_rng(0)
a = tf.constant(rng.random((1, *shape, 1), np.float32))
b = tf.constant(rng.random((1, *shape, 1), np.float32))
_ = tf.reduce_sum(a + b).numpy()
t0 = time.perf_counter()
if run:
    with tf.GradientTape() as tape:
        tape.watch(b)
        value = normalized_mutual_information(a, b, bins=bins)
    grad = tape.gradient(value, b).numpy()
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t0}))
"""
    out = {}
    for label, run in (("inputs_only", "0"), ("nmi_value_and_gradient", "1")):
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(list(shape)), str(bins),
                               run], capture_output=True, text=True,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
        out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    voxels = int(np.prod(shape))
    out.update(shape=list(shape), bins=bins, voxels=voxels,
               extra_peak_mb=out["nmi_value_and_gradient"]["maxrss_mb"] -
               out["inputs_only"]["maxrss_mb"],
               dense_weights_mb=2 * voxels * bins * 4 / 2**20,
               dense_joint_contributions_mb=voxels * bins * bins * 4 / 2**20)
    return out


def _fmt(value, digits=3) -> str:
    return "   -  " if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ants-python",
                        default=os.environ.get("TFREG_ANTS_PYTHON", "/tmp/antsenv/bin/python"))
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)
    results: dict = {"machine": br._machine(), "conditions": (
        "shared, loaded 2-core CPU; tfreg in one process (compilation in the first pair's time), "
        "ANTs in a subprocess")}
    if not args.memory_only:
        pairs = [p for p in args.pairs.split(",") if p]
        methods = [m for m in args.methods.split(",") if m]
        unknown = set(methods) - set(METHODS)
        if unknown:
            parser.error(f"unknown method(s) {', '.join(sorted(unknown))}")
        results["methods"] = {m: METHODS[m] for m in methods}
        rows: dict = {}
        for name in pairs:
            pair = build_pair(name)
            rows[name] = {}
            for method in methods:
                t0 = time.perf_counter()
                if method == "before":
                    row = br.score(pair, pair["moving_labels"], None)
                elif method == "syn_mi":
                    row = run_ants(pair, args.ants_python, args.timeout)
                elif method == "ncc_same":
                    row = run_tfreg(pair, "ncc", "moving")
                else:
                    row = run_tfreg(pair, method, "moving_t2")
                rows[name][method] = row
                print(f"{name} {method:<9} dice {_fmt(row.get('dice'))} "
                      f"({time.perf_counter() - t0:.0f} s){' ' + row['error'] if 'error' in row else ''}",
                      flush=True)
                for line in row.get("warnings") or []:
                    print(f"    {line}", flush=True)
        results["pairs"] = rows
        summary = {}
        for method in methods:
            dice = [rows[p][method].get("dice", np.nan) for p in pairs]
            secs = [rows[p][method].get("seconds", np.nan) for p in pairs]
            warned = [bool(rows[p][method].get("warnings")) for p in pairs]
            summary[method] = {"mean_dice": float(np.nanmean(dice)),
                               "mean_seconds": float(np.nanmean(secs)) if method != "before"
                               else None, "pairs_warned": int(sum(warned))}
        results["summary"] = summary
        print(f"\n{'method':<10}{'mean Dice':>10}{'s/pair':>9}{'warned':>8}  description")
        for method, row in summary.items():
            print(f"{method:<10}{_fmt(row['mean_dice']):>10}"
                  f"{_fmt(row['mean_seconds'], 1) if row['mean_seconds'] else '':>9}"
                  f"{row['pairs_warned']:>8}  {METHODS[method]}")
    if not args.no_memory:
        memory = nmi_memory()
        results["nmi_memory"] = memory
        if "error" not in memory:
            print(f"\nNMI value + gradient at 160x192x224, 32 bins: extra peak memory "
                  f"{memory['extra_peak_mb']:.0f} MiB, "
                  f"{memory['nmi_value_and_gradient']['seconds']:.1f} s (dense Parzen weights "
                  f"would hold {memory['dense_weights_mb']:.0f} MiB)")
        else:
            print(f"NMI memory: {memory['error']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    from tfreg.io import atomic_path

    target = RESULTS / "bench_contrasts.json"
    with atomic_path(target, suffix=".json") as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
