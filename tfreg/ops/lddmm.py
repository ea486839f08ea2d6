"""Vector-momentum LDDMM: the fluid operator, geodesic shooting, energy and pairwise optimisation.

Notation (2D and 3D, channels-last, batch first):

* ``m`` momentum `(B, *S, N)`, ``v = K m`` velocity `(B, *S, N)` in **mm per unit time**; channel
  ``d`` along array axis ``d``. ``h`` = voxel spacing in mm (from the image header).
* ``L = -alpha Lap - beta grad(div) + gamma`` (power ``p``, default 1) is applied as the discrete,
  periodic FFT operator of PyCA's ``FluidKernelFFT``: per frequency ``k``,
  ``c_d = (2 - 2 cos(2 pi k_d / N_d)) / h_d^2``, ``s_d = sin(2 pi k_d / N_d) / h_d``,
  ``L_dd = alpha sum_e c_e + gamma + beta c_d``, ``L_de = beta s_d s_e`` (``d != e``), and
  ``K = L^-1`` is solved per frequency (an N x N matrix). This is exactly the inverse of ``L``
  discretised by the 3-point Laplacian, 3-point second differences on the diagonal of
  ``grad(div)`` and products of central differences off the diagonal, with periodic boundaries.
* Maps are stored as displacements in **voxels** (tfreg's convention): the forward map
  ``phi(x) = x + u_fwd(x)`` and its inverse ``phi^-1(y) = y + u_inv(y)``. The deformed moving image
  is ``I0 o phi^-1``, so ``u_inv`` is the tfreg displacement (pull, fixed grid):
  ``warped(y) = moving(y + u_inv(y))``; ``u_fwd`` (on the moving grid) warps the fixed image back
  into moving space: ``fixed(x + u_fwd(x))``.

Shooting follows PyCA's ``IntegrateGeodesic`` (RK4): the momentum is never integrated, it is
carried by the co-adjoint action of the current inverse map,
``m_t = Ad*_{phi_t^-1} m0 = |D phi_t^-1| (D phi_t^-1)^T m0 o phi_t^-1``; ``v_t = K m_t``; RK4
integrates the forward map ``d phi / dt = v_t o phi`` over unit time; at every RK stage the inverse
map is refreshed by fixed-point iterations ``phi_new^-1 = phi^-1 o (Id - w o phi_new^-1)`` for the
forward increment ``w`` (`update_inverse`), and ``m`` recomputed from it.

Sampling clamps to the border (tfreg's default) where PyCA fills zero (partial) or identity; inside
the volume the two agree. Jacobians use central differences inside and one-sided differences at
the border.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import tensorflow as tf

from tfreg.ops import compile_cache
from tfreg.ops.differences import jacobian
from tfreg.ops.fourier import apply_matrix_multiplier, half_shape, wavenumbers
from tfreg.ops.inverse import invert_displacement
from tfreg.ops.sampling import warp

__all__ = ["LddmmConfig", "LddmmResult", "operator_matrix", "kernel_matrix", "FluidKernel",
           "coadjoint", "update_inverse", "shoot", "energy", "register_pair",
           "OPTIMIZERS"]

OPTIMIZERS = ("gd", "adam")


# ------------------------------------------------------------------------------- the operator
def _symbols(shape: Sequence[int], spacing: Sequence[float]) -> tuple[list, list]:
    """``c_d`` and ``s_d`` of every axis on the half spectrum (float64, broadcast to full)."""
    shape = tuple(int(s) for s in shape)
    half = half_shape(shape)
    c, s = [], []
    for d, k in enumerate(wavenumbers(shape)):
        w = 2.0 * np.pi * k / shape[d]
        c.append(np.broadcast_to((2.0 - 2.0 * np.cos(w)) / spacing[d] ** 2, half))
        s.append(np.broadcast_to(np.sin(w) / spacing[d], half))
    return c, s


def _check_spacing(shape: Sequence[int], spacing: Sequence[float] | None) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * len(shape)
    spacing = tuple(float(h) for h in spacing)
    if len(spacing) != len(shape) or min(spacing) <= 0:
        raise ValueError(f"spacing must hold {len(shape)} positive voxel sizes (mm), "
                         f"got {spacing}")
    return spacing


def operator_matrix(shape: Sequence[int], spacing: Sequence[float] | None = None,
                    alpha: float = 0.01, beta: float = 0.01, gamma: float = 0.001) -> np.ndarray:
    """Symbol of ``L = -alpha Lap - beta grad(div) + gamma`` per frequency.

    Args:
        shape: spatial shape `S` (2 or 3 axes).
        spacing: voxel size per axis in mm (None = 1).

    Returns:
        `(*half_shape(S), N, N)` float64, real symmetric.
    """
    spacing = _check_spacing(shape, spacing)
    c, s = _symbols(shape, spacing)
    n = len(shape)
    lam = alpha * sum(c) + gamma
    mat = np.zeros(half_shape(shape) + (n, n))
    for d in range(n):
        mat[..., d, d] = lam + beta * c[d]
        for e in range(n):
            if e != d:
                mat[..., d, e] = beta * s[d] * s[e]
    return mat


def kernel_matrix(shape: Sequence[int], spacing: Sequence[float] | None = None,
                  alpha: float = 0.01, beta: float = 0.01, gamma: float = 0.001,
                  power: int = 1) -> np.ndarray:
    """Symbol of ``K = L^-power`` per frequency, `(*half_shape(S), N, N)` float64.

    With ``gamma = 0`` the zero frequency of ``K`` is set to 0 (as PyCA does); ``L`` is singular
    there.
    """
    if int(power) != power or power < 1:
        raise ValueError(f"power must be a positive integer, got {power}")
    mat = operator_matrix(shape, spacing, alpha, beta, gamma)
    zero = (0,) * len(shape)
    if gamma == 0:
        mat[zero] = np.eye(len(shape))
    kern = np.linalg.inv(mat)
    kern = np.linalg.matrix_power(kern, int(power)) if power > 1 else kern
    if gamma == 0:
        kern[zero] = 0.0
    return kern


@dataclass(frozen=True)
class FluidKernel:
    """``K = L^-p`` and ``L^p`` for one grid, ready to apply to `(B, *S, N)` fields.

    Build with `FluidKernel.create(shape, spacing, alpha, beta, gamma, power)`.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    kernel: tf.Tensor       # (*half, N, N) complex64
    operator: tf.Tensor     # (*half, N, N) complex64
    params: tuple = ()      # (alpha, beta, gamma, power)

    @staticmethod
    def create(shape: Sequence[int], spacing: Sequence[float] | None = None, alpha: float = 0.01,
               beta: float = 0.01, gamma: float = 0.001, power: int = 1) -> "FluidKernel":
        shape = tuple(int(s) for s in shape)
        spacing = _check_spacing(shape, spacing)
        kern = kernel_matrix(shape, spacing, alpha, beta, gamma, power)
        op = np.linalg.matrix_power(operator_matrix(shape, spacing, alpha, beta, gamma),
                                    int(power))
        return FluidKernel(shape, spacing, tf.constant(kern, tf.complex64),
                           tf.constant(op, tf.complex64),
                           (float(alpha), float(beta), float(gamma), int(power)))

    def smooth(self, m: tf.Tensor) -> tf.Tensor:
        """``v = K m`` `(B, *S, N)`."""
        return _self_adjoint(m, self.kernel)

    def apply_operator(self, v: tf.Tensor) -> tf.Tensor:
        """``m = L v`` `(B, *S, N)`."""
        return _self_adjoint(v, self.operator)


