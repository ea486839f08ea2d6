"""The demo: build a sample pair, register it, score it and draw it, offline.

Two synthetic brain-like subjects (`tfreg.synthetic`: nested ellipsoids for CSF, grey and white
matter, ventricles and two deep nuclei, each subject with its own shape jitter and smooth random
deformation) make the pair; the moving subject is also rotated and shifted, so the affine stage has
work to do. Everything is deterministic and needs only the installed package.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tfreg.io import save_volume

__all__ = ["LABEL_NAMES", "make_sample_pair", "run_demo"]

#: label -> structure name of the synthetic phantom.
LABEL_NAMES = {1: "CSF", 2: "grey matter", 3: "white matter", 4: "ventricles",
               5: "nucleus L", 6: "nucleus R"}


def _rigid_disp(shape: tuple[int, ...], degrees: float, shift: tuple[float, ...]) -> np.ndarray:
    """Displacement `(*S, N)` of a rotation about the volume centre in the plane of the first two
    axes, followed by a shift (voxels): pull convention, `moved(x) = image(R (x - c) + c + t)`."""
    ndims = len(shape)
    centre = (np.asarray(shape) - 1) / 2.0
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape],
                                indexing="ij"), axis=-1) - centre
    rot = np.eye(ndims)
    a = np.deg2rad(degrees)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    moved = grid @ rot.T + np.asarray(shift, np.float64)
    return (moved - grid).astype(np.float32)


def make_sample_pair(shape: tuple[int, ...] = (64, 72, 64), seed: int = 4
                     ) -> dict[str, np.ndarray]:
    """The demo pair: `fixed`, `moving` (float32 in [0, 1]) and their int32 label maps.

    The two subjects differ by shape jitter and independent smooth deformations (up to 3 voxels);
    the moving one is also rotated by 8 degrees and shifted by 3 voxels.
    """
    from tfreg.synthetic import deformed_subject, warp_numpy

    fixed, fixed_labels = deformed_subject(shape, seed, max_disp=3.0)
    moving, moving_labels = deformed_subject(shape, seed + 1, max_disp=3.0)
    rigid = _rigid_disp(shape, 8.0, (3.0, -2.0) + (1.5,) * (len(shape) - 2))
    moving = np.clip(warp_numpy(moving, rigid, order=1), 0, 1).astype(np.float32)
    moving_labels = warp_numpy(moving_labels, rigid, order=0).astype(np.int32)
    return {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels,
            "moving_labels": moving_labels}


def run_demo(out_dir: str | Path = "tfreg-demo", *, preset: str = "accurate",
             shape: tuple[int, ...] = (64, 72, 64), device: str | None = None,
             progress: Callable[[str, int, int, float], None] | None = None,
             echo: Callable[[str], None] = print) -> dict:
    """Write the sample pair, register it, write the overview PNG; return a summary dict.

    Layout of `out_dir`: `inputs/{fixed,moving,fixed_labels,moving_labels}.nii.gz`,
    `registration/{warped,disp,warped_labels}.nii.gz`, `registration/report.json`,
    `overview.png`.
    """
    from tfreg import instance
    from tfreg.register import register_files
    from tfreg.visualize import show_result_dir

    start = time.perf_counter()
    out_dir = Path(out_dir)
    inputs = out_dir / "inputs"
    pair = make_sample_pair(shape)
    affine = np.diag([1.5] * 3 + [1.0])
    affine[:3, 3] = -0.75 * (np.asarray(shape[:3]) - 1)  # centre the volume at the world origin
    paths = {name: save_volume(inputs / f"{name}.nii.gz", data, affine)
             for name, data in pair.items()}
    echo(f"sample pair: {paths['fixed'].parent} ({'x'.join(map(str, shape))} voxels of 1.5 mm, "
         f"{len(LABEL_NAMES)} labels)")
    cfg = instance.make_config(preset)
    report, written = register_files(paths["fixed"], paths["moving"], out_dir / "registration",
                                     fixed_labels=paths["fixed_labels"],
                                     moving_labels=paths["moving_labels"], config=cfg,
                                     device=device, progress=progress)
    png = show_result_dir(out_dir / "registration", out_dir / "overview.png")
    from tfreg.metrics import dice

    before = dice(pair["fixed_labels"], pair["moving_labels"], labels=list(LABEL_NAMES))
    return {"report": report, "written": {**written, "overview": png},
            "dice_before": before, "total_seconds": time.perf_counter() - start,
            "inputs": paths}


def format_demo(summary: dict) -> str:
    """Per-label Dice table before/after plus the headline figures and output paths."""
    report = summary["report"]
    lines = [f"{'structure':<14}{'Dice before':>12}{'after':>8}"]
    for label, name in LABEL_NAMES.items():
        after = report["dice"].get(str(label))
        lines.append(f"{name:<14}{summary['dice_before'][label]:>12.3f}"
                     f"{(after if after is not None else float('nan')):>8.3f}")
    lines.append(f"{'mean':<14}{report['mean_dice_before']:>12.3f}{report['mean_dice']:>8.3f}")
    lines.append(f"folding {report['folding_percent']:.3f}% of voxels, SDlogJ "
                 f"{report['sdlogj']:.3f}; registration {report['runtime_seconds']:.1f} s on "
                 f"{report['device']}; demo total {summary['total_seconds']:.1f} s")
    for name, path in summary["written"].items():
        lines.append(f"{name + ':':<15}{path}")
    return "\n".join(lines)
