"""Recursive cascaded networks (Zhao et al., ICCV 2019) as a tfreg method.

An optional VTN affine stem, then n deformable cascades (VTN or the VoxelMorph U-Net), each seeing
the fixed image and the current warped moving image; fields are composed and the moving image is
always resampled once from the original. Shared weights make the cascade a recursion that can run
any number of times at test time. Defaults: ``plugins/cascade/cascade.yaml``; guide: ``docs/cascade.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tfreg.data import SPEC_DATA
from tfreg.registry import Method, ModelIO, adam
from tfreg.validation import choice, integer, number

from . import losses, network, report

__all__ = ["METHOD", "network", "losses", "report", "divisible_by", "Loss"]


@dataclass(frozen=True)
class Loss:
    """The ``loss:`` section (see cascade.yaml)."""

    similarity: str = choice("gncc", losses.SIMILARITIES)
    ncc_window: int = integer(9, low=1)
    smooth_weight: float = number(1.0, low=0.0)
    det_weight: float = number(0.1, low=0.0)
    ortho_weight: float = number(0.1, low=0.0)


def divisible_by(config: dict) -> int:
    """``2**vtn_levels`` (VTN base or affine stem) or ``2**len(unet_enc_features)`` (VoxelMorph
    base), whichever is larger, from the resolved ``model:`` section."""
    return network.Architecture.from_config(config).divisor


METHOD = Method(
    name="cascade",
    summary="Recursive cascaded networks (VTN/VoxelMorph bases, affine stem); shared-weight recursion.",
    default_config="cascade.yaml",
    build_model=network.build,
    build_loss=losses.build,
    data=SPEC_DATA,
    io=ModelIO(inputs=("moving", "fixed"), warped="warped", disp="disp",
               fields=("disp", "disp_*", "flow_*", "affine")),
    optimizer=adam,
    divisible_by=divisible_by,
    register_hook=report.REGISTER_HOOK,
    sections={"loss": Loss},
    renamed={"loss.reg_weight": "loss.smooth_weight"},
)
