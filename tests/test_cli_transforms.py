"""`tfreg convert`, `tfreg warp` with external transforms and `tfreg evaluate --transforms /
--l2r-submission`, with hand-computed fields and SimpleITK as the oracle."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from clicheck import one_line_error
from tfreg import transforms_io as tio
from tfreg.io import load_volume, save_volume
from tfreg_cli.main import cli

sitk = pytest.importorskip("SimpleITK")

# oblique, anisotropic, first axis flipped
ANGLE = np.deg2rad(12)
FIXED_AFFINE = np.array([[-1.2 * np.cos(ANGLE), -0.9 * np.sin(ANGLE), 0, 14.0],
                         [-1.2 * np.sin(ANGLE), 0.9 * np.cos(ANGLE), 0, -10.0],
                         [0, 0, 1.5, -12.0], [0, 0, 0, 1]])
SHAPE = (18, 20, 16)


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in SHAPE], indexing="ij"), -1)
    image = (np.sin(grid[..., 0] / 2.5) + np.cos(grid[..., 1] / 3.0) + grid[..., 2] / 8).astype(
        np.float32)
    u = np.stack([np.sin(grid[..., 1] / 4.0), 0.5 * np.cos(grid[..., 2] / 3.0),
                  0.7 * np.sin(grid[..., 0] / 5.0)], -1) + rng.normal(0, 0.01, (*SHAPE, 3))
    return {"fixed": save_volume(tmp_path / "fixed.nii.gz", image, FIXED_AFFINE),
            "moving": save_volume(tmp_path / "moving.nii.gz", image[::-1].copy(), FIXED_AFFINE),
            "disp": save_volume(tmp_path / "disp.nii.gz", u.astype(np.float32), FIXED_AFFINE),
            "u": u}


def test_convert_round_trip_through_every_format(files, tmp_path):
    current = files["disp"]
    for fmt in ("world", "itk", "l2r", "tfreg"):
        out = tmp_path / f"{fmt}.nii.gz"
        result = _run("convert", current, out, "--to", fmt, "--reference", files["fixed"])
        assert result.exit_code == 0, result.output
        current = out
    back = load_volume(current, allow_vector=True).data
    mm = np.linalg.norm((back - files["u"]) @ FIXED_AFFINE[:3, :3].T, axis=-1)
    assert mm.max() < 2e-3      # the l2r step rounds to float16 (|u| <= 1: 2^-11 relative)
    itk = nib.load(str(tmp_path / "itk.nii.gz"))
    assert itk.shape == (*SHAPE, 1, 3)


def test_warp_with_itk_field_and_affine_matches_simpleitk(files, tmp_path):
    """A warp + affine written as ANTs would (LPS), applied by `tfreg warp`, equals SimpleITK."""
    tio.save_field(tmp_path / "w.nii.gz", files["u"], FIXED_AFFINE, "itk")
    h = np.eye(4)
    h[:3, :3] = [[1.02, 0.05, 0], [-0.03, 0.98, 0.02], [0, 0.04, 1.01]]
    h[:3, 3] = [1.5, -2.0, 0.5]
    tio.write_itk_affine(tmp_path / "a.mat", h, centre_ras=[3, -2, 1])
    out = tmp_path / "warped.nii.gz"
    result = _run("warp", files["moving"], tmp_path / "w.nii.gz", "-o", out,
                  "--affine", tmp_path / "a.mat")
    assert result.exit_code == 0, result.output
    mine = load_volume(out).data
    fixed = sitk.ReadImage(str(files["fixed"]), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(files["moving"]), sitk.sitkFloat32)
    composite = sitk.CompositeTransform([
        sitk.ReadTransform(str(tmp_path / "a.mat")),
        sitk.DisplacementFieldTransform(sitk.ReadImage(str(tmp_path / "w.nii.gz"),
                                                       sitk.sitkVectorFloat64))])
    ref = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, composite, sitk.sitkLinear,
                                               0.0)).transpose(2, 1, 0)
    inner = (slice(3, -3),) * 3    # away from the border (border rules differ)
    assert np.abs(mine - ref)[inner].mean() < 1e-4
    assert np.abs(mine - load_volume(files["moving"]).data)[inner].mean() > 0.1
    # an affine alone, with --reference
    result = _run("warp", files["moving"], tmp_path / "a.mat", "-o", tmp_path / "aff.nii.gz",
                  "--reference", files["fixed"])
    assert result.exit_code == 0, result.output
    ref = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.ReadTransform(
        str(tmp_path / "a.mat")), sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
    assert np.abs(load_volume(tmp_path / "aff.nii.gz").data - ref)[inner].mean() < 1e-4


def test_convert_and_warp_errors(files, tmp_path):
    one_line_error(_run("convert", tmp_path / "a.mat", tmp_path / "o.nii.gz", "--to", "tfreg"),
                    "--reference")
    one_line_error(_run("convert", files["disp"], tmp_path / "o.nii.gz", "--to", "itk",
                         "--reference", tmp_path / "missing.nii.gz"), "missing.nii.gz")
    save_volume(tmp_path / "other.nii.gz", np.zeros((5, 5, 5), np.float32), np.eye(4))
    one_line_error(_run("convert", files["disp"], tmp_path / "o.nii.gz", "--to", "world",
                         "--reference", tmp_path / "other.nii.gz"), "reference grid")
    result = _run("convert", files["disp"], tmp_path / "o.nii.gz", "--to", "ants")
    assert result.exit_code == 2 and "ants" in result.output


def test_evaluate_external_transforms_and_l2r_submission(tmp_path):
    """Zero fields given as external ITK warps score like no registration; the submission folder
    gets one float16-precision field per pair under Learn2Reg's name."""
    from tfreg.data import DataSpec
    from tfreg.synthetic import write_collection

    spec = write_collection(tmp_path / "data", n=2, shape=(16, 16, 16), seed=1, max_disp=2.0)
    spec.write_text("images: images/*.nii.gz\nlabels: labels/{name}\n"
                    "split: {test: [images/sub-00.nii.gz, images/sub-01.nii.gz]}\n")
    pairs = DataSpec.from_yaml(spec).pairs("test")[:1]
    folder = tmp_path / "ext"
    folder.mkdir()
    for pair in pairs:
        fixed = load_volume(pair.fixed)
        tio.save_field(folder / tio.l2r_name(pair.fixed, pair.moving),
                       np.zeros((*fixed.shape, 3)), fixed.affine, "itk")
    sub = tmp_path / "submission"
    result = _run("evaluate", spec, "--transforms", folder, "--limit", "1",
                  "--l2r-submission", sub, "-o", tmp_path / "eval.csv", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval.summary.json").read_text())
    assert "external" in summary["method"]
    name = tio.l2r_name(pairs[0].fixed, pairs[0].moving)
    written = nib.load(str(sub / name))
    assert written.shape == (*load_volume(pairs[0].fixed).shape, 3)
    np.testing.assert_array_equal(np.asarray(written.dataobj), 0)
    import csv

    row = next(csv.DictReader(open(tmp_path / "eval.csv")))
    assert float(row["mean_dice"]) == pytest.approx(float(row["mean_dice_before"]), abs=1e-6)


def test_register_from_an_external_itk_result(files, tmp_path):
    """`register --init WARP --init-affine A.mat` (no steps) reproduces `tfreg warp` with the same
    files; `--inverse` inverts it by fixed-point iteration and reports the consistency in mm."""
    tio.save_field(tmp_path / "w.nii.gz", files["u"], FIXED_AFFINE, "itk")
    h = np.eye(4)
    h[:3, 3] = [1.0, -0.5, 0.8]
    tio.write_itk_affine(tmp_path / "a.mat", h)
    out = tmp_path / "out"
    result = _run("register", files["fixed"], files["moving"], "-o", out, "--init",
                  tmp_path / "w.nii.gz", "--init-affine", tmp_path / "a.mat", "--inverse", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "external transform"
    assert report["inverse_method"].startswith("fixed-point")
    assert report["inverse_consistency_mm"]["mean"] < 0.02
    _run("warp", files["moving"], tmp_path / "w.nii.gz", "--affine", tmp_path / "a.mat", "-o",
         tmp_path / "ref.nii.gz")
    np.testing.assert_allclose(load_volume(out / "warped.nii.gz").data,
                               load_volume(tmp_path / "ref.nii.gz").data, atol=1e-5)
    one_line_error(_run("register", files["fixed"], files["moving"], "-o", out, "--finetune",
                         "5"), "--finetune", "--init")


def test_plus_5mm_right_moves_the_content_left(files, tmp_path):
    """Pull convention, independently of any tool: a world field of +5 mm along R samples the
    moving image 5 mm to the right, so a blob at R = r0 appears at R = r0 - 5 in the output."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-15.0, -15.0, -15.0]
    grid = np.stack(np.meshgrid(*[np.arange(31.0)] * 3, indexing="ij"), -1) + affine[:3, 3]
    blob = np.exp(-np.sum((grid - [4.0, 0, 0]) ** 2, -1) / 4.0).astype(np.float32)
    save_volume(tmp_path / "blob.nii.gz", blob, affine)
    five_right = np.broadcast_to(np.array([5.0, 0, 0]), (31, 31, 31, 3))  # voxels = mm here
    tio.save_field(tmp_path / "world.nii.gz", five_right, affine, "world")
    tio.save_field(tmp_path / "itk.nii.gz", five_right, affine, "itk")
    assert load_volume(tmp_path / "world.nii.gz", allow_vector=True).data[0, 0, 0, 0] == 5.0
    assert load_volume(tmp_path / "itk.nii.gz", allow_vector=True).data[0, 0, 0, 0] == -5.0
    for fmt, path in (("world", tmp_path / "world.nii.gz"), ("itk", tmp_path / "itk.nii.gz")):
        assert tio.field_format(path) == fmt
        out = tmp_path / f"warped_{fmt}.nii.gz"
        assert _run("warp", tmp_path / "blob.nii.gz", path, "-o", out).exit_code == 0
        warped = load_volume(out).data
        peak = np.unravel_index(np.argmax(warped), warped.shape)
        np.testing.assert_allclose(grid[peak], [-1.0, 0, 0])
