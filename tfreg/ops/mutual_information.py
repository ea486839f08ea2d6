"""Mutual information from a differentiable Parzen-window joint histogram, in bounded memory.

Intensities of each image are mapped to bin coordinates ``t = (x - lo) / (hi - lo) * (bins - 1)``
(``lo``, ``hi`` the image's minimum and maximum unless a range is given; treated as constants for
the gradient). Each voxel contributes to every bin ``c`` the Parzen weight

    w_c(t) = exp(-(t - c)^2 / (2 sigma^2)) / sum_c' exp(-(t - c')^2 / (2 sigma^2))

(``sigma`` in bin widths, weights of a voxel summing to 1), and the joint histogram is the mean
over voxels of the outer product ``P = mean_x w(t_a(x)) w(t_b(x))^T``: a `(bins, bins)` matrix.
Normalised mutual information (Studholme et al., Pattern Recognition 32, 1999) is
``NMI = (H(A) + H(B)) / H(A, B)`` in ``[1, 2]`` with ``H = -sum p log p`` of the marginals and the
joint; mutual information is ``MI = H(A) + H(B) - H(A, B)``.

Memory: the voxels are processed in chunks of `chunk` voxels inside a `tf.while_loop` (forward)
and a `tf.map_fn` (backward, a custom gradient that recomputes the weights), so the working
memory is ``O(chunk * bins + bins^2)`` per image, independent of the number of voxels: with the
default chunk of 16384 voxels and 32 bins, a chunk's weights and derivatives take 8 MiB, whatever
the volume. At 160x192x224 (6.9 M voxels) the inputs and their gradients take 26 MiB each; the
dense alternatives would need ``voxels * bins`` = 0.84 GiB per image for the weights (autodiff
keeps them for the backward pass) or ``voxels * bins^2`` = 26 GiB for per-voxel joint
contributions (`benchmarks/bench_contrasts.py` measures the peak). Float32, 2D and 3D, usable
inside ``tf.function(jit_compile=True)``.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["joint_histogram", "entropies", "normalized_mutual_information",
           "mutual_information"]


def _bin_coordinates(x: tf.Tensor, bins: int, value_range: tuple[float, float] | None
                     ) -> tf.Tensor:
    """`(n, V)` intensities -> bin coordinates in ``[0, bins - 1]`` (clipped)."""
    if value_range is None:
        lo = tf.stop_gradient(tf.reduce_min(x, axis=1, keepdims=True))
        hi = tf.stop_gradient(tf.reduce_max(x, axis=1, keepdims=True))
    else:
        lo, hi = (tf.constant(float(v), tf.float32) for v in value_range)
    scale = (bins - 1) / tf.maximum(hi - lo, 1e-12)
    return tf.clip_by_value((x - lo) * scale, 0.0, float(bins - 1))


def _parzen(t: tf.Tensor, bins: int, sigma: float, derivative: bool = False):
    """Weights `(n, C, bins)` of bin coordinates `(n, C)`; with `derivative`, also ``dw/dt``."""
    centres = tf.range(bins, dtype=tf.float32)
    z = (t[..., None] - centres) / sigma
    # subtracting the largest logit keeps exp in range; the normalisation removes it again
    logits = -0.5 * tf.square(z)
    w = tf.nn.softmax(logits, axis=-1)
    if not derivative:
        return w
    g = -z / sigma  # d logit / d t
    dw = w * (g - tf.reduce_sum(w * g, axis=-1, keepdims=True))
    return w, dw


def joint_histogram(a: tf.Tensor, b: tf.Tensor, bins: int = 32, sigma: float = 0.5,
                    value_range: tuple[float, float] | None = None, chunk: int = 16384
                    ) -> tf.Tensor:
    """Parzen-window joint histogram of two images (see the module docstring).

    Args:
        a, b: `(batch, *spatial, 1)` (or any `(batch, ...)` of equal shapes) float images.
        bins: histogram bins per image. Defaults to 32.
        sigma: Parzen window standard deviation in bin widths. Defaults to 0.5.
        value_range: ``(lo, hi)`` intensity range of both images (values outside are clipped);
            None: each image's own minimum and maximum.
        chunk: voxels processed at once (memory ``O(chunk * bins)``). Defaults to 16384.

    Returns:
        `(batch, bins, bins)` float32 joint probabilities (rows: `a`, columns: `b`), each
        summing to 1; differentiable in `a` and `b`.
    """
    a = tf.cast(a, tf.float32)
    b = tf.cast(b, tf.float32)
    if not a.shape.is_compatible_with(b.shape):
        raise ValueError("`a` and `b` must have the same shape. Received: "
                         f"a.shape={tuple(a.shape)}, b.shape={tuple(b.shape)}")
    if not isinstance(bins, int) or bins < 2 or not sigma > 0 or chunk < 1:
        raise ValueError(f"`bins` must be an int >= 2, `sigma` > 0, `chunk` >= 1. Received: "
                         f"bins={bins!r}, sigma={sigma!r}, chunk={chunk!r}")
    shape = tf.shape(a)
    n = a.shape[0] if a.shape[0] is not None else shape[0]
    voxels = 1
    for s in a.shape[1:]:
        voxels *= int(s)
    chunk = min(int(chunk), voxels)
    count = -(-voxels // chunk)
    pad = count * chunk - voxels
    ta = _bin_coordinates(tf.reshape(a, (n, voxels)), bins, value_range)
    tb = _bin_coordinates(tf.reshape(b, (n, voxels)), bins, value_range)
    valid = tf.reshape(tf.pad(tf.ones((voxels,), tf.float32), [[0, pad]]), (count, 1, chunk, 1))

    def chunks(t: tf.Tensor) -> tf.Tensor:
        """`(n, V)` -> `(count, n, chunk)`."""
        t = tf.pad(t, [[0, 0], [0, pad]])
        return tf.transpose(tf.reshape(t, (n, count, chunk)), (1, 0, 2))

    @tf.custom_gradient
    def histogram(ta: tf.Tensor, tb: tf.Tensor):
        ca, cb = chunks(ta), chunks(tb)

        def body(k, joint):
            wa = _parzen(ca[k], bins, sigma) * valid[k]
            wb = _parzen(cb[k], bins, sigma)
            return k + 1, joint + tf.matmul(wa, wb, transpose_a=True)

        _, joint = tf.while_loop(lambda k, j: k < count, body,
                                 (tf.constant(0), tf.zeros((n, bins, bins), tf.float32)),
                                 maximum_iterations=count)
        joint = joint / float(voxels)

        def grad(upstream: tf.Tensor):
            upstream = tf.cast(upstream, tf.float32) / float(voxels)

            def one(k_chunks):
                xa, xb, mask = k_chunks
                wa, dwa = _parzen(xa, bins, sigma, derivative=True)
                wb, dwb = _parzen(xb, bins, sigma, derivative=True)
                # dL/dt_a(x) = sum_ij G_ij dwa_i wb_j; dL/dt_b(x) = sum_ij G_ij wa_i dwb_j
                ga = tf.reduce_sum(dwa * tf.matmul(wb, upstream, transpose_b=True), axis=-1)
                gb = tf.reduce_sum(dwb * tf.matmul(wa, upstream), axis=-1)
                return ga * mask[..., 0], gb * mask[..., 0]

            ga, gb = tf.map_fn(one, (ca, cb, valid), fn_output_signature=(tf.float32, tf.float32),
                               parallel_iterations=1)

            def unchunk(g: tf.Tensor) -> tf.Tensor:
                return tf.reshape(tf.transpose(g, (1, 0, 2)), (n, count * chunk))[:, :voxels]

            return unchunk(ga), unchunk(gb)

        return joint, grad

    # chain rule through the (clipped) intensity -> bin coordinate map
    return histogram(ta, tb)


def entropies(joint: tf.Tensor, eps: float = 1e-10) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(H(A), H(B), H(A, B))`` in nats, each `(batch,)`, of joint histograms `(batch, K, K)`."""
    def h(p: tf.Tensor, axes) -> tf.Tensor:
        return -tf.reduce_sum(p * tf.math.log(p + eps), axis=axes)

    return (h(tf.reduce_sum(joint, axis=2), 1), h(tf.reduce_sum(joint, axis=1), 1),
            h(joint, [1, 2]))


