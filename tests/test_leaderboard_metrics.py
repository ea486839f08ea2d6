"""Leaderboard metrics in `register`/`evaluate` reports: HD95 in voxels, Learn2Reg's SDlogJ, NDV,
keypoint TRE, and the pasteable evaluate table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from tfreg.errors import InputError
from tfreg.io import Volume
from tfreg.register import _points_on_fixed, load_keypoints, score
from tfreg_cli.main import cli

QUICK = ["--preset", "fast", "--levels", "1", "--iterations", "5", "--no-affine", "--no-xla", "-q"]


def test_score_hand_values_for_a_constant_shift():
    # disp = 1 voxel along axis 0 everywhere; labels: a 4^3 box, warped = the box shifted by 1.
    shape = (12, 12, 12)
    disp = np.zeros((*shape, 3))
    disp[..., 0] = 1.0
    fixed = np.zeros(shape, np.int32)
    fixed[4:8, 4:8, 4:8] = 3
    warped = np.roll(fixed, 1, axis=0)
    points = np.array([[5.0, 5.0, 5.0], [6.0, 3.0, 4.0]])
    out = score(disp, (2.0, 2.0, 2.0), fixed_labels=fixed, warped_labels=warped,
                unregistered_labels=fixed, keypoints=(points, points + [1.0, 0.0, 0.0]))
    # a rigid shift: det J = 1 everywhere -> both SDlogJ 0, no folding, no NDV
    assert out["sdlogj"] == 0.0 and out["sdlogj_l2r"] == 0.0
    assert out["folding_percent"] == 0.0 and out["ndv_percent"] == 0.0
    # Dice of a 4^3 box shifted by one voxel: 2 * 48 / 128
    assert out["mean_dice"] == pytest.approx(0.75) and out["mean_dice_before"] == 1.0
    # surfaces one voxel apart along axis 0 (the end faces): HD95 in voxels is 1, in mm 2
    assert out["mean_hd95_vox"] == pytest.approx(1.0)
    assert out["mean_hd95_mm"] == pytest.approx(2.0)
    # keypoints: the shift moves every fixed point onto its moving point; before: 1 voxel = 2 mm
    assert out["tre_mm"] == pytest.approx(0.0, abs=1e-6)
    assert out["tre_mm_before"] == pytest.approx(2.0)
    assert out["keypoints"] == 2


def test_moving_keypoints_map_onto_the_fixed_grid(tmp_path):
    fixed = Volume(np.zeros((10, 10, 10), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    moving_affine = np.array([[1.0, 0, 0, 4.0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    moving = Volume(np.zeros((20, 20, 20), np.float32), moving_affine)
    (tmp_path / "f.csv").write_text("3,4,5\n")
    (tmp_path / "m.csv").write_text("8,8,10\n")
    fixed_pts, moving_pts = load_keypoints(tmp_path / "f.csv", tmp_path / "m.csv", fixed, moving)
    to_moving = np.linalg.inv(moving.affine) @ fixed.affine
    # moving voxel (8, 8, 10) is world (12, 8, 10) = fixed voxel (6, 4, 5)
    np.testing.assert_allclose(_points_on_fixed(moving_pts, to_moving), [[6.0, 4.0, 5.0]])
    (tmp_path / "m.csv").write_text("8,8,10\n1,1,1\n")
    with pytest.raises(InputError, match="has 2 keypoints but"):
        load_keypoints(tmp_path / "f.csv", tmp_path / "m.csv", fixed, moving)
    (tmp_path / "m.csv").write_text("8,8,30\n")
    with pytest.raises(InputError, match="keypoint 1 .* lies outside its image"):
        load_keypoints(tmp_path / "f.csv", tmp_path / "m.csv", fixed, moving)
    with pytest.raises(InputError, match="needs both fixed and moving keypoints"):
        load_keypoints(tmp_path / "f.csv", None, fixed, moving)


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_register_and_evaluate_report_tre_and_table(tmp_path):
    from tfreg.synthetic import write_collection

    spec = write_collection(tmp_path / "data", n=3, shape=(24, 24, 24), seed=1, max_disp=2.0)
    spec.write_text("images: images/*.nii.gz\nlabels: labels/{name}\n"
                    "split: {test: [images/sub-01.nii.gz, images/sub-02.nii.gz]}\n")
    images = tmp_path / "data" / "images"
    kp = tmp_path / "kp"
    kp.mkdir()
    points = np.array([[10.0, 12.0, 14.0], [20.0, 16.0, 11.0], [15.5, 15.0, 18.0]])
    np.savetxt(kp / "sub-01.csv", points, delimiter=",", fmt="%.3f")
    np.savetxt(kp / "sub-02.csv", points + [1.0, -1.0, 0.0], delimiter=",", fmt="%.3f")
    spacing = nib.load(str(images / "sub-01.nii.gz")).header.get_zooms()[:3]

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [str(a) for a in [
        "register", images / "sub-01.nii.gz", images / "sub-02.nii.gz", "-o", out,
        "--fixed-keypoints", kp / "sub-01.csv", "--moving-keypoints", kp / "sub-02.csv", *QUICK]])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    before = np.linalg.norm(np.array([1.0, -1.0, 0.0]) * spacing)
    assert report["tre_mm_before"] == pytest.approx(before, abs=1e-5)
    # after: recomputed from the written field with SciPy's cubic spline, as Learn2Reg does
    disp = np.asarray(nib.load(str(out / "disp.nii.gz")).dataobj, np.float64)
    moved = points + np.stack([ndimage.map_coordinates(disp[..., c], points.T, order=3)
                               for c in range(3)], -1)
    expected = np.linalg.norm((moved - points - [1.0, -1.0, 0.0]) * spacing, axis=1).mean()
    assert report["tre_mm"] == pytest.approx(expected, abs=1e-4)
    for key in ("ndv_percent", "sdlogj_l2r"):
        assert report[key] is not None and report[key] >= 0
    assert "TRE" in result.output and "NDV" in result.output

    csv_path = tmp_path / "eval.csv"
    result = CliRunner().invoke(cli, [str(a) for a in [
        "evaluate", spec, "--split", "test", "-o", csv_path, "--keypoints", kp, *QUICK]])
    assert result.exit_code == 0, result.output
    row = next(csv.DictReader(csv_path.open()))  # the pair sub-02 -> sub-01
    assert float(row["tre_mm_before"]) == pytest.approx(before, abs=1e-5)
    for key in ("mean_hd95_vox", "sdlogj_l2r", "ndv_percent", "tre_mm"):
        assert row[key] != "", key
    table = [line for line in result.output.splitlines() if line.startswith("|")]
    assert table[0].startswith("| metric (1 pairs) | mean ± sd | leaderboard name |")
    assert table[1] == "|---|---:|---|"
    names = [line.split("|")[1].strip() for line in table[2:]]
    for name in ("Dice", "HD95 (mm)", "HD95 (voxels)", "SDlogJ",
                 "SDlogJ, Learn2Reg's (+3, crop 2)", "NDV (%)", "TRE (mm)"):
        assert name in names, name
    tre_line = table[2 + names.index("TRE (mm)")]
    assert f"{float(row['tre_mm']):.3f} ± 0.000" in tre_line

    result = CliRunner().invoke(cli, [str(a) for a in [
        "evaluate", spec, "--split", "test", "-o", csv_path, "--keypoints", tmp_path / "none"]])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--keypoints folder does not exist" in result.output
