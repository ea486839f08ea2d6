"""Validation Dice during training, for tfreg's data spec source (`tfreg.data.SPEC_DATA`): the
first ``train.val_pairs`` pairs of the spec's ``val`` split, scored at every checkpoint (chief
only) and logged to TensorBoard as ``val/dice``.

Applies to specs with label maps and a non-empty ``val`` split; otherwise `ValDice.create` returns
None and training is unchanged. Methods with their own data source bring their own validator.
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

    def __init__(self, batches: list[dict[str, np.ndarray]], io: Any = None,
                 config: dict | None = None):
        self.batches = batches
        self.io = io
        self.config = config or {}

    @classmethod
    def create(cls, spec: Any, count: int, io: Any = None, config: dict | None = None
               ) -> "ValDice | None":
        """Load the validation pairs once; None when validation does not apply.

        Args:
            spec: a `tfreg.data.DataSpec`.
            count: number of pairs (``train.val_pairs``); 0 = off.
            io: the method's `tfreg.registry.ModelIO` (input and displacement names).
            config: the resolved config (for `ModelIO.inference_inputs`).
        """
        if count <= 0 or not getattr(spec, "has_labels", False):
            return None
        try:
            if not spec.pair_indices("val"):
                return None
        except Exception:  # noqa: BLE001 - specs without splits simply have no validation
            return None
        from tfreg.data.pipeline import make_dataset

        dataset = make_dataset(spec, split="val", batch_size=1, shuffle=False, repeat=False)
        batches = [{k: v.numpy() for k, v in batch.items()} for batch in dataset.take(count)]
        return cls(batches, io, config) if batches else None

    def __call__(self, model: keras.Model) -> dict[str, float]:
        """``{"dice": mean Dice over the pairs}`` (NaN labels ignored)."""
        from tfreg.layers import warp
        from tfreg.metrics import dice, mean_dice

        disp_name = self.io.disp if self.io is not None else "disp"
        scores = []
        for batch in self.batches:
            if self.io is not None:
                inputs = self.io.model_inputs(self.config, tf.constant(batch["fixed"]),
                                              tf.constant(batch["moving"]))
            else:
                inputs = {"fixed": batch["fixed"], "moving": batch["moving"]}
            outputs = model(inputs, training=False)
            disp = tf.cast(outputs[disp_name], tf.float32)
            warped = warp(batch["moving_labels"], disp, interp="nearest").numpy()
            scores.append(mean_dice(dice(batch["fixed_labels"][0, ..., 0], warped[0, ..., 0])))
        return {"dice": float(np.nanmean(scores)) if scores else float("nan")}
