"""LapIRN network (Mok & Chung, MICCAI 2020): three coarse-to-fine CRN levels in one Keras model.

Geometry and units
------------------
The input shape ``S`` (2D or 3D) gives three level grids: ``S/4`` (level 1), ``S/2`` (level 2) and
``S`` (level 3). Images are brought to a coarser grid by LapIRN's average pooling (kernel 3,
stride 2, one voxel of padding that is not counted, `tfreg.losses.avg_pool_half`), whose window is
centred at fine voxel ``2i``; so voxel ``i`` of a coarse grid sits at voxel ``2i`` of the next finer
grid. Fields go up a level with linear interpolation on that same geometry
(`tfreg.layers.RescaleTransform(2, align="origin")`), which doubles their values.

Every field the model outputs is a tfreg displacement or velocity: channel ``d`` along array axis
``d``, pull (``warped(x) = moving(x + u(x))``), in **voxels of its own level's grid**.

Inside each CRN the original works in normalised coordinates (``[-1, 1]`` across the volume,
``align_corners=True``), where a displacement ``w`` equals ``w * (n_d - 1) / 2`` voxels along an
axis of ``n_d`` voxels. The model keeps that scale at the CRN's boundary so the network sees and
produces the magnitudes the original does:

* the previous level's field enters as ``u_voxels * 2 / (n_d - 1)``;
* the output is ``softsign(h) * range_flow`` normalised, i.e. bounded by
  ``range_flow * (n_d - 1) / 2`` voxels per axis (``range_flow = 0.4``: 7.8 voxels along a
  40-voxel level-1 axis, 31.8 voxels along a 160-voxel full-resolution axis).

With ``units: voxels`` (the original's ``*_unorm`` models, its Learn2Reg OASIS displacement
script) the CRN works in voxels of the level's grid instead: the output is
``softsign(h) * range_flow`` voxels along every axis (``range_flow = 60``) and the previous
level's field enters in voxels, unscaled.

Variants
--------
* ``diffeomorphic``: level ``l`` predicts a velocity increment; ``v_l = dv_l + up(v_{l-1})`` and
  ``disp_l = exp(v_l)`` by scaling and squaring (``int_steps = 7``).
* ``displacement``: ``disp_l = up(disp_{l-1}) + d_l``, no integration.

Levels 2 and 3 see ``concat(moving_l warped by up(disp_{l-1}), fixed_l, up(field_{l-1}))`` where
the field is the velocity (diffeomorphic) or the displacement (displacement variant), and add the
previous level's feature embedding after their stride-2 convolution.

Every layer is named ``lapirn_l{level}_...`` so that training stages can freeze a level by prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tfreg.errors import ConfigError, InputError
from tfreg.layers import LeakyReLU, RescaleTransform, SpatialTransformer, conv_layer
from tfreg.ops.fields import integrate_svf
from tfreg.ops.filters import pool_half

__all__ = [
    "VARIANTS",
    "UNITS",
    "LEVELS",
    "DIVISOR",
    "ModelOptions",
    "model_options",
    "level_shape",
    "level_outputs",
    "build_model",
    "HalfPool",
    "ChannelScale",
    "RecomputedVecInt",
    "count_parameters",
]

#: The two transformation models of the original code.
VARIANTS = ("diffeomorphic", "displacement")
#: Units of ``range_flow`` and of the field fed to the next level's CRN.
UNITS = ("normalised", "voxels")
#: Number of pyramid levels (1/4, 1/2, full resolution).
LEVELS = 3
#: Two pooling halvings to reach level 1, then the stride-2 convolution inside each CRN.
DIVISOR = 8

_PACKAGE = "tfreg_lapirn"


# --------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class ModelOptions:
    """Validated ``model:`` section.

    Attributes:
        variant: ``"diffeomorphic"`` or ``"displacement"``.
        features: feature channels of every CRN convolution (original: ``4 * start_channel = 28``).
        res_blocks: pre-activation residual blocks per CRN (original: 5).
        range_flow: softsign bound of the CRN output, in `units` (original: 0.4 normalised;
            60 voxels in its Learn2Reg displacement script).
        int_steps: scaling-and-squaring steps of the diffeomorphic variant (original: 7).
        units: ``"normalised"`` (``[-1, 1]`` across the volume, the paper's code) or ``"voxels"``
            (of the level's grid, the original's ``unorm`` models).
    """

    variant: str = "diffeomorphic"
    features: int = 28
    res_blocks: int = 5
    range_flow: float = 0.4
    int_steps: int = 7
    units: str = "normalised"


def _positive_int(section: dict, key: str, minimum: int) -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def model_options(config: dict) -> ModelOptions:
    """Read and check the ``model:`` section of a resolved config.

    Raises:
        ConfigError: ``"model.<key>: <problem>"``.
    """
    section = dict(config.get("model") or {})
    defaults = ModelOptions()
    for key in ("variant", "features", "res_blocks", "range_flow", "int_steps", "units"):
        section.setdefault(key, getattr(defaults, key))
    variant = section["variant"]
    if variant not in VARIANTS:
        raise ConfigError(f"model.variant: expected one of {', '.join(VARIANTS)}, "
                          f"got {variant!r}")
    range_flow = section["range_flow"]
    if isinstance(range_flow, bool) or not isinstance(range_flow, (int, float)) or range_flow <= 0:
        raise ConfigError(f"model.range_flow: expected a number > 0, got {range_flow!r}")
    if section["units"] not in UNITS:
        raise ConfigError(f"model.units: expected one of {', '.join(UNITS)}, "
                          f"got {section['units']!r}")
    return ModelOptions(
        units=section["units"],
        variant=variant,
        features=_positive_int(section, "features", 1),
        res_blocks=_positive_int(section, "res_blocks", 0),
        range_flow=float(range_flow),
        int_steps=_positive_int(section, "int_steps", 0),
    )


def level_shape(inshape: tuple[int, ...], level: int) -> tuple[int, ...]:
    """Spatial shape of the grid of `level` (1, 2 or 3) for a full-resolution `inshape`."""
    factor = 2 ** (LEVELS - level)
    return tuple(int(n) // factor for n in inshape)


def level_outputs(level: int, variant: str) -> tuple[str, ...]:
    """Model outputs of `level` that its training stage needs.

    ``warped_l{l}`` `(B, *S_l, 1)`, ``disp_l{l}`` `(B, *S_l, N)` and, for the diffeomorphic
    variant, ``velocity_l{l}`` `(B, *S_l, N)`; level 3 adds the final ``warped`` and ``disp``.
    """
    names = [f"warped_l{level}", f"disp_l{level}"]
    if variant == "diffeomorphic":
        names.append(f"velocity_l{level}")
    if level == LEVELS:
        names += ["warped", "disp"]
    return tuple(names)


# --------------------------------------------------------------------------------------- layers
@keras.saving.register_keras_serializable(package=_PACKAGE)
class HalfPool(keras.layers.Layer):
    """LapIRN's image downsampling: average pooling, kernel 3, stride 2, padding not counted.

    Output voxel ``q`` averages input voxels ``2q-1, 2q, 2q+1`` inside the volume, per axis
    (PyTorch ``avg_pool3d(3, 2, padding=1, count_include_pad=False)``).

    Input shape:
        `(batch, *spatial, channels)`, 2 or 3 spatial axes.
    Output shape:
        `(batch, *ceil(spatial / 2), channels)`.

    Example:
    >>> HalfPool()(np.zeros((1, 8, 8, 8, 1), "float32")).shape
    (1, 4, 4, 4, 1)
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")  # images stay float32 under mixed precision
        super().__init__(**kwargs)

    def build(self, input_shape):
        if len(input_shape) not in (4, 5):
            raise ValueError("HalfPool expects (batch, *spatial, channels) with 2 or 3 spatial "
                             f"axes. Received: input_shape={tuple(input_shape)}")

    def call(self, x):
        return pool_half(x)

    def compute_output_shape(self, input_shape):
        spatial = [None if n is None else (int(n) + 1) // 2 for n in input_shape[1:-1]]
        return (input_shape[0], *spatial, input_shape[-1])


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ChannelScale(keras.layers.Layer):
    """Multiply channel ``c`` by the constant ``scales[c]`` (unit conversion of a field).

    Args:
        scales: one float per channel.

    Input shape:
        `(batch, *spatial, len(scales))`.
    Output shape:
        Same.

    Example:
    >>> ChannelScale([1.0, 2.0])(np.ones((1, 4, 4, 2), "float32"))[0, 0, 0].numpy().tolist()
    [1.0, 2.0]
    """

    def __init__(self, scales, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        scales = [float(s) for s in scales]
        if not scales:
            raise ValueError(f"`scales` must not be empty. Received: scales={scales}")
        self.scales = scales

    def build(self, input_shape):
        if input_shape[-1] != len(self.scales):
            raise ValueError(f"Expected {len(self.scales)} channels. "
                             f"Received: input_shape={tuple(input_shape)}")

    def call(self, x):
        return tf.cast(x, "float32") * tf.constant(self.scales, "float32")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "scales": list(self.scales)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RecomputedVecInt(keras.layers.Layer):
    """Scaling and squaring (as `tfreg.layers.VecInt`) that recomputes each squaring in backprop.

    ``u = v / 2**steps``, then ``steps`` times ``u = u + warp(u, u)``
    (`tfreg.ops.fields.integrate_svf(recompute=True)`). Each squaring runs under
    `tf.recompute_grad`, so training keeps only the `steps` intermediate fields instead of every
    interpolation intermediate of every squaring: at 160x192x144 this saves about 6 GB per
    full-resolution integration on a training step, for one extra warp per squaring. Values and
    gradients are those of `tfreg.layers.integrate_svf`.

    Args:
        steps: int >= 0. Defaults to 7.

    Input shape:
        `(batch, *spatial, ndims)` velocity in voxels, channel ``d`` along array axis ``d``.
    Output shape:
        Same: displacement in voxels, pull convention.
    """

    def __init__(self, steps=7, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"`steps` must be an int >= 0. Received: steps={steps!r}")
        self.steps = steps

    def build(self, input_shape):
        ndims = len(input_shape) - 2
        if ndims not in (2, 3) or input_shape[-1] != ndims:
            raise ValueError("Expected a field (batch, *spatial, ndims) with ndims 2 or 3. "
                             f"Received: input_shape={tuple(input_shape)}")

    def call(self, velocity):
        return integrate_svf(tf.cast(velocity, "float32"), self.steps, recompute=True)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "steps": self.steps}


# --------------------------------------------------------------------------------------- model
def _initializer() -> keras.initializers.Initializer:
    # PyTorch's default convolution init (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in",
                                              distribution="uniform")


def _crn(x, prev_embedding, level: int, bound: list[float], opts: ModelOptions):
    """One CRN level: encoder, residual bottleneck at half the level's resolution, decoder, head.

    Args:
        x: `(B, *S_l, C_in)` input features.
        prev_embedding: `(B, *S_l/2, features)` embedding of the previous level or None.
        level: 1, 2 or 3 (layer-name prefix).
        bound: per-axis output bound in voxels of the level's grid.

    Returns:
        ``(field, embedding)``: `(B, *S_l, N)` field increment in voxels (bounded by `bound`) and
        the `(B, *S_l, features)` embedding handed to the next level.
    """
    ndims = len(x.shape) - 2
    conv_cls = conv_layer(ndims)
    convt_cls = keras.layers.Conv3DTranspose if ndims == 3 else keras.layers.Conv2DTranspose
    prefix = f"lapirn_l{level}_"
    feats = opts.features

    def conv(filters: int, name: str, strides: int = 1, **kwargs):
        return conv_cls(filters, 3, strides=strides, padding="same", use_bias=False,
                        kernel_initializer=_initializer(), name=prefix + name, **kwargs)

    def lrelu(name: str):
        return LeakyReLU(negative_slope=0.2, name=prefix + name)

    fea = conv(feats, "enc_conv1")(x)
    fea = lrelu("enc_act1")(fea)
    fea = conv(feats, "enc_conv2")(fea)
    hid = conv(feats, "down_conv", strides=2)(fea)
    if prev_embedding is not None:
        hid = keras.layers.Add(name=prefix + "add_prev_embedding")([hid, prev_embedding])
    for b in range(opts.res_blocks):
        # pre-activation residual block: x + conv(lrelu(conv(lrelu(x)))), then LeakyReLU
        res = lrelu(f"res{b}_act1")(hid)
        res = conv(feats, f"res{b}_conv1")(res)
        res = lrelu(f"res{b}_act2")(res)
        res = conv(feats, f"res{b}_conv2")(res)
        hid = keras.layers.Add(name=prefix + f"res{b}_add")([hid, res])
        hid = lrelu(f"res{b}_out")(hid)
    embedding = convt_cls(feats, 2, strides=2, use_bias=False, kernel_initializer=_initializer(),
                          name=prefix + "up_convt")(hid)
    head = keras.layers.Concatenate(name=prefix + "skip_concat")([embedding, fea])
    head = conv(feats, "head_conv1")(head)
    head = lrelu("head_act1")(head)
    head = conv(ndims, "head_conv2", dtype="float32")(head)  # the field head: float32
    head = keras.layers.Activation("softsign", dtype="float32", name=prefix + "softsign")(head)
    field = ChannelScale(bound, name=prefix + "to_voxels")(head)
    return field, embedding


def _check_inshape(inshape) -> tuple[int, ...]:
    shape = tuple(int(n) for n in inshape)
    if len(shape) not in (2, 3):
        raise InputError(f"lapirn: input shape {shape}: expected 2 or 3 spatial axes")
    if any(n < DIVISOR or n % DIVISOR for n in shape):
        raise InputError(f"lapirn: input shape {shape}: every size must be a positive multiple "
                         f"of {DIVISOR} (two pooling halvings and a stride-2 convolution)")
    return shape


def build_model(config: dict, inshape: tuple[int, ...]) -> keras.Model:
    """Build the three-level LapIRN model.

    Args:
        config: resolved config; reads the ``model:`` section (see `ModelOptions`).
        inshape: full-resolution spatial shape ``S`` (2D or 3D), every size a multiple of 8.

    Returns:
        A functional `keras.Model` with inputs ``{"moving", "fixed"}`` `(B, *S, 1)` and outputs,
        for ``l = 1, 2, 3`` on grid ``S_l = S / 2**(3 - l)``:

        * ``warped_l{l}`` `(B, *S_l, 1)`: the moving image pooled to ``S_l``, warped by ``disp_l``;
        * ``disp_l{l}`` `(B, *S_l, N)`: displacement in voxels of ``S_l`` (pull);
        * ``velocity_l{l}`` `(B, *S_l, N)` (diffeomorphic only): velocity in voxels of ``S_l``;
        * ``warped`` `(B, *S, 1)` and ``disp`` `(B, *S, N)`: level 3's, the registration result.

    Raises:
        ConfigError: invalid ``model:`` values.
        InputError: `inshape` is not 2D/3D or not divisible by 8.
    """
    opts = model_options(config)
    shape = _check_inshape(inshape)
    ndims = len(shape)
    moving = keras.Input(shape=(*shape, 1), name="moving")
    fixed = keras.Input(shape=(*shape, 1), name="fixed")

    # image pyramids: index l holds the level-l image
    movings = {LEVELS: moving}
    fixeds = {LEVELS: fixed}
    for level in range(LEVELS - 1, 0, -1):
        movings[level] = HalfPool(name=f"lapirn_l{level}_pool_moving")(movings[level + 1])
        fixeds[level] = HalfPool(name=f"lapirn_l{level}_pool_fixed")(fixeds[level + 1])

    outputs: dict[str, Any] = {}
    prev_disp = prev_field = prev_embedding = None
    for level in range(1, LEVELS + 1):
        prefix = f"lapirn_l{level}_"
        n = level_shape(shape, level)
        if opts.units == "voxels":
            bound = [opts.range_flow] * len(n)
        else:
            bound = [opts.range_flow * (s - 1) / 2.0 for s in n]
        if level == 1:
            x = keras.layers.Concatenate(name=prefix + "input")([movings[1], fixeds[1]])
        else:
            up_disp = RescaleTransform(2.0, align="origin", name=prefix + "up_disp")(prev_disp)
            if opts.variant == "displacement":
                up_field = up_disp
            else:
                up_field = RescaleTransform(2.0, align="origin",
                                            name=prefix + "up_velocity")(prev_field)
            pre_warped = SpatialTransformer(name=prefix + "prewarp")([movings[level], up_disp])
            if opts.units == "voxels":
                field_in = up_field
            else:
                field_in = ChannelScale([2.0 / max(s - 1, 1) for s in n],
                                        name=prefix + "field_to_normalised")(up_field)
            x = keras.layers.Concatenate(name=prefix + "input")(
                [pre_warped, fixeds[level], field_in])
        increment, prev_embedding = _crn(x, prev_embedding, level, bound, opts)

        if opts.variant == "diffeomorphic":
            # the summed velocity is a field: float32 also under mixed precision
            velocity = increment if level == 1 else keras.layers.Add(
                name=prefix + "velocity", dtype="float32")([increment, up_field])
            disp = RecomputedVecInt(opts.int_steps, name=prefix + "integrate")(velocity)
            outputs[f"velocity_l{level}"] = velocity
            prev_field = velocity
        else:
            disp = increment if level == 1 else keras.layers.Add(
                name=prefix + "disp", dtype="float32")([increment, up_disp])
            prev_field = disp
        warped = SpatialTransformer(name=prefix + "warp")([movings[level], disp])
        outputs[f"disp_l{level}"] = disp
        outputs[f"warped_l{level}"] = warped
        prev_disp = disp

    outputs["warped"] = outputs[f"warped_l{LEVELS}"]
    outputs["disp"] = outputs[f"disp_l{LEVELS}"]
    return keras.Model(inputs={"moving": moving, "fixed": fixed}, outputs=outputs,
                       name=f"lapirn_{opts.variant}")


def count_parameters(model: keras.Model) -> dict[int, int]:
    """Trainable parameter count per level (layer-name prefix ``lapirn_l{l}_``)."""
    counts = {level: 0 for level in range(1, LEVELS + 1)}
    for layer in model.layers:
        for level in counts:
            if layer.name.startswith(f"lapirn_l{level}_"):
                counts[level] += int(sum(np.prod(w.shape) for w in layer.trainable_weights))
    return counts
