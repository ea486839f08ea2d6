"""tfreg.io: NIfTI reading/writing with headers, clear errors, resampling between grids."""

from __future__ import annotations

import gzip
import os
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tfreg.errors import InputError
from tfreg.io import (Volume, atomic_path, load_volume, nifti_stem, read_info, resample_to_grid,
                      save_volume, voxel_spacing)


def _affine(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def _write(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


# --------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 7)])
def test_save_load_image_roundtrip_keeps_values_affine_and_dtype(tmp_path, shape):
    rng = np.random.default_rng(0)
    data = rng.normal(size=shape).astype(np.float64)  # written as float32
    affine = np.array([[0, -1.5, 0, 10], [2.0, 0, 0, -4], [0, 0, 0.8, 3], [0, 0, 0, 1]], float)
    path = save_volume(tmp_path / "img.nii.gz", data, affine)
    vol = load_volume(path)
    assert vol.data.dtype == np.float32 and vol.data.shape == shape
    np.testing.assert_allclose(vol.data, data.astype(np.float32), rtol=0, atol=0)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.get_sform(), affine, atol=1e-6)
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)  # rotation + zooms: exact
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    # spacing = column norms of the affine: axis 0 -> 2.0, axis 1 -> 1.5, axis 2 -> 0.8
    assert vol.spacing == pytest.approx((2.0, 1.5, 0.8)[: len(shape)])


def test_save_keeps_header_information(tmp_path):
    src = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), _affine((1, 1, 2)))
    src.header["descrip"] = b"subject 7"
    src.header.set_xyzt_units("mm", "sec")
    src.set_sform(_affine((1, 1, 2)), code=2)
    path = _write(tmp_path / "src.nii.gz", src.get_fdata(), None)
    nib.save(src, str(path))
    vol = load_volume(path)
    out = save_volume(tmp_path / "out.nii.gz", vol.data * 2 + 1, vol.affine, vol.header)
    hdr = nib.load(str(out)).header
    assert hdr["descrip"].tobytes().rstrip(b"\0") == b"subject 7"
    assert hdr.get_xyzt_units() == ("mm", "sec")
    assert int(hdr["sform_code"]) == 2
    assert hdr.get_data_dtype() == np.float32
    np.testing.assert_array_equal(load_volume(out).data, np.ones((4, 4, 4), np.float32))


@pytest.mark.parametrize("values,dtype", [((0, 35), np.int16), ((0, 70000), np.int32)])
def test_labels_roundtrip_as_int(tmp_path, values, dtype):
    labels = np.zeros((6, 5, 4), np.int64)
    labels[1:3, 2:4, 1:3] = values[1]
    path = save_volume(tmp_path / "seg.nii.gz", labels, np.eye(4))
    assert nib.load(str(path)).get_data_dtype() == dtype
    vol = load_volume(path, label=True)
    assert vol.data.dtype == np.int32
    np.testing.assert_array_equal(vol.data, labels)


def test_float_labels_are_rounded_and_non_integer_labels_refused(tmp_path):
    good = _write(tmp_path / "good.nii.gz", np.array([[0.0, 2.0000001], [3.0, 1.0]], np.float32))
    np.testing.assert_array_equal(load_volume(good, label=True).data, [[0, 2], [3, 1]])
    bad = _write(tmp_path / "bad.nii.gz", np.array([[0.0, 0.5], [3.0, 1.0]], np.float32))
    with pytest.raises(InputError, match=r"^.*bad\.nii\.gz: label map has non-integer values"):
        load_volume(bad, label=True)


def test_displacement_field_roundtrip(tmp_path):
    disp = np.random.default_rng(1).normal(size=(5, 6, 7, 3)).astype(np.float32)
    path = save_volume(tmp_path / "disp.nii.gz", disp, _affine((2, 2, 2)))
    vol = load_volume(path, allow_vector=True)
    assert vol.vector and vol.shape == (5, 6, 7) and vol.ndims == 3
    np.testing.assert_array_equal(vol.data, disp)
    # ITK/NIfTI vector layout (X, Y, Z, 1, 3) is accepted too
    _write(tmp_path / "itk.nii.gz", disp[:, :, :, None, :])
    np.testing.assert_array_equal(load_volume(tmp_path / "itk.nii.gz", allow_vector=True).data,
                                  disp)


