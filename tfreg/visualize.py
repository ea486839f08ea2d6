"""One figure (PNG, JPEG, PDF or SVG) that shows how a registration went (matplotlib, no display needed).

Columns: fixed, moving, warped, |fixed - moving| (before), |fixed - warped| (after), the deformed
grid, and the Jacobian determinant of the transform (blue < 1 < red; folded voxels, det <= 0, in
black). Rows: the middle slice across each array axis (one row for 2D images). Slices are shown
in array axes (first in-plane axis vertical, second horizontal) with the physical aspect ratio from
the voxel sizes; this is not a radiological display convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from tfreg.errors import InputError

__all__ = ["show_registration", "show_result_dir", "image_format", "FORMATS"]


def _norm(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, [0.5, 99.5])
    if not hi > lo:
        hi = lo + 1.0
    return np.clip((image - lo) / (hi - lo), 0, 1)


def _slices(volume: np.ndarray, ndims: int) -> list[tuple[str, np.ndarray, tuple[int, int]]]:
    """`[(title, 2D slice, (row axis, column axis))]`: middle slice across each axis."""
    if ndims == 2:
        return [("", volume, (0, 1))]
    out = []
    for axis in range(3):
        index = volume.shape[axis] // 2
        plane = tuple(a for a in range(3) if a != axis)
        out.append((f"axis {axis} = {index}", np.take(volume, index, axis=axis), plane))
    return out


def _grid_lines(ax, disp2d: np.ndarray, spacing: int) -> None:
    """Draw the deformed grid `x + u(x)` of one slice: `disp2d (H, W, 2)` in-plane components."""
    h, w = disp2d.shape[:2]
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    y = rows + disp2d[..., 0]
    x = cols + disp2d[..., 1]
    for r in range(0, h, spacing):
        ax.plot(x[r, :], y[r, :], color="0.15", linewidth=0.6)
    for c in range(0, w, spacing):
        ax.plot(x[:, c], y[:, c], color="0.15", linewidth=0.6)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def show_registration(fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray,
                      disp: np.ndarray, out_png: str | Path, *,
                      spacing: Sequence[float] | None = None, title: str | None = None,
                      dpi: int = 110) -> Path:
    """Write the overview PNG.

    Args:
        fixed, moving, warped: `(*S,)` images on the fixed grid (moving already resampled).
        disp: `(*S, N)` displacement in voxels (pull).
        out_png: output path (written atomically).
        spacing: voxel sizes in mm (aspect ratio); default 1.
        title: figure title.

    Returns:
        The written path.

    Raises:
        InputError: the arrays do not share one grid.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, TwoSlopeNorm

    from tfreg.metrics import jacobian_determinant

    fixed, moving, warped = (np.asarray(a, np.float32) for a in (fixed, moving, warped))
    shape = fixed.shape
    ndims = len(shape)
    for name, arr in (("moving", moving), ("warped", warped)):
        if arr.shape != shape:
            raise InputError(f"{name}: shape {arr.shape} differs from the fixed image's {shape}")
    if disp.shape != (*shape, ndims):
        raise InputError(f"disp: shape {disp.shape} does not match the fixed grid {shape} "
                         f"with {ndims} components")
    spacing = tuple(spacing or (1.0,) * ndims)
    f, m, w = _norm(fixed), _norm(moving), _norm(warped)
    diff_before, diff_after = np.abs(f - m), np.abs(f - w)
    vmax_diff = max(float(np.percentile(diff_before, 99.5)), 1e-3)
    det = jacobian_determinant(disp)
    folded = det <= 0
    grid_step = max(2, min(shape) // 16)

    columns = ["fixed", "moving", "warped",
               f"|fixed - moving|\nmean {diff_before.mean():.3f}",
               f"|fixed - warped|\nmean {diff_after.mean():.3f}",
               "deformed grid", f"Jacobian det.\nfolding {100 * folded.mean():.3f}%"]
    rows = list(zip(_slices(f, ndims), _slices(m, ndims), _slices(w, ndims),
                    _slices(diff_before, ndims), _slices(diff_after, ndims),
                    _slices(disp, ndims), _slices(det, ndims), _slices(folded, ndims)))
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.1 * len(columns),
                                                              2.2 * len(rows) + 0.5),
                             squeeze=False, layout="constrained")
    det_norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)
    fold_cmap = ListedColormap([(0, 0, 0, 0), (0, 0, 0, 1)])
    for r, row in enumerate(rows):
        plane = row[0][2]
        aspect = spacing[plane[0]] / spacing[plane[1]]
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
            if c == 0 and row[0][0]:
                ax.set_ylabel(row[0][0], fontsize=8)
        for c in range(3):
            axes[r][c].imshow(row[c][1], cmap="gray", vmin=0, vmax=1, aspect=aspect,
                              interpolation="nearest")
        for c in (3, 4):
            axes[r][c].imshow(row[c][1], cmap="magma", vmin=0, vmax=vmax_diff, aspect=aspect,
                              interpolation="nearest")
        axes[r][5].imshow(row[0][1], cmap="gray", vmin=0, vmax=1, aspect=aspect, alpha=0.35,
                          interpolation="nearest")
        disp_slice = row[5][1][..., list(plane)] if ndims == 3 else row[5][1]
        _grid_lines(axes[r][5], disp_slice, grid_step)
        axes[r][5].set_aspect(aspect)
        im = axes[r][6].imshow(row[6][1], cmap="RdBu_r", norm=det_norm, aspect=aspect,
                               interpolation="nearest")
        axes[r][6].imshow(row[7][1].astype(np.uint8), cmap=fold_cmap, vmin=0, vmax=1,
                          aspect=aspect, interpolation="nearest")
    fig.colorbar(im, ax=list(axes[:, 6]), fraction=0.05, pad=0.02, shrink=0.8,
                 label="det J (black: <= 0)")
    if title:
        fig.suptitle(title, fontsize=10)
    from tfreg.io import atomic_path

    out_png = Path(out_png)
    kind = image_format(out_png)
    try:
        with atomic_path(out_png, suffix=out_png.suffix.lower()) as tmp:
            fig.savefig(tmp, dpi=dpi, format=kind)
    finally:
        plt.close(fig)
    return out_png


