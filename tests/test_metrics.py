"""tfreg.metrics on hand-built shapes and fields with known answers, 2D and 3D."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from tfreg import metrics
from tfreg.errors import InputError


# ---------------------------------------------------------------- Dice

def test_dice_hand_counts_2d():
    fixed = np.zeros((6, 6), np.int32)
    warped = np.zeros_like(fixed)
    fixed[0:2, :] = 3      # 12 voxels
    warped[0:3, :] = 3     # 18 voxels, overlap 12 -> 24/30
    fixed[4, 0:4] = 8      # 4 voxels
    warped[4, 2:5] = 8     # 3 voxels, overlap 2 -> 4/7
    fixed[5, 5] = 11       # absent from warped -> 0
    warped[5, 0] = 20      # only in warped: not scored by default
    got = metrics.dice(fixed, warped)
    assert list(got) == [3, 8, 11]
    assert got[3] == pytest.approx(0.8)
    assert got[8] == pytest.approx(4 / 7)
    assert got[11] == 0.0
    assert metrics.mean_dice(got) == pytest.approx((0.8 + 4 / 7) / 3)
    # explicitly requested labels: 20 is absent from fixed (0.0), 99 from both (NaN)
    asked = metrics.dice(fixed, warped, labels=[20, 99])
    assert asked[20] == 0.0 and np.isnan(asked[99])
    assert metrics.mean_dice(asked) == 0.0


def test_dice_3d_shifted_box():
    fixed = np.zeros((10, 10, 10), np.int16)
    fixed[2:6, 2:6, 2:6] = 1          # 64 voxels
    warped = np.roll(fixed, 1, axis=2)  # overlap 4*4*3 = 48 -> 96/128
    assert metrics.dice(fixed, warped) == {1: pytest.approx(0.75)}


def test_dice_matches_per_label_counts_with_sparse_and_negative_labels():
    """Label values far apart (FreeSurfer-like 2035), labels missing from one map, a requested
    label in neither, and negative labels: the same values as counting each label's masks."""
    rng = np.random.default_rng(3)
    values = np.array([0, 2, 41, 2035, 17, -4])
    a, b = values[rng.integers(0, 5, (9, 10, 8))], values[rng.integers(0, 6, (9, 10, 8))]
    a[0, 0, 0] = 77                  # only in a: Dice 0
    wanted = [2, 41, 2035, 17, 77, -4, 5000]
    got = metrics.dice(a, b, labels=wanted)
    assert list(got) == wanted
    for lab in wanted:
        size = (a == lab).sum() + (b == lab).sum()
        want = np.nan if size == 0 else 2.0 * ((a == lab) & (b == lab)).sum() / size
        assert got[lab] == pytest.approx(want, nan_ok=True)
    assert got[77] == 0.0 and np.isnan(got[5000]) and got[-4] == 0.0  # -4 only in b


def test_hd95_negative_labels_match_brute_force():
    a, b = np.zeros((14, 12), np.int32), np.zeros((14, 12), np.int32)
    a[2:6, 3:8], b[3:7, 2:8] = -1, -1
    a[8:12, 1:5], b[9:13, 6:10] = 3, 3
    got = metrics.hd95(a, b, (0.8, 1.3), labels=[-1, 3])
    for lab in (-1, 3):
        assert got[lab] == pytest.approx(_brute_force_hd(a == lab, b == lab, (0.8, 1.3)), rel=1e-9)


