"""VoxelMorph (Balakrishnan et al. 2019; Dalca et al. 2019) as a tfreg method.

A U-Net predicts a displacement (``int_steps: 0``) or a stationary velocity field integrated by
scaling and squaring; trained with an image loss (MSE, NCC, MIND or NMI) plus
``smooth_weight * Grad``, optionally with a Dice term on warped label maps. Defaults: ``plugins/voxelmorph/voxelmorph.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tfreg.data import SPEC_DATA
from tfreg.registry import Method, ModelIO, adam
from tfreg.validation import choice, integer, number, value

# The network and loss modules (Keras, TensorFlow) load on first use, so that the plugin's
# command (`import-voxelmorph`) can check its arguments without importing TensorFlow.
__all__ = ["METHOD", "divisible_by", "Loss", "build_model", "build_loss"]


def build_model(config: dict, inshape: tuple[int, ...]):
    """`network.build`."""
    from .network import build

    return build(config, inshape)


def build_loss(config: dict):
    """`losses.build`."""
    from .losses import build

    return build(config)


@dataclass(frozen=True)
class Loss:
    """The ``loss:`` section (see voxelmorph.yaml)."""

    image: str = choice("mse", ("mse", "ncc", "mind", "nmi", "none"))
    smooth_weight: float | None = number(None, low=0.0, nullable=True)
    prior_lambda: float = number(25.0, low=0.0, low_open=True)
    image_sigma: float = number(1.0, low=0.0, low_open=True)
    ncc_window: int = integer(9, low=1)
    grad_penalty: str = choice("l2", ("l2", "l1"))
    dice_weight: float = number(0.0, low=0.0)
    labels: list | None = value(None)   # checked by losses.label_values
    label_loss: str = choice("dice", ("dice", "mse"))


def divisible_by(config: dict) -> int:
    """Every spatial size must divide by this: ``2**levels`` of the U-Net (32 for 5 levels) and
    the field resolutions, from the resolved ``model:`` section."""
    from .network import architecture, divisor

    return divisor(architecture(config))


METHOD = Method(
    name="voxelmorph",
    summary="VoxelMorph U-Net (VxmDense): diffeomorphic or plain field, MSE/NCC/MIND/NMI + Grad, optional Dice.",
    default_config="voxelmorph.yaml",
    build_model=build_model,
    build_loss=build_loss,
    data=SPEC_DATA,
    io=ModelIO(inputs=("moving", "fixed"), warped="warped", disp="disp",
               fields=("disp", "preint_flow", "neg_disp")),
    optimizer=adam,
    divisible_by=divisible_by,
    sections={"loss": Loss},
    renamed={"loss.lambda": "loss.smooth_weight"},
)
