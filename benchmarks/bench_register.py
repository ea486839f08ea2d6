"""Pairwise registration benchmark: `tfreg register` (no model) against ANTs SyN, side by side.

Pairs are built from real anatomy (the SynthSeg training label maps) with a synthetic T1-like
intensity, following the recipe in `../shared/data/README.md`:

* drop labels >= 500, crop both maps of a pair to the union bounding box of the brain, resample to
  96x112x96 (nearest neighbour, voxel sizes recorded in the affine, in mm);
* intensity of each label = mean intensity of that label in the voxelmorph sample subject
  (FreeSurfer aseg), Gaussian blur sigma 0.7 voxel, Gaussian noise sigma 0.01;
* Dice over the labels present in both maps, HD95 in mm, %folding of the displacement field.

Times are registration only: arrays already in memory, no file I/O, no interpreter start, but
including TensorFlow tracing and XLA compilation (each tfreg preset is run in a fresh process so that
nothing compiled for an earlier pair is reused unless the same process registers several pairs:
`--warm` measures that case separately).

ANTs (antspyx, a benchmark-only dependency: `pip install antspyx`) is run with its defaults
(`type_of_transform="SyN"`) and with `reg_iterations=(100, 70, 50)`.

Usage::

    python benchmarks/bench_register.py                 # all six pairs, tfreg accurate+fast, ANTs x2
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
    """SynthSeg label map `training_seg_<index>` with labels >= 500 set to 0; returns (labels, affine)."""
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