#: file suffix -> matplotlib format of the overview figure.
FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}


def image_format(path: str | Path) -> str:
    """The figure format its suffix names: PNG, JPEG, PDF or SVG.

    Raises:
        InputError: another or no suffix (``"view.tif: unsupported figure format '.tif' ..."``).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{path}: unsupported figure format '{suffix or '(none)'}' (use .png, "
                         ".jpg, .pdf or .svg)")
    return FORMATS[suffix]


def _recorded(path: str | None, result_dir: Path, report: dict) -> str | None:
    """An input path recorded in `report.json`: relative to the report's folder (reports that
    say ``paths_relative_to: report``), else as typed where `register` ran (older reports;
    tried relative to the report's folder too)."""
    if not path:
        return None
    if Path(path).is_absolute():
        return path
    beside = result_dir / path
    if report.get("paths_relative_to") == "report" or beside.exists():
        return str(beside)
    return path


def show_result_dir(result_dir: str | Path, out_png: str | Path | None = None, *,
                    fixed: str | Path | None = None, moving: str | Path | None = None) -> Path:
    """Overview PNG of a `tfreg register` output folder.

    Reads `warped.nii.gz`, `disp.nii.gz` and `report.json` (for the fixed and moving paths, unless
    given). The moving image is resampled onto the fixed grid when it lives on another one.

    Returns:
        The PNG path (default: `<result_dir>/overview.png`).
    """
    import json

    from tfreg.io import load_volume, resample_to_grid
    from tfreg.register import same_grid

    result_dir = Path(result_dir)
    if not result_dir.is_dir():
        raise InputError(f"{result_dir}: not a folder (expected the output folder of "
                         "'tfreg register')")
    report_path = result_dir / "report.json"
    report = {}
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except ValueError:
            raise InputError(f"{report_path}: not valid JSON") from None
    fixed = fixed or _recorded(report.get("fixed"), result_dir, report)
    moving = moving or _recorded(report.get("moving"), result_dir, report)
    if not fixed or not moving:
        raise InputError(f"{report_path}: no fixed/moving paths recorded; pass --fixed and "
                         "--moving")
    fixed_v = load_volume(fixed)
    moving_v = load_volume(moving)
    warped_v = load_volume(result_dir / "warped.nii.gz")
    disp_v = load_volume(result_dir / "disp.nii.gz", allow_vector=True)
    if not disp_v.vector:
        raise InputError(f"{result_dir / 'disp.nii.gz'}: not a displacement field")
    if warped_v.shape != fixed_v.shape or disp_v.shape != fixed_v.shape:
        raise InputError(f"{result_dir}: outputs have shape {warped_v.shape}, but the fixed image "
                         f"{fixed} has {fixed_v.shape}")
    moving_data = moving_v.data if same_grid(fixed_v, moving_v) else resample_to_grid(
        moving_v, fixed_v.affine, fixed_v.shape, order=1, fill_value=float(moving_v.data.min()))
    title = f"{Path(moving).name} -> {Path(fixed).name}"
    if report.get("mean_dice") is not None:
        title += (f"   Dice {report['mean_dice_before']:.3f} -> {report['mean_dice']:.3f}")
    return show_registration(fixed_v.data, moving_data, warped_v.data, disp_v.data,
                             out_png or result_dir / "overview.png", spacing=fixed_v.spacing,
                             title=title)
