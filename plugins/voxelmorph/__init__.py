"""VoxelMorph (Balakrishnan et al. 2019; Dalca et al. 2019) as a tfreg method.

A U-Net predicts a displacement (``int_steps: 0``) or a stationary velocity field integrated by
scaling and squaring; trained with an image loss (MSE or NCC) plus ``lambda * Grad``, optionally
with a Dice term on warped label maps. Defaults: ``plugins/voxelmorph/voxelmorph.yaml``.
"""

from __future__ import annotations

from tfreg.data import SPEC_DATA
from tfreg.registry import Method, ModelIO, adam

from . import losses, network

__all__ = ["METHOD", "network", "losses", "divisible_by"]


def divisible_by(config: dict) -> int:
    """Every spatial size must divide by this: ``2**levels`` of the U-Net (32 for 5 levels) and
    the field resolutions, from the resolved ``model:`` section."""
    return network.divisor(network.architecture(config))


METHOD = Method(
    name="voxelmorph",
    summary="VoxelMorph U-Net (VxmDense): diffeomorphic or plain field, MSE/NCC + Grad, optional Dice.",
    default_config="voxelmorph.yaml",
    build_model=network.build,
    build_loss=losses.build,
    data=SPEC_DATA,
    io=ModelIO(inputs=("moving", "fixed"), warped="warped", disp="disp",
               fields=("disp", "preint_flow", "neg_disp")),
    optimizer=adam,
    divisible_by=divisible_by,
)
