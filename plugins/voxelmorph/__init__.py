"""VoxelMorph (Balakrishnan et al. 2019; Dalca et al. 2019) as a tfreg method.

A U-Net predicts a displacement (``int_steps: 0``) or a stationary velocity field integrated by
scaling and squaring; trained with an image loss (MSE or NCC) plus ``lambda * Grad``, optionally
with a Dice term on warped label maps. Defaults: ``configs/voxelmorph.yaml``.
"""

from __future__ import annotations

from tfreg.registry import Method

from . import losses, network

__all__ = ["METHOD", "network", "losses"]

METHOD = Method(
    name="voxelmorph",
    summary="VoxelMorph U-Net (VxmDense): diffeomorphic or plain field, MSE/NCC + Grad, optional Dice.",
    default_config="voxelmorph.yaml",
    build_model=network.build,
    build_loss=losses.build,
    needs_divisible_by=16,
)
