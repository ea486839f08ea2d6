"""Training data of the shipped model: the SynthSeg label maps brought into one rough alignment.

The ten maps (`../shared/data/synthseg_label_maps`) lie in their subjects' own scanner spaces: two
of them overlap little (mean Dice 0.016 for maps 09 and 10 as they are), and a label loss has
almost no gradient without overlap. `tfreg register --init builtin` runs the affine stage before
the network, so the model is trained on pairs after a similar alignment: each map is cropped to
the bounding box of its cerebrum (labels 2, 3, 41, 42: cerebral white matter and cortex), widened
by a fixed fraction of that box on every side (more below, for the cerebellum and brainstem),
and resampled (nearest neighbour) onto one grid, so that the boxes coincide (a per-axis scaling
and translation). The maps keep their voxel axes (FreeSurfer's LIA order).

Writes OUT/aligned_seg_01..10.nii.gz, OUT/synthseg-aligned.yaml (maps 01-08 train, 09-10
validate; network grid 32x40x32, a third of 96x112x96, so that 2 shared CPU cores train several
hundred steps in minutes; deformations of +/- 0.69 voxel, the recipe of version 0.1.0) and
OUT/synthseg-aligned-corr.yaml (the same with deformations of +/- 2 voxels, control points 16
voxels apart: the recipe of version 0.2.0, docs/builtin-model.md)::

    python benchmarks/builtin_maps.py --out data/builtin_maps
    tfreg train voxelmorph --data data/builtin_maps/synthseg-aligned-corr.yaml \\
        --config plugins/voxelmorph/voxelmorph-builtin-correlation.yaml --out runs/builtin
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MAPS = HERE.parents[1] / "shared" / "data" / "synthseg_label_maps"
CEREBRUM = (2, 3, 41, 42)
GRID = (96, 112, 96)
#: widening of the cerebrum box, as a fraction of its extent: (low, high) side per axis; axis 1
#: runs from superior to inferior in LIA order, so its high side takes the cerebellum/brainstem.
MARGIN = ((0.06, 0.06), (0.06, 0.30), (0.06, 0.06))

YAML = """# Training data of tfreg's shipped model (written by benchmarks/builtin_maps.py): the SynthSeg
# label maps, each cropped to its widened cerebrum box and resampled onto one {grid} grid.
label_maps:
  train: [{train}]
  val: [{val}]
  drop_from: 500
shape: [32, 40, 32]          # a third of {grid} (voxels of about 4.5 x 4.0 x 5.8 mm)
deform:
{deform}
intensity:
  std: 0.05
  blur: [0.3, 0.6]
  bias: 0.3
  gamma: 0.25
  noise: 0.02
seed: 0
"""

#: the random deformation of each data file: version 0.1.0's, and the larger one of 0.2.0
DEFORM = {
    "synthseg-aligned.yaml": "  max_disp: 0.8              # voxels; < 0.86 (control points 5.17 "
                             "voxels apart here): cannot fold\n  spacing: 6",
    "synthseg-aligned-corr.yaml": "  max_disp: 2.0              # voxels; < 2.17 (control points "
                                  "13 voxels apart here): cannot fold\n  spacing: 16",
}


def align(labels: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """One map onto `GRID`: labels >= 500 dropped, its widened cerebrum box resampled; returns
    the map and the box's voxel size on `GRID` (mm per voxel, the maps being 1 mm)."""
    from scipy import ndimage

    labels = np.where(labels >= 500, 0, labels).astype(np.int32)
    nz = np.nonzero(np.isin(labels, CEREBRUM))
    lo = np.array([ax.min() for ax in nz], float)
    hi = np.array([ax.max() for ax in nz], float) + 1
    extent = hi - lo
    lo = lo - extent * np.array([m[0] for m in MARGIN])
    hi = hi + extent * np.array([m[1] for m in MARGIN])
    coords = [lo[d] + (np.arange(GRID[d]) + 0.5) * (hi[d] - lo[d]) / GRID[d] - 0.5
              for d in range(3)]
    grid = np.meshgrid(*coords, indexing="ij")
    out = ndimage.map_coordinates(labels, grid, order=0, mode="constant", cval=0)
    return out.astype(np.int32), [float((hi[d] - lo[d]) / GRID[d]) for d in range(3)]


def main(argv: list[str] | None = None) -> int:
    import nibabel as nib

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--maps", default=str(MAPS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spacings = {}
    for k in range(1, 11):
        img = nib.load(Path(args.maps) / f"training_seg_{k:02d}.nii.gz")
        aligned, spacing = align(np.asarray(img.dataobj))
        spacings[f"{k:02d}"] = spacing
        nib.save(nib.Nifti1Image(aligned, np.diag([*spacing, 1.0])),
                 str(out / f"aligned_seg_{k:02d}.nii.gz"))
    names = [f"aligned_seg_{k:02d}.nii.gz" for k in range(1, 11)]
    for name, deform in DEFORM.items():
        (out / name).write_text(YAML.format(
            grid="x".join(map(str, GRID)), train=", ".join(names[:8]), val=", ".join(names[8:]),
            deform=deform))
    mean = np.mean(list(spacings.values()), axis=0)
    (out / "spacing.json").write_text(json.dumps(
        {"per_map_mm": spacings, "mean_mm": mean.tolist()}, indent=2) + "\n")
    print(f"wrote {out}: mean voxel size {np.round(mean, 3).tolist()} mm on {GRID}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
