"""Data loading benchmark: pairs per second through `tfreg.data.make_dataset` at 160x192x224.

Measures, on this machine:

* the tf.data pipeline reading gzipped NIfTI (image float32 + label map int16 per scan),
* the same pipeline reading the HDF5 cache (and the time to build the cache),
* the same, cached, with augmentation on (random affine + smooth deformation + intensity),
* the training step rate of VoxelMorph (`tfreg_plugins.voxelmorph`, default config, batch 1, MSE)
  at the same size, i.e. the pairs per second training consumes.

The loader keeps up when its pairs/s exceed the step rate. Scans are built from the voxelmorph
sample subject in ``../shared/data/voxelmorph_subject`` when present (shifted copies of one real
scan), else from a synthetic phantom. Files go to a temporary folder that is deleted afterwards.

Usage::

    python benchmarks/bench_data.py                 # 8 scans, 16 pairs per measurement
    python benchmarks/bench_data.py --scans 4 --pairs 8 --vxm-steps 2

Results: a table on stdout and ``benchmarks/results/bench_data.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "voxelmorph_subject" / "test_scan.npz"
RESULTS = ROOT / "benchmarks" / "results"
SHAPE = (160, 192, 224)


def write_scans(folder: Path, n: int, shape: tuple[int, ...]) -> str:
    """`n` scans (image + label map) as .nii.gz; returns where the anatomy came from."""
    from tfreg.io import save_volume
    from tfreg.synthetic import phantom

    if SAMPLE.is_file() and tuple(shape) == SHAPE:
        data = np.load(SAMPLE)
        image, labels = data["vol"].astype(np.float32), data["seg"].astype(np.int32)
        source = f"{SAMPLE.name} (real scan, shifted copies)"
    else:
        image, labels = phantom(tuple(shape), np.random.default_rng(0), jitter=1.0)
        source = "synthetic phantom (shifted copies)"
    rng = np.random.default_rng(0)
    for i in range(n):
        shift = tuple(int(s) for s in rng.integers(-4, 5, size=3))
        noise = rng.normal(0, 0.01, size=image.shape).astype(np.float32)
        save_volume(folder / "images" / f"sub-{i:02d}.nii.gz",
                    np.clip(np.roll(image, shift, axis=(0, 1, 2)) + noise, 0, 1), np.eye(4))
        save_volume(folder / "labels" / f"sub-{i:02d}.nii.gz",
                    np.roll(labels, shift, axis=(0, 1, 2)), np.eye(4))
    return source


def pairs_per_second(spec, n_pairs: int, warmup: int = 2) -> float:
    """Pairs/s of `make_dataset(spec)` at batch 1, after `warmup` pairs."""
    from tfreg.data import make_dataset

    iterator = iter(make_dataset(spec, batch_size=1, seed=0))
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(n_pairs):
        batch = next(iterator)
    _ = float(batch["fixed"][0, 0, 0, 0, 0])
    return n_pairs / (time.perf_counter() - start)


def voxelmorph_steps_per_second(shape: tuple[int, ...], steps: int) -> tuple[float | None, str]:
    """Training steps/s of VoxelMorph (default config, MSE, batch 1) on random inputs."""
    try:
        import keras
        import tensorflow as tf

        from tfreg.config import method_defaults
        from tfreg.registry import Stage, discover

        METHOD = discover().get("voxelmorph").method
        config = method_defaults(METHOD)
    except Exception as err:  # noqa: BLE001 - report why instead of failing the benchmark
        return None, f"n/a: VoxelMorph plugin not available ({type(err).__name__}: {err})"
    model = METHOD.build_model(config, shape)
    loss_fn = METHOD.build_loss(config)
    stage = Stage(name="bench", steps=steps)
    optimizer = keras.optimizers.Adam(1e-4)
    rng = np.random.default_rng(0)
    batch = {k: tf.constant(rng.uniform(size=(1, *shape, 1)).astype(np.float32))
             for k in ("fixed", "moving")}

    @tf.function
    def step(batch):
        with tf.GradientTape() as tape:
            outputs = model({"moving": batch["moving"], "fixed": batch["fixed"]}, training=True)
            total = tf.add_n(list(loss_fn(batch, outputs, stage).values()))
        grads = tape.gradient(total, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return total

    float(step(batch))  # trace and first run
    start = time.perf_counter()
    for _ in range(steps):
        value = step(batch)
    float(value)
    return steps / (time.perf_counter() - start), "VoxelMorph default config, MSE, batch 1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scans", type=int, default=8, help="number of scans written")
    parser.add_argument("--pairs", type=int, default=16, help="pairs timed per measurement")
    parser.add_argument("--vxm-steps", type=int, default=2, help="VoxelMorph steps timed (0: skip)")
    parser.add_argument("--shape", type=int, nargs=3, default=list(SHAPE))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    shape = tuple(args.shape)

    from tfreg.data import DataSpec

    tmp = Path(tempfile.mkdtemp(prefix="tfreg-bench-data-"))
    try:
        t0 = time.perf_counter()
        source = write_scans(tmp, args.scans, shape)
        write_s = time.perf_counter() - t0
        nifti_mb = sum(p.stat().st_size for p in tmp.rglob("*.nii.gz")) / 2**20
        base = {"images": "images/*.nii.gz", "labels": "labels/{stem}.nii.gz",
                "shape": list(shape)}
        plain = DataSpec.from_dict(base, tmp, "bench")
        nifti = pairs_per_second(plain, args.pairs)

        cached = DataSpec.from_dict({**base, "cache": str(tmp / "cache")}, tmp, "bench")
        t0 = time.perf_counter()
        cached.validate(deep=True)
        build_s = time.perf_counter() - t0
        cache_mb = sum(p.stat().st_size for p in (tmp / "cache").glob("*.h5")) / 2**20
        cache = pairs_per_second(cached, args.pairs)

        augment = {"affine": {"rotate": 10, "scale": 0.05, "shift": 3},
                   "deform": {"max_disp": 2, "spacing": 16},
                   "intensity": {"gamma": 0.2, "noise": 0.01}}
        augmented = DataSpec.from_dict({**base, "cache": str(tmp / "cache"), "augment": augment},
                                       tmp, "bench")
        aug = pairs_per_second(augmented, max(2, args.pairs // 4), warmup=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if args.vxm_steps > 0:
        vxm, vxm_note = voxelmorph_steps_per_second(shape, args.vxm_steps)
    else:
        vxm, vxm_note = None, "n/a: skipped (--vxm-steps 0)"

    rows = [
        ("NIfTI (.nii.gz), no cache", nifti),
        ("HDF5 cache", cache),
        ("HDF5 cache + augmentation", aug),
    ]
    print(f"\nshape {list(shape)}, {args.scans} scans from {source}, "
          f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}")
    print(f"{'pipeline':32s} {'pairs/s':>9s} {'volumes/s':>10s} {'vs VoxelMorph':>14s}")
    for name, rate in rows:
        ratio = f"{rate / vxm:.1f}x" if vxm else "n/a"
        print(f"{name:32s} {rate:9.2f} {2 * rate:10.2f} {ratio:>14s}")
    print(f"{'VoxelMorph training step':32s} {vxm if vxm else float('nan'):9.3f} "
          f"{'':10s} {'':>14s}   ({vxm_note})")
    print(f"cache build {build_s:.1f} s for {args.scans} scans ({cache_mb:.0f} MB; NIfTI "
          f"{nifti_mb:.0f} MB, written in {write_s:.1f} s). volumes/s counts images; each pair "
          "also carries two label maps.")

    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "shape": list(shape), "scans": args.scans, "pairs_timed": args.pairs,
        "anatomy": source, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "nifti": {"pairs_per_s": nifti, "volumes_per_s": 2 * nifti, "megabytes": nifti_mb},
        "cache": {"pairs_per_s": cache, "volumes_per_s": 2 * cache, "build_s": build_s,
                  "megabytes": cache_mb},
        "cache_augmented": {"pairs_per_s": aug, "volumes_per_s": 2 * aug, "augment": augment},
        "voxelmorph": {"steps_per_s": vxm, "note": vxm_note},
        "cache_over_voxelmorph": None if not vxm else cache / vxm,
    }
    from tfreg.io import atomic_path

    out = RESULTS / "bench_data.json"
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
