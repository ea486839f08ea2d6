"""Transform formats against independent oracles: hand-computed vectors and SimpleITK.

Grids are oblique (rotated), anisotropic and have a flipped axis, so any confusion of voxel and
world units, RAS and LPS, or array-axis order shows up.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from tfreg import transforms_io as tio
from tfreg.io import load_volume, save_volume

sitk = pytest.importorskip("SimpleITK")

FIXED_SHAPE = (20, 24, 18)
MOVING_SHAPE = (22, 20, 24)


def grid_affine(spacing, angles, shape, centre, flip=(1, 1, 1)) -> np.ndarray:
    """Voxel-to-RAS affine: rotation x spacing (x flip), the volume centred on `centre` (mm)."""
    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(
        np.multiply(spacing, flip))
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return a


FIXED_AFFINE = grid_affine([1.2, 0.9, 1.5], [10, -5, 20], FIXED_SHAPE, [1, 2, 3], flip=(-1, 1, 1))
MOVING_AFFINE = grid_affine([1.0, 1.1, 1.3], [-8, 12, 3], MOVING_SHAPE, [0, 0, 0])


def _grid(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape],
                                indexing="ij"), -1)


def _smooth_field(shape, amplitude, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 3.0) for _ in range(3)], -1)
    return u * (amplitude / np.abs(u).max())


def _moving_image() -> np.ndarray:
    y = _grid(MOVING_SHAPE)
    return (1.0 + 0.5 * np.sin(y[..., 0] / 3.0) + 0.4 * np.cos(y[..., 1] / 4.0)
            + y[..., 2] / 30.0).astype(np.float32)


def _mm(disp_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return disp_vox @ affine[:3, :3].T


def _sitk_resample(fixed_path, moving_path, transform, fill=0.0) -> np.ndarray:
    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    out = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, fill)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)   # SimpleITK arrays are (z, y, x)


def _inside(disp_vox, to_moving, shape, margin=0.5) -> np.ndarray:
    """Fixed voxels whose sample point lies inside the moving grid by `margin` voxels (where
    tfreg's and ITK's border rules cannot differ)."""
    pts = (_grid(disp_vox.shape[:-1]) + disp_vox) @ to_moving[:3, :3].T + to_moving[:3, 3]
    return np.all((pts >= margin) & (pts <= np.asarray(shape) - 1 - margin), axis=-1)


# ------------------------------------------------------------------------------- round trips
def test_round_trip_voxel_world_itk_l2r(tmp_path):
    u = _smooth_field(FIXED_SHAPE, 3.0, 0)
    tio.save_field(tmp_path / "world.nii.gz", u, FIXED_AFFINE, "world")
    assert tio.field_format(tmp_path / "world.nii.gz") == "world"
    world = load_volume(tmp_path / "world.nii.gz", allow_vector=True).data
    np.testing.assert_allclose(world, _mm(u, FIXED_AFFINE), atol=1e-4)       # RAS mm by hand
    back = tio.read_transform(tmp_path / "world.nii.gz")
    tio.save_field(tmp_path / "itk.nii.gz", back.data, back.affine, "itk")
    assert tio.field_format(tmp_path / "itk.nii.gz") == "itk"
    itk = tio.read_transform(tmp_path / "itk.nii.gz", reference=tmp_path / "world.nii.gz")
    tio.save_field(tmp_path / "disp_0001_0002.nii.gz", itk.data, itk.affine, "l2r")
    l2r = tio.read_transform(tmp_path / "disp_0001_0002.nii.gz")
    # voxel -> world -> itk -> voxel: within 1e-4 mm
    err = np.linalg.norm(_mm(itk.data - u, FIXED_AFFINE), axis=-1)
    assert err.max() < 1e-4
    np.testing.assert_allclose(itk.affine, FIXED_AFFINE, atol=1e-6)
    # Learn2Reg stores float16 precision: relative error at most 2^-11 per component
    assert np.all(np.abs(l2r.data - u) <= np.abs(u) * 2.0 ** -11 + 1e-7)
    # values representable in float16 come back exactly (within 1e-4 mm)
    q = np.round(u * 64) / 64
    tio.save_field(tmp_path / "q.nii.gz", q, FIXED_AFFINE, "l2r")
    assert np.abs(_mm(tio.read_transform(tmp_path / "q.nii.gz").data - q, FIXED_AFFINE)).max() < 1e-4


def test_itk_file_layout_as_simpleitk_reads_it(tmp_path):
    """5D (X, Y, Z, 1, 3) vector NIfTI; SimpleITK sees LPS vectors at LPS points."""
    u = _smooth_field(FIXED_SHAPE, 2.0, 1)
    path = tio.save_field(tmp_path / "w.nii.gz", u, FIXED_AFFINE, "itk")
    import nibabel as nib

    img = nib.load(str(path))
    assert img.shape == (*FIXED_SHAPE, 1, 3) and img.header.get_intent()[0] == "vector"
    field = sitk.ReadImage(str(path))
    assert field.GetNumberOfComponentsPerPixel() == 3
    i, j, k = 3, 7, 5
    lps = np.array([-1, -1, 1.0]) * _mm(u[i, j, k], FIXED_AFFINE)
    np.testing.assert_allclose(field.GetPixel(i, j, k), lps, atol=1e-5)
    ras_point = FIXED_AFFINE[:3, :3] @ [i, j, k] + FIXED_AFFINE[:3, 3]
    np.testing.assert_allclose(field.TransformIndexToPhysicalPoint((i, j, k)),
                               ras_point * [-1, -1, 1], atol=1e-4)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_known_translation_of_5mm_along_r_a_s(tmp_path, axis):
    """+5 mm along R, A or S (moving(p) sampled at p + 5 e): every format has the right sign."""
    shift = np.zeros(3)
    shift[axis] = 5.0
    vox = np.linalg.solve(FIXED_AFFINE[:3, :3], shift)
    u = np.broadcast_to(vox, (*FIXED_SHAPE, 3)).copy()
    tio.save_field(tmp_path / "world.nii.gz", u, FIXED_AFFINE, "world")
    tio.save_field(tmp_path / "itk.nii.gz", u, FIXED_AFFINE, "itk")
    world = load_volume(tmp_path / "world.nii.gz", allow_vector=True).data
    itk = load_volume(tmp_path / "itk.nii.gz", allow_vector=True).data
    np.testing.assert_allclose(world[2, 3, 4], shift, atol=1e-4)
    np.testing.assert_allclose(itk[2, 3, 4], shift * [-1, -1, 1], atol=1e-4)  # LPS
    # the same translation as an ITK affine (.mat as ANTs writes it)
    h = np.eye(4)
    h[:3, 3] = shift
    tio.write_itk_affine(tmp_path / "t.mat", h, centre_ras=[1, 2, 3])
    from scipy.io import loadmat

    params = loadmat(str(tmp_path / "t.mat"))["AffineTransform_double_3_3"].ravel()
    np.testing.assert_allclose(params[9:], shift * [-1, -1, 1], atol=1e-9)
    # SimpleITK moves a fixed LPS point by the shift in LPS, for the field and for the affine
    p = np.array([4.0, -3.0, 2.0])
    for tx in (sitk.DisplacementFieldTransform(sitk.ReadImage(str(tmp_path / "itk.nii.gz"),
                                                              sitk.sitkVectorFloat64)),
               sitk.ReadTransform(str(tmp_path / "t.mat"))):
        np.testing.assert_allclose(tx.TransformPoint(p.tolist()), p + shift * [-1, -1, 1],
                                   atol=1e-4)
    # and reading either back gives tfreg's voxel field
    for args in ({"field": tmp_path / "itk.nii.gz"},
                 {"affine": tmp_path / "t.mat", "reference": tmp_path / "world.nii.gz"}):
        np.testing.assert_allclose(tio.read_transform(**args).data[5, 6, 7], vox, atol=1e-4)


# ------------------------------------------------------------------------------- affines
def test_affine_files_agree_with_simpleitk(tmp_path):
    h = np.eye(4)
    h[:3, :3] = Rotation.from_euler("xyz", [7, -11, 4], degrees=True).as_matrix() * 1.05
    h[:3, 3] = [4.0, -2.5, 6.0]
    p_ras = np.array([10.0, -20.0, 5.0])
    for suffix in ("mat", "txt"):
        path = tio.write_itk_affine(tmp_path / f"a.{suffix}", h, centre_ras=[3, 4, 5])
        tx = sitk.ReadTransform(str(path))
        moved = np.array(tx.TransformPoint((p_ras * [-1, -1, 1]).tolist())) * [-1, -1, 1]
        np.testing.assert_allclose(moved, h[:3, :3] @ p_ras + h[:3, 3], atol=1e-9)
        np.testing.assert_allclose(tio.read_itk_affine(path), h, atol=1e-12)
    # files written by ITK itself read back to ITK's own point map
    ref = sitk.AffineTransform(3)
    ref.SetMatrix([1.1, 0.1, 0, 0, 0.9, 0.2, 0.05, 0, 1.0])
    ref.SetTranslation([1, 2, 3])
    ref.SetCenter([4, 5, 6])
    for suffix in ("mat", "txt"):
        sitk.WriteTransform(ref, str(tmp_path / f"itk.{suffix}"))
        mine = tio.read_itk_affine(tmp_path / f"itk.{suffix}")
        q = np.array([7.0, -8.0, 9.0])   # LPS
        moved = (mine @ np.r_[q * [-1, -1, 1], 1])[:3] * [-1, -1, 1]
        np.testing.assert_allclose(moved, ref.TransformPoint(q.tolist()), atol=1e-9)


def test_voxel_affine_and_physical_affine_round_trip():
    a = np.array([[1.05, 0.1, 0.0, 2.0], [-0.05, 0.95, 0.1, -1.0], [0.0, 0.05, 1.1, 0.5]])
    phys = tio.affine_to_physical(a, FIXED_AFFINE, FIXED_SHAPE)
    np.testing.assert_allclose(tio.physical_to_affine(phys, FIXED_AFFINE, FIXED_SHAPE), a,
                               atol=1e-10)
    # the physical map moves the world point of voxel x to the world point of A(x - c) + b + c
    x = np.array([3.0, 5.0, 7.0])
    c = (np.asarray(FIXED_SHAPE) - 1) / 2
    y = a[:, :3] @ (x - c) + a[:, 3] + c
    world = lambda v: FIXED_AFFINE[:3, :3] @ v + FIXED_AFFINE[:3, 3]  # noqa: E731
    np.testing.assert_allclose(phys[:3, :3] @ world(x) + phys[:3, 3], world(y), atol=1e-9)


# ------------------------------------------------------------------------------- oracles
def _register_like_result(tmp_path):
    """A registration result as `tfreg.register` builds it: a centred voxel affine composed with
    a deformable part, the moving image on another oblique grid."""
    from tfreg.register import RegisterResult, _fixed_to_moving, _sample_moving

    save_volume(tmp_path / "fixed.nii.gz", np.zeros(FIXED_SHAPE, np.float32), FIXED_AFFINE)
    moving = _moving_image()
    save_volume(tmp_path / "moving.nii.gz", moving, MOVING_AFFINE)
    fixed_v = load_volume(tmp_path / "fixed.nii.gz")
    moving_v = load_volume(tmp_path / "moving.nii.gz")
    a = np.array([[1.04, 0.06, 0.0, 1.5], [-0.05, 0.97, 0.04, -1.0], [0.02, 0.0, 1.03, 0.8]])
    v = _smooth_field(FIXED_SHAPE, 1.5, 2)
    c = (np.asarray(FIXED_SHAPE) - 1) / 2
    x = _grid(FIXED_SHAPE)
    disp = (x + v - c) @ a[:, :3].T + a[:, 3] + c - x          # Aff(x + v(x)) - x
    to_moving = _fixed_to_moving(fixed_v, moving_v)
    warped = _sample_moving(moving, disp.astype(np.float32), to_moving, "linear")
    result = RegisterResult(warped, disp.astype(np.float32), None, {}, affine=a)
    return result, fixed_v, moving_v, to_moving, moving


def test_exported_warp_and_affine_reproduce_tfreg_in_simpleitk(tmp_path):
    """The register's ITK files (warp + full physical affine), applied by SimpleITK to the
    ORIGINAL moving image on its own oblique grid, give tfreg's warped image."""
    from tfreg.register import _write_transforms

    result, fixed_v, moving_v, to_moving, moving = _register_like_result(tmp_path)
    written = _write_transforms(tmp_path, result, fixed_v, moving_v, itk=True)
    assert {"affine", "affine_txt", "itk_warp"} <= set(written)
    warp = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(written["itk_warp"]), sitk.sitkVectorFloat64))
    inside = _inside(result.disp, to_moving, MOVING_SHAPE)
    assert inside.mean() > 0.5
    for affine_file in ("affine", "affine_txt"):
        # ANTs' transformlist=[warp, affine]: the warp acts on the point first; SimpleITK's
        # composite applies its last transform first
        composite = sitk.CompositeTransform([sitk.ReadTransform(str(written[affine_file])), warp])
        out = _sitk_resample(tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz", composite)
        mad = np.abs(out - result.warped)[inside].mean()
        assert mad < 1e-4, mad          # intensities span ~2; one intensity step is ~1e-2
        assert np.abs(out - result.warped)[inside].max() < 1e-3
    # the wrong order is detectably different (the test can fail)
    wrong = sitk.CompositeTransform([warp, sitk.ReadTransform(str(written["affine"]))])
    out = _sitk_resample(tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz", wrong)
    assert np.abs(out - result.warped)[inside].mean() > 1e-2


def test_simpleitk_field_of_known_affine_reads_back_like_tfreg_affine(tmp_path):
    """SimpleITK's TransformToDisplacementField of a known affine -> read into tfreg -> warps the
    moving image like tfreg's own centred voxel affine."""
    import tensorflow as tf

    from tfreg import layers

    save_volume(tmp_path / "fixed.nii.gz", np.zeros(FIXED_SHAPE, np.float32), FIXED_AFFINE)
    fixed = sitk.ReadImage(str(tmp_path / "fixed.nii.gz"))
    h_lps = sitk.AffineTransform(3)
    h_lps.SetMatrix((Rotation.from_euler("xyz", [5, -3, 8], degrees=True).as_matrix()
                     * 1.03).ravel().tolist())
    h_lps.SetTranslation([2.0, -1.5, 3.0])
    h_lps.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2 for s in FIXED_SHAPE]))
    field = sitk.TransformToDisplacementField(h_lps, sitk.sitkVectorFloat64, fixed.GetSize(),
                                              fixed.GetOrigin(), fixed.GetSpacing(),
                                              fixed.GetDirection())
    sitk.WriteImage(field, str(tmp_path / "sitk_field.nii.gz"))
    assert tio.field_format(tmp_path / "sitk_field.nii.gz") == "itk"
    read = tio.read_transform(tmp_path / "sitk_field.nii.gz", reference=tmp_path / "fixed.nii.gz")
    # tfreg's own affine for the same map: physical (RAS) -> centred voxel affine
    sitk.WriteTransform(h_lps, str(tmp_path / "h.txt"))
    voxel_affine = tio.physical_to_affine(tio.read_itk_affine(tmp_path / "h.txt"),
                                          FIXED_AFFINE, FIXED_SHAPE)
    own = layers.affine_to_disp(voxel_affine[None].astype(np.float32), FIXED_SHAPE).numpy()[0]
    np.testing.assert_allclose(read.data, own, atol=2e-4)
    image = np.random.default_rng(0).random(FIXED_SHAPE).astype(np.float32)
    img = tf.constant(image[None, ..., None])
    a = layers.warp(img, read.data[None]).numpy()
    b = layers.warp(img, own[None]).numpy()
    assert np.abs(a - b).mean() < 1e-4