def test_dice_bad_input():
    with pytest.raises(InputError, match=r"^warped_labels: shape \(4, 5\) does not match fixed_labels shape \(4, 4\)$"):
        metrics.dice(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(InputError, match="^fixed_labels: label map must hold integers"):
        metrics.dice(np.full((4, 4), 0.5), np.zeros((4, 4)))


# ---------------------------------------------------------------- surfaces and HD95

def test_surface_mask_counts():
    cube = np.zeros((9, 9, 9), bool)
    cube[2:7, 2:7, 2:7] = True
    assert metrics.surface_mask(cube).sum() == 5 ** 3 - 3 ** 3
    square = np.zeros((9, 9), bool)
    square[2:7, 2:7] = True
    assert metrics.surface_mask(square).sum() == 16
    # the array border counts as outside: a full array is all surface in 2D 3x3 except the centre
    assert metrics.surface_mask(np.ones((3, 3), bool)).sum() == 8


@pytest.mark.parametrize("axis,spacing,want", [
    (0, (2.0, 0.5, 1.0), 6.0),   # slabs 3 voxels apart along axis 0 at 2 mm
    (1, (2.0, 0.5, 1.0), 1.5),   # along axis 1 at 0.5 mm
    (2, (2.0, 0.5, 1.0), 3.0),
])
def test_hd95_parallel_slabs_anisotropic_3d(axis, spacing, want):
    """One-voxel slabs are all surface; every voxel is exactly 3 voxels from the other slab."""
    a = np.zeros((10, 10, 10), np.int32)
    b = np.zeros_like(a)
    idx = [slice(None)] * 3
    idx[axis] = 3
    a[tuple(idx)] = 5
    idx[axis] = 6
    b[tuple(idx)] = 5
    assert metrics.hd95(a, b, spacing) == {5: pytest.approx(want)}


def test_hd95_shifted_square_2d_by_hand():
    """8x8 squares shifted by 2 rows, spacing 1.5 mm x 1 mm.

    Directed distances A->B (28 surface voxels): top row 8 x 3.0 mm (2 rows), row 5 edge voxels
    2 x 1.5, rows 6..11 edge voxels 12 x 0, bottom row interior 1, 2, 3, 3, 2, 1 (to the side edges
    at 1 mm per column, or 3 mm to B's bottom row). 10 values equal the maximum 3.0, so the 95th
    percentile is 3.0; B->A is the mirror image.
    """
    a = np.zeros((16, 16), np.int32)
    a[4:12, 4:12] = 1
    b = np.roll(a, 2, axis=0)
    assert metrics.hd95(a, b, spacing=(1.5, 1.0)) == {1: pytest.approx(3.0)}
    # in voxels (spacing 1) the top row is 2 away, and 10 of 28 values are the maximum 2
    assert metrics.hd95(a, b) == {1: pytest.approx(2.0)}
    assert metrics.hd95(a, a, spacing=(1.5, 1.0)) == {1: 0.0}


def _brute_force_hd(a_mask, b_mask, spacing, q=95.0):
    """Reference: surface by explicit face-neighbour test, all pairwise distances (float64)."""
    def surface(mask):
        padded = np.pad(mask, 1)
        inner = padded[(slice(1, -1),) * mask.ndim]
        out = np.zeros_like(mask)
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            out |= inner & ~np.roll(padded, step, axis=axis)[(slice(1, -1),) * mask.ndim]
        return out
    pa = np.argwhere(surface(a_mask)) * np.asarray(spacing)
    pb = np.argwhere(surface(b_mask)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), q), np.percentile(d.min(0), q))


@pytest.mark.parametrize("shape,spacing", [((20, 17), (0.7, 1.9)), ((12, 14, 11), (1.2, 0.8, 2.5))])
def test_hd95_matches_brute_force_on_blobs(shape, spacing):
    def blobs(seed):
        field = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
        return np.digitize(field, np.quantile(field, [0.4, 0.7])).astype(np.int32)  # labels 0, 1, 2
    a, b = blobs(1), blobs(2)
    got = metrics.hd95(a, b, spacing)
    assert sorted(got) == [1, 2]
    for lab in (1, 2):
        assert got[lab] == pytest.approx(_brute_force_hd(a == lab, b == lab, spacing), rel=1e-9)
    # several voxel sizes at once (the report's mm and voxels)
    in_mm, in_voxels = metrics.hd95_spacings(a, b, [spacing, 1.0])
    for lab in (1, 2):
        assert in_mm[lab] == got[lab]
        assert in_voxels[lab] == pytest.approx(
            _brute_force_hd(a == lab, b == lab, (1.0,) * a.ndim), rel=1e-9)


