"""World-space initial alignment of two images, each measured on its own grid.

`tfreg register` used to resample the moving image onto the fixed grid through the two headers
first and align centres of mass afterwards. When the headers disagree about where the head is (an
origin at a corner against a centred template), that resampling keeps only a corner of the brain
and nothing later can recover the rest. Here the foreground of each image is measured on its own
grid, in physical units, before anything is resampled:

* **headers**: the identity (the headers are trusted as they are);
* **centres**: a translation aligning the centres of the two foregrounds (their first moments, in
  mm);
* **centres, rotation k**: the same composed with one of the 23 other right-angle rotations about
  the centres (signed axis permutations with determinant +1): every orientation a header can
  state wrongly. Smaller rotations are the affine stage's job.

Each candidate is scored by the normalised mutual information of the two images, blurred by
`SCORE_SIGMA_MM`, on a coarse sample of the fixed grid (`tfreg.ops.mutual_information`, 16 bins; any contrasts). The centres
replace the headers when they score `TIE_MARGIN` higher, and the best rotation replaces that
choice only when it scores `ROTATION_MARGIN` higher. So headers that already agree are kept, and a
header rotated by 90 degrees or shifted by 100 mm is undone before the affine stage. Principal
axes (second moments) were tried as candidates too: on near-symmetric heads two of them are
almost degenerate, their in-plane angle is arbitrary, and mutual information picked such a
rotation over the right one on a synthetic pair.

Coordinates: the returned `voxel_map` `G` is an `(N+1, N+1)` matrix from fixed-grid voxels to
fixed-grid voxels: the fixed voxel ``x`` looks at the moving image resampled onto the fixed grid by
the headers at ``G x`` (that image extended beyond the fixed grid). `centred` gives it as a
centred affine ``[A | b]`` (``y = A (x - c) + b + c``, ``c = (shape - 1) / 2``), the convention of
`tfreg.instance`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from tfreg.io import Volume

__all__ = ["Initialisation", "initial_alignment", "coverage_warning", "fixed_to_moving",
           "foreground_mask", "COVERAGE_WARN", "COVERAGE_REFUSE"]

#: foreground: normalised intensity (0..1 by the 0th and 99.9th percentiles) above this.
FOREGROUND = 0.1
#: at most this many voxels per image enter the moments, and about this many the scores.
MOMENT_POINTS = 200_000
SCORE_POINTS = 40_000
#: the scores compare images blurred by this Gaussian sigma (mm) in histograms of this many bins:
#: unblurred, a half turn of a synthetic head scored above the right orientation (small residual
#: misalignment and noise dominate the joint histogram); blurred by 4 mm (2 voxels) it did not.
SCORE_SIGMA_MM = 4.0
SCORE_BINS = 16
#: NMI (in [1, 2]) by which the centres must beat the headers, and a rotation the better of the
#: two, to be chosen. A header that is wrong by a right angle loses 0.1 or more (0.12 on the test
#: pair; OASIS <- MNI template: 1.31 vs 1.18 at best); two different subjects far apart (a
#: benchmark pair at Dice 0.12 before registration) let a wrong rotation win by 0.006.
TIE_MARGIN = 0.005
ROTATION_MARGIN = 0.03
#: share of the fixed foreground inside the moving field of view after the initialisation below
#: which `tfreg register` warns, and below which it refuses (a 2-slice slab of a 28-slice head
#: covers 14%, a 6-slice slab 43%).
COVERAGE_WARN = 0.6
COVERAGE_REFUSE = 0.2


@dataclass
class Initialisation:
    """The chosen initial alignment.

    Attributes:
        voxel_map: `(N+1, N+1)` map ``G`` of fixed-grid voxels (see the module docstring).
        method: ``"headers"``, ``"centres"`` or ``"centres, rotation k"``.
        coverage: share of the fixed foreground whose mapped point lies inside the moving grid.
        scores: NMI of every candidate (the module's order).
    """

    voxel_map: np.ndarray
    method: str
    coverage: float
    scores: dict[str, float] = field(default_factory=dict)

    def centred(self, shape) -> np.ndarray:
        """``G`` as a centred `(N, N+1)` affine on a grid of `shape`."""
        n = len(shape)
        c = (np.asarray(shape, np.float64) - 1.0) / 2.0
        a = self.voxel_map[:n, :n]
        b = self.voxel_map[:n, :n] @ c + self.voxel_map[:n, n] - c
        return np.concatenate([a, b[:, None]], axis=1)

    def to_dict(self) -> dict:
        return {"method": self.method, "coverage": round(float(self.coverage), 4),
                "nmi": {k: round(float(v), 5) for k, v in self.scores.items()}}


def fixed_to_moving(fixed: Volume, moving: Volume) -> np.ndarray:
    """`(N+1, N+1)` voxel map from the fixed grid to the moving grid through world space (for 2D
    volumes both grids are taken at the third array index 0)."""
    n = fixed.ndims
    full = np.linalg.inv(moving.affine) @ fixed.affine
    keep = list(range(n)) + [3]
    return full[np.ix_(keep, keep)]


def normalise(data: np.ndarray) -> np.ndarray:
    """Intensities in [0, 1] by the image's own 0th and 99.9th percentiles (float32)."""
    from tfreg.ops.intensity import normalize_percentile

    return normalize_percentile(data, 0.0, 99.9)


def foreground_mask(normalised: np.ndarray) -> np.ndarray:
    """Foreground of a normalised image: above `FOREGROUND` (boolean `(*S,)`)."""
    return np.asarray(normalised) > FOREGROUND


def _stride(shape, points: int) -> int:
    return max(1, int(math.ceil((float(np.prod(shape)) / points) ** (1.0 / len(shape)))))


def _foreground_points(mask: np.ndarray) -> np.ndarray:
    """`(K, N)` voxel coordinates of the foreground, on a regular subsample."""
    s = _stride(mask.shape, MOMENT_POINTS)
    sub = mask[tuple(slice(None, None, s) for _ in mask.shape)]
    return np.argwhere(sub).astype(np.float64) * s


def _homogeneous(matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    n = len(offset)
    out = np.eye(n + 1)
    out[:n, :n] = matrix
    out[:n, n] = offset
    return out


def _right_angle_rotations(n: int) -> list[np.ndarray]:
    """The signed permutation matrices with determinant +1 (24 in 3D, 4 in 2D), identity first:
    every orientation a header can state wrongly by axis order and direction."""
    out = []
    for perm in itertools.permutations(range(n)):
        for signs in itertools.product((1.0, -1.0), repeat=n):
            m = np.zeros((n, n))
            m[np.arange(n), perm] = signs
            if np.linalg.det(m) > 0:
                out.append(m)
    out.sort(key=lambda m: -np.trace(m))  # identity first
    return out


def _candidates(fixed_mask: np.ndarray, moving_mask: np.ndarray, to_fixed: np.ndarray,
                spacing: np.ndarray) -> dict[str, np.ndarray]:
    """Candidate maps ``G`` (fixed voxels -> fixed voxels), in preference order."""
    n = fixed_mask.ndim
    out = {"headers": np.eye(n + 1)}
    pf = _foreground_points(fixed_mask)
    pm = _foreground_points(moving_mask)
    if len(pf) < n + 1 or len(pm) < n + 1:
        return out
    pm = pm @ to_fixed[:n, :n].T + to_fixed[:n, n]  # moving voxels -> fixed-grid voxels
    cf = (pf * spacing).mean(axis=0)
    cm = (pm * spacing).mean(axis=0)
    scale = np.diag(spacing)
    unscale = np.diag(1.0 / spacing)
    for k, rotation in enumerate(_right_angle_rotations(n)):
        # x_mm -> R (x_mm - cf) + cm, written in fixed voxels
        name = "centres" if k == 0 else f"centres, rotation {k}"
        out[name] = _homogeneous(unscale @ rotation @ scale, unscale @ (cm - rotation @ cf))
    return out


def _sample(moving: np.ndarray, coords: np.ndarray, fill: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.map_coordinates(moving, coords.T, order=1, mode="constant", cval=fill)


def _smooth(image: np.ndarray, spacing) -> np.ndarray:
    """Gaussian blur of `SCORE_SIGMA_MM` (on the image's own grid, sigma in its voxels)."""
    from scipy import ndimage

    sigma = [SCORE_SIGMA_MM / float(s) for s in spacing[:image.ndim]]
    return ndimage.gaussian_filter(image, sigma, truncate=2.5)


def _score_grid(shape) -> np.ndarray:
    """`(K, N)` fixed voxel coordinates of the coarse scoring sample."""
    s = _stride(shape, SCORE_POINTS)
    axes = [np.arange(s // 2, n, s, dtype=np.float64) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(shape))


def coverage(fixed_mask: np.ndarray, voxel_map: np.ndarray, to_moving: np.ndarray,
             moving_shape) -> float:
    """Share of the fixed foreground whose point ``T G x`` lies inside the moving grid."""
    n = fixed_mask.ndim
    points = _foreground_points(fixed_mask)
    if not len(points):
        return 0.0
    full = to_moving @ voxel_map
    mapped = points @ full[:n, :n].T + full[:n, n]
    inside = np.all((mapped >= -0.5) & (mapped <= np.asarray(moving_shape) - 0.5), axis=1)
    return float(inside.mean())


def initial_alignment(fixed: Volume, moving: Volume) -> Initialisation:
    """Choose the initial alignment of `moving` to `fixed` (see the module docstring).

    Args:
        fixed, moving: volumes on their own grids (any orientation, origin and spacing; 2D or 3D,
            the same number of axes).

    Returns:
        `Initialisation` with the map, the chosen candidate, the coverage and all scores.
    """
    from tfreg.ops.mutual_information import normalized_mutual_information

    n = fixed.ndims
    to_moving = fixed_to_moving(fixed, moving)
    to_fixed = np.linalg.inv(to_moving)
    fixed_n, moving_n = normalise(fixed.data), normalise(moving.data)
    fixed_mask, moving_mask = foreground_mask(fixed_n), foreground_mask(moving_n)
    spacing = np.asarray(fixed.spacing[:n], np.float64)
    candidates = _candidates(fixed_mask, moving_mask, to_fixed, spacing)

    grid = _score_grid(fixed.shape)
    fixed_s, moving_s = _smooth(fixed_n, fixed.spacing), _smooth(moving_n, moving.spacing)
    fixed_values = fixed_s[tuple(grid.astype(int).T)]
    samples = []
    for g in candidates.values():
        full = to_moving @ g
        samples.append(_sample(moving_s, grid @ full[:n, :n].T + full[:n, n], 0.0))
    values = normalized_mutual_information(
        np.broadcast_to(fixed_values, (len(samples), len(fixed_values))).astype(np.float32),
        np.stack(samples).astype(np.float32), bins=SCORE_BINS).numpy()
    scores = {name: float(v) for name, v in zip(candidates, values)}
    best = "headers"
    if scores.get("centres", -np.inf) > scores["headers"] + TIE_MARGIN:
        best = "centres"
    rotations = [name for name in scores if name.startswith("centres, rotation")]
    if rotations:
        turned = max(rotations, key=scores.get)
        if scores[turned] > scores[best] + ROTATION_MARGIN:
            best = turned
    chosen = candidates[best]
    return Initialisation(chosen, best, coverage(fixed_mask, chosen, to_moving, moving.shape),
                          scores)


def coverage_warning(start: Initialisation, fixed_name: str, moving_name: str) -> str | None:
    """A warning line when the moving image covers less than `COVERAGE_WARN` of the fixed
    foreground after the initial alignment, else None.

    Raises:
        InputError: it covers less than `COVERAGE_REFUSE` (one line naming the moving file).
    """
    from tfreg.errors import InputError

    share = f"{100 * start.coverage:.0f}%"
    if start.coverage < COVERAGE_REFUSE:
        raise InputError(f"{moving_name}: covers only {share} of the foreground of the fixed "
                         f"image {fixed_name}, even after aligning centres and orientations; the "
                         "images do not show the same region")
    if start.coverage < COVERAGE_WARN:
        return (f"warning: the moving image covers only {share} of the fixed image's foreground "
                "after the initial alignment; the result outside it is extrapolated")
    return None
