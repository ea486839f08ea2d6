"""vSVF part of AVSM: the momentum U-Net and the transform ``m -> v = K * m -> phi``.

Momentum network (residual stages, output at 1/2 resolution; features ``f = (16, 32, 64, 128,
256)`` by default)::

    x = concat(affine-warped moving, fixed)                 full resolution
    d1 = conv f0                                            (encoder: ReLU)
    stage 1/2:  e = conv f1 s2 (d1);  r = e + conv(e);  d2 = e + conv(r)
    stage 1/4:  e = conv f2 s2 (d2);  r = e + conv(e);  d4 = r + conv(r)
    stage 1/8:  e = conv f3 s2 (d4);  r = e + conv(e);  d8 = r + conv(r)
    stage 1/16: e = conv f4 s2 (d8);  d16 = e + conv(e)
    u8 = convT f3 (d16); u = conv f3 (concat(d8, u8)); u8 = u + conv(u)      (decoder: LeakyReLU)
    u4 = convT f2 (u8);  u = conv f1 (concat(d4, u4)); u4 = u + conv(u)
    u2 = convT f1 (u4);  m = conv N (conv f0 (concat(d2, u2)))              (no activation)

Transform (`VSVFTransform`, on the momentum grid ``s = S / 2``): the velocity ``v = K * m`` with the
multi-Gaussian smoother ``K`` (`tfreg.ops.fourier.multi_gaussian_multiplier`, periodic, sigmas in
unit-interval coordinates of each axis), ``v`` in those coordinates; the map starts at the given
initial map and is advected by `tfreg.ops.advection.advect_map` (RK4, fixed steps, unit time) in
voxels of the momentum grid (``v_vox,d = v_d (s_d - 1)``); the final map is upsampled linearly (corners
aligned) to the image grid.
"""
from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfreg.layers import conv_layer, resize
from tfreg.ops.advection import advect_map
from tfreg.ops.fourier import apply_symmetric_multiplier, multi_gaussian_multiplier

__all__ = ["MomentumNet", "VSVFTransform", "SIGMAS", "WEIGHTS", "DIVISOR"]

PREFIX = "avsm_momentum"
#: Multi-Gaussian smoother of the original: standard deviations (fractions of each axis), weights.
SIGMAS = (0.05, 0.10, 0.15, 0.20, 0.25)
WEIGHTS = tuple(w / 15.0 for w in (1, 2, 3, 4, 5))
#: Four stride-2 stages: the image shape must divide by 16.
DIVISOR = 16


class MomentumNet:
    """The momentum U-Net's layers (named ``avsm_momentum_*``); ``net(x)`` on a Keras tensor
    ``(B, *S, 2)`` returns the momentum ``(B, *S/2, N)``. Reused by every vSVF step."""

    def __init__(self, ndims: int, features=(16, 32, 64, 128, 256), init_std: float = 1e-3):
        f = [int(v) for v in features]
        if len(f) != 5 or min(f) < 1:
            raise ValueError(f"momentum features: expected 5 positive ints, got {features!r}")
        conv = conv_layer(ndims)
        convt = {2: keras.layers.Conv2DTranspose, 3: keras.layers.Conv3DTranspose}[ndims]
        self.ndims = ndims

        def c(filters, stride=1, act="relu", name="", **kw):
            return conv(filters, 3, strides=stride, padding="same", activation=act,
                        name=f"{PREFIX}_{name}", **kw)

        def t(filters, name):
            return convt(filters, 2, strides=2, padding="valid", activation="leaky_relu",
                         name=f"{PREFIX}_{name}")

        leaky = keras.activations.leaky_relu
        self.d1 = c(f[0], name="d1")
        self.enc = [(c(f[1], 2, name="d2_1"), c(f[1], name="d2_2"), c(f[1], name="d2_3")),
                    (c(f[2], 2, name="d4_1"), c(f[2], name="d4_2"), c(f[2], name="d4_3")),
                    (c(f[3], 2, name="d8_1"), c(f[3], name="d8_2"), c(f[3], name="d8_3"))]
        self.bottom = (c(f[4], 2, name="d16_1"), c(f[4], name="d16_2"))
        self.up8 = (t(f[3], "u8_1"), c(f[3], act=leaky, name="u8_2"), c(f[3], act=leaky, name="u8_3"))
        self.up4 = (t(f[2], "u4_1"), c(f[1], act=leaky, name="u4_2"), c(f[1], act=leaky, name="u4_3"))
        self.up2 = (t(f[1], "u2_1"), c(f[0], act=None, name="u2_2"))
        self.head = c(ndims, act=None, name="out",
                      kernel_initializer=keras.initializers.RandomNormal(stddev=init_std),
                      bias_initializer="zeros")
        # stateless merge layers, one per place in the graph (reused by every step)
        self.adds = [keras.layers.Add(name=f"{PREFIX}_add{i}") for i in range(9)]
        self.cats = [keras.layers.Concatenate(name=f"{PREFIX}_cat{i}") for i in range(3)]

    def _add(self, i, a, b):
        return self.adds[i]([a, b])

    def _cat(self, i, a, b):
        return self.cats[i]([a, b])

    def __call__(self, x):
        d1 = self.d1(x)
        (a1, a2, a3), (b1, b2, b3), (c1, c2, c3) = self.enc
        e = a1(d1)
        r = self._add(0, e, a2(e))
        d2 = self._add(1, e, a3(r))                  # the original adds the stage input here
        e = b1(d2)
        r = self._add(2, e, b2(e))
        d4 = self._add(3, r, b3(r))
        e = c1(d4)
        r = self._add(4, e, c2(e))
        d8 = self._add(5, r, c3(r))
        e = self.bottom[0](d8)
        d16 = self._add(6, e, self.bottom[1](e))
        u = self.up8[1](self._cat(0, d8, self.up8[0](d16)))
        u8 = self._add(7, u, self.up8[2](u))
        u = self.up4[1](self._cat(1, d4, self.up4[0](u8)))
        u4 = self._add(8, u, self.up4[2](u))
        u = self.up2[1](self._cat(2, d2, self.up2[0](u4)))
        return self.head(u)