def test_hd95_isotropic_mm_and_voxels_scale_from_one_search():
    # isotropic 1.5 mm voxels: the voxel distances are found once and scaled; both sets must
    # still equal brute force (a wrong factor or a reused anisotropic result would not)
    field = ndimage.gaussian_filter(np.random.default_rng(4).normal(size=(12, 13, 11)), 2.0)
    a = np.digitize(field, np.quantile(field, [0.5])).astype(np.int32)
    b = np.roll(a, 2, axis=1)
    in_mm, in_voxels, aniso = metrics.hd95_spacings(a, b, [1.5, 1.0, (1.0, 1.0, 3.0)])
    assert in_mm[1] == pytest.approx(_brute_force_hd(a == 1, b == 1, (1.5,) * 3), rel=1e-9)
    assert in_voxels[1] == pytest.approx(_brute_force_hd(a == 1, b == 1, (1.0,) * 3), rel=1e-9)
    assert aniso[1] == pytest.approx(_brute_force_hd(a == 1, b == 1, (1.0, 1.0, 3.0)), rel=1e-9)
    assert in_mm[1] == pytest.approx(1.5 * in_voxels[1], rel=1e-12) and in_voxels[1] > 0


def test_hd95_small_labels_far_apart_match_brute_force():
    """Small structures in a large grid, one on the array border, one whose two masks lie far
    apart: hd95 measures each label inside its bounding box, which must not change a distance."""
    shape, spacing = (30, 26, 22), (1.1, 0.9, 1.7)
    a, b = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    a[0:4, 5:9, 3:6] = 1            # on the border (border voxels are surface voxels)
    b[1:5, 6:9, 3:7] = 1
    a[10:13, 10:14, 8:12] = 2       # the two masks 14 voxels apart
    b[24:28, 12:15, 15:19] = 2
    ball = np.sum((np.indices(shape) - np.array([15, 18, 5])[:, None, None, None]) ** 2, 0)
    a[ball <= 9], b[ball <= 6] = 3, 3
    got = metrics.hd95(a, b, spacing)
    for lab in (1, 2, 3):
        assert got[lab] == pytest.approx(_brute_force_hd(a == lab, b == lab, spacing), rel=1e-9)
    assert got[2] > 14.0


def test_hd95_missing_label_is_nan_and_bad_spacing():
    a = np.zeros((8, 8), np.int32)
    a[2:4, 2:4] = 1
    a[5:7, 5:7] = 2
    b = np.where(a == 2, 0, a)
    got = metrics.hd95(a, b)
    assert got[1] == 0.0 and np.isnan(got[2])
    with pytest.raises(InputError, match=r"^spacing: expected 2 positive voxel sizes \(mm\), got \(1.0, 0.0\)$"):
        metrics.hd95(a, b, spacing=(1.0, 0.0))


# ---------------------------------------------------------------- Jacobian and folding

def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)


@pytest.mark.parametrize("ndims", [2, 3])
def test_jacobian_of_affine_field_is_its_determinant(ndims):
    rng = np.random.default_rng(3)
    mat = np.eye(ndims) + 0.3 * rng.normal(size=(ndims, ndims))
    shape = (9, 8, 7)[:ndims]
    x = _grid(shape)
    disp = x @ mat.T + rng.normal(size=ndims) - x   # y = M x + b
    det = metrics.jacobian_determinant(disp)
    assert det.shape == shape
    np.testing.assert_allclose(det, np.linalg.det(mat), rtol=1e-10)  # differences of a linear field are exact
    assert metrics.sdlogj(disp) == pytest.approx(0.0, abs=1e-10)
    assert metrics.sdlogj_l2r(disp) == pytest.approx(0.0, abs=1e-10)


