"""Keras layers of the Quicksilver model: the two patch networks applied to patches or whole
images, patch gathering, and geodesic shooting.

`PatchNetworks` owns the prediction network (and the correction network): called on patches it
is the network itself (training), called with ``whole=True`` on whole images it cuts the images
into patches at stride `stride` (`patches.patch_starts`), skips background patches, predicts in
chunks of `patch_batch`, and averages the overlaps (`patches.reassemble`), with dropout off
(the usual approximation of the Monte-Carlo mean: a dropout layer's random state cannot be part
of the exported SavedModel). `displacement_spread` draws Monte-Carlo samples (dropout active).

`Shoot` is `tfreg.ops.lddmm.shoot` on the model's grid (unit voxel spacing), returning the
forward and the inverse map as voxel displacements.
"""
from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfreg.ops import lddmm

from . import patches
from .network import build_network

__all__ = ["PatchNetworks", "GatherPatches", "Shoot"]

_PACKAGE = "tfreg_quicksilver"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GatherPatches(keras.layers.Layer):
    """``[volume (B, *S, C), starts (B, K, N) int32] -> (B*K, *P, C)`` patches.

    Args:
        patch: patch edge length.
        stop_gradient: cut the gradient to `volume` (for targets taken from another network).
    """

    def __init__(self, patch: int = 15, stop_gradient: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.patch = int(patch)
        self.stop_gradient = bool(stop_gradient)

    def call(self, inputs):
        volume, starts = inputs
        if self.stop_gradient:
            volume = tf.stop_gradient(volume)
        out = patches.gather(volume, starts, self.patch)
        ndims = len(volume.shape) - 2
        return tf.reshape(out, [-1] + [self.patch] * ndims + [volume.shape[-1]])

    def compute_output_spec(self, inputs):
        volume = inputs[0]
        ndims = len(volume.shape) - 2
        return keras.KerasTensor((None, *[self.patch] * ndims, volume.shape[-1]), "float32")

    def get_config(self) -> dict:
        return {**super().get_config(), "patch": self.patch, "stop_gradient": self.stop_gradient}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Shoot(keras.layers.Layer):
    """``m0 (B, *S, N) -> [forward, inverse]`` displacements (voxels) by geodesic shooting.

    Args:
        shape: the grid `S` (the kernel is built for it).
        alpha, beta, gamma, power: the operator ``L`` (`tfreg.ops.lddmm.FluidKernel`).
        steps: RK4 steps over unit time.
        inverse_iterations: fixed-point iterations per inverse refresh (the original's
            prediction: 20).
        stop_gradient: no gradient through the shooting (its input is a fixed prediction).
    """

    def __init__(self, shape: Sequence[int], alpha: float = 0.01, beta: float = 0.01,
                 gamma: float = 0.001, power: int = 1, steps: int = 10,
                 inverse_iterations: int = 20, stop_gradient: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.shape = tuple(int(s) for s in shape)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.power, self.steps = int(power), int(steps)
        self.inverse_iterations = int(inverse_iterations)
        self.stop_gradient = bool(stop_gradient)
        self._kernel = None

    @property
    def kernel(self) -> lddmm.FluidKernel:
        if self._kernel is None:
            with tf.init_scope():   # eager constants, usable by every traced function
                self._kernel = lddmm.FluidKernel.create(self.shape, None, self.alpha,
                                                        self.beta, self.gamma, self.power)
        return self._kernel

    def call(self, m0):
        if self.stop_gradient:
            m0 = tf.stop_gradient(m0)
        geo = lddmm.shoot(m0, self.kernel, self.steps, self.inverse_iterations)
        return [geo.forward, geo.inverse]

    def compute_output_spec(self, m0):
        return [keras.KerasTensor(m0.shape, "float32"), keras.KerasTensor(m0.shape, "float32")]

    def get_config(self) -> dict:
        return {**super().get_config(), "shape": list(self.shape), "alpha": self.alpha,
                "beta": self.beta, "gamma": self.gamma, "power": self.power,
                "steps": self.steps, "inverse_iterations": self.inverse_iterations,
                "stop_gradient": self.stop_gradient}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PatchNetworks(keras.layers.Layer):
    """The prediction network and, with `correction`, the correction network.

    Call ``layer([a, b], network="prediction"|"correction", whole=False|True)``:

    * ``whole=False``: `a`, `b` are patches `(B', *P, 1)`; returns the network's momentum
      `(B', *P, N)` (dropout follows `training`).
    * ``whole=True``: `a`, `b` are images `(B, *shape, 1)`; returns the whole-image momentum
      `(B, *shape, N)` (never in training mode: dropout off).

    Args:
        shape: image grid of the whole-image calls.
        features, dropout, patch: the networks (`network.build_network`); the correction
            network has no dropout.
        correction: also build the correction network.
        stride: patch stride of whole-image prediction (the original: 14).
        mc_samples: Monte-Carlo samples of the uncertainty (`displacement_spread`, the hook).
        patch_batch: patches per network call in whole-image prediction.
        momentum_scale: the networks' outputs are momenta in these units.
    """

    def __init__(self, shape: Sequence[int], features: int = 64, dropout: float = 0.0,
                 correction: bool = True, patch: int = 15, stride: int = 14,
                 mc_samples: int = 50, patch_batch: int = 64, momentum_scale: float = 1.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.shape = tuple(int(s) for s in shape)
        self.features, self.dropout = int(features), float(dropout)
        self.correction = bool(correction)
        self.patch, self.stride = int(patch), int(stride)
        self.mc_samples, self.patch_batch = int(mc_samples), int(patch_batch)
        self.momentum_scale = float(momentum_scale)
        ndims = len(self.shape)
        self.starts = patches.patch_starts(self.shape, self.patch, self.stride)
        self.prediction = build_network(ndims, self.features, self.dropout, self.patch,
                                        self.momentum_scale, name="prediction")
        self.correction_network = build_network(ndims, self.features, 0.0, self.patch,
                                                self.momentum_scale, name="correction") \
            if self.correction else None

    def _network(self, which: str) -> keras.Model:
        if which == "prediction":
            return self.prediction
        if which == "correction" and self.correction_network is not None:
            return self.correction_network
        raise ValueError(f"no '{which}' network in this model")

    def _chunked(self, net: keras.Model, a: tf.Tensor, b: tf.Tensor, training: bool) -> tf.Tensor:
        """The network on `(M, *P, 1)` patches, `patch_batch` at a time."""
        count = tf.shape(a)[0]
        chunk = self.patch_batch
        chunks = (count + chunk - 1) // chunk
        pad = chunks * chunk - count
        tail = [0] * (len(a.shape) - 1)

        def split(x):
            x = tf.pad(x, [[0, pad], *[[0, 0]] * len(tail)])
            return tf.reshape(x, tf.concat([[chunks, chunk], tf.shape(x)[1:]], 0))

        ndims = len(self.shape)
        out = tf.map_fn(lambda ab: net({"moving": ab[0], "fixed": ab[1]},
                                       training=training)["momentum"],
                        (split(a), split(b)),
                        fn_output_signature=tf.TensorSpec([chunk, *[self.patch] * ndims, ndims],
                                                          tf.float32))
        out = tf.reshape(out, tf.concat([[chunks * chunk], tf.shape(out)[2:]], 0))
        return out[:count]

    def whole_image(self, a: tf.Tensor, b: tf.Tensor, which: str = "prediction",
                    sample: bool = False) -> tf.Tensor:
        """Whole-image momentum `(B, *shape, N)` from `(B, *shape, 1)` images; `sample`: one
        Monte-Carlo sample (dropout active) instead of the layer's usual prediction."""
        net = self._network(which)
        a = tf.convert_to_tensor(a, tf.float32)
        b = tf.convert_to_tensor(b, tf.float32)
        batch = tf.shape(a)[0]
        count = len(self.starts)
        starts = tf.tile(tf.constant(self.starts)[None], [batch, 1, 1])
        pa = patches.gather(a, starts, self.patch)                            # (B, P, *Pt, 1)
        pb = patches.gather(b, starts, self.patch)
        weights = patches.foreground(pa, pb)                                  # (B, P)
        flat_shape = tf.concat([[-1], tf.shape(pa)[2:]], 0)
        fa, fb = tf.reshape(pa, flat_shape), tf.reshape(pb, flat_shape)
        # one Monte-Carlo sample (dropout active) or the network with dropout off
        values = self._chunked(net, fa, fb, bool(sample))
        values = tf.reshape(values, tf.concat([[batch, count], tf.shape(values)[1:]], 0))
        return patches.reassemble(values, weights, self.starts, self.shape)

    def call(self, inputs, network: str = "prediction", whole: bool = False, training=None):
        a, b = inputs
        if whole:
            return self.whole_image(a, b, network)
        return self._network(network)({"moving": a, "fixed": b}, training=training)["momentum"]

    def compute_output_spec(self, inputs, network: str = "prediction", whole: bool = False,
                            training=None):
        a = inputs[0]
        ndims = len(self.shape)
        spatial = self.shape if whole else (self.patch,) * ndims
        return keras.KerasTensor((a.shape[0], *spatial, ndims), "float32")

    def get_config(self) -> dict:
        return {**super().get_config(), "shape": list(self.shape), "features": self.features,
                "dropout": self.dropout, "correction": self.correction, "patch": self.patch,
                "stride": self.stride, "mc_samples": self.mc_samples,
                "patch_batch": self.patch_batch, "momentum_scale": self.momentum_scale}


def displacement_spread(networks: PatchNetworks, shoot: Shoot, moving: np.ndarray,
                        fixed: np.ndarray, samples: int) -> np.ndarray:
    """Per-voxel standard deviation `(B, *S)` of the displacement over `samples` Monte-Carlo
    samples of the predicted momentum, each shot on its own (the original's probabilistic
    prediction): ``sqrt(sum_d Var[u_d])`` in voxels of the model grid."""
    moving = tf.constant(moving, tf.float32)
    fixed = tf.constant(fixed, tf.float32)

    @tf.function
    def one():
        m = networks.whole_image(moving, fixed, "prediction", sample=True)
        return shoot(m)[1]

    first = np.asarray(one(), np.float64)
    mean, m2 = first, np.zeros_like(first)
    for k in range(2, int(samples) + 1):        # Welford's running mean and variance
        disp = np.asarray(one(), np.float64)
        delta = disp - mean
        mean = mean + delta / k
        m2 = m2 + delta * (disp - mean)
    var = m2 / max(int(samples), 1)
    return np.sqrt(var.sum(-1)).astype(np.float32)
