"""AVSM (Shen, Han, Xu, Niethammer, CVPR 2019) as two tfreg methods.

* ``affine``: the multi-step affine network alone (``affine.yaml``); its exported model is an
  affine pre-alignment usable by ``tfreg register --model``.
* ``avsm``: the same affine network, pre-trained and frozen, followed by the vSVF part: a momentum
  U-Net, ``v = K * m`` with a multi-Gaussian smoother and RK4 map advection from the affine map
  (``avsm.yaml``).

Guide: ``docs/avsm.md``.
"""
from __future__ import annotations

from tfreg.registry import Method, ModelIO, adam

from . import affine, losses, model, report, schedule, vsvf
from .data import SYMMETRIC_DATA

__all__ = ["METHOD", "AFFINE", "affine", "losses", "model", "report", "schedule", "vsvf"]

AFFINE = Method(
    name="affine",
    summary="Multi-step affine network of AVSM (symmetric training, composed steps).",
    default_config="affine.yaml",
    build_model=model.build_affine_model,
    build_loss=losses.build_loss,
    stages=schedule.affine_stages,
    data=SYMMETRIC_DATA,
    io=ModelIO(fields=("disp", "affine")),
    optimizer=adam,
    register_hook=report.REGISTER_HOOK,
)

METHOD = Method(
    name="avsm",
    summary="AVSM: multi-step affine network + vSVF (momentum U-Net, multi-Gaussian smoothing, "
            "RK4 map advection).",
    default_config="avsm.yaml",
    build_model=model.build_avsm_model,
    build_loss=losses.build_loss,
    stages=schedule.avsm_stages,
    data=SYMMETRIC_DATA,
    io=ModelIO(fields=("disp", "affine", "vsvf_disp_*")),
    optimizer=adam,
    divisible_by=vsvf.DIVISOR,
    register_hook=report.REGISTER_HOOK,
)
