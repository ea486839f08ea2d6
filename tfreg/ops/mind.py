"""MIND-SSC: modality-independent neighbourhood descriptors with self-similarity context.

Heinrich et al., "MIND: Modality independent neighbourhood descriptor for multi-modal deformable
registration", Medical Image Analysis 16 (2012), and the self-similarity-context variant of
Heinrich et al., MICCAI 2013. For an image ``I`` the descriptor compares *pairs of neighbours* of
each voxel rather than the voxel with its neighbours:

* the six-neighbourhood ``{+-e_0, +-e_1, +-e_2}`` (four in 2D), scaled by `dilation` voxels;
* its pairs at distance ``sqrt(2) * dilation``: ``(s e_i, t e_j)`` for ``i < j``, ``s, t = +-1``
  (12 pairs in 3D, 4 in 2D), in the order of `ssc_pairs`;
* for pair ``k = (a, b)``: the Gaussian-weighted patch distance
  ``D_k(x) = sum_p G_sigma(p) (I(x + p + a) - I(x + p + b))^2``;
* normalisation: ``D'_k = D_k - min_k D_k``, local variance estimate ``V(x) = mean_k D'_k(x)``,
  clamped to ``[1e-3, 1e3] * mean_x V`` (per image), and ``MIND_k(x) = exp(-D'_k(x) / V(x))``,
  so each voxel's largest entry is 1.

Boundaries: outside the volume the nearest border voxel is repeated (shifts and the Gaussian
filter alike). The descriptor is unchanged by ``I -> alpha I + beta`` for any ``alpha != 0``
(an inversion included), up to the absolute floor ``1e-12`` of ``V``; other monotone intensity
maps change it only where they bend within a patch. Float32, 2D and 3D, differentiable, usable
inside ``tf.function(jit_compile=True)``.
"""

from __future__ import annotations

import itertools

import numpy as np
import tensorflow as tf

from tfreg.ops.filters import edge_pad, shifted

__all__ = ["ssc_pairs", "gaussian_kernel", "mind_ssc", "mind_distance"]


def ssc_pairs(ndims: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The neighbour pairs ``(a, b)`` of MIND-SSC (unit offsets; 12 in 3D, 4 in 2D).

    Example:
    >>> len(ssc_pairs(3)), ssc_pairs(2)[0]
    (12, ((-1, 0), (0, -1)))
    """
    if ndims not in (2, 3):
        raise ValueError(f"`ndims` must be 2 or 3. Received: ndims={ndims}")
    pairs = []
    for i, j in itertools.combinations(range(ndims), 2):
        for s, t in itertools.product((-1, 1), repeat=2):
            a = [0] * ndims
            b = [0] * ndims
            a[i], b[j] = s, t
            pairs.append((tuple(a), tuple(b)))
    return pairs


def gaussian_kernel(sigma: float, truncate: float = 2.0) -> np.ndarray:
    """Normalised 1D Gaussian, radius ``int(truncate * sigma + 0.5)`` (SciPy's rule), float32."""
    radius = max(1, int(truncate * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def _gaussian_filter(x: tf.Tensor, sigma: float, truncate: float) -> tf.Tensor:
    """Separable Gaussian filter of each channel of `(B, *S, C)`, nearest-border padding.

    Each axis is a weighted sum of shifted slices (no convolution op): cheap to differentiate and
    to compile with XLA, where the gradient of a 3D convolution is slow on CPU.
    """
    kernel = gaussian_kernel(sigma, truncate)
    radius = (kernel.size - 1) // 2
    ndims = len(x.shape) - 2
    for d in range(ndims):
        axis = d + 1
        n = x.shape[axis]
        padded = edge_pad(x, axis, radius, radius)
        index = [slice(None)] * (ndims + 2)
        out = None
        for i, weight in enumerate(kernel):
            index[axis] = slice(i, i + n)
            term = float(weight) * padded[tuple(index)]
            out = term if out is None else out + term
        x = out
    return x


def mind_ssc(image: tf.Tensor, sigma: float = 0.8, dilation: int = 2,
             truncate: float = 2.0) -> tf.Tensor:
    """MIND-SSC descriptor of an image (see the module docstring).

    Args:
        image: `(batch, *spatial, 1)`, 2 or 3 spatial axes (a multi-channel image is averaged
            over its channels first).
        sigma: Gaussian patch weight, voxels. Defaults to 0.8.
        dilation: distance of the neighbours from the centre, voxels. Defaults to 2.
        truncate: the Gaussian is cut at ``truncate * sigma`` voxels. Defaults to 2.

    Returns:
        `(batch, *spatial, K)` float32 in ``(0, 1]``, ``K = 12`` (3D) or ``4`` (2D).

    Example:
    >>> mind_ssc(np.random.default_rng(0).random((1, 16, 16, 1)).astype("float32")).shape
    TensorShape([1, 16, 16, 4])
    """
    x = tf.cast(image, tf.float32)
    ndims = len(x.shape) - 2
    if ndims not in (2, 3):
        raise ValueError("`image` must have shape (batch, *spatial, channels) with 2 or 3 spatial "
                         f"axes. Received: image.shape={tuple(x.shape)}")
    if not sigma > 0 or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"`sigma` must be > 0 and `dilation` an int >= 1. Received: "
                         f"sigma={sigma!r}, dilation={dilation!r}")
    if x.shape[-1] != 1:
        x = tf.reduce_mean(x, axis=-1, keepdims=True)
    padded = x
    for d in range(ndims):
        padded = edge_pad(padded, d + 1, dilation, dilation)
    diffs = []
    for a, b in ssc_pairs(ndims):
        sa = shifted(padded, tuple(dilation * v for v in a), dilation)
        sb = shifted(padded, tuple(dilation * v for v in b), dilation)
        diffs.append(tf.square(sa - sb))
    dist = _gaussian_filter(tf.concat(diffs, axis=-1), sigma, truncate)
    dist = dist - tf.reduce_min(dist, axis=-1, keepdims=True)
    var = tf.reduce_mean(dist, axis=-1, keepdims=True)
    axes = list(range(1, ndims + 2))
    mean_var = tf.reduce_mean(var, axis=axes, keepdims=True)
    var = tf.clip_by_value(var, 1e-3 * mean_var, 1e3 * mean_var)
    return tf.exp(-dist / tf.maximum(var, 1e-12))


def mind_distance(fixed_desc: tf.Tensor, warped_desc: tf.Tensor, penalty: str = "l2"
                  ) -> tf.Tensor:
    """Per-voxel distance between descriptors, averaged over their channels.

    Args:
        fixed_desc, warped_desc: `(batch, *spatial, K)` from `mind_ssc`.
        penalty: ``"l1"`` (mean absolute) or ``"l2"`` (mean squared difference).

    Returns:
        `(batch, *spatial, 1)` float32.
    """
    if penalty not in ("l1", "l2"):
        raise ValueError(f"`penalty` must be 'l1' or 'l2'. Received: penalty={penalty!r}")
    diff = tf.cast(fixed_desc, tf.float32) - tf.cast(warped_desc, tf.float32)
    per = tf.abs(diff) if penalty == "l1" else tf.square(diff)
    return tf.reduce_mean(per, axis=-1, keepdims=True)

