"""AVSM training losses: the affine phases and the vSVF phases (selected by the stage name).

Batches: with ``loss.symmetric`` the data pipeline doubles every batch as ``[(s, t); (t, s)]``
(`symmetric_batch`), so sample ``i`` of the first half and sample ``i`` of the second half are
the two directions of one pair; the symmetry and inverse-consistency terms compare them. Image and
regularisation terms are means over the whole (doubled) batch.

Affine stages (outputs ``affine_theta_1``/``affine_warped_1``, or ``..._train`` in
``affine_multi``), ``theta = [A | b]`` in normalised coordinates:

* similarity: global NCC in ``affine_ncc``, the task similarity (``loss.similarity``) after;
* pull to the identity ``w(step) * mean_b ||theta - theta_id||^2`` with the original's decaying
  weight ``w = max(w0 * k / (k + exp((e - e0) / k)), w_min)``, ``k = 3``, ``e`` the step in
  "epochs" of ``loss.affine_reg_epoch`` steps; before the multi-step stage ``w0 =
  loss.affine_reg``, ``e0 = 10`` and ``e`` counts from the start of training; in ``affine_multi``
  ``w0 = loss.affine_reg / 100``, ``e0 = 1`` and ``e`` counts from the start of that stage;
* symmetry (``affine_sym``, ``affine_multi``): ``loss.affine_sym * mean_pairs(||A_st A_ts - I||_F^2
  + ||A_st b_ts + b_st||^2)``.

vSVF stages, summed over the vSVF steps the stage computes (``vsvf``: 1; ``vsvf_two``,
``vsvf_sym``: ``model.vsvf_steps``):

* similarity ``loss.similarity(fixed, vsvf_warped_k)`` (mk-LNCC by default);
* ``loss.reg_factor * mean_b sum max(v * m, 0) * prod(h)``: element-wise per channel and voxel,
  ``v = K * m`` in unit-interval coordinates, ``h_d = 1 / (s_d - 1)`` the momentum grid spacing;
* inverse consistency (``vsvf_sym``): ``loss.inverse_consistency * mean((phi_st o phi_ts - id)^2)``
  on the full-resolution maps in unit-interval coordinates of each axis.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfreg import losses as core_losses
from tfreg.errors import ConfigError
from tfreg.ops.inverse import composition_residual

from .affine import identity_params, split_params
from .model import model_options

__all__ = ["SIMILARITIES", "similarity", "affine_reg_weight", "affine_symmetry",
           "vsvf_regulariser", "inverse_consistency", "symmetric_batch", "build_loss"]

SIMILARITIES = ("mk_lncc", "global_ncc", "ncc", "mse")
#: Decay constant ``k`` of the original's sigmoid schedule of the affine regulariser.
DECAY_K = 3.0


def similarity(name: str):
    """The task similarity loss ``(fixed, warped) -> scalar`` (lower is better)."""
    if name == "mk_lncc":
        return core_losses.MKLNCC()
    if name == "global_ncc":
        return core_losses.GlobalNCC()
    if name == "ncc":
        return core_losses.NCC(win=9)
    if name == "mse":
        return core_losses.MSE()
    raise ConfigError(f"loss.similarity: expected one of {', '.join(SIMILARITIES)}, got {name!r}")


def affine_reg_weight(epoch, initial: float, static: float, minimum: float):
    """``max(initial * k / (k + exp((epoch - static) / k)), minimum)`` (tensor or float `epoch`)."""
    epoch = tf.cast(epoch, tf.float32)
    decay = DECAY_K / (DECAY_K + tf.exp(tf.minimum((epoch - static) / DECAY_K, 80.0)))
    return tf.maximum(initial * decay, minimum)


def _halves(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    n = tf.shape(x)[0] // 2
    return x[:n], x[n:2 * n]


def affine_symmetry(theta: tf.Tensor, ndims: int) -> tf.Tensor:
    """``mean_pairs(||A_st A_ts - I||_F^2 + ||A_st b_ts + b_st||^2)`` for a doubled batch."""
    st, ts = _halves(theta)
    a_st, b_st = split_params(st, ndims)
    a_ts, b_ts = split_params(ts, ndims)
    linear = tf.reduce_sum(tf.square(tf.matmul(a_st, a_ts) - tf.eye(ndims)), axis=[1, 2])
    shift = tf.reduce_sum(tf.square(tf.linalg.matvec(a_st, b_ts) + b_st), axis=1)
    return tf.reduce_mean(linear + shift)


def vsvf_regulariser(momentum: tf.Tensor, velocity: tf.Tensor) -> tf.Tensor:
    """``mean_b sum max(v * m, 0) * prod(h)``, ``h_d = 1 / (s_d - 1)`` of the momentum grid."""
    shape = momentum.shape[1:-1]
    cell = float(np.prod([1.0 / (s - 1) for s in shape]))
    axes = list(range(1, momentum.shape.rank))
    return tf.reduce_mean(tf.reduce_sum(tf.nn.relu(velocity * momentum), axis=axes)) * cell


def inverse_consistency(disp: tf.Tensor, recompute: bool = False) -> tf.Tensor:
    """``mean((phi_st o phi_ts - id)^2)`` in unit-interval coordinates for a doubled batch of
    full-resolution displacements (voxels).

    ``recompute=True``: the backward pass keeps only `disp` and recomputes the composition, with
    the lean interpolation gradient (same values and gradients, less memory).
    """
    scale = tf.constant([1.0 / (s - 1) for s in disp.shape[1:-1]], tf.float32)

    def error(field):
        st, ts = _halves(field)
        residual = composition_residual(st, ts, lean_gradient=recompute)  # phi_st o phi_ts - id
        return tf.reduce_mean(tf.square(residual * scale))

    return tf.recompute_grad(error)(disp) if recompute else error(disp)


def symmetric_batch(batch: dict) -> dict:
    """``[(s, t); (t, s)]``: moving and fixed (and their labels) swapped in a second half."""
    out = dict(batch)
    for a, b in (("moving", "fixed"), ("moving_labels", "fixed_labels")):
        if a in batch and b in batch:
            out[a] = tf.concat([batch[a], batch[b]], axis=0)
            out[b] = tf.concat([batch[b], batch[a]], axis=0)
    return out


def _number(section: dict, key: str) -> float:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"loss.{key}: expected a number >= 0, got {value!r}")
    return float(value)


def _context(ctx):
    """(stage, global step, step in stage) from a loss context (or a bare stage)."""
    stage = getattr(ctx, "stage", ctx)
    step = getattr(ctx, "step", None)
    stage_step = getattr(ctx, "stage_step", None)
    return stage, step, stage_step


def build_loss(config: dict):
    """``LossFn(batch, outputs, ctx)`` for the resolved config (both methods)."""
    section = config.get("loss") or {}
    task = similarity(section.get("similarity"))
    global_ncc = core_losses.GlobalNCC()
    reg0 = _number(section, "affine_reg")
    reg_min = _number(section, "affine_reg_min")
    epoch_steps = _number(section, "affine_reg_epoch")
    if epoch_steps <= 0:
        raise ConfigError("loss.affine_reg_epoch: expected a number > 0")
    sym = _number(section, "affine_sym")
    symmetric = section.get("symmetric")
    if not isinstance(symmetric, bool):
        raise ConfigError(f"loss.symmetric: expected true or false, got {symmetric!r}")
    # engines that pass no step counters (a bare Stage): count the loss calls of this process
    calls = tf.Variable(0, dtype=tf.int64, trainable=False, name="avsm_loss_calls")
    reg_factor = _number(section, "reg_factor") if "reg_factor" in section else 0.0
    ic = _number(section, "inverse_consistency") if "inverse_consistency" in section else 0.0
    recompute = model_options(config).recompute

    def affine_terms(batch, outputs, stage, step, stage_step) -> dict:
        multi = stage.name == "affine_multi"
        key = "train" if multi else "1"
        theta = outputs[f"affine_theta_{key}"]
        warped = outputs[f"affine_warped_{key}"]
        sim_fn = global_ncc if stage.name == "affine_ncc" else task
        ndims = warped.shape.rank - 2
        if multi:
            counter, w0, static = stage_step, reg0 / 100.0, 1.0
        else:
            counter, w0, static = step, reg0, 10.0
        counter = 0 if counter is None else counter
        weight = affine_reg_weight(tf.cast(counter, tf.float32) / epoch_steps, w0, static, reg_min)
        ident = tf.constant(identity_params(ndims))
        terms = {"similarity": sim_fn(batch["fixed"], warped),
                 "affine_reg": weight * tf.reduce_mean(tf.reduce_sum(tf.square(theta - ident), 1))}
        if symmetric and stage.name in ("affine_sym", "affine_multi") and sym > 0:
            terms["affine_symmetry"] = sym * affine_symmetry(theta, ndims)
        return terms

    def vsvf_terms(batch, outputs, stage) -> dict:
        terms: dict = {}
        for k in (1, 2):
            if f"vsvf_warped_{k}" not in outputs:
                continue
            terms[f"similarity_{k}"] = task(batch["fixed"], outputs[f"vsvf_warped_{k}"])
            terms[f"reg_{k}"] = reg_factor * vsvf_regulariser(outputs[f"vsvf_momentum_{k}"],
                                                             outputs[f"vsvf_velocity_{k}"])
            if symmetric and stage.name == "vsvf_sym" and ic > 0:
                terms[f"inverse_consistency_{k}"] = ic * inverse_consistency(
                    outputs[f"vsvf_disp_{k}"], recompute=recompute)
        return terms

    def loss(batch: dict, outputs: dict, ctx) -> dict:
        stage, step, stage_step = _context(ctx)
        if step is None:
            step = calls.assign_add(1) - 1
            stage_step = step
        if stage.name.startswith("affine"):
            return affine_terms(batch, outputs, stage, step, stage_step)
        if stage.name.startswith("vsvf"):
            return vsvf_terms(batch, outputs, stage)
        raise ConfigError(f"avsm: unknown stage '{stage.name}'")

    return loss