def _self_adjoint(x: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """Apply a real symmetric, frequency-even matrix multiplier; its gradient is the same
    operator applied to the upstream gradient (the operator is self-adjoint). TensorFlow has
    no gradient for the 3D real FFTs, so this also makes 3D LDDMM differentiable."""
    @tf.custom_gradient
    def apply(t):           # the matrix is a constant: no gradient for it
        def grad(dy):
            return apply_matrix_multiplier(dy, matrix)

        return apply_matrix_multiplier(t, matrix), grad

    return apply(tf.convert_to_tensor(x, tf.float32))


# ---------------------------------------------------------------------- maps and their algebra
def _warp(field_: tf.Tensor, disp: tf.Tensor) -> tf.Tensor:
    """``field(x + disp(x))``, linear, border clamped; the backward pass recomputes the
    interpolation (`warp(lean_gradient=True)`): a gradient through the shooting keeps each
    warp's inputs, not its corners and weights."""
    return warp(field_, disp, lean_gradient=True)


def _det(j: tf.Tensor) -> tf.Tensor:
    if j.shape[-1] == 2:
        return j[..., 0, 0] * j[..., 1, 1] - j[..., 0, 1] * j[..., 1, 0]
    return (j[..., 0, 0] * (j[..., 1, 1] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 1])
            - j[..., 0, 1] * (j[..., 1, 0] * j[..., 2, 2] - j[..., 1, 2] * j[..., 2, 0])
            + j[..., 0, 2] * (j[..., 1, 0] * j[..., 2, 1] - j[..., 1, 1] * j[..., 2, 0]))