def _fold_field(ndims):
    """u_0(i) = -2 i for i < 8, -14 after: np.gradient gives du0/di = -2 (i<=6), -1 (i=7), 0 (i>=8)."""
    shape = (16,) + (5,) * (ndims - 1)
    i = np.arange(16, dtype=np.float64)
    u0 = np.where(i < 8, -2 * i, -14.0)
    disp = np.zeros(shape + (ndims,))
    disp[..., 0] = u0.reshape((16,) + (1,) * (ndims - 1))
    return disp


@pytest.mark.parametrize("ndims", [2, 3])
def test_folding_percent_hand_made_fold(ndims):
    # det J = 1 + du0/di: -1 for i <= 6, 0 at i = 7 (counts as folded: det <= 0), 1 for i >= 8
    disp = _fold_field(ndims)
    det = metrics.jacobian_determinant(disp)
    np.testing.assert_allclose(det[:, 0] if ndims == 2 else det[:, 0, 0], [-1] * 7 + [0] + [1] * 8)
    assert metrics.folding_percent(disp) == pytest.approx(50.0)
    # folded voxels are clipped to 1e-9 before the log: 8 values log(1e-9), 8 values 0
    assert metrics.sdlogj(disp) == pytest.approx(np.std([np.log(1e-9)] * 8 + [0.0] * 8))
    assert metrics.folding_percent(np.zeros_like(disp)) == 0.0


@pytest.mark.parametrize("ndims", [2, 3])
def test_sdlogj_piecewise_stretch(ndims):
    """Stretch a along axis 0 for i < 7, b after: det = a (7 rows), (a+b)/2 (row 7), b (8 rows)."""
    a, b = 1.5, 0.6
    i = np.arange(16, dtype=np.float64)
    u0 = np.where(i <= 7, (a - 1) * i, (a - 1) * 7 + (b - 1) * (i - 7))
    shape = (16,) + (6,) * (ndims - 1)
    disp = np.zeros(shape + (ndims,))
    disp[..., 0] = u0.reshape((16,) + (1,) * (ndims - 1))
    rows = [a] * 7 + [(a + b) / 2] + [b] * 8
    assert metrics.sdlogj(disp) == pytest.approx(np.std(np.log(rows)), rel=1e-10)
    # Learn2Reg variant: rows 2..13 of axis 0 (and [2:-2] of the other axes, all equal), log(det + 3)
    assert metrics.sdlogj_l2r(disp) == pytest.approx(np.std(np.log(np.array(rows[2:-2]) + 3)), rel=1e-10)


def _l2r_style_sdlogj(disp):
    """Learn2Reg's recipe written out for a (X, Y, Z, 3) field: [-0.5, 0, 0.5] correlation with zero
    padding per axis, crop [2:-2], det of I + grad, then std(log(clip(det + 3, 1e-9, 1e9)))."""
    kernel = np.array([-0.5, 0.0, 0.5])
    jac = np.zeros(disp.shape[:3] + (3, 3))
    for c in range(3):
        for d in range(3):
            jac[..., c, d] = ndimage.correlate1d(disp[..., c], kernel, axis=d, mode="constant") + (c == d)
    det = np.linalg.det(jac[2:-2, 2:-2, 2:-2])
    return np.std(np.log(np.clip(det + 3, 1e-9, 1e9)))


def test_sdlogj_l2r_matches_learn2reg_recipe_on_random_field():
    rng = np.random.default_rng(5)
    disp = np.stack([ndimage.gaussian_filter(rng.normal(size=(14, 13, 12)), 1.5) * 8 for _ in range(3)], -1)
    assert metrics.folding_percent(disp) > 0  # strong enough to fold somewhere
    assert metrics.sdlogj_l2r(disp) == pytest.approx(_l2r_style_sdlogj(disp), rel=1e-10)


