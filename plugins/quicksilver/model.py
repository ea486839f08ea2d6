"""The Quicksilver model, loss, stages and ``tfreg register`` hook.

One Keras model serves training and registration. Inputs: ``moving``, ``fixed`` `(B, *S, 1)`
(whole images) and ``starts`` `(B, K, N)` int32 (patch corners drawn by the data source; at
registration a dummy, see `inference_inputs`). Outputs:

* ``patch_momentum`` `(B*K, *P, N)`: the prediction network on the patches (stage 1);
* ``patch_correction``, ``patch_predicted`` `(B*K, *P, N)`: the correction network on the
  patches of the moving image and of the fixed image warped back into moving space by the
  shot prediction, and the prediction at those patches (target ``m_opt - m_pred``; the
  reference path: the correction stage trains the same network on precomputed inputs, below);
* ``momentum`` `(B, *S, N)`: whole-image ``m_pred (+ m_corr)``; ``disp`` (the inverse map,
  tfreg's pull displacement), ``inverse_disp`` (the forward map), ``warped``: the final
  shooting of ``momentum``.

The correction stage trains `correction_training_model` (inputs ``moving``, ``fixed_back``,
``starts``; output ``patch_correction``) on data from `prepare_correction`: the trained
prediction network's whole-image momentum and its shooting are computed once per training pair
when the stage starts (the original's precomputation), not in every step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from tfreg.errors import ConfigError
from tfreg.layers import SpatialTransformer
from tfreg.registry import LossContext, RegisterReport, Stage
from tfreg.validation import choice, flag, integer, number, value

from . import patches
from .layers import GatherPatches, PatchNetworks, Shoot, displacement_spread

__all__ = ["Model", "Lddmm", "Targets", "Schedule", "check_settings", "build_model",
           "build_loss", "stages", "prepare_correction", "correction_training_model",
           "inference_inputs", "register_report"]


@dataclass(frozen=True)
class Model:
    features: int = integer(64, low=1)
    dropout: float = number(0.0, low=0.0, high=0.9)
    mc_samples: int = integer(50, low=1)
    correction: bool = flag(True)
    patch: int = choice(15, (7, 15, 31))
    stride: int = integer(14, low=1)
    patch_batch: int = integer(64, low=1)
    momentum_scale: float = number(1e-3, low=0.0, low_open=True)


@dataclass(frozen=True)
class Lddmm:
    alpha: float = number(0.01, low=0.0, low_open=True)
    beta: float = number(0.01, low=0.0)
    gamma: float = number(0.001, low=0.0, low_open=True)
    power: int = integer(1, low=1)
    sigma: float = number(0.2, low=0.0, low_open=True)
    steps: int = integer(10, low=1)
    iterations: int = integer(50, low=0)
    optimizer: str = choice("gd", ("gd", "adam"))
    step_size: float = number(4e-6, low=0.0, low_open=True)
    learning_rate: float = number(5e-4, low=0.0, low_open=True)
    inverse_iterations: int = integer(5, low=0)
    predict_inverse_iterations: int = integer(20, low=0)
    jit: bool = flag(True)


@dataclass(frozen=True)
class Targets:
    cache: str | None = value(None)


@dataclass(frozen=True)
class Schedule:
    prediction_steps: int = integer(1000, low=0)
    correction_steps: int = integer(1000, low=0)
    patches_per_pair: int = integer(32, low=1)
    train_stride: int = integer(14, low=1)


def check_settings(config: dict) -> None:
    """Settings that depend on each other (one-line `ConfigError`)."""
    model = config["model"]
    if model["dropout"] > 0 and model["correction"]:
        raise ConfigError("model.correction: the probabilistic variant (model.dropout > 0) has "
                          "no correction network, as the original; set model.correction=false")
    if model["stride"] > model["patch"]:
        raise ConfigError(f"model.stride: expected at most model.patch ({model['patch']}) so "
                          f"that patches cover the image, got {model['stride']}")


def build_model(config: dict, inshape: tuple[int, ...]) -> keras.Model:
    """The model of the module docstring for images of spatial shape `inshape`."""
    check_settings(config)
    m, s = config["model"], config["lddmm"]
    inshape = tuple(int(v) for v in inshape)
    ndims = len(inshape)
    if min(inshape) < m["patch"]:
        raise ConfigError(f"model.patch: {m['patch']} is larger than the image {list(inshape)}")
    moving = keras.Input((*inshape, 1), name="moving")
    fixed = keras.Input((*inshape, 1), name="fixed")
    starts = keras.Input((None, ndims), dtype="int32", name="starts")
    nets = PatchNetworks(inshape, m["features"], m["dropout"], m["correction"], m["patch"],
                         m["stride"], m["mc_samples"], m["patch_batch"], m["momentum_scale"],
                         name="networks")
    lddmm_args = dict(alpha=s["alpha"], beta=s["beta"], gamma=s["gamma"], power=s["power"],
                      steps=s["steps"], inverse_iterations=s["predict_inverse_iterations"])
    gather = GatherPatches(m["patch"], name="gather")
    moving_p, fixed_p = gather([moving, starts]), gather([fixed, starts])
    outputs = {"patch_momentum": nets([moving_p, fixed_p], network="prediction")}
    momentum = nets([moving, fixed], network="prediction", whole=True)
    if m["correction"]:
        forward, _ = Shoot(inshape, stop_gradient=True, name="shoot_prediction",
                           **lddmm_args)(momentum)
        back = SpatialTransformer(name="fixed_back")([fixed, forward])
        outputs["patch_correction"] = nets([moving_p, gather([back, starts])],
                                           network="correction")
        outputs["patch_predicted"] = GatherPatches(m["patch"], stop_gradient=True,
                                                   name="gather_prediction")([momentum, starts])
        correction = nets([moving, back], network="correction", whole=True)
        momentum = keras.layers.Add(name="momentum")([momentum, correction])
    forward, inverse = Shoot(inshape, name="shoot", **lddmm_args)(momentum)
    outputs.update(momentum=momentum, disp=inverse, inverse_disp=forward,
                   warped=SpatialTransformer(name="warped")([moving, inverse]))
    return keras.Model({"moving": moving, "fixed": fixed, "starts": starts}, outputs,
                       name="quicksilver")


def build_loss(config: dict):
    """L1 summed over every voxel, component and patch of the batch (the original's
    ``L1Loss(size_average=False)``): ``l1_prediction`` against the optimised momentum in stage
    1, ``l1_correction`` against ``m_opt - m_pred`` in stage 2 (the batch's precomputed
    ``residual``, or the target minus the model's ``patch_predicted``)."""
    patch = int(config["model"]["patch"])

    def cut(volume: tf.Tensor, starts: tf.Tensor) -> tf.Tensor:
        out = patches.gather(volume, starts, patch)
        return tf.reshape(out, [-1, *out.shape[2:]])

    def loss(batch: dict, outputs: dict, ctx: LossContext) -> dict:
        terms = {}
        if "patch_momentum" in outputs:
            target = cut(batch["momentum"], batch["starts"])
            terms["l1_prediction"] = tf.reduce_sum(tf.abs(outputs["patch_momentum"] - target))
        if "patch_correction" in outputs:
            if "residual" in batch:
                residual = cut(batch["residual"], batch["starts"])
            else:
                residual = cut(batch["momentum"], batch["starts"]) - outputs["patch_predicted"]
            terms["l1_correction"] = tf.reduce_sum(tf.abs(outputs["patch_correction"] - residual))
        return terms

    return loss


def prepare_correction(model: keras.Model, data, config: dict):
    """The correction stage's data (`Stage.prepare`): for every training pair, once, the
    trained prediction network's whole-image momentum ``m_pred``, its shooting, and the fixed
    image warped back into moving space. Returns `data` with ``residual = m_opt - m_pred``
    `(P, *S, N)` and ``fixed_back`` `(P, *S)` in place of the momenta."""
    networks = model.get_layer("networks")
    shoot = model.get_layer("shoot_prediction")
    warp = model.get_layer("fixed_back")

    @tf.function
    def predict(moving: tf.Tensor, fixed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        momentum = networks.whole_image(moving, fixed, "prediction")
        forward, _ = shoot(momentum)
        return momentum, warp([fixed, forward])

    residual = np.empty_like(data.momentum)
    fixed_back = np.empty_like(data.fixed)
    count = len(data.fixed)
    for i in range(count):
        momentum, back = predict(tf.constant(data.moving[i][None, ..., None]),
                                 tf.constant(data.fixed[i][None, ..., None]))
        residual[i] = data.momentum[i] - momentum.numpy()[0]
        fixed_back[i] = back.numpy()[0, ..., 0]
        print(f"correction inputs: {i + 1}/{count} pairs", flush=True)
    return dataclasses.replace(data, momentum=None, residual=residual, fixed_back=fixed_back)


def correction_training_model(model: keras.Model) -> keras.Model:
    """The correction stage's model (`Stage.training_model`), sharing `model`'s layers:
    ``{moving, fixed_back (B, *S, 1), starts (B, K, N)} -> {patch_correction (B*K, *P, N)}``,
    the correction network on the patches of the moving image and of the fixed image warped
    back by the prediction (`prepare_correction`)."""
    networks = model.get_layer("networks")
    gather = model.get_layer("gather")
    image_shape = tuple(model.input["moving"].shape[1:])             # (*S, 1)
    moving = keras.Input(image_shape, name="moving")
    back = keras.Input(image_shape, name="fixed_back")
    starts = keras.Input((None, len(image_shape) - 1), dtype="int32", name="starts")
    correction = networks([gather([moving, starts]), gather([back, starts])],
                          network="correction")
    return keras.Model({"moving": moving, "fixed_back": back, "starts": starts},
                       {"patch_correction": correction}, name="quicksilver_correction")


def stages(config: dict) -> list[Stage]:
    """``prediction`` (the prediction network on patches), then with ``model.correction`` the
    ``correction`` network on inputs computed once when it starts (`prepare_correction`,
    `correction_training_model`); each stage starts a fresh optimizer (tfreg's default)."""
    check_settings(config)
    schedule = config["schedule"]
    out = [Stage("prediction", int(schedule["prediction_steps"]), outputs=("patch_momentum",))]
    if config["model"]["correction"]:
        out.append(Stage("correction", int(schedule["correction_steps"]),
                         prepare=prepare_correction,
                         training_model=correction_training_model))
    return out


def inference_inputs(config: dict, fixed: tf.Tensor, moving: tf.Tensor) -> dict:
    """At registration the patch outputs are not used: ``starts`` is one patch at the origin."""
    ndims = len(fixed.shape) - 2
    starts = tf.zeros(tf.stack([tf.shape(fixed)[0], 1, ndims]), tf.int32)
    return {"moving": moving, "fixed": fixed, "starts": starts}


def register_report(keras_model: keras.Model, config: dict, inputs: dict, options: dict
                    ) -> RegisterReport | None:
    """The probabilistic variant's uncertainty: ``model.mc_samples`` Monte-Carlo samples of the
    predicted momentum, each shot; the per-voxel standard deviation of the displacement
    (``sqrt(sum_d Var[u_d])``, voxels of the model grid) becomes ``uncertainty.nii.gz``."""
    model = config["model"]
    if model["dropout"] <= 0:
        return None
    samples = int(model["mc_samples"])
    spread = displacement_spread(keras_model.get_layer("networks"),
                                 keras_model.get_layer("shoot"), inputs["moving"],
                                 inputs["fixed"], samples)[0]
    summary = {"samples": samples, "units": "voxels of the model grid",
               "statistic": "sqrt of the summed per-component variance of the displacement",
               "mean": float(f"{spread.mean():.4g}"), "max": float(f"{spread.max():.4g}")}
    line = (f"uncertainty ({samples} Monte-Carlo samples): displacement std mean "
            f"{summary['mean']:.3g}, max {summary['max']:.3g} voxels -> uncertainty.nii.gz")
    return RegisterReport(entries={"uncertainty": summary}, lines=(line,),
                          maps={"uncertainty": np.asarray(spread, np.float32)})