@keras.saving.register_keras_serializable(package="tfreg_avsm")
class VSVFTransform(keras.layers.Layer):
    """``[momentum (B, *s, N), initial (B, *s, N)] -> {"velocity", "disp_low", "disp"}``.

    ``recompute=True``: the backward pass keeps only the advection's inputs and recomputes its RK4
    steps (`tf.recompute_grad`): same values and gradients, one step's RK4 intermediates in
    memory at a time instead of every step's.

    `initial` is the initial map's displacement on the momentum grid in its voxels; ``velocity`` is
    ``K * m`` in unit-interval coordinates; ``disp_low`` the advected map on the momentum grid (its
    voxels); ``disp`` the map upsampled to `image_shape` (voxels of the image grid, pull).
    """

    def __init__(self, image_shape, sigmas=SIGMAS, weights=WEIGHTS, steps: int = 10,
                 recompute: bool = False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.sigmas = tuple(float(s) for s in sigmas)
        self.sigma_weights = tuple(float(w) for w in weights)
        self.steps = int(steps)
        self.recompute = bool(recompute)

    def build(self, input_shape):
        low = tuple(int(s) for s in input_shape[0][1:-1])
        self.low_shape = low
        self.multiplier = multi_gaussian_multiplier(low, self.sigmas, self.sigma_weights).astype(np.float32)
        self.to_voxels = np.array([s - 1 for s in low], np.float32)
        self.to_image = np.array([(n - 1) / (s - 1) for n, s in zip(self.image_shape, low)],
                                 np.float32)
        self.built = True

    def call(self, inputs):
        momentum, initial = (tf.cast(x, tf.float32) for x in inputs)
        velocity = apply_symmetric_multiplier(momentum, self.multiplier)
        advect = lambda v, u: advect_map(v, u, steps=self.steps)   # noqa: E731
        if self.recompute:
            advect = tf.recompute_grad(advect)
        disp_low = advect(velocity * self.to_voxels, initial)
        disp = resize(disp_low * self.to_image, self.image_shape, align="corners")
        return {"velocity": velocity, "disp_low": disp_low, "disp": disp}

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape[0])
        return {"velocity": shape, "disp_low": shape,
                "disp": (shape[0], *self.image_shape, shape[-1])}

    def compute_output_spec(self, inputs):
        momentum = inputs[0]
        shapes = self.compute_output_shape([tuple(momentum.shape), tuple(inputs[1].shape)])
        return {k: keras.KerasTensor(v, dtype="float32") for k, v in shapes.items()}

    def get_config(self):
        return {**super().get_config(), "image_shape": list(self.image_shape),
                "sigmas": list(self.sigmas), "weights": list(self.sigma_weights), "steps": self.steps,
                "recompute": self.recompute}
