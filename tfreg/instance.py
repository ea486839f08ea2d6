"""Instance optimisation: register one pair without a trained network.

Pipeline (all on arrays already on the fixed grid, 2D or 3D):

1. **Moments** – a translation that aligns the intensity centres of mass.
2. **Affine** – a centred affine `y = A (x - c) + b + c` (voxels of the fixed grid, `c = (shape-1)/2`,
   as in `tfreg.layers.affine_to_disp`) fitted by Adam on a coarse image pyramid level.
3. **Diffeomorphic** – a stationary velocity field `v` optimised coarse to fine on an image pyramid
   (levels are average-pooled by 2 per level); the displacement is `u = exp(v)` by scaling and
   squaring. The loss is `similarity(fixed, moving o T) + lambda * mean |grad v|^2`, and the
   gradient of `v` is smoothed by a Gaussian before each Adam step (a demons-like preconditioner
   that keeps the updates smooth without a large `lambda`).

The total transform maps a fixed-grid point `x` to the moving-grid point `A (x + u(x) - c) + b + c`,
so the final displacement (pull, voxels of the fixed grid, channel `d` along array axis `d`) is
`disp(x) = A (x + u(x) - c) + b + c - x`: the affine and the deformable part are combined
analytically and the moving image is interpolated only once.

Pyramid geometry: level `k` has `ceil(n / 2**k)` voxels per axis; its voxel `q` sits at the
full-resolution voxel `x = 2**k q` (average pooling with a 3-voxel window centred on the even voxels,
`tfreg.losses.avg_pool_half`). Displacements at level `k` are in level voxels: multiply by `2**k` to
get full-resolution voxels.

Every optimisation step is one `tf.function` per level shape (XLA-compiled when `jit` is on, which
pays on CPU for the gather-heavy warping); images and parameters are passed as arguments, never
captured as constants, so a compiled step is reused for every pair of the same shape in a process.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from tfreg import layers, losses
from tfreg.errors import ConfigError, InputError

__all__ = ["InstanceConfig", "InstanceResult", "PRESETS", "make_config", "register_arrays",
           "moments_init", "normalize_image"]

SIMILARITIES = ("ncc", "mse")


@dataclass(frozen=True)
class InstanceConfig:
    """Settings of the instance optimisation (see `PRESETS` for tuned values).

    Attributes:
        levels: pyramid levels of the diffeomorphic stage, coarse to fine, as downsampling
            exponents (`2` = quarter resolution, `1` = half, `0` = full).
        iterations: Adam steps per level (same length as `levels`).
        learning_rate: Adam step size per level, in level voxels of velocity.
        lam: weight of the smoothness penalty `mean |grad v|^2` (level voxels per level voxel).
        grad_sigma: Gaussian sigma (level voxels) of the smoothing applied to the velocity
            gradient before each Adam step; 0 = off.
        int_steps: scaling-and-squaring steps per level.
        similarity: `"ncc"` (local normalised cross-correlation; robust to intensity scaling) or
            `"mse"` (same modality, same intensity scale).
        ncc_win: NCC window per level, in level voxels.
        affine: run the affine stage (after the moments initialisation).
        affine_level: pyramid level of the affine stage.
        affine_iterations: Adam steps of the affine stage.
        affine_lr: Adam step size of the affine parameters (matrix entries; the translation is
            in units of `affine_scale` voxels).
        jit: XLA-compile the optimisation steps (`True`/`False`), or `"auto"`: on for CPU and GPU.
    """

    levels: tuple[int, ...] = (2, 1)
    iterations: tuple[int, ...] = (150, 80)
    learning_rate: tuple[float, ...] = (0.2, 0.2)
    lam: float = 0.5
    grad_sigma: float = 0.0
    param_sigma: float = 1.0
    exact_grad: bool = False
    field_level: int = 1
    lr_decay: float = 1.0
    ncc_eps: float = 1e-3
    ncc_squared: bool = False
    ncc_floor: float = 0.0
    floor_decay: float = 1.0
    int_steps: int = 5
    similarity: str = "ncc"
    ncc_win: tuple[int, ...] = (5, 5)
    affine: bool = True
    affine_level: int = 2
    affine_iterations: int = 100
    affine_lr: float = 0.01
    jit: bool | str = "auto"

    def validate(self, source: str = "instance") -> "InstanceConfig":
        """Check types and ranges; raise `ConfigError` naming the bad option."""
        n = len(self.levels)
        if n == 0 and not self.affine:
            raise ConfigError(f"{source}: nothing to do (no levels and no affine stage)")
        for name in ("iterations", "learning_rate", "ncc_win"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"{source}: {name}: expected {n} values (one per level), "
                                  f"got {len(getattr(self, name))}")
        if any(not isinstance(k, int) or k < 0 or k > 6 for k in self.levels):
            raise ConfigError(f"{source}: levels: expected integers in 0..6, got {self.levels}")
        if list(self.levels) != sorted(self.levels, reverse=True):
            raise ConfigError(f"{source}: levels: must go from coarse to fine, got {self.levels}")
        if any(i < 0 for i in self.iterations) or self.affine_iterations < 0:
            raise ConfigError(f"{source}: iterations must be >= 0")
        if self.lam < 0 or self.grad_sigma < 0:
            raise ConfigError(f"{source}: lambda and grad_sigma must be >= 0")
        if self.similarity not in SIMILARITIES:
            raise ConfigError(f"{source}: similarity: expected one of {', '.join(SIMILARITIES)}, "
                              f"got {self.similarity!r}")
        if any(w < 1 for w in self.ncc_win):
            raise ConfigError(f"{source}: ncc_win must be >= 1")
        if not 0 <= self.int_steps <= 12:
            raise ConfigError(f"{source}: int_steps: expected 0..12, got {self.int_steps}")
        return self


#: tuned settings; "accurate" is the default of `tfreg register`.
PRESETS: dict[str, InstanceConfig] = {
    "accurate": InstanceConfig(),
    "fast": InstanceConfig(levels=(2,), iterations=(120,), learning_rate=(0.2,), ncc_win=(5,)),
}


def make_config(preset: str = "accurate", **overrides) -> InstanceConfig:
    """A preset with some fields replaced (None values are ignored).

    `iterations`, `learning_rate` and `ncc_win` may be given as one number for all levels.
    `levels` may be given as a count `n` (the `n` finest of quarter.. levels: 3 -> (2, 1, 0)).
    """
    if preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    cfg = PRESETS[preset]
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "levels" in changes and isinstance(changes["levels"], int):
        count = changes["levels"]
        if not 1 <= count <= 4:
            raise ConfigError(f"--levels: expected 1..4, got {count}")
        changes["levels"] = tuple(range(count - 1, -1, -1)) if count > 2 else tuple(
            range(count, 0, -1))
    if "levels" in changes:
        changes["levels"] = tuple(changes["levels"])
    n = len(changes.get("levels", cfg.levels))
    for name in ("iterations", "learning_rate", "ncc_win"):
        value = changes.get(name)
        if value is None and name in ("iterations", "learning_rate", "ncc_win") and \
                len(getattr(cfg, name)) != n:
            old = getattr(cfg, name)
            value = tuple(old[min(i, len(old) - 1)] for i in range(n))
        if value is not None and not isinstance(value, (tuple, list)):
            value = (value,) * n
        if value is not None:
            changes[name] = tuple(value)
    try:
        cfg = dataclasses.replace(cfg, **changes)
    except TypeError as err:
        raise ConfigError(f"instance optimisation: {err}") from None
    return cfg.validate()


@dataclass
class InstanceResult:
    """Result of `register_arrays`.

    Attributes:
        disp: `(*S, N)` float32 displacement, pull, voxels of the fixed grid.
        affine: `(N, N+1)` centred affine `[A | b]` of the affine stage (identity without it).
        similarity: final local NCC (signed, in [-1, 1], higher is better) at full resolution.
        initial_similarity: the same before registration.
        stage_seconds: wall time per stage (includes tracing/compilation).
    """

    disp: np.ndarray
    affine: np.ndarray
    similarity: float
    initial_similarity: float
    stage_seconds: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ helpers
def normalize_image(image: np.ndarray, low: float = 0.0, high: float = 99.9) -> np.ndarray:
    """Scale intensities to [0, 1] by robust percentiles (`low`, `high`, in percent) and clip."""
    image = np.asarray(image, np.float32)
    lo, hi = np.percentile(image, [low, high])
    if not hi > lo:
        hi = lo + 1.0
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def moments_init(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Translation aligning the intensity centres of mass, as a centred affine `(N, N+1)`.

    Intensities below 10% of the maximum are ignored (background). Returns `[I | b]` with
    `b = com_moving - com_fixed` (voxels), so that `y = x - c + b + c` maps the fixed centre of mass
    onto the moving one.
    """
    def com(img: np.ndarray) -> np.ndarray:
        w = np.where(img > 0.1 * img.max(), img, 0.0).astype(np.float64)
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