def test_inverse_field_maps_fixed_onto_moving(tmp_path):
    """register's inverse (exact affine part, fixed-point deformable part) composes with the
    forward field to the identity; written on the moving grid it maps back moving points."""
    from tfreg.register import _inverse, _inverse_on_moving, inverse_consistency

    result, fixed_v, moving_v, to_moving, _ = _register_like_result(tmp_path)
    inverse, inverse_warp, how = _inverse(result.disp, result.affine, None)
    assert "fixed-point" in how
    stats = inverse_consistency(result.disp, inverse, FIXED_AFFINE)
    # linear interpolation of the inverse between grid points bounds the accuracy (~0.01 mm)
    assert stats["mean"] < 0.03 and stats["max"] < 0.5 and stats["fraction"] > 0.5
    # independent check with SciPy: x = y + w(y) satisfies x + disp(x) = y
    x = _grid(FIXED_SHAPE) + inverse
    fwd = np.stack([ndimage.map_coordinates(result.disp[..., c], np.moveaxis(x, -1, 0), order=1,
                                            mode="nearest") for c in range(3)], -1)
    inside = np.all((x >= 0) & (x <= np.asarray(FIXED_SHAPE) - 1), -1)
    err = np.linalg.norm(_mm(x + fwd - _grid(FIXED_SHAPE), FIXED_AFFINE), axis=-1)[inside]
    assert err.mean() < 0.03
    naive = -result.disp     # what "negate the field" would give: far off (the test can fail)
    assert inverse_consistency(result.disp, naive, FIXED_AFFINE)["mean"] > 0.3
    # on the moving grid: a moving voxel m maps to fixed voxel f = T_inv(m); the forward map of f
    # lands back on m (world points compared, in mm)
    result.inverse, result.inverse_warp = inverse, inverse_warp
    on_moving = _inverse_on_moving(result, fixed_v, moving_v)
    m = np.array([10, 9, 12])
    f_vox = (np.linalg.inv(FIXED_AFFINE) @ MOVING_AFFINE @ np.r_[m + on_moving[tuple(m)], 1])[:3]
    fwd_f = np.array([ndimage.map_coordinates(result.disp[..., c], f_vox[:, None], order=1)[0]
                      for c in range(3)])
    target_moving = (to_moving @ np.r_[f_vox + fwd_f, 1])[:3]
    np.testing.assert_allclose(_mm(target_moving - m, MOVING_AFFINE), 0, atol=0.02)


