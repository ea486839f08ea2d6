"""Periodic Fourier-domain filtering of channels-last fields.

A *multiplier* is a real array over the half spectrum of a real FFT: for spatial shape `S = (S_0, ..,
S_{n-1})` its shape is `half_shape(S) = (S_0, .., S_{n-2}, S_{n-1} // 2 + 1)`. Filtering multiplies each
channel's spectrum by it, which is a periodic (circular) convolution in space. A *matrix multiplier*
has shape `half_shape(S) + (C, C)` and mixes channels per frequency (e.g. the inverse of a vector
differential operator). Works in 2D and 3D, float32 in and out, inside `tf.function(jit_compile=True)`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

_RFFT = {2: tf.signal.rfft2d, 3: tf.signal.rfft3d}
_IRFFT = {2: tf.signal.irfft2d, 3: tf.signal.irfft3d}


def half_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of the real-FFT half spectrum of a grid of `shape`."""
    shape = tuple(int(s) for s in shape)
    return shape[:-1] + (shape[-1] // 2 + 1,)


def wavenumbers(shape: Sequence[int]) -> list[np.ndarray]:
    """Integer wavenumbers `k_d` of each axis on the half spectrum, each broadcastable to
    `half_shape(shape)` (axis `d` varies along dimension `d`). The last axis holds `0..S//2`, the
    others the signed FFT order `0, 1, .., -1`."""
    shape = tuple(int(s) for s in shape)
    n = len(shape)
    out = []
    for d, s in enumerate(shape):
        k = np.arange(s // 2 + 1) if d == n - 1 else np.fft.fftfreq(s, 1.0 / s)
        view = [1] * n
        view[d] = k.size
        out.append(k.reshape(view).astype(np.float64))
    return out


def multiplier_from_kernel(kernel: np.ndarray) -> np.ndarray:
    """Half-spectrum multiplier of a real spatial kernel given on the full periodic grid with its
    centre at index 0 (use `np.fft.ifftshift` on a centred kernel). For a symmetric kernel the result
    is real; the real part is returned (float64)."""
    return np.real(np.fft.rfftn(np.asarray(kernel, np.float64)))


def _spatial_shape(x: tf.Tensor) -> tuple[int, ...]:
    shape = tuple(x.shape[1:-1])
    if len(shape) not in _RFFT or any(s is None for s in shape):
        raise ValueError(f"Fourier filtering needs a (batch, *spatial, channels) field with 2 or 3 "
                         f"static spatial axes, got shape {tuple(x.shape)}")
    return shape


def to_spectrum(x: tf.Tensor) -> tf.Tensor:
    """`(B, *S, C)` float → `(B, C, *half_shape(S))` complex64 spectrum of each channel."""
    x = tf.convert_to_tensor(x, tf.float32)
    ndims = len(_spatial_shape(x))
    perm = [0, ndims + 1] + list(range(1, ndims + 1))
    return _RFFT[ndims](tf.transpose(x, perm))


def from_spectrum(spectrum: tf.Tensor, shape: Sequence[int]) -> tf.Tensor:
    """Inverse of `to_spectrum`: `(B, C, *half_shape(S))` complex → `(B, *S, C)` float32."""
    shape = tuple(int(s) for s in shape)
    ndims = len(shape)
    x = _IRFFT[ndims](spectrum, fft_length=list(shape))
    perm = [0] + list(range(2, ndims + 2)) + [1]
    return tf.transpose(x, perm)


def apply_multiplier(x: tf.Tensor, multiplier) -> tf.Tensor:
    """Filter each channel of `x` `(B, *S, C)` by a real half-spectrum `multiplier`
    (`half_shape(S)`): a periodic convolution. Returns float32 `(B, *S, C)`."""
    x = tf.convert_to_tensor(x, tf.float32)
    shape = _spatial_shape(x)
    mult = tf.convert_to_tensor(np.asarray(multiplier) if not tf.is_tensor(multiplier) else multiplier,
                                tf.float32)
    if tuple(mult.shape) != half_shape(shape):
        raise ValueError(f"multiplier shape {tuple(mult.shape)} does not match the half spectrum "
                         f"{half_shape(shape)} of a field with spatial shape {shape}")
    spec = to_spectrum(x) * tf.complex(mult, tf.zeros_like(mult))
    return from_spectrum(spec, shape)


def apply_matrix_multiplier(x: tf.Tensor, matrix) -> tf.Tensor:
    """Mix the channels of `x` `(B, *S, C)` per frequency with a real or complex `matrix`
    `(*half_shape(S), C, C)`: `out_hat[k] = matrix[k] @ x_hat[k]`. Returns float32 `(B, *S, C)`."""
    x = tf.convert_to_tensor(x, tf.float32)
    shape = _spatial_shape(x)
    channels = int(x.shape[-1])
    mat = matrix if tf.is_tensor(matrix) else tf.convert_to_tensor(np.asarray(matrix))
    if tuple(mat.shape) != half_shape(shape) + (channels, channels):
        raise ValueError(f"matrix multiplier shape {tuple(mat.shape)} does not match "
                         f"{half_shape(shape) + (channels, channels)}")
    mat = tf.cast(mat, tf.complex64)
    ndims = len(shape)
    spec = to_spectrum(x)                                   # (B, C, *H)
    perm = [0] + list(range(2, ndims + 2)) + [1]
    spec = tf.transpose(spec, perm)                         # (B, *H, C)
    mixed = tf.einsum("...ij,b...j->b...i", mat, spec)
    back = [0, ndims + 1] + list(range(1, ndims + 1))
    return from_spectrum(tf.transpose(mixed, back), shape)


def gaussian_multiplier(shape: Sequence[int], sigma: float | Sequence[float],
                        spacing: float | Sequence[float] | None = None) -> np.ndarray:
    """Half-spectrum multiplier of a discrete periodic Gaussian normalised to sum 1.

    The kernel is sampled on the grid of `shape` at the periodic distance from voxel 0 (index
    ``i`` sits at ``min(i, S_d - i) * spacing_d``), ``exp(-sum_d x_d^2 / (2 sigma_d^2))``, and divided
    by its sum, so filtering keeps the mean of a field (multiplier 1 at frequency 0).

    Args:
        shape: spatial shape ``S`` (2 or 3 axes).
        sigma: standard deviation per axis (or one for all), in the units of `spacing`.
        spacing: grid spacing per axis; None = ``1 / (S_d - 1)``, i.e. `sigma` is a fraction of
            each axis (the unit-interval coordinates of the vSVF original).

    Returns:
        float64 array of shape `half_shape(shape)`.
    """
    shape = tuple(int(s) for s in shape)
    n = len(shape)
    if spacing is None:
        spacing = [1.0 / max(s - 1, 1) for s in shape]
    spacing = np.broadcast_to(np.asarray(spacing, np.float64), (n,))
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), (n,))
    if np.any(sigma <= 0):
        raise ValueError(f"`sigma` must be > 0. Received: sigma={tuple(sigma)}")
    kernel = np.ones(shape)
    for d, s in enumerate(shape):
        i = np.arange(s)
        dist = np.minimum(i, s - i) * spacing[d]
        view = [1] * n
        view[d] = s
        kernel = kernel * np.exp(-dist ** 2 / (2.0 * sigma[d] ** 2)).reshape(view)
    return multiplier_from_kernel(kernel / kernel.sum())


def multi_gaussian_multiplier(shape: Sequence[int], sigmas: Sequence[float],
                              weights: Sequence[float],
                              spacing: float | Sequence[float] | None = None) -> np.ndarray:
    """Weighted sum ``sum_i w_i G_sigma_i`` of normalised periodic Gaussians (`gaussian_multiplier`),
    e.g. the vSVF smoother: sigmas ``(0.05, 0.1, 0.15, 0.2, 0.25)`` of each axis, weights
    ``(1, 2, 3, 4, 5) / 15``. Weights are used as given (they sum to 1 for a mean-preserving filter).
    Returns a float64 multiplier of shape `half_shape(shape)`."""
    sigmas, weights = list(sigmas), [float(w) for w in weights]
    if not sigmas or len(sigmas) != len(weights):
        raise ValueError(f"`sigmas` and `weights` need the same non-zero length. Received: "
                         f"{len(sigmas)} sigmas, {len(weights)} weights")
    total = np.zeros(half_shape(shape))
    for sigma, weight in zip(sigmas, weights):
        total += weight * gaussian_multiplier(shape, sigma, spacing)
    return total