def test_trailing_singleton_axes_are_squeezed(tmp_path):
    path = _write(tmp_path / "slice.nii.gz", np.ones((8, 9, 1), np.float32))
    vol = load_volume(path)
    assert vol.data.shape == (8, 9) and vol.ndims == 2
    assert read_info(path).shape == (8, 9)


def test_atomic_save_leaves_no_temporary_and_survives_concurrent_writers(tmp_path):
    target = tmp_path / "out" / "vol.nii.gz"
    arrays = [np.full((16, 16, 16), float(i), np.float32) for i in range(6)]
    errors = []

    def write(a):
        try:
            save_volume(target, a, np.eye(4))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(a,)) for a in arrays]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    data = load_volume(target).data
    assert len(np.unique(data)) == 1 and data.flat[0] in range(6)  # one complete file won
    assert [p.name for p in target.parent.iterdir()] == ["vol.nii.gz"]


def test_atomic_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "a.txt").write_text("first")
    with atomic_path(target, directory=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # nothing of the first left
    with pytest.raises(RuntimeError):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "c.txt").write_text("half")
            raise RuntimeError("writer failed")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # the old folder is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporaries


def test_atomic_file_keeps_the_double_suffix_and_umask_permissions(tmp_path):
    with atomic_path(tmp_path / "m.weights.h5") as tmp:
        assert tmp.name.endswith(".weights.h5") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "m.weights.h5").stat().st_mode & 0o777 == 0o666 & ~mask


# -------------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.nii\.gz: file not found$"):
        load_volume(tmp_path / "nope.nii.gz")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("hello")
    with pytest.raises(InputError, match=r"notes\.nii\.gz: not a readable NIfTI/MGH image"):
        load_volume(path)


