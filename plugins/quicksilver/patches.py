"""Patch split and reassembly (NumPy): starts every `stride` voxels plus one patch flush with the
end of each axis, so every voxel is covered; overlapping predictions are averaged.

The original also uses stride 14 for 15^3 patches and one extra start at ``N - 15``; it skips
background patches (both patches all zero) but its loop starts at index 1, so patch 0 is always
dropped. Here patch 0 is treated like every other patch.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

__all__ = ["axis_starts", "patch_starts", "extract", "foreground", "reassemble"]


def axis_starts(n: int, patch: int, stride: int) -> list[int]:
    """Starts ``0, stride, 2 stride, ..`` that fit, plus ``n - patch`` if the end is not covered."""
    if n < patch:
        raise ValueError(f"an axis of {n} voxels is shorter than the patch ({patch})")
    starts = list(range(0, n - patch + 1, stride))
    if starts[-1] + patch < n:
        starts.append(n - patch)
    return starts


def patch_starts(shape: Sequence[int], patch: int = 15, stride: int = 14) -> np.ndarray:
    """`(P, N)` int start corners of all patches of a grid of `shape` (row-major order)."""
    axes = [axis_starts(int(n), patch, stride) for n in shape]
    return np.array(list(itertools.product(*axes)), dtype=np.int64).reshape(-1, len(shape))


def extract(volume: np.ndarray, starts: np.ndarray, patch: int = 15) -> np.ndarray:
    """Patches `(P, *[patch]*N, *rest)` of `volume` `(*S, *rest)` at `starts` `(P, N)`."""
    n = starts.shape[1]
    return np.stack([volume[tuple(slice(s, s + patch) for s in start)] for start in starts]) \
        if len(starts) else np.zeros((0,) + (patch,) * n + volume.shape[n:], volume.dtype)


def foreground(moving: np.ndarray, fixed: np.ndarray, starts: np.ndarray,
               patch: int = 15) -> np.ndarray:
    """`(P,)` bool: patches where the moving or the fixed image is non-zero somewhere."""
    keep = [bool(np.any(moving[sl]) or np.any(fixed[sl]))
            for sl in (tuple(slice(s, s + patch) for s in start) for start in starts)]
    return np.array(keep, dtype=bool)


def reassemble(patches: np.ndarray, starts: np.ndarray, shape: Sequence[int],
               patch: int = 15) -> np.ndarray:
    """Average overlapping patch values `(P, *[patch]*N, C)` into `(*shape, C)`; voxels that no
    patch covers get 0."""
    shape = tuple(int(s) for s in shape)
    channels = patches.shape[-1]
    total = np.zeros(shape + (channels,), np.float64)
    count = np.zeros(shape + (1,), np.float64)
    for values, start in zip(patches, starts):
        sl = tuple(slice(s, s + patch) for s in start)
        total[sl] += values
        count[sl] += 1.0
    return (total / np.maximum(count, 1.0)).astype(np.float32)
