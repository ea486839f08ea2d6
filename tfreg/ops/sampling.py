"""Sampling an image at displaced voxel positions (warping), 2D and 3D, channels-last.

Convention: a displacement ``disp`` `(B, *So, N)` lives on the output grid, is in voxels of the
image, channel ``d`` moves along array axis ``d`` (ij), and pulls: ``out(x) = image(x + disp(x))``.
Outside the image, sampling clamps to the border (``fill_value=None``) or returns a constant for
points outside ``[0, n - 1]`` along any axis.

Batch sizes: the image and the field must have the same batch size; there is no broadcasting.
Static batch sizes that differ raise ``ValueError`` naming both shapes. When a batch size is only
known at run time, graph execution raises ``InvalidArgumentError`` with the same message; XLA
drops runtime assertions, so there a mismatch makes a floating-point result NaN instead of
silently wrong.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tfreg.ops import compile_cache
from tfreg.ops._checks import (as_float, check_fill, check_interp, check_rounding,
                               static_spatial)

__all__ = ["warp", "grid", "check_batch"]


def grid(spatial: Sequence[int], dtype=tf.float32) -> tf.Tensor:
    """Voxel coordinates ``(*spatial, ndims)``, ij indexing."""
    axes = [tf.range(n, dtype=dtype) for n in spatial]
    return tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)


def check_batch(image: tf.Tensor, disp: tf.Tensor, image_name: str = "image",
                disp_name: str = "disp") -> tf.Tensor | None:
    """Check that two tensors have the same batch size.

    Static sizes that differ raise ``ValueError`` naming both shapes. When either is unknown
    until run time, returns a scalar bool tensor (True when they agree) after adding a runtime
    assertion (graph mode); None when the static check settled it.
    """
    b_img, b_disp = image.shape[0], disp.shape[0]
    message = (f"`{image_name}` and `{disp_name}` must have the same batch size. "
               f"Received: {image_name}.shape={tuple(image.shape)}, "
               f"{disp_name}.shape={tuple(disp.shape)}")
    if b_img is not None and b_disp is not None:
        if b_img != b_disp:
            raise ValueError(message)
        return None
    n_img, n_disp = tf.shape(image)[0], tf.shape(disp)[0]
    if tf.executing_eagerly():
        if int(n_img) != int(n_disp):
            raise ValueError(message)
        return None
    tf.debugging.assert_equal(n_img, n_disp, message=message)
    return tf.equal(n_img, n_disp)


# --------------------------------------------------------------------------------- internals

def _axis_coords(disp: tf.Tensor) -> list[tf.Tensor]:
    """``x_d + disp_d`` per axis, ``(B, *So)`` each; ``x_d`` is broadcast along its axis."""
    out_shape = tuple(disp.shape[1:-1])
    ndims = len(out_shape)
    coords = []
    for d, u in enumerate(tf.unstack(disp, num=ndims, axis=-1)):
        axis = tf.range(out_shape[d], dtype=disp.dtype)
        coords.append(u + tf.reshape(axis, [-1 if a == d else 1 for a in range(ndims)]))
    return coords


def _batch_offset(disp: tf.Tensor, n_in: int) -> tf.Tensor:
    """``(B, 1, ..., 1)`` int32 start of each batch element in the flattened volume."""
    ndims = disp.shape.rank - 2
    batch = tf.shape(disp)[0]
    return tf.reshape(tf.range(batch, dtype=tf.int32) * n_in, (-1,) + (1,) * ndims)


def _strides(in_shape: Sequence[int]) -> list[int]:
    return [int(np.prod(in_shape[d + 1:])) for d in range(len(in_shape))]  # row-major


def _blend(corners: dict, weights: list, axes: Sequence[int]) -> tf.Tensor:
    """Multilinear blend of corner values keyed by bit tuples over ``axes`` (last axis first)."""
    for i in reversed(range(len(axes))):
        merged = {}
        for bits in itertools.product((0, 1), repeat=i):
            w0, w1 = weights[axes[i]]
            # (1-w) v0 + w v1, not v0 + w (v1 - v0): exact at w = 0 and w = 1
            merged[bits] = w0 * corners[bits + (0,)] + w1 * corners[bits + (1,)]
        corners = merged
    return corners[()]


def _linear_geometry(disp, in_shape):
    """Lower-corner flat index ``(B, *So)`` int32, per-axis weights ``w`` of the upper corner
    (``(B, *So)`` each; the clamp passes the gradient on ``[0, n - 1]``) and per-axis flat steps
    to the upper corner (0 along axes of size 1)."""
    strides = _strides(in_shape)
    base = _batch_offset(disp, int(np.prod(in_shape)))
    weights = []
    for d, coord in enumerate(_axis_coords(disp)):
        n = in_shape[d]
        c = tf.clip_by_value(coord, 0.0, float(n - 1))  # clamp: zero gradient outside
        # lower corner in [0, n-2] so that the upper corner (low + 1) stays inside; w in [0, 1]
        low = tf.stop_gradient(tf.minimum(tf.floor(c), float(max(n - 2, 0))))
        weights.append(c - low)
        low_i = tf.cast(low, tf.int32)
        base = base + (low_i * strides[d] if strides[d] != 1 else low_i)
    steps = [s if n > 1 else 0 for s, n in zip(strides, in_shape)]
    return base, weights, steps


def _linear_corners(table, disp, in_shape, single):
    """Corner values (keyed by bit tuples) and per-axis weights ``(1-w, w)`` of linear sampling."""
    base, ws, steps = _linear_geometry(disp, in_shape)
    weights = []
    for w in ws:
        if not single:
            w = tf.expand_dims(w, -1)
        weights.append((1.0 - w, w))
    corners = {}
    for bits in itertools.product((0, 1), repeat=len(in_shape)):
        shift = sum(s for s, b in zip(steps, bits) if b)
        corners[bits] = tf.gather(table, base + shift if shift else base)
    return corners, weights


def _linear_lean(table: tf.Tensor, disp: tf.Tensor, in_shape: Sequence[int],
                 single: bool) -> tf.Tensor:
    """Linear sampling whose backward pass recomputes the corners from ``(table, disp)`` and
    accumulates one corner at a time, instead of autodiff through the ``2**N`` gathers (which
    holds every corner, weight and gathered-gradient slice at once: about 80 fields of the
    image's size for a 3-channel 3D warp, forward and backward; this: about 30, measured at
    64^3). Same values and gradients as the
    autodiff path (the clamp passes the gradient on ``[0, n - 1]``, as `tf.clip_by_value`)."""
    ndims = len(in_shape)

    @tf.custom_gradient
    def sample(table, disp):
        corners, weights = _linear_corners(table, disp, in_shape, single)
        out = _blend(corners, weights, list(range(ndims)))

        def grad(dy):
            base, weights, steps = _linear_geometry(disp, in_shape)
            inside = [tf.logical_and(coord >= 0.0, coord <= float(in_shape[d] - 1))
                      for d, coord in enumerate(_axis_coords(disp))]
            d_table = tf.zeros_like(table)
            d_weight = [tf.zeros_like(w) for w in weights]
            flat_dy = tf.reshape(dy, (-1,) if single else (-1, tf.shape(table)[-1]))
            for bits in itertools.product((0, 1), repeat=ndims):
                # one corner after the other (graph execution would otherwise run every
                # corner's gathers at once and hold them all)
                with tf.control_dependencies([d_table, *d_weight]):
                    index = base + sum(st for st, b in zip(steps, bits) if b)
                    factors = [w if b else 1.0 - w for w, b in zip(weights, bits)]
                weight = factors[0]
                for f in factors[1:]:
                    weight = weight * f
                if not single:
                    weight = weight[..., None]
                d_table = tf.tensor_scatter_nd_add(
                    d_table, tf.reshape(index, (-1, 1)),
                    tf.reshape(weight, (-1,) if single else (-1, 1)) * flat_dy)
                value = tf.gather(table, index) * dy
                if not single:
                    value = tf.reduce_sum(value, axis=-1)
                for d in range(ndims):
                    others = [f for e, f in enumerate(factors) if e != d]
                    term = value
                    for f in others:
                        term = term * f
                    d_weight[d] = d_weight[d] + term if bits[d] else d_weight[d] - term
            d_disp = tf.stack([tf.where(inside[d], d_weight[d], tf.zeros_like(d_weight[d]))
                               for d in range(ndims)], axis=-1)
            return d_table, d_disp

        return out, grad

    return sample(table, disp)


def _sample(image: tf.Tensor, disp: tf.Tensor, interp: str, fill_value: float | None,
            rounding: str = "half_even", lean_gradient: bool = False) -> tf.Tensor:
    """Sample ``image (B,*Si,C)`` at ``x + disp(x)``, ``disp (B,*So,N)`` in voxels of ``image``.

    Flattened formulation: one int32 base index into the flattened ``(B*prod(Si),)`` volume per
    output voxel (lower corner), plus a constant offset per corner, then ``2**N`` (linear) or 1
    (nearest) gathers; linear blends the corners axis by axis (``2**N - 1`` lerps). Single-channel
    images are gathered from a 1-D table, much faster than a ``(P, 1)`` table without XLA.
    """
    in_shape = static_spatial(image, "image")
    ndims = len(in_shape)
    n_in = int(np.prod(in_shape))
    static_batch = image.shape[0] or 1
    if static_batch * n_in >= 2**31:
        raise ValueError(
            "int32 indexing: batch * voxels must be < 2**31. "
            f"Received: image.shape={tuple(image.shape)}"
        )
    single = image.shape[-1] == 1
    table = tf.reshape(image, (-1,) if single else (-1, tf.shape(image)[-1]))

    if interp == "nearest":
        index = _batch_offset(disp, n_in)
        for d, (coord, stride) in enumerate(zip(_axis_coords(disp), _strides(in_shape))):
            c = tf.clip_by_value(coord, 0.0, float(in_shape[d] - 1))
            c = tf.round(c) if rounding == "half_even" else tf.floor(c + 0.5)
            index = index + tf.cast(c, tf.int32) * stride
        out = tf.gather(table, index)
    else:
        # Plain autodiff for the gradient by default. The lean backward (recomputing the corners
        # from (image, disp)) halved the memory of VecInt(7) gradients but doubled their time
        # when run as a separate XLA function (jit=True): opt-in, for gradients through many
        # warps (LDDMM's shooting).
        if lean_gradient:
            out = _linear_lean(table, disp, in_shape, single)
        else:
            corners, weights = _linear_corners(table, disp, in_shape, single)
            out = _blend(corners, weights, list(range(ndims)))

    if single:
        out = tf.expand_dims(out, -1)
    if fill_value is not None:
        outside = None
        for d, coord in enumerate(_axis_coords(disp)):
            bad = tf.logical_or(coord < 0.0, coord > float(in_shape[d] - 1))
            outside = bad if outside is None else tf.logical_or(outside, bad)
        out = tf.where(tf.expand_dims(outside, -1), tf.cast(fill_value, out.dtype), out)
    return out


# --------------------------------------------------------------------------------- public op
def warp(image, disp, interp: str = "linear", fill_value: float | None = None, *,
         rounding: str = "half_even", jit: bool | str = "auto",
         lean_gradient: bool = False) -> tf.Tensor:
    """Warp an image by a displacement field (pull, voxels, ij).

    ``warped(x) = image(x + disp(x))``. The output lives on the grid of ``disp``; ``image`` may
    have another spatial shape (coordinates are then voxels of ``image``).

    Args:
        image: `(B, *Si, C)` image or label map. Linear interpolation returns float32; nearest
            keeps the dtype (use int32 label maps).
        disp: `(B, *So, N)` displacement in voxels, N = 2 or 3; the same batch size B as
            `image` (no broadcasting; see the module docstring for how a mismatch is reported).
        interp: ``"linear"`` or ``"nearest"``.
        fill_value: None: clamp to the border (nearest border voxel); a number: constant value
            at points outside ``[0, n-1]`` along any axis.
        rounding: nearest ties: ``"half_even"`` (``tf.round``, voxelmorph's) or ``"half_up"``.
        jit: True: run this op as its own XLA-compiled function (compiled once per input shape,
            kept in `tfreg.ops.compile_cache`), also when the caller is not compiled; False: plain
            TensorFlow ops; ``"auto"`` (default): True for outputs of at least
            `compile_cache.AUTO_MIN_VOXELS` voxels unless already inside a function compiled by
            `compile_cache` (see there).
        lean_gradient: linear only: a backward pass that recomputes the corners and
            accumulates them one at a time (about 30 fields of the image's size at its peak
            instead of about 80 for a 3-channel 3D warp), for gradients through many warps;
            same values and gradients, slower.

    Returns:
        `(B, *So, C)` warped image.
    """
    check_interp(interp)
    fill_value = check_fill(fill_value)
    check_rounding(rounding)
    jit = compile_cache.check_jit(jit)
    if jit is not False:
        image, disp = tf.convert_to_tensor(image), tf.convert_to_tensor(disp)
        if compile_cache.use_jit(jit, compile_cache.static_voxels(disp)):
            check_batch(image, disp)
            fn = compile_cache.compiled(
                ("warp", interp, fill_value, rounding, bool(lean_gradient)),
                lambda i, d: warp(i, d, interp, fill_value, rounding=rounding, jit=False,
                                  lean_gradient=lean_gradient))
            return fn(image, disp)
    disp = as_float(disp)
    image = tf.convert_to_tensor(image)
    if image.dtype.is_floating or interp == "linear":
        image = as_float(image, disp.dtype)
    in_shape = static_spatial(image, "image")
    out_shape = static_spatial(disp, "disp")
    ndims = len(in_shape)
    if len(out_shape) != ndims or disp.shape[-1] != ndims:
        raise ValueError(
            f"`disp` must have shape (batch, *spatial, {ndims}) for a {ndims}D image. "
            f"Received: disp.shape={tuple(disp.shape)}, image.shape={tuple(image.shape)}"
        )
    agree = check_batch(image, disp)
    out = _sample(image, disp, interp, fill_value, rounding, bool(lean_gradient))
    if agree is not None and out.dtype.is_floating:
        # XLA ignores the runtime assertion: make a mismatch visible as NaN
        out = out + tf.where(agree, tf.zeros((), out.dtype), tf.constant(np.nan, out.dtype))
    return out
