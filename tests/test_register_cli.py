"""`tfreg register`, `tfreg warp` and `tfreg evaluate` on tiny NIfTI files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from clicheck import one_line_error
from tfreg.metrics import dice, mean_dice
from tfreg.synthetic import phantom, smooth_random_field, warp_numpy
from tfreg_cli.main import cli

SHAPE = (32, 32, 32)
#: quick settings (the same as tests/test_instance.py, so the compiled steps are shared).
QUICK = ["--preset", "fast", "--levels", "2", "--iterations", "40,30",
         "--affine-iterations", "30", "-q"]
AFFINE = np.array([[2.0, 0, 0, -31], [0, 2.0, 0, -40], [0, 0, 2.0, -25], [0, 0, 0, 1]])


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """Fixed phantom and a moving one deformed by a known smooth field (peak 7 voxels)."""
    root = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(5)
    fixed, labels = phantom(SHAPE, rng, jitter=0.0)
    truth = smooth_random_field(SHAPE, max_disp=7.0, smoothness=5.0, rng=rng)
    moving = warp_numpy(fixed, -truth, order=1)
    moving_labels = warp_numpy(labels, -truth, order=0).astype(np.int32)
    return {
        "fixed": _save(root / "fixed.nii.gz", fixed),
        "moving": _save(root / "moving.nii.gz", moving),
        "fixed_labels": _save(root / "fixed_labels.nii.gz", labels),
        "moving_labels": _save(root / "moving_labels.nii.gz", moving_labels),
    }


def _run(args: list[str]):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def test_register_writes_outputs_on_the_fixed_grid(pair, tmp_path):
    out = tmp_path / "out"
    result = _run(["register", pair["fixed"], pair["moving"], "-o", out,
                   "--fixed-labels", pair["fixed_labels"], "--moving-labels",
                   pair["moving_labels"], *QUICK])
    assert result.exit_code == 0, result.output
    for name in ("warped.nii.gz", "disp.nii.gz", "warped_labels.nii.gz", "report.json"):
        assert (out / name).is_file()
    warped = nib.load(str(out / "warped.nii.gz"))
    disp = nib.load(str(out / "disp.nii.gz"))
    labels = nib.load(str(out / "warped_labels.nii.gz"))
    for img in (warped, disp, labels):
        np.testing.assert_allclose(img.affine, AFFINE)
    assert disp.shape == (*SHAPE, 3) and warped.shape == SHAPE
    assert np.issubdtype(labels.get_data_dtype(), np.integer)
    report = json.loads((out / "report.json").read_text())
    for key in ("runtime_seconds", "device", "similarity", "similarity_before",
                "folding_percent", "sdlogj", "dice", "hd95_mm", "mean_dice", "mean_dice_before"):
        assert key in report, key
    assert set(report["dice"]) == {"1", "2", "3", "4", "5", "6"}
    # the known deformation is largely undone (measured 0.83 -> 0.94)
    assert report["mean_dice"] > report["mean_dice_before"] + 0.05
    assert report["folding_percent"] < 0.5
    assert report["similarity"] > report["similarity_before"]
    # the written labels are the ones scored
    fixed_labels = np.asarray(nib.load(str(pair["fixed_labels"])).dataobj)
    got = mean_dice(dice(fixed_labels, np.asarray(labels.dataobj)))
    assert got == pytest.approx(report["mean_dice"], abs=1e-4)
    assert "mean Dice" in result.output and str(out / "report.json") in result.output


def _reorient(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image in another voxel order: axes 0 and 1 swapped, then axis 2 flipped.

    The new affine maps each new voxel to the same world point as the old voxel it holds.
    """
    new = np.flip(np.transpose(data, (1, 0, 2)), axis=2)
    n2 = data.shape[2]
    # new[i, j, k] = old[j, i, n2 - 1 - k]  ->  old index = P @ new index + t
    perm = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, n2 - 1], [0, 0, 0, 1]], float)
    return np.ascontiguousarray(new), affine @ perm