def test_field_bad_shape():
    with pytest.raises(InputError, match=r"^disp: expected a displacement field \(\*S, N\) with N = 2 or 3 "
                                         r"spatial axes, got shape \(1, 8, 8, 8, 3\)$"):
        metrics.jacobian_determinant(np.zeros((1, 8, 8, 8, 3)))
    with pytest.raises(InputError, match="^disp: contains NaN or Inf$"):
        metrics.folding_percent(np.full((4, 4, 2), np.nan))


def test_summarize():
    fixed = np.zeros((8, 8, 8), np.int32)
    fixed[2:6, 2:6, 2:6] = 4
    out = metrics.summarize(fixed, fixed, np.zeros((8, 8, 8, 3)), spacing=(1, 1, 2))
    assert out["dice"] == {4: 1.0} and out["mean_dice"] == 1.0
    assert out["hd95"] == {4: 0.0} and out["mean_hd95"] == 0.0
    assert out["folding_percent"] == 0.0 and out["sdlogj"] == 0.0 and out["sdlogj_l2r"] == 0.0


# ---------------------------------------------------------------- NDV (digital diffeomorphism)

@pytest.mark.parametrize("t, folded", [
    # Voxel p = (2, 2, 2) pushed by t along axis 0. For 1 < t < 2 the 8 corner tetrahedra with an
    # edge along +e0 from p (4 at p) or along -e0 onto p (4 at p + e0) turn inside out, each with
    # det 1 - t, i.e. folded volume (t - 1)/6; every other tetrahedron keeps det >= 1.
    # For t > 2 four central tetrahedra (det 2 - t) fold as well. NDV counts half of each.
    (1.5, 8 * 0.5 / 6),
    (3.0, 8 * 2.0 / 6 + 4 * 1.0 / 6),
])
def test_ndv_one_pushed_voxel_hand_volume(t, folded):
    u = np.zeros((5, 5, 5, 3))
    u[2, 2, 2, 0] = t
    assert metrics.ndv(u) == pytest.approx(folded / 2, rel=1e-12)
    assert metrics.ndv_percent(u) == pytest.approx(100 * folded / 2 / 125, rel=1e-12)
    dets = metrics.simplex_determinants(u)
    assert dets.shape == (5, 5, 5, 10)
    assert (dets < 0).sum() == (8 if t < 2 else 12)
    # a mask that leaves out p + e0 drops its 4 folded corner tetrahedra
    mask = np.ones((5, 5, 5), bool)
    mask[3, 2, 2] = False
    if t < 2:
        assert metrics.ndv(u, mask) == pytest.approx(4 * (t - 1) / 6 / 2, rel=1e-12)


def test_ndv_identity_and_smooth_fields_are_zero():
    assert metrics.ndv(np.zeros((4, 5, 6, 3))) == 0.0
    x = np.stack(np.meshgrid(*[np.arange(8.0)] * 3, indexing="ij"), -1)
    u = 0.3 * np.sin(x[..., ::-1] / 3)  # |grad u| <= 0.1: no simplex can fold
    assert metrics.ndv(u) == 0.0
    assert metrics.simplex_determinants(u).min() > 0


def test_ndv_reflection_folds_every_interior_voxel_by_det():
    # phi(x) = A x with det A < 0: every tetrahedron is inverted, |det_k| = |det A| * det_k(id),
    # and half of the summed volumes (8/6 + 2*2/6 = 2 voxels) is |det A| per voxel.
    A = np.array([[-1.2, 0.1, 0.0], [0.2, 0.9, 0.0], [0.0, 0.3, 1.1]])
    x = np.stack(np.meshgrid(*[np.arange(6.0)] * 3, indexing="ij"), -1)
    mask = np.zeros((6, 6, 6), bool)
    mask[1:-1, 1:-1, 1:-1] = True  # the edge padding keeps the border simplices unfolded
    assert metrics.ndv(x @ A.T - x, mask) == pytest.approx(abs(np.linalg.det(A)) * mask.sum())


