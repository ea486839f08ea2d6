"""Checks that keep ``tfreg register`` from failing silently across contrasts.

Two checks on images normalised to [0, 1] (`tfreg.instance.normalize_image`):

* **Worse than its start**: the fixed image is compared with the moving image unregistered, after
  the affine stage and after the whole registration under two measures that do not assume a
  shared contrast: normalised mutual information (`tfreg.ops.mutual_information`, 32 bins;
  global) and the mean L1 distance of MIND-SSC descriptors (`tfreg.ops.mind`; local). The result
  is flagged when both say it is worse than a start: the final NMI below it by more than
  `WORSE_MARGIN` of its information part (``NMI - 1``), and the final MIND distance above it by
  more than `WORSE_MARGIN`. Requiring both keeps a small drift of the global NMI during a
  successful deformable stage from raising a false alarm.
* **Contrast hint**, from histograms of the foregrounds (voxels above `FOREGROUND`): the one-dimensional intensity distributions are compared by the mean absolute
  difference of their quantile functions (the 1-Wasserstein distance, in normalised intensity
  units), and the joint one by the correlation of the two intensities before registration (a
  same-contrast similarity would have pushed it up). Scans of one contrast have close distributions and a positive
  correlation; T1 against T2 (CSF bright, white matter dark) gives a distance above
  `HINT_DISTANCE` or a correlation below `HINT_CORRELATION`. With a same-contrast similarity
  (``ncc``, ``mse``) register then suggests ``--similarity mind``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["ContrastReport", "histogram_distance", "foreground_correlation", "nmi", "check",
           "WORSE_MARGIN", "HINT_DISTANCE", "HINT_CORRELATION", "FOREGROUND", "CHECK_VOXELS",
           "measures", "mind_l1"]

#: the result is "worse" when ``NMI_final - 1 < (1 - WORSE_MARGIN) (NMI_start - 1)``.
WORSE_MARGIN = 0.02
#: histogram distance above which two images are taken to have different contrasts.
HINT_DISTANCE = 0.12
#: foreground intensity correlation below which two images are taken to have different contrasts.
HINT_CORRELATION = 0.0
#: normalised intensity above which a voxel counts as foreground for the histogram check.
FOREGROUND = 0.05
#: the worse-than-start measures run on images average-pooled (`tfreg.ops.filters.pool_half`)
#: until they have at most this many voxels: a coarse check, an eighth of the cost per halving.
CHECK_VOXELS = 2**18
#: similarities that assume one contrast.
SAME_CONTRAST = ("ncc", "mse", "mk_lncc")


@dataclass
class ContrastReport:
    """Outcome of `check` (JSON-safe with `to_dict`).

    Attributes:
        nmi_before: NMI of the unregistered pair.
        nmi_affine: NMI after the affine stage (None without one).
        nmi_after: NMI of the result.
        mind_before, mind_affine, mind_after: the same for the MIND-SSC L1 distance (lower is
            more similar).
        worse_than_start: the result is less similar than the start (see module docstring).
        histogram_distance: 1-Wasserstein distance of the foreground intensity distributions.
        foreground_correlation: correlation of the two images' intensities over their common
            foreground, before registration.
        different_contrasts: ``histogram_distance > HINT_DISTANCE`` or
            ``foreground_correlation < HINT_CORRELATION``.
        warnings: one-line messages for the user (empty when all is well).
    """

    nmi_before: float
    nmi_affine: float | None
    nmi_after: float
    mind_before: float
    mind_affine: float | None
    mind_after: float
    worse_than_start: bool
    histogram_distance: float
    foreground_correlation: float
    different_contrasts: bool
    warnings: list[str]

    def to_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def histogram_distance(fixed: np.ndarray, moving: np.ndarray, foreground: float = FOREGROUND,
                       quantiles: int = 101) -> float:
    """Mean absolute difference of the quantile functions of two images' foreground intensities
    (values in [0, 1]); 0 for equal distributions, at most 1."""
    out = []
    for image in (fixed, moving):
        values = np.asarray(image, np.float32).ravel()
        values = values[values > foreground]
        if values.size == 0:
            return 0.0
        out.append(np.quantile(values, np.linspace(0.0, 1.0, quantiles)))
    return float(np.mean(np.abs(out[0] - out[1])))


def foreground_correlation(fixed: np.ndarray, moving: np.ndarray,
                           foreground: float = FOREGROUND) -> float:
    """Pearson correlation of two images over the voxels where both exceed `foreground` (inside
    the tissue of both, so the edge between tissue and background does not count)."""
    a = np.asarray(fixed, np.float64).ravel()
    b = np.asarray(moving, np.float64).ravel()
    keep = (a > foreground) & (b > foreground)
    if keep.sum() < 3:
        return 1.0
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 1.0


def nmi(fixed: np.ndarray, moving: np.ndarray, bins: int = 32) -> float:
    """Normalised mutual information of two images (`(*S,)` arrays) in [1, 2]."""
    from tfreg.ops.mutual_information import normalized_mutual_information

    a = np.asarray(fixed, np.float32)[None, ..., None]
    b = np.asarray(moving, np.float32)[None, ..., None]
    return float(normalized_mutual_information(a, b, bins=bins)[0])


def mind_l1(fixed: np.ndarray, moving: np.ndarray) -> float:
    """Mean L1 distance of the MIND-SSC descriptors of two images (`(*S,)` arrays)."""
    return float(measures(fixed, [moving], max_voxels=None)[1][0])


def _halvings(shape: tuple[int, ...], max_voxels: int | None) -> int:
    """How many `pool_half` steps bring `shape` to at most `max_voxels` voxels (none below 8)."""
    count, shape = 0, tuple(shape)
    while max_voxels is not None and np.prod(shape) > max_voxels and min(shape) > 8:
        shape, count = tuple(-(-s // 2) for s in shape), count + 1
    return count


def _measures(fixed, others, halvings: int):
    import tensorflow as tf

    from tfreg.ops.filters import pool_half
    from tfreg.ops.mind import mind_distance, mind_ssc
    from tfreg.ops.mutual_information import normalized_mutual_information

    for _ in range(halvings):
        fixed, others = pool_half(fixed), pool_half(others)
    count = others.shape[0]
    nmi_values = normalized_mutual_information(tf.repeat(fixed, count, axis=0), others, bins=32)
    distance = mind_distance(mind_ssc(fixed), mind_ssc(others), "l1")
    return nmi_values, tf.reduce_mean(distance, axis=list(range(1, len(distance.shape))))


def measures(fixed: np.ndarray, others: list[np.ndarray], max_voxels: int | None = CHECK_VOXELS
             ) -> tuple[np.ndarray, np.ndarray]:
    """NMI (32 bins, as `nmi`) and mean MIND-SSC L1 distance of `fixed` against each of `others`
    (`(*S,)` arrays of one shape), on the images average-pooled (`pool_half`) to at most
    `max_voxels` voxels (None: full resolution).

    Returns:
        `(len(others),)` NMI values and `(len(others),)` MIND distances (float64).
    """
    halvings = _halvings(np.shape(fixed), max_voxels)
    batch = np.stack([np.asarray(o, np.float32) for o in others])[..., None]
    # eager: tracing a graph (7 s) or compiling it with XLA (30 s) costs more than it saves in
    # this one-off check (3 s eagerly at 96x112x96 on one loaded core)
    nmi_values, distances = _measures(np.asarray(fixed, np.float32)[None, ..., None], batch,
                                      halvings)
    return np.asarray(nmi_values, np.float64), np.asarray(distances, np.float64)


def check(fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray,
          affine_warped: np.ndarray | None, similarity: str,
          max_voxels: int | None = CHECK_VOXELS) -> ContrastReport:
    """Run both checks on normalised images on the fixed grid.

    Args:
        fixed, moving: `(*S,)` images in [0, 1], the moving one unregistered (resampled onto the
            fixed grid).
        warped: the registered moving image.
        affine_warped: the moving image after the affine stage only, or None.
        similarity: the similarity the registration used (``ncc``, ``mse``, ``mind``, ``nmi``).
        max_voxels: NMI and MIND are measured on the images average-pooled to at most this
            many voxels (`measures`; None: full resolution); the contrast hint uses every voxel.
    """
    others = [moving, warped] + ([] if affine_warped is None else [affine_warped])
    nmi_values, mind_values = measures(fixed, others, max_voxels)
    before, after, *affine = [float(v) for v in nmi_values]
    m_before, m_after, *m_affine = [float(v) for v in mind_values]
    affine = affine[0] if affine else None
    m_affine = m_affine[0] if m_affine else None
    starts = {"the unregistered images": (before, m_before)}
    if affine is not None:
        starts["the affine stage"] = (affine, m_affine)
    worse = [name for name, (value, m_value) in starts.items()
             if after - 1.0 < (1.0 - WORSE_MARGIN) * (value - 1.0)
             and m_after > (1.0 + WORSE_MARGIN) * m_value]
    distance = histogram_distance(fixed, moving)
    correlation = foreground_correlation(fixed, moving)
    different = distance > HINT_DISTANCE or correlation < HINT_CORRELATION
    warnings = []
    if worse:
        ref = max(starts[name][0] for name in worse)
        warnings.append(f"warning: the result matches the fixed image less than "
                        f"{' and '.join(worse)} (normalised mutual information {ref:.3f} -> "
                        f"{after:.3f}); check the result"
                        + (f", or use --similarity mind" if similarity in SAME_CONTRAST else ""))
    if different and similarity in SAME_CONTRAST:
        warnings.append(f"hint: the intensity histograms suggest different contrasts (such as T1 "
                        f"and T2: distance {distance:.2f}, foreground correlation "
                        f"{correlation:+.2f}); --similarity {similarity} assumes one contrast: "
                        "use --similarity mind (or nmi)")
    return ContrastReport(before, affine, after, m_before, m_affine, m_after, bool(worse),
                          distance, correlation,
                          bool(different), warnings)
