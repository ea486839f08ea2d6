"""Finite differences of channels-last fields and the Jacobian determinant of a displacement.

Units: voxels (spacing 1). Works in float32 and float64, 2D and 3D, inside XLA, differentiable.
"""
from __future__ import annotations

import tensorflow as tf

from tfreg.ops._checks import ndims_of

__all__ = ["forward_differences", "central_differences", "jacobian", "jacobian_determinant"]

MODES = ("central", "forward")


def _along(x: tf.Tensor, axis: int, start: int, stop: int | None) -> tf.Tensor:
    index = [slice(None)] * len(x.shape)
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def forward_differences(x: tf.Tensor) -> list[tf.Tensor]:
    """``D_d = x[.., i+1 along d, ..] - x[.., i, ..]`` for each spatial axis ``d``.

    Args:
        x: `(batch, *spatial, channels)`.

    Returns:
        One tensor per spatial axis; ``D_d`` is one voxel shorter along axis ``d``.
    """
    ndims = ndims_of(x, "x")
    return [_along(x, d + 1, 1, None) - _along(x, d + 1, 0, -1) for d in range(ndims)]


def central_differences(x: tf.Tensor) -> list[tf.Tensor]:
    """Derivative along each spatial axis as ``np.gradient`` computes it (spacing 1).

    Central differences ``(x[i+1] - x[i-1]) / 2`` inside, one-sided first-order differences at
    the two ends of each axis (an axis of one voxel gives zeros). Same shape as `x`.
    """
    ndims = ndims_of(x, "x")
    out = []
    for d in range(ndims):
        axis = d + 1
        n = x.shape[axis]
        if n is None or n < 2:
            out.append(tf.zeros_like(x))
            continue
        first = _along(x, axis, 1, 2) - _along(x, axis, 0, 1)
        last = _along(x, axis, n - 1, n) - _along(x, axis, n - 2, n - 1)
        if n == 2:
            out.append(tf.concat([first, last], axis))
            continue
        inner = (_along(x, axis, 2, None) - _along(x, axis, 0, -2)) * 0.5
        out.append(tf.concat([first, inner, last], axis))
    return out


def _derivatives(disp, mode: str) -> list[tf.Tensor]:
    """``[du/dx_d for each spatial axis d]``, each `(B, *S', N)` (see `jacobian`)."""
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
    disp = tf.convert_to_tensor(disp)
    if disp.dtype not in (tf.float32, tf.float64):
        disp = tf.cast(disp, tf.float32)
    ndims = ndims_of(disp, "disp")
    if disp.shape[-1] != ndims:
        raise ValueError(f"`disp` must have {ndims} channels. Received: disp.shape={tuple(disp.shape)}")
    if mode == "central":
        grads = central_differences(disp)
    else:
        crop = (slice(None),) + (slice(0, -1),) * ndims + (slice(None),)
        grads = [g[crop[:d + 1] + (slice(None),) + crop[d + 2:]] for d, g in
                 enumerate(forward_differences(disp))]
    return grads


def jacobian(disp: tf.Tensor, mode: str = "central") -> tf.Tensor:
    """Jacobian ``J[..., c, d] = delta_cd + du_c / dx_d`` of ``x -> x + u(x)``.

    Args:
        disp: `(B, *S, N)` displacement in voxels, N = 2 or 3.
        mode: ``"central"`` (`central_differences`, output on the whole grid) or ``"forward"``
            (`forward_differences` on the grid cropped by one voxel at the far end of every axis).

    Returns:
        `(B, *S', N, N)` in the dtype of `disp` (float32 unless float64 is given).
    """
    grads = _derivatives(disp, mode)
    ndims = len(grads)
    # grads[d][..., c] = du_c / dx_d  ->  J[..., c, d]
    jac = tf.stack(grads, axis=-1)
    return jac + tf.eye(ndims, dtype=jac.dtype)


def jacobian_determinant(disp: tf.Tensor, mode: str = "central") -> tf.Tensor:
    """Determinant of the Jacobian of ``x -> x + u(x)`` at every voxel (see `jacobian`).

    Written out (cofactor expansion) rather than `tf.linalg.det`, so it runs under XLA and has a
    cheap gradient. 1 = volume kept, < 1 contraction, <= 0 folding.

    Returns:
        `(B, *S')` determinant.
    """
    grads = _derivatives(disp, mode)
    ndims = len(grads)
    # J[c][d] = delta_cd + du_c/dx_d, one component at a time (no (..., N, N) tensor: 2.6x faster
    # eagerly and 4x under XLA at 96x112x96 in float64)
    j = [[grads[d][..., c] + 1.0 if c == d else grads[d][..., c] for d in range(ndims)]
         for c in range(ndims)]
    if ndims == 2:
        return j[0][0] * j[1][1] - j[0][1] * j[1][0]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
