"""`tfreg.ops.correlation`: the cost volume and its soft-argmax against plain NumPy loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf

from gradcheck import check_directional_derivatives
from tfreg.ops.correlation import displacements, local_correlation, soft_argmax


def _numpy_cost(f: np.ndarray, m: np.ndarray, radius: int, metric: str, padding: str):
    """Voxel by voxel, displacement by displacement, with explicit bounds handling."""
    spatial = f.shape[1:-1]
    offsets = list(itertools.product(range(-radius, radius + 1), repeat=len(spatial)))
    out = np.zeros((*f.shape[:-1], len(offsets)))
    for b in range(f.shape[0]):
        for x in itertools.product(*(range(n) for n in spatial)):
            for k, d in enumerate(offsets):
                y = [xi + di for xi, di in zip(x, d)]
                if all(0 <= yi < n for yi, n in zip(y, spatial)):
                    other = m[(b, *y)]
                elif padding == "edge":
                    other = m[(b, *[min(max(yi, 0), n - 1) for yi, n in zip(y, spatial)])]
                else:
                    other = np.zeros(m.shape[-1])
                here = f[(b, *x)]
                out[(b, *x, k)] = (np.mean(here * other) if metric == "dot"
                                   else -np.mean((here - other) ** 2))
    return out


def _numpy_soft_argmax(cost: np.ndarray, radius: int, temperature: float) -> np.ndarray:
    ndims = cost.ndim - 2
    offsets = np.array(list(itertools.product(range(-radius, radius + 1), repeat=ndims)), float)
    z = cost / temperature
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("...k,kd->...d", p, offsets)


def test_displacements_are_all_offsets_in_row_major_order():
    d = displacements(3, 1)
    assert d.shape == (27, 3) and d.dtype == np.int32
    assert d[0].tolist() == [-1, -1, -1] and d[1].tolist() == [-1, -1, 0]
    assert d[13].tolist() == [0, 0, 0] and d[-1].tolist() == [1, 1, 1]
    assert len({tuple(v) for v in displacements(2, 2)}) == 25
    with pytest.raises(ValueError, match="radius"):
        displacements(2, -1)


@pytest.mark.parametrize("shape, radius", [((2, 5, 6, 3), 2), ((1, 4, 3, 5, 2), 1)])
@pytest.mark.parametrize("metric", ["dot", "ssd"])
@pytest.mark.parametrize("padding", ["edge", "zero"])
def test_cost_volume_matches_numpy_loops(shape, radius, metric, padding):
    rng = np.random.default_rng(0)
    f = rng.normal(size=shape).astype(np.float32)
    m = rng.normal(size=shape).astype(np.float32)
    got = local_correlation(f, m, radius, metric=metric, padding=padding).numpy()
    np.testing.assert_allclose(got, _numpy_cost(f, m, radius, metric, padding), atol=1e-5)


def test_cost_volume_compiles_with_xla_to_the_same_values():
    rng = np.random.default_rng(1)
    f, m = (rng.random((1, 6, 5, 4, 3), dtype=np.float32) for _ in range(2))
    fn = tf.function(lambda a, b: local_correlation(a, b, 1, metric="ssd"), jit_compile=True)
    np.testing.assert_allclose(fn(f, m).numpy(), _numpy_cost(f, m, 1, "ssd", "edge"),
                               atol=1e-5)


@pytest.mark.parametrize("temperature", [0.1, 2.0])
def test_soft_argmax_matches_numpy(temperature):
    rng = np.random.default_rng(2)
    cost = rng.normal(size=(2, 3, 4, 9)).astype(np.float32)
    got = soft_argmax(cost, 1, temperature).numpy()
    np.testing.assert_allclose(got, _numpy_soft_argmax(cost, 1, temperature), atol=1e-5)
    cost3 = rng.normal(size=(1, 2, 3, 2, 27)).astype(np.float32)
    np.testing.assert_allclose(soft_argmax(cost3, 1, temperature).numpy(),
                               _numpy_soft_argmax(cost3, 1, temperature), atol=1e-5)


def test_soft_argmax_refuses_a_cost_of_the_wrong_size():
    with pytest.raises(ValueError, match="needs 25"):
        soft_argmax(np.zeros((1, 4, 4, 9), np.float32), 2)


@pytest.mark.parametrize("ndims, shift", [(2, (2, -1)), (3, (1, -2, 0)), (3, (-1, 1, 2))])
@pytest.mark.parametrize("metric", ["dot", "ssd"])
def test_soft_argmax_of_an_integer_shift_recovers_the_shift(ndims, shift, metric):
    """moving(y) = fixed(y - s), so warped(x) = moving(x + s) = fixed(x): the pull displacement
    is s everywhere away from the wrapped border. Unit-length features, so that the product of
    a feature with itself is the largest one ("dot")."""
    rng = np.random.default_rng(3)
    shape = (12,) * ndims
    fixed = rng.normal(size=(1, *shape, 16)).astype(np.float32)
    fixed /= np.linalg.norm(fixed, axis=-1, keepdims=True)
    moving = np.roll(fixed, shift, axis=tuple(range(1, ndims + 1)))
    cost = local_correlation(fixed, moving, 2, metric=metric)
    disp = soft_argmax(cost, 2, temperature=0.001).numpy()
    inner = disp[(0, *(slice(3, -3),) * ndims)]
    np.testing.assert_allclose(inner, np.broadcast_to(np.array(shift, float), inner.shape),
                               atol=0.01)


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(4)
    f, m = (rng.normal(size=(1, 4, 5, 2)) for _ in range(2))
    check_directional_derivatives(
        lambda a, b: soft_argmax(local_correlation(a, b, 1, metric="ssd"), 1, 0.5),
        [f, m], rng, n_dirs=3)


@pytest.mark.parametrize("shape", [(9, 7), (6, 7, 5)])
def test_box_smooth_is_the_mean_over_the_window_inside_the_grid(shape):
    from scipy import ndimage

    from tfreg.layers import BoxSmooth

    x = np.random.default_rng(3).normal(size=(1, *shape, 2)).astype(np.float32)
    expected = x[0]
    count = ndimage.uniform_filter(np.ones(shape), 3, mode="constant")
    for _ in range(2):  # two passes
        expected = np.stack([ndimage.uniform_filter(expected[..., c].astype(np.float64), 3,
                                                    mode="constant") / count
                             for c in range(2)], axis=-1)
    out = BoxSmooth(3, 2)(x).numpy()[0]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    constant = BoxSmooth(3, 2)(np.full((1, *shape, 1), 2.5, np.float32)).numpy()
    np.testing.assert_allclose(constant, 2.5, rtol=1e-6)  # no darkening at the border
