"""Patches: where they start, how they are cut out and how their predictions are put back.

Whole-image prediction uses starts every `stride` voxels plus one patch flush with the end of
each axis, so every voxel is covered (`patch_starts`); background patches (both images zero)
contribute nothing, and overlapping predictions are averaged (`reassemble`). Training draws
patches among the starts of such a grid (the original: stride 14) whose window holds a non-zero
voxel of either image (`foreground_starts`).

The original also uses stride 14 for 15^3 patches and one extra start at ``N - 15``; it skips
background patches but its loop starts at index 1, so its patch 0 is always dropped. Here patch
0 is treated like every other patch.

Shapes: volumes `(B, *S, C)`, starts `(B, K, N)` int32 (voxel index of a patch's first corner),
patches `(B, K, *P, C)` with ``P = [patch] * N``.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

__all__ = ["axis_starts", "patch_starts", "foreground_starts", "gather", "foreground",
           "reassemble"]


def axis_starts(n: int, patch: int, stride: int) -> list[int]:
    """Starts ``0, stride, 2 stride, ..`` that fit, plus ``n - patch`` if the end is not covered."""
    if n < patch:
        raise ValueError(f"an axis of {n} voxels is shorter than the patch ({patch})")
    starts = list(range(0, n - patch + 1, stride))
    if starts[-1] + patch < n:
        starts.append(n - patch)
    return starts


def patch_starts(shape: Sequence[int], patch: int = 15, stride: int = 14) -> np.ndarray:
    """`(P, N)` int32 start corners of all patches of a grid of `shape` (row-major order)."""
    axes = [axis_starts(int(n), patch, stride) for n in shape]
    return np.array(list(itertools.product(*axes)), dtype=np.int32).reshape(-1, len(shape))


def foreground_starts(moving: np.ndarray, fixed: np.ndarray, patch: int = 15,
                      stride: int = 14) -> np.ndarray:
    """`(T, N)` int32: the starts of `patch_starts` (stride 1: every voxel offset) whose patch
    holds a non-zero voxel of `moving` or `fixed` `(*S)`; window sums from cumulative sums."""
    counts = ((np.asarray(moving) != 0) | (np.asarray(fixed) != 0)).astype(np.int64)
    for axis in range(counts.ndim):
        if counts.shape[axis] < patch:
            raise ValueError(f"an axis of {counts.shape[axis]} voxels is shorter than the "
                             f"patch ({patch})")
        total = np.cumsum(counts, axis=axis)
        pad = [(0, 0)] * counts.ndim
        pad[axis] = (1, 0)
        total = np.pad(total, pad)
        upper = np.take(total, np.arange(patch, total.shape[axis]), axis=axis)
        lower = np.take(total, np.arange(0, total.shape[axis] - patch), axis=axis)
        counts = upper - lower
    starts = patch_starts(np.shape(moving), patch, stride)
    return starts[counts[tuple(starts.T)] > 0]


def _offsets(ndims: int, patch: int) -> np.ndarray:
    """`(P^N, N)` int32 voxel offsets inside one patch (row-major)."""
    grid = np.meshgrid(*[np.arange(patch)] * ndims, indexing="ij")
    return np.stack(grid, -1).reshape(-1, ndims).astype(np.int32)


def gather(volume: tf.Tensor, starts: tf.Tensor, patch: int = 15) -> tf.Tensor:
    """Patches `(B, K, *P, C)` of `volume` `(B, *S, C)` at `starts` `(B, K, N)` (in range)."""
    volume = tf.convert_to_tensor(volume)
    starts = tf.cast(starts, tf.int32)
    ndims = len(volume.shape) - 2
    channels = volume.shape[-1]
    offsets = tf.constant(_offsets(ndims, patch))                        # (P^N, N)
    index = starts[:, :, None, :] + offsets[None, None]                   # (B, K, P^N, N)
    values = tf.gather_nd(volume, index, batch_dims=1)                    # (B, K, P^N, C)
    shape = tf.concat([tf.shape(starts)[:2], [patch] * ndims, [channels]], 0)
    return tf.reshape(values, shape)


def foreground(moving_patches: tf.Tensor, fixed_patches: tf.Tensor) -> tf.Tensor:
    """`(B, K)` float32: 1 where a patch `(B, K, *P, 1)` of either image is non-zero somewhere."""
    axes = list(range(2, len(moving_patches.shape)))
    keep = tf.reduce_any(tf.not_equal(moving_patches, 0.0), axis=axes) | \
        tf.reduce_any(tf.not_equal(fixed_patches, 0.0), axis=axes)
    return tf.cast(keep, tf.float32)


def reassemble(values: tf.Tensor, weights: tf.Tensor, starts: np.ndarray,
               shape: Sequence[int]) -> tf.Tensor:
    """Weighted average of overlapping patch values.

    Args:
        values: `(B, P, *Pt, C)` predictions at the static `starts` `(P, N)`.
        weights: `(B, P)` weight of each patch (1 keep, 0 skip: background).
        shape: the volume's spatial shape `S`.

    Returns:
        `(B, *S, C)` float32: per voxel the mean of the kept patches covering it, 0 where none.
    """
    shape = tuple(int(s) for s in shape)
    ndims = len(shape)
    patch = int(values.shape[2])
    channels = int(values.shape[-1])
    index = (np.asarray(starts, np.int32)[:, None, :] + _offsets(ndims, patch)[None])
    flat = np.ravel_multi_index(tuple(index.reshape(-1, ndims).T), shape).astype(np.int32)
    flat = tf.constant(flat)                                              # (P * Pt^N,)
    batch = tf.shape(values)[0]
    size = int(np.prod(shape))
    weighted = tf.reshape(values * tf.reshape(weights, [batch, -1] + [1] * (ndims + 1)),
                          [batch, -1, channels])
    counts = tf.repeat(tf.reshape(weights, [batch, -1]), patch ** ndims, axis=1)

    def add(args):
        v, c = args
        total = tf.math.unsorted_segment_sum(v, flat, size)               # (size, C)
        count = tf.math.unsorted_segment_sum(c, flat, size)               # (size,)
        return total / tf.maximum(count, 1.0)[:, None]

    out = tf.map_fn(add, (weighted, counts), fn_output_signature=tf.float32)
    return tf.reshape(out, [batch, *shape, channels])
