"""Eulerian map advection under a stationary velocity field, integrated with fixed-step RK4.

The map ``phi(x, t)`` (a position in the moving image for each point ``x`` of the fixed grid) solves::

    d phi / dt + D phi . v = 0,      phi(x, 0) = phi_0(x),      t in [0, T]

For a stationary ``v`` the solution is ``phi_t = phi_0 o flow_{-t}``: composed with the inverse flow
of ``v``, so ``moving o phi_1`` is the moving image transported along ``v`` (the vSVF transform).

Representation: the map is stored as a displacement ``u = phi - id`` in voxels of the grid it is
sampled on (pull convention, channel ``d`` along array axis ``d``), and ``v`` is given in voxels per
unit time on the same grid, so the right-hand side is ``du/dt = -(v + Du . v)``. ``Du`` uses
second-order central differences inside and first-order one-sided differences on the first and last
voxel of each axis (linear extrapolation of the map), so an affine map has an exact derivative and
a constant velocity translates any affine map exactly.

Works in 2D and 3D, float32 or float64 (kept), inside ``tf.function(jit_compile=True)``.
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

__all__ = ["map_gradient", "advection_rhs", "rk4", "advect_map", "UNROLL_MIN_VOXELS"]

#: ``loop="auto"`` unrolls the RK4 steps of grids with at least this many voxels (e.g. 41^3 and up)
UNROLL_MIN_VOXELS = 2**16


def _check(field: tf.Tensor, name: str) -> int:
    rank = field.shape.rank
    if rank not in (4, 5) or field.shape[-1] != rank - 2:
        raise ValueError(f"`{name}` must have shape (batch, *spatial, ndims) with ndims 2 or 3. "
                         f"Received: {name}.shape={tuple(field.shape)}")
    if any(s is None or s < 2 for s in field.shape[1:-1]):
        raise ValueError(f"`{name}` needs static spatial sizes >= 2. "
                         f"Received: {name}.shape={tuple(field.shape)}")
    return rank - 2


def _diff_axis(x: tf.Tensor, axis: int) -> tf.Tensor:
    """Derivative along array axis `axis` (1-based in `x`) in voxel units: central inside,
    one-sided at both ends."""
    n = x.shape[axis]

    def sl(start, stop):
        index = [slice(None)] * x.shape.rank
        index[axis] = slice(start, stop)
        return x[tuple(index)]

    first = sl(1, 2) - sl(0, 1)
    last = sl(n - 1, n) - sl(n - 2, n - 1)
    if n == 2:
        return tf.concat([first, last], axis=axis)
    inner = (sl(2, n) - sl(0, n - 2)) * 0.5
    return tf.concat([first, inner, last], axis=axis)


def map_gradient(disp: tf.Tensor) -> list[tf.Tensor]:
    """Spatial derivatives of a field ``(B, *S, C)``: list over axes ``d`` of ``d field / d x_d``
    ``(B, *S, C)``, in field units per voxel (central inside, one-sided at the borders)."""
    ndims = disp.shape.rank - 2
    return [_diff_axis(disp, d + 1) for d in range(ndims)]


def advection_rhs(disp: tf.Tensor, velocity: tf.Tensor) -> tf.Tensor:
    """``du/dt = -(v + Du . v)`` for the displacement ``u = phi - id`` (both ``(B, *S, N)``, voxels).
    """
    grads = map_gradient(disp)
    ndims = len(grads)
    transport = velocity
    for d in range(ndims):
        transport = transport + grads[d] * velocity[..., d:d + 1]
    return -transport


def rk4(f: Callable[[tf.Tensor], tf.Tensor], y0: tf.Tensor, time: float, steps: int, *,
        loop: bool = True) -> tf.Tensor:
    """Classical 4th-order Runge-Kutta for an autonomous ODE ``dy/dt = f(y)`` from 0 to `time` in
    `steps` equal steps; differentiable, also under XLA.

    ``loop=True``: one step is traced once and repeated by a ``tf.while_loop`` (small graph, fast
    to build). ``loop=False``: the steps are unrolled (a graph `steps` times larger, slower to
    build; see `advect_map` for why training graphs of large grids need it)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an int >= 1. Received: steps={steps!r}")
    h = float(time) / steps

    def step(y):
        k1 = f(y)
        k2 = f(y + (0.5 * h) * k1)
        k3 = f(y + (0.5 * h) * k2)
        k4 = f(y + h * k3)
        return y + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)

    if steps == 1 or not loop:
        y = y0
        for _ in range(steps):
            y = step(y)
        return y
    _, y = tf.while_loop(lambda i, y: i < steps, lambda i, y: (i + 1, step(y)),
                         (tf.constant(0), y0), maximum_iterations=steps)
    return y


def advect_map(velocity, initial=None, steps: int = 10, time: float = 1.0, *,
               loop: bool | str = "auto") -> tf.Tensor:
    """Transport a map by a stationary velocity: RK4 on ``d phi/dt + D phi . v = 0``.

    Args:
        velocity: `(B, *S, N)` velocity in voxels (of this grid) per unit time, N = 2 or 3.
        initial: `(B, *S, N)` displacement of the initial map ``phi_0 - id`` in voxels (e.g. an
            affine map from `tfreg.layers.affine_to_disp`); None = identity.
        steps: number of fixed RK4 steps over ``[0, time]`` (the vSVF original: 10 per unit time).
        time: integration time.
        loop: True: the RK4 steps as a ``tf.while_loop``; False: unrolled; ``"auto"`` (default):
            unrolled from `UNROLL_MIN_VOXELS` voxels up. Reason: in the backward pass of a large
            training graph, TensorFlow's graph memory optimiser turns gradient sums of more than two
            terms into temporary variables; inside the loop's backward pass their names collided
            (``AlreadyExistsError ... AddN/tmp_var``) and training stopped (AVSM with the MSE
            similarity at 80x96x80, a 40x48x40 momentum grid). Unrolled graphs take longer to
            build (about 25 s more for AVSM's first training step), so small grids keep the loop.

    Returns:
        `(B, *S, N)` displacement ``phi_time - id`` in voxels (pull: ``warped = warp(moving, .)``).
    """
    velocity = tf.convert_to_tensor(velocity)
    if not velocity.dtype.is_floating or velocity.dtype not in (tf.float32, tf.float64):
        velocity = tf.cast(velocity, tf.float32)
    _check(velocity, "velocity")
    if initial is None:
        initial = tf.zeros_like(velocity)
    else:
        initial = tf.cast(tf.convert_to_tensor(initial), velocity.dtype)
        _check(initial, "initial")
        if tuple(initial.shape[1:]) != tuple(velocity.shape[1:]):
            raise ValueError("`initial` and `velocity` must have the same shape. Received: "
                             f"{tuple(initial.shape)} and {tuple(velocity.shape)}")
    if not (isinstance(loop, bool) or loop == "auto"):
        raise ValueError(f"`loop` must be True, False or 'auto'. Received: loop={loop!r}")
    if loop == "auto":
        voxels = velocity.shape[1:-1].num_elements()
        loop = voxels is None or voxels < UNROLL_MIN_VOXELS
    return rk4(lambda u: advection_rhs(u, velocity), initial, time, steps, loop=loop)
