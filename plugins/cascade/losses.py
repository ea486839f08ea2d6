"""Training losses of recursive cascaded networks (as the original trains them).

Terms returned by the loss function (already weighted; the engine minimises their sum), each a
mean over the batch (the original sums over the batch; with Adam this only rescales the step):

- ``"sim"``: similarity of the fixed image and the **final** warped image only:
  ``1 - r`` with ``r`` the global Pearson correlation (``loss.similarity: gncc``, default, eps 1e-6 on
  each variance), or ``1 + NCC(win=ncc_window)`` with voxelmorph's squared local NCC
  (``loss.similarity: ncc``). Both are 0 for a perfect match.
- ``"smooth"``: ``smooth_weight * sum_k R(f_k)`` over every deformable cascade's **own** flow ``f_k``
  (not the composed field), with the original's
  ``R(f) = sum_d 0.5 * sum((f[x + e_d] - f[x])^2) / (prod(S) * N)`` (forward differences, all
  channels, per sample).
- ``"det"``: ``det_weight * 0.5 * (det A - 1)^2`` of the affine stem's matrix A (with a stem).
- ``"ortho"``: ``ortho_weight * (tr(C) + (1+eps)^2 tr(C^-1) - 2 N (1+eps))`` with
  ``C = A^T A + eps I``, ``eps = 1e-5``: the sum over the eigenvalues ``l`` of ``C`` of
  ``l + (1+eps)^2 / l - 2 (1+eps)``, zero exactly when A is orthogonal (with a stem). In 3D
  ``tr(C^-1) = s2 / s3`` (elementary symmetric polynomials), the original's form.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import tensorflow as tf

from tfreg.errors import ConfigError
from tfreg.losses import NCC, GlobalNCC
from tfreg.ops.differences import forward_differences

#: ``loss.similarity`` values.
SIMILARITIES = ("gncc", "ncc")
#: Stabiliser of the orthogonality term (the original's).
ORTHO_EPS = 1e-5

LossFn = Callable[[Mapping[str, tf.Tensor], Mapping[str, tf.Tensor], Any], dict]


def _weight(loss: Mapping[str, Any], key: str, default: float) -> float:
    value = loss.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"loss.{key}: expected a number >= 0, got {value!r}")
    return float(value)


def flow_smoothness(flow: tf.Tensor) -> tf.Tensor:
    """The original's regulariser of one flow, batch mean.

    ``R(f) = sum_d 0.5 * sum((f[x + e_d] - f[x])^2) / (prod(S) * N)`` per sample.

    Args:
        flow: `(B, *S, N)` displacement in voxels.

    Returns:
        Scalar float32.
    """
    flow = tf.cast(flow, tf.float32)
    ndims = flow.shape.rank - 2
    size = 1.0
    for s in flow.shape[1:]:
        size *= float(s)  # prod(S) * N
    total = 0.0
    for diff in forward_differences(flow):
        total = total + 0.5 * tf.reduce_sum(diff * diff, axis=list(range(1, ndims + 2)))
    return tf.reduce_mean(total / size)


def affine_terms(affine: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Determinant and orthogonality penalties of affine matrices, batch means.

    Args:
        affine: `(B, N, N+1)` ``[A | b]``.

    Returns:
        ``(det, ortho)``: ``0.5 * (det A - 1)^2`` and
        ``tr(C) + (1+eps)^2 tr(C^-1) - 2 N (1+eps)``, ``C = A^T A + eps I`` (both >= 0, zero for
        a rotation).
    """
    affine = tf.cast(affine, tf.float32)
    ndims = affine.shape[1]
    a = affine[:, :, :ndims]
    det = 0.5 * tf.square(tf.linalg.det(a) - 1.0)
    c = tf.matmul(a, a, transpose_a=True) + ORTHO_EPS * tf.eye(ndims, dtype=tf.float32)
    trace_inv = tf.linalg.trace(tf.linalg.inv(c))
    ortho = tf.linalg.trace(c) + (1.0 + ORTHO_EPS) ** 2 * trace_inv - 2.0 * ndims * (1.0 + ORTHO_EPS)
    return tf.reduce_mean(det), tf.reduce_mean(ortho)


def similarity_fn(loss: Mapping[str, Any]) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """``(fixed, warped) -> scalar``, 0 for a perfect match, from ``loss.similarity``."""
    name = loss.get("similarity", "gncc")
    if name not in SIMILARITIES:
        raise ConfigError(f"loss.similarity: expected one of {', '.join(SIMILARITIES)}, got {name!r}")
    if name == "gncc":
        gncc = GlobalNCC(eps=1e-6)
        return lambda fixed, warped: 1.0 + gncc(fixed, warped)
    window = loss.get("ncc_window", 9)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"loss.ncc_window: expected an integer >= 1, got {window!r}")
    ncc = NCC(win=window)
    return lambda fixed, warped: 1.0 + ncc(fixed, warped)


def build(config: Mapping[str, Any]) -> LossFn:
    """The loss function of a resolved config.

    Args:
        config: resolved config; reads ``loss:`` and ``model.{cascades, affine_stem}``.

    Returns:
        ``loss_fn(batch, outputs, ctx) -> {"sim", "smooth"[, "det", "ortho"]}``. ``outputs``
        are the model's (``"warped"``, ``"flow_1"``.. ``"flow_n"``, ``"affine"``).

    Raises:
        ConfigError: an invalid ``loss.<key>``.
    """
    loss = config.get("loss") or {}
    model = config.get("model") or {}
    similarity = similarity_fn(loss)
    reg_weight = _weight(loss, "smooth_weight", 1.0)
    det_weight = _weight(loss, "det_weight", 0.1)
    ortho_weight = _weight(loss, "ortho_weight", 0.1)
    stem = bool(model.get("affine_stem", True))

    def loss_fn(batch: Mapping[str, tf.Tensor], outputs: Mapping[str, tf.Tensor],
                ctx: Any = None) -> dict[str, tf.Tensor]:
        terms = {"sim": similarity(batch["fixed"], outputs["warped"])}
        flows = sorted((k for k in outputs if k.startswith("flow_")), key=lambda k: int(k[5:]))
        if flows:
            terms["smooth"] = reg_weight * tf.add_n([flow_smoothness(outputs[k]) for k in flows])
        if stem and "affine" in outputs:
            det, ortho = affine_terms(outputs["affine"])
            terms["det"] = det_weight * det
            terms["ortho"] = ortho_weight * ortho
        return terms

    return loss_fn
