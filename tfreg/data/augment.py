"""Random spatial and intensity augmentation, in TensorFlow, deterministic for a seed.

One random transform per scan is applied to its image (linear) and its label map (nearest), so
the two stay consistent; fixed and moving scans get independent transforms. The spatial
transform is the sum of two displacements on the scan's grid (voxels, pull convention):

* a centred random affine ``y = A (x - c) + b + c`` (the convention of
  `tfreg.layers.affine_to_disp`): rotation (degrees, about each axis), per-axis scaling
  ``1 +/- scale``, shear ``+/- shear`` (off-diagonal), shift ``+/- shift`` voxels;
* a smooth random deformation: uniform ``+/- max_disp`` voxels at control points at least
  ``spacing`` voxels apart (the first and last voxels of each axis are control points),
  linearly interpolated (`tfreg.ops.fields.resize`).

No folding (`fold_bound`): with ``h`` the control spacing, each entry of the deformation's
Jacobian ``J`` is at most ``delta = 2 max_disp / h`` in magnitude everywhere (also as finite
differences), so ``||J||_2 <= N delta``. The affine part ``A = R (I + S) D`` has smallest singular
value ``>= (1 - (N-1) shear) (1 - scale)`` (``||S||_2 <= (N-1) shear``). The transform's Jacobian
``A + J = A (I + A^-1 J)`` therefore has a positive determinant when
``2 N max_disp / spacing < (1 - (N-1) shear) (1 - scale)``; validation enforces this (and
``shear < 1 / (N-1)``). Both limits are reached by worst-case draws, so they cannot be relaxed.
On an axis shorter than ``spacing`` the amplitude shrinks by ``h / spacing``.

Both are evaluated on the control grid and interpolated to full resolution once (exact for the
affine part). The image and the label map are then warped with `tfreg.layers.warp` (linear and
nearest), both taking the nearest border voxel outside the scan.

Intensity (images only, after the spatial transform): gamma ``x -> lo + (hi-lo) t**g`` with
``t = (x-lo)/(hi-lo)``, ``log g ~ N(0, gamma)``; a multiplicative bias field ``exp(b)`` with
``b`` uniform ``+/- bias`` on a 4-point-per-axis grid, interpolated; Gaussian noise of standard
deviation ``noise`` (in normalised intensity units).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from tfreg.data import _checks as chk

__all__ = ["Augmentation", "augment_scan", "fold_bound"]

_SECTIONS = {
    "affine": ("rotate", "scale", "shift", "shear"),
    "deform": ("max_disp", "spacing"),
    "intensity": ("gamma", "noise", "bias"),
}
APPLY_TO = ("both", "moving")


@dataclass(frozen=True)
class Augmentation:
    """Augmentation settings; all zero = off. Units: degrees, fractions, voxels, intensity."""

    rotate: float = 0.0
    scale: float = 0.0
    shift: float = 0.0
    shear: float = 0.0
    max_disp: float = 0.0
    spacing: float = 8.0
    gamma: float = 0.0
    noise: float = 0.0
    bias: float = 0.0
    apply_to: str = "both"

    @property
    def spatial(self) -> bool:
        return any((self.rotate, self.scale, self.shift, self.shear, self.max_disp))

    @property
    def enabled(self) -> bool:
        return self.spatial or any((self.gamma, self.noise, self.bias))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str, prefix: str = "augment.",
                  ndims: int = 3) -> "Augmentation":
        """Parse the ``augment:`` section (``affine``, ``deform``, ``intensity``, ``apply_to``)
        for images of `ndims` spatial axes (the no-folding limits depend on it)."""
        chk.check_keys(d, [*_SECTIONS, "apply_to"], source, prefix)
        values: dict[str, Any] = {}
        for name, keys in _SECTIONS.items():
            section = d.get(name)
            if section is None or section is False:
                continue
            section = chk.mapping(section, source, f"{prefix}{name}")
            chk.check_keys(section, keys, source, f"{prefix}{name}.")
            for key in keys:
                if key in section:
                    high = {"scale": 0.9, "shear": 0.9, "rotate": 180.0}.get(key)
                    values[key] = chk.number(section[key], source, f"{prefix}{name}.{key}",
                                             low=0.0, high=high)
        if values.get("spacing", 8.0) < 2:
            raise chk.fail(source, f"{prefix}deform.spacing", "expected a number >= 2 (voxels), "
                           f"got {values['spacing']}")
        shear, scale = values.get("shear", 0.0), values.get("scale", 0.0)
        if ndims > 1 and shear >= 1.0 / (ndims - 1):
            raise chk.fail(source, f"{prefix}affine.shear", f"must be < {1.0 / (ndims - 1):g} in "
                           f"{ndims}D (a larger shear can fold), got {shear}")
        bound = fold_bound(ndims, values.get("spacing", 8.0), scale, shear)
        if values.get("max_disp", 0.0) >= bound:
            raise chk.fail(source, f"{prefix}deform.max_disp", f"must be < {bound:.4g} in {ndims}D "
                           "with these spacing, scale and shear (2 N max_disp / spacing < "
                           "(1 - (N-1) shear) (1 - scale), else the deformation can fold), got "
                           f"{values['max_disp']}")
        values["apply_to"] = chk.choice(d.get("apply_to", "both"), APPLY_TO, source,
                                        f"{prefix}apply_to")
        return cls(**values)


def _rotation(angles, ndims: int):
    """Rotation matrix from angles (radians): one angle in 2D, three (about axes 0, 1, 2) in 3D."""
    import tensorflow as tf

    c, s = tf.cos(angles), tf.sin(angles)
    one, zero = tf.ones_like(c[0]), tf.zeros_like(c[0])
    if ndims == 2:
        return tf.stack([tf.stack([c[0], -s[0]]), tf.stack([s[0], c[0]])])
    rx = tf.stack([tf.stack([one, zero, zero]), tf.stack([zero, c[0], -s[0]]),
                   tf.stack([zero, s[0], c[0]])])
    ry = tf.stack([tf.stack([c[1], zero, s[1]]), tf.stack([zero, one, zero]),
                   tf.stack([-s[1], zero, c[1]])])
    rz = tf.stack([tf.stack([c[2], -s[2], zero]), tf.stack([s[2], c[2], zero]),
                   tf.stack([zero, zero, one])])
    return rx @ ry @ rz


def fold_bound(ndims: int, spacing: float, scale: float = 0.0, shear: float = 0.0) -> float:
    """Largest ``max_disp`` (exclusive, voxels) that cannot fold in `ndims` dimensions (module doc):
    ``spacing (1 - (N-1) shear) (1 - scale) / (2 N)``; 0 when the affine alone may fold."""
    margin = (1.0 - (ndims - 1) * shear) * (1.0 - scale)
    return max(0.0, spacing * margin / (2.0 * ndims))


def _deform_control_shape(shape: tuple[int, ...], spacing: float) -> tuple[int, ...]:
    """Control points of the deformation: first and last voxels and at least `spacing` voxels
    apart (one cell on an axis shorter than `spacing`)."""
    return tuple(max(1, int((n - 1) // spacing)) + 1 for n in shape)


def _control_shape(shape: tuple[int, ...], spacing: float) -> tuple[int, ...]:
    """Control points every `spacing` voxels (at least 2 per axis, first and last voxels)."""
    return tuple(max(2, math.ceil((n - 1) / spacing) + 1) for n in shape)


def _smooth_noise(shape: tuple[int, ...], channels: int, spacing: float, amplitude: float, seed):
    """`(1, *shape, channels)` uniform +/- amplitude at control points, linearly interpolated."""
    import tensorflow as tf

    from tfreg.ops.fields import resize

    ctrl = tf.random.stateless_uniform((1, *_control_shape(shape, spacing), channels), seed,
                                       -amplitude, amplitude)
    return resize(ctrl, shape, align="corners")


def random_disp(shape: tuple[int, ...], aug: Augmentation, seed):
    """A random displacement `(1, *shape, N)` (voxels, pull) for one scan.

    Both parts are built on the control grid and interpolated once: linear interpolation with the
    first and last voxels as control points reproduces the affine part exactly.
    """
    import tensorflow as tf

    from tfreg.ops.fields import apply_affine, resize

    ndims = len(shape)
    seeds = tf.random.experimental.stateless_split(seed, 5)
    matrix = tf.eye(ndims)
    if aug.rotate:
        n_angles = 1 if ndims == 2 else 3
        angles = tf.random.stateless_uniform((n_angles,), seeds[0], -aug.rotate, aug.rotate)
        matrix = _rotation(angles * (math.pi / 180.0), ndims)
    if aug.shear:
        shear = tf.random.stateless_uniform((ndims, ndims), seeds[1], -aug.shear, aug.shear)
        matrix = matrix @ (tf.eye(ndims) + shear * (1.0 - tf.eye(ndims)))
    if aug.scale:
        scale = tf.random.stateless_uniform((ndims,), seeds[2], 1 - aug.scale, 1 + aug.scale)
        matrix = matrix @ tf.linalg.diag(scale)
    shift = tf.random.stateless_uniform((ndims,), seeds[3], -aug.shift, aug.shift) \
        if aug.shift else tf.zeros((ndims,))
    ctrl_shape = _deform_control_shape(shape, aug.spacing) if aug.max_disp else (2,) * ndims
    # centred voxel coordinates of the control points, (*ctrl_shape, N)
    axes = [np.linspace(0.0, n - 1.0, g) - (n - 1) / 2.0 for n, g in zip(shape, ctrl_shape)]
    points = tf.constant(np.stack(np.meshgrid(*axes, indexing="ij"), -1), tf.float32)
    # centred affine y = A x + b, displacement y - x
    ctrl = apply_affine(tf.concat([matrix, shift[:, None]], axis=1), points) - points
    if aug.max_disp:
        # amplitude relative to the smallest control spacing h (h < spacing on short axes)
        cells = [(n - 1) / (g - 1) for n, g in zip(shape, ctrl_shape) if n > 1]
        amplitude = aug.max_disp * min([1.0] + [h / aug.spacing for h in cells])
        ctrl = ctrl + tf.random.stateless_uniform(ctrl.shape, seeds[4], -amplitude, amplitude)
    return resize(ctrl[None], shape, align="corners")


def _intensity(image, aug: Augmentation, seed):
    """Gamma, bias field and noise on a `(*S, 1)` image."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, 3)
    shape = tuple(image.shape[:-1])
    if aug.gamma:
        lo, hi = tf.reduce_min(image), tf.reduce_max(image)
        span = tf.maximum(hi - lo, 1e-6)
        gamma = tf.exp(tf.random.stateless_normal((), seeds[0]) * aug.gamma)
        image = lo + span * tf.pow(tf.clip_by_value((image - lo) / span, 0.0, 1.0), gamma)
    if aug.bias:
        spacing = max(max(shape) / 3.0, 2.0)
        image = image * tf.exp(_smooth_noise(shape, 1, spacing, aug.bias, seeds[1])[0])
    if aug.noise:
        image = image + tf.random.stateless_normal(tf.shape(image), seeds[2]) * aug.noise
    return image


def augment_scan(image, labels, aug: Augmentation, seed):
    """Augment one scan.

    Args:
        image: `(*S, 1)` float32.
        labels: `(*S, 1)` int32 or None.
        aug: settings.
        seed: `(2,)` int32/int64 stateless seed.

    Returns:
        `(image, labels)` of the same shapes and dtypes.
    """
    import tensorflow as tf

    from tfreg.ops.sampling import warp

    spatial_seed, intensity_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tuple(int(s) for s in image.shape[:-1])
    if aug.spatial:
        disp = random_disp(shape, aug, spatial_seed)
        image = warp(image[None], disp, interp="linear", fill_value=None)[0]
        if labels is not None:
            labels = warp(labels[None], disp, interp="nearest", fill_value=None)[0]
    if any((aug.gamma, aug.noise, aug.bias)):
        image = _intensity(image, aug, intensity_seed)
    return image, labels
