"""Bring a volume onto a network's input grid, and map results back onto the original grid.

Steps, in this order, each recorded in a `PrepRecord` so that it can be inverted:

1. geometry, one interpolation (or an exact copy):
   * optional resampling to a voxel size ``spacing`` (mm), linear for images, nearest for labels;
   * crop/pad to ``shape``, centred on the volume (``fit: center``) or on the bounding box of
     the foreground (``fit: foreground``: voxels above ``threshold``, default: above the image
     minimum). Padding uses the image minimum (0 for labels). Without resampling the crop
     offsets are whole voxels and the values are copied exactly.
2. intensity normalisation (images only), with statistics of the whole original volume:
   ``minmax`` to [0, 1], ``zscore`` (mean 0, std 1), ``percentile`` (clip to the
   ``percentiles`` [p_low, p_high], then to [0, 1]), or ``none``.

The geometry is a voxel-to-voxel affine map ``matrix`` from the preprocessed grid to the original
grid (``x_orig = matrix @ [x_prep, 1]``), so the preprocessed grid's world affine is
``source_affine @ matrix`` (`PrepRecord.affine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from scipy import ndimage

from tfreg.data import _checks as chk
from tfreg.errors import InputError
from tfreg.io import Volume
from tfreg.ops.intensity import MODES as INTENSITY_MODES
from tfreg.ops.intensity import IntensityMap, fit_intensity_map

__all__ = ["Preprocessing", "PrepRecord", "field_to_source", "affine_to_source", "NORMALIZE", "FITS"]

NORMALIZE = INTENSITY_MODES
FITS = ("center", "foreground")
_KEYS = ("shape", "spacing", "fit", "threshold", "normalize", "percentiles")


def _embed(matrix: np.ndarray) -> np.ndarray:
    """`(N+1, N+1)` homogeneous voxel map -> `(4, 4)` (identity on the missing axis for 2D)."""
    n = matrix.shape[0] - 1
    out = np.eye(4)
    out[:n, :n] = matrix[:n, :n]
    out[:n, 3] = matrix[:n, n]
    return out


def _is_shift(matrix: np.ndarray) -> bool:
    """Whether a homogeneous voxel map is a translation by whole voxels."""
    n = matrix.shape[0] - 1
    shift = matrix[:n, n]
    return bool(np.array_equal(matrix[:n, :n], np.eye(n))
                and np.array_equal(shift, np.round(shift)))


def _regrid(data: np.ndarray, matrix: np.ndarray, shape: tuple[int, ...], order: int,
            fill: float | None) -> np.ndarray:
    """Sample `data (*S_in)` at ``matrix @ [x, 1]`` for every voxel `x` of `shape`.

    `fill` a number: constant outside; None: nearest border voxel. Whole-voxel shifts are copied
    exactly (no interpolation); other maps use `scipy.ndimage.affine_transform` (grid-constant).
    """
    n = len(shape)
    if _is_shift(matrix):
        starts = [int(v) for v in matrix[:n, n]]
        if fill is None:
            index = [np.clip(np.arange(s, s + m), 0, k - 1)
                     for s, m, k in zip(starts, shape, data.shape)]
            return data[np.ix_(*index)]
        out = np.full(shape, fill, dtype=data.dtype)
        src, dst = [], []
        for s, m, k in zip(starts, shape, data.shape):
            lo, hi = max(s, 0), min(s + m, k)
            if hi <= lo:
                return out
            src.append(slice(lo, hi))
            dst.append(slice(lo - s, hi - s))
        out[tuple(dst)] = data[tuple(src)]
        return out
    mode = "nearest" if fill is None else "grid-constant"
    return ndimage.affine_transform(data, matrix[:n, :n], offset=matrix[:n, n], output_shape=shape,
                                    order=order, mode=mode, cval=0.0 if fill is None else fill,
                                    prefilter=False)


@dataclass(frozen=True)
class PrepRecord:
    """What `Preprocessing` did to one volume; enough to invert it.

    Attributes:
        source_shape: spatial shape of the original volume.
        source_affine: `(4, 4)` voxel-to-world matrix of the original volume.
        shape: spatial shape after preprocessing (the network input shape).
        matrix: `(N+1, N+1)` homogeneous map from a preprocessed voxel to an original voxel.
        background: original intensity used outside the original grid (its minimum).
        offset, scale, clip: intensity map ``(clip(x, *clip) - offset) * scale`` (clip None: no
            clipping).
    """

    source_shape: tuple[int, ...]
    source_affine: np.ndarray
    shape: tuple[int, ...]
    matrix: np.ndarray
    background: float = 0.0
    offset: float = 0.0
    scale: float = 1.0
    clip: tuple[float, float] | None = None

    @property
    def ndims(self) -> int:
        return len(self.shape)

    @property
    def affine(self) -> np.ndarray:
        """`(4, 4)` voxel-to-world matrix of the preprocessed grid."""
        return np.asarray(self.source_affine, np.float64) @ _embed(self.matrix)

    def normalize(self, data: np.ndarray) -> np.ndarray:
        """Apply the intensity map to an array of original intensities; float32."""
        return IntensityMap(self.offset, self.scale, self.clip).apply(data)

    def restore(self, array: np.ndarray, order: int = 1, fill_value: float | None = 0.0
                ) -> np.ndarray:
        """Map an array on the preprocessed grid back onto the original grid.

        Args:
            array: `(*shape,)` or `(*shape, C)` (channels resampled one by one; a displacement
                field needs `field_to_source` instead, which also converts its values).
            order: 1 linear (images), 0 nearest (labels, dtype kept).
            fill_value: value where the original grid lies outside the preprocessed region
                (e.g. cropped away); None: nearest border voxel.

        Returns:
            `(*source_shape,)` or `(*source_shape, C)`.
        """
        array = np.asarray(array)
        if tuple(array.shape[: self.ndims]) != tuple(self.shape):
            raise ValueError(f"`array` must have spatial shape {self.shape}. "
                             f"Received: array.shape={array.shape}")
        inverse = np.linalg.inv(self.matrix)
        inverse = np.where(np.abs(inverse - np.rint(inverse)) < 1e-9, np.rint(inverse), inverse)
        if array.dtype.kind == "f" or order > 0:
            array = array.astype(np.float32, copy=False)
        if array.ndim == self.ndims:
            return _regrid(array, inverse, self.source_shape, order, fill_value)
        return np.stack([_regrid(array[..., c], inverse, self.source_shape, order, fill_value)
                         for c in range(array.shape[-1])], axis=-1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (lists and floats)."""
        return {
            "source_shape": list(self.source_shape),
            "source_affine": np.asarray(self.source_affine).tolist(),
            "shape": list(self.shape),
            "matrix": np.asarray(self.matrix).tolist(),
            "background": float(self.background),
            "offset": float(self.offset),
            "scale": float(self.scale),
            "clip": None if self.clip is None else [float(v) for v in self.clip],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PrepRecord":
        return cls(tuple(d["source_shape"]), np.asarray(d["source_affine"], np.float64),
                   tuple(d["shape"]), np.asarray(d["matrix"], np.float64),
                   float(d["background"]), float(d["offset"]), float(d["scale"]),
                   None if d.get("clip") is None else tuple(d["clip"]))


@dataclass(frozen=True)
class Preprocessing:
    """Settings of the preprocessing (see the module docstring).

    Args:
        shape: network input shape `(*S,)`, 2 or 3 ints.
        spacing: target voxel size in mm per axis, or None to keep the file's grid.
        fit: ``"center"`` or ``"foreground"``: where the crop/pad window is centred.
        threshold: foreground = voxels above this intensity (None: above the image minimum).
        normalize: ``"minmax"``, ``"zscore"``, ``"percentile"`` or ``"none"``.
        percentiles: `[p_low, p_high]` in percent for ``"percentile"``.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None = None
    fit: str = "center"
    threshold: float | None = None
    normalize: str = "minmax"
    percentiles: tuple[float, float] = field(default=(1.0, 99.0))

    @property
    def ndims(self) -> int:
        return len(self.shape)

    # ------------------------------------------------------------------ settings <-> dict
    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-safe settings (stored with exported models)."""
        return {
            "shape": list(self.shape),
            "spacing": None if self.spacing is None else list(self.spacing),
            "fit": self.fit,
            "threshold": self.threshold,
            "normalize": self.normalize,
            "percentiles": list(self.percentiles),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "preprocessing",
                  prefix: str = "") -> "Preprocessing":
        """Validated settings; ``ConfigError`` ``"<source>: <prefix><key>: <problem>"``."""
        chk.check_keys(d, _KEYS, source, prefix)
        if "shape" not in d:
            raise chk.fail(source, f"{prefix}shape", "missing (the network input shape)")
        shape = chk.int_list(d["shape"], source, f"{prefix}shape")
        spacing = d.get("spacing")
        if spacing is not None:
            spacing = chk.number_list(spacing, source, f"{prefix}spacing", lengths=(len(shape),))
        fit = chk.choice(d.get("fit", "center"), FITS, source, f"{prefix}fit")
        threshold = d.get("threshold")
        if threshold is not None:
            threshold = chk.number(threshold, source, f"{prefix}threshold")
        normalize = d.get("normalize", "minmax")
        normalize = "none" if normalize is False or normalize is None else normalize
        normalize = chk.choice(normalize, NORMALIZE, source, f"{prefix}normalize")
        pct = chk.number_list(d.get("percentiles", [1.0, 99.0]), source, f"{prefix}percentiles",
                              lengths=(2,), positive=False)
        if not 0 <= pct[0] < pct[1] <= 100:
            raise chk.fail(source, f"{prefix}percentiles",
                           f"expected 0 <= p_low < p_high <= 100, got {list(pct)}")
        return cls(shape, spacing, fit, threshold, normalize, (pct[0], pct[1]))

    # ------------------------------------------------------------------------- planning
    def plan(self, volume: Volume, label: bool = False) -> PrepRecord:
        """Compute the geometry and intensity map for one volume (nothing is resampled yet).

        Args:
            volume: an image (or, with `label`, a label map whose foreground is ``> 0``).

        Raises:
            InputError: the volume's number of axes differs from `shape`'s.
        """
        if volume.vector:
            raise InputError(f"{volume.path or 'volume'}: cannot preprocess a vector field")
        data = volume.data
        src_shape = tuple(int(s) for s in data.shape)
        n = len(src_shape)
        if n != self.ndims:
            raise InputError(f"{volume.path or 'volume'}: is {n}D {src_shape}, but the input "
                             f"shape {list(self.shape)} is {self.ndims}D")
        background = 0.0 if label else float(data.min()) if data.size else 0.0
        out_centre = (np.asarray(self.shape, np.float64) - 1) / 2
        if self.spacing is None:
            zoom = np.ones(n)
        else:
            zoom = np.asarray(self.spacing, np.float64) / np.asarray(volume.spacing, np.float64)
        centre = (np.asarray(src_shape, np.float64) - 1) / 2
        if self.fit == "foreground":
            threshold = self.threshold if self.threshold is not None else background
            threshold = 0 if label else threshold
            mask = data > threshold
            if mask.any():
                lo, hi = [], []
                for d in range(n):
                    hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(n) if a != d)))
                    lo.append(hits[0])
                    hi.append(hits[-1])
                centre = (np.asarray(lo, np.float64) + np.asarray(hi, np.float64)) / 2
        matrix = np.eye(n + 1)
        if np.all(zoom == 1.0):
            matrix[:n, n] = np.floor(centre - out_centre)  # whole voxels: exact crop/pad
        else:
            matrix[:n, :n] = np.diag(zoom)
            matrix[:n, n] = centre - zoom * out_centre
        imap = IntensityMap() if label else fit_intensity_map(data, self.normalize, self.percentiles)
        offset, scale, clip = imap.offset, imap.scale, imap.clip
        return PrepRecord(src_shape, np.asarray(volume.affine, np.float64), tuple(self.shape),
                          matrix, background, offset, scale, clip)

    def apply(self, volume: Volume, record: PrepRecord | None = None, label: bool = False
              ) -> np.ndarray:
        """Preprocess one volume.

        Args:
            volume: image or label map on its original grid.
            record: from `plan` on the image; pass the image's record when preprocessing its
                label map so both get the same geometry (default: planned from `volume`).
            label: nearest interpolation, padding 0, no normalisation, int32 result.

        Returns:
            `(*shape,)` float32 image or int32 label map.

        Raises:
            InputError: `volume`'s shape differs from the one the record was planned on.
        """
        record = record or self.plan(volume, label=label)
        if tuple(volume.shape) != tuple(record.source_shape):
            raise InputError(f"{volume.path or 'volume'}: shape {tuple(volume.shape)} differs from "
                             f"its image's {tuple(record.source_shape)}")
        if label:
            out = _regrid(volume.data.astype(np.int32, copy=False), record.matrix, record.shape,
                          0, 0)
            return out.astype(np.int32, copy=False)
        data = volume.data.astype(np.float32, copy=False)
        out = _regrid(data, record.matrix, record.shape, 1, record.background)
        return record.normalize(out)


