"""Quicksilver's patch network: two encoders (moving, fixed; not shared), three decoders (one per
momentum component), PReLU activations, optional dropout at the original's positions.

Shapes (3D, 15^3 patches, ``features`` F = 64): each encoder has two blocks,
``conv3 -> PReLU -> conv3 -> PReLU -> conv3 -> PReLU -> conv(k2, s2, pad 1) -> PReLU`` with F then
2F channels (15 -> 8 -> 5); the two encodings are concatenated (4F channels); each decoder has two
blocks, ``convT(k2, s2, pad 1) -> PReLU -> conv3 -> PReLU -> conv3 -> PReLU -> conv3`` to 2F
channels (+ PReLU), then ``convT(k3, s2, pad 1)`` back to 15 and the same convolutions down to one
channel with no activation (5 -> 8 -> 15). 2D works the same way with 2D convolutions and two
decoders.

Dropout (probabilistic variant, p = 0.2): in the encoders after the first three PReLUs (not
after the pooling convolution's), in the decoders after the two PReLUs following the unpooling
and after the intermediate output PReLU. PReLU has one slope per layer, initialised at 0.25
(PyTorch's ``nn.PReLU()``). **Deviation**: the last convolution of each decoder starts with
weights of standard deviation 1e-5 (the original: PyTorch's default), so an untrained network
predicts about zero momentum, the identity; optimised momenta are small (about 1e-3 for a
velocity of one voxel with the default operator) and a default-initialised output of about 0.1
would take many steps to unlearn.
"""
from __future__ import annotations

import keras

from tfreg.layers import conv_layer

__all__ = ["build_network", "PATCH"]

#: patch edge length the network is built for (15 -> 8 -> 5 -> 8 -> 15).
PATCH = 15


def _layers(ndims: int):
    return (conv_layer(ndims),
            {2: keras.layers.Conv2DTranspose, 3: keras.layers.Conv3DTranspose}[ndims],
            {2: keras.layers.ZeroPadding2D, 3: keras.layers.ZeroPadding3D}[ndims],
            {2: keras.layers.Cropping2D, 3: keras.layers.Cropping3D}[ndims])


def _prelu(ndims: int, name: str):
    return keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25),
                              shared_axes=list(range(1, ndims + 2)), name=name)


def _encoder_block(x, features: int, ndims: int, dropout: float, name: str):
    conv, _, pad, _ = _layers(ndims)
    for i in range(3):
        x = conv(features, 3, padding="same", name=f"{name}_conv{i}")(x)
        x = _prelu(ndims, f"{name}_prelu{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"{name}_drop{i}")(x)
    x = pad(1, name=f"{name}_pad")(x)
    x = conv(features, 2, strides=2, padding="valid", name=f"{name}_pool")(x)
    return _prelu(ndims, f"{name}_prelu_pool")(x)


def _decoder_block(x, features_in: int, features_out: int, kernel: int, ndims: int,
                   dropout: float, name: str):
    conv, convt, _, crop = _layers(ndims)
    x = convt(features_in, kernel, strides=2, padding="valid", name=f"{name}_unpool")(x)
    x = crop(1, name=f"{name}_crop")(x)
    x = _prelu(ndims, f"{name}_prelu_unpool")(x)
    for i in range(2):
        x = conv(features_in, 3, padding="same", name=f"{name}_conv{i}")(x)
        x = _prelu(ndims, f"{name}_prelu{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"{name}_drop{i}")(x)
    if features_out == 1:   # a momentum component: starts near zero (the identity)
        small = keras.initializers.RandomNormal(stddev=1e-5)
        return conv(1, 3, padding="same", name=f"{name}_out", kernel_initializer=small,
                    bias_initializer="zeros")(x)
    x = conv(features_out, 3, padding="same", name=f"{name}_out")(x)
    x = _prelu(ndims, f"{name}_prelu_out")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name=f"{name}_drop_out")(x)
    return x


def build_network(ndims: int = 3, features: int = 64, dropout: float = 0.0,
                  patch: int = PATCH, scale: float = 1.0, name: str = "quicksilver"
                  ) -> keras.Model:
    """Patch network ``{"moving", "fixed"}`` `(B, *P, 1)` -> ``{"momentum"}`` `(B, *P, N)`.

    Args:
        ndims: 2 or 3.
        features: F of the first encoder block (the original: 64).
        dropout: 0 for the deterministic networks, 0.2 for the probabilistic variant (sampled
            at test time by calling the model with ``training=True``).
        patch: patch edge length (15 in the original; other sizes must map back to themselves
            through the two poolings, e.g. 7 or 31).
        scale: the output is multiplied by this (1 in the original): the network's own output
            is then the momentum in units of `scale`.
    """
    if ndims not in (2, 3):
        raise ValueError(f"ndims must be 2 or 3, got {ndims}")
    shape = (patch,) * ndims + (1,)
    moving = keras.Input(shape, name="moving")
    fixed = keras.Input(shape, name="fixed")
    codes = []
    for tag, image in (("moving", moving), ("fixed", fixed)):
        x = _encoder_block(image, features, ndims, dropout, f"enc_{tag}_1")
        codes.append(_encoder_block(x, 2 * features, ndims, dropout, f"enc_{tag}_2"))
    joint = keras.layers.Concatenate(name="joint")(codes)
    components = []
    for d in range(ndims):
        x = _decoder_block(joint, 4 * features, 2 * features, 2, ndims, dropout, f"dec_{d}_1")
        components.append(_decoder_block(x, 2 * features, 1, 3, ndims, dropout, f"dec_{d}_2"))
    momentum = keras.layers.Concatenate(name="components")(components)
    if scale != 1.0:
        momentum = keras.layers.Rescaling(scale, name="momentum_scale")(momentum)
    return keras.Model({"moving": moving, "fixed": fixed}, {"momentum": momentum}, name=name)
