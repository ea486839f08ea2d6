"""Recursive cascaded networks (Zhao et al., ICCV 2019) in Keras 3, 2D and 3D.

Graph of ``build(config, inshape)``::

    fixed, moving (B, *S, 1)
      [affine stem] "affine_stem"(fixed, moving) -> affine (B, N, N+1) = [I + W | b] (centred)
                    agg_0 = affine field,  warped_0 = warp(moving, agg_0)
      cascade k = 1..n:  f_k = net_k(fixed, warped_{k-1})          net_k = "cascade" (shared weights)
                                                                    or "cascade_{k-1}" (distinct)
                         agg_k = A f_k + agg_0          (k = 1 after the affine stem: exact)
                               = compose(agg_{k-1}, f_k) = f_k + agg_{k-1}(x + f_k)   (otherwise)
                         warped_k = warp(moving, agg_k)             (always from the original moving)
      outputs: "warped" = warped_n, "disp" = agg_n, "flow_k" = f_k, "disp_k" = agg_k, "warped_k",
               "affine" (with the stem)

Every field is a displacement in voxels of the fixed grid, channel ``d`` along array axis ``d``,
pull convention ``warped(x) = moving(x + disp(x))``. Affine matrices act on voxel coordinates
centred at ``c = (shape - 1) / 2``: a fixed-grid point ``x`` maps to ``A (x - c) + b + c``.

Each cascade's flow is multiplied by ``flow_multiplier`` (``1 / cascades`` by default). The factor
lives in a non-trainable weight of the cascade network ("flow_scale"), so it is saved with the
weights: a shared-weight model rebuilt with more recursions keeps the factor it was trained with,
as the original's shared-weight testing does. With ``shared_weights: true`` the weights and their
names do not depend on the number of cascades.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import keras
import tensorflow as tf

from tfreg.errors import ConfigError
from tfreg.layers import AffineToField, ComposeTransform, LeakyReLU, SpatialTransformer, conv_layer
from tfreg.ops.fields import affine_after_disp

#: ``model.base`` values.
BASES = ("vtn", "voxelmorph")
#: Spatial sizes must divide by this with the default config (5 VTN levels).
DIVISOR = 32
#: VTN scales its raw flow by this constant (the original's ``pred0 * 20``).
VTN_FLOW_GAIN = 20.0
#: LeakyReLU slope of every base network (the original's 0.1).
LEAKY = 0.1

_PACKAGE = "tfreg_cascade"


# ----------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Architecture:
    """Checked ``model:`` section.

    Attributes:
        base: ``"vtn"`` or ``"voxelmorph"``: the network of every deformable cascade.
        cascades: number n of deformable cascades applied (0 = affine stem only).
        shared_weights: one network applied n times (True) or n distinct networks (False).
        repeats: with distinct networks, each is applied this many times in a row
            (``[net_0] * R + [net_1] * R + ...``, the original's test-time recursion of an
            n-cascade model with ``n * R`` steps); 1 = as trained.
        affine_stem: put a VTN affine network before the cascades.
        flow_multiplier: factor on each cascade's flow (default ``1 / cascades``).
        vtn_channels: VTN width c; level l (1-based) has ``c * 2**(l-1)`` channels.
        vtn_levels: VTN stride-2 levels L (also the affine stem's).
        unet_enc_features, unet_dec_features: features of the VoxelMorph U-Net base.
        fill_value: None = nearest border outside the moving image; a number = constant.
    """

    base: str
    cascades: int
    shared_weights: bool
    affine_stem: bool
    flow_multiplier: float
    vtn_channels: int
    vtn_levels: int
    unet_enc_features: tuple[int, ...]
    unet_dec_features: tuple[int, ...]
    fill_value: float | None
    repeats: int = 1

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Architecture":
        """Read and check ``config["model"]`` (ConfigError naming the key)."""
        model = dict(config.get("model") or {})
        base = model.get("base", "vtn")
        if base not in BASES:
            raise ConfigError(f"model.base: expected one of {', '.join(BASES)}, got {base!r}")
        cascades = _int(model, "cascades", 3, minimum=0)
        stem = _bool(model, "affine_stem", True)
        if cascades == 0 and not stem:
            raise ConfigError("model.cascades: 0 cascades need model.affine_stem: true "
                              "(the model would not register anything)")
        multiplier = model.get("flow_multiplier")
        if multiplier is None:
            multiplier = 1.0 / max(cascades, 1)
        elif isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or multiplier <= 0:
            raise ConfigError(f"model.flow_multiplier: expected null or a number > 0, got {multiplier!r}")
        enc = _features(model, "unet_enc_features", (16, 32, 32, 32))
        dec = _features(model, "unet_dec_features", (32, 32, 32, 32, 32, 16, 16))
        if len(dec) < len(enc) + 1:
            raise ConfigError(f"model.unet_dec_features: needs at least {len(enc) + 1} values for "
                              f"{len(enc)} encoder levels, got {list(dec)}")
        fill = model.get("fill_value")
        if fill is not None and (isinstance(fill, bool) or not isinstance(fill, (int, float))):
            raise ConfigError(f"model.fill_value: expected null or a number, got {fill!r}")
        return cls(base=base, cascades=cascades, shared_weights=_bool(model, "shared_weights", False),
                   affine_stem=stem, flow_multiplier=float(multiplier),
                   vtn_channels=_int(model, "vtn_channels", 16, minimum=1),
                   vtn_levels=_int(model, "vtn_levels", 5, minimum=2),
                   unet_enc_features=enc, unet_dec_features=dec,
                   fill_value=None if fill is None else float(fill),
                   repeats=_int(model, "repeats", 1, minimum=1))

    @property
    def divisor(self) -> int:
        """Every spatial size must divide by this."""
        levels = []
        if self.affine_stem or self.base == "vtn":
            levels.append(self.vtn_levels)
        if self.base == "voxelmorph" and self.cascades > 0:
            levels.append(len(self.unet_enc_features))
        return 2 ** max(levels)


def _int(model: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = model.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _bool(model: Mapping[str, Any], key: str, default: bool) -> bool:
    value = model.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"model.{key}: expected true or false, got {value!r}")
    return value


def _features(model: Mapping[str, Any], key: str, default: Sequence[int]) -> tuple[int, ...]:
    value = model.get(key, list(default))
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ConfigError(f"model.{key}: expected a non-empty list of positive integers, got {value!r}")
    return tuple(value)


# ----------------------------------------------------------------------------------------- layers
@keras.saving.register_keras_serializable(package=_PACKAGE)
class FlowScale(keras.layers.Layer):
    """Multiply a field by a factor kept in a non-trainable weight (saved with the model weights).

    Args:
        scale: initial factor (> 0).

    Input shape:
        `(batch, *spatial, ndims)` field.
    Output shape:
        Same, float32.
    """

    def __init__(self, scale: float = 1.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not scale > 0:
            raise ValueError(f"`scale` must be > 0. Received: scale={scale!r}")
        self.scale = float(scale)

    def build(self, input_shape):
        self.factor = self.add_weight(name="factor", shape=(), trainable=False,
                                      initializer=keras.initializers.Constant(self.scale))

    def call(self, x):
        return keras.ops.cast(x, "float32") * self.factor

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AffineMatrix(keras.layers.Layer):
    """Assemble ``[I + W | b]`` from the affine head outputs.

    Input shape:
        ``[w, b]``: `(batch, N*N)` (row-major W) and `(batch, N)`.
    Output shape:
        `(batch, N, N+1)` float32 affine matrix (centred voxel coordinates, fixed → moving).
    """

    def __init__(self, ndims: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if ndims not in (2, 3):
            raise ValueError(f"`ndims` must be 2 or 3. Received: ndims={ndims!r}")
        self.ndims = ndims

    def call(self, inputs):
        w, b = (keras.ops.cast(t, "float32") for t in inputs)
        n = self.ndims
        matrix = keras.ops.reshape(w, (-1, n, n)) + keras.ops.eye(n, dtype="float32")
        return keras.ops.concatenate([matrix, keras.ops.reshape(b, (-1, n, 1))], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.ndims, self.ndims + 1)

    def get_config(self):
        return {**super().get_config(), "ndims": self.ndims}


def compose_after_affine(affine: tf.Tensor, flow: tf.Tensor) -> tf.Tensor:
    """Displacement of the affine transform followed by ``flow`` (exact, no resampling).

    With ``T(x) = A (x - c) + b + c`` and the image first warped by T, then by ``flow``:
    ``x -> T(x + flow(x)) = x + u_T(x) + A flow(x)``, so the result is ``u_T + A flow``
    (`tfreg.ops.fields.affine_after_disp`).

    Args:
        affine: `(B, N, N+1)` centred affine ``[A | b]``.
        flow: `(B, *S, N)` displacement in voxels.

    Returns:
        `(B, *S, N)` float32 displacement.
    """
    return affine_after_disp(tf.cast(affine, tf.float32), tf.cast(flow, tf.float32))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AffineCompose(keras.layers.Layer):
    """Layer form of :func:`compose_after_affine`: inputs ``[affine, flow]``."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, inputs):
        return compose_after_affine(*inputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[1])


# ------------------------------------------------------------------------------------ base networks
def _conv(ndims: int):
    return conv_layer(ndims)


def _deconv(ndims: int):
    return keras.layers.Conv3DTranspose if ndims == 3 else keras.layers.Conv2DTranspose


def _conv_act(x, features: int, strides: int, name: str, ndims: int):
    x = _conv(ndims)(features, 3, strides=strides, padding="same",
                     kernel_initializer="lecun_uniform", name=name)(x)
    return LeakyReLU(LEAKY, name=f"{name}_act")(x)


def _vtn_encoder(x, channels: int, levels: int, ndims: int) -> list:
    """VTN encoder: level l (1-based) is a stride-2 conv with ``channels * 2**(l-1)`` features,
    followed by a stride-1 conv from level 3 on. Returns the feature map of every level."""
    skips = []
    for level in range(1, levels + 1):
        feats = channels * 2 ** (level - 1)
        x = _conv_act(x, feats, 2, f"conv{level}", ndims)
        if level >= 3:
            x = _conv_act(x, feats, 1, f"conv{level}_1", ndims)
        skips.append(x)
    return skips


def vtn(inshape: Sequence[int], arch: Architecture, name: str) -> keras.Model:
    """The VTN base network (FlowNet-style decoder).

    Decoder: ``pred_L = conv3(level L)`` (N channels); for level l = L-1 .. 1:
    ``concat_l = [level l, LeakyReLU(ConvT_k4s2(previous)), ConvT_k4s2(pred_{l+1})]`` and, for
    l >= 2, ``pred_l = conv3(concat_l)``; the flow is ``ConvT_k4s2(concat_1) * 20 * flow_multiplier``
    at full resolution. Transposed convolutions have no bias.

    Args:
        inshape: spatial shape, 2 or 3 sizes, each divisible by ``2**vtn_levels``.
        arch: the checked architecture.
        name: model name (``"cascade"`` or ``"cascade_<i>"``).

    Returns:
        ``keras.Model([fixed, moving]) -> flow (B, *S, N)``, float32, voxels.
    """
    ndims = len(inshape)
    fixed = keras.Input((*inshape, 1), name="fixed")
    moving = keras.Input((*inshape, 1), name="moving")
    x = keras.layers.Concatenate(name="concat_input")([fixed, moving])
    levels = arch.vtn_levels
    skips = _vtn_encoder(x, arch.vtn_channels, levels, ndims)
    conv, deconv = _conv(ndims), _deconv(ndims)
    init = "lecun_uniform"
    pred = conv(ndims, 3, padding="same", kernel_initializer=init, name=f"pred{levels}")(skips[-1])
    features = skips[-1]
    for level in range(levels - 1, 0, -1):
        up_pred = deconv(ndims, 4, strides=2, padding="same", use_bias=False, kernel_initializer=init,
                         name=f"upsamp{level + 1}to{level}")(pred)
        up_feat = deconv(skips[level - 1].shape[-1], 4, strides=2, padding="same", use_bias=False,
                         kernel_initializer=init, name=f"deconv{level}")(features)
        up_feat = LeakyReLU(LEAKY, name=f"deconv{level}_act")(up_feat)
        features = keras.layers.Concatenate(name=f"concat{level}")([skips[level - 1], up_feat, up_pred])
        if level > 1:
            pred = conv(ndims, 3, padding="same", kernel_initializer=init, name=f"pred{level}")(features)
    # small initial flow (start near the identity); the original initialises this layer like the others
    # the flow head computes in float32 under mixed precision (a field; 1e-5 weights)
    flow = deconv(ndims, 4, strides=2, padding="same", use_bias=False,
                  kernel_initializer=keras.initializers.RandomNormal(stddev=1e-5),
                  name="upsamp1to0", dtype="float32")(features)
    flow = FlowScale(VTN_FLOW_GAIN * arch.flow_multiplier, name="flow_scale")(flow)
    return keras.Model([fixed, moving], flow, name=name)


def unet(inshape: Sequence[int], arch: Architecture, name: str) -> keras.Model:
    """The VoxelMorph base network as the original's re-implementation (2018 VoxelMorph paper).

    Encoder: L = len(enc) stride-2 convs. Decoder: ``dec[i]`` at 1/2^(L-i) followed by nearest x2
    upsampling and a concat with encoder level L-1-i, for i < L-1; ``dec[L-1]`` and ``dec[L]`` at
    1/2; upsampling and a concat with the input; ``dec[L+1:]`` at full resolution; flow conv with
    kernel N(0, 1e-5), times ``flow_multiplier``. LeakyReLU 0.1 after every conv.

    Returns:
        ``keras.Model([fixed, moving]) -> flow (B, *S, N)``, float32, voxels.
    """
    ndims = len(inshape)
    enc, dec = arch.unet_enc_features, arch.unet_dec_features
    levels = len(enc)
    up = keras.layers.UpSampling3D if ndims == 3 else keras.layers.UpSampling2D
    fixed = keras.Input((*inshape, 1), name="fixed")
    moving = keras.Input((*inshape, 1), name="moving")
    inputs = keras.layers.Concatenate(name="concat_input")([fixed, moving])
    skips = []
    x = inputs
    for i, feats in enumerate(enc):
        x = _conv_act(x, feats, 2, f"enc{i + 1}", ndims)
        skips.append(x)
    for i in range(levels - 1):
        x = _conv_act(x, dec[i], 1, f"dec{i}", ndims)
        x = up(2, name=f"dec{i}_up")(x)
        x = keras.layers.Concatenate(name=f"dec{i}_concat")([x, skips[levels - 2 - i]])
    x = _conv_act(x, dec[levels - 1], 1, f"dec{levels - 1}", ndims)
    x = _conv_act(x, dec[levels], 1, f"dec{levels}", ndims)
    x = up(2, name=f"dec{levels}_up")(x)
    x = keras.layers.Concatenate(name=f"dec{levels}_concat")([x, inputs])
    for i in range(levels + 1, len(dec)):
        x = _conv_act(x, dec[i], 1, f"dec{i}", ndims)
    flow = _conv(ndims)(ndims, 3, padding="same", name="flow", dtype="float32",
                        kernel_initializer=keras.initializers.RandomNormal(stddev=1e-5))(x)
    flow = FlowScale(arch.flow_multiplier, name="flow_scale")(flow)
    return keras.Model([fixed, moving], flow, name=name)


def affine_stem(inshape: Sequence[int], arch: Architecture, name: str = "affine_stem") -> keras.Model:
    """The VTN affine stem: the VTN encoder, then a layer seeing the whole remaining extent.

    The original's 'valid' convolution with a kernel as large as the last feature map equals a
    dense layer on the flattened map; two bias-free heads give W (N*N values) and b (N, voxels).
    The heads start at zero, i.e. at the identity transform (the original initialises them
    randomly).

    Returns:
        ``keras.Model([fixed, moving]) -> (B, N, N+1)`` matrix ``[I + W | b]``.
    """
    ndims = len(inshape)
    fixed = keras.Input((*inshape, 1), name="fixed")
    moving = keras.Input((*inshape, 1), name="moving")
    x = keras.layers.Concatenate(name="concat_input")([fixed, moving])
    x = _vtn_encoder(x, arch.vtn_channels, arch.vtn_levels, ndims)[-1]
    x = keras.layers.Flatten(name="flatten")(x)
    # the heads compute the transform: float32 also under mixed precision
    w = keras.layers.Dense(ndims * ndims, use_bias=False, kernel_initializer="zeros", name="head_W",
                           dtype="float32")(x)
    b = keras.layers.Dense(ndims, use_bias=False, kernel_initializer="zeros", name="head_b",
                           dtype="float32")(x)
    affine = AffineMatrix(ndims, name="affine")([w, b])
    return keras.Model([fixed, moving], affine, name=name)


# ------------------------------------------------------------------------------------------ model
def check_shape(inshape: Sequence[int], arch: Architecture) -> tuple[int, ...]:
    """The spatial shape as ints; ConfigError if it does not suit the architecture."""
    shape = tuple(int(s) for s in inshape)
    if len(shape) not in (2, 3):
        raise ConfigError(f"shape: expected 2 or 3 spatial sizes, got {list(shape)}")
    div = arch.divisor
    if any(s % div for s in shape):
        key = "model.vtn_levels" if arch.affine_stem or arch.base == "vtn" else "model.unet_enc_features"
        levels = int(math.log2(div))
        raise ConfigError(f"{key}: {levels} stride-2 levels need every size divisible by {div}, "
                          f"got shape {list(shape)}")
    return shape


def build(config: Mapping[str, Any], inshape: Sequence[int]) -> keras.Model:
    """Build the cascade model of a resolved config.

    Args:
        config: resolved config (reads ``model:``).
        inshape: spatial shape (2 or 3 sizes).

    Returns:
        ``keras.Model`` with dict inputs ``{"moving", "fixed"}`` `(B, *S, 1)` and dict outputs
        ``"warped"`` `(B, *S, 1)`, ``"disp"`` `(B, *S, N)` (voxels, pull, fixed grid),
        ``"flow_k"`` (cascade k's own flow), ``"disp_k"`` (composed field after k cascades) and
        ``"warped_k"`` for k = 1..n (k = 1..n * repeats with distinct networks), plus
        ``"affine"`` `(B, N, N+1)`, ``"disp_0"`` and ``"warped_0"`` with the affine stem.

    Raises:
        ConfigError: an invalid ``model.<key>`` or a shape the network cannot take.
    """
    arch = Architecture.from_config(config)
    shape = check_shape(inshape, arch)
    fixed = keras.Input((*shape, 1), name="fixed")
    moving = keras.Input((*shape, 1), name="moving")
    outputs: dict[str, Any] = {}
    transformer = SpatialTransformer(interp="linear", fill_value=arch.fill_value, name="transformer")

    affine = agg = None
    warped = moving
    if arch.affine_stem:
        affine = affine_stem(shape, arch)([fixed, moving])
        outputs["affine"] = affine
        agg = AffineToField(shape, name="affine_field")(affine)
        warped = transformer([moving, agg])
        outputs["disp_0"] = agg
        outputs["warped_0"] = warped

    make = vtn if arch.base == "vtn" else unet
    if arch.shared_weights:
        shared = make(shape, arch, "cascade") if arch.cascades else None
        nets = [shared] * arch.cascades
    else:
        distinct = [make(shape, arch, f"cascade_{k}") for k in range(arch.cascades)]
        nets = [net for net in distinct for _ in range(arch.repeats)]

    for k, net in enumerate(nets, start=1):
        flow = net([fixed, warped])
        outputs[f"flow_{k}"] = flow
        if agg is None:
            agg = flow
        elif k == 1:  # directly after the affine stem: exact composition with the matrix
            agg = AffineCompose(name="compose_affine")([affine, flow])
        else:
            agg = ComposeTransform(name=f"compose_{k}")([agg, flow])
        warped = transformer([moving, agg])
        outputs[f"disp_{k}"] = agg
        outputs[f"warped_{k}"] = warped

    outputs["disp"] = keras.layers.Identity(name="disp", dtype="float32")(agg)
    outputs["warped"] = keras.layers.Identity(name="warped", dtype="float32")(warped)
    return keras.Model({"fixed": fixed, "moving": moving}, outputs, name="cascade_model")

