"""VoxelMorph training losses: image similarity + lambda * Grad, optional label Dice.

Terms returned by the loss function (already weighted; the engine minimises their sum):

- ``"sim"``: ``NCC(win=ncc_window)``, ``MSE(sigma=image_sigma)``, ``MIND()`` or ``NMI()`` between the
  fixed image and the warped moving image; absent with ``loss.image: none`` (training from label
  maps, `tfreg.data.synth`, where the images have independent random contrasts). With ``model.bidir`` it is ``0.5 * sim(fixed, warped) +
  0.5 * sim(moving, warped_fixed)`` (voxelmorph's 0.5/0.5 loss weights).
- ``"smooth"``: ``lambda * Grad(grad_penalty, loss_mult=int_resolution)`` on ``preint_flow`` (the
  SVF at integration resolution), as voxelmorph's training script. ``lambda: null`` means 1 for
  NCC and 0.01 for MSE (voxelmorph's README).
- ``"kl"`` instead of ``"smooth"`` with ``model.probabilistic``: ``lambda * KL(prior_lambda)`` on
  ``flow_params`` (mean and log variance of the velocity, Dalca et al. 2018/2019); ``lambda:
  null`` means 1 (the 2018 training script's loss weights 1 and 1; bidir 0.5, 0.5 and 1). The
  image term is then the reconstruction ``MSE / image_sigma^2`` (2018: ``image_sigma`` 0.01,
  ``prior_lambda`` 25).
- ``"dice"`` (only when ``dice_weight > 0`` and the batch has label maps):
  ``dice_weight * Dice(one_hot(fixed_labels), warp(one_hot(moving_labels), disp))``, soft Dice of
  the linearly warped one-hot moving labels (voxelmorph's semi-supervised training;
  `tfreg.losses.LabelLoss`), or ``"label_mse"`` with ``loss.label_loss: mse`` (mean squared
  difference of the one-hot maps), over
  ``loss.labels`` (background excluded unless listed; null: the non-zero values found in the
  data spec's label maps, see `labels_from_data`). The Dice loss is negative: -1 is perfect
  overlap.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from tfreg.errors import ConfigError
from tfreg.layers import warp
from tfreg.losses import KL, MIND, MSE, NCC, NMI, Dice, Grad, LabelLoss, one_hot

#: ``loss.image`` values.
IMAGE_LOSSES = ("ncc", "mse", "mind", "nmi", "none")
#: Default Grad weight per image loss (voxelmorph README for ncc and mse).
DEFAULT_LAMBDA = {"ncc": 1.0, "mse": 0.01, "mind": 1.0, "nmi": 1.0, "none": 1.0}
#: ``loss.label_loss`` values: the overlap term on warped one-hot labels (`tfreg.losses.LabelLoss`).
LABEL_LOSSES = ("dice", "mse")

LossFn = Callable[[Mapping[str, tf.Tensor], Mapping[str, tf.Tensor], Any], dict]


def _number(loss: Mapping[str, Any], key: str, *, positive: bool = False) -> float:
    value = loss.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
            positive and value == 0):
        need = "a number > 0" if positive else "a number >= 0"
        raise ConfigError(f"loss.{key}: expected {need}, got {value!r}")
    return float(value)


def grad_weight(loss: Mapping[str, Any], probabilistic: bool = False) -> float:
    """The smoothness weight (voxelmorph's lambda): ``loss.smooth_weight``, or when it is null
    the voxelmorph default for the image loss (Grad), or 1 for the KL term of the probabilistic
    model."""
    image = loss.get("image", "mse")
    if loss.get("smooth_weight") is None:
        return 1.0 if probabilistic else DEFAULT_LAMBDA[image]
    return _number(loss, "smooth_weight")


def label_values(loss: Mapping[str, Any]) -> list[int] | None:
    """``loss.labels`` checked: a list of distinct integer label values, or None."""
    values = loss.get("labels")
    if values is None:
        return None
    if not isinstance(values, (list, tuple)) or not values or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"loss.labels: expected null or a non-empty list of integers, got {values!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"loss.labels: has duplicates: {list(values)}")
    return [int(v) for v in values]


def labels_from_data(config: Mapping[str, Any], max_pairs: int = 3) -> list[int]:
    """Label values for ``loss.labels: null``: the non-zero values found in the label maps of the
    first `max_pairs` training pairs of the config's data spec.

    Raises:
        ConfigError: the config names no data spec, or the spec has no label maps.
    """
    data = config.get("data")
    if not data:
        raise ConfigError("loss.labels: null takes the label values from the data, but no data "
                          "spec is given; set loss.labels, e.g. [1, 2, 3]")
    from tfreg.data import LabelMapSource, open_data
    from tfreg.io import load_volume

    spec = open_data(data)
    if isinstance(spec, LabelMapSource):  # pairs synthesised from label maps: all their labels
        return sorted(int(v) for v in spec.values if v != 0)
    if not spec.has_labels:
        raise ConfigError(f"loss.dice_weight: > 0 needs label maps, but {data} has none "
                          "(set loss.dice_weight: 0)")
    paths: dict[str, None] = {}
    for pair in spec.pairs("train")[:max_pairs]:
        paths.update(dict.fromkeys(p for p in (pair.fixed_labels, pair.moving_labels) if p))
    values: set[int] = set()
    for path in paths:
        values.update(int(v) for v in np.unique(load_volume(path, label=True).data))
    values.discard(0)
    if not values:
        raise ConfigError(f"loss.labels: the label maps of {data} hold only background (0)")
    return sorted(values)


def build(config: Mapping[str, Any]) -> LossFn:
    """Build the loss function of a resolved config.

    Args:
        config: resolved config; reads ``loss:`` and
            ``model.{bidir, int_resolution, probabilistic}``.

    Returns:
        ``loss_fn(batch, outputs, ctx) -> {"sim", "smooth"[, "dice"]}`` of scalar float32
        tensors. ``batch`` holds ``"fixed"``, ``"moving"`` `(B, *S, 1)` and optionally
        ``"fixed_labels"``, ``"moving_labels"`` `(B, *S, 1)` int32; ``outputs`` are the model's
        (``"warped"``, ``"disp"``, ``"preint_flow"``, with bidir ``"warped_fixed"``, with
        probabilistic ``"flow_params"``).

    Raises:
        ConfigError: a ``loss.<key>`` has an invalid value (one line naming it).
    """
    loss = config.get("loss") or {}
    model = config.get("model") or {}
    image = loss.get("image", "mse")
    if image not in IMAGE_LOSSES:
        raise ConfigError(f"loss.image: expected one of {', '.join(IMAGE_LOSSES)}, got {image!r}")
    if image == "ncc":
        window = loss.get("ncc_window", 9)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ConfigError(f"loss.ncc_window: expected an odd integer >= 1, got {window!r}")
        similarity = NCC(win=window)
    elif image == "mse":
        similarity = MSE(sigma=_number(loss, "image_sigma", positive=True))
    else:  # mind / nmi compare images of different contrasts; none: labels only
        similarity = {"mind": MIND(), "nmi": NMI(), "none": None}[image]
    label_kind = loss.get("label_loss", "dice")
    if label_kind not in LABEL_LOSSES:
        raise ConfigError(f"loss.label_loss: expected one of {', '.join(LABEL_LOSSES)}, "
                          f"got {label_kind!r}")
    probabilistic = bool(model.get("probabilistic", False))
    lam = grad_weight(loss, probabilistic)
    kl = KL(_number(loss, "prior_lambda", positive=True)) if probabilistic else None
    penalty = loss.get("grad_penalty", "l2")
    if penalty not in ("l1", "l2"):
        raise ConfigError(f"loss.grad_penalty: expected l1 or l2, got {penalty!r}")
    # voxelmorph's train.py: Grad(..., loss_mult=int_downsize) on the pre-integrated field
    loss_mult = float(model.get("int_resolution", 2))
    grad = Grad(penalty=penalty, loss_mult=loss_mult)
    bidir = bool(model.get("bidir", False))
    dice_weight = _number(loss, "dice_weight")
    values = label_values(loss)
    if dice_weight > 0 and values is None:
        values = labels_from_data(config)
    overlap = LabelLoss(values, label_kind) if dice_weight > 0 else None
    if image == "none" and overlap is None:
        raise ConfigError("loss.image: none needs a label term (set loss.dice_weight > 0 and "
                          "train on data with label maps)")

    def loss_fn(batch: Mapping[str, tf.Tensor], outputs: Mapping[str, tf.Tensor],
                ctx: Any = None) -> dict[str, tf.Tensor]:
        fixed, moving = batch["fixed"], batch["moving"]
        terms = {}
        if similarity is not None and bidir:
            terms["sim"] = 0.5 * similarity(fixed, outputs["warped"]) + \
                0.5 * similarity(moving, outputs["warped_fixed"])
        elif similarity is not None:
            terms["sim"] = similarity(fixed, outputs["warped"])
        if kl is not None:
            terms["kl"] = lam * kl(None, outputs["flow_params"])
        else:
            terms["smooth"] = lam * grad(None, outputs["preint_flow"])
        if overlap is not None and "fixed_labels" in batch and "moving_labels" in batch:
            warped = overlap.warped_one_hot(batch["moving_labels"], outputs["disp"])
            terms["dice" if label_kind == "dice" else "label_mse"] = \
                dice_weight * overlap(batch["fixed_labels"], warped)
        return terms

    return loss_fn


def label_dice(fixed_labels: tf.Tensor, moving_labels: tf.Tensor, disp: tf.Tensor,
               values: Sequence[int], dice: Dice | None = None) -> tf.Tensor:
    """Negated soft Dice of the moving label maps warped by ``disp``.

    Args:
        fixed_labels, moving_labels: `(B, *S, 1)` integer label maps.
        disp: `(B, *S, N)` displacement, voxels, pull.
        values: label values scored, one one-hot channel each.
        dice: the Dice loss (default ``tfreg.losses.Dice()``).

    Returns:
        Scalar float32 in ``[-1, 0]``.
    """
    dice = dice or Dice()
    target = one_hot(fixed_labels, values)
    source = warp(one_hot(moving_labels, values), disp, "linear")
    return dice(target, source)