def _pyramid(image: tf.Tensor, depth: int) -> list[tf.Tensor]:
    """`[level 0 (input), level 1, ..., level depth]`, each average-pooled by 2 (3-voxel window)."""
    out = [image]
    for _ in range(depth):
        out.append(losses.avg_pool_half(out[-1]))
    return out


def _level_grid(shape: Sequence[int], factor: float, centre: np.ndarray) -> tf.Tensor:
    """Full-resolution centred coordinates `factor * q - c` of the level voxels, `(1, *shape, N)`."""
    axes = [tf.range(n, dtype=tf.float32) * factor - float(c) for n, c in zip(shape, centre)]
    return tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)[None]


def _apply_affine(points: tf.Tensor, affine: tf.Tensor, centre: np.ndarray) -> tf.Tensor:
    """`A p + b + c` for centred points `p (1, *S, N)`; returns uncentred full-resolution voxels."""
    ndims = points.shape[-1]
    matrix, trans = affine[:, :ndims], affine[:, ndims]
    moved = tf.tensordot(points, tf.transpose(matrix), axes=1) + trans
    return moved + tf.constant(centre, tf.float32)


def _upsample(field_: tf.Tensor, shape: Sequence[int]) -> tf.Tensor:
    """Linear interpolation of a level-`k` array onto level `k-1` (voxel `p` -> `p / 2`).

    Output voxel `2k` copies input `k`; `2k+1` averages inputs `k` and `k+1` (the last input is
    repeated at the border). Built from slices and reshapes only (cheap gradients under XLA).
    Values are not rescaled. `field_`: `(1, *S, C)` with `S` = `ceil(shape / 2)`.

    Returns:
        `(1, *shape, C)`.
    """
    out = field_
    ndims = len(shape)
    for d, n_out in enumerate(shape):
        axis = d + 1
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        nxt = tf.concat([tf.gather(out, list(range(1, n_in)), axis=axis),
                         tf.gather(out, [n_in - 1], axis=axis)], axis=axis) if n_in > 1 else out
        mid = 0.5 * (out + nxt)
        pair = tf.stack([out, mid], axis=axis + 1)
        new_shape = [-1 if i == 0 else out.shape[i] for i in range(ndims + 2)]
        new_shape[axis] = 2 * n_in
        out = tf.reshape(pair, new_shape)
        if 2 * n_in != n_out:
            index = [slice(None)] * (ndims + 2)
            index[axis] = slice(0, n_out)
            out = out[tuple(index)]
    return out


