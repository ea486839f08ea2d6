"""LapIRN training losses, per level: multi-resolution local NCC, smoothness, optional anti-folding.

Level ``l`` (stage ``"level{l}"``) minimises::

    NCC_pyramid_l(fixed_l, warped_l) + smooth * R(field_l) + antifold * F(disp_l)

* ``NCC_pyramid_l``: LapIRN's multi-resolution local NCC, ``-cross^2 / (var_I var_J + 1e-5)``
  averaged over voxels, windows ``(3,)`` / ``(5, 3)`` / ``(7, 5, 3)`` with weights ``(1,)`` /
  ``(1, 1/2)`` / ``(1, 1/2, 1/4)`` on successively pooled images (`tfreg.losses.MultiResolutionNCC`
  with ``eps_mode="add"``). ``fixed_l`` is the fixed image pooled to the level's grid exactly as the
  model pools it.
* ``R``: smoothness of the level's field, the velocity ``velocity_l`` (diffeomorphic) or the
  displacement ``disp_l`` (displacement variant), on the level's own grid.
* ``F``: ``mean(relu(-det J))`` of ``x -> x + disp_l(x)``, forward differences (off by default).

Units of the smoothness term
----------------------------
The original code regularises a field ``w`` given in normalised units (``[-1, 1]`` across the
volume) after multiplying channel ``d`` by ``n_d - 1`` (the level grid's size along that channel's axis),
then takes the mean squared forward difference along each axis and averages over the axes. A
field in voxels of the level's grid is ``u_d = w_d (n_d - 1) / 2``, so ``w_d (n_d - 1) = 2 u_d``
exactly and::

    R(u) = (1/N) sum_k mean((u[x + e_k] - u[x])^2) * 4   (u in voxels of the level's grid)

i.e. `tfreg.losses.Grad("l2", loss_mult=4)` applied to the level's voxel-unit field. With this R the
original weights carry over unchanged: ``smooth = 3.5`` (diffeomorphic) and ``1.0`` (displacement).
The differences are taken per voxel of the level's grid, so R measures the same dimensionless
strain at every level.

With ``model.units: voxels`` (the original's ``unorm`` displacement script) the original
regularises the displacement in voxels directly, so the factor is 1:
``R(u) = (1/N) sum_k mean((u[x + e_k] - u[x])^2)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tensorflow as tf

from tfreg.errors import ConfigError
from tfreg.losses import Grad, MultiResolutionNCC
from tfreg.ops.differences import jacobian_determinant
from tfreg.ops.filters import pool_half

from .network import LEVELS, model_options

__all__ = [
    "DEFAULT_SMOOTH",
    "NCC_WINDOWS",
    "NCC_WEIGHTS",
    "LossOptions",
    "loss_options",
    "stage_level",
    "smoothness",
    "negative_jacobian",
    "build_loss",
]

#: Smoothness weight of the original training scripts, per variant.
DEFAULT_SMOOTH = {"diffeomorphic": 3.5, "displacement": 1.0}
#: Local NCC windows (voxels) of each level's similarity pyramid, finest scale first.
NCC_WINDOWS = {1: (3,), 2: (5, 3), 3: (7, 5, 3)}
#: Weights of the pyramid scales.
NCC_WEIGHTS = {1: (1.0,), 2: (1.0, 0.5), 3: (1.0, 0.5, 0.25)}
#: ``R = SMOOTH_UNIT_FACTOR * Grad_l2(u_voxels)`` reproduces the original's units (see module doc).
SMOOTH_UNIT_FACTOR = 4.0


@dataclass(frozen=True)
class LossOptions:
    """Validated ``loss:`` section (with the variant it applies to)."""

    variant: str
    smooth: float
    antifold: float
    smooth_factor: float = SMOOTH_UNIT_FACTOR


def _number(value, key: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"loss.{key}: expected a number >= 0"
                          f"{' or null' if allow_none else ''}, got {value!r}")
    return float(value)


def loss_options(config: dict) -> LossOptions:
    """Read ``model.variant``, ``loss.smooth_weight`` (null: the variant's default) and
    ``loss.antifold``.

    Raises:
        ConfigError: ``"loss.<key>: <problem>"`` (or ``"model.<key>: ..."``).
    """
    model = model_options(config)
    variant = model.variant
    section = config.get("loss") or {}
    smooth = _number(section.get("smooth_weight"), "smooth_weight", allow_none=True)
    antifold = _number(section.get("antifold", 0.0), "antifold")
    return LossOptions(variant=variant,
                       smooth=DEFAULT_SMOOTH[variant] if smooth is None else smooth,
                       antifold=antifold,
                       smooth_factor=1.0 if model.units == "voxels" else SMOOTH_UNIT_FACTOR)


def stage_level(name: str) -> int:
    """Level number of a stage name ``"level1"``, ``"level2"`` or ``"level3"``."""
    for level in range(1, LEVELS + 1):
        if name == f"level{level}":
            return level
    raise ValueError("Unknown LapIRN stage; expected level1, level2 or level3. "
                     f"Received: name={name!r}")


def smoothness(field: tf.Tensor, factor: float = SMOOTH_UNIT_FACTOR) -> tf.Tensor:
    """LapIRN's smoothness of a field in voxels of its own grid (see the module docstring).

    Args:
        field: `(B, *S, N)` velocity or displacement, voxels.
        factor: 4 for the normalised-unit models, 1 for ``units: voxels``.

    Returns:
        Scalar float32: ``factor * (1/N) sum_k mean((field[x + e_k] - field[x])^2)``.
    """
    return Grad(penalty="l2", loss_mult=factor)(None, field)


def negative_jacobian(disp: tf.Tensor) -> tf.Tensor:
    """LapIRN's anti-folding term: ``mean(relu(-det(I + D u)))``, forward differences.

    ``D u`` uses ``u[x + e_k] - u[x]`` on the grid cropped by one voxel at the far end of every
    axis (`tfreg.ops.differences.jacobian_determinant(mode="forward")`). The determinant is invariant to the axis order, so this equals the original's
    ``neg_Jdet_loss`` on the same field in voxel units.

    Args:
        disp: `(B, *S, N)` displacement in voxels, N = 2 or 3.

    Returns:
        Scalar float32 (0 when no voxel folds).
    """
    det = jacobian_determinant(tf.cast(disp, "float32"), mode="forward")
    return tf.reduce_mean(tf.nn.relu(-det))


def build_loss(config: dict) -> Callable[[dict, dict, object], dict[str, tf.Tensor]]:
    """The `LossFn` of a resolved config.

    The returned ``loss_fn(batch, outputs, ctx)`` reads the level from ``ctx.stage.name``
    (``"level1"``...) and returns weighted scalar terms ``{"ncc", "smooth"}`` plus ``"antifold"``
    when ``loss.antifold > 0``. It needs ``batch["fixed"]`` `(B, *S, 1)` and the outputs of
    `network.level_outputs(level, variant)`.
    """
    opts = loss_options(config)
    similarity = {level: MultiResolutionNCC(NCC_WINDOWS[level], NCC_WEIGHTS[level], squared=True,
                                            eps=1e-5, eps_mode="add")
                  for level in range(1, LEVELS + 1)}
    field_key = "velocity" if opts.variant == "diffeomorphic" else "disp"

    def loss_fn(batch: dict, outputs: dict, ctx) -> dict[str, tf.Tensor]:
        level = stage_level(ctx.stage.name)
        fixed = tf.cast(batch["fixed"], "float32")
        for _ in range(LEVELS - level):
            fixed = pool_half(fixed)
        terms = {
            "ncc": similarity[level](fixed, outputs[f"warped_l{level}"]),
            "smooth": opts.smooth * smoothness(outputs[f"{field_key}_l{level}"],
                                               opts.smooth_factor),
        }
        if opts.antifold > 0:
            terms["antifold"] = opts.antifold * negative_jacobian(outputs[f"disp_l{level}"])
        return terms

    return loss_fn
