"""Spatial transform ops and Keras 3 layers (2D and 3D).

Conventions (see docs/layers.md):

* Arrays are channels-last, ``(batch, *spatial, channels)``.
* A displacement field ``u`` has shape ``(batch, *spatial, ndims)``, lives on the fixed grid, is in
  voxels, channel ``d`` moves along array axis ``d`` (ij), and pulls:
  ``warped(x) = moving(x + u(x))``.
* An affine transform has shape ``(batch, ndims, ndims + 1)`` (a ``(batch, ndims + 1, ndims + 1)``
  homogeneous matrix is accepted too), acts on voxel coordinates and is **centred**: with
  ``c = (shape - 1) / 2`` it maps a fixed-grid point ``x`` to the moving-grid point
  ``y = A (x - c) + b + c``. The matrix includes the identity (it is not a residual).
* Outside the moving image, sampling clamps to the border (``fill_value=None``) or returns a
  constant (``fill_value`` a number) for points outside ``[0, n - 1]`` along any axis.

All computation happens in float32, also under a ``mixed_float16`` policy: coordinates in float16
cannot address the voxels of a 160-voxel axis (the functions keep float64 inputs in float64).

The functional ops work inside ``tf.function(jit_compile=True)``; XLA is the fast path on CPU.
``jit=True`` on a layer or function runs just that op as its own XLA function.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "warp",
    "affine_to_disp",
    "integrate_svf",
    "compose",
    "compose_affine",
    "rescale_field",
    "resize_field",
    "resize",
    "is_affine",
    "SpatialTransformer",
    "VecInt",
    "RescaleTransform",
    "ComposeTransform",
    "AffineToField",
    "GaussianSample",
]

_INTERPS = ("linear", "nearest")
_ROUNDINGS = ("half_even", "half_up")
_ALIGNS = ("corners", "origin")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _static_spatial(x: tf.Tensor, name: str) -> tuple[int, ...]:
    shape = x.shape
    if shape.rank is None or shape.rank not in (4, 5):
        raise ValueError(
            f"`{name}` must have shape (batch, *spatial, channels) with 2 or 3 spatial axes. "
            f"Received: {name}.shape={tuple(shape) if shape.rank is not None else None}"
        )
    spatial = tuple(shape[1:-1])
    if any(s is None for s in spatial):
        raise ValueError(
            f"`{name}` needs static spatial dimensions. Received: {name}.shape={tuple(shape)}"
        )
    return spatial


def _check_interp(interp: str) -> str:
    if interp not in _INTERPS:
        raise ValueError(
            f"`interp` must be one of {', '.join(repr(i) for i in _INTERPS)}. "
            f"Received: interp={interp!r}"
        )
    return interp


def _check_fill(fill_value) -> float | None:
    if fill_value is None:
        return None
    if isinstance(fill_value, bool) or not isinstance(fill_value, (int, float, np.number)):
        raise ValueError(f"`fill_value` must be None or a number. Received: fill_value={fill_value!r}")
    if not math.isfinite(float(fill_value)):
        raise ValueError(f"`fill_value` must be finite. Received: fill_value={fill_value!r}")
    return float(fill_value)


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"`steps` must be an int >= 0. Received: steps={steps!r}")
    return int(steps)


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
    return bool(value)


def _as_float(x, dtype=None) -> tf.Tensor:
    """float64 stays float64 (for gradient checks); anything else becomes float32."""
    x = tf.convert_to_tensor(x)
    if dtype is None:
        dtype = tf.float64 if x.dtype == tf.float64 else tf.float32
    return x if x.dtype == dtype else tf.cast(x, dtype)


def _common_float(*xs) -> list[tf.Tensor]:
    """float64 if any input is float64, else float32."""
    xs = [tf.convert_to_tensor(x) for x in xs]
    dtype = tf.float64 if any(x.dtype == tf.float64 for x in xs) else tf.float32
    return [_as_float(x, dtype) for x in xs]


_COMPILED: dict = {}


def _compiled(fn, **options):
    """``fn`` with fixed keyword options as an XLA-compiled ``tf.function`` (one per options).

    Called from uncompiled code (eager or a plain ``tf.function``), only this op runs under XLA;
    its gradient is compiled as a separate function too. Inside an XLA-compiled caller it is
    simply inlined.
    """
    key = (fn.__name__, tuple(sorted(options.items())))
    if key not in _COMPILED:
        _COMPILED[key] = tf.function(
            lambda *args: fn(*args, **options), jit_compile=True, autograph=False
        )
    return _COMPILED[key]


def _grid(spatial: Sequence[int], dtype=tf.float32) -> tf.Tensor:
    """Voxel coordinates ``(*spatial, ndims)``, ij indexing."""
    axes = [tf.range(n, dtype=dtype) for n in spatial]
    return tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)


def is_affine(transform_shape: Sequence[int | None], ndims: int) -> bool:
    """Whether a transform shape is an affine matrix ``(batch, N, N+1)`` / ``(batch, N+1, N+1)``."""
    shape = tuple(transform_shape)
    return len(shape) == 3 and shape[-1] == ndims + 1 and shape[-2] in (ndims, ndims + 1)


# --------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------
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


def _linear_corners(table, disp, in_shape, single):
    """Corner values (keyed by bit tuples) and per-axis weights ``(1-w, w)`` of linear sampling."""
    strides = _strides(in_shape)
    base = _batch_offset(disp, int(np.prod(in_shape)))
    weights = []
    for d, coord in enumerate(_axis_coords(disp)):
        n = in_shape[d]
        c = tf.clip_by_value(coord, 0.0, float(n - 1))  # clamp: zero gradient outside
        # lower corner in [0, n-2] so that the upper corner (low + 1) stays inside; w in [0, 1]
        low = tf.stop_gradient(tf.minimum(tf.floor(c), float(max(n - 2, 0))))
        w = c - low
        if not single:
            w = tf.expand_dims(w, -1)
        weights.append((1.0 - w, w))
        low_i = tf.cast(low, tf.int32)
        base = base + (low_i * strides[d] if strides[d] != 1 else low_i)
    steps = [s if n > 1 else 0 for s, n in zip(strides, in_shape)]
    corners = {}
    for bits in itertools.product((0, 1), repeat=len(in_shape)):
        shift = sum(s for s, b in zip(steps, bits) if b)
        corners[bits] = tf.gather(table, base + shift if shift else base)
    return corners, weights


def _sample(
    image: tf.Tensor,
    disp: tf.Tensor,
    interp: str,
    fill_value: float | None,
    rounding: str = "half_even",
) -> tf.Tensor:
    """Sample ``image (B,*Si,C)`` at ``x + disp(x)``, ``disp (B,*So,N)`` in voxels of ``image``.

    Flattened formulation: one int32 base index into the flattened ``(B*prod(Si),)`` volume per
    output voxel (lower corner), plus a constant offset per corner, then ``2**N`` (linear) or 1
    (nearest) gathers; linear blends the corners axis by axis (``2**N - 1`` lerps). Single-channel
    images are gathered from a 1-D table, much faster than a ``(P, 1)`` table without XLA.
    """
    in_shape = _static_spatial(image, "image")
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
        # Plain autodiff for the gradient. A hand-written backward that recomputes the corners
        # from (image, disp) halved the memory of VecInt(7) gradients but doubled their time when
        # run as a separate XLA function (jit=True), so it was not kept.
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


def warp(
    image,
    disp,
    interp: str = "linear",
    fill_value: float | None = None,
    *,
    rounding: str = "half_even",
    jit: bool = False,
) -> tf.Tensor:
    """Warp an image by a displacement field (pull, voxels, ij).

    ``warped(x) = image(x + disp(x))``. The output lives on the grid of ``disp``; ``image`` may
    have another spatial shape (coordinates are then voxels of ``image``).

    Args:
        image: `(B, *Si, C)` image or label map. Linear interpolation returns float32; nearest
            keeps the dtype (use int32 label maps).
        disp: `(B, *So, N)` displacement in voxels, N = 2 or 3.
        interp: ``"linear"`` or ``"nearest"``.
        fill_value: None: clamp to the border (nearest border voxel); a number: constant value
            at points outside ``[0, n-1]`` along any axis.
        rounding: nearest ties: ``"half_even"`` (``tf.round``, voxelmorph's) or ``"half_up"``.
        jit: run this op as its own XLA-compiled function (compiled once per input shape), also
            when the caller is not compiled; see `docs/layers.md` for when it pays.

    Returns:
        `(B, *So, C)` warped image.
    """
    _check_interp(interp)
    fill_value = _check_fill(fill_value)
    if rounding not in _ROUNDINGS:
        raise ValueError(f"`rounding` must be one of {_ROUNDINGS}. Received: rounding={rounding!r}")
    if jit:
        return _compiled(warp, interp=interp, fill_value=fill_value, rounding=rounding)(image, disp)
    disp = _as_float(disp)
    image = tf.convert_to_tensor(image)
    if image.dtype.is_floating or interp == "linear":
        image = _as_float(image, disp.dtype)
    in_shape = _static_spatial(image, "image")
    out_shape = _static_spatial(disp, "disp")
    ndims = len(in_shape)
    if len(out_shape) != ndims or disp.shape[-1] != ndims:
        raise ValueError(
            f"`disp` must have shape (batch, *spatial, {ndims}) for a {ndims}D image. "
            f"Received: disp.shape={tuple(disp.shape)}, image.shape={tuple(image.shape)}"
        )
    return _sample(image, disp, interp, fill_value, rounding)


def affine_to_disp(affine, shape: Sequence[int]) -> tf.Tensor:
    """Dense displacement of a centred affine transform.

    Args:
        affine: `(B, N, N+1)` (or homogeneous `(B, N+1, N+1)`) matrix ``[A | b]`` including the
            identity, acting on voxel coordinates centred at ``c = (shape - 1) / 2``.
        shape: spatial shape of the fixed grid, length N.

    Returns:
        `(B, *shape, N)` float32 displacement ``u(x) = A (x - c) + b + c - x``.
    """
    affine = _as_float(affine)
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
    center = tf.constant([(s - 1) / 2.0 for s in shape], affine.dtype)
    grid = _grid(shape, affine.dtype) - center  # (*S, N) centred
    flat = tf.reshape(grid, (-1, ndims))
    matrix, trans = affine[:, :, :ndims], affine[:, :, ndims]
    # y_c = A x_c + b  ->  u = y_c - x_c
    moved = tf.einsum("bij,pj->bpi", matrix, flat) + trans[:, None, :]
    disp = moved - flat[None]
    return tf.reshape(disp, (-1, *shape, ndims))


def integrate_svf(velocity, steps: int = 7, *, jit: bool = False) -> tf.Tensor:
    """Scaling and squaring: displacement ``exp(v)`` of a stationary velocity field.

    Args:
        velocity: `(B, *S, N)` velocity in voxels.
        steps: int >= 0; ``u = v / 2**steps``, then ``steps`` times ``u = u + warp(u, u)``.
        jit: run the whole integration as one XLA-compiled function (see `warp`).

    Returns:
        `(B, *S, N)` float32 displacement (pull).
    """
    steps = _check_steps(steps)
    if jit:
        return _compiled(integrate_svf, steps=steps)(velocity)
    disp = _as_float(velocity) / float(2**steps)
    for _ in range(steps):
        disp = disp + warp(disp, disp)
    return disp


def compose(first, second, interp: str = "linear", *, jit: bool = False) -> tf.Tensor:
    """Displacement of applying ``first``, then ``second`` to an image.

    ``warp(warp(img, first), second) ~ warp(img, compose(first, second))`` with
    ``compose = second + warp(first, second)`` (voxelmorph's ``ComposeTransform([first, second])``).

    Args:
        first, second: `(B, *S, N)` displacements on the same grid, voxels.
        interp: interpolation of ``first``.
        jit: run as an XLA-compiled function (see `warp`).

    Returns:
        `(B, *S, N)` float32 displacement.
    """
    if jit:
        return _compiled(compose, interp=interp)(first, second)
    first, second = _common_float(first, second)
    if tuple(first.shape[1:]) != tuple(second.shape[1:]):
        raise ValueError(
            "`first` and `second` must have the same shape (batch, *spatial, ndims). "
            f"Received: first.shape={tuple(first.shape)}, second.shape={tuple(second.shape)}"
        )
    return second + warp(first, second, interp=interp)


def compose_affine(first, second) -> tf.Tensor:
    """Affine of applying ``first``, then ``second`` (both centred the same way).

    A point ``x`` of the fixed grid samples ``T_first(T_second(x))``, so the product is
    ``H_first @ H_second`` in homogeneous form.

    Args:
        first, second: `(B, N, N+1)` (or `(B, N+1, N+1)`) matrices.

    Returns:
        `(B, N, N+1)` float32 matrix.
    """
    first, second = _common_float(first, second)
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


def _resize_coords(n_in: int, n_out: int, align: str) -> np.ndarray:
    if align == "corners":
        return np.linspace(0.0, n_in - 1.0, n_out) if n_out > 1 else np.zeros(1)
    return np.arange(n_out) * (n_in / n_out)  # "origin": x_out / zoom, voxel 0 fixed


def _out_shape(spatial: Sequence[int], factor_or_shape) -> tuple[int, ...]:
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
    if align not in _ALIGNS:
        raise ValueError(f"`align` must be one of {_ALIGNS}. Received: align={align!r}")
    image = _as_float(image)
    spatial = _static_spatial(image, "image")
    out_shape = _out_shape(spatial, factor_or_shape)
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
    if isinstance(factor, bool) or not isinstance(factor, (int, float, np.number)) or factor <= 0:
        raise ValueError(f"`factor` must be a number > 0. Received: factor={factor!r}")
    disp = _as_float(disp)
    spatial = _static_spatial(disp, "disp")
    if disp.shape[-1] != len(spatial):
        raise ValueError(
            f"`disp` must have {len(spatial)} channels. Received: disp.shape={tuple(disp.shape)}"
        )
    factor = float(factor)
    if factor == 1.0:
        return disp
    # voxelmorph order: shrink = resize then scale, grow = scale then resize (same values)
    if factor < 1:
        return resize(disp, factor, align=align) * factor
    return resize(disp * factor, factor, align=align)


resize_field = rescale_field


# --------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------
def _float32_kwargs(kwargs: dict) -> dict:
    """These layers compute in float32 whatever the global policy (coordinates need it)."""
    kwargs.setdefault("dtype", "float32")
    return kwargs


def _shape_list(input_shape) -> list:
    return list(input_shape) if input_shape is not None else []


@keras.saving.register_keras_serializable(package="tfreg")
class SpatialTransformer(keras.layers.Layer):
    """Warp an image by a displacement field or a centred affine transform.

    ``warped(x) = image(x + u(x))``; an affine ``[A | b]`` gives ``u(x) = A (x-c) + b + c - x``,
    ``c = (shape - 1) / 2``.

    Args:
        interp: ``"linear"`` (images) or ``"nearest"`` (label maps). Defaults to ``"linear"``.
        fill_value: None (default): clamp to the border; a number: constant outside.
        rounding: nearest ties, ``"half_even"`` (default, voxelmorph) or ``"half_up"``.
        jit: bool. Run the op as its own XLA-compiled function (compiled once per input shape)
            even when the surrounding model is not compiled. Much faster on CPU for volumes of
            64^3 and up; costs a compilation of seconds per shape. Defaults to False.

    Input shape:
        ``[image, transform]``: image `(batch, *spatial, channels)`; transform either a
        displacement `(batch, *spatial, ndims)` in voxels (ij, pull) or an affine
        `(batch, ndims, ndims + 1)` on voxel coordinates, ndims 2 or 3.
    Output shape:
        `(batch, *spatial, channels)`: float32 for linear, the image dtype for nearest.

    Example:
    >>> image, disp = np.zeros((1, 8, 8, 8, 2)), np.zeros((1, 8, 8, 8, 3))
    >>> tuple(SpatialTransformer()([image, disp]).shape)
    (1, 8, 8, 8, 2)
    """

    def __init__(self, interp="linear", fill_value=None, rounding="half_even", jit=False, **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        self.jit = _check_bool(jit, "jit")
        self.interp = _check_interp(interp)
        self.fill_value = _check_fill(fill_value)
        if rounding not in _ROUNDINGS:
            raise ValueError(
                f"`rounding` must be one of {_ROUNDINGS}. Received: rounding={rounding!r}"
            )
        self.rounding = rounding

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise ValueError(
                f"SpatialTransformer expects inputs [image, transform]. Received: input_shape={input_shape}"
            )
        image_shape, trf_shape = _shape_list(input_shape[0]), _shape_list(input_shape[1])
        ndims = len(image_shape) - 2
        if ndims not in (2, 3):
            raise ValueError(
                "`image` must have shape (batch, *spatial, channels) with 2 or 3 spatial axes. "
                f"Received: image_shape={tuple(image_shape)}"
            )
        if not is_affine(trf_shape, ndims):
            if len(trf_shape) != ndims + 2 or trf_shape[-1] != ndims:
                raise ValueError(
                    f"`transform` must be a displacement (batch, *spatial, {ndims}) or an affine "
                    f"(batch, {ndims}, {ndims + 1}). Received: transform_shape={tuple(trf_shape)}"
                )

    def call(self, inputs):
        image, trf = inputs
        ndims = len(image.shape) - 2
        if is_affine(trf.shape, ndims):
            trf = affine_to_disp(trf, image.shape[1:-1])
        return warp(image, trf, self.interp, self.fill_value, rounding=self.rounding, jit=self.jit)

    def compute_output_shape(self, input_shape):
        image_shape, trf_shape = input_shape
        ndims = len(image_shape) - 2
        if is_affine(trf_shape, ndims):
            return tuple(image_shape)
        return (image_shape[0], *trf_shape[1:-1], image_shape[-1])

    def compute_output_spec(self, inputs):
        image, trf = inputs
        shape = self.compute_output_shape((image.shape, trf.shape))
        dtype = "float32" if self.interp == "linear" or "float" in str(image.dtype) else image.dtype
        return keras.KerasTensor(shape, dtype=dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "interp": self.interp,
            "fill_value": self.fill_value,
            "rounding": self.rounding,
            "jit": self.jit,
        }


def _check_field_shape(shape, name: str = "input_shape") -> int:
    shape = _shape_list(shape)
    ndims = len(shape) - 2
    if ndims not in (2, 3) or shape[-1] != ndims:
        raise ValueError(
            "Expected a field (batch, *spatial, ndims) with ndims 2 or 3. "
            f"Received: {name}={tuple(shape)}"
        )
    return ndims


@keras.saving.register_keras_serializable(package="tfreg")
class VecInt(keras.layers.Layer):
    """Scaling and squaring of a stationary velocity field.

    Args:
        steps: int >= 0. The field is divided by ``2**steps``, then composed with itself
            ``steps`` times. Defaults to 7.
        jit: bool. Run the op as its own XLA-compiled function (compiled once per input shape)
            even when the surrounding model is not compiled. Much faster on CPU for volumes of
            64^3 and up; costs a compilation of seconds per shape. Defaults to False.

    Input shape:
        `(batch, *spatial, ndims)`, ndims 2 or 3: velocity in voxels of the fixed grid;
        channel ``d`` moves along array axis ``d`` (ij).
    Output shape:
        Same: displacement in voxels, pull: ``warped(x) = moving(x + u(x))``.

    Example:
    >>> tuple(VecInt()(np.zeros((1, 8, 8, 8, 3), "float32")).shape)
    (1, 8, 8, 8, 3)
    """

    def __init__(self, steps=7, jit=False, **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        self.steps = _check_steps(steps)
        self.jit = _check_bool(jit, "jit")

    def build(self, input_shape):
        _check_field_shape(input_shape)

    def call(self, velocity):
        return integrate_svf(velocity, self.steps, jit=self.jit)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "steps": self.steps, "jit": self.jit}


@keras.saving.register_keras_serializable(package="tfreg")
class RescaleTransform(keras.layers.Layer):
    """Resize a displacement field by ``factor`` and scale its values by ``factor``.

    Args:
        factor: number > 0; output size ``int(n * factor)`` per axis.
        align: resize sampling grid: ``"corners"`` (default; voxelmorph's: first and last voxel
            centres coincide) or ``"origin"`` (output voxel ``i`` samples input ``i / factor``).

    Input shape:
        `(batch, *spatial, ndims)` displacement in voxels.
    Output shape:
        `(batch, *(int(n * factor) for n in spatial), ndims)` displacement in voxels of the new
        grid.

    Example:
    >>> tuple(RescaleTransform(0.5)(np.zeros((1, 8, 8, 8, 3), "float32")).shape)
    (1, 4, 4, 4, 3)
    """

    def __init__(self, factor, align="corners", **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        if isinstance(factor, bool) or not isinstance(factor, (int, float, np.number)) or factor <= 0:
            raise ValueError(f"`factor` must be a number > 0. Received: factor={factor!r}")
        if align not in _ALIGNS:
            raise ValueError(f"`align` must be one of {_ALIGNS}. Received: align={align!r}")
        self.factor = float(factor)
        self.align = align

    def build(self, input_shape):
        _check_field_shape(input_shape)

    def call(self, disp):
        return rescale_field(disp, self.factor, align=self.align)

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        spatial = _out_shape(shape[1:-1], self.factor)
        return (shape[0], *spatial, shape[-1])

    def get_config(self):
        return {**super().get_config(), "factor": self.factor, "align": self.align}


@keras.saving.register_keras_serializable(package="tfreg")
class ComposeTransform(keras.layers.Layer):
    """Compose two displacements: apply ``first``, then ``second``.

    ``u = second + warp(first, second)``, so ``warp(warp(img, first), second)`` equals
    ``warp(img, u)`` up to interpolation (voxelmorph's ``ComposeTransform([first, second])``).
    Either input may be an affine `(batch, ndims, ndims + 1)`; it is made dense first. Two affines
    give an affine: the matrix product ``H_first @ H_second`` (homogeneous, same centre).

    Args:
        jit: bool. Run the op as its own XLA-compiled function (compiled once per input shape)
            even when the surrounding model is not compiled. Much faster on CPU for volumes of
            64^3 and up; costs a compilation of seconds per shape. Defaults to False.

    Input shape:
        ``[first, second]``, each `(batch, *spatial, ndims)` (or an affine).
    Output shape:
        `(batch, *spatial, ndims)` displacement in voxels; `(batch, ndims, ndims + 1)` for two
        affines.

    Example:
    >>> z = np.zeros((1, 8, 8, 3), "float32")
    >>> tuple(ComposeTransform()([z[..., :2], z[..., :2]]).shape)
    (1, 8, 8, 2)
    """

    def __init__(self, jit=False, **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        self.jit = _check_bool(jit, "jit")

    def _spatial(self, shapes):
        for s in shapes:
            if len(s) >= 4:
                return tuple(s[1:-1])
        raise ValueError(
            f"ComposeTransform needs at least one dense displacement. Received: input_shape={shapes}"
        )

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise ValueError(
                f"ComposeTransform expects inputs [first, second]. Received: input_shape={input_shape}"
            )
        shapes = [_shape_list(s) for s in input_shape]
        if self._both_affine(shapes):
            return
        spatial = self._spatial(shapes)
        ndims = len(spatial)
        for s in shapes:
            if is_affine(s, ndims):
                continue
            if tuple(s[1:]) != (*spatial, ndims):
                raise ValueError(
                    f"ComposeTransform inputs must be displacements (batch, *spatial, {ndims}) on one "
                    f"grid or affines. Received: input_shape={input_shape}"
                )

    def call(self, inputs):
        first, second = inputs
        ndims = first.shape[-1] - 1
        if is_affine(first.shape, ndims) and is_affine(second.shape, ndims):
            return compose_affine(first, second)
        spatial = self._spatial([first.shape, second.shape])
        ndims = len(spatial)
        if is_affine(first.shape, ndims):
            first = affine_to_disp(first, spatial)
        if is_affine(second.shape, ndims):
            second = affine_to_disp(second, spatial)
        return compose(first, second, jit=self.jit)

    @staticmethod
    def _both_affine(shapes) -> bool:
        ndims = (shapes[0][-1] or 0) - 1
        return all(is_affine(s, ndims) for s in shapes)

    def compute_output_shape(self, input_shape):
        shapes = [tuple(s) for s in input_shape]
        if self._both_affine(shapes):
            ndims = shapes[0][-1] - 1
            return (shapes[0][0], ndims, ndims + 1)
        spatial = self._spatial(shapes)
        return (shapes[0][0], *spatial, len(spatial))

    def get_config(self):
        return {**super().get_config(), "jit": self.jit}


@keras.saving.register_keras_serializable(package="tfreg")
class AffineToField(keras.layers.Layer):
    """Dense displacement of a centred affine transform.

    Args:
        shape: spatial shape of the fixed grid (2 or 3 ints).

    Input shape:
        `(batch, ndims, ndims + 1)` matrix ``[A | b]`` including the identity, voxel coordinates
        centred at ``c = (shape - 1) / 2``; maps a fixed-grid point to a moving-grid point.
    Output shape:
        `(batch, *shape, ndims)` displacement ``u(x) = A (x - c) + b + c - x`` in voxels.

    Example:
    >>> tuple(AffineToField((8, 8, 8))(np.eye(3, 4, dtype="float32")[None]).shape)
    (1, 8, 8, 8, 3)
    """

    def __init__(self, shape, **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        try:
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise ValueError(f"`shape` must be 2 or 3 positive ints. Received: shape={shape!r}") from None
        if len(shape) not in (2, 3) or any(s < 1 for s in shape):
            raise ValueError(f"`shape` must be 2 or 3 positive ints. Received: shape={shape!r}")
        self.shape = shape

    def build(self, input_shape):
        ndims = len(self.shape)
        if not is_affine(_shape_list(input_shape), ndims):
            raise ValueError(
                f"AffineToField({self.shape}) expects an affine (batch, {ndims}, {ndims + 1}). "
                f"Received: input_shape={tuple(input_shape)}"
            )

    def call(self, affine):
        return affine_to_disp(affine, self.shape)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.shape, len(self.shape))

    def get_config(self):
        return {**super().get_config(), "shape": list(self.shape)}


@keras.saving.register_keras_serializable(package="tfreg")
class GaussianSample(keras.layers.Layer):
    """Reparameterised sample of a Gaussian field with a diagonal covariance.

    ``training=True``: ``mean + exp(log_var / 2) * eps``, ``eps ~ N(0, 1)`` per element (the
    sample is differentiable in ``mean`` and ``log_var``); otherwise the mean itself. This is the
    velocity sample of the probabilistic diffeomorphic VoxelMorph (Dalca et al. 2018/2019), whose
    second head is the log *variance* (their ``log_sigma``).

    Args:
        seed: int or None, seed of the layer's random stream.

    Input shape:
        ``[mean, log_var]``, two tensors of the same shape.
    Output shape:
        That shape, float32.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        self.seed = seed
        self._generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        mean, log_var = inputs
        if not training:
            return mean
        noise = keras.random.normal(tf.shape(mean), seed=self._generator, dtype="float32")
        return mean + tf.exp(log_var / 2.0) * noise

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}
