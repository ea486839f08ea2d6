"""The ``affine`` and ``avsm`` methods' additions to ``tfreg register --model`` (`REGISTER_HOOK`).

The models register in one pass; the hook hands ``tfreg register`` the affine part of the
result (the ``affine`` output: ``model.affine_test_steps`` composed steps of the affine network,
tfreg's centred voxel affine on the model's input grid). ``tfreg register`` maps it onto the fixed
grid, reports it as ``affine`` (voxels) and ``affine_world`` (RAS mm), and writes it to
``affine.mat`` (with ``--itk``, the vSVF part as ``itk_warp.nii.gz``).
"""
from __future__ import annotations

import keras
import numpy as np

from tfreg.registry import RegisterHook, RegisterReport

__all__ = ["REGISTER_HOOK", "affine_report"]


def affine_report(keras_model: keras.Model, config: dict, inputs: dict, options: dict
                  ) -> RegisterReport:
    """The model's affine part for one preprocessed pair (only the affine chain is evaluated).

    Returns:
        `RegisterReport` with ``affine`` `(N, N+1)` (model grid), the entry ``affine_steps``
        (steps of the affine network composed) and one summary line.
    """
    chain = keras.Model(keras_model.input, keras_model.output["affine"])
    affine = np.asarray(chain(inputs, training=False), np.float64)[0]
    steps = int((config.get("model") or {}).get("affine_test_steps", 1))
    where = "report.json (affine, affine_world) and affine.mat" if affine.shape[0] == 3 \
        else "report.json (affine)"
    return RegisterReport(entries={"affine_steps": steps},
                          lines=(f"affine part ({steps} step{'s' * (steps != 1)} of the affine "
                                 f"network): in {where}",),
                          affine=affine)


REGISTER_HOOK = RegisterHook(report=affine_report)
