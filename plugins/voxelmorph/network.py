"""The VoxelMorph network (VxmDense) in Keras 3.

Graph (default ``variant: maxpool``, the current voxelmorph TF code)::

    moving, fixed (B, *S, 1)
      -> concat(moving, fixed)                        "unet_input_concat"   (source, target order)
      -> encoder: level l = 0..L-1: conv3 + LeakyReLU(0.2), MaxPool(2)
                                                      "unet_enc_conv_{l}_{c}", "unet_enc_pooling_{l}"
      -> decoder: dec[0:L] at 1/2^L .. 1/2, each followed by nearest x2 upsampling and
         concat(upsampled, skip)                      "unet_dec_conv_{l}_{c}", "unet_dec_upsample_{l}"
      -> remaining dec[L:] at the output resolution   "unet_dec_final_conv_{k}"
      -> flow head conv3 (N channels), kernel N(0, 1e-5), bias 0                "flow"
      -> [svf_resize] -> [flow_resize: to 1/int_resolution] = preint_flow (the SVF)
      -> VecInt(int_steps) "flow_int" -> [RescaleTransform to full res "diffflow"] = disp
      -> SpatialTransformer(moving, disp)             "transformer"

``variant: stride2`` is the 2018 paper network: L stride-2 encoder convs (no pooling); decoder
``dec[0:L-1]`` each followed by upsampling and a skip concat, ``dec[L-1:L+1]`` at 1/2 resolution,
upsampling and a concat with the input, then ``dec[L+1:]`` at full resolution. With
``svf_resolution: 2`` it stops after ``dec[L-1:L+1]``: the field is predicted at 1/2 resolution
(the MICCAI 2018 network, ``dec_features`` of length L + 1).

``probabilistic: true`` (Dalca et al. 2018/2019) adds a second head beside ``flow`` (the mean):
``log_sigma`` (the log variance; kernel N(0, 1e-10), bias -10), and the velocity is
``GaussianSample([flow, log_sigma])`` "z_sample": a sample when training, the mean otherwise.

Every layer has an explicit, stable name (used for freezing and by the voxelmorph ``.h5`` importer).
Fields are displacements in voxels of the fixed grid, ij channel order, pull convention:
``warped(x) = moving(x + disp(x))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import keras

from tfreg.errors import ConfigError
from tfreg.layers import (GaussianSample, LeakyReLU, RescaleTransform, SpatialTransformer, VecInt,
                          conv_layer)

#: Valid values of ``model.variant``.
VARIANTS = ("maxpool", "stride2")
#: Valid values of ``model.matching``: the U-Net on concatenated images, or `correlation`.
MATCHINGS = ("unet", "correlation")


@dataclass(frozen=True)
class Architecture:
    """Checked ``model:`` section of a VoxelMorph config.

    Attributes:
        enc_features: encoder conv features, one per conv (``conv_per_level`` per level).
        dec_features: decoder conv features; the first ``len(enc_features)`` follow the U-Net
            levels, the rest run at the output resolution (maxpool variant).
        conv_per_level: convs per U-Net level (maxpool variant only).
        variant: ``"maxpool"`` (current voxelmorph) or ``"stride2"`` (2018 paper).
        int_steps: scaling-and-squaring steps; 0 = the flow is a plain displacement.
        int_resolution: voxel size (relative) of the velocity during integration.
        svf_resolution: voxel size (relative) of the predicted SVF (2 skips the last upsampling).
        bidir: also output the inverse warp of the fixed image.
        fill_value: None = nearest-border outside the moving image; a number = constant.
        probabilistic: mean and log-variance heads, a sampled velocity when training.
        recompute: the integration layers recompute each squaring in the backward pass instead
            of keeping its interpolation intermediates (``VecInt(recompute=True)``): same
            values and gradients, less memory in training.
    """

    enc_features: tuple[int, ...]
    dec_features: tuple[int, ...]
    conv_per_level: int
    variant: str
    int_steps: int
    int_resolution: int
    svf_resolution: int
    bidir: bool
    fill_value: float | None
    probabilistic: bool = False
    matching: str = "unet"
    recompute: bool = False

    @property
    def levels(self) -> int:
        """Number of down-sampling steps (poolings or stride-2 convs)."""
        if self.variant == "stride2":
            return len(self.enc_features)
        return len(self.enc_features) // self.conv_per_level

    @property
    def upsample_skips(self) -> int:
        """Decoder upsamplings left out so the U-Net output is at ``svf_resolution``."""
        return int(round(math.log2(self.svf_resolution)))


def _int_list(model: Mapping[str, Any], key: str) -> tuple[int, ...]:
    value = model.get(key)
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ConfigError(f"model.{key}: expected a non-empty list of positive integers, got {value!r}")
    return tuple(int(v) for v in value)


def _positive_int(model: Mapping[str, Any], key: str, minimum: int = 1) -> int:
    value = model.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.{key}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _power_of_two(model: Mapping[str, Any], key: str) -> int:
    value = _positive_int(model, key)
    if value & (value - 1):
        raise ConfigError(f"model.{key}: expected a power of two (1, 2, 4, ...), got {value}")
    return value


def architecture(config: Mapping[str, Any]) -> Architecture:
    """Read and check the ``model:`` section of a resolved config.

    Raises:
        ConfigError: one line naming the ``model.<key>`` and the problem.
    """
    model = config.get("model") or {}
    variant = model.get("variant", "maxpool")
    if variant not in VARIANTS:
        raise ConfigError(f"model.variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    enc = _int_list(model, "enc_features")
    dec = _int_list(model, "dec_features")
    per_level = _positive_int(model, "conv_per_level")
    int_steps = _positive_int(model, "int_steps", minimum=0)
    int_res = _power_of_two(model, "int_resolution")
    svf_res = _power_of_two(model, "svf_resolution")
    fill = model.get("fill_value")
    if fill is not None and (isinstance(fill, bool) or not isinstance(fill, (int, float))):
        raise ConfigError(f"model.fill_value: expected null or a number, got {fill!r}")
    bidir = model.get("bidir", False)
    if not isinstance(bidir, bool):
        raise ConfigError(f"model.bidir: expected true or false, got {bidir!r}")

    if variant == "stride2":
        if per_level != 1:
            raise ConfigError("model.conv_per_level: the stride2 variant has one conv per level, "
                              f"got {per_level}")
        if len(dec) < len(enc) + 1:
            raise ConfigError(f"model.dec_features: the stride2 variant needs at least "
                              f"len(enc_features) + 1 = {len(enc) + 1} entries, got {len(dec)}")
        if svf_res not in (1, 2):
            raise ConfigError("model.svf_resolution: the stride2 variant predicts the field at "
                              f"full (1) or half (2) resolution, got {svf_res}")
        if svf_res == 2 and len(dec) != len(enc) + 1:
            raise ConfigError(f"model.dec_features: the stride2 variant with svf_resolution 2 "
                              f"has len(enc_features) + 1 = {len(enc) + 1} decoder convs (none "
                              f"at full resolution), got {len(dec)}")
    else:
        if len(enc) % per_level:
            raise ConfigError(f"model.enc_features: {len(enc)} entries do not divide into levels "
                              f"of conv_per_level={per_level}")
        if len(dec) < len(enc):
            raise ConfigError(f"model.dec_features: needs at least len(enc_features) = {len(enc)} "
                              f"entries, got {len(dec)}")
        levels = len(enc) // per_level
        if svf_res > 2 ** levels:
            raise ConfigError(f"model.svf_resolution: at most 2^levels = {2 ** levels}, got {svf_res}")
    probabilistic = model.get("probabilistic", False)
    if not isinstance(probabilistic, bool):
        raise ConfigError(f"model.probabilistic: expected true or false, got {probabilistic!r}")
    if probabilistic and int_steps == 0:
        raise ConfigError("model.probabilistic: the probabilistic model samples a velocity "
                          "field; it needs int_steps > 0")
    recompute = model.get("recompute", False)
    if not isinstance(recompute, bool):
        raise ConfigError(f"model.recompute: expected true or false, got {recompute!r}")
    matching = model.get("matching", "unet")
    if matching not in MATCHINGS:
        raise ConfigError(f"model.matching: expected one of {', '.join(MATCHINGS)}, got {matching!r}")
    if matching == "correlation":
        from .correlation import settings

        settings(model)
        if bidir or probabilistic:
            raise ConfigError("model.matching: correlation has no bidir or probabilistic "
                              "variant; set model.bidir and model.probabilistic to false")
    return Architecture(enc, dec, per_level, variant, int_steps, int_res, svf_res, bidir,
                        None if fill is None else float(fill), probabilistic, matching, recompute)


def divisor(arch: Architecture) -> int:
    """The spatial shape must divide by this (all down-sampling steps, and the field resolutions;
    2 for the correlation network, whose field lives on the half grid)."""
    if arch.matching == "correlation":
        return 2
    return max(2 ** arch.levels, arch.int_resolution, arch.svf_resolution)


def _conv(ndims: int, filters: int, name: str, strides: int = 1, **kwargs: Any) -> keras.layers.Layer:
    conv = conv_layer(ndims)
    return conv(filters, kernel_size=3, strides=strides, padding="same", name=name, **kwargs)


def _conv_block(x: Any, ndims: int, filters: int, name: str, strides: int = 1) -> Any:
    """Conv (k3, 'same', he_normal) + LeakyReLU(0.2), named ``name`` / ``name_activation``."""
    x = _conv(ndims, filters, name, strides, kernel_initializer="he_normal")(x)
    return LeakyReLU(negative_slope=0.2, name=f"{name}_activation")(x)


def _upsample(x: Any, skip: Any, ndims: int, name: str) -> Any:
    """Nearest x2 upsampling, then ``concat(upsampled, skip)`` (this order, as voxelmorph)."""
    up = {2: keras.layers.UpSampling2D, 3: keras.layers.UpSampling3D}[ndims]
    x = up(size=2, name=name)(x)
    return keras.layers.Concatenate(axis=-1, name=f"{name}_concat")([x, skip])


def _unet_maxpool(x: Any, arch: Architecture, ndims: int) -> Any:
    per, levels = arch.conv_per_level, arch.levels
    enc, dec = arch.enc_features, arch.dec_features
    skips = []
    for level in range(levels):
        for c in range(per):
            x = _conv_block(x, ndims, enc[level * per + c], f"unet_enc_conv_{level}_{c}")
        skips.append(x)
        pool = {2: keras.layers.MaxPooling2D, 3: keras.layers.MaxPooling3D}[ndims]
        x = pool(pool_size=2, name=f"unet_enc_pooling_{level}")(x)
    for i in range(levels):
        level = levels - 1 - i
        for c in range(per):
            x = _conv_block(x, ndims, dec[i * per + c], f"unet_dec_conv_{level}_{c}")
        if i < levels - arch.upsample_skips:
            x = _upsample(x, skips[level], ndims, f"unet_dec_upsample_{level}")
    for k, filters in enumerate(dec[len(enc):]):
        x = _conv_block(x, ndims, filters, f"unet_dec_final_conv_{k}")
    return x


def _unet_stride2(x: Any, arch: Architecture, ndims: int) -> Any:
    enc, dec, levels = arch.enc_features, arch.dec_features, arch.levels
    source = x
    skips = []
    for level in range(levels):
        x = _conv_block(x, ndims, enc[level], f"unet_enc_conv_{level}_0", strides=2)
        skips.append(x)
    # dec[0:L-1]: from 1/2^L up to 1/2, each followed by upsampling and a skip concat
    for i in range(levels - 1):
        level = levels - 2 - i
        x = _conv_block(x, ndims, dec[i], f"unet_dec_conv_{level}_0")
        x = _upsample(x, skips[level], ndims, f"unet_dec_upsample_{level}")
    # two convs at 1/2 resolution, then (full-resolution field) back beside the input images
    for k in range(2):
        x = _conv_block(x, ndims, dec[levels - 1 + k], f"unet_dec_half_conv_{k}")
    if arch.svf_resolution == 2:
        return x
    x = _upsample(x, source, ndims, "unet_dec_upsample_input")
    for k, filters in enumerate(dec[levels + 1:]):
        x = _conv_block(x, ndims, filters, f"unet_dec_final_conv_{k}")
    return x


def check_inshape(arch: Architecture, inshape: Sequence[int]) -> tuple[int, ...]:
    """Validate the spatial input shape against the architecture; returns it as a tuple."""
    try:
        shape = tuple(int(s) for s in inshape)
    except (TypeError, ValueError):
        raise ConfigError(f"inshape: expected 2 or 3 positive integers, got {inshape!r}") from None
    if len(shape) not in (2, 3) or any(s < 1 for s in shape):
        raise ConfigError(f"inshape: expected 2 or 3 positive integers, got {list(shape)}")
    div = divisor(arch)
    if any(s % div for s in shape):
        raise ConfigError(f"inshape: every size must divide by {div} for this VoxelMorph "
                          f"architecture ({arch.levels} down-sampling steps), got {list(shape)}")
    return shape


def _resize_to(field: Any, size: int, name: str) -> Any:
    """RescaleTransform a field so its first spatial axis has ``size`` voxels (all axes scale
    by the same factor: sizes divide by the resolutions)."""
    current = int(field.shape[1])
    if current == size:
        return field
    return RescaleTransform(size / current, name=name)(field)


def build(config: Mapping[str, Any], inshape: Sequence[int]) -> keras.Model:
    """Build the VoxelMorph model.

    Args:
        config: resolved config; only ``config["model"]`` is read (see `architecture`).
        inshape: spatial shape `(*S,)`, 2D or 3D, divisible by `divisor` (16 by default).

    Returns:
        ``keras.Model`` with dict inputs ``{"moving", "fixed"}`` `(B, *S, 1)` float32 and dict
        outputs:

        - ``"warped"`` `(B, *S, 1)`: moving warped to the fixed image.
        - ``"disp"`` `(B, *S, N)`: displacement, voxels, pull, full resolution.
        - ``"preint_flow"`` `(B, *S / int_resolution, N)`: the field the smoothness loss applies
          to (the SVF at integration resolution; the displacement itself when ``int_steps == 0``).
        - with ``bidir``: ``"warped_fixed"`` `(B, *S, 1)` (fixed warped to moving by the inverse)
          and ``"neg_disp"`` `(B, *S, N)`; when also diffeomorphic (``int_steps > 0``) the same
          field as ``"inverse_disp"``, the key tfreg's export and `tfreg register --inverse` use.
        - with ``probabilistic``: ``"flow_params"`` `(B, *S / svf_resolution, 2N)`, the mean and
          log variance of the velocity (the KL loss's input); ``preint_flow`` is then the sample
          (training) or the mean (inference).

    Raises:
        ConfigError: invalid ``model:`` values or an input shape the network cannot take.
    """
    arch = architecture(config)
    shape = check_inshape(arch, inshape)
    ndims = len(shape)
    if arch.matching == "correlation":
        from .correlation import build as build_correlation

        return build_correlation(config, shape, arch.int_steps, arch.fill_value)

    moving = keras.Input((*shape, 1), name="moving")
    fixed = keras.Input((*shape, 1), name="fixed")
    x = keras.layers.Concatenate(axis=-1, name="unet_input_concat")([moving, fixed])
    x = _unet_stride2(x, arch, ndims) if arch.variant == "stride2" else _unet_maxpool(x, arch, ndims)

    # the flow head computes in float32 under a mixed policy (its 1e-5 weights are float16
    # subnormals)
    flow = _conv(ndims, ndims, "flow", dtype="float32",
                 kernel_initializer=keras.initializers.RandomNormal(mean=0.0, stddev=1e-5))(x)

    svf_size = shape[0] // arch.svf_resolution
    outputs: dict[str, Any] = {}
    if arch.probabilistic:
        log_sigma = _conv(ndims, ndims, "log_sigma", dtype="float32",
                          kernel_initializer=keras.initializers.RandomNormal(mean=0.0,
                                                                             stddev=1e-10),
                          bias_initializer=keras.initializers.Constant(-10.0))(x)
        flow_mean = _resize_to(flow, svf_size, "svf_resize_mean")
        log_sigma = _resize_to(log_sigma, svf_size, "svf_resize_log_sigma")
        outputs["flow_params"] = keras.layers.Concatenate(axis=-1, name="flow_params")(
            [flow_mean, log_sigma])
        flow = GaussianSample(name="z_sample")([flow_mean, log_sigma])
    flow = _resize_to(flow, svf_size, "svf_resize")
    if arch.int_steps > 0 and arch.int_resolution > 1:
        flow = _resize_to(flow, shape[0] // arch.int_resolution, "flow_resize")
    preint_flow = flow

    pos = flow
    if arch.int_steps > 0:
        pos = VecInt(arch.int_steps, recompute=arch.recompute, name="flow_int")(pos)
    pos = _resize_to(pos, shape[0], "diffflow")
    warped = SpatialTransformer("linear", arch.fill_value, name="transformer")([moving, pos])
    outputs.update(warped=warped, disp=pos, preint_flow=preint_flow)

    if arch.bidir:
        neg = keras.layers.Rescaling(-1.0, name="neg_flow", dtype="float32")(flow)
        if arch.int_steps > 0:
            neg = VecInt(arch.int_steps, recompute=arch.recompute, name="neg_flow_int")(neg)
        neg = _resize_to(neg, shape[0], "neg_diffflow")
        warped_fixed = SpatialTransformer("linear", arch.fill_value,
                                          name="neg_transformer")([fixed, neg])
        outputs.update(warped_fixed=warped_fixed, neg_disp=neg)
        if arch.int_steps > 0:  # exp(-v) is the inverse of exp(v): exported as the model's inverse
            outputs["inverse_disp"] = neg

    return keras.Model(inputs={"moving": moving, "fixed": fixed}, outputs=outputs, name="voxelmorph")