def coadjoint(disp: tf.Tensor, m: tf.Tensor, spacing: Sequence[float]) -> tf.Tensor:
    """Co-adjoint action ``Ad*_g m = |Dg| (Dg)^T m o g`` of the map ``g(x) = x + disp(x)``.

    Args:
        disp: `(B, *S, N)` displacement of ``g`` in voxels.
        m: `(B, *S, N)` momentum (per-mm components).
        spacing: voxel size per axis (mm); the Jacobian is taken in mm: ``H J_vox H^-1``.

    Returns:
        `(B, *S, N)` momentum.
    """
    h = tf.constant(spacing, tf.float32)
    jac = jacobian(disp)                                         # central, one-sided at ends
    moved = _warp(m, disp) * h                                   # H m o g
    out = tf.einsum("...ij,...i->...j", jac, moved) / h           # H^-1 J^T H (m o g)
    return out * _det(jac)[..., None]


def update_inverse(inverse: tf.Tensor, increment: tf.Tensor, iterations: int) -> tf.Tensor:
    """Inverse of ``phi + w`` from the inverse of ``phi`` (PyCA's ``UpdateInverse``).

    With ``phi_new(x) = phi(x) + w(x)``, ``phi_new = (Id + e) o phi`` for the Eulerian increment
    ``e = w o phi^-1``, so ``phi_new^-1 = phi^-1 o (Id + e)^-1``. ``(Id + e)^-1`` comes from
    `tfreg.ops.inverse.invert_displacement` (the fixed point ``z <- -e(y + z)``) started at
    ``z = 0`` and run exactly `iterations` times: the same iterates as PyCA's
    ``phi_new^-1 <- phi^-1 o (Id - w o phi_new^-1)`` started at ``phi^-1``, except that ``w o
    phi^-1`` is interpolated once on the grid (one sampling per iteration instead of two).

    Args:
        inverse: `(B, *S, N)` displacement of ``phi^-1`` (voxels).
        increment: `(B, *S, N)` forward increment ``w`` (voxels, on the domain of ``phi``).
        iterations: fixed-point iterations (the original: 20 at prediction, 5 when optimising);
            0 keeps ``phi^-1`` unchanged.

    Returns:
        `(B, *S, N)` displacement of ``phi_new^-1``.
    """
    iterations = int(iterations)
    inverse = tf.convert_to_tensor(inverse, tf.float32)
    if iterations == 0:
        return inverse
    eulerian = _warp(increment, inverse)
    z = invert_displacement(eulerian, iterations, tolerance=0.0, init=tf.zeros_like(eulerian),
                            lean_gradient=True)
    return z + _warp(inverse, z)


@dataclass
class Geodesic:
    """Result of `shoot` (tensors).

    Attributes:
        forward: `(B, *S, N)` displacement of ``phi_1`` (voxels, moving grid).
        inverse: `(B, *S, N)` displacement of ``phi_1^-1`` (voxels, fixed grid; tfreg's pull
            displacement: ``warped(y) = moving(y + inverse(y))``).
        momenta: ``m_t`` at ``t = 0, 1/T, .., 1`` when asked for, else empty.
    """

    forward: tf.Tensor
    inverse: tf.Tensor
    momenta: list = field(default_factory=list)