def test_antspyx_applies_the_exported_transforms_like_tfreg(tmp_path):
    ants = pytest.importorskip("ants")
    from tfreg.register import _write_transforms

    result, fixed_v, moving_v, to_moving, _ = _register_like_result(tmp_path)
    written = _write_transforms(tmp_path, result, fixed_v, moving_v, itk=True)
    out = ants.apply_transforms(ants.image_read(str(tmp_path / "fixed.nii.gz")),
                                ants.image_read(str(tmp_path / "moving.nii.gz")),
                                transformlist=[str(written["itk_warp"]), str(written["affine"])])
    inside = _inside(result.disp, to_moving, MOVING_SHAPE)
    assert np.abs(out.numpy() - result.warped)[inside].mean() < 1e-4


def test_bad_inputs(tmp_path):
    from tfreg.errors import InputError

    with pytest.raises(InputError, match="--reference"):
        tio.read_transform(affine=tmp_path / "x.mat")
    with pytest.raises(InputError, match="file not found"):
        tio.read_itk_affine(tmp_path / "missing.mat")
    (tmp_path / "bad.txt").write_text("Transform: Euler3DTransform_double_3_3\nParameters: 1 2\n")
    with pytest.raises(InputError, match="bad.txt: expected a 3D affine"):
        tio.read_itk_affine(tmp_path / "bad.txt")
    tio.save_field(tmp_path / "v.nii.gz", np.zeros((4, 5, 6, 3)), np.eye(4))
    save_volume(tmp_path / "ref.nii.gz", np.zeros((4, 5, 7), np.float32), np.eye(4))
    with pytest.raises(InputError, match="must be on the reference grid"):
        tio.read_transform(tmp_path / "v.nii.gz", reference=tmp_path / "ref.nii.gz")
    with pytest.raises(InputError, match="unknown format"):
        tio.save_field(tmp_path / "y.nii.gz", np.zeros((4, 5, 6, 3)), np.eye(4), "ants")
    assert tio.l2r_name("imagesTs/OASIS_0395_0000.nii.gz", "x/OASIS_0396_0000.nii.gz") == \
        "disp_0395_0396.nii.gz"
    assert tio.l2r_name("a/sub-1.nii.gz", "b/sub-2.nii") == "disp_sub-1_sub-2.nii.gz"