def _gaussian_smooth(x: tf.Tensor, sigma: float) -> tf.Tensor:
    """Approximate Gaussian smoothing (sigma in voxels) by three passes of a separable box filter."""
    if sigma <= 0:
        return x
    # variance of a box of width w is (w^2 - 1) / 12; three passes add up
    width = max(1, int(round(math.sqrt(4.0 * sigma * sigma + 1.0))))
    if width % 2 == 0:
        width += 1
    ndims = len(x.shape) - 2
    win = (width,) * ndims
    norm = 1.0 / float(width ** ndims)
    for _ in range(3):
        x = losses.box_sum(x, win) * norm
    return x


def _similarity_fn(cfg: InstanceConfig, win: int, level: int = 0
                   ) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Loss (lower is better) between fixed and warped images `(1, *S, 1)` at a pyramid level."""
    if cfg.similarity == "mse":
        return lambda f, w: tf.reduce_mean(tf.square(f - w)) * 100.0
    if cfg.ncc_floor <= 0:
        return losses.NCC(win=win, squared=cfg.ncc_squared, eps=cfg.ncc_eps,
                          eps_mode="clamp" if cfg.ncc_squared else "add")
    floor = cfg.ncc_floor * cfg.floor_decay ** level
    return lambda f, w: _weighted_ncc(f, w, win, cfg.ncc_eps, floor)


def _weighted_ncc(fixed: tf.Tensor, warped: tf.Tensor, win: int, eps: float,
                  floor: float) -> tf.Tensor:
    """`-sum(weight * cc) / sum(weight)`: local signed NCC, windows weighted by fixed contrast.

    `cc = cross / sqrt(var_f var_w + eps)` over a `win`-voxel box (sums, as `tfreg.losses.NCC`);
    `weight = var_f / (var_f + n floor^2)`, with `n` the window size and `floor` an intensity
    standard deviation: windows where the fixed image is flat (background, the inside of a
    structure) count little, so the optimisation gains nothing by dragging edges into them.
    """
    ndims = len(fixed.shape) - 2
    n = float(win ** ndims)
    sums = losses.box_sum(tf.concat([fixed, warped, fixed * fixed, warped * warped,
                                     fixed * warped], axis=-1), (win,) * ndims)
    s_f, s_w, s_ff, s_ww, s_fw = tf.unstack(sums, axis=-1)
    var_f = tf.maximum(s_ff - s_f * s_f / n, 0.0)
    var_w = tf.maximum(s_ww - s_w * s_w / n, 0.0)
    cross = s_fw - s_f * s_w / n
    cc = cross / tf.sqrt(var_f * var_w + eps)
    weight = tf.stop_gradient(var_f / (var_f + n * floor * floor))
    return -tf.reduce_sum(weight * cc) / (tf.reduce_sum(weight) + 1e-12)


def _integrate(velocity: tf.Tensor, steps: int) -> tf.Tensor:
    """Scaling and squaring, `u = exp(v)`, as `tfreg.layers.integrate_svf` but in a `tf.while_loop`.

    The loop keeps XLA from fusing consecutive warps into one huge kernel: on CPU the unrolled form
    compiles in ~10 s and runs ~15x slower for 5 steps at 24x28x24; the loop compiles in under 1 s.
    """
    disp = velocity / float(2 ** steps)
    if steps == 0:
        return disp
    _, disp = tf.while_loop(lambda i, d: i < steps, lambda i, d: (i + 1, d + layers.warp(d, d)),
                            (tf.constant(0), disp), maximum_iterations=steps)
    return disp


def _grad_l2(v: tf.Tensor) -> tf.Tensor:
    """`mean |grad v|^2` by forward differences, averaged over axes."""
    ndims = len(v.shape) - 2
    terms = []
    for d in range(ndims):
        hi = [slice(None)] * (ndims + 2)
        lo = [slice(None)] * (ndims + 2)
        hi[d + 1] = slice(1, None)
        lo[d + 1] = slice(None, -1)
        terms.append(tf.reduce_mean(tf.square(v[tuple(hi)] - v[tuple(lo)])))
    return tf.add_n(terms) / ndims


def _adam(param, grad, m, s, t, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """One Adam update (Kingma & Ba 2015) on tensors; `t` is the 1-based step (float32)."""
    m = beta1 * m + (1 - beta1) * grad
    s = beta2 * s + (1 - beta2) * tf.square(grad)
    m_hat = m / (1 - beta1 ** t)
    s_hat = s / (1 - beta2 ** t)
    return param - lr * m_hat / (tf.sqrt(s_hat) + eps), m, s


# ------------------------------------------------------------------------ compiled step cache
_STEPS: dict[tuple, Callable] = {}


def _compiled(key: tuple, build: Callable[[], Callable], jit: bool) -> Callable:
    """One `tf.function` per key (shape and static settings), reused across pairs."""
    key = key + (jit,)
    if key not in _STEPS:
        _STEPS[key] = tf.function(build(), jit_compile=jit, autograph=False)
    return _STEPS[key]


def _params_to_affine(params: tf.Tensor, init: tf.Tensor, ndims: int, scale: float) -> tf.Tensor:
    """`params (N*(N+1),)`: matrix increments and translation in units of `scale` voxels."""
    delta = tf.reshape(params, (ndims, ndims + 1))
    weights = tf.constant([[1.0] * ndims + [scale]] * ndims, tf.float32)
    return init + delta * weights


def _step_fn(cfg: InstanceConfig, shapes: list[tuple[int, ...]], level: int, vlevel: int,
             win: int, centre: np.ndarray, scale: float) -> Callable:
    """One Adam step on the affine parameters and the velocity parameters.

    The images are compared at pyramid level `level`; the velocity lives on level
    `vlevel >= level` and its displacement is upsampled to the image level. The learning rates are
    arguments, so the same compiled step serves the affine stage (velocity rate 0) and the
    deformable stage (affine rate 0).
    """
    shape = shapes[level]
    ndims = len(shape)
    factor = float(2 ** level)
    sim = _similarity_fn(cfg, win, level)

    def step(theta, w, state, t, lrs, fixed, moving, init):
        m_a, s_a, m_w, s_w = state
        with tf.GradientTape() as tape:
            tape.watch([theta, w])
            affine = _params_to_affine(theta, init, ndims, scale)
            v = _gaussian_smooth(w, cfg.param_sigma)
            if cfg.exact_grad:
                u = _integrate(v, cfg.int_steps)
            else:
                # straight-through: exp(v) forward, identity Jacobian backward (du/dv ~ I)
                u = tf.stop_gradient(_integrate(v, cfg.int_steps) - v) + v
            u = u * float(2 ** vlevel)  # full-resolution voxels
            for k in range(vlevel, level, -1):
                u = _upsample(u, shapes[k - 1])
            pts = _level_grid(shape, factor, centre) + u
            loc = _apply_affine(pts, affine, centre) / factor
            disp = loc - _level_grid(shape, 1.0, np.zeros(ndims))
            warped = layers.warp(moving, disp)
            sim_loss = sim(fixed, warped)
            loss = sim_loss + cfg.lam * _grad_l2(v)
        g_a, g_w = tape.gradient(loss, [theta, w])
        g_w = _gaussian_smooth(g_w, cfg.grad_sigma)
        theta, m_a, s_a = _adam(theta, g_a, m_a, s_a, t[0], lrs[0])
        w, m_w, s_w = _adam(w, g_w, m_w, s_w, t[1], lrs[1])
        return theta, w, (m_a, s_a, m_w, s_w), sim_loss

    return step


def _local_ncc(fixed: tf.Tensor, warped: tf.Tensor, win: int = 7) -> float:
    return float(losses.NCC(win=win, squared=False, eps=1e-3, eps_mode="add").local_cc(
        fixed, warped).numpy().mean())


def _use_jit(cfg: InstanceConfig) -> bool:
    if isinstance(cfg.jit, bool):
        return cfg.jit
    return True


# ------------------------------------------------------------------------------- main entry
def register_arrays(fixed: np.ndarray, moving: np.ndarray, cfg: InstanceConfig | None = None, *,
                    init_affine: np.ndarray | None = None,
                    init_disp: np.ndarray | None = None,
                    progress: Callable[[str, int, int, float], None] | None = None,
                    ) -> InstanceResult:
    """Register `moving` to `fixed` (same grid) by instance optimisation.

    Args:
        fixed, moving: `(*S,)` float arrays on the same grid, 2D or 3D, intensities roughly in
            [0, 1] (see `normalize_image`).
        cfg: settings; defaults to `PRESETS["accurate"]`.
        init_affine: optional `(N, N+1)` centred affine to start from (skips the moments step).
        init_disp: optional `(*S, N)` displacement (voxels) used as initial velocity (an
            approximation: a displacement is not the exponential of itself, but close for small,
            smooth fields); the affine stage is then skipped.
        progress: called as `progress(stage, step, total, loss)` every few steps.

    Returns:
        `InstanceResult` with the full-resolution displacement.
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
    centre = (np.asarray(shape, np.float64) - 1) / 2.0
    jit = _use_jit(cfg)
    depth = max(list(cfg.levels) + ([cfg.affine_level] if cfg.affine else []) + [0])
    if min(shape) < 2 ** depth * 2:
        raise InputError(f"fixed: shape {shape} is too small for {depth} pyramid levels")
    report = progress or (lambda *a: None)
    times: dict[str, float] = {}

    f_pyr = _pyramid(tf.constant(fixed[None, ..., None]), depth)
    m_pyr = _pyramid(tf.constant(moving[None, ..., None]), depth)
    shapes = [tuple(x.shape[1:-1]) for x in f_pyr]
    scale = float(max(shape)) / 10.0

    # 1. moments (or the given affine)
    if init_affine is not None:
        affine = np.asarray(init_affine, np.float32)
    elif cfg.affine and init_disp is None:
        affine = moments_init(fixed, moving)
    else:
        affine = np.concatenate([np.eye(ndims), np.zeros((ndims, 1))], axis=1).astype(np.float32)
    affine = tf.constant(affine, tf.float32)
    theta = tf.zeros((ndims * (ndims + 1),), tf.float32)

    # velocity parameters and the level they live on
    w, w_level = None, None
    if init_disp is not None:
        w = tf.constant(np.asarray(init_disp, np.float32)[None])
        w_level = 0

    stages = []
    if cfg.affine and init_disp is None and cfg.affine_iterations > 0:
        win = cfg.ncc_win[0] if cfg.levels else 5
        stages.append(("affine", cfg.affine_level, win, cfg.affine_iterations, cfg.affine_lr, 0.0))
    for index, lvl in enumerate(cfg.levels):
        stages.append((f"level {index + 1}/{len(cfg.levels)}", lvl, cfg.ncc_win[index],
                       cfg.iterations[index], 0.0, cfg.learning_rate[index]))

    for name, lvl, win, total, lr_a, lr_w in stages:
        t0 = time.perf_counter()
        lshape = shapes[lvl]
        vlevel = min(max(lvl, cfg.field_level), depth)
        w = _move_to_level(w, w_level, vlevel, shapes, ndims)
        w_level = vlevel
        step = _compiled(("step", tuple(shapes), lvl, vlevel, win, tuple(centre), scale, cfg),
                         lambda: _step_fn(cfg, shapes, lvl, vlevel, win, centre, scale), jit)
        state = (tf.zeros_like(theta), tf.zeros_like(theta), tf.zeros_like(w), tf.zeros_like(w))
        label = f"{name} ({'x'.join(map(str, lshape))})"
        for it in range(total):
            t = tf.constant([it + 1.0, it + 1.0], tf.float32)
            # linear decay of the step size to `lr_decay` times its initial value
            frac = 1.0 - (1.0 - cfg.lr_decay) * it / max(total - 1, 1)
            lrs = tf.constant([lr_a * frac, lr_w * frac], tf.float32)
            theta, w, state, loss = step(theta, w, state, t, lrs, f_pyr[lvl], m_pyr[lvl], affine)
            if it % 10 == 0 or it == total - 1:
                report(label, it + 1, total, float(loss))
        times[name] = time.perf_counter() - t0

    # 4. full-resolution displacement (eager: runs once, no compilation to wait for)
    t0 = time.perf_counter()
    affine = _params_to_affine(theta, affine, ndims, scale)
    if w is None:
        disp = _apply_affine(_level_grid(shape, 1.0, centre), affine, centre) - \
            _level_grid(shape, 1.0, np.zeros(ndims))
    else:
        u = _integrate(_gaussian_smooth(w, cfg.param_sigma), cfg.int_steps) * float(2 ** w_level)
        for k in range(w_level, 0, -1):
            u = _upsample(u, shapes[k - 1])
        pts = _level_grid(shape, 1.0, centre) + u
        disp = _apply_affine(pts, affine, centre) - _level_grid(shape, 1.0, np.zeros(ndims))
    warped = layers.warp(m_pyr[0], disp)
    sim_after = _local_ncc(f_pyr[0], warped)
    sim_before = _local_ncc(f_pyr[0], m_pyr[0])
    times["final"] = time.perf_counter() - t0
    return InstanceResult(disp=disp.numpy()[0], affine=affine.numpy(),
                          similarity=sim_after, initial_similarity=sim_before,
                          stage_seconds=times)


def _move_to_level(w: tf.Tensor | None, src: int | None, dst: int, shapes: list[tuple[int, ...]],
                   ndims: int) -> tf.Tensor:
    """Velocity parameters from pyramid level `src` to `dst` (values in level voxels).

    None gives zeros. Finer levels are reached by linear upsampling (x2 values per level),
    coarser ones by average pooling (x0.5 values per level).
    """
    if w is None:
        return tf.zeros((1, *shapes[dst], ndims), tf.float32)
    for k in range(src, dst, -1):
        w = _upsample(w, shapes[k - 1]) * 2.0
    for _ in range(src, dst):
        w = losses.avg_pool_half(w) * 0.5
    return w