def test_other_orientation_is_resampled_onto_the_fixed_grid(pair, tmp_path):
    fixed = nib.load(str(pair["fixed"]))
    labels = np.asarray(nib.load(str(pair["fixed_labels"])).dataobj).astype(np.int32)
    # moving = the fixed image itself, stored in another orientation: zero steps must give it back
    data, affine = _reorient(np.asarray(fixed.dataobj), AFFINE)
    lab, _ = _reorient(labels, AFFINE)
    moving = _save(tmp_path / "moving_ras.nii.gz", data, affine)
    moving_labels = _save(tmp_path / "moving_ras_labels.nii.gz", lab, affine)
    assert data.shape != SHAPE or not np.allclose(affine, AFFINE)
    out = tmp_path / "out"
    result = _run(["register", pair["fixed"], moving, "-o", out, "--moving-labels",
                   moving_labels, "--no-affine", "--iterations", "0", "-q"])
    assert result.exit_code == 0, result.output
    warped = nib.load(str(out / "warped.nii.gz"))
    np.testing.assert_allclose(warped.affine, AFFINE)
    assert warped.shape == SHAPE
    np.testing.assert_allclose(np.asarray(warped.dataobj), np.asarray(fixed.dataobj), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "warped_labels.nii.gz")).dataobj),
                                  labels)
    report = json.loads((out / "report.json").read_text())
    assert report["resampled"] is True


def test_coarser_moving_grid_is_registered(pair, tmp_path):
    """Moving on a 1.5x coarser grid with another origin: outputs on the fixed grid, Dice high."""
    fixed = nib.load(str(pair["fixed"]))
    labels = np.asarray(nib.load(str(pair["fixed_labels"])).dataobj).astype(np.int32)
    moving_img = nib.load(str(pair["moving"]))
    moving_lab = np.asarray(nib.load(str(pair["moving_labels"])).dataobj).astype(np.int32)
    from tfreg.io import Volume, resample_to_grid

    coarse = AFFINE.copy()
    coarse[:3, :3] *= 1.5
    coarse[:3, 3] += 0.5
    shape = (22, 22, 22)
    data = resample_to_grid(Volume(np.asarray(moving_img.dataobj, np.float32), AFFINE), coarse,
                            shape, order=1)
    lab = resample_to_grid(Volume(moving_lab, AFFINE), coarse, shape, order=0)
    moving = _save(tmp_path / "coarse.nii.gz", data, coarse)
    moving_labels = _save(tmp_path / "coarse_labels.nii.gz", lab.astype(np.int32), coarse)
    out = tmp_path / "out"
    result = _run(["register", pair["fixed"], moving, "-o", out, "--moving-labels",
                   moving_labels, "--fixed-labels", pair["fixed_labels"], *QUICK])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert nib.load(str(out / "disp.nii.gz")).shape == (*SHAPE, 3)
    np.testing.assert_allclose(nib.load(str(out / "warped_labels.nii.gz")).affine, fixed.affine)
    assert report["resampled"] is True
    assert report["mean_dice"] > report["mean_dice_before"] + 0.05
    del labels


def test_2d_images(tmp_path):
    rng = np.random.default_rng(2)
    fixed, labels = phantom((48, 40), rng, jitter=0.0)
    truth = smooth_random_field((48, 40), max_disp=6.0, smoothness=5.0, rng=rng)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    paths = [_save(tmp_path / f"{n}.nii.gz", d, affine) for n, d in (
        ("f", fixed), ("m", warp_numpy(fixed, -truth, order=1)), ("fl", labels),
        ("ml", warp_numpy(labels, -truth, order=0).astype(np.int32)))]
    out = tmp_path / "out"
    result = _run(["register", paths[0], paths[1], "-o", out, "--fixed-labels", paths[2],
                   "--moving-labels", paths[3], *QUICK])
    assert result.exit_code == 0, result.output
    assert nib.load(str(out / "disp.nii.gz")).shape == (48, 40, 2)
    report = json.loads((out / "report.json").read_text())
    assert report["mean_dice"] > report["mean_dice_before"]


