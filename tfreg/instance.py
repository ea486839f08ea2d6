"""Instance optimisation: register one pair without a trained network.

Pipeline, on two arrays already on the same grid (2D or 3D):

1. **Moments**: a translation that aligns the intensity centres of mass.
2. **Affine**: a centred affine ``y = A (x - c) + b + c`` (voxels of the fixed grid,
   ``c = (shape - 1) / 2``, the convention of `tfreg.ops.fields.affine_to_disp`), fitted by Adam on a
   coarse pyramid level.
3. **Diffeomorphic**: a stationary velocity field ``v`` optimised coarse to fine on an image
   pyramid; the displacement is ``u = exp(v)`` by scaling and squaring. ``v`` is a
   Gaussian-smoothed free parameter field ``w`` (``v = G * w``), which keeps Adam's per-voxel
   steps smooth. The loss is ``-NCC_local(fixed, moving o T) + lambda * mean |grad v|^2``.

The whole transform maps a fixed-grid point ``x`` to the moving-grid point
``T(x) = A (x + u(x) - c) + b + c``, so the returned displacement (pull, voxels of the fixed grid,
channel ``d`` along array axis ``d``) is ``disp(x) = T(x) - x``: affine and deformable parts are
combined analytically and the moving image is interpolated only once.

Pyramid geometry: level ``k`` has ``ceil(n / 2**k)`` voxels per axis and its voxel ``q`` sits at
the full-resolution voxel ``2**k q`` (average pooling with a 3-voxel window centred on the even
voxels, `tfreg.losses.avg_pool_half`). Values of a field at level ``k`` are in level voxels (times
``2**k`` for full-resolution voxels). The velocity never lives finer than ``field_level`` (half
resolution by default): at the full-resolution level, images are compared at full resolution while
the field is upsampled from half resolution.

Gradients: the backward pass treats ``exp`` as the identity (``du/dv ~ I``, exact for small
``v``; the forward pass integrates properly). Back-propagating through the squarings took 2.7x
the time for +0.005 Dice on one benchmark pair.

Optimiser: Adam (Keras' arithmetic) inside the XLA-compiled step; in the diffeomorphic stages its
denominator may gain a floor relative to the mean gradient RMS (`InstanceConfig.adam_floor`), so
that parameters with almost no gradient (the background) take small steps.
The mathematics (sampling, fields, filters, NCC, smoothness) is `tfreg.ops` / `tfreg.losses`.

Speed (see docs/register.md for measurements): one `tf.function` per pyramid level is XLA-compiled
(on CPU XLA runs these gather-heavy steps ~10x faster than graph mode) and reused for every pair of
the same shape in a process (kept in the bounded `tfreg.ops.compile_cache`); images are passed as
arguments, never captured as constants; the parameters live in a variable per compiled step; the scaling-and-squaring loop is a `tf.while_loop`, which XLA compiles once; the steps
of later levels are compiled in background threads while the first stage runs.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from tfreg import losses, trace_store
from tfreg.errors import ConfigError, InputError
from tfreg.ops import compile_cache, fields, filters, intensity, sampling

__all__ = ["InstanceConfig", "InstanceResult", "PRESETS", "make_config", "register_arrays",
           "adapt_to_shape", "moments_init", "normalize_image", "local_ncc", "velocity_displacement"]

SIMILARITIES = ("ncc", "mse", "mind", "nmi", "mk_lncc")
#: similarities that compare images of different contrasts (the affine stage uses them too).
MULTI_CONTRAST = ("mind", "nmi")
_PER_LEVEL = ("iterations", "learning_rate", "ncc_win")


@dataclass(frozen=True)
class InstanceConfig:
    """Settings of the instance optimisation (`PRESETS` holds the tuned ones).

    Attributes:
        levels: pyramid levels of the diffeomorphic stage, coarse to fine, as downsampling
            exponents (2 = quarter resolution, 1 = half, 0 = full).
        iterations: Adam steps per level (one value per level).
        learning_rate: Adam step size per level, in level voxels of velocity.
        ncc_win: local NCC window per level, in level voxels.
        lam: weight of the smoothness penalty ``mean |grad v|^2`` (v in level voxels).
        smooth_sigma: Gaussian sigma (level voxels) of ``v = G * w`` (3 box-filter passes).
        fine_sigma: the sigma (full-resolution voxels) for a velocity that lives at full
            resolution (``field_level`` 0); None = `smooth_sigma`. The same value in level voxels
            smooths half as much in mm at full resolution as at half resolution.
        field_level: finest level the velocity lives on (1 = half resolution).
        int_steps: scaling-and-squaring steps.
        lr_decay: the step size decays linearly within each level to this fraction.
        similarity: ``"ncc"`` (local signed NCC, robust to intensity differences between scans
            of one contrast), ``"mse"`` (same contrast and intensity scale only), ``"mind"``
            (L1 distance of MIND-SSC descriptors, `tfreg.ops.mind`; any contrasts) or ``"nmi"``
            (Parzen-window normalised mutual information, `tfreg.ops.mutual_information`; any
            contrasts) or ``"mk_lncc"`` (multi-kernel local NCC, `tfreg.ops.mk_lncc`, windows
            from each level's size by the vSVF rule; `ncc_win` and `ncc_floor` unused). Used by
            the affine and the deformable stages alike.
        ncc_eps: stabiliser of ``cross / sqrt(var_f var_w + eps)`` (sums over the window).
        ncc_floor: at the finest level of the schedule (and in the affine stage), NCC windows
            are weighted by ``var_f / (var_f + n ncc_floor^2)`` (``var_f`` the fixed image's
            window variance sum, ``n`` the window size; intensities in [0, 1]): windows where the
            fixed image is flat carry no information and count little. Without it, local NCC
            rewards pulling edges into nearly flat windows, which moves an image registered to
            itself and distorts clean images. Coarser levels use the plain mean, which gave
            better overlap on the benchmark. 0 = plain mean everywhere.
        min_level_size: the schedule moves to finer levels for small images so that the coarsest
            level keeps at least this many voxels along its shortest axis.
        min_affine_size: the same for the affine stage (a rotation needs detail to be seen).
        affine: run the moments + affine initialisation.
        affine_level: pyramid level of the affine stage.
        affine_iterations: Adam steps of the affine stage.
        affine_lr: Adam step size of the affine parameters (matrix entries; the translation is
            in units of a tenth of the largest image dimension).
        adam_floor: in the diffeomorphic stages, Adam's denominator ``sqrt(v)`` gains
            ``adam_floor * mean(sqrt(v))``: velocity parameters whose gradient RMS is well below
            the average (the background, where the images carry no information and only the
            smoothness term acts) take steps in proportion to their gradient instead of Adam's
            full normalised step. 0 = plain Adam. Relative, so independent of loss scale and
            image size.
        jit: XLA-compile the steps (True/False) or "auto" (on).
    """

    levels: tuple[int, ...] = (1, 0)
    iterations: tuple[int, ...] = (150, 60)
    learning_rate: tuple[float, ...] = (0.2, 0.15)
    ncc_win: tuple[int, ...] = (5, 7)
    lam: float = 0.5
    smooth_sigma: float = 1.0
    fine_sigma: float | None = None
    field_level: int = 1
    int_steps: int = 5
    lr_decay: float = 0.2
    similarity: str = "ncc"
    ncc_eps: float = 1e-3
    ncc_floor: float = 0.03
    min_level_size: int = 16
    min_affine_size: int = 24
    affine: bool = True
    affine_level: int = 2
    affine_iterations: int = 100
    affine_lr: float = 0.01
    adam_floor: float = 0.0
    jit: bool | str = "auto"

    def validate(self, source: str = "instance optimisation") -> "InstanceConfig":
        """Check lengths and ranges; raise `ConfigError` naming the option."""
        n = len(self.levels)
        if n == 0 and not self.affine:
            raise ConfigError(f"{source}: nothing to do (no levels and no affine stage)")
        for name in _PER_LEVEL:
            if len(getattr(self, name)) != n:
                raise ConfigError(f"{source}: {name}: expected {n} values (one per level), "
                                  f"got {len(getattr(self, name))}")
        if any(isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 6
               for k in self.levels):
            raise ConfigError(f"{source}: levels: expected integers in 0..6, got {self.levels}")
        if list(self.levels) != sorted(self.levels, reverse=True):
            raise ConfigError(f"{source}: levels: must go from coarse to fine, got {self.levels}")
        if any(i < 0 for i in self.iterations) or self.affine_iterations < 0:
            raise ConfigError(f"{source}: iterations: must be >= 0")
        if any(not lr >= 0 for lr in self.learning_rate) or not self.affine_lr >= 0:
            raise ConfigError(f"{source}: learning rates must be >= 0")
        if not self.lam >= 0 or not self.smooth_sigma >= 0 or not self.ncc_floor >= 0 \
                or not (self.fine_sigma is None or self.fine_sigma >= 0):
            raise ConfigError(f"{source}: lambda, smooth_sigma and ncc_floor must be >= 0")
        if self.similarity not in SIMILARITIES:
            raise ConfigError(f"{source}: similarity: expected one of {', '.join(SIMILARITIES)}, "
                              f"got {self.similarity!r}")
        if any(w < 1 for w in self.ncc_win):
            raise ConfigError(f"{source}: ncc_win: must be >= 1")
        if not 0 <= self.int_steps <= 12:
            raise ConfigError(f"{source}: int_steps: expected 0..12, got {self.int_steps}")
        if not self.adam_floor >= 0:
            raise ConfigError(f"{source}: adam_floor: must be >= 0, got {self.adam_floor}")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"{source}: lr_decay: expected a fraction in (0, 1]")
        return self


#: tuned on the inter-subject brain benchmark (benchmarks/bench_register.py); "accurate" is the
#: default of `tfreg register`.
PRESETS: dict[str, InstanceConfig] = {
    # contrast floor 0.1, Adam floor 1 and smoothness weight 1 (the defaults' 0.03, 0 and 0.5 folded
    # 0.14% of the real OASIS pair at 1 mm; these 0.024%, same mean Dice on the benchmark pairs)
    "accurate": InstanceConfig(lam=1.0, ncc_floor=0.1, adam_floor=1.0),
    # 40 steps of 0.4 (90 of 0.25 before): mean Dice 0.594 against 0.597 on the six benchmark
    # pairs, 0.665 against 0.667 on the OASIS pair, smoother fields, 1.6x faster steps
    "fast": InstanceConfig(levels=(1,), iterations=(40,), learning_rate=(0.4,), ncc_win=(5,),
                           affine_iterations=60),
    # the velocity lives at full resolution in the last stage, with ANTs' CC window (radius 4);
    # smoothness weight 2: the weight is what sets the field's regularity; contrast floor 0.1 and
    # Adam floor 1 keep the background (noise only) still (benchmarks/README.md)
    "best": InstanceConfig(iterations=(150, 100), ncc_win=(5, 9), field_level=0, lam=2.0,
                           ncc_floor=0.1, adam_floor=1.0),
}


def _per_level_from(preset: InstanceConfig, levels: tuple[int, ...], name: str) -> tuple:
    """A preset's per-level values mapped onto other levels (a level absent from the preset takes
    the value of the preset's nearest level)."""
    old = dict(zip(preset.levels, getattr(preset, name)))
    return tuple(old[min(old, key=lambda k: abs(k - lvl))] for lvl in levels)


def make_config(preset: str = "accurate", **overrides) -> InstanceConfig:
    """A preset with some fields replaced (None values are ignored).

    `levels` may be a count ``n``: ``n`` levels ending at the preset's finest level (accurate:
    3 -> (2, 1, 0); fast: 2 -> (2, 1)). `iterations`, `learning_rate` and `ncc_win` may be one
    number for all levels; when only `levels` changes, they follow from the preset.

    Raises:
        ConfigError: unknown preset, unknown option or invalid value.
    """
    if preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    base = PRESETS[preset]
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(changes) - {f.name for f in dataclasses.fields(InstanceConfig)}
    if unknown:
        raise ConfigError(f"instance optimisation: unknown option(s) {', '.join(sorted(unknown))}")
    levels = changes.get("levels", base.levels)
    if isinstance(levels, int) and not isinstance(levels, bool):
        if not 1 <= levels <= 5:
            raise ConfigError(f"--levels: expected 1..5, got {levels}")
        finest = base.levels[-1] if base.levels else 0
        levels = tuple(range(finest + levels - 1, finest - 1, -1))
    levels = tuple(levels)
    changes["levels"] = levels
    for name in _PER_LEVEL:
        value = changes.get(name)
        if value is None:
            value = getattr(base, name) if levels == base.levels else \
                _per_level_from(base, levels, name) if base.levels else ()
        elif not isinstance(value, (tuple, list)):
            value = (value,) * len(levels)
        changes[name] = tuple(value)
    return dataclasses.replace(base, **changes).validate()


def adapt_to_shape(cfg: InstanceConfig, shape: Sequence[int]) -> InstanceConfig:
    """Fit the pyramid schedule to the image size.

    Presets are tuned for brain MRI of about 96-192 voxels per axis. While the coarsest level would
    have fewer than `min_level_size` voxels along the shortest axis, the schedule moves one level
    finer (when its finest level is not full resolution yet) or drops its coarsest level. The
    affine stage moves finer the same way.
    """
    def size(level: int) -> int:
        return min(int(math.ceil(n / 2 ** level)) for n in shape)

    levels = list(cfg.levels)
    values = {name: list(getattr(cfg, name)) for name in _PER_LEVEL}
    while levels and size(levels[0]) < cfg.min_level_size:
        if levels[-1] > 0:
            levels = [lvl - 1 for lvl in levels]
        elif len(levels) > 1:
            levels.pop(0)
            for name in _PER_LEVEL:
                values[name].pop(0)
        else:
            break
    affine_level = cfg.affine_level
    while affine_level > 0 and size(affine_level) < cfg.min_affine_size:
        affine_level -= 1
    if tuple(levels) == cfg.levels and affine_level == cfg.affine_level:
        return cfg
    return dataclasses.replace(cfg, levels=tuple(levels), affine_level=affine_level,
                               **{name: tuple(v) for name, v in values.items()})


@dataclass
class InstanceResult:
    """Result of `register_arrays`.

    Attributes:
        disp: `(*S, N)` float32 displacement, pull, voxels of the fixed grid.
        affine: `(N, N+1)` centred affine ``[A | b]`` found by the moments + affine stages.
        similarity: local NCC after registration (`local_ncc`, higher is better).
        initial_similarity: the same before registration.
        stage_seconds: wall time per stage, tracing and XLA compilation included.
        config: the settings used (after `adapt_to_shape`).
        velocity: `(*S_k, N)` stationary velocity (smoothed, level-``k`` voxels) on pyramid
            level ``k = velocity_level``, or None without a deformable stage:
            ``disp = Aff(x + velocity_displacement(velocity, k, S, steps)) - x``.
        velocity_level: its pyramid level.
    """

    disp: np.ndarray
    affine: np.ndarray
    similarity: float
    initial_similarity: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    config: InstanceConfig | None = None
    velocity: np.ndarray | None = None
    velocity_level: int = 0


# ------------------------------------------------------------------------------------ helpers
#: The similarity that `tfreg register` reports (`local_ncc`): signed local NCC, window 7,
#: contrast-weighted; the same `tfreg.losses.NCC` the optimisation minimises (other window/eps).
REPORT_NCC = dict(win=7, squared=False, eps=1e-3, eps_mode="add", contrast_floor=0.03)


def normalize_image(image: np.ndarray, low: float = 0.0, high: float = 99.9) -> np.ndarray:
    """Intensities mapped to [0, 1] by the `low` and `high` percentiles, then clipped; float32
    (`tfreg.ops.intensity.normalize_percentile`)."""
    return intensity.normalize_percentile(image, low, high)


def moments_init(fixed: np.ndarray, moving: np.ndarray, binary: bool = False) -> np.ndarray:
    """Translation aligning the intensity centres of mass, as a centred affine `(N, N+1)`.

    Intensities below 10% of each image's maximum are ignored (background). With `binary`, every
    foreground voxel weighs 1 (the centre of the foreground, independent of the contrast).
    Returns ``[I | b]`` with ``b = com_moving - com_fixed`` (voxels).
    """
    def com(img: np.ndarray) -> np.ndarray:
        w = np.where(img > 0.1 * img.max(), 1.0 if binary else img, 0.0).astype(np.float64)
        total = w.sum()
        if total <= 0:
            return (np.asarray(img.shape) - 1) / 2.0
        grids = np.meshgrid(*[np.arange(n) for n in img.shape], indexing="ij", sparse=True)
        return np.array([(w * g).sum() / total for g in grids])

    ndims = fixed.ndim
    out = np.zeros((ndims, ndims + 1), np.float32)
    out[:, :ndims] = np.eye(ndims)
    out[:, ndims] = com(moving) - com(fixed)
    return out


def _feature_pyramid(pyramid: list[tf.Tensor], similarity: str) -> list[tf.Tensor]:
    """What the similarity compares at each level: the images, or for ``"mind"`` their MIND-SSC
    descriptors (`tfreg.ops.mind.mind_ssc`, sigma 0.8, dilation 2 level voxels), computed once per
    level; the moving descriptors are then warped like an image (12 channels in 3D)."""
    if similarity != "mind":
        return pyramid
    from tfreg.ops.mind import mind_ssc

    return [mind_ssc(level, sigma=0.8, dilation=2) for level in pyramid]


def _pyramid(image: tf.Tensor, depth: int) -> list[tf.Tensor]:
    """``[level 0 (input), ..., level depth]``: each `tfreg.ops.filters.pool_half` of the one
    before."""
    out = [image]
    for _ in range(depth):
        out.append(filters.pool_half(out[-1]))
    return out


def _level_grid(shape: Sequence[int], factor: float, centre: Sequence[float]) -> tf.Tensor:
    """``factor * q - centre`` for the voxels ``q`` of a level, `(1, *shape, N)` float32."""
    return fields.centred_grid(shape, scale=factor, centre=centre)[None]


def _apply_affine(points: tf.Tensor, affine: tf.Tensor, centre: Sequence[float]) -> tf.Tensor:
    """``A p + b + c`` for centred points ``p`` `(1, *S, N)`: full-resolution voxel positions."""
    return fields.apply_affine(affine, points) + tf.constant(np.asarray(centre, np.float32))


def _ncc(cfg: InstanceConfig, win: int, floor: float) -> losses.NCC:
    return losses.NCC(win=win, squared=False, eps=cfg.ncc_eps, eps_mode="add",
                      contrast_floor=floor)


def _prepare_fixed(cfg: InstanceConfig, win: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """``prepare(fixed)``: what a stage's steps get as the fixed image, computed once per stage.

    The image itself, or for NCC the image `(1, *S, C)` followed by its window statistics
    (`tfreg.losses.NCC.fixed_stats`: two more channels), so that each step computes three window
    sums of the warped image instead of five (`tfreg.ops.similarity.fixed_window_stats`).
    """
    if cfg.similarity != "ncc":
        return lambda f: f
    ncc = _ncc(cfg, win, 0.0)  # the statistics do not depend on the contrast floor
    return lambda f: tf.concat([f, ncc.fixed_stats(f)], axis=-1)


def _similarity_fn(cfg: InstanceConfig, win: int, floor: float
                   ) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """``loss(fixed, warped)`` (lower is better), `fixed` as `_prepare_fixed` gives it, `warped`
    `(1, *S, C)`.

    NCC is `tfreg.losses.NCC` (signed, ``eps`` added, window `win`); a `floor` > 0 weights the
    windows by the fixed image's contrast (see `InstanceConfig.ncc_floor`), 0 gives the plain mean.
    """
    if cfg.similarity == "mse":
        mse = losses.MSE()
        return lambda f, w: 100.0 * mse(f, w)
    if cfg.similarity == "mind":
        # images are MIND-SSC descriptor stacks here (see `_feature_pyramid`)
        return lambda f, w: tf.reduce_mean(tf.abs(f - w))
    if cfg.similarity == "nmi":
        from tfreg.ops.mutual_information import normalized_mutual_information

        return lambda f, w: -tf.reduce_mean(
            normalized_mutual_information(f, w, bins=32, value_range=(0.0, 1.0)))
    if cfg.similarity == "mk_lncc":
        return losses.MKLNCC()   # windows from the level's shape (tfreg.ops.mk_lncc.auto_windows)
    ncc = _ncc(cfg, win, floor)
    return lambda f, w: -ncc.similarity(f[..., :-2], w, fixed_stats=f[..., -2:])


def local_ncc(fixed: np.ndarray, warped: np.ndarray, win: int = REPORT_NCC["win"],
              floor: float = REPORT_NCC["contrast_floor"]) -> float:
    """Contrast-weighted mean of the signed local NCC (window `win`) of two images in [0, 1].

    ``tfreg.losses.NCC(**REPORT_NCC).similarity``: windows are weighted by
    ``var_f / (var_f + n floor^2)`` (the fixed image's variance sum over the window, ``n``
    voxels), so flat background does not dilute the figure: about 1 for identical images, about 0
    for unrelated ones. Reported by `tfreg register` before and after.
    """
    options = {**REPORT_NCC, "win": win, "contrast_floor": floor}
    f = tf.constant(np.asarray(fixed, np.float32)[None, ..., None])
    w = tf.constant(np.asarray(warped, np.float32)[None, ..., None])
    # compiled (from compile_cache.AUTO_MIN_VOXELS voxels): the box filters are much faster
    # under XLA than eager
    jit = compile_cache.use_jit("auto", int(np.prod(f.shape[1:-1])))
    fn = compile_cache.compiled(("local_ncc", tuple(sorted(options.items()))),
                                losses.NCC(**options).similarity, jit=jit)
    return float(fn(f, w).numpy())


def _integrate(velocity: tf.Tensor, steps: int) -> tf.Tensor:
    """Scaling and squaring as a `tf.while_loop` (`tfreg.ops.fields.integrate_svf(loop=True)`).

    XLA compiles the loop body once: 5 steps at 24x28x24 compile in ~0.17 s against ~0.33 s
    unrolled (same run time, 1.2 ms).
    """
    return fields.integrate_svf(velocity, steps, loop=True)


def velocity_displacement(velocity, level: int, shape: Sequence[int], steps: int) -> tf.Tensor:
    """Full-resolution displacement ``exp(v)`` of a velocity on pyramid level `level`.

    Args:
        velocity: `(*S_k, N)` velocity in level-`level` voxels (``InstanceResult.velocity``).
        level: its pyramid level (grid ``ceil(shape / 2**level)``).
        shape: full-resolution spatial shape `S`.
        steps: scaling-and-squaring steps.

    Returns:
        `(*S, N)` float32 displacement in full-resolution voxels. With ``-velocity`` it is the
        inverse map's displacement (up to the interpolation of the upsampling).
    """
    shapes = [tuple(int(math.ceil(n / 2 ** k)) for n in shape) for k in range(level + 1)]
    u = _integrate(tf.convert_to_tensor(velocity, tf.float32)[None], steps) * float(2 ** level)
    for k in range(level, 0, -1):
        u = fields.upsample_level(u, shapes[k - 1])
    return u[0]


def _params_to_affine(theta: tf.Tensor, init: tf.Tensor, ndims: int, scale: float) -> tf.Tensor:
    """``init + delta``: ``theta`` `(N*(N+1),)` holds matrix increments and the translation in
    units of `scale` voxels."""
    delta = tf.reshape(theta, (ndims, ndims + 1))
    weights = tf.constant([[1.0] * ndims + [scale]] * ndims, tf.float32)
    return init + delta * weights


# ------------------------------------------------------------------------ compiled steps
class _Optimiser:
    """One parameter tensor, Adam on it, and one compiled optimisation step.

    ``step(lr, fixed, moving, affine) -> loss`` computes ``loss_fn(param, fixed, moving, affine)``
    (which returns ``(loss to minimise, loss to report)``), applies one Adam update with step
    size `lr` and returns the reported loss. The update runs inside the XLA-compiled step (one
    compiled function per level; measured on this CPU in docs/register.md). Kept in
    `tfreg.ops.compile_cache` and reused for every pair of the same shapes: `reset` sets the
    parameter and clears Adam's moments and step count.

    The update is Keras' Adam (`keras.optimizers.Adam`, beta 0.9 / 0.999; the same arithmetic,
    tested against it) with one addition, `floor`: the denominator ``sqrt(v) + eps`` gains
    ``floor * mean(sqrt(v))`` (mean over all parameters). With `floor` 0 it is plain Adam, whose
    per-parameter normalisation gives a parameter with a tiny gradient (the background of a
    brain image, where only the smoothness term acts) as long a step as one with a large
    gradient; with `floor` > 0 parameters whose gradient RMS is well below the average take
    steps in proportion to it (gradient descent there), those well above it keep Adam's step.
    The floor is relative, so it does not depend on the loss scale or the image size.

    ``eps`` is 1e-9 because it is added to ``sqrt(v)`` before bias correction (as Keras does):
    that equals ``1e-8`` added after bias correction at step ~10 (Kingma and Ba's form).
    """

    BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-9

    def __init__(self, shape: tuple[int, ...], loss_fn: Callable, jit: bool, floor: float = 0.0,
                 key: tuple = ()):
        self.param = tf.Variable(tf.zeros(shape, tf.float32), trainable=True)
        self.moment1 = tf.Variable(tf.zeros(shape, tf.float32), trainable=False)
        self.moment2 = tf.Variable(tf.zeros(shape, tf.float32), trainable=False)
        self.count = tf.Variable(0.0, trainable=False)
        self.floor = float(floor)
        self.loss_fn = loss_fn
        self.key = key  # everything the traced step depends on besides the argument shapes
        self.step = compile_cache.jit_function(self._step, jit)
        self.stored = False

    def prepare(self, args: tuple) -> None:
        """Make `step` ready for `args` without compiling it: the stored graph of this step
        (`tfreg.trace_store`, when enabled; traced and stored if missing), else a trace."""
        if self.stored:
            return
        variables = (self.param, self.moment1, self.moment2, self.count)
        key = self.key + (tuple((a.dtype.name, tuple(a.shape)) for a in args),)
        stored = trace_store.load(key, variables) if self.key else None
        if stored is None:
            concrete = self.step.get_concrete_function(*args)
            stored = trace_store.store(key, concrete, variables) if self.key else None
        if stored is not None:
            self.step, self.stored = stored, True

    def _step(self, lr, fixed, moving, affine):
        with tf.GradientTape() as tape:
            loss, report = self.loss_fn(self.param, fixed, moving, affine)
        grad = tape.gradient(loss, self.param)
        b1, b2 = self.BETA_1, self.BETA_2
        t = self.count.assign_add(1.0)
        alpha = lr * tf.sqrt(1.0 - tf.pow(b2, t)) / (1.0 - tf.pow(b1, t))
        m = self.moment1.assign_add((grad - self.moment1) * (1.0 - b1))
        v = self.moment2.assign_add((tf.square(grad) - self.moment2) * (1.0 - b2))
        root = tf.sqrt(v)
        denominator = root + self.EPSILON
        if self.floor > 0:
            denominator = denominator + self.floor * tf.reduce_mean(root)
        self.param.assign_sub(m * alpha / denominator)
        return report

    def reset(self, value: tf.Tensor) -> None:
        self.param.assign(value)
        for var in (self.moment1, self.moment2):
            var.assign(tf.zeros_like(var))
        self.count.assign(0.0)


def _affine_loss_fn(cfg: InstanceConfig, shape: tuple[int, ...], level: int, win: int,
                    centre: tuple[float, ...], scale: float) -> Callable:
    """Loss of the affine parameters, images compared at pyramid level `level`.

    The NCC windows are weighted by the fixed image's contrast at every level here: it keeps the
    affine of an image with itself at the identity and gave better overlap on the benchmark.
    """
    ndims = len(shape)
    factor = float(2 ** level)
    sim = _similarity_fn(cfg, win, cfg.ncc_floor)

    def loss_fn(theta, fixed, moving, init):
        affine = _params_to_affine(theta, init, ndims, scale)
        target = _apply_affine(_level_grid(shape, factor, centre), affine, centre)
        disp = target / factor - _level_grid(shape, 1.0, np.zeros(ndims))
        loss = sim(fixed, sampling.warp(moving, disp))
        return loss, loss

    return loss_fn


def _sigma(cfg: InstanceConfig, vlevel: int) -> float:
    """Smoothing sigma (level voxels) of a velocity on pyramid level `vlevel`."""
    return cfg.fine_sigma if vlevel == 0 and cfg.fine_sigma is not None else cfg.smooth_sigma


def _svf_loss_fn(cfg: InstanceConfig, shapes: list[tuple[int, ...]], level: int, vlevel: int,
                 win: int, centre: tuple[float, ...], floor: float) -> Callable:
    """Loss of the velocity parameters (the affine fixed).

    Images are compared at pyramid level `level` (NCC windows weighted by contrast when
    `floor` > 0); the velocity lives on level `vlevel >= level` and its displacement is upsampled
    to the image level. Reports the similarity term alone.
    """
    shape = shapes[level]
    ndims = len(shape)
    factor = float(2 ** level)
    sim = _similarity_fn(cfg, win, floor)
    smoothness = losses.Grad("l2")

    def loss_fn(w, fixed, moving, affine):
        v = filters.box_gaussian(w, _sigma(cfg, vlevel))
        # exp(v) forward; identity Jacobian backward
        u = tf.stop_gradient(_integrate(v, cfg.int_steps) - v) + v
        u = u * float(2 ** vlevel)  # full-resolution voxels
        for k in range(vlevel, level, -1):
            u = fields.upsample_level(u, shapes[k - 1])
        target = _apply_affine(_level_grid(shape, factor, centre) + u, affine, centre)
        disp = target / factor - _level_grid(shape, 1.0, np.zeros(ndims))
        sim_loss = sim(fixed, sampling.warp(moving, disp))
        return sim_loss + cfg.lam * smoothness(None, v), sim_loss

    return loss_fn


def _optimiser(key: tuple, shape: tuple[int, ...], build_loss: Callable[[], Callable],
               jit: bool, floor: float = 0.0) -> _Optimiser:
    """The cached `_Optimiser` of `key` (shapes and static settings; `floor` is Adam's)."""
    full_key = ("instance",) + key + (jit, floor)
    return compile_cache.cached(full_key,
                                lambda: _Optimiser(shape, build_loss(), jit, floor, full_key))


def _move_to_level(w: tf.Tensor | None, src: int | None, dst: int, shapes: list[tuple[int, ...]],
                   ndims: int) -> tf.Tensor:
    """Velocity parameters from pyramid level `src` to `dst` (values in level voxels); None gives
    zeros. Finer: linear upsampling (values x2 per level); coarser: average pooling (x0.5)."""
    if w is None:
        return tf.zeros((1, *shapes[dst], ndims), tf.float32)
    for k in range(src, dst, -1):
        w = fields.upsample_level(w, shapes[k - 1]) * 2.0
    for _ in range(src, dst):
        w = filters.pool_half(w) * 0.5
    return w


def _precompile(stages: list, m_pyr: list, affine: tf.Tensor) -> dict[int, threading.Thread]:
    """Compile the steps of later stages in background threads while the first stage runs.

    XLA compiles each function on one core, and the optimisation steps of these small problems
    keep about one core busy, so on a 2-core CPU compiling all levels at once hides most of the
    compilation. Each step runs once with step size 0 (the stage resets its optimiser before
    use); errors are left to the real call. Returns the thread of each stage index.
    """
    def work(lvl: int, opt: _Optimiser, fixed: tf.Tensor) -> None:
        try:
            opt.reset(tf.zeros_like(opt.param))
            opt.step(tf.constant(0.0), fixed, m_pyr[lvl], affine)
        except Exception:  # noqa: BLE001 - the main thread's own call reports it
            return

    # trace (or load, `tfreg.trace_store`) every stage's step here, in stage order, before any
    # thread starts: the names TensorFlow gives traced functions come from a process-wide
    # counter, and they are part of the persistent XLA cache's key (`tfreg.xla_cache`); traced
    # concurrently, they would differ from process to process and the cache would miss. What
    # is traced after this point gets the same names whether the steps were traced or loaded.
    for _, lvl, _, _, _, opt, fixed in stages:
        opt.prepare((tf.constant(0.0), fixed, m_pyr[lvl], affine))
    if trace_store.folder() is not None:
        trace_store.align_names()
    threads = {}
    for index, (_, lvl, _, _, _, opt, fixed) in enumerate(stages):
        if index == 0:
            continue
        threads[index] = threading.Thread(target=work, args=(lvl, opt, fixed), daemon=True,
                                          name=f"tfreg-precompile-{lvl}")
        threads[index].start()
    return threads


# ------------------------------------------------------------------------------- main entry
def register_arrays(fixed: np.ndarray, moving: np.ndarray, cfg: InstanceConfig | None = None, *,
                    init_affine: np.ndarray | None = None,
                    progress: Callable[[str, int, int, float], None] | None = None,
                    ) -> InstanceResult:
    """Register `moving` to `fixed` (the same grid) by instance optimisation.

    Args:
        fixed, moving: `(*S,)` float arrays on the same grid, 2D or 3D, intensities in about
            [0, 1] (`normalize_image`).
        cfg: settings; default `PRESETS["accurate"]`. Adapted to the image size first
            (`adapt_to_shape`).
        init_affine: `(N, N+1)` centred affine to start from instead of the moments.
        progress: called as ``progress(stage, step, total, loss)`` every 10 steps and at the end
            of each stage.

    Returns:
        `InstanceResult` with the full-resolution displacement.

    Raises:
        InputError: shapes differ, wrong rank, or an image too small for the pyramid.
    """
    cfg = (cfg or PRESETS["accurate"]).validate()
    fixed = np.asarray(fixed, np.float32)
    moving = np.asarray(moving, np.float32)
    if fixed.shape != moving.shape:
        raise InputError(f"moving: shape {moving.shape} differs from fixed shape {fixed.shape} "
                         "(resample onto the fixed grid first)")
    if fixed.ndim not in (2, 3):
        raise InputError(f"fixed: expected a 2D or 3D image, got shape {fixed.shape}")
    shape = fixed.shape
    ndims = len(shape)
    cfg = adapt_to_shape(cfg, shape)
    centre = tuple((np.asarray(shape, np.float64) - 1) / 2.0)
    jit = cfg.jit if isinstance(cfg.jit, bool) else True
    depth = max(list(cfg.levels) + ([cfg.affine_level] if cfg.affine else []) + [0])
    if min(shape) < max(2 ** depth * 2, 4):
        raise InputError(f"fixed: shape {shape} is too small to register (needs at least "
                         f"{max(2 ** depth * 2, 4)} voxels per axis)")
    report = progress or (lambda *a: None)
    times: dict[str, float] = {}

    moving_t = tf.constant(moving[None, ..., None])
    f_pyr = _feature_pyramid(_pyramid(tf.constant(fixed[None, ..., None]), depth), cfg.similarity)
    m_pyr = _feature_pyramid(_pyramid(moving_t, depth), cfg.similarity)
    shapes = [tuple(x.shape[1:-1]) for x in f_pyr]
    scale = float(max(shape)) / 10.0

    if init_affine is not None:
        affine = np.asarray(init_affine, np.float32).reshape(ndims, ndims + 1)
    elif cfg.affine:
        affine = moments_init(fixed, moving, binary=cfg.similarity in MULTI_CONTRAST)
    else:
        affine = np.eye(ndims, ndims + 1, dtype=np.float32)
    affine = tf.constant(affine, tf.float32)
    theta = tf.zeros((ndims * (ndims + 1),), tf.float32)

    static = dataclasses.replace(cfg, iterations=(), learning_rate=(), ncc_win=(), levels=(),
                                 affine_iterations=0, affine_lr=0.0, lr_decay=1.0)
    # (name, image level, velocity level or None for the affine stage, steps, step size,
    #  optimiser, the fixed image as its steps get it: `_prepare_fixed`)
    stages = []
    if cfg.affine and cfg.affine_iterations > 0:
        lvl = cfg.affine_level
        win = cfg.ncc_win[0] if cfg.levels else 5
        opt = _optimiser(("affine", shapes[lvl], lvl, win, centre, scale, static), theta.shape,
                         lambda: _affine_loss_fn(cfg, shapes[lvl], lvl, win, centre, scale), jit)
        stages.append(("affine", lvl, None, cfg.affine_iterations, cfg.affine_lr, opt,
                       _prepare_fixed(cfg, win)(f_pyr[lvl])))
    for index, lvl in enumerate(cfg.levels):
        win = cfg.ncc_win[index]
        vlevel = min(max(lvl, cfg.field_level), depth)
        # contrast-weighted NCC at the finest level only (see InstanceConfig.ncc_floor)
        floor = cfg.ncc_floor if lvl == cfg.levels[-1] else 0.0
        opt = _optimiser(("svf", tuple(shapes), lvl, vlevel, win, centre, floor, static),
                         (1, *shapes[vlevel], ndims),
                         lambda lvl=lvl, vlevel=vlevel, win=win, floor=floor: _svf_loss_fn(
                             cfg, shapes, lvl, vlevel, win, centre, floor), jit, cfg.adam_floor)
        stages.append((f"level {index + 1}/{len(cfg.levels)}", lvl, vlevel,
                       cfg.iterations[index], cfg.learning_rate[index], opt,
                       _prepare_fixed(cfg, win)(f_pyr[lvl]) if cfg.iterations[index] > 0
                       else None))
    stages = [stage for stage in stages if stage[3] > 0]
    warmup = _precompile(stages, m_pyr, affine)

    w, w_level = None, None
    for index, (name, lvl, vlevel, total, lr0, opt, fixed_in) in enumerate(stages):
        if index in warmup:
            warmup[index].join()
        t0 = time.perf_counter()
        label = f"{name} ({'x'.join(map(str, shapes[lvl]))})"
        if vlevel is None:
            opt.reset(theta)
            context = affine
        else:
            if w_level is None:  # the affine is final from here on
                affine = _params_to_affine(theta, affine, ndims, scale)
                theta = tf.zeros_like(theta)
            w = _move_to_level(w, w_level, vlevel, shapes, ndims)
            w_level = vlevel
            opt.reset(w)
            context = affine
        for it in range(total):
            lr = lr0 * (1.0 - (1.0 - cfg.lr_decay) * it / max(total - 1, 1))
            loss = opt.step(tf.constant(lr, tf.float32), fixed_in, m_pyr[lvl], context)
            if it % 10 == 0 or it == total - 1:
                report(label, it + 1, total, float(loss))
        if vlevel is None:
            theta = tf.identity(opt.param)
        else:
            w = tf.identity(opt.param)
        times[name] = time.perf_counter() - t0
    affine = _params_to_affine(theta, affine, ndims, scale)

    # full-resolution displacement (eager: runs once, nothing to compile)
    t0 = time.perf_counter()
    points = _level_grid(shape, 1.0, centre)
    velocity = None
    if w is not None:
        velocity = filters.box_gaussian(w, _sigma(cfg, w_level))
        points = points + velocity_displacement(velocity[0], w_level, shape, cfg.int_steps)[None]
    disp = (_apply_affine(points, affine, centre) - _level_grid(shape, 1.0, np.zeros(ndims)))[0]
    disp = disp.numpy()
    warped = sampling.warp(moving_t, disp[None]).numpy()[0, ..., 0]
    result = InstanceResult(disp=disp, affine=affine.numpy(),
                            similarity=local_ncc(fixed, warped),
                            initial_similarity=local_ncc(fixed, moving), config=cfg,
                            velocity=None if velocity is None else velocity.numpy()[0],
                            velocity_level=w_level or 0)
    times["final"] = time.perf_counter() - t0
    result.stage_seconds = times
    return result
