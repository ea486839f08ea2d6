"""Training losses for registration: image similarity, field regularisers and soft Dice.

Thin loss classes over `tfreg.ops` (`similarity`, `differences`, `filters`): the classes hold the
options, the mathematics lives in the ops.

Every loss is a callable ``loss(y_true, y_pred) -> scalar float32 tensor``; lower is better.
Inputs are channels-last ``(batch, *spatial, channels)``, 2D or 3D, and are cast to float32 first,
so the losses stay in float32 under a ``mixed_float16`` policy. All losses work eagerly, inside
``tf.function`` and inside ``tf.function(jit_compile=True)``, and are differentiable.

Summary (``N`` = spatial rank, ``C`` = channels, means run over the batch too):

=================  ============================================================================
``NCC``            local (windowed) normalised cross-correlation, voxelmorph's definition by
                   default: ``-mean(cc)`` with ``cc = cross^2 / (var_I * var_J)`` (squared).
``MultiResolutionNCC``  weighted sum of ``NCC`` on successively average-pooled images (LapIRN).
``GlobalNCC``      ``-mean_batch(pearson(I, J))`` over the whole volume.
``MKLNCC``         multi-kernel local NCC, ``sum_k w_k (1 - mean(cc_k))`` over strided, dilated
                   windows sized from the image (vSVF's similarity; `tfreg.ops.mk_lncc`).
``MSE``            ``mean((I - J)^2) / sigma^2``.
``Grad``           mean forward-difference ``|du|`` (l1) or ``du^2`` (l2), averaged over axes.
``BendingEnergy``  mean over voxels and components of the squared Frobenius norm of the Hessian.
``Dice``           ``-mean`` soft Dice over batch and one-hot channels.
``MIND``           mean L1/L2 distance of MIND-SSC descriptors (`tfreg.ops.mind`), any contrasts.
``NMI``            ``-mean_batch NMI`` from a Parzen-window joint histogram
                   (`tfreg.ops.mutual_information`), any contrasts.
``LabelLoss``      soft Dice or MSE between one-hot fixed labels and warped one-hot moving labels.
``KL``             KL divergence of a Gaussian velocity posterior from the Laplacian smoothness
                   prior (probabilistic diffeomorphic VoxelMorph).
=================  ============================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tfreg.ops import mk_lncc as _mk_lncc
from tfreg.ops import similarity as _sim
from tfreg.ops._checks import ndims_of as _ndims
from tfreg.ops._checks import window as _window_of
from tfreg.ops.differences import forward_differences
from tfreg.ops.filters import box_sum
from tfreg.ops.filters import pool_half as avg_pool_half

__all__ = [
    "NCC",
    "MultiResolutionNCC",
    "GlobalNCC",
    "MKLNCC",
    "MSE",
    "Grad",
    "BendingEnergy",
    "Dice",
    "MIND",
    "NMI",
    "LabelLoss",
    "KL",
    "degree_map",
    "one_hot",
    "box_sum",
    "avg_pool_half",
]


def _f32(x) -> tf.Tensor:
    """Cast to float32 (losses never run in float16)."""
    return tf.cast(x, tf.float32)


def _pair(y_true, y_pred) -> tuple[tf.Tensor, tf.Tensor]:
    """Both inputs as float32, with a clear error if their (static) shapes differ."""
    return _sim._pair(y_true, y_pred)


def _check_window(win) -> None:
    _window_of(win, 1 if isinstance(win, (int, np.integer)) else len(tuple(win)))


class NCC:
    """Local normalised cross-correlation over a sliding window.

    For each voxel ``p`` the window sums ``S_I, S_J, S_II, S_JJ, S_IJ`` over the ``n`` voxels of the
    box centred at ``p`` (zero padding outside the volume, so ``n`` is the full window size
    everywhere; channels are summed into the same window, so ``n = prod(win) * channels``) give::

        cross = S_IJ - S_I S_J / n,   var_I = S_II - S_I^2 / n,   var_J = S_JJ - S_J^2 / n

    With the defaults (``squared=True, eps_mode="clamp"``) this is exactly voxelmorph's ``NCC``:
    ``cross``, ``var_I``, ``var_J`` are each clamped to ``>= eps`` and
    ``cc = (cross / var_I) * (cross / var_J)``, the *squared* local correlation, in ``[0, 1]``; negative
    correlation is clamped to about 0, so anti-correlated structures are not rewarded.
    The loss is ``-mean(cc)`` over voxels and batch (−1 for a perfect local linear match).

    Options:
        - ``squared=False``: signed correlation ``cc = cross / sqrt(var_I * var_J)`` (``cross`` not
          clamped), in ``[-1, 1]``.
        - ``eps_mode="add"``: variances only clamped to ``>= 0``; ``eps`` is added to the denominator:
          ``cross^2 / (var_I var_J + eps)`` (LapIRN's form), or ``cross / sqrt(var_I var_J + eps)``
          (instance optimisation's, and the similarity `tfreg register` reports).
        - ``contrast_floor > 0``: the mean over voxels is weighted by the fixed image's window
          contrast ``var_I / (var_I + n floor^2)`` (`tfreg.ops.similarity.contrast_weights`), so
          flat windows count little.

    The mathematics is `tfreg.ops.similarity.local_ncc`; this class holds the options.

    Args:
        win: window size in voxels, an int (all axes) or one int per spatial axis. Defaults to 9.
        squared: squared (default, voxelmorph) or signed correlation.
        eps: stabiliser. Defaults to 1e-5.
        eps_mode: ``"clamp"`` (voxelmorph, default) or ``"add"``.
        contrast_floor: intensity standard deviation below which windows count little; 0
            (default) = plain mean.

    Input shape:
        ``y_true``, ``y_pred``: `(batch, *spatial, channels)`, 2 or 3 spatial axes.
    Returns:
        Scalar float32 tensor.

    Example:
    >>> x = np.random.default_rng(0).random((1, 16, 16, 1)).astype("float32")
    >>> round(float(NCC(win=5)(x, 2 * x)), 4)
    -1.0
    """

    def __init__(self, win: int | Sequence[int] = 9, squared: bool = True, eps: float = 1e-5,
                 eps_mode: str = "clamp", contrast_floor: float = 0.0):
        _check_window(win)
        if not eps > 0:
            raise ValueError(f"`eps` must be > 0. Received: eps={eps!r}")
        if eps_mode not in ("clamp", "add"):
            raise ValueError(f"`eps_mode` must be 'clamp' or 'add'. Received: eps_mode={eps_mode!r}")
        if isinstance(contrast_floor, bool) or not contrast_floor >= 0:
            raise ValueError(f"`contrast_floor` must be >= 0. Received: contrast_floor={contrast_floor!r}")
        self.win = win
        self.squared = bool(squared)
        self.eps = float(eps)
        self.eps_mode = eps_mode
        self.contrast_floor = float(contrast_floor)

    def local_cc(self, y_true, y_pred) -> tf.Tensor:
        """Per-voxel correlation map `(batch, *spatial, 1)` (squared or signed, see class doc)."""
        return _sim.local_ncc_map(y_true, y_pred, self.win, squared=self.squared, eps=self.eps,
                                  eps_mode=self.eps_mode)[0]

    def similarity(self, y_true, y_pred, fixed_stats: tf.Tensor | None = None) -> tf.Tensor:
        """Mean (or contrast-weighted mean) local correlation, higher is better: ``-loss``.
        `fixed_stats`: `fixed_stats` of `y_true` (the same value, computed once for many calls)."""
        return _sim.local_ncc(y_true, y_pred, self.win, squared=self.squared, eps=self.eps,
                              eps_mode=self.eps_mode, contrast_floor=self.contrast_floor,
                              fixed_stats=fixed_stats)

    def fixed_stats(self, y_true) -> tf.Tensor:
        """What `similarity` needs of `y_true` alone (`tfreg.ops.similarity.fixed_window_stats`
        with this window), to pass to it when `y_true` stays the same over many calls."""
        return _sim.fixed_window_stats(y_true, self.win)

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        return -self.similarity(y_true, y_pred)

    def get_config(self) -> dict:
        return {"win": self.win, "squared": self.squared, "eps": self.eps, "eps_mode": self.eps_mode,
                "contrast_floor": self.contrast_floor}

    def __repr__(self) -> str:
        return f"NCC({', '.join(f'{k}={v!r}' for k, v in self.get_config().items())})"


class MultiResolutionNCC:
    """Weighted sum of local NCC losses over an image pyramid (LapIRN's multi-resolution NCC).

    Scale ``s`` (``s = 0, 1, ...``) evaluates ``NCC(win=wins[s])`` on both images average-pooled
    ``s`` times by :func:`avg_pool_half` (kernel 3, stride 2, padding not counted), and the loss is
    ``sum_s weights[s] * NCC_s``. LapIRN's finest level uses ``wins=(7, 5, 3)``,
    ``weights=(1, 1/2, 1/4)`` with ``NCC(squared=True, eps_mode="add")``.

    Args:
        wins: window size per scale (each an int or one int per axis). Defaults to (7, 5, 3).
        weights: weight per scale; defaults to ``2**-s``.
        squared, eps, eps_mode: passed to every :class:`NCC`.

    Returns:
        Scalar float32 tensor.
    """

    def __init__(self, wins: Sequence[int | Sequence[int]] = (7, 5, 3),
                 weights: Sequence[float] | None = None, squared: bool = True, eps: float = 1e-5,
                 eps_mode: str = "clamp"):
        wins = list(wins)
        if not wins:
            raise ValueError("`wins` must name at least one window. Received: wins=[]")
        if weights is None:
            weights = [2.0 ** -s for s in range(len(wins))]
        weights = [float(w) for w in weights]
        if len(weights) != len(wins):
            raise ValueError(f"`weights` needs one value per window ({len(wins)}). Received: weights={weights}")
        self.wins = wins
        self.weights = weights
        self.terms = [NCC(win=w, squared=squared, eps=eps, eps_mode=eps_mode) for w in wins]

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        i, j = _pair(y_true, y_pred)
        total = tf.constant(0.0, "float32")
        for s, (term, weight) in enumerate(zip(self.terms, self.weights)):
            if s > 0:
                i, j = avg_pool_half(i), avg_pool_half(j)
            total = total + weight * term(i, j)
        return total


class GlobalNCC:
    """Global normalised cross-correlation (Pearson's r over the whole volume, per sample).

    ``r_b = cov(I_b, J_b) / sqrt((var(I_b) + eps) (var(J_b) + eps))`` over all voxels and channels of
    sample ``b`` (population moments); the loss is ``-mean_b r_b`` (−1 for ``J = a I + c``, ``a > 0``).
    Recursive cascaded networks minimise ``1 - r`` (the same up to a constant).

    Args:
        eps: added to each variance. Defaults to 1e-6.

    Returns:
        Scalar float32 tensor.
    """

    def __init__(self, eps: float = 1e-6):
        if not eps >= 0:
            raise ValueError(f"`eps` must be >= 0. Received: eps={eps!r}")
        self.eps = float(eps)

    def correlation(self, y_true, y_pred) -> tf.Tensor:
        """Pearson correlation per sample, `(batch,)`."""
        return _sim.global_ncc(y_true, y_pred, self.eps)

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        return -tf.reduce_mean(self.correlation(y_true, y_pred))


class MKLNCC:
    """Multi-kernel local NCC (`tfreg.ops.mk_lncc`): ``sum_k w_k (1 - mean(cross^2 / (var_I var_J
    + eps)))`` over windows of ``k`` taps per axis, spaced by a dilation and evaluated at a stride of
    ``max(int((k + 1) / 4), 1)`` voxels, inside the volume only. 0 for a perfect local match.

    Args:
        fractions: window sizes as fractions of the smallest spatial size; None = the automatic
            rule of the vSVF original (``S >= 128``: 1/16, 1/8, 1/4 with weights .1, .3, .6 and
            dilation 2; ``64 <= S < 128``: 1/4, 1/2 with .3, .7 and dilation 2; else 1/2, dilation 1).
        weights: one per fraction (required with `fractions`).
        dilation: tap spacing (with `fractions`), an int or one per window.
        eps: added to ``var_I var_J``. Defaults to 1e-5.

    Returns:
        Scalar float32 tensor.
    """

    def __init__(self, fractions: Sequence[float] | None = None,
                 weights: Sequence[float] | None = None, dilation: int | Sequence[int] = 1,
                 eps: float = 1e-5):
        if (fractions is None) != (weights is None):
            raise ValueError("`fractions` and `weights` go together (or neither, for the automatic "
                             f"windows). Received: fractions={fractions!r}, weights={weights!r}")
        if fractions is not None and (not list(fractions) or any(not 0 < f <= 1 for f in fractions)):
            raise ValueError(f"`fractions` must be in (0, 1]. Received: fractions={fractions!r}")
        if not eps > 0:
            raise ValueError(f"`eps` must be > 0. Received: eps={eps!r}")
        self.fractions = None if fractions is None else tuple(float(f) for f in fractions)
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.dilation = dilation
        self.eps = float(eps)

    def windows(self, shape: Sequence[int]):
        """The `tfreg.ops.mk_lncc.LNCCWindows` used for an image of spatial `shape`."""
        if self.fractions is None:
            return _mk_lncc.auto_windows(shape)
        return _mk_lncc.windows_from_fractions(shape, self.fractions, self.weights, self.dilation)

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        i, j = _pair(y_true, y_pred)
        _ndims(j, "y_pred")
        return _mk_lncc.mk_lncc(i, j, self.windows(tuple(j.shape[1:-1])), eps=self.eps)


class MSE:
    """Mean squared error scaled by the image noise: ``mean((y_true - y_pred)^2) / sigma^2``.

    Args:
        sigma: image noise standard deviation (voxelmorph's ``image_sigma``). Defaults to 1.

    Returns:
        Scalar float32 tensor (mean over batch, voxels and channels).
    """

    def __init__(self, sigma: float = 1.0):
        if not sigma > 0:
            raise ValueError(f"`sigma` must be > 0. Received: sigma={sigma!r}")
        self.sigma = float(sigma)

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        return _sim.mse(y_true, y_pred) / (self.sigma ** 2)


class Grad:
    """Smoothness of a field by forward differences (voxelmorph's ``Grad``).

    For each spatial axis ``d``: ``D_d = u[.., x+1 along d, ..] - u[.., x, ..]`` (all channels), and the
    loss is ``loss_mult * (1/N) * sum_d mean(|D_d|)`` (``penalty="l1"``) or ``mean(D_d^2)`` (``"l2"``).
    Each mean runs over its own difference array (one voxel shorter along ``d``), batch included.

    Args:
        penalty: ``"l1"`` (default, as voxelmorph) or ``"l2"``.
        loss_mult: factor applied to the result (voxelmorph scales by the integration downsampling,
            e.g. 2 for a half-resolution velocity field). Defaults to 1.

    Input shape:
        ``y_pred``: `(batch, *spatial, channels)` field; ``y_true`` is ignored.
    Returns:
        Scalar float32 tensor.
    """

    def __init__(self, penalty: str = "l1", loss_mult: float = 1.0):
        if penalty not in ("l1", "l2"):
            raise ValueError(f"`penalty` must be 'l1' or 'l2'. Received: penalty={penalty!r}")
        self.penalty = penalty
        self.loss_mult = float(loss_mult)

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        u = _f32(y_pred)
        ndims = _ndims(u, "y_pred")
        terms = [tf.reduce_mean(tf.abs(diff) if self.penalty == "l1" else diff * diff)
                 for diff in forward_differences(u)]
        return tf.add_n(terms) / float(ndims) * self.loss_mult


class BendingEnergy:
    """Bending energy of a field: mean squared second derivatives (thin-plate energy density).

    Per voxel and field component ``c``::

        BE = sum_i (d2u_c/dx_i^2)^2 + 2 * sum_{i<j} (d2u_c/dx_i dx_j)^2

    (the squared Frobenius norm of the Hessian; the mixed terms appear twice, hence the factor 2),
    averaged over the interior voxels (one voxel cropped on every side), the components and the batch.
    Derivatives are central differences in voxel units: ``u(x+e_i) - 2u(x) + u(x-e_i)`` and
    ``(u(x+e_i+e_j) - u(x+e_i-e_j) - u(x-e_i+e_j) + u(x-e_i-e_j)) / 4``, exact for quadratic fields.

    Input shape:
        ``y_pred``: `(batch, *spatial, channels)` field, every spatial size >= 3; ``y_true`` is ignored.
    Returns:
        Scalar float32 tensor (units: voxel^-2 times the field's unit squared).
    """

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        u = _f32(y_pred)
        ndims = _ndims(u, "y_pred")
        shape = u.shape[1:-1]
        if any(s is not None and s < 3 for s in shape):
            raise ValueError(f"BendingEnergy needs every spatial size >= 3. Received: shape={tuple(u.shape)}")

        def crop(offsets):
            # u shifted by `offsets` (each -1, 0 or +1) on the interior grid
            idx = [slice(None)]
            for o, n in zip(offsets, shape):
                idx.append(slice(1 + o, n - 1 + o))
            idx.append(slice(None))
            return u[tuple(idx)]

        energy = 0.0
        zero = [0] * ndims
        centre = crop(zero)
        for i in range(ndims):
            plus, minus = list(zero), list(zero)
            plus[i], minus[i] = 1, -1
            d2 = crop(plus) - 2.0 * centre + crop(minus)
            energy = energy + d2 * d2
            for j in range(i + 1, ndims):
                pp, pm, mp, mm = (list(zero) for _ in range(4))
                pp[i], pp[j] = 1, 1
                pm[i], pm[j] = 1, -1
                mp[i], mp[j] = -1, 1
                mm[i], mm[j] = -1, -1
                dij = (crop(pp) - crop(pm) - crop(mp) + crop(mm)) / 4.0
                energy = energy + 2.0 * dij * dij
        return tf.reduce_mean(energy)


class Dice:
    """Soft multi-label Dice, negated (voxelmorph's ``Dice``).

    ``dice_{b,k} = 2 sum(t p) / sum(t + p)`` over the spatial axes for sample ``b`` and channel ``k``
    (0 where the denominator is 0); the loss is ``-mean_{b,k} dice_{b,k}``. Every channel counts,
    background included if it is one of them.

    Input shape:
        ``y_true``, ``y_pred``: `(batch, *spatial, K)` one-hot or probabilities (see :func:`one_hot`).
    Returns:
        Scalar float32 tensor in ``[-1, 0]``.
    """

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        t, p = _pair(y_true, y_pred)
        ndims = _ndims(p, "y_pred")
        axes = list(range(1, ndims + 1))
        top = 2.0 * tf.reduce_sum(t * p, axis=axes)
        bottom = tf.reduce_sum(t + p, axis=axes)
        return -tf.reduce_mean(tf.math.divide_no_nan(top, bottom))


def one_hot(labels, label_values: int | Sequence[int]) -> tf.Tensor:
    """One-hot encode an integer label map with arbitrary (non-contiguous) label values.

    Args:
        labels: `(batch, *spatial, 1)` integer label map (a float map holding integers is rounded).
        label_values: the label values, one output channel each in this order, or an int ``K``
            meaning ``range(K)``. Voxels whose label is not listed are all-zero.

    Returns:
        `(batch, *spatial, K)` float32.

    Example:
    >>> one_hot(np.array([[[4], [0], [7]]]), [0, 4, 7]).numpy()[0].tolist()
    [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """
    if isinstance(label_values, (int, np.integer)):
        if label_values < 1:
            raise ValueError(f"`label_values` must be >= 1 as a count. Received: label_values={label_values}")
        values = list(range(int(label_values)))
    else:
        values = [int(v) for v in label_values]
        if not values:
            raise ValueError("`label_values` must not be empty.")
        if len(set(values)) != len(values):
            raise ValueError(f"`label_values` has duplicates. Received: label_values={values}")
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank is not None and labels.shape[-1] != 1:
        raise ValueError(f"`labels` must end in a channel axis of size 1. Received: shape={tuple(labels.shape)}")
    if labels.dtype.is_floating:
        labels = tf.round(labels)
    labels = tf.cast(labels, "int32")
    return tf.cast(tf.equal(labels, tf.constant(values, "int32")), "float32")


class MIND:
    """Distance between MIND-SSC descriptors: a similarity for images of different contrasts.

    ``mean_x mean_k |MIND_k(I)(x) - MIND_k(J)(x)|^p`` with ``p = 1`` (``"l1"``) or ``2``
    (``"l2"``); the descriptor (`tfreg.ops.mind.mind_ssc`) compares each voxel's neighbourhood
    with itself, so it does not change when an image's intensities are scaled, shifted or
    inverted. 0 for identical descriptors.

    Args:
        sigma: Gaussian patch weight of the descriptor, voxels. Defaults to 0.8.
        dilation: neighbour distance, voxels. Defaults to 2.
        penalty: ``"l1"`` or ``"l2"`` (default).

    Input shape:
        ``y_true``, ``y_pred``: `(batch, *spatial, 1)` images, 2 or 3 spatial axes.
    Returns:
        Scalar float32 tensor in ``[0, 1]``.

    Example:
    >>> x = np.random.default_rng(0).random((1, 16, 16, 1)).astype("float32")
    >>> round(float(MIND()(x, 5 - 3 * x)), 4)
    0.0
    """

    def __init__(self, sigma: float = 0.8, dilation: int = 2, penalty: str = "l2"):
        if not sigma > 0:
            raise ValueError(f"`sigma` must be > 0. Received: sigma={sigma!r}")
        if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"`dilation` must be an int >= 1. Received: dilation={dilation!r}")
        if penalty not in ("l1", "l2"):
            raise ValueError(f"`penalty` must be 'l1' or 'l2'. Received: penalty={penalty!r}")
        self.sigma, self.dilation, self.penalty = float(sigma), dilation, penalty

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        from tfreg.ops.mind import mind_distance, mind_ssc

        t, p = _pair(y_true, y_pred)
        _ndims(p, "y_pred")
        return tf.reduce_mean(mind_distance(mind_ssc(t, self.sigma, self.dilation),
                                            mind_ssc(p, self.sigma, self.dilation),
                                            self.penalty))

    def get_config(self) -> dict:
        return {"sigma": self.sigma, "dilation": self.dilation, "penalty": self.penalty}


class NMI:
    """Negated normalised mutual information ``-(H(I) + H(J)) / H(I, J)``, mean over the batch.

    The joint histogram is a differentiable Parzen-window estimate computed in chunks of voxels,
    so memory does not grow with voxels x bins (`tfreg.ops.mutual_information`). Any one-to-one
    map of one image's intensity levels leaves it unchanged.

    Args:
        bins: histogram bins per image. Defaults to 32.
        sigma: Parzen window, in bin widths. Defaults to 0.5.
        value_range: ``(lo, hi)`` intensity range of both images, or None (default): each
            image's minimum and maximum.
        chunk: voxels per chunk. Defaults to 16384.

    Input shape:
        ``y_true``, ``y_pred``: `(batch, *spatial, 1)`.
    Returns:
        Scalar float32 tensor in ``[-2, -1]``.
    """

    def __init__(self, bins: int = 32, sigma: float = 0.5,
                 value_range: tuple[float, float] | None = None, chunk: int = 16384):
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ValueError(f"`bins` must be an int >= 2. Received: bins={bins!r}")
        if not sigma > 0:
            raise ValueError(f"`sigma` must be > 0. Received: sigma={sigma!r}")
        self.bins, self.sigma, self.chunk = bins, float(sigma), int(chunk)
        self.value_range = None if value_range is None else tuple(float(v) for v in value_range)

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        from tfreg.ops.mutual_information import normalized_mutual_information

        t, p = _pair(y_true, y_pred)
        return -tf.reduce_mean(normalized_mutual_information(t, p, self.bins, self.sigma,
                                                             self.value_range, self.chunk))

    def get_config(self) -> dict:
        return {"bins": self.bins, "sigma": self.sigma, "value_range": self.value_range,
                "chunk": self.chunk}


class LabelLoss:
    """Overlap of warped moving labels with the fixed labels, for training from label maps.

    ``y_true`` is the fixed label map, ``y_pred`` the one-hot moving label map warped linearly
    by the predicted field (`tfreg.layers.warp(one_hot(moving_labels, values), disp)`); see
    `warped_one_hot`. ``kind="dice"``: `Dice` (``-mean`` soft Dice over the listed labels,
    ``-1`` = perfect); ``kind="mse"``: mean squared difference of the one-hot maps (0 = perfect).

    Args:
        label_values: label values scored, one channel each (background only if listed).
        kind: ``"dice"`` (default) or ``"mse"``.
    """

    def __init__(self, label_values: Sequence[int], kind: str = "dice"):
        if kind not in ("dice", "mse"):
            raise ValueError(f"`kind` must be 'dice' or 'mse'. Received: kind={kind!r}")
        self.values = [int(v) for v in label_values]
        if not self.values:
            raise ValueError("`label_values` must not be empty.")
        self.kind = kind

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        target = one_hot(y_true, self.values)
        pred = _f32(y_pred)
        if self.kind == "dice":
            return Dice()(target, pred)
        return tf.reduce_mean(tf.square(target - pred))

    def warped_one_hot(self, moving_labels, disp) -> tf.Tensor:
        """`(B, *S, K)` one-hot moving labels warped linearly by `disp` (voxels, pull)."""
        from tfreg.layers import warp

        return warp(one_hot(moving_labels, self.values), _f32(disp), "linear")


def degree_map(spatial: Sequence[int]) -> np.ndarray:
    """Number of face neighbours of each voxel inside the grid: ``2 N`` inside, fewer at the border.

    The diagonal of the degree matrix of the grid graph whose Laplacian is the prior precision of
    `KL`. Returns `(*spatial,)` float32.
    """
    spatial = tuple(int(s) for s in spatial)
    degree = np.zeros(spatial, np.float32)
    for axis, n in enumerate(spatial):
        count = np.full(n, 2.0, np.float32)
        count[0] -= 1
        count[-1] -= 1
        shape = [1] * len(spatial)
        shape[axis] = n
        degree = degree + count.reshape(shape)
    return degree


class KL:
    """KL divergence of ``q(v) = N(mu, diag(exp(log_var)))`` from the prior ``N(0, Lambda^-1)``,
    ``Lambda = prior_lambda * L`` with ``L = D - A`` the Laplacian of the voxel grid graph (Dalca et
    al., MICCAI 2018 / MedIA 2019), up to constants and normalised per element::

        KL = N/2 * [ mean(prior_lambda * D * exp(log_var) - log_var)
                     + prior_lambda * (1/(2N)) * sum_d mean((mu[x + e_d] - mu[x])^2) ]

    ``D`` is `degree_map` (face neighbours inside the grid), the first mean runs over batch,
    voxels and the ``N`` channels, each difference mean over its own (one voxel shorter) array.
    This is the normalisation of voxelmorph's ``KL`` loss (its ``0.5 * ndims * (sigma_term +
    prec_term)``).

    Args:
        prior_lambda: precision weight of the prior (voxelmorph: 25 for the MICCAI 2018 model,
            10 in the current training script).

    Input shape:
        ``y_pred``: `(batch, *spatial, 2N)`, the mean (first ``N`` channels) and the log variance
        (last ``N``) of the velocity; ``y_true`` is ignored.
    Returns:
        Scalar float32 tensor.
    """

    def __init__(self, prior_lambda: float = 25.0):
        if not prior_lambda > 0:
            raise ValueError(f"`prior_lambda` must be > 0. Received: prior_lambda={prior_lambda!r}")
        self.prior_lambda = float(prior_lambda)

    def __call__(self, y_true, y_pred) -> tf.Tensor:
        params = _f32(y_pred)
        ndims = _ndims(params, "y_pred")
        if params.shape[-1] != 2 * ndims:
            raise ValueError(f"`y_pred` must have 2 * {ndims} channels (mean, log variance). "
                             f"Received: shape={tuple(params.shape)}")
        mean, log_var = params[..., :ndims], params[..., ndims:]
        degree = tf.constant(degree_map(params.shape[1:-1])[None, ..., None])
        sigma_term = tf.reduce_mean(self.prior_lambda * degree * tf.exp(log_var) - log_var)
        prec_term = self.prior_lambda * 0.5 * Grad("l2")(None, mean)
        return 0.5 * ndims * (sigma_term + prec_term)