def field_to_source(disp: np.ndarray, fixed: PrepRecord, moving: PrepRecord | None = None
                    ) -> np.ndarray:
    """Convert a displacement predicted on preprocessed grids into one on the original fixed grid.

    With ``F``/``M`` the preprocessed-to-original voxel maps of the fixed and moving images, for an
    original fixed voxel ``x``: ``x' = F^-1 x``, ``y = M (x' + u'(x'))``, result ``u(x) = y - x``
    (pull, voxels of the original grids; it assumes both original images share one grid, e.g.
    after `tfreg.io.resample_to_grid`). ``u'`` is interpolated linearly and extended by its border
    values where the original grid reaches beyond the preprocessed region.

    Args:
        disp: `(*shape, N)` displacement on the preprocessed fixed grid, voxels.
        fixed: record of the fixed image.
        moving: record of the moving image (default: the same as `fixed`).

    Returns:
        `(*fixed.source_shape, N)` float32.
    """
    moving = fixed if moving is None else moving
    disp = np.asarray(disp, np.float32)
    n = fixed.ndims
    if disp.shape != (*fixed.shape, n):
        raise ValueError(f"`disp` must have shape {(*fixed.shape, n)}. Received: {disp.shape}")
    f_mat, m_mat = np.asarray(fixed.matrix), np.asarray(moving.matrix)
    if np.array_equal(f_mat, m_mat) and np.array_equal(f_mat[:n, :n], np.eye(n)):
        # the same shift on both sides: u(x) = u'(x - t)
        return fixed.restore(disp, order=1, fill_value=None)
    inverse = np.linalg.inv(f_mat)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in fixed.source_shape],
                                indexing="ij"))  # (N, *S)
    prep = np.tensordot(inverse[:n, :n], grid, axes=1) + inverse[:n, n].reshape((n,) + (1,) * n)
    moved = prep + np.stack([ndimage.map_coordinates(disp[..., c], prep, order=1, mode="nearest")
                             for c in range(n)])
    target = np.tensordot(m_mat[:n, :n], moved, axes=1) + m_mat[:n, n].reshape((n,) + (1,) * n)
    return np.moveaxis(target - grid, 0, -1).astype(np.float32)


def affine_to_source(affine: np.ndarray, fixed: PrepRecord, moving: PrepRecord | None = None
                     ) -> np.ndarray:
    """Convert an affine found on preprocessed grids into one on the original fixed grid.

    The affine counterpart of `field_to_source`, exact: with ``F``/``M`` the preprocessed-to-
    original voxel maps, the original map is ``M H' F^-1`` (``H'`` the homogeneous form of
    `affine`); both original images are assumed to share one grid.

    Args:
        affine: `(N, N+1)` centred voxel affine of the preprocessed fixed grid (preprocessed
            fixed voxel -> preprocessed moving voxel, ``y = A (x - c) + b + c``,
            ``c = (fixed.shape - 1) / 2``).
        fixed, moving: the records (`moving` defaults to `fixed`).

    Returns:
        `(N, N+1)` float64 centred voxel affine of the original fixed grid
        (``c = (fixed.source_shape - 1) / 2``).
    """
    from tfreg.transforms_io import centred_affine, homogeneous_affine

    moving = fixed if moving is None else moving
    h = homogeneous_affine(affine, fixed.shape)
    full = np.asarray(moving.matrix, np.float64) @ h @ np.linalg.inv(fixed.matrix)
    return centred_affine(full, fixed.source_shape)
