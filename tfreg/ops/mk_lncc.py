"""Multi-kernel local normalised cross-correlation (mk-LNCC) with strided, dilated windows.

For one window of ``k`` taps per axis spaced by a dilation ``d``, evaluated at every ``s``-th position
along each axis (no padding: only windows inside the volume), the local statistics over the
``n = k^N`` taps give::

    cross = S_IJ - S_I S_J / n,   var_I = S_II - S_I^2 / n,   var_J = S_JJ - S_J^2 / n
    lncc_k = 1 - mean(cross^2 / (var_I var_J + eps))

and mk-LNCC is ``sum_k w_k lncc_k`` (0 for a perfect local linear match, 1 for none).

Automatic windows (the vSVF original's rule), with ``S`` the smallest spatial size of the image:

=================  ===========================  ===================  ========
``S``              windows (voxels, ``int``)    weights              dilation
=================  ===========================  ===================  ========
``S >= 128``       ``S/16, S/8, S/4``           ``0.1, 0.3, 0.6``    2
``64 <= S < 128``  ``S/4, S/2``                 ``0.3, 0.7``         2
``S < 64``         ``S/2``                      ``1``                1
=================  ===========================  ===================  ========

The stride of a window of ``k`` taps is ``max(int((k + 1) / 4), 1)``. A window whose dilated extent
``(k - 1) d + 1`` exceeds an axis is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import tensorflow as tf

__all__ = ["LNCCWindows", "auto_windows", "windows_from_fractions", "dilated_box_sum", "lncc",
           "mk_lncc"]

#: ``(lower bound of S, window fractions of S, weights, dilation)``, checked in order.
AUTO_RULE = ((128, (1 / 16, 1 / 8, 1 / 4), (0.1, 0.3, 0.6), 2),
             (64, (1 / 4, 1 / 2), (0.3, 0.7), 2),
             (0, (1 / 2,), (1.0,), 1))
#: Stride as a fraction of ``window + 1``.
STRIDE_RATIO = 0.25


@dataclass(frozen=True)
class LNCCWindows:
    """Windows of one mk-LNCC: taps per window, weights, dilation per window, stride per window."""

    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    dilations: tuple[int, ...]
    strides: tuple[int, ...]


def _stride(k: int, ratio: float) -> int:
    return max(int((k + 1) * ratio), 1)


def windows_from_fractions(shape: Sequence[int], fractions: Sequence[float],
                           weights: Sequence[float], dilation: int | Sequence[int] = 1,
                           stride_ratio: float = STRIDE_RATIO) -> LNCCWindows:
    """Windows of ``int(f * min(shape))`` taps for each fraction `f` (at least 1 tap)."""
    smallest = min(int(s) for s in shape)
    fractions = list(fractions)
    if not fractions or len(fractions) != len(weights):
        raise ValueError(f"mk-LNCC needs one weight per window fraction. Received: "
                         f"{len(fractions)} fractions, {len(weights)} weights")
    sizes = tuple(max(int(smallest * f), 1) for f in fractions)
    dil = (int(dilation),) * len(sizes) if isinstance(dilation, int) else tuple(int(d) for d in dilation)
    if len(dil) != len(sizes) or any(d < 1 for d in dil):
        raise ValueError(f"mk-LNCC dilation must be >= 1, one per window. Received: {dilation!r}")
    strides = tuple(_stride(k, stride_ratio) for k in sizes)
    return LNCCWindows(sizes, tuple(float(w) for w in weights), dil, strides)


def auto_windows(shape: Sequence[int]) -> LNCCWindows:
    """The original's windows for an image of spatial `shape` (table in the module doc)."""
    smallest = min(int(s) for s in shape)
    for bound, fractions, weights, dilation in AUTO_RULE:
        if smallest >= bound:
            return windows_from_fractions(shape, fractions, weights, dilation)
    raise AssertionError("unreachable")


def dilated_box_sum(x: tf.Tensor, axis: int, k: int, dilation: int, stride: int) -> tf.Tensor:
    """``out[i] = sum_{j<k} x[i * stride + j * dilation]`` along `axis` (an index of `x`), for every
    ``i`` whose window lies inside the axis ('valid'); other axes unchanged.

    Computed with a cumulative sum along the residues modulo `dilation`.
    """
    n = x.shape[axis]
    extent = (k - 1) * dilation + 1
    if extent > n:
        raise ValueError(f"mk-LNCC window of {k} taps with dilation {dilation} spans {extent} "
                         f"voxels, more than the axis size {n}")
    rank = x.shape.rank
    pad = [[0, 0]] * rank
    pad[axis] = [dilation, (-n) % dilation]           # `dilation` zeros before: exclusive sums
    xp = tf.pad(x, pad)
    total = n + dilation + (-n) % dilation
    shape = tf.shape(xp)
    split = tf.concat([shape[:axis], [total // dilation, dilation], shape[axis + 1:]], 0)
    csum = tf.cumsum(tf.reshape(xp, split), axis=axis)
    csum = tf.reshape(csum, shape)                    # csum[q] = sum of x[q - d], x[q - 2d], ...
    valid = n - extent + 1

    def take(start):
        index = [slice(None)] * rank
        index[axis] = slice(start, start + valid, stride)
        return csum[tuple(index)]

    # sum_{j<k} x[p + j d] = C[p + k d] - C[p] with C[q] = sum_{m >= 1} x[q - m d]
    return take(k * dilation) - take(0)


def lncc(i: tf.Tensor, j: tf.Tensor, k: int, dilation: int = 1, stride: int = 1,
         eps: float = 1e-5) -> tf.Tensor:
    """``1 - mean(cross^2 / (var_I var_J + eps))`` over the valid strided windows of `k` taps per
    axis, every channel and batch element separately. `i`, `j`: `(B, *S, C)` float. Scalar."""
    ndims = i.shape.rank - 2
    stacked = tf.concat([i, j, i * i, j * j, i * j], axis=-1)
    for axis in range(1, ndims + 1):
        stacked = dilated_box_sum(stacked, axis, k, dilation, stride)
    s_i, s_j, s_ii, s_jj, s_ij = tf.split(stacked, 5, axis=-1)
    n = float(k ** ndims)
    cross = s_ij - s_i * s_j / n
    var_i = s_ii - s_i * s_i / n
    var_j = s_jj - s_j * s_j / n
    return 1.0 - tf.reduce_mean(cross * cross / (var_i * var_j + eps))


def mk_lncc(i, j, windows: LNCCWindows | None = None, eps: float = 1e-5) -> tf.Tensor:
    """Multi-kernel LNCC ``sum_k w_k lncc_k`` of images `i`, `j` `(B, *S, C)` (2D or 3D); windows
    from `auto_windows` when None. Float32 scalar (float64 kept)."""
    i = tf.convert_to_tensor(i)
    dtype = tf.float64 if i.dtype == tf.float64 else tf.float32
    i, j = tf.cast(i, dtype), tf.cast(tf.convert_to_tensor(j), dtype)
    if i.shape.rank not in (4, 5) or tuple(i.shape[1:]) != tuple(j.shape[1:]):
        raise ValueError("mk-LNCC needs two images of one shape (batch, *spatial, channels), 2 or 3 "
                         f"spatial axes. Received: {tuple(i.shape)} and {tuple(j.shape)}")
    if windows is None:
        windows = auto_windows(i.shape[1:-1])
    total = tf.constant(0.0, dtype)
    for k, w, d, s in zip(windows.sizes, windows.weights, windows.dilations, windows.strides):
        total = total + w * lncc(i, j, k, d, s, eps)
    return total
