"""Checks that keep ``tfreg register`` from failing silently across contrasts.

Two checks on images normalised to [0, 1] (`tfreg.instance.normalize_image`):

* **Worse than its start**: the fixed image is compared with the moving image unregistered, after
  the affine stage and after the whole registration under a measure that does not assume a shared
  contrast, normalised mutual information (`tfreg.ops.mutual_information`, 32 bins). When the
  final NMI is below either start by more than `WORSE_MARGIN` of its information part
  (``NMI - 1``), the result is flagged.
* **Contrast hint**: the intensity histograms of the two images' foregrounds (voxels above
  `FOREGROUND`) are compared by the mean absolute difference of their quantile functions (the
  1-Wasserstein distance, in normalised intensity units). Scans of one contrast differ by a few
  hundredths; a T1 against a T2 (CSF bright) by more than `HINT_DISTANCE`. With a
  same-contrast similarity (``ncc``, ``mse``) and distant histograms, register suggests
  ``--similarity mind``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["ContrastReport", "histogram_distance", "nmi", "check", "WORSE_MARGIN",
           "HINT_DISTANCE", "FOREGROUND"]

#: the result is "worse" when ``NMI_final - 1 < (1 - WORSE_MARGIN) (NMI_start - 1)``.
WORSE_MARGIN = 0.02
#: histogram distance above which two images are taken to have different contrasts.
HINT_DISTANCE = 0.12
#: normalised intensity above which a voxel counts as foreground for the histogram check.
FOREGROUND = 0.05
#: similarities that assume one contrast.
SAME_CONTRAST = ("ncc", "mse")


@dataclass
class ContrastReport:
    """Outcome of `check` (JSON-safe with `to_dict`).

    Attributes:
        nmi_before: NMI of the unregistered pair.
        nmi_affine: NMI after the affine stage (None without one).
        nmi_after: NMI of the result.
        worse_than_start: the result is less similar than the start (see module docstring).
        histogram_distance: 1-Wasserstein distance of the foreground intensity distributions.
        different_contrasts: ``histogram_distance > HINT_DISTANCE``.
        warnings: one-line messages for the user (empty when all is well).
    """

    nmi_before: float
    nmi_affine: float | None
    nmi_after: float
    worse_than_start: bool
    histogram_distance: float
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


def nmi(fixed: np.ndarray, moving: np.ndarray, bins: int = 32) -> float:
    """Normalised mutual information of two images (`(*S,)` arrays) in [1, 2]."""
    from tfreg.ops.mutual_information import normalized_mutual_information

    a = np.asarray(fixed, np.float32)[None, ..., None]
    b = np.asarray(moving, np.float32)[None, ..., None]
    return float(normalized_mutual_information(a, b, bins=bins)[0])


def check(fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray,
          affine_warped: np.ndarray | None, similarity: str) -> ContrastReport:
    """Run both checks on normalised images on the fixed grid.

    Args:
        fixed, moving: `(*S,)` images in [0, 1], the moving one unregistered (resampled onto the
            fixed grid).
        warped: the registered moving image.
        affine_warped: the moving image after the affine stage only, or None.
        similarity: the similarity the registration used (``ncc``, ``mse``, ``mind``, ``nmi``).
    """
    before = nmi(fixed, moving)
    affine = None if affine_warped is None else nmi(fixed, affine_warped)
    after = nmi(fixed, warped)
    starts = {"the unregistered images": before}
    if affine is not None:
        starts["the affine stage"] = affine
    worse = [name for name, value in starts.items()
             if after - 1.0 < (1.0 - WORSE_MARGIN) * (value - 1.0)]
    distance = histogram_distance(fixed, moving)
    different = distance > HINT_DISTANCE
    warnings = []
    if worse:
        ref = max(starts[name] for name in worse)
        warnings.append(f"warning: the result matches the fixed image less than "
                        f"{' and '.join(worse)} (normalised mutual information {ref:.3f} -> "
                        f"{after:.3f}); check the result"
                        + (f", or use --similarity mind" if similarity in SAME_CONTRAST else ""))
    if different and similarity in SAME_CONTRAST:
        warnings.append(f"hint: the intensity histograms of the two images differ (distance "
                        f"{distance:.2f} > {HINT_DISTANCE}), as between contrasts such as T1 and "
                        f"T2; --similarity {similarity} assumes one contrast: use --similarity "
                        "mind (or nmi)")
    return ContrastReport(before, affine, after, bool(worse), distance, bool(different), warnings)
