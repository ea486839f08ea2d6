"""Local correlation (a cost volume) between two feature maps, and its soft-argmax.

For fixed features ``f`` and moving features ``m`` on the same grid, both `(B, *S, C)`, and every
integer displacement ``d`` in ``[-r, r]^N`` (`displacements`), the cost volume is

* ``metric="dot"``: ``cost_k(x) = mean_c f_c(x) m_c(x + d_k)``;
* ``metric="ssd"``: ``cost_k(x) = -mean_c (f_c(x) - m_c(x + d_k))^2``;

higher is a better match in both. Outside the grid ``m`` repeats its border voxel
(``padding="edge"``, as `tfreg.ops.sampling.warp` with ``fill_value=None``) or is zero
(``padding="zero"``). The displacement follows tfreg's pull convention: matching ``f(x)`` with
``m(x + d)`` means ``warped(x) = moving(x + d)``.

`soft_argmax` turns a cost volume into a displacement, the expectation of ``d`` under
``softmax(cost / temperature)`` over ``k``: sub-voxel, differentiable, bounded by ``r``.

Float32 (float64 stays float64), 2D and 3D, differentiable, usable inside ``tf.function(jit_compile=True)``.
"""

from __future__ import annotations

import itertools

import numpy as np
import tensorflow as tf

from tfreg.ops.filters import edge_pad, shifted

__all__ = ["displacements", "local_correlation", "soft_argmax"]

METRICS = ("dot", "ssd")
PADDINGS = ("edge", "zero")


def displacements(ndims: int, radius: int) -> np.ndarray:
    """The integer displacements of the cost volume, `(K, ndims)` int32, ``K = (2r + 1)^N``,
    in row-major order (the last axis varies fastest).

    Example:
    >>> displacements(2, 1)[:4].tolist()
    [[-1, -1], [-1, 0], [-1, 1], [0, -1]]
    """
    if ndims not in (2, 3):
        raise ValueError(f"`ndims` must be 2 or 3. Received: ndims={ndims}")
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"`radius` must be an int >= 0. Received: radius={radius!r}")
    steps = range(-int(radius), int(radius) + 1)
    return np.array(list(itertools.product(steps, repeat=ndims)), dtype=np.int32)


def _float(x) -> tf.Tensor:
    """float32, or float64 when given float64 (gradient checks)."""
    x = tf.convert_to_tensor(x)
    return x if x.dtype == tf.float64 else tf.cast(x, tf.float32)


def _pad(x: tf.Tensor, radius: int, padding: str) -> tf.Tensor:
    ndims = len(x.shape) - 2
    if padding == "zero":
        return tf.pad(x, [[0, 0]] + [[radius, radius]] * ndims + [[0, 0]])
    for axis in range(1, ndims + 1):
        x = edge_pad(x, axis, radius, radius)
    return x


def local_correlation(fixed: tf.Tensor, moving: tf.Tensor, radius: int, *, metric: str = "dot",
                      padding: str = "edge") -> tf.Tensor:
    """Cost volume of `fixed` against `moving` over all displacements in ``[-radius, radius]^N``.

    Args:
        fixed, moving: `(batch, *spatial, C)` feature maps on one grid, 2 or 3 spatial axes.
        radius: largest displacement per axis, voxels (int >= 0).
        metric: ``"dot"`` (mean product over channels) or ``"ssd"`` (minus the mean squared
            difference).
        padding: ``"edge"`` (repeat the border voxel of `moving`) or ``"zero"``.

    Returns:
        `(batch, *spatial, K)` float32, channel ``k`` for displacement ``displacements(N, r)[k]``.
    """
    f = _float(fixed)
    m = tf.cast(_float(moving), f.dtype)
    ndims = len(f.shape) - 2
    if ndims not in (2, 3) or f.shape[1:] != m.shape[1:]:
        raise ValueError("`fixed` and `moving` must have one shape (batch, *spatial, C) with 2 or "
                         f"3 spatial axes. Received: {tuple(f.shape)} and {tuple(m.shape)}")
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}. Received: metric={metric!r}")
    if padding not in PADDINGS:
        raise ValueError(f"`padding` must be one of {PADDINGS}. Received: padding={padding!r}")
    offsets = displacements(ndims, radius)
    padded = _pad(m, int(radius), padding)
    costs = []
    for d in offsets:
        moved = shifted(padded, tuple(int(o) for o in d), int(radius))
        if metric == "dot":
            costs.append(tf.reduce_mean(f * moved, axis=-1))
        else:
            costs.append(-tf.reduce_mean(tf.square(f - moved), axis=-1))
    return tf.stack(costs, axis=-1)


def soft_argmax(cost: tf.Tensor, radius: int, temperature: float | tf.Tensor = 1.0) -> tf.Tensor:
    """Expected displacement under ``softmax(cost / temperature)`` over the cost volume's channels.

    Args:
        cost: `(batch, *spatial, K)` from `local_correlation`, ``K = (2 radius + 1)^N``.
        radius: the radius the cost volume was computed with.
        temperature: > 0 (a number or a scalar tensor, e.g. a trainable weight); small values
            approach the hard argmax.

    Returns:
        `(batch, *spatial, N)` float32 displacement in voxels (channel ``d`` along axis ``d``).
    """
    cost = _float(cost)
    ndims = len(cost.shape) - 2
    offsets = displacements(ndims, radius)
    if cost.shape[-1] != len(offsets):
        raise ValueError(f"`cost` has {cost.shape[-1]} channels; radius {radius} in {ndims}D "
                         f"needs {len(offsets)}")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"`temperature` must be > 0. Received: temperature={temperature!r}")
    weights = tf.nn.softmax(cost / tf.cast(temperature, cost.dtype), axis=-1)
    return tf.tensordot(weights, tf.constant(offsets, cost.dtype), axes=[[ndims + 1], [0]])
