"""Quicksilver (Yang, Kwitt, Styner, Niethammer 2017): patch-wise prediction of the initial LDDMM
momentum, a correction network, and a probabilistic (Monte-Carlo dropout) variant.

Modules: `network` (the patch network), `patches` (patch starts, gathering, reassembly),
`targets` (the HDF5 cache of optimised momenta), `data` (the data source: the spec's pairs,
their optimised momenta, random patches), `layers` (the networks on whole images, shooting),
`model` (the model, loss, stages and register hook). The LDDMM mathematics lives in
`tfreg.ops.lddmm`. Guide: ``docs/quicksilver.md``.
"""
from __future__ import annotations

from tfreg.registry import Method, ModelIO, RegisterHook, adam

from . import model
from .data import QUICKSILVER_DATA

__all__ = ["METHOD"]

METHOD = Method(
    name="quicksilver",
    summary="Quicksilver: patch networks predict the initial LDDMM momentum (+ correction "
            "network, Monte-Carlo dropout uncertainty), then geodesic shooting.",
    default_config="quicksilver.yaml",
    build_model=model.build_model,
    build_loss=model.build_loss,
    stages=model.stages,
    data=QUICKSILVER_DATA,
    io=ModelIO(inputs=("moving", "fixed", "starts"),
               fields=("disp", "inverse_disp", "momentum", "patch_*"),
               inference_inputs=model.inference_inputs),
    optimizer=adam,
    register_hook=RegisterHook(report=model.register_report),
    sections={"model": model.Model, "lddmm": model.Lddmm, "targets": model.Targets,
              "schedule": model.Schedule},
)
