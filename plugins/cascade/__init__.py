"""Recursive cascaded networks (Zhao et al., ICCV 2019) as a tfreg method.

An optional VTN affine stem, then n deformable cascades (VTN or the VoxelMorph U-Net), each seeing
the fixed image and the current warped moving image; fields are composed and the moving image is
always resampled once from the original. Shared weights make the cascade a recursion that can run
any number of times at test time. Defaults: ``configs/cascade.yaml``; guide: ``docs/cascade.md``.
"""

from __future__ import annotations

from tfreg.registry import Method

from . import losses, network

__all__ = ["METHOD", "network", "losses"]

METHOD = Method(
    name="cascade",
    summary="Recursive cascaded networks (VTN/VoxelMorph bases, affine stem); shared-weight recursion.",
    default_config="cascade.yaml",
    build_model=network.build,
    build_loss=losses.build,
    needs_divisible_by=network.DIVISOR,
)