def test_bad_inputs_give_one_clear_line(pair, tmp_path):
    four_d = _save(tmp_path / "four_d.nii.gz", np.zeros((8, 8, 8, 2), np.float32))
    nan = np.asarray(nib.load(str(pair["fixed"])).dataobj).copy()
    nan[3, 4, 5] = np.nan
    nan_path = _save(tmp_path / "nan.nii.gz", nan)
    small_labels = _save(tmp_path / "small_labels.nii.gz", np.zeros((16, 16, 16), np.int16))
    out = tmp_path / "out"
    one_line_error(_run(["register", tmp_path / "missing.nii.gz", pair["moving"], "-o", out]),
                    "missing.nii.gz", "not found")
    one_line_error(_run(["register", pair["fixed"], four_d, "-o", out]), "four_d.nii.gz", "4D")
    one_line_error(_run(["register", nan_path, pair["moving"], "-o", out]), "nan.nii.gz", "NaN")
    one_line_error(_run(["register", pair["fixed"], pair["moving"], "-o", out,
                          "--moving-labels", small_labels]),
                    "small_labels.nii.gz", "does not match")
    one_line_error(_run(["register", pair["fixed"], pair["moving"], "-o", out,
                          "--fixed-labels", pair["fixed_labels"]]), "--moving-labels")
    one_line_error(_run(["register", pair["fixed"], pair["moving"], "--finetune", "5"]),
                    "--finetune", "--model")
    one_line_error(_run(["register", pair["fixed"], pair["moving"], "--iterations", "a,b"]),
                    "--iterations")
    one_line_error(_run(["register", pair["fixed"], pair["moving"], "--device", "tpu"]),
                    "--device")
    assert not out.exists()  # nothing written for a refused input


def test_warp_integer_shift_and_nearest(pair, tmp_path):
    image = np.asarray(nib.load(str(pair["fixed"])).dataobj).astype(np.float32)
    labels = np.asarray(nib.load(str(pair["fixed_labels"])).dataobj).astype(np.int32)
    shift = np.zeros((*SHAPE, 3), np.float32)
    shift[..., 0], shift[..., 2] = 2.0, -1.0
    disp = _save(tmp_path / "disp.nii.gz", shift)
    result = _run(["warp", pair["fixed"], disp, "-o", tmp_path / "w.nii.gz"])
    assert result.exit_code == 0, result.output
    got = np.asarray(nib.load(str(tmp_path / "w.nii.gz")).dataobj)
    want = np.roll(image, (-2, 1), axis=(0, 2))  # pull: out(x) = image(x + s)
    np.testing.assert_allclose(got[:-2, :, 1:], want[:-2, :, 1:], atol=1e-6)
    result = _run(["warp", pair["fixed_labels"], disp, "-o", tmp_path / "wl.nii.gz", "--nearest"])
    assert result.exit_code == 0, result.output
    got_l = nib.load(str(tmp_path / "wl.nii.gz"))
    assert np.issubdtype(got_l.get_data_dtype(), np.integer)
    np.testing.assert_array_equal(np.asarray(got_l.dataobj)[:-2, :, 1:],
                                  np.roll(labels, (-2, 1), axis=(0, 2))[:-2, :, 1:])
    np.testing.assert_allclose(got_l.affine, AFFINE)
    one_line_error(_run(["warp", pair["fixed"], pair["fixed"], "-o", tmp_path / "x.nii.gz"]),
                    "fixed.nii.gz", "displacement field")


def test_warp_reproduces_register_output(pair, tmp_path):
    """`tfreg warp MOVING disp.nii.gz` gives the image `tfreg register` wrote."""
    out = tmp_path / "out"
    assert _run(["register", pair["fixed"], pair["moving"], "-o", out, *QUICK]).exit_code == 0
    result = _run(["warp", pair["moving"], out / "disp.nii.gz", "-o", tmp_path / "w.nii.gz"])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.asarray(nib.load(str(tmp_path / "w.nii.gz")).dataobj),
                               np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj),
                               atol=1e-5)


