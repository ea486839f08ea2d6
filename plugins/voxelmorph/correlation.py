"""The correlation-matching network (``model.matching: correlation``).

The U-Net of `network` sees moving and fixed as two input channels and has to learn to compare
them; a small one does not learn a pair-dependent field within a few thousand CPU steps
(docs/builtin-model.md). This network compares the two images directly, so a pair-dependent
displacement exists from the first step and training only has to improve it::

    moving, fixed (B, *S, 1)
      -> per image, shared weights (siamese):
           MIND-SSC (12 or 4 channels, no weights)                  "mind"
           average pooling x2 -> half grid                           "mind_pool"
           + residual learned features: conv3 + LeakyReLU at full grid, pooling,
             conv3 + LeakyReLU, conv3 back to the MIND channels (kernel zero at start)
                                                                     "feat_conv_*", "feat_out"
      -> cost volume over displacements [-r, r]^N at half grid       "cost"
      -> `aggregate` passes of 3^N average filtering                 "cost_aggregate"
      -> soft-argmax (learnable temperature): coarse displacement    "soft_argmax"
      -> refinement: conv3 + LeakyReLU x2 on [cost, fixed features, coarse], conv3 to N
         channels (kernel N(0, 1e-5)) added to the coarse field      "refine_*", "refine_out"
      -> `smooth` passes of 3^N average filtering = the SVF (half grid) "smooth"
      -> VecInt(int_steps) "flow_int" -> RescaleTransform(2) "diffflow" = disp
      -> SpatialTransformer(moving, disp)                            "transformer"

With the learned features still zero and the refinement near zero, the untrained network is a
MIND-SSC block matcher: it already moves pairs toward alignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import keras

from tfreg.errors import ConfigError
from tfreg.layers import (BoxSmooth, LeakyReLU, LocalCorrelation, MindSSC, RescaleTransform, SoftArgmax,
                          SpatialTransformer, VecInt, conv_layer)

METRICS = ("dot", "ssd")


@dataclass(frozen=True)
class Correlation:
    """Checked ``model.correlation:`` section.

    Attributes:
        radius: displacements in ``[-radius, radius]^N`` voxels of the half grid.
        temperature: initial soft-argmax temperature (cost units; learnable).
        metric: ``"ssd"`` or ``"dot"`` (`tfreg.ops.correlation`).
        mind_dilation, mind_sigma: MIND-SSC parameters, voxels of the input grid.
        features: channels of the learned feature convolutions (full grid, half grid).
        refine_features: channels of the two refinement convolutions.
        smooth: passes of 3^N average filtering of the field.
        aggregate: passes of 3^N average filtering of the cost volume (before the soft-argmax).
    """

    radius: int = 2
    temperature: float = 0.003
    metric: str = "ssd"
    mind_dilation: int = 1
    mind_sigma: float = 0.8
    features: tuple[int, ...] = (16, 16)
    refine_features: int = 32
    smooth: int = 2
    aggregate: int = 2


def _int(section: Mapping[str, Any], key: str, minimum: int) -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.correlation.{key}: expected an integer >= {minimum}, "
                          f"got {value!r}")
    return int(value)


def settings(model: Mapping[str, Any]) -> Correlation:
    """Read and check ``model.correlation`` (one-line `ConfigError` naming the key)."""
    section = model.get("correlation") or {}
    defaults = Correlation()
    merged = {**defaults.__dict__, **section}
    temperature = merged["temperature"]
    sigma = merged["mind_sigma"]
    for key, value in (("temperature", temperature), ("mind_sigma", sigma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"model.correlation.{key}: expected a number > 0, got {value!r}")
    if merged["metric"] not in METRICS:
        raise ConfigError(f"model.correlation.metric: expected one of {', '.join(METRICS)}, "
                          f"got {merged['metric']!r}")
    features = merged["features"]
    if not isinstance(features, (list, tuple)) or len(features) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in features):
        raise ConfigError("model.correlation.features: expected two positive integers, "
                          f"got {features!r}")
    return Correlation(_int(merged, "radius", 1), float(temperature), merged["metric"],
                       _int(merged, "mind_dilation", 1), float(sigma),
                       tuple(int(v) for v in features), _int(merged, "refine_features", 1),
                       _int(merged, "smooth", 0), _int(merged, "aggregate", 0))


def build(config: Mapping[str, Any], shape: Sequence[int], int_steps: int,
          fill_value: float | None) -> keras.Model:
    """The correlation-matching model on spatial `shape` (2D or 3D, even sizes).

    Returns:
        ``keras.Model`` with inputs ``{"moving", "fixed"}`` `(B, *S, 1)` and outputs
        ``"warped"`` `(B, *S, 1)`, ``"disp"`` `(B, *S, N)` (voxels, pull) and ``"preint_flow"``
        `(B, *S / 2, N)` (the smoothed SVF in half-grid voxels, for the smoothness loss). The
        soft-argmax displacement alone is the output of the layer ``"soft_argmax"``.
    """
    cfg = settings(config.get("model") or {})
    ndims = len(shape)
    conv = conv_layer(ndims)
    pool = {2: keras.layers.AveragePooling2D, 3: keras.layers.AveragePooling3D}[ndims]
    channels = 12 if ndims == 3 else 4

    moving = keras.Input((*shape, 1), name="moving")
    fixed = keras.Input((*shape, 1), name="fixed")

    mind = MindSSC(cfg.mind_sigma, cfg.mind_dilation, name="mind")
    mind_pool = pool(pool_size=2, name="mind_pool")
    feat_pool = pool(pool_size=2, name="feat_pool")
    conv_a = conv(cfg.features[0], 3, padding="same", kernel_initializer="he_normal",
                  name="feat_conv_0")
    act_a = LeakyReLU(negative_slope=0.2, name="feat_conv_0_activation")
    conv_b = conv(cfg.features[1], 3, padding="same", kernel_initializer="he_normal",
                  name="feat_conv_1")
    act_b = LeakyReLU(negative_slope=0.2, name="feat_conv_1_activation")
    conv_out = conv(channels, 3, padding="same", kernel_initializer="zeros", name="feat_out")
    add = keras.layers.Add(name="features")

    def features(image: Any) -> Any:
        desc = mind(image)
        learned = conv_out(act_b(conv_b(feat_pool(act_a(conv_a(desc))))))
        return add([mind_pool(desc), learned])

    fixed_feat = features(fixed)
    moving_feat = features(moving)
    cost = LocalCorrelation(cfg.radius, cfg.metric, name="cost")([fixed_feat, moving_feat])
    if cfg.aggregate:
        cost = BoxSmooth(3, cfg.aggregate, name="cost_aggregate")(cost)
    coarse = SoftArgmax(cfg.radius, cfg.temperature, name="soft_argmax")(cost)

    x = keras.layers.Concatenate(axis=-1, name="refine_input")([cost, fixed_feat, coarse])
    for k in range(2):
        x = conv(cfg.refine_features, 3, padding="same", kernel_initializer="he_normal",
                 name=f"refine_{k}")(x)
        x = LeakyReLU(negative_slope=0.2, name=f"refine_{k}_activation")(x)
    delta = conv(ndims, 3, padding="same", dtype="float32", name="refine_out",
                 kernel_initializer=keras.initializers.RandomNormal(stddev=1e-5))(x)
    flow = keras.layers.Add(name="refined", dtype="float32")([coarse, delta])
    if cfg.smooth:
        flow = BoxSmooth(3, cfg.smooth, name="smooth")(flow)
    preint_flow = flow
    pos = VecInt(int_steps, name="flow_int")(flow) if int_steps > 0 else flow
    disp = RescaleTransform(2.0, name="diffflow")(pos)
    warped = SpatialTransformer("linear", fill_value, name="transformer")([moving, disp])
    return keras.Model(inputs={"moving": moving, "fixed": fixed},
                       outputs={"warped": warped, "disp": disp, "preint_flow": preint_flow},
                       name="voxelmorph_correlation")
