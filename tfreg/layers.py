"""Keras 3 layers over the spatial transform ops of `tfreg.ops` (2D and 3D).

The functional ops (`warp`, `affine_to_disp`, `integrate_svf`, `compose`, `compose_affine`,
`rescale_field`/`resize_field`, `resize`, `is_affine`) live in `tfreg.ops.sampling` and
`tfreg.ops.fields` and are re-exported here. Conventions (see docs/layers.md):

* Arrays are channels-last, ``(batch, *spatial, channels)``.
* A displacement field ``u`` has shape ``(batch, *spatial, ndims)``, lives on the fixed grid, is in
  voxels, channel ``d`` moves along array axis ``d`` (ij), and pulls:
  ``warped(x) = moving(x + u(x))``.
* An affine transform has shape ``(batch, ndims, ndims + 1)`` (a ``(batch, ndims + 1, ndims + 1)``
  homogeneous matrix is accepted too), acts on voxel coordinates and is **centred**: with
  ``c = (shape - 1) / 2`` it maps a fixed-grid point ``x`` to the moving-grid point
  ``y = A (x - c) + b + c``. The matrix includes the identity (it is not a residual).
* Outside the moving image, sampling clamps to the border (``fill_value=None``) or returns a
  constant (``fill_value`` a number) for points outside ``[0, n - 1]`` along any axis.
* Image and field batch sizes must agree (`tfreg.ops.sampling.warp`).

All computation happens in float32, also under a ``mixed_float16`` policy: coordinates in float16
cannot address the voxels of a 160-voxel axis (the functions keep float64 inputs in float64).

The functional ops work inside ``tf.function(jit_compile=True)``; XLA is the fast path on CPU.
By default (``jit="auto"``) warping, integration and composition of volumes of 2^16 voxels and
more run as their own XLA functions, also when called eagerly or from an uncompiled model;
``jit=True`` forces that at every size, ``jit=False`` turns it off.
"""

from __future__ import annotations

import keras
import numpy as np

from tfreg.ops._checks import (ALIGNS as _ALIGNS, ROUNDINGS as _ROUNDINGS,
                               check_fill as _check_fill, check_interp as _check_interp,
                               check_steps as _check_steps)
from tfreg.ops.compile_cache import check_jit as _check_jit
from tfreg.ops.activations import leaky_relu as _leaky_relu
from tfreg.ops.convolution import (conv as _conv, in_xla_compilation as _in_xla_compilation,
                                   supports as _conv_supported)
from tfreg.ops.fields import (affine_to_disp, compose, compose_affine, integrate_svf, is_affine,
                              rescale_field, resize, resize_field, resized_shape as _out_shape)
from tfreg.ops.sampling import warp
from tfreg.ops.correlation import (local_correlation as _local_correlation,
                                   soft_argmax as _soft_argmax, displacements as _displacements)
from tfreg.ops.mind import mind_ssc as _mind_ssc
from tfreg.ops.filters import box_mean as _box_mean

__all__ = [
    "warp",
    "affine_to_disp",
    "integrate_svf",
    "compose",
    "compose_affine",
    "rescale_field",
    "resize_field",
    "resize",
    "is_affine",
    "SpatialTransformer",
    "VecInt",
    "RescaleTransform",
    "ComposeTransform",
    "AffineToField",
    "GaussianSample",
    "Conv2D",
    "Conv3D",
    "conv_layer",
    "LeakyReLU",
    "MindSSC",
    "LocalCorrelation",
    "SoftArgmax",
    "BoxSmooth",
]


# --------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------
def _float32_kwargs(kwargs: dict) -> dict:
    """These layers compute in float32 whatever the global policy (coordinates need it)."""
    kwargs.setdefault("dtype", "float32")
    return kwargs


def _shape_list(input_shape) -> list:
    return list(input_shape) if input_shape is not None else []