def test_nda_2d_one_pushed_pixel():
    # 2D: 4 corner triangles per pixel; pushing p by t = 1.5 along axis 0 inverts 2 triangles at
    # p and 2 at p + e0, each of area (t - 1)/2; NDA counts half -> 4 * 0.25 / 2.
    u = np.zeros((5, 5, 2))
    u[2, 2, 0] = 1.5
    assert metrics.ndv(u) == pytest.approx(0.5)
    assert metrics.simplex_determinants(u).shape == (5, 5, 4)


def test_ndv_bad_mask():
    with pytest.raises(InputError, match=r"^mask: shape \(3, 3\) does not match"):
        metrics.ndv(np.zeros((4, 4, 2)), np.ones((3, 3)))


# ---------------------------------------------------------------- TRE

def test_tre_hand_values_anisotropic_spacing():
    u = np.zeros((10, 12, 14, 3))
    u[..., 0] = 2.0           # constant shift of 2 voxels along axis 0
    fixed_pts = np.array([[3.0, 4.0, 5.0], [6.5, 2.25, 7.0]])
    moving_pts = fixed_pts + [[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    # moved = p + (2, 0, 0): errors (0, 0, 0) and (1, -1, 0) voxels -> mm with spacing (2, 3, 1)
    got = metrics.tre(fixed_pts, moving_pts, u, spacing=(2.0, 3.0, 1.0), order=1)
    np.testing.assert_allclose(got, [0.0, np.hypot(2.0, 3.0)], atol=1e-12)


def test_tre_interpolates_a_linear_field():
    # u(x) = 0.1 * x0 along axis 1: the point (4.5, 5, 5) moves by 0.45 voxels. Linear
    # interpolation is exact; the cubic spline (Learn2Reg's) is within 1e-4 of it here (its
    # boundary extension bends the spline slightly).
    x = np.stack(np.meshgrid(*[np.arange(12.0)] * 3, indexing="ij"), -1)
    u = np.zeros_like(x)
    u[..., 1] = 0.1 * x[..., 0]
    p = np.array([[4.5, 5.0, 5.0]])
    assert metrics.tre(p, p, u, order=1)[0] == pytest.approx(0.45, abs=1e-9)
    assert metrics.tre(p, p, u, order=3)[0] == pytest.approx(0.45, abs=1e-3)


def test_read_keypoints_learn2reg_csv(tmp_path):
    path = tmp_path / "kp.csv"
    path.write_text("21.000,88.000,73.000\n21.500,91.000,89.000\n")
    np.testing.assert_array_equal(metrics.read_keypoints(path), [[21, 88, 73], [21.5, 91, 89]])
    path.write_text("1,2\n")
    with pytest.raises(InputError, match="line 1 has 2 values, expected 3"):
        metrics.read_keypoints(path)
    with pytest.raises(InputError, match="moving keypoints: shape"):
        metrics.tre(np.zeros((2, 3)), np.zeros((3, 3)), np.zeros((4, 4, 4, 3)))


def test_jacobian_summary_of_linear_maps_by_hand():
    """u(x) = (A - I) x has det J = det A everywhere: folding 0 % or 100 %, SDlogJ 0."""
    x = _grid((9, 8, 7))
    for matrix, folded in ((np.diag([1.2, 0.9, 1.1]), 0.0), (np.diag([-1.0, 1.0, 1.0]), 100.0)):
        disp = x @ (matrix - np.eye(3)).T
        got = metrics.jacobian_summary(disp)
        assert got["folding_percent"] == folded
        assert got["sdlogj"] == pytest.approx(0.0, abs=1e-12)
        assert got["sdlogj_l2r"] == pytest.approx(0.0, abs=1e-12)
        assert got == {"folding_percent": metrics.folding_percent(disp),
                       "sdlogj": metrics.sdlogj(disp), "sdlogj_l2r": metrics.sdlogj_l2r(disp)}
    assert metrics.jacobian_summary(np.zeros((4, 6, 2)))["sdlogj_l2r"] is None