def shoot(m0: tf.Tensor, kernel: FluidKernel, steps: int = 10, inverse_iterations: int = 20,
          keep_momenta: bool = False) -> Geodesic:
    """Geodesic shooting from the initial momentum `m0` over unit time (RK4, `steps` steps).

    Args:
        m0: `(B, *S, N)` initial momentum.
        kernel: `FluidKernel` of the grid.
        steps: RK4 time steps (the original: 10).
        inverse_iterations: fixed-point iterations of every inverse-map refresh.
        keep_momenta: also return ``m_t`` after every step (for energy checks).

    Returns:
        `Geodesic` with both maps as voxel displacements.
    """
    m0 = tf.convert_to_tensor(m0, tf.float32)
    h = tf.constant(kernel.spacing, tf.float32)
    dt = 1.0 / float(steps)
    # the loop's recomputed steps read the kernel as a tensor of this graph: the while-loop
    # gradient cannot map a captured eager constant into its recomputation
    kernel = replace(kernel, kernel=tf.identity(kernel.kernel),
                     operator=tf.identity(kernel.operator))
    fwd = tf.zeros_like(m0)
    inv = tf.zeros_like(m0)
    momenta = [m0] if keep_momenta else []

    # A gradient through the shooting recomputes in the backward pass (`tf.recompute_grad`,
    # nested): each step keeps its three maps, each velocity and inverse refresh inside a
    # recomputed step its inputs, each sampling (lean gradient) its two inputs.
    @tf.recompute_grad
    def velocity(inverse, m0):
        return kernel.smooth(coadjoint(inverse, m0, kernel.spacing))

    @tf.recompute_grad
    def refresh(inverse, increment):
        return update_inverse(inverse, increment, inverse_iterations)

    def rhs(v, forward):
        return dt * _warp(v, forward) / h                           # voxels of the map per step

    @tf.recompute_grad
    def step_fn(fwd, inv, v, m0):
        k1 = rhs(v, fwd)
        inv2 = refresh(inv, 0.5 * k1)
        k2 = rhs(velocity(inv2, m0), fwd + 0.5 * k1)
        inv3 = refresh(inv, 0.5 * k2)
        k3 = rhs(velocity(inv3, m0), fwd + 0.5 * k2)
        inv4 = refresh(inv, k3)
        k4 = rhs(velocity(inv4, m0), fwd + k3)
        step = (k1 + 2.0 * k2 + 2.0 * k3 + k4) / 6.0
        inv = refresh(inv, step)
        m = coadjoint(inv, m0, kernel.spacing)
        return fwd + step, inv, m

    v = kernel.smooth(m0)
    steps = int(steps)
    path = tf.TensorArray(tf.float32, size=steps if keep_momenta else 0, dynamic_size=False,
                          element_shape=m0.shape)

    def body(i, fwd, inv, v, path):
        fwd, inv, m = step_fn(fwd, inv, v, m0)
        if keep_momenta:
            path = path.write(i, m)
        return i + 1, fwd, inv, kernel.smooth(m), path

    # a loop, not unrolled: keeps graph building and XLA compilation short
    _, fwd, inv, _, path = tf.while_loop(lambda i, *_: i < steps, body,
                                         (tf.constant(0), fwd, inv, v, path),
                                         maximum_iterations=steps)
    if keep_momenta:
        momenta.extend(tf.unstack(path.stack(), num=steps))
    return Geodesic(fwd, inv, momenta)


def inner(m: tf.Tensor, kernel: FluidKernel) -> tf.Tensor:
    """``<m, K m>`` per batch element `(B,)` (sum over voxels and components)."""
    v = kernel.smooth(m)
    return tf.reduce_sum(tf.reshape(m * v, (tf.shape(m)[0], -1)), axis=1)


def energy(m0: tf.Tensor, moving: tf.Tensor, fixed: tf.Tensor, kernel: FluidKernel,
           sigma: float = 0.2, steps: int = 10, inverse_iterations: int = 5
           ) -> tuple[tf.Tensor, tf.Tensor, Geodesic]:
    """The matching energy ``1/2 <m0, K m0> + ||I0 o phi^-1 - I1||^2 / (2 sigma^2)``.

    Sums over voxels (the original prints both terms divided by the voxel count).

    Args:
        m0: `(B, *S, N)` initial momentum.
        moving: `(B, *S, 1)` ``I0``.
        fixed: `(B, *S, 1)` ``I1``.

    Returns:
        ``(regularity (B,), image mismatch (B,), geodesic)``.
    """
    geo = shoot(m0, kernel, steps, inverse_iterations)
    warped = _warp(moving, geo.inverse)
    res = tf.reshape(warped - fixed, (tf.shape(fixed)[0], -1))
    image = tf.reduce_sum(res * res, axis=1) / (2.0 * sigma * sigma)
    return 0.5 * inner(m0, kernel), image, geo