def test_evaluate_writes_csv_and_summary(tmp_path):
    from tfreg.synthetic import write_collection

    spec = write_collection(tmp_path / "data", n=3, shape=SHAPE, seed=1, max_disp=2.0)
    spec.write_text("images: images/*.nii.gz\nlabels: labels/{name}\n"
                    "split: {test: [images/sub-01.nii.gz, images/sub-02.nii.gz]}\n")
    out = tmp_path / "eval.csv"
    result = _run(["evaluate", spec, "--split", "test", "-o", out, *QUICK])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1  # consecutive pairs of the test split: sub-01 -> sub-02
    row = rows[0]
    assert row["pair"] == "sub-02->sub-01"
    assert float(row["mean_dice"]) > float(row["mean_dice_before"])
    summary = json.loads((tmp_path / "eval.summary.json").read_text())
    assert summary["pairs"] == 1
    assert summary["mean_dice"]["mean"] == pytest.approx(float(row["mean_dice"]), abs=1e-4)
    assert "Dice" in result.output and "±" in result.output
    one_line_error(_run(["evaluate", spec, "--split", "val", "-o", out]), "no pairs")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An exported 16^3 VoxelMorph model trained for 2 steps (its field is close to zero)."""
    from test_engine_toy import TINY_VXM, write_tiny_data

    root = tmp_path_factory.mktemp("model")
    spec = write_tiny_data(root / "data")
    result = _run(["train", "voxelmorph", "--data", spec, "--steps", "2", "--out", root / "run",
                   "--quiet", *TINY_VXM])
    assert result.exit_code == 0, result.output
    result = _run(["export", root / "run", "-o", root / "model"])
    assert result.exit_code == 0, result.output
    return root / "model"


def test_model_and_finetune(pair, model_dir, tmp_path):
    """A model with another input shape: outputs land on the fixed grid; finetuning from the
    (nearly zero) network field registers the pair."""
    args = ["register", pair["fixed"], pair["moving"], "--model", model_dir,
            "--fixed-labels", pair["fixed_labels"], "--moving-labels", pair["moving_labels"],
            "-q"]
    result = _run([*args, "-o", tmp_path / "net"])
    assert result.exit_code == 0, result.output
    net = json.loads((tmp_path / "net" / "report.json").read_text())
    assert net["method"] == "model voxelmorph" and net["model_inshape"] == [16, 16, 16]
    assert nib.load(str(tmp_path / "net" / "disp.nii.gz")).shape == (*SHAPE, 3)
    result = _run([*args, "-o", tmp_path / "ft", "--finetune", "40", "--preset", "fast"])
    assert result.exit_code == 0, result.output
    ft = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert ft["finetune_steps"] == 40
    assert ft["similarity"] > net["similarity"]
    assert ft["mean_dice"] > net["mean_dice"]
    np.testing.assert_allclose(nib.load(str(tmp_path / "ft" / "warped.nii.gz")).affine, AFFINE)


def test_inverse_and_itk_outputs_on_an_oblique_moving_grid(pair, tmp_path):
    """`--inverse --itk` with the moving image on another, oblique grid: SimpleITK applies
    itk_warp + affine.mat to the ORIGINAL moving image and gets warped.nii.gz; the inverse
    composes with the forward field to the identity within the reported tolerance."""
    sitk = pytest.importorskip("SimpleITK")
    angle = np.deg2rad(8)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0, 0], [np.sin(angle), np.cos(angle), 0, 0],
                    [0, 0, 1, 0], [0, 0, 0, 1]])
    oblique = rot @ np.diag([1.8, 2.2, 2.0, 1.0])
    oblique[:3, 3] = AFFINE[:3, 3] + [3.0, -2.0, 1.5]
    moving = _save(tmp_path / "moving_oblique.nii.gz",
                   np.asarray(nib.load(str(pair["moving"])).dataobj), oblique)
    out = tmp_path / "out"
    result = _run(["register", pair["fixed"], moving, "-o", out, "--inverse", "--itk", *QUICK])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["resampled"] is True
    assert report["inverse_method"].startswith("exact")
    assert report["inverse_consistency_mm"]["mean"] < 0.05
    inv = nib.load(str(out / "disp_inverse.nii.gz"))
    np.testing.assert_allclose(inv.affine, oblique, atol=1e-5)
    fixed_img = sitk.ReadImage(str(pair["fixed"]), sitk.sitkFloat32)
    moving_img = sitk.ReadImage(str(moving), sitk.sitkFloat32)
    warp = sitk.DisplacementFieldTransform(sitk.ReadImage(str(out / "itk_warp.nii.gz"),
                                                          sitk.sitkVectorFloat64))
    composite = sitk.CompositeTransform([sitk.ReadTransform(str(out / "affine.mat")), warp])
    fill = float(np.asarray(nib.load(str(moving)).dataobj).min())
    ref = sitk.GetArrayFromImage(sitk.Resample(moving_img, fixed_img, composite,
                                               sitk.sitkLinear, fill)).transpose(2, 1, 0)
    warped = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj)
    diff = np.abs(ref - warped)
    # intensities in [0, 1]: one 8-bit intensity step is 1/255 ~ 4e-3
    assert diff.mean() < 1e-3, diff.mean()
    assert np.percentile(diff, 99) < 1e-3