def normalized_mutual_information(a: tf.Tensor, b: tf.Tensor, bins: int = 32,
                                  sigma: float = 0.5,
                                  value_range: tuple[float, float] | None = None,
                                  chunk: int = 16384) -> tf.Tensor:
    """``NMI = (H(A) + H(B)) / H(A, B)`` per batch element, `(batch,)` float32 in ``[1, 2]``.

    Arguments as `joint_histogram`. Unchanged by any bijective map of one image's intensity levels
    that keeps its histogram bins apart (a permutation of the bins it fills).

    Example:
    >>> x = np.random.default_rng(0).random((1, 16, 16, 1)).astype("float32")
    >>> round(float(normalized_mutual_information(x, 1 - x)[0]), 2) > 1.5
    True
    """
    h_a, h_b, h_ab = entropies(joint_histogram(a, b, bins, sigma, value_range, chunk))
    return (h_a + h_b) / tf.maximum(h_ab, 1e-10)


def mutual_information(a: tf.Tensor, b: tf.Tensor, bins: int = 32, sigma: float = 0.5,
                       value_range: tuple[float, float] | None = None,
                       chunk: int = 16384) -> tf.Tensor:
    """``MI = H(A) + H(B) - H(A, B)`` in nats per batch element, `(batch,)` float32."""
    h_a, h_b, h_ab = entropies(joint_histogram(a, b, bins, sigma, value_range, chunk))
    return h_a + h_b - h_ab