# ---------------------------------------------------------------------------- optimisation
@dataclass(frozen=True)
class LddmmConfig:
    """Settings of optimisation-based LDDMM (defaults: the Quicksilver training targets).

    Attributes:
        alpha, beta, gamma, power: the operator ``L`` (``[0.01, 0.01, 0.001]``, power 1).
        sigma: image noise level of the mismatch term (intensities in [0, 1]).
        steps: RK4 time steps of the shooting.
        inverse_iterations: fixed-point iterations per inverse refresh while optimising.
        iterations: optimiser iterations.
        optimizer: ``"gd"`` (the original's fixed-step gradient descent on ``m0``) or ``"adam"``
            (Adam on ``m0``; its gradient ``K m0 + K(...)`` is smooth, and ``v0 = K m0`` stays
            smooth whatever Adam's per-voxel scaling does).
        step_size: the gradient-descent step (the original: 4e-6, on the summed energy).
        learning_rate: Adam's step, in units of momentum.
        jit: XLA-compile the energy and gradient (compiled once per shape and settings).
    """

    alpha: float = 0.01
    beta: float = 0.01
    gamma: float = 0.001
    power: int = 1
    sigma: float = 0.2
    steps: int = 10
    inverse_iterations: int = 5
    iterations: int = 50
    optimizer: str = "gd"
    step_size: float = 4e-6
    learning_rate: float = 5e-4
    jit: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("steps", "iterations", "power"):
            if int(getattr(self, name)) < (1 if name != "iterations" else 0):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.inverse_iterations < 0 or self.sigma <= 0:
            raise ValueError("inverse_iterations must be >= 0 and sigma > 0")

    def kernel(self, shape: Sequence[int], spacing: Sequence[float] | None) -> FluidKernel:
        return FluidKernel.create(shape, spacing, self.alpha, self.beta, self.gamma, self.power)


@dataclass
class LddmmResult:
    """Outcome of `register_pair` (NumPy, batch axis removed).

    Attributes:
        momentum: `(*S, N)` optimised initial momentum ``m0``.
        disp: `(*S, N)` pull displacement on the fixed grid (``phi^-1``), voxels.
        forward: `(*S, N)` displacement of ``phi`` (moving grid), voxels.
        warped: `(*S)` ``I0 o phi^-1``.
        history: per iteration ``(regularity, image)`` energies divided by the voxel count (as
            the original prints them), before each update; the last row is the final state.
        seconds: wall time of the optimisation (including compilation).
    """

    momentum: np.ndarray
    disp: np.ndarray
    forward: np.ndarray
    warped: np.ndarray
    history: list[tuple[float, float]]
    seconds: float


def _energy_grad_fn(cfg: LddmmConfig, kernel: FluidKernel) -> Callable:
    """``(m0, moving, fixed) -> (reg, image, grad, forward, inverse)``, one `tf.function` per
    shape/settings; the maps are those of the shooting the energy was computed from."""
    key = ("lddmm.energy_grad", kernel.shape, kernel.spacing, kernel.params, cfg.sigma,
           cfg.steps, cfg.inverse_iterations)

    def fn(m0, moving, fixed):
        with tf.GradientTape() as tape:
            tape.watch(m0)
            reg, image, geo = energy(m0, moving, fixed, kernel, cfg.sigma, cfg.steps,
                                     cfg.inverse_iterations)
            total = tf.reduce_sum(reg + image)
        return reg, image, tape.gradient(total, m0), geo.forward, geo.inverse

    return compile_cache.compiled(key, fn, jit=cfg.jit)


def _shoot_fn(kernel: FluidKernel, steps: int, inverse_iterations: int, jit: bool) -> Callable:
    key = ("lddmm.shoot", kernel.shape, kernel.spacing, kernel.params, steps, inverse_iterations)

    def fn(m0):
        geo = shoot(m0, kernel, steps, inverse_iterations)
        return geo.forward, geo.inverse

    return compile_cache.compiled(key, fn, jit=jit)


