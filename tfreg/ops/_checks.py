"""Argument checks and dtype helpers shared by the ops modules (private)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

INTERPS = ("linear", "nearest")
ROUNDINGS = ("half_even", "half_up")
ALIGNS = ("corners", "origin")


def static_spatial(x: tf.Tensor, name: str) -> tuple[int, ...]:
    """Static spatial shape of a `(batch, *spatial, channels)` tensor with 2 or 3 spatial axes."""
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


def check_interp(interp: str) -> str:
    if interp not in INTERPS:
        raise ValueError(
            f"`interp` must be one of {', '.join(repr(i) for i in INTERPS)}. "
            f"Received: interp={interp!r}"
        )
    return interp


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"`rounding` must be one of {ROUNDINGS}. Received: rounding={rounding!r}")
    return rounding


def check_align(align: str) -> str:
    if align not in ALIGNS:
        raise ValueError(f"`align` must be one of {ALIGNS}. Received: align={align!r}")
    return align


def check_fill(fill_value) -> float | None:
    if fill_value is None:
        return None
    if isinstance(fill_value, bool) or not isinstance(fill_value, (int, float, np.number)):
        raise ValueError(f"`fill_value` must be None or a number. Received: fill_value={fill_value!r}")
    if not math.isfinite(float(fill_value)):
        raise ValueError(f"`fill_value` must be finite. Received: fill_value={fill_value!r}")
    return float(fill_value)


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"`steps` must be an int >= 0. Received: steps={steps!r}")
    return int(steps)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
    return bool(value)


def check_factor(factor) -> float:
    if isinstance(factor, bool) or not isinstance(factor, (int, float, np.number)) or factor <= 0:
        raise ValueError(f"`factor` must be a number > 0. Received: factor={factor!r}")
    return float(factor)


def as_float(x, dtype=None) -> tf.Tensor:
    """float64 stays float64 (for gradient checks); anything else becomes float32."""
    x = tf.convert_to_tensor(x)
    if dtype is None:
        dtype = tf.float64 if x.dtype == tf.float64 else tf.float32
    return x if x.dtype == dtype else tf.cast(x, dtype)


def common_float(*xs) -> list[tf.Tensor]:
    """float64 if any input is float64, else float32."""
    xs = [tf.convert_to_tensor(x) for x in xs]
    dtype = tf.float64 if any(x.dtype == tf.float64 for x in xs) else tf.float32
    return [as_float(x, dtype) for x in xs]


def ndims_of(x, name: str) -> int:
    """Spatial rank (2 or 3) of a `(batch, *spatial, channels)` tensor."""
    rank = len(x.shape)
    if rank not in (4, 5):
        raise ValueError(f"`{name}` must have shape (batch, *spatial, channels) with 2 or 3 spatial "
                         f"axes. Received: {name}.shape={tuple(x.shape)}")
    return rank - 2


def window(win: int | Sequence[int], ndims: int) -> tuple[int, ...]:
    """A window given as a positive int or one positive int per spatial axis, as a tuple."""
    values = (win,) if isinstance(win, (int, np.integer)) else tuple(win)
    if not values or any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1
                         for w in values):
        raise ValueError(f"`win` must be a positive int or a sequence of positive ints. "
                         f"Received: win={win!r}")
    if len(values) == 1 and isinstance(win, (int, np.integer)):
        values = values * ndims
    if len(values) != ndims:
        raise ValueError(f"`win` needs one size per spatial axis ({ndims}). Received: win={win}")
    return tuple(int(w) for w in values)
