"""Image similarity: the one local NCC, global NCC (Pearson) and mean squared error.

Inputs are channels-last `(batch, *spatial, channels)`, 2D or 3D, cast to float32. Higher NCC is
more similar; the loss classes in `tfreg.losses` negate these.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tfreg.ops import compile_cache
from tfreg.ops._checks import ndims_of, window
from tfreg.ops.filters import box_sum

__all__ = ["EPS_MODES", "local_ncc_map", "local_ncc", "fixed_window_stats", "contrast_weights",
           "global_ncc", "mse"]

EPS_MODES = ("clamp", "add")


def _pair(y_true, y_pred) -> tuple[tf.Tensor, tf.Tensor]:
    """Both inputs as float32, with a clear error if their (static) shapes differ."""
    t, p = tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)
    if t.shape.rank is not None and p.shape.rank is not None and not t.shape.is_compatible_with(p.shape):
        raise ValueError("`y_true` and `y_pred` must have the same shape. "
                         f"Received: y_true.shape={tuple(t.shape)}, y_pred.shape={tuple(p.shape)}")
    return t, p


def fixed_window_stats(y_true, win: int | Sequence[int] = 9) -> tf.Tensor:
    """What `local_ncc_map` needs of the fixed image alone: `(batch, *spatial, 2)` float32 with
    the window sum ``S_I`` and the window variance sum ``var_I = S_II - 2 mI S_I + mI^2 n``
    (channels summed, before any clamping).

    An image registered to a fixed one is compared with it at every optimisation step; passing
    these (``local_ncc_map(..., fixed_stats=...)``) leaves three window sums per step instead of
    five (full-resolution window-7 NCC forward and backward: ~100 -> ~76 ms under XLA).
    """
    i = tf.cast(y_true, tf.float32)
    ndims = ndims_of(i, "y_true")
    win = window(win, ndims)
    n = float(np.prod(win) * i.shape[-1])
    c = i.shape[-1]
    sums = box_sum(tf.concat([i, i * i], axis=-1), win)
    s_i = tf.reduce_sum(sums[..., :c], axis=-1, keepdims=True)
    s_ii = tf.reduce_sum(sums[..., c:], axis=-1, keepdims=True)
    mean_i = s_i / n
    return tf.concat([s_i, s_ii - 2.0 * mean_i * s_i + mean_i * mean_i * n], axis=-1)


def local_ncc_map(y_true, y_pred, win: int | Sequence[int] = 9, *, squared: bool = True,
                  eps: float = 1e-5, eps_mode: str = "clamp", jit: bool | str = "auto",
                  fixed_stats: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-voxel local normalised cross-correlation over a sliding box window.

    For each voxel ``p`` the window sums ``S_I, S_J, S_II, S_JJ, S_IJ`` over the ``n`` voxels of
    the box centred at ``p`` (zero padding outside the volume, so ``n`` is the full window size
    everywhere; channels are summed into the same window, ``n = prod(win) * channels``) give::

        cross = S_IJ - S_I S_J / n,   var_I = S_II - S_I^2 / n,   var_J = S_JJ - S_J^2 / n

    (computed as voxelmorph does: ``S_IJ - mJ S_I - mI S_J + mI mJ n``).

    * ``eps_mode="clamp"`` (voxelmorph): ``var_I, var_J`` clamped to ``>= eps``; squared:
      ``cross`` clamped to ``>= eps`` too, ``cc = (cross / var_I) (cross / var_J)`` in ``[0, 1]``;
      signed: ``cc = cross / sqrt(var_I var_J)``.
    * ``eps_mode="add"``: variances clamped to ``>= 0`` (float rounding), ``eps`` added to the
      denominator: ``cross^2 / (var_I var_J + eps)`` (LapIRN's squared form) or
      ``cross / sqrt(var_I var_J + eps)`` (signed; instance optimisation's and register's).

    Args:
        y_true, y_pred: `(batch, *spatial, channels)`, the same shape; ``y_true`` is the fixed
            (reference) image, whose window variance is returned.
        win: window size in voxels, an int or one per spatial axis.
        squared: squared (voxelmorph) or signed correlation.
        eps: stabiliser (units: intensity^2 summed over the window).
        eps_mode: ``"clamp"`` or ``"add"``.
        jit: True, False or ``"auto"`` (`tfreg.ops.compile_cache.use_jit`): run as its own XLA
            function. Outside XLA, TensorFlow's CPU average pooling that the window sums use is
            slow, its gradient very slow (a window-9 NCC loss at 96x112x96: 16 s forward and
            backward in a graph on one core, 0.2 s compiled; `benchmarks/README.md`).
        fixed_stats: `fixed_window_stats(y_true, win)`, computed once for many calls with the
            same ``y_true`` (the same values, two window sums fewer per call), or None.

    Returns:
        ``(cc, var_true)``: each `(batch, *spatial, 1)` float32.
    """
    if eps_mode not in EPS_MODES:
        raise ValueError(f"`eps_mode` must be 'clamp' or 'add'. Received: eps_mode={eps_mode!r}")
    i, j = _pair(y_true, y_pred)
    ndims = ndims_of(j, "y_pred")
    win = window(win, ndims)
    jit = compile_cache.check_jit(jit)
    if jit is not False and compile_cache.use_jit(jit, compile_cache.static_voxels(j)):
        args = (i, j) if fixed_stats is None else (i, j, tf.cast(fixed_stats, tf.float32))
        fn = compile_cache.compiled(
            ("local_ncc_map", tuple(win), bool(squared), float(eps), eps_mode, len(args)),
            lambda a, b, st=None: local_ncc_map(a, b, win, squared=squared, eps=eps,
                                                eps_mode=eps_mode, jit=False, fixed_stats=st))
        return fn(*args)
    n = float(np.prod(win) * j.shape[-1])
    c = i.shape[-1]
    stats = fixed_window_stats(i, win) if fixed_stats is None else tf.cast(fixed_stats, tf.float32)
    s_i, var_i = stats[..., :1], stats[..., 1:2]
    sums = box_sum(tf.concat([j, j * j, i * j], axis=-1), win)
    s_j, s_jj, s_ij = (tf.reduce_sum(sums[..., k * c:(k + 1) * c], axis=-1, keepdims=True)
                       for k in range(3))
    mean_i, mean_j = s_i / n, s_j / n
    cross = s_ij - mean_j * s_i - mean_i * s_j + mean_i * mean_j * n
    var_j = s_jj - 2.0 * mean_j * s_j + mean_j * mean_j * n
    if eps_mode == "clamp":
        var_i = tf.maximum(var_i, eps)
        var_j = tf.maximum(var_j, eps)
        if squared:
            cross = tf.maximum(cross, eps)
            return (cross / var_i) * (cross / var_j), var_i
        return cross / tf.sqrt(var_i * var_j), var_i
    var_i = tf.maximum(var_i, 0.0)
    var_j = tf.maximum(var_j, 0.0)
    if squared:
        return cross * cross / (var_i * var_j + eps), var_i
    return cross / tf.sqrt(var_i * var_j + eps), var_i