def shoot_arrays(m0: np.ndarray, spacing: Sequence[float] | None = None,
                 cfg: LddmmConfig | None = None, inverse_iterations: int = 20
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Shoot a NumPy momentum `(B, *S, N)`; returns ``(forward, inverse)`` displacements
    `(B, *S, N)` in voxels (``inverse`` is tfreg's pull displacement)."""
    cfg = cfg or LddmmConfig()
    m0 = np.asarray(m0, np.float32)
    kernel = _kernel_cached(cfg, m0.shape[1:-1], spacing)
    fwd, inv = _shoot_fn(kernel, cfg.steps, inverse_iterations, cfg.jit)(tf.constant(m0))
    return fwd.numpy(), inv.numpy()


def _kernel_cached(cfg: LddmmConfig, shape: Sequence[int], spacing: Sequence[float] | None
                   ) -> FluidKernel:
    shape = tuple(int(s) for s in shape)
    spacing = _check_spacing(shape, spacing)
    key = ("lddmm.kernel", shape, spacing, cfg.alpha, cfg.beta, cfg.gamma, cfg.power)
    return compile_cache.cached(key, lambda: cfg.kernel(shape, spacing))


def register_pair(fixed: np.ndarray, moving: np.ndarray, spacing: Sequence[float] | None = None,
                  cfg: LddmmConfig | None = None, *, m0: np.ndarray | None = None,
                  progress: Callable[[str, int, int, float], None] | None = None
                  ) -> LddmmResult:
    """Optimisation-based LDDMM of one pair on one grid (the original's ``CAvmMatching``).

    Minimises `energy` over ``m0`` (starting at `m0` or zero) with the gradient from TensorFlow's
    autodiff through the discrete shooting.

    Args:
        fixed: `(*S)` target ``I1``, intensities about [0, 1].
        moving: `(*S)` ``I0``.
        spacing: voxel size in mm per axis (None = 1).
        cfg: `LddmmConfig` (default: the original's: GD, 50 iterations, step 4e-6).
        m0: `(*S, N)` starting momentum (default zeros).
        progress: ``progress(stage, step, total, energy)`` callback.

    Returns:
        `LddmmResult`.
    """
    cfg = cfg or LddmmConfig()
    fixed = np.asarray(fixed, np.float32)
    moving = np.asarray(moving, np.float32)
    if fixed.shape != moving.shape or fixed.ndim not in (2, 3):
        raise ValueError(f"fixed and moving must share one 2D/3D shape, got {fixed.shape} and "
                         f"{moving.shape}")
    shape = fixed.shape
    ndims = len(shape)
    kernel = _kernel_cached(cfg, shape, spacing)
    step_fn = _energy_grad_fn(cfg, kernel)
    f_t = tf.constant(fixed[None, ..., None])
    m_t = tf.constant(moving[None, ..., None])
    m = tf.constant(np.zeros((1, *shape, ndims), np.float32) if m0 is None
                    else np.asarray(m0, np.float32)[None])
    voxels = float(np.prod(shape))
    history: list[tuple[float, float]] = []
    start = time.perf_counter()
    first, second = tf.zeros_like(m), tf.zeros_like(m)
    for it in range(int(cfg.iterations)):
        reg, image, grad, _, _ = step_fn(m, m_t, f_t)
        history.append((float(reg[0]) / voxels, float(image[0]) / voxels))
        if progress:
            progress("lddmm", it + 1, int(cfg.iterations), sum(history[-1]))
        if cfg.optimizer == "gd":
            m = m - cfg.step_size * grad
        else:
            t = it + 1
            first = 0.9 * first + 0.1 * grad
            second = 0.999 * second + 0.001 * grad * grad
            m = m - cfg.learning_rate * (first / (1 - 0.9 ** t)) / (
                tf.sqrt(second / (1 - 0.999 ** t)) + 1e-12)
    # final state: the maps with the optimisation's inverse iterations, for consistency (from
    # the same compiled function: no second compilation for the shooting alone)
    reg, image, _, fwd, inv = step_fn(m, m_t, f_t)
    history.append((float(reg[0]) / voxels, float(image[0]) / voxels))
    warped = _warp(m_t, inv)
    seconds = time.perf_counter() - start
    return LddmmResult(m.numpy()[0], inv.numpy()[0], fwd.numpy()[0], warped.numpy()[0, ..., 0],
                       history, seconds)


def config_with(cfg: LddmmConfig | None = None, **overrides) -> LddmmConfig:
    """`cfg` (default `LddmmConfig()`) with the non-None `overrides` applied."""
    cfg = cfg or LddmmConfig()
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
