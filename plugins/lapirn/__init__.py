"""LapIRN (Mok & Chung, MICCAI 2020) as a tfreg method.

Laplacian-pyramid image registration network: three CRNs at 1/4, 1/2 and full resolution, trained
coarse to fine in three stages (lower levels frozen for the first steps of each new stage), each
with a multi-resolution local NCC and a smoothness term on its velocity (diffeomorphic variant) or
displacement (displacement variant). Defaults: ``plugins/lapirn/lapirn.yaml``; guide: ``docs/lapirn.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tfreg.data import SPEC_DATA
from tfreg.registry import Method, ModelIO, adam
from tfreg.validation import number

from . import losses, network, schedule

__all__ = ["METHOD", "network", "losses", "schedule", "Loss"]


@dataclass(frozen=True)
class Loss:
    """The ``loss:`` section (see lapirn.yaml)."""

    smooth_weight: float | None = number(None, low=0.0, nullable=True)
    antifold: float = number(0.0, low=0.0)


#: Each level's training stage starts with a fresh Adam (`adam`), as the original builds a new
#: optimizer per level: levels 2 and 3 take the first steps of a fresh optimizer.
METHOD = Method(
    name="lapirn",
    summary="LapIRN: 3-level Laplacian pyramid of CRNs trained coarse to fine; diffeomorphic or "
            "displacement.",
    default_config="lapirn.yaml",
    build_model=network.build_model,
    build_loss=losses.build_loss,
    stages=schedule.stages,
    data=SPEC_DATA,
    io=ModelIO(inputs=("moving", "fixed"), warped="warped", disp="disp",
               fields=("disp", "disp_l*", "velocity_l*")),
    optimizer=adam,
    divisible_by=network.DIVISOR,
    sections={"loss": Loss},
    renamed={"loss.smooth": "loss.smooth_weight"},
)
