"""Validation Dice during training: the first ``train.val_pairs`` pairs of the data spec's ``val``
split, scored at every checkpoint (chief only) and logged to TensorBoard as ``val/dice``.

Runs only with tfreg's own data pipeline, a spec with label maps and a non-empty ``val`` split;
otherwise `ValDice.create` returns None and training is unchanged.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

__all__ = ["ValDice"]


class ValDice:
    """Mean Dice (labels of the fixed map, background excluded) of the moving labels warped
    (nearest) by the model's displacement, averaged over a fixed set of validation pairs."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self.batches = batches

    @classmethod
    def create(cls, method: Any, spec: Any, count: int) -> "ValDice | None":
        """Load the validation pairs once; None when validation does not apply."""
        if count <= 0 or method.data_pipeline is not None or not getattr(spec, "has_labels", False):
            return None
        try:
            if not spec.pair_indices("val"):
                return None
        except Exception:  # noqa: BLE001 - specs without splits simply have no validation
            return None
        from tfreg.data import make_dataset

        dataset = make_dataset(spec, split="val", batch_size=1, shuffle=False, repeat=False)
        batches = [{k: v.numpy() for k, v in batch.items()} for batch in dataset.take(count)]
        return cls(batches) if batches else None

    def __call__(self, model: keras.Model) -> float:
        """Mean Dice over the pairs (NaN labels ignored)."""
        from tfreg.layers import warp
        from tfreg.metrics import dice, mean_dice

        scores = []
        for batch in self.batches:
            outputs = model({"fixed": batch["fixed"], "moving": batch["moving"]}, training=False)
            disp = tf.cast(outputs["disp"], tf.float32)
            warped = warp(batch["moving_labels"], disp, interp="nearest").numpy()
            scores.append(mean_dice(dice(batch["fixed_labels"][0, ..., 0], warped[0, ..., 0])))
        return float(np.nanmean(scores)) if scores else float("nan")
