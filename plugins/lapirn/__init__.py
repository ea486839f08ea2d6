"""LapIRN (Mok & Chung, MICCAI 2020) as a tfreg method.

Laplacian-pyramid image registration network: three CRNs at 1/4, 1/2 and full resolution, trained
coarse to fine in three stages (lower levels frozen for the first steps of each new stage), each
with a multi-resolution local NCC and a smoothness term on its velocity (diffeomorphic variant) or
displacement (displacement variant). Defaults: ``configs/lapirn.yaml``; guide: ``docs/lapirn.md``.
"""

from __future__ import annotations

from tfreg.registry import Method

from . import losses, network, schedule

__all__ = ["METHOD", "network", "losses", "schedule"]

METHOD = Method(
    name="lapirn",
    summary="LapIRN: 3-level Laplacian pyramid of CRNs trained coarse to fine; diffeomorphic or "
            "displacement.",
    default_config="lapirn.yaml",
    build_model=network.build_model,
    build_loss=losses.build_loss,
    stages=schedule.stages,
    needs_divisible_by=network.DIVISOR,
)
