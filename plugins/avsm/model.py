"""Keras models of the two methods: ``affine`` (multi-step affine network) and ``avsm`` (the same
affine network followed by one or two vSVF steps).

Outputs (dict; every affine output is computed by one chain of ``max(train, test)`` steps):

==========================  ==============================================================
``affine_theta_1``          normalised parameters after 1 step ``(B, N(N+1))``
``affine_warped_1``         moving warped by them (one interpolation from the original)
``affine_theta_train``      after ``model.affine_train_steps`` steps; ``affine_warped_train``
``affine_theta``            after ``model.affine_test_steps`` steps (inference)
``affine``                  the same as tfreg's centred voxel affine ``(B, N, N+1)``
``affine_warped``           moving warped by ``affine``
``vsvf_momentum_k``         (avsm) momentum of vSVF step ``k`` at 1/2 resolution
``vsvf_velocity_k``         ``K * m`` in unit-interval coordinates
``vsvf_disp_k``             full-resolution map of step ``k`` (voxels, pull); ``vsvf_warped_k``
``disp``, ``warped``        the method's result: the affine (affine) or the last vSVF step (avsm)
==========================  ==============================================================

In ``avsm`` the vSVF part sees the affine result through a stop-gradient: the affine network is
pre-trained, then frozen.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf

from tfreg.errors import ConfigError
from tfreg.layers import AffineToField, SpatialTransformer

from .affine import AffineStepNet, ComposeAffineParams, ParamsToAffine
from .vsvf import DIVISOR, MomentumNet, VSVFTransform

__all__ = ["ModelOptions", "model_options", "build_affine_model", "build_avsm_model"]


@dataclass(frozen=True)
class ModelOptions:
    """Checked ``model:`` section."""

    affine_train_steps: int
    affine_test_steps: int
    vsvf_steps: int
    integration_steps: int
    momentum_features: tuple[int, ...]
    sigmas: tuple[float, ...]
    sigma_weights: tuple[float, ...]
    recompute: bool = True


def _int(section: dict, key: str, low: int, high: int | None = None) -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        rng = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"model.{key}: expected an integer {rng}, got {value!r}")
    return value


def _numbers(section: dict, key: str, count: int | None = None) -> tuple:
    value = section.get(key)
    if (not isinstance(value, list) or not value or (count is not None and len(value) != count)
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in value)):
        size = f"{count} " if count else ""
        raise ConfigError(f"model.{key}: expected a list of {size}positive numbers, got {value!r}")
    return tuple(value)


def model_options(config: dict) -> ModelOptions:
    section = config.get("model") or {}
    recompute = section.get("recompute", True)
    if not isinstance(recompute, bool):
        raise ConfigError(f"model.recompute: expected true or false, got {recompute!r}")
    vsvf = "vsvf_steps" in section
    sigmas = _numbers(section, "sigmas") if vsvf else ()
    weights = _numbers(section, "sigma_weights", len(sigmas)) if vsvf else ()
    total = float(sum(weights)) or 1.0
    return ModelOptions(
        affine_train_steps=_int(section, "affine_train_steps", 1),
        affine_test_steps=_int(section, "affine_test_steps", 1),
        vsvf_steps=_int(section, "vsvf_steps", 1, 2) if vsvf else 0,
        integration_steps=_int(section, "integration_steps", 1) if vsvf else 0,
        momentum_features=tuple(int(v) for v in _numbers(section, "momentum_features", 5))
        if vsvf else (),
        sigmas=tuple(float(s) for s in sigmas),
        sigma_weights=tuple(float(w) / total for w in weights),
        recompute=recompute,
    )


@keras.saving.register_keras_serializable(package="tfreg_avsm")
class StopGradient(keras.layers.Layer):
    """Identity in the forward pass, no gradient backwards."""

    def call(self, x):
        return tf.stop_gradient(x)

    def compute_output_shape(self, input_shape):
        return input_shape


def _inputs(inshape):
    moving = keras.Input((*inshape, 1), name="moving")
    fixed = keras.Input((*inshape, 1), name="fixed")
    return moving, fixed


def _affine_chain(moving, fixed, inshape, opts: ModelOptions) -> dict:
    """Affine outputs (table in the module doc) of one multi-step chain."""
    ndims = len(inshape)
    net = AffineStepNet(ndims, recompute=opts.recompute)
    compose = ComposeAffineParams(ndims, name="avsm_affine_compose")
    to_affine = ParamsToAffine(inshape, name="avsm_affine_to_voxels")
    transformer = SpatialTransformer(name="avsm_affine_transformer")
    out: dict = {}
    theta, warped = None, moving
    for step in range(1, max(opts.affine_train_steps, opts.affine_test_steps) + 1):
        update = net(warped, fixed)
        theta = update if theta is None else compose([update, theta])
        affine = to_affine(theta)
        warped = transformer([moving, affine])      # always from the original moving image
        if step == 1:
            out["affine_theta_1"], out["affine_warped_1"] = theta, warped
        if step == opts.affine_train_steps:
            out["affine_theta_train"], out["affine_warped_train"] = theta, warped
        if step == opts.affine_test_steps:
            out["affine_theta"], out["affine"], out["affine_warped"] = theta, affine, warped
    return out


def build_affine_model(config: dict, inshape: tuple[int, ...]) -> keras.Model:
    """The ``affine`` method: dict inputs ``{"moving", "fixed"}``; outputs as the module doc,
    with ``disp``/``warped`` the test-step affine."""
    inshape = tuple(int(s) for s in inshape)
    opts = model_options(config)
    if min(inshape) < 4:
        raise ConfigError(f"affine: every spatial size must be >= 4, got {list(inshape)}")
    moving, fixed = _inputs(inshape)
    out = _affine_chain(moving, fixed, inshape, opts)
    out["disp"] = AffineToField(inshape, name="avsm_affine_field")(out["affine"])
    out["warped"] = keras.layers.Identity(name="warped")(out["affine_warped"])
    return keras.Model({"moving": moving, "fixed": fixed}, out, name="affine")


def build_avsm_model(config: dict, inshape: tuple[int, ...]) -> keras.Model:
    """The ``avsm`` method: the affine chain, then `model.vsvf_steps` vSVF steps on the
    (stop-gradient) affine map; ``disp``/``warped`` are the last step's."""
    inshape = tuple(int(s) for s in inshape)
    opts = model_options(config)
    if opts.vsvf_steps < 1:
        raise ConfigError("model.vsvf_steps: missing (the avsm method needs 1 or 2)")
    if any(s % DIVISOR for s in inshape):
        raise ConfigError(f"avsm: every spatial size must be a multiple of {DIVISOR}, "
                          f"got {list(inshape)}")
    ndims = len(inshape)
    low = tuple(s // 2 for s in inshape)
    moving, fixed = _inputs(inshape)
    out = _affine_chain(moving, fixed, inshape, opts)
    theta = StopGradient(name="avsm_affine_stop")(out["affine_theta"])
    initial = AffineToField(low, name="avsm_initial_map")(
        ParamsToAffine(low, name="avsm_affine_to_low")(theta))
    warped = StopGradient(name="avsm_affine_warped_stop")(out["affine_warped"])
    momentum_net = MomentumNet(ndims, opts.momentum_features)
    concat = keras.layers.Concatenate(name="avsm_momentum_input")
    transform = VSVFTransform(inshape, opts.sigmas, opts.sigma_weights, opts.integration_steps,
                              recompute=opts.recompute, name="avsm_vsvf")
    transformer = SpatialTransformer(lean_gradient=opts.recompute, name="avsm_vsvf_transformer")
    for k in range(1, opts.vsvf_steps + 1):
        momentum = momentum_net(concat([warped, fixed]))
        result = transform([momentum, initial])
        warped = transformer([moving, result["disp"]])   # from the original moving image
        out[f"vsvf_momentum_{k}"] = momentum
        out[f"vsvf_velocity_{k}"] = result["velocity"]
        out[f"vsvf_disp_{k}"] = result["disp"]
        out[f"vsvf_warped_{k}"] = warped
        initial = result["disp_low"]                     # step k+1 starts from this map
    last = opts.vsvf_steps
    out["disp"] = keras.layers.Identity(name="disp")(out[f"vsvf_disp_{last}"])
    out["warped"] = keras.layers.Identity(name="warped")(out[f"vsvf_warped_{last}"])
    return keras.Model({"moving": moving, "fixed": fixed}, out, name="avsm")
