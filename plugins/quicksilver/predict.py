"""Whole-image prediction with the patch networks, then geodesic shooting.

``predict_momentum``: split both images into patches (`patches.patch_starts`), skip background
patches, run the network in batches, average overlapping predictions. With ``samples > 1`` the
network runs with dropout active (Monte-Carlo sampling of the probabilistic variant) and the mean
and the per-voxel standard deviation of the momentum are returned.

``register_arrays``: ``m = m_pred`` (+ ``m_corr`` from the correction network, whose inputs are
the moving image and the fixed image warped back into moving space by the predicted map), then
the final shooting (`tfreg.ops.lddmm.shoot`, 20 inverse iterations as the original's prediction)
gives the pull displacement.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tfreg_plugins.quicksilver import patches

__all__ = ["predict_momentum", "register_arrays", "Prediction"]


def predict_momentum(network, moving: np.ndarray, fixed: np.ndarray, *, patch: int = 15,
                     stride: int = 14, batch_size: int = 64, samples: int = 1
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """Momentum `(*S, N)` predicted from two images `(*S)` on one grid.

    Returns:
        ``(mean, std)``; `std` `(*S, N)` only with ``samples > 1`` (dropout active), else None.
    """
    shape = moving.shape
    ndims = len(shape)
    starts = patches.patch_starts(shape, patch, stride)
    starts = starts[patches.foreground(moving, fixed, starts, patch)]
    if len(starts) == 0:
        zero = np.zeros((*shape, ndims), np.float32)
        return zero, (zero.copy() if samples > 1 else None)
    mov = patches.extract(moving.astype(np.float32), starts, patch)[..., None]
    fix = patches.extract(fixed.astype(np.float32), starts, patch)[..., None]
    fields = []
    for _ in range(max(1, int(samples))):
        out = [np.asarray(network({"moving": mov[i:i + batch_size],
                                   "fixed": fix[i:i + batch_size]},
                                  training=samples > 1)["momentum"])
               for i in range(0, len(starts), batch_size)]
        fields.append(patches.reassemble(np.concatenate(out), starts, shape, patch))
    stack = np.stack(fields)
    return stack.mean(0), (stack.std(0) if samples > 1 else None)


@dataclass
class Prediction:
    """Outcome of `register_arrays` (NumPy, no batch axis).

    Attributes:
        momentum: `(*S, N)` final initial momentum.
        disp: `(*S, N)` pull displacement on the fixed grid (voxels).
        forward: `(*S, N)` forward map displacement (moving grid).
        momentum_std: `(*S, N)` Monte-Carlo standard deviation of the predicted momentum, or None.
    """

    momentum: np.ndarray
    disp: np.ndarray
    forward: np.ndarray
    momentum_std: np.ndarray | None = None


def register_arrays(moving: np.ndarray, fixed: np.ndarray, prediction, correction=None, *,
                    spacing: Sequence[float] | None = None, lddmm_config=None,
                    inverse_iterations: int = 20, samples: int = 1, patch: int = 15,
                    stride: int = 14) -> Prediction:
    """Predict (and correct) the momentum of a normalised pair, then shoot it."""
    from tfreg.ops import lddmm
    from tfreg.ops.sampling import warp

    cfg = lddmm_config or lddmm.LddmmConfig()
    m_pred, m_std = predict_momentum(prediction, moving, fixed, patch=patch, stride=stride,
                                     samples=samples)
    fwd, inv = lddmm.shoot_arrays(m_pred[None], spacing, cfg, inverse_iterations)
    momentum = m_pred
    if correction is not None:
        back = warp(fixed[None, ..., None].astype(np.float32), fwd).numpy()[0, ..., 0]
        m_corr, _ = predict_momentum(correction, moving, back, patch=patch, stride=stride)
        momentum = m_pred + m_corr
        fwd, inv = lddmm.shoot_arrays(momentum[None], spacing, cfg, inverse_iterations)
    return Prediction(momentum, inv[0], fwd[0], m_std)
