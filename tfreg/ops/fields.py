"""Transformations as fields: affine to field, integration, composition and resizing (2D and 3D).

Conventions (docs/architecture.md): a displacement ``u`` `(B, *S, N)` lives on the fixed grid, is
in voxels, channel ``d`` along array axis ``d``, pull: ``warped(x) = moving(x + u(x))``. An affine
`(B, N, N+1)` (a homogeneous `(B, N+1, N+1)` is accepted) is **centred**: with
``c = (shape - 1) / 2`` it maps a fixed-grid point ``x`` to ``A (x - c) + b + c``; the matrix
includes the identity.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tfreg.ops import compile_cache
from tfreg.ops._checks import (as_float, check_align, check_factor, check_steps, common_float,
                               static_spatial)
from tfreg.ops.sampling import grid, warp

__all__ = ["is_affine", "centred_grid", "apply_affine", "affine_to_disp", "affine_after_disp",
           "integrate_svf", "compose", "compose_affine", "resize", "rescale_field",
           "resize_field", "upsample_level"]


def is_affine(transform_shape: Sequence[int | None], ndims: int) -> bool:
    """Whether a transform shape is an affine matrix ``(batch, N, N+1)`` / ``(batch, N+1, N+1)``."""
    shape = tuple(transform_shape)
    return len(shape) == 3 and shape[-1] == ndims + 1 and shape[-2] in (ndims, ndims + 1)


def centred_grid(shape: Sequence[int], dtype=tf.float32, *, scale: float = 1.0,
                 centre: Sequence[float] | None = None) -> tf.Tensor:
    """``scale * x - centre`` for the voxels ``x`` of a grid, `(*shape, N)`.

    The default centre is the grid's own ``(shape - 1) / 2``; a pyramid level ``k`` of a grid
    passes ``scale = 2**k`` and the full-resolution centre to get full-resolution centred
    positions of its voxels.
    """
    shape = tuple(int(s) for s in shape)
    if centre is None:
        centre = [(s - 1) / 2.0 for s in shape]
    return grid(shape, dtype) * tf.cast(scale, dtype) - tf.constant(list(centre), dtype)


def apply_affine(affine, points) -> tf.Tensor:
    """``A p + b`` for centred points ``p``.

    Args:
        affine: `(B, N, N+1)` or `(B, N+1, N+1)` matrices ``[A | b]``, or one `(N, N+1)` matrix.
        points: `(B, ..., N)` centred coordinates (the same B as `affine`), or any `(..., N)`
            with one matrix.

    Returns:
        The mapped points, the shape of `points`.
    """
    affine, points = common_float(affine, points)
    ndims = int(points.shape[-1])
    if affine.shape.rank == 2:
        return tf.tensordot(points, tf.transpose(affine[:ndims, :ndims]), axes=1) + affine[:ndims, ndims]
    matrix, trans = affine[:, :ndims, :ndims], affine[:, :ndims, ndims]
    flat = tf.reshape(points, (tf.shape(points)[0], -1, ndims))
    moved = tf.einsum("bij,bpj->bpi", matrix, flat) + trans[:, None, :]
    return tf.reshape(moved, tf.concat([tf.shape(moved)[:1], tf.shape(points)[1:]], 0))


def affine_to_disp(affine, shape: Sequence[int]) -> tf.Tensor:
    """Dense displacement of a centred affine transform.

    Args:
        affine: `(B, N, N+1)` (or homogeneous `(B, N+1, N+1)`) matrix ``[A | b]`` including the
            identity, acting on voxel coordinates centred at ``c = (shape - 1) / 2``.
        shape: spatial shape of the fixed grid, length N.

    Returns:
        `(B, *shape, N)` float32 displacement ``u(x) = A (x - c) + b + c - x``.
    """
    affine = as_float(affine)
    shape = tuple(int(s) for s in shape)
    ndims = len(shape)
    if ndims not in (2, 3) or any(s < 1 for s in shape):
        raise ValueError(f"`shape` must be 2 or 3 positive ints. Received: shape={shape}")
    if not is_affine(affine.shape, ndims):
        raise ValueError(
            f"`affine` must have shape (batch, {ndims}, {ndims + 1}) for a {ndims}D shape. "
            f"Received: affine.shape={tuple(affine.shape)}"
        )
    affine = affine[:, :ndims, :]
    flat = tf.reshape(centred_grid(shape, affine.dtype), (-1, ndims))
    matrix, trans = affine[:, :, :ndims], affine[:, :, ndims]
    # y_c = A x_c + b  ->  u = y_c - x_c
    moved = tf.einsum("bij,pj->bpi", matrix, flat) + trans[:, None, :]
    return tf.reshape(moved - flat[None], (-1, *shape, ndims))


def affine_after_disp(affine, disp) -> tf.Tensor:
    """Displacement of ``x -> T(x + disp(x))``: the field first, then the affine ``T`` (exact).

    With ``T(y) = A (y - c) + b + c`` this is ``u_T(x) + A disp(x)``; warping an image by the
    result equals warping it by ``T``'s field, then by ``disp``, without resampling twice.

    Args:
        affine: `(B, N, N+1)` centred ``[A | b]``.
        disp: `(B, *S, N)` displacement in voxels.

    Returns:
        `(B, *S, N)` float32 displacement.
    """
    disp = as_float(disp)
    spatial = static_spatial(disp, "disp")
    centred = centred_grid(spatial, disp.dtype)[None] + disp
    return apply_affine(affine, centred) - centred_grid(spatial, disp.dtype)[None]


def _square(disp: tf.Tensor) -> tf.Tensor:
    return disp + warp(disp, disp, jit=False)


def integrate_svf(velocity, steps: int = 7, *, jit: bool | str = "auto", recompute: bool = False,
                  loop: bool = False) -> tf.Tensor:
    """Scaling and squaring: displacement ``exp(v)`` of a stationary velocity field.

    Args:
        velocity: `(B, *S, N)` velocity in voxels.
        steps: int >= 0; ``u = v / 2**steps``, then ``steps`` times ``u = u + warp(u, u)``.
        jit: True: run the whole integration as one XLA-compiled function; False: plain ops;
            ``"auto"`` (default): compiled from `compile_cache.AUTO_MIN_VOXELS` voxels up (see
            `warp`).
        recompute: run each squaring under `tf.recompute_grad`: the backward pass keeps only the
            `steps` intermediate fields and recomputes each squaring's interpolation
            intermediates (one extra warp per squaring; at 160x192x144 about 6 GB less per
            full-resolution integration in training). Same values and gradients.
        loop: squarings as a `tf.while_loop` (XLA compiles the body once: faster compilation
            inside a compiled caller; same values). Not combined with `recompute`.

    Returns:
        `(B, *S, N)` float32 displacement (pull).
    """
    steps = check_steps(steps)
    if recompute and loop:
        raise ValueError("`recompute` and `loop` cannot be combined.")
    jit = compile_cache.check_jit(jit)
    if jit is not False:
        velocity = tf.convert_to_tensor(velocity)
        if compile_cache.use_jit(jit, compile_cache.static_voxels(velocity)):
            fn = compile_cache.compiled(("integrate_svf", steps, bool(recompute), bool(loop)),
                                        lambda v: integrate_svf(v, steps, recompute=recompute,
                                                                loop=loop, jit=False))
            return fn(velocity)
    disp = as_float(velocity) / float(2**steps)
    if steps == 0:
        return disp
    if loop:
        _, disp = tf.while_loop(lambda i, d: i < steps, lambda i, d: (i + 1, _square(d)),
                                (tf.constant(0), disp), maximum_iterations=steps)
        return disp
    square = tf.recompute_grad(_square) if recompute else _square
    for _ in range(steps):
        disp = square(disp)
    return disp


def compose(first, second, interp: str = "linear", *, jit: bool | str = "auto") -> tf.Tensor:
    """Displacement of applying ``first``, then ``second`` to an image.

    ``warp(warp(img, first), second) ~ warp(img, compose(first, second))`` with
    ``compose = second + warp(first, second)`` (voxelmorph's ``ComposeTransform([first, second])``).

    Args:
        first, second: `(B, *S, N)` displacements on the same grid, voxels, one batch size.
        interp: interpolation of ``first``.
        jit: True, False or ``"auto"`` (default): run as an XLA-compiled function (see `warp`).

    Returns:
        `(B, *S, N)` float32 displacement.
    """
    jit = compile_cache.check_jit(jit)
    if jit is not False:
        first, second = tf.convert_to_tensor(first), tf.convert_to_tensor(second)
        if compile_cache.use_jit(jit, compile_cache.static_voxels(second)):
            fn = compile_cache.compiled(("compose", interp),
                                        lambda a, b: compose(a, b, interp, jit=False))
            return fn(first, second)
    first, second = common_float(first, second)
    if tuple(first.shape[1:]) != tuple(second.shape[1:]):
        raise ValueError(
            "`first` and `second` must have the same shape (batch, *spatial, ndims). "
            f"Received: first.shape={tuple(first.shape)}, second.shape={tuple(second.shape)}"
        )
    return second + warp(first, second, interp=interp, jit=False)


def compose_affine(first, second) -> tf.Tensor:
    """Affine of applying ``first``, then ``second`` (both centred the same way).

    A point ``x`` of the fixed grid samples ``T_first(T_second(x))``, so the product is
    ``H_first @ H_second`` in homogeneous form.

    Args:
        first, second: `(B, N, N+1)` (or `(B, N+1, N+1)`) matrices.

    Returns:
        `(B, N, N+1)` float32 matrix.
    """
    first, second = common_float(first, second)
    ndims = first.shape[-1] - 1
    if not (is_affine(first.shape, ndims) and is_affine(second.shape, ndims)):
        raise ValueError(
            "`first` and `second` must be affines (batch, N, N+1) of one N. "
            f"Received: first.shape={tuple(first.shape)}, second.shape={tuple(second.shape)}"
        )
    a1, b1 = first[:, :ndims, :ndims], first[:, :ndims, ndims]
    a2, b2 = second[:, :ndims, :ndims], second[:, :ndims, ndims]
    matrix = tf.matmul(a1, a2)
    trans = tf.linalg.matvec(a1, b2) + b1
    return tf.concat([matrix, trans[..., None]], axis=-1)


# ------------------------------------------------------------------------------- resizing
def _resize_coords(n_in: int, n_out: int, align: str) -> np.ndarray:
    if align == "corners":
        return np.linspace(0.0, n_in - 1.0, n_out) if n_out > 1 else np.zeros(1)
    return np.arange(n_out) * (n_in / n_out)  # "origin": x_out / zoom, voxel 0 fixed


def resized_shape(spatial: Sequence[int], factor_or_shape) -> tuple[int, ...]:
    """Output spatial shape of `resize`: ``int(n * factor)`` per axis (at least 1), or a shape."""
    ndims = len(spatial)
    if isinstance(factor_or_shape, (int, float, np.number)) and not isinstance(factor_or_shape, bool):
        factors = (float(factor_or_shape),) * ndims
        if any(f <= 0 for f in factors):
            raise ValueError(f"`factor` must be > 0. Received: factor={factor_or_shape!r}")
        return tuple(max(1, int(s * f)) for s, f in zip(spatial, factors))
    shape = tuple(factor_or_shape)
    if len(shape) != ndims or any(int(s) < 1 for s in shape):
        raise ValueError(
            f"`shape` must be {ndims} positive ints. Received: shape={factor_or_shape!r}"
        )
    return tuple(int(s) for s in shape)


def resize(image, factor_or_shape, *, align: str = "corners") -> tf.Tensor:
    """Linear resize of an image (no value scaling).

    Args:
        image: `(B, *S, C)`.
        factor_or_shape: a number (output size ``int(n * factor)`` per axis) or a spatial shape.
        align: ``"corners"`` (output voxel ``i`` samples input ``i * (n_in - 1) / (n_out - 1)``:
            first and last voxel centres aligned; voxelmorph/neurite's ``Resize``) or
            ``"origin"`` (samples ``i * n_in / n_out``).

    Returns:
        `(B, *S', C)` float32.
    """
    check_align(align)
    image = as_float(image)
    spatial = static_spatial(image, "image")
    out_shape = resized_shape(spatial, factor_or_shape)
    if out_shape == spatial:
        return image
    # separable: one axis at a time, two gathers per axis
    out = image
    for d, (n_in, n_out) in enumerate(zip(spatial, out_shape)):
        if n_in == n_out:
            continue
        c = _resize_coords(n_in, n_out, align)
        c = np.clip(c, 0.0, n_in - 1.0)
        low = np.minimum(np.floor(c), max(n_in - 2, 0)).astype(np.int32)
        high = np.minimum(low + 1, n_in - 1).astype(np.int32)
        w = c - low
        wshape = [1] * (len(spatial) + 2)
        wshape[d + 1] = n_out
        w = tf.constant(w.reshape(wshape), dtype=out.dtype)
        out = (1.0 - w) * tf.gather(out, low, axis=d + 1) + w * tf.gather(out, high, axis=d + 1)
    return out


def rescale_field(disp, factor: float, *, align: str = "corners") -> tf.Tensor:
    """Resize a displacement field by ``factor`` and multiply its values by ``factor``.

    Args:
        disp: `(B, *S, N)` displacement in voxels of the input grid.
        factor: > 0; output shape ``int(n * factor)``; values become voxels of the new grid.
        align: resize sampling grid, see `resize`.

    Returns:
        `(B, *S', N)` float32.
    """
    factor = check_factor(factor)
    disp = as_float(disp)
    spatial = static_spatial(disp, "disp")
    if disp.shape[-1] != len(spatial):
        raise ValueError(
            f"`disp` must have {len(spatial)} channels. Received: disp.shape={tuple(disp.shape)}"
        )
    if factor == 1.0:
        return disp
    # voxelmorph order: shrink = resize then scale, grow = scale then resize (same values)
    if factor < 1:
        return resize(disp, factor, align=align) * factor
    return resize(disp * factor, factor, align=align)


resize_field = rescale_field


def upsample_level(x, shape: Sequence[int]) -> tf.Tensor:
    """Linear interpolation from a pyramid level onto the next finer one (voxel ``p`` <- ``p / 2``).

    Pyramid geometry (`tfreg.ops.filters.pool_half`): level ``k+1`` has ``ceil(n / 2)`` voxels and
    its voxel ``q`` sits at voxel ``2 q`` of level ``k``. Output voxel ``2q`` copies input ``q``;
    ``2q+1`` averages inputs ``q`` and ``q+1`` (the last input repeats at the border). Slices and
    reshapes only, so its gradient is cheap under XLA. Values are not rescaled.

    Args:
        x: `(B, *S, C)` with ``S = ceil(shape / 2)``.
        shape: spatial shape of the finer level.

    Returns:
        `(B, *shape, C)`.
    """
    ndims = len(shape)
    for d, n_out in enumerate(shape):
        axis = d + 1
        n_in = x.shape[axis]
        if n_in == n_out:
            continue
        if n_in > 1:
            nxt = tf.concat([tf.gather(x, list(range(1, n_in)), axis=axis),
                             tf.gather(x, [n_in - 1], axis=axis)], axis=axis)
        else:
            nxt = x
        pair = tf.stack([x, 0.5 * (x + nxt)], axis=axis + 1)
        new_shape = [-1] + [x.shape[i] for i in range(1, ndims + 2)]
        new_shape[axis] = 2 * n_in
        x = tf.reshape(pair, new_shape)
        if 2 * n_in != n_out:
            index = [slice(None)] * (ndims + 2)
            index[axis] = slice(0, n_out)
            x = x[tuple(index)]
    return x