def contrast_weights(var_true: tf.Tensor, window_size: float, floor: float) -> tf.Tensor:
    """Window weights ``var / (var + n floor^2)`` from the fixed image's window variance sum.

    Windows where the fixed image is flat carry no information and get weights near 0; windows
    with a standard deviation well above `floor` (intensity units) weigh about 1. ``n`` is the
    number of voxels in the window.
    """
    return var_true / (var_true + float(window_size) * floor * floor + 1e-12)


def local_ncc(y_true, y_pred, win: int | Sequence[int] = 9, *, squared: bool = True,
              eps: float = 1e-5, eps_mode: str = "clamp", contrast_floor: float = 0.0,
              stop_weight_gradient: bool = True, jit: bool | str = "auto",
              fixed_stats: tf.Tensor | None = None) -> tf.Tensor:
    """Mean of `local_ncc_map` over voxels and batch (higher is more similar), float32 scalar.

    With ``contrast_floor > 0`` the mean is weighted by `contrast_weights` of ``y_true``
    (``sum(w cc) / sum(w)``; the weights are constants for the gradient unless
    ``stop_weight_gradient=False``): flat background does not dilute the figure, and local NCC
    cannot be raised by pulling edges into flat windows. `jit` and `fixed_stats` as in
    `local_ncc_map`.
    """
    cc, var_true = local_ncc_map(y_true, y_pred, win, squared=squared, eps=eps, eps_mode=eps_mode,
                                 jit=jit, fixed_stats=fixed_stats)
    if not contrast_floor > 0:
        return tf.reduce_mean(cc)
    ndims = len(cc.shape) - 2
    n = float(np.prod(window(win, ndims)) * int(tf.convert_to_tensor(y_pred).shape[-1]))
    weight = contrast_weights(var_true, n, float(contrast_floor))
    if stop_weight_gradient:
        weight = tf.stop_gradient(weight)
    return tf.reduce_sum(weight * cc) / (tf.reduce_sum(weight) + 1e-12)


def global_ncc(y_true, y_pred, eps: float = 1e-6) -> tf.Tensor:
    """Pearson correlation per sample over all voxels and channels, `(batch,)` float32.

    ``r_b = cov(I_b, J_b) / sqrt((var(I_b) + eps) (var(J_b) + eps))`` (population moments).
    """
    i, j = _pair(y_true, y_pred)
    axes = list(range(1, len(j.shape)))
    di = i - tf.reduce_mean(i, axis=axes, keepdims=True)
    dj = j - tf.reduce_mean(j, axis=axes, keepdims=True)
    cov = tf.reduce_mean(di * dj, axis=axes)
    var_i = tf.reduce_mean(di * di, axis=axes)
    var_j = tf.reduce_mean(dj * dj, axis=axes)
    return cov / tf.sqrt((var_i + eps) * (var_j + eps))


def mse(y_true, y_pred) -> tf.Tensor:
    """``mean((y_true - y_pred)^2)`` over batch, voxels and channels, float32 scalar."""
    t, p = _pair(y_true, y_pred)
    diff = t - p
    return tf.reduce_mean(diff * diff)