@keras.saving.register_keras_serializable(package="tfreg")
class SpatialTransformer(keras.layers.Layer):
    """Warp an image by a displacement field or a centred affine transform.

    ``warped(x) = image(x + u(x))``; an affine ``[A | b]`` gives ``u(x) = A (x-c) + b + c - x``,
    ``c = (shape - 1) / 2``.

    Args:
        interp: ``"linear"`` (images) or ``"nearest"`` (label maps). Defaults to ``"linear"``.
        fill_value: None (default): clamp to the border; a number: constant outside.
        rounding: nearest ties, ``"half_even"`` (default, voxelmorph) or ``"half_up"``.
        jit: True, False or ``"auto"``. True: run the op as its own XLA-compiled function
            (compiled once per input shape) even when the surrounding model is not compiled,
            several times faster on CPU from about 40^3 voxels, at a compilation of 0.3-3 s per
            shape. ``"auto"`` (default): True from `tfreg.ops.compile_cache.AUTO_MIN_VOXELS`
            output voxels (2^16), else False. False: plain TensorFlow ops.
        lean_gradient: linear only: the backward pass recomputes the interpolation corners
            instead of keeping them (`tfreg.ops.sampling.warp`): same values and gradients, less
            memory in a training step, a slower backward. Defaults to False.

    Input shape:
        ``[image, transform]``: image `(batch, *spatial, channels)`; transform either a
        displacement `(batch, *spatial, ndims)` in voxels (ij, pull) or an affine
        `(batch, ndims, ndims + 1)` on voxel coordinates, ndims 2 or 3.
    Output shape:
        `(batch, *spatial, channels)`: float32 for linear, the image dtype for nearest.

    Example:
    >>> image, disp = np.zeros((1, 8, 8, 8, 2)), np.zeros((1, 8, 8, 8, 3))
    >>> tuple(SpatialTransformer()([image, disp]).shape)
    (1, 8, 8, 8, 2)
    """

    def __init__(self, interp="linear", fill_value=None, rounding="half_even", jit="auto",
                 lean_gradient=False, **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        self.jit = _check_jit(jit)
        if not isinstance(lean_gradient, bool):
            raise ValueError(f"`lean_gradient` must be True or False. Received: {lean_gradient!r}")
        self.lean_gradient = lean_gradient
        self.interp = _check_interp(interp)
        self.fill_value = _check_fill(fill_value)
        if rounding not in _ROUNDINGS:
            raise ValueError(
                f"`rounding` must be one of {_ROUNDINGS}. Received: rounding={rounding!r}"
            )
        self.rounding = rounding

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise ValueError(
                f"SpatialTransformer expects inputs [image, transform]. Received: input_shape={input_shape}"
            )
        image_shape, trf_shape = _shape_list(input_shape[0]), _shape_list(input_shape[1])
        ndims = len(image_shape) - 2
        if ndims not in (2, 3):
            raise ValueError(
                "`image` must have shape (batch, *spatial, channels) with 2 or 3 spatial axes. "
                f"Received: image_shape={tuple(image_shape)}"
            )
        if not is_affine(trf_shape, ndims):
            if len(trf_shape) != ndims + 2 or trf_shape[-1] != ndims:
                raise ValueError(
                    f"`transform` must be a displacement (batch, *spatial, {ndims}) or an affine "
                    f"(batch, {ndims}, {ndims + 1}). Received: transform_shape={tuple(trf_shape)}"
                )

    def call(self, inputs):
        image, trf = inputs
        ndims = len(image.shape) - 2
        if is_affine(trf.shape, ndims):
            trf = affine_to_disp(trf, image.shape[1:-1])
        return warp(image, trf, self.interp, self.fill_value, rounding=self.rounding, jit=self.jit,
                    lean_gradient=self.lean_gradient)

    def compute_output_shape(self, input_shape):
        image_shape, trf_shape = input_shape
        ndims = len(image_shape) - 2
        if is_affine(trf_shape, ndims):
            return tuple(image_shape)
        return (image_shape[0], *trf_shape[1:-1], image_shape[-1])

    def compute_output_spec(self, inputs):
        image, trf = inputs
        shape = self.compute_output_shape((image.shape, trf.shape))
        dtype = "float32" if self.interp == "linear" or "float" in str(image.dtype) else image.dtype
        return keras.KerasTensor(shape, dtype=dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "interp": self.interp,
            "fill_value": self.fill_value,
            "rounding": self.rounding,
            "jit": self.jit,
            "lean_gradient": self.lean_gradient,
        }


def _check_field_shape(shape, name: str = "input_shape") -> int:
    shape = _shape_list(shape)
    ndims = len(shape) - 2
    if ndims not in (2, 3) or shape[-1] != ndims:
        raise ValueError(
            "Expected a field (batch, *spatial, ndims) with ndims 2 or 3. "
            f"Received: {name}={tuple(shape)}"
        )
    return ndims


@keras.saving.register_keras_serializable(package="tfreg")
class VecInt(keras.layers.Layer):
    """Scaling and squaring of a stationary velocity field.

    Args:
        steps: int >= 0. The field is divided by ``2**steps``, then composed with itself
            ``steps`` times. Defaults to 7.
        jit: True, False or ``"auto"``. True: run the op as its own XLA-compiled function
            (compiled once per input shape) even when the surrounding model is not compiled,
            several times faster on CPU from about 40^3 voxels, at a compilation of 0.3-3 s per
            shape. ``"auto"`` (default): True from `tfreg.ops.compile_cache.AUTO_MIN_VOXELS`
            output voxels (2^16), else False. False: plain TensorFlow ops.
        recompute: bool. True: the backward pass keeps only the ``steps`` intermediate fields
            and recomputes each squaring's interpolation (`tfreg.ops.fields.integrate_svf`):
            less memory in training (VoxelMorph's step at 96x112x96: tensors' peak 1.08 -> 0.88
            GiB) for one more warp per squaring. Same values and gradients. Defaults to False.

    Input shape:
        `(batch, *spatial, ndims)`, ndims 2 or 3: velocity in voxels of the fixed grid;
        channel ``d`` moves along array axis ``d`` (ij).
    Output shape:
        Same: displacement in voxels, pull: ``warped(x) = moving(x + u(x))``.

    Example:
    >>> tuple(VecInt()(np.zeros((1, 8, 8, 8, 3), "float32")).shape)
    (1, 8, 8, 8, 3)
    """

    def __init__(self, steps=7, jit="auto", recompute=False, **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        self.steps = _check_steps(steps)
        self.jit = _check_jit(jit)
        if not isinstance(recompute, (bool, np.bool_)):
            raise ValueError(f"`recompute` must be True or False. Received: recompute={recompute!r}")
        self.recompute = bool(recompute)

    def build(self, input_shape):
        _check_field_shape(input_shape)

    def call(self, velocity):
        return integrate_svf(velocity, self.steps, jit=self.jit, recompute=self.recompute)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "steps": self.steps, "jit": self.jit,
                "recompute": self.recompute}


@keras.saving.register_keras_serializable(package="tfreg")
class RescaleTransform(keras.layers.Layer):
    """Resize a displacement field by ``factor`` and scale its values by ``factor``.

    Args:
        factor: number > 0; output size ``int(n * factor)`` per axis.
        align: resize sampling grid: ``"corners"`` (default; voxelmorph's: first and last voxel
            centres coincide) or ``"origin"`` (output voxel ``i`` samples input ``i / factor``).

    Input shape:
        `(batch, *spatial, ndims)` displacement in voxels.
    Output shape:
        `(batch, *(int(n * factor) for n in spatial), ndims)` displacement in voxels of the new
        grid.

    Example:
    >>> tuple(RescaleTransform(0.5)(np.zeros((1, 8, 8, 8, 3), "float32")).shape)
    (1, 4, 4, 4, 3)
    """

    def __init__(self, factor, align="corners", **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        if isinstance(factor, bool) or not isinstance(factor, (int, float, np.number)) or factor <= 0:
            raise ValueError(f"`factor` must be a number > 0. Received: factor={factor!r}")
        if align not in _ALIGNS:
            raise ValueError(f"`align` must be one of {_ALIGNS}. Received: align={align!r}")
        self.factor = float(factor)
        self.align = align

    def build(self, input_shape):
        _check_field_shape(input_shape)

    def call(self, disp):
        return rescale_field(disp, self.factor, align=self.align)

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        spatial = _out_shape(shape[1:-1], self.factor)
        return (shape[0], *spatial, shape[-1])

    def get_config(self):
        return {**super().get_config(), "factor": self.factor, "align": self.align}


@keras.saving.register_keras_serializable(package="tfreg")
class ComposeTransform(keras.layers.Layer):
    """Compose two displacements: apply ``first``, then ``second``.

    ``u = second + warp(first, second)``, so ``warp(warp(img, first), second)`` equals
    ``warp(img, u)`` up to interpolation (voxelmorph's ``ComposeTransform([first, second])``).
    Either input may be an affine `(batch, ndims, ndims + 1)`; it is made dense first. Two affines
    give an affine: the matrix product ``H_first @ H_second`` (homogeneous, same centre).

    Args:
        jit: True, False or ``"auto"``. True: run the op as its own XLA-compiled function
            (compiled once per input shape) even when the surrounding model is not compiled,
            several times faster on CPU from about 40^3 voxels, at a compilation of 0.3-3 s per
            shape. ``"auto"`` (default): True from `tfreg.ops.compile_cache.AUTO_MIN_VOXELS`
            output voxels (2^16), else False. False: plain TensorFlow ops.

    Input shape:
        ``[first, second]``, each `(batch, *spatial, ndims)` (or an affine).
    Output shape:
        `(batch, *spatial, ndims)` displacement in voxels; `(batch, ndims, ndims + 1)` for two
        affines.

    Example:
    >>> z = np.zeros((1, 8, 8, 3), "float32")
    >>> tuple(ComposeTransform()([z[..., :2], z[..., :2]]).shape)
    (1, 8, 8, 2)
    """

    def __init__(self, jit="auto", **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        self.jit = _check_jit(jit)

    def _spatial(self, shapes):
        for s in shapes:
            if len(s) >= 4:
                return tuple(s[1:-1])
        raise ValueError(
            f"ComposeTransform needs at least one dense displacement. Received: input_shape={shapes}"
        )

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise ValueError(
                f"ComposeTransform expects inputs [first, second]. Received: input_shape={input_shape}"
            )
        shapes = [_shape_list(s) for s in input_shape]
        if self._both_affine(shapes):
            return
        spatial = self._spatial(shapes)
        ndims = len(spatial)
        for s in shapes:
            if is_affine(s, ndims):
                continue
            if tuple(s[1:]) != (*spatial, ndims):
                raise ValueError(
                    f"ComposeTransform inputs must be displacements (batch, *spatial, {ndims}) on one "
                    f"grid or affines. Received: input_shape={input_shape}"
                )

    def call(self, inputs):
        first, second = inputs
        ndims = first.shape[-1] - 1
        if is_affine(first.shape, ndims) and is_affine(second.shape, ndims):
            return compose_affine(first, second)
        spatial = self._spatial([first.shape, second.shape])
        ndims = len(spatial)
        if is_affine(first.shape, ndims):
            first = affine_to_disp(first, spatial)
        if is_affine(second.shape, ndims):
            second = affine_to_disp(second, spatial)
        return compose(first, second, jit=self.jit)

    @staticmethod
    def _both_affine(shapes) -> bool:
        ndims = (shapes[0][-1] or 0) - 1
        return all(is_affine(s, ndims) for s in shapes)

    def compute_output_shape(self, input_shape):
        shapes = [tuple(s) for s in input_shape]
        if self._both_affine(shapes):
            ndims = shapes[0][-1] - 1
            return (shapes[0][0], ndims, ndims + 1)
        spatial = self._spatial(shapes)
        return (shapes[0][0], *spatial, len(spatial))

    def get_config(self):
        return {**super().get_config(), "jit": self.jit}


@keras.saving.register_keras_serializable(package="tfreg")
class AffineToField(keras.layers.Layer):
    """Dense displacement of a centred affine transform.

    Args:
        shape: spatial shape of the fixed grid (2 or 3 ints).

    Input shape:
        `(batch, ndims, ndims + 1)` matrix ``[A | b]`` including the identity, voxel coordinates
        centred at ``c = (shape - 1) / 2``; maps a fixed-grid point to a moving-grid point.
    Output shape:
        `(batch, *shape, ndims)` displacement ``u(x) = A (x - c) + b + c - x`` in voxels.

    Example:
    >>> tuple(AffineToField((8, 8, 8))(np.eye(3, 4, dtype="float32")[None]).shape)
    (1, 8, 8, 8, 3)
    """

    def __init__(self, shape, **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        try:
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise ValueError(f"`shape` must be 2 or 3 positive ints. Received: shape={shape!r}") from None
        if len(shape) not in (2, 3) or any(s < 1 for s in shape):
            raise ValueError(f"`shape` must be 2 or 3 positive ints. Received: shape={shape!r}")
        self.shape = shape

    def build(self, input_shape):
        ndims = len(self.shape)
        if not is_affine(_shape_list(input_shape), ndims):
            raise ValueError(
                f"AffineToField({self.shape}) expects an affine (batch, {ndims}, {ndims + 1}). "
                f"Received: input_shape={tuple(input_shape)}"
            )

    def call(self, affine):
        return affine_to_disp(affine, self.shape)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.shape, len(self.shape))

    def get_config(self):
        return {**super().get_config(), "shape": list(self.shape)}


@keras.saving.register_keras_serializable(package="tfreg")
class GaussianSample(keras.layers.Layer):
    """Reparameterised sample of a Gaussian field with a diagonal covariance.

    ``training=True``: ``mean + exp(log_var / 2) * eps``, ``eps ~ N(0, 1)`` per element (the
    sample is differentiable in ``mean`` and ``log_var``); otherwise the mean itself. This is the
    velocity sample of the probabilistic diffeomorphic VoxelMorph (Dalca et al. 2018/2019), whose
    second head is the log *variance* (their ``log_sigma``).

    Args:
        seed: int or None, seed of the layer's random stream.

    Input shape:
        ``[mean, log_var]``, two tensors of the same shape.
    Output shape:
        That shape, float32.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        self.seed = seed
        self._generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        mean, log_var = inputs
        if not training:
            return mean
        noise = keras.random.normal(keras.ops.shape(mean), seed=self._generator, dtype="float32")
        return mean + keras.ops.exp(log_var / 2.0) * noise

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


# --------------------------------------------------------------------------------------------------
# matching: descriptors, cost volume, soft-argmax (tfreg.ops.mind, tfreg.ops.correlation)
# --------------------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="tfreg")
class MindSSC(keras.layers.Layer):
    """MIND-SSC descriptor of an image (`tfreg.ops.mind.mind_ssc`); no weights.

    Args:
        sigma: Gaussian patch weight, voxels. Defaults to 0.8.
        dilation: neighbour distance, voxels. Defaults to 2.

    Input shape: `(batch, *spatial, 1)`, 2D or 3D. Output shape: `(batch, *spatial, K)` in
    ``(0, 1]``, ``K = 12`` (3D) or ``4`` (2D).
    """

    def __init__(self, sigma=0.8, dilation=2, **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        self.sigma = float(sigma)
        self.dilation = int(dilation)

    def call(self, image):
        return _mind_ssc(image, self.sigma, self.dilation)

    def compute_output_shape(self, input_shape):
        return (*tuple(input_shape)[:-1], 12 if len(input_shape) == 5 else 4)

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma, "dilation": self.dilation}


@keras.saving.register_keras_serializable(package="tfreg")
class LocalCorrelation(keras.layers.Layer):
    """Cost volume of ``[fixed, moving]`` features over displacements in ``[-radius, radius]^N``
    (`tfreg.ops.correlation.local_correlation`); no weights.

    Input shape: ``[fixed, moving]``, both `(batch, *spatial, C)`. Output shape:
    `(batch, *spatial, (2 radius + 1)^N)` float32.
    """

    def __init__(self, radius=2, metric="dot", padding="edge", **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        self.radius = int(radius)
        self.metric = metric
        self.padding = padding

    def call(self, inputs):
        fixed, moving = inputs
        return _local_correlation(fixed, moving, self.radius, metric=self.metric,
                                  padding=self.padding)

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape[0])
        return (*shape[:-1], (2 * self.radius + 1) ** (len(shape) - 2))

    def get_config(self):
        return {**super().get_config(), "radius": self.radius, "metric": self.metric,
                "padding": self.padding}


@keras.saving.register_keras_serializable(package="tfreg")
class SoftArgmax(keras.layers.Layer):
    """Displacement from a cost volume (`tfreg.ops.correlation.soft_argmax`) with a learnable
    temperature: one weight ``log_temperature``, initialised to ``log(temperature)``.

    Args:
        radius: radius of the cost volume.
        temperature: initial softmax temperature (> 0), in the cost's units.
        trainable_temperature: whether training may change it. Defaults to True.

    Input shape: `(batch, *spatial, (2 radius + 1)^N)`. Output shape: `(batch, *spatial, N)`,
    voxels of the cost volume's grid, pull convention.
    """

    def __init__(self, radius=2, temperature=1.0, trainable_temperature=True, **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        if not float(temperature) > 0:
            raise ValueError(f"`temperature` must be > 0. Received: temperature={temperature!r}")
        self.radius = int(radius)
        self.temperature = float(temperature)
        self.trainable_temperature = bool(trainable_temperature)

    def build(self, input_shape):
        ndims = len(input_shape) - 2
        expected = len(_displacements(ndims, self.radius))
        if input_shape[-1] is not None and input_shape[-1] != expected:
            raise ValueError(f"SoftArgmax(radius={self.radius}) in {ndims}D needs {expected} "
                             f"channels. Received: input_shape={tuple(input_shape)}")
        self.log_temperature = self.add_weight(
            name="log_temperature", shape=(), dtype="float32",
            initializer=keras.initializers.Constant(float(np.log(self.temperature))),
            trainable=self.trainable_temperature)

    def call(self, cost):
        return _soft_argmax(cost, self.radius, keras.ops.exp(self.log_temperature))

    def compute_output_shape(self, input_shape):
        return (*tuple(input_shape)[:-1], len(input_shape) - 2)

    def get_config(self):
        return {**super().get_config(), "radius": self.radius, "temperature": self.temperature,
                "trainable_temperature": self.trainable_temperature}


@keras.saving.register_keras_serializable(package="tfreg")
class BoxSmooth(keras.layers.Layer):
    """Mean over a ``window^N`` box, repeated `passes` times (`tfreg.ops.filters.box_mean`,
    separable); voxels outside the grid are not counted, so a constant stays constant up to the
    border. No weights.

    Input shape: `(batch, *spatial, C)`, 2D or 3D. Output shape: the same, float32.
    """

    def __init__(self, window=3, passes=1, **kwargs):
        super().__init__(**_float32_kwargs(kwargs))
        self.window = int(window)
        self.passes = int(passes)

    def call(self, x):
        if self.passes == 0 or self.window == 1:
            return x
        for _ in range(self.passes):
            x = _box_mean(x, self.window, inside=True)
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "window": self.window, "passes": self.passes}


# --------------------------------------------------------------------------------------------------
# convolutions with the faster gradient of tfreg.ops.convolution
# --------------------------------------------------------------------------------------------------
class _FastGradientConv:
    """Mixin: stride-1 convolutions compute their gradients with `tfreg.ops.convolution.conv`.

    The forward values, the weights (``kernel``, ``bias``) and the config are those of the
    Keras layer, so models, ``.h5`` imports and saved files are unchanged; other strides,
    dilations, groups, ``channels_first``, volumes below `tfreg.ops.convolution.MIN_VOXELS`
    voxels, inputs of few channels where TensorFlow's oneDNN kernels are faster
    (`tfreg.ops.convolution.ONEDNN_MIN_CHANNELS`) and functions being XLA-compiled
    (`tfreg.ops.convolution.in_xla_compilation`) fall back to Keras' convolution.
    """

    def _fast(self, inputs) -> bool:
        return self.data_format == "channels_last" and _conv_supported(
            self.rank, self.kernel_size, self.strides, self.dilation_rate, self.padding,
            self.groups, spatial_shape=inputs.shape[1:-1], in_channels=inputs.shape[-1]
        ) and not _in_xla_compilation()

    def call(self, inputs):
        if not self._fast(inputs):
            return super().call(inputs)
        # the bias inside the op: its gradient is ordered with the others (see `conv`)
        outputs = _conv(inputs, self.kernel, self.padding, self.bias if self.use_bias else None)
        return outputs if self.activation is None else self.activation(outputs)

    def convolution_op(self, inputs, kernel):
        if self._fast(inputs):
            return _conv(inputs, kernel, self.padding)
        return super().convolution_op(inputs, kernel)


@keras.saving.register_keras_serializable(package="tfreg")
class Conv2D(_FastGradientConv, keras.layers.Conv2D):
    """`keras.layers.Conv2D` with the faster stride-1 gradient (see `_FastGradientConv`)."""


@keras.saving.register_keras_serializable(package="tfreg")
class Conv3D(_FastGradientConv, keras.layers.Conv3D):
    """`keras.layers.Conv3D` with the faster stride-1 gradient (see `_FastGradientConv`)."""


@keras.saving.register_keras_serializable(package="tfreg")
class LeakyReLU(keras.layers.LeakyReLU):
    """`keras.layers.LeakyReLU` whose gradient is computed from its output
    (`tfreg.ops.activations.leaky_relu`), so the pre-activation tensor is not kept for the
    backward pass. Same values, weights (none) and config as Keras'; ``negative_slope`` in (0, 1].
    """

    def call(self, inputs):
        if 0.0 < float(self.negative_slope) <= 1.0:
            return _leaky_relu(inputs, self.negative_slope)
        return super().call(inputs)


def conv_layer(ndims: int) -> type:
    """The convolution layer class for 2 or 3 spatial dimensions (`Conv2D` or `Conv3D`)."""
    if ndims not in (2, 3):
        raise ValueError(f"conv_layer: ndims must be 2 or 3, got {ndims}")
    return Conv2D if ndims == 2 else Conv3D
