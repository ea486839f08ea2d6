"""Multi-step affine network (AVSM's affine part) and the affine-parameter algebra it needs.

Parameters: the network predicts ``theta = [A (N x N, row-major), b (N)]`` of the map
``y = A x + b`` in normalised coordinates ``x_n in [-1, 1]`` per axis (``x_n = 2 i / (S - 1) - 1``,
voxel centres at the ends), like the original. `to_voxel_affine` turns it into tfreg's centred
voxel affine ``(B, N, N+1)`` of any grid covering the same domain.

Network (one step): a shared conv3 (16, ReLU) applied to moving and fixed separately, concatenated
(32 channels), then MaxPool2, conv 32, conv 32 stride 2, conv 32, MaxPool2, conv 32, conv 16
stride 2, conv 16, conv 4 stride 2 (all 3-wide, 'same', ReLU, no normalisation), flatten (its size
follows from the input shape), Dense 32 + ReLU, Dense ``N (N + 1)``.

Memory: max pooling acts per channel, so ``MaxPool2(concat(a, b)) = concat(MaxPool2(a),
MaxPool2(b))``; the shared layer (`SharedConvPool`) pools each image's features itself and, with
``recompute``, keeps none of its full-resolution activations for the backward pass (they are
recomputed there, `tf.recompute_grad`): same values and gradients, without keeping the 16 ReLU
channels per image, their 32-channel concatenation or the pooling's input at full resolution
for every affine step (at 160x192x224 the ``affine_multi`` step fell from more than 23 GB to
11.7 GB).

Multi-step: step ``t`` sees the *original* moving image warped once by the composed transform of
the previous steps and predicts an update ``(A_hat, b_hat)``; the composition is
``A_t = A_hat A_{t-1}``, ``b_t = A_hat b_{t-1} + b_hat`` (`ComposeAffineParams`).
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfreg.layers import Conv2D, Conv3D, conv_layer

__all__ = ["identity_params", "split_params", "compose_params", "to_voxel_affine",
           "ComposeAffineParams", "ParamsToAffine", "SharedConvPool2D", "SharedConvPool3D",
           "AffineStepNet"]

PREFIX = "avsm_affine"


def identity_params(ndims: int) -> np.ndarray:
    """``theta`` of the identity: ``(N (N + 1),)`` float32."""
    return np.concatenate([np.eye(ndims).ravel(), np.zeros(ndims)]).astype(np.float32)


def split_params(theta: tf.Tensor, ndims: int) -> tuple[tf.Tensor, tf.Tensor]:
    """``(B, N(N+1))`` -> ``A (B, N, N)``, ``b (B, N)``."""
    a = tf.reshape(theta[:, :ndims * ndims], (-1, ndims, ndims))
    return a, theta[:, ndims * ndims:]


def compose_params(update: tf.Tensor, previous: tf.Tensor, ndims: int) -> tf.Tensor:
    """``(A_hat A, A_hat b + b_hat)``: apply `previous` first, then `update` (normalised coords)."""
    a_hat, b_hat = split_params(update, ndims)
    a, b = split_params(previous, ndims)
    a_new = tf.matmul(a_hat, a)
    b_new = tf.linalg.matvec(a_hat, b) + b_hat
    return tf.concat([tf.reshape(a_new, (-1, ndims * ndims)), b_new], axis=-1)


def to_voxel_affine(theta: tf.Tensor, shape) -> tf.Tensor:
    """Normalised ``theta`` -> tfreg's centred voxel affine ``[D^-1 A D | D^-1 b]`` ``(B, N, N+1)``
    for a grid of spatial `shape`, ``D = diag(2 / (S_d - 1))``."""
    shape = tuple(int(s) for s in shape)
    ndims = len(shape)
    a, b = split_params(tf.cast(theta, tf.float32), ndims)
    scale = tf.constant([2.0 / max(s - 1, 1) for s in shape], tf.float32)   # D
    a_vox = a * scale[None, None, :] / scale[None, :, None]
    b_vox = b / scale[None, :]
    return tf.concat([a_vox, b_vox[..., None]], axis=-1)


@keras.saving.register_keras_serializable(package="tfreg_avsm")
class ComposeAffineParams(keras.layers.Layer):
    """``[update, previous] -> compose_params(update, previous)`` (normalised parameters)."""

    def __init__(self, ndims: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.ndims = int(ndims)

    def call(self, inputs):
        update, previous = inputs
        return compose_params(tf.cast(update, tf.float32), tf.cast(previous, tf.float32),
                              self.ndims)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "ndims": self.ndims}


@keras.saving.register_keras_serializable(package="tfreg_avsm")
class ParamsToAffine(keras.layers.Layer):
    """Normalised ``theta (B, N(N+1))`` -> centred voxel affine ``(B, N, N+1)`` of a grid `shape`."""

    def __init__(self, shape, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.grid_shape = tuple(int(s) for s in shape)

    def call(self, theta):
        return to_voxel_affine(theta, self.grid_shape)

    def compute_output_shape(self, input_shape):
        n = len(self.grid_shape)
        return (input_shape[0], n, n + 1)

    def get_config(self):
        return {**super().get_config(), "shape": list(self.grid_shape)}


class _SharedConvPool:
    """Mixin: the convolution (with its activation), then 2x max pooling (stride 2, 'valid').

    ``recompute=True`` runs the block under `tf.recompute_grad`: the backward pass keeps only the
    input and recomputes the full-resolution features. Weights, name and values are those of the
    plain convolution followed by the pooling layer.
    """

    def __init__(self, *args, recompute: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.recompute = bool(recompute)

    def _block(self, x):
        features = super().call(x)
        pool = tf.nn.max_pool2d if self.rank == 2 else tf.nn.max_pool3d
        return pool(features, 2, 2, "VALID")

    def call(self, inputs):
        if self.recompute:
            return tf.recompute_grad(self._block)(inputs)
        return self._block(inputs)

    def compute_output_shape(self, input_shape):
        shape = super().compute_output_shape(input_shape)
        return (shape[0], *[None if s is None else s // 2 for s in shape[1:-1]], shape[-1])

    def get_config(self):
        return {**super().get_config(), "recompute": self.recompute}


@keras.saving.register_keras_serializable(package="tfreg_avsm")
class SharedConvPool2D(_SharedConvPool, Conv2D):
    """`Conv2D` + 2x max pooling, full-resolution features recomputed in backprop (`_SharedConvPool`)."""


@keras.saving.register_keras_serializable(package="tfreg_avsm")
class SharedConvPool3D(_SharedConvPool, Conv3D):
    """`Conv3D` + 2x max pooling, full-resolution features recomputed in backprop (`_SharedConvPool`)."""


class AffineStepNet:
    """The layers of one affine step, shared by every step (all named ``avsm_affine_*``).

    Call ``net(moving, fixed)`` on Keras tensors ``(B, *S, 1)`` to get ``theta (B, N(N+1))``.
    The last Dense starts at the identity (bias) with small weights, so an untrained network
    predicts nearly the identity.
    """

    def __init__(self, ndims: int, recompute: bool = True):
        self.ndims = ndims
        conv = conv_layer(ndims)
        pool = {2: keras.layers.MaxPooling2D, 3: keras.layers.MaxPooling3D}[ndims]

        def c(filters, stride, name):
            return conv(filters, 3, strides=stride, padding="same", activation="relu",
                        name=f"{PREFIX}_{name}")

        shared = SharedConvPool2D if ndims == 2 else SharedConvPool3D
        self.shared = shared(16, 3, padding="same", activation="relu", recompute=recompute,
                             name=f"{PREFIX}_shared_conv")           # conv + MaxPool2
        self.concat = keras.layers.Concatenate(name=f"{PREFIX}_concat")
        self.body = [c(32, 1, "conv2"), c(32, 2, "conv3"),
                     c(32, 1, "conv4"), pool(2, name=f"{PREFIX}_pool2"), c(32, 1, "conv5"),
                     c(16, 2, "conv6"), c(16, 1, "conv7"), c(4, 2, "conv8"),
                     keras.layers.Flatten(name=f"{PREFIX}_flatten"),
                     keras.layers.Dense(32, activation="relu", name=f"{PREFIX}_fc1")]
        self.head = keras.layers.Dense(
            ndims * (ndims + 1), name=f"{PREFIX}_fc2",
            kernel_initializer=keras.initializers.RandomNormal(stddev=1e-3),
            bias_initializer=keras.initializers.Constant(identity_params(ndims)))

    def __call__(self, moving, fixed):
        x = self.concat([self.shared(moving), self.shared(fixed)])
        for layer in self.body:
            x = layer(x)
        return self.head(x)