def test_truncated_gzip(tmp_path):
    path = _write(tmp_path / "scan.nii.gz",
                  np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    info = read_info(path)  # the header is intact: only decoding finds the damage
    assert info.shape == (20, 20, 20)
    with pytest.raises(InputError, match=r"scan\.nii\.gz: truncated or corrupt compressed data"):
        load_volume(path)


def test_truncated_uncompressed(tmp_path):
    path = _write(tmp_path / "scan.nii", np.zeros((20, 20, 20), np.float32))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(InputError, match=r"scan\.nii: truncated or unreadable voxel data"):
        load_volume(path)


def test_4d_volume_is_refused_unless_vector(tmp_path):
    path = _write(tmp_path / "fmri.nii.gz", np.zeros((4, 4, 4, 5), np.float32))
    with pytest.raises(InputError, match=r"fmri\.nii\.gz: has shape \(4, 4, 4, 5\): a 4D volume"):
        load_volume(path)
    with pytest.raises(InputError, match=r"fmri\.nii\.gz: has shape"):
        read_info(path)
    with pytest.raises(InputError, match="vector field with 3 components"):
        load_volume(path, allow_vector=True)


@pytest.mark.parametrize("bad,word", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_non_finite_voxels(tmp_path, bad, word):
    data = np.zeros((5, 5, 5), np.float32)
    data[1, 2, 3] = bad
    data[0, 0, 0] = bad
    path = _write(tmp_path / "scan.nii.gz", data)
    with pytest.raises(InputError, match=rf"scan\.nii\.gz: contains 2 {word} voxels$"):
        load_volume(path)


def test_errors_are_one_line(tmp_path):
    path = tmp_path / "x.nii.gz"
    path.write_bytes(gzip.compress(b"\0" * 10))
    with pytest.raises(InputError) as info:
        load_volume(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))


def test_save_refuses_bad_suffix_and_nan(tmp_path):
    with pytest.raises(InputError, match=r"out\.png: output must end in \.nii\.gz or \.nii"):
        save_volume(tmp_path / "out.png", np.zeros((3, 3)), np.eye(4))
    with pytest.raises(InputError, match="refusing to save NaN"):
        save_volume(tmp_path / "out.nii.gz", np.full((3, 3), np.nan), np.eye(4))
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------- resampling
def test_voxel_spacing_and_stem():
    assert voxel_spacing(np.diag([2.0, -1.0, 1.5, 1.0])) == (2.0, 1.0, 1.5)
    rot = np.eye(4)
    rot[:2, :2] = [[0.0, -3.0], [3.0, 0.0]]  # 90 degree rotation with 3 mm voxels
    assert voxel_spacing(rot, 2) == pytest.approx((3.0, 3.0))
    assert nifti_stem("a/sub-01_T1w.nii.gz") == "sub-01_T1w" and nifti_stem("x.mgz") == "x"


@pytest.mark.parametrize("ndims", [2, 3])
def test_flipped_and_permuted_grid_roundtrip_is_exact(ndims):
    rng = np.random.default_rng(0)
    shape = (5, 6, 7)[:ndims]
    data = rng.normal(size=shape).astype(np.float32)
    affine = _affine((1.0, 2.0, 3.0), (4.0, -5.0, 6.0))
    vol = Volume(data, affine)
    # the same voxels stored flipped along axis 0 and with axes 0, 1 swapped
    perm = (1, 0, 2)[:ndims]
    stored = np.flip(data, 0).transpose(perm)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, shape[0] - 1
    swap = np.eye(4)[[*perm, *range(ndims, 4)]]  # (swap @ t)[k] = t[perm[k]]
    target_affine = affine @ flip @ swap
    for order in (0, 1):
        out = resample_to_grid(vol, target_affine, stored.shape, order=order)
        np.testing.assert_array_equal(out, stored)
        back = resample_to_grid(Volume(out, target_affine), affine, shape, order=order)
        np.testing.assert_array_equal(back, data)


def _world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    pts = np.concatenate([grid, np.zeros((*shape, 3 - len(shape))), np.ones((*shape, 1))], -1)
    return pts @ affine.T


@pytest.mark.parametrize("ndims", [2, 3])
def test_anisotropic_resampling_of_a_linear_ramp_is_exact_inside(ndims):
    """Linear interpolation reproduces a function linear in world coordinates exactly."""
    coef = np.array([0.3, -0.7, 0.2])
    src_affine = _affine((1.0, 1.0, 1.0), (-10.0, -12.0, -8.0))
    src_shape = (21, 25, 17)[:ndims]
    src = (_world(src_affine, src_shape)[..., :3] @ coef + 5.0).astype(np.float32)
    z = -8.0 if ndims == 2 else -6.0  # 2D grids share the slice plane
    dst_affine = _affine((2.0, 0.7, 3.0), (-8.3, -10.1, z))
    dst_shape = (8, 30, 5)[:ndims]
    out = resample_to_grid(Volume(src, src_affine), dst_affine, dst_shape, order=1)
    want = _world(dst_affine, dst_shape)[..., :3] @ coef + 5.0
    np.testing.assert_allclose(out, want, atol=1e-4)


def test_outside_fill_constant_or_nearest():
    vol = Volume(np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(4, 1).repeat(2, 1), np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 2.0  # target voxel i sits at source voxel i + 2
    out0 = resample_to_grid(vol, shifted, (4, 2), fill_value=0.0)[:, 0]
    np.testing.assert_allclose(out0, [3.0, 4.0, 0.0, 0.0])
    outn = resample_to_grid(vol, shifted, (4, 2), fill_value=None)[:, 0]
    np.testing.assert_allclose(outn, [3.0, 4.0, 4.0, 4.0])


def test_labels_resampled_nearest_keep_dtype_and_values():
    labels = np.zeros((10, 10, 10), np.int32)
    labels[2:6, 3:8, 4:9] = 17
    labels[6:9, 3:8, 4:9] = 4
    half = _affine((0.5, 0.5, 0.5))
    out = resample_to_grid(Volume(labels, np.eye(4)), half, (20, 20, 20), order=0)
    assert out.dtype == np.int32 and set(np.unique(out)) == {0, 4, 17}
    np.testing.assert_array_equal(out[::2, ::2, ::2], labels)
