"""Intensity normalisation: tfreg's one way to map scan intensities to a common range (NumPy).

Used by preprocessing (data specs, `tfreg register` with a model), instance optimisation and the
pictures of `tfreg show`. Every mode is an affine map ``(x - offset) * scale``, optionally after
clipping to a window, so it can be recorded and re-applied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["MODES", "IntensityMap", "fit_intensity_map", "normalize_percentile"]

MODES = ("minmax", "zscore", "percentile", "none")


@dataclass(frozen=True)
class IntensityMap:
    """``out = (clip(x, *clip) - offset) * scale`` (no clipping when `clip` is None)."""

    offset: float = 0.0
    scale: float = 1.0
    clip: tuple[float, float] | None = None

    def apply(self, data: np.ndarray) -> np.ndarray:
        """The map applied to an array; float32 copy."""
        out = np.array(data, dtype=np.float32, copy=True)
        if self.clip is not None:
            np.clip(out, self.clip[0], self.clip[1], out=out)
        out -= np.float32(self.offset)
        out *= np.float32(self.scale)
        return out


def _window(lo: float, hi: float) -> tuple[float, float]:
    """``(offset, scale)`` mapping ``[lo, hi]`` to ``[0, 1]``; scale 1 when the window is empty."""
    return lo, (1.0 / (hi - lo) if hi > lo else 1.0)


def fit_intensity_map(data: np.ndarray, mode: str = "minmax",
                      percentiles: Sequence[float] = (1.0, 99.0)) -> IntensityMap:
    """Intensity map of `mode` fitted to the statistics of `data` (all its voxels).

    * ``"minmax"``: ``[min, max]`` to ``[0, 1]``;
    * ``"zscore"``: mean 0, standard deviation 1;
    * ``"percentile"``: clip to the `percentiles` ``[p_low, p_high]`` (in percent), then to
      ``[0, 1]``;
    * ``"none"``: identity.

    A constant image (empty window, zero deviation) keeps scale 1 (it is only shifted).
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
    data = np.asarray(data)
    if mode == "none" or not data.size:
        return IntensityMap()
    if mode == "minmax":
        offset, scale = _window(float(data.min()), float(data.max()))
        return IntensityMap(offset, scale)
    if mode == "zscore":
        mean, std = float(data.mean(dtype=np.float64)), float(data.std(dtype=np.float64))
        return IntensityMap(mean, 1.0 / std if std > 0 else 1.0)
    lo, hi = (float(v) for v in np.percentile(data, list(percentiles)))
    offset, scale = _window(lo, hi)
    return IntensityMap(offset, scale, (lo, hi))


def normalize_percentile(image: np.ndarray, low: float = 0.0, high: float = 99.9) -> np.ndarray:
    """`image` mapped to [0, 1] by its `low` and `high` percentiles and clipped; float32.

    The ``"percentile"`` mode of `fit_intensity_map` applied at once.
    """
    image = np.asarray(image, np.float32)
    return fit_intensity_map(image, "percentile", (low, high)).apply(image)