def test_exported_inverse_maps_fixed_onto_moving_in_simpleitk(tmp_path):
    """`itk_inverse_warp` with the inverted `affine.mat` (ANTs: transformlist=[affine,
    inverse_warp], whichtoinvert=[True, False]) resamples the fixed image onto the moving grid
    like `tfreg warp fixed disp_inverse.nii.gz`."""
    from tfreg.register import _inverse, _write_transforms, warp_file

    result, fixed_v, moving_v, _, _ = _register_like_result(tmp_path)
    result.inverse, result.inverse_warp, _ = _inverse(result.disp, result.affine, None)
    g = _grid(FIXED_SHAPE)
    save_volume(tmp_path / "fixed.nii.gz", (np.sin(g[..., 0] / 3) + np.cos(g[..., 1] / 4)
                                            + g[..., 2] / 9).astype(np.float32), FIXED_AFFINE)
    written = _write_transforms(tmp_path, result, fixed_v, moving_v, itk=True)
    mine = load_volume(warp_file(tmp_path / "fixed.nii.gz", written["disp_inverse"],
                                 tmp_path / "inv.nii.gz")).data
    inverse_affine = sitk.ReadTransform(str(written["affine"])).GetInverse()
    inverse_warp = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(written["itk_inverse_warp"]), sitk.sitkVectorFloat64))
    ref_img = sitk.ReadImage(str(tmp_path / "moving.nii.gz"), sitk.sitkFloat32)
    out = sitk.Resample(sitk.ReadImage(str(tmp_path / "fixed.nii.gz"), sitk.sitkFloat32), ref_img,
                        sitk.CompositeTransform([inverse_warp, inverse_affine]), sitk.sitkLinear)
    out = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    # moving voxels whose inverse image lies inside the fixed grid
    to_fixed = np.linalg.inv(FIXED_AFFINE) @ MOVING_AFFINE
    pts = (_grid(MOVING_SHAPE) + load_volume(written["disp_inverse"], allow_vector=True).data) \
        @ to_fixed[:3, :3].T + to_fixed[:3, 3]
    inside = np.all((pts >= 1) & (pts <= np.asarray(FIXED_SHAPE) - 2), axis=-1)
    assert inside.mean() > 0.4
    assert np.abs(out - mine)[inside].mean() < 1e-4
