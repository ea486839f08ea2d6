"""`tfreg show` (overview PNG) and `tfreg demo` (offline end-to-end run)."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
from click.testing import CliRunner

from tfreg.synthetic import phantom, smooth_random_field, warp_numpy
from tfreg_cli.main import cli

QUICK = ["--preset", "fast", "--levels", "2", "--iterations", "40,30",
         "--affine-iterations", "30", "-q"]


def _run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _pair(tmp_path, shape):
    rng = np.random.default_rng(4)
    fixed, _ = phantom(shape, rng, jitter=0.0)
    truth = smooth_random_field(shape, max_disp=6.0, smoothness=5.0, rng=rng)
    affine = np.diag([1.5] * 3 + [1.0])
    paths = []
    for name, data in (("fixed", fixed), ("moving", warp_numpy(fixed, -truth, order=1))):
        paths.append(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(data, affine), str(paths[-1]))
    return paths


def _check_png(path, rows: int) -> None:
    image = mpimg.imread(str(path))
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    height, width = image.shape[:2]
    assert width > 2 * height / rows  # 7 columns, `rows` rows of panels
    assert image[..., :3].std() > 0.05  # not blank


def test_show_writes_one_png_3d_and_2d(tmp_path):
    for shape, rows in (((32, 32, 32), 3), ((48, 40), 1)):
        folder = tmp_path / f"{len(shape)}d"
        folder.mkdir()
        fixed, moving = _pair(folder, shape)
        assert _run(["register", fixed, moving, "-o", folder / "out", *QUICK]).exit_code == 0
        result = _run(["show", folder / "out"])
        assert result.exit_code == 0, result.output
        png = folder / "out" / "overview.png"
        assert result.output.strip() == f"wrote {png}"
        _check_png(png, rows)
        result = _run(["show", folder / "out", "-o", folder / "custom.png"])
        assert result.exit_code == 0 and (folder / "custom.png").is_file()


def test_show_errors_are_one_line(tmp_path):
    result = _run(["show", tmp_path / "nothing"])
    assert result.exit_code == 1 and "nothing: not a folder" in result.output
    (tmp_path / "empty").mkdir()
    result = _run(["show", tmp_path / "empty"])
    assert result.exit_code == 1 and "--fixed" in result.output
    assert "Traceback" not in result.output


def test_demo_runs_offline_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = _run(["demo", "-o", out, "--size", "32", "--preset", "fast", "-q"])
    assert result.exit_code == 0, result.output
    for name in ("inputs/fixed.nii.gz", "inputs/moving_labels.nii.gz",
                 "registration/warped.nii.gz", "registration/disp.nii.gz",
                 "registration/warped_labels.nii.gz", "registration/report.json", "overview.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "registration" / "report.json").read_text())
    # the sample pair differs by shape, deformation and an 8 degree rotation; measured at this
    # size with the fast preset: 0.18 -> 0.61 (default size and preset: 0.30 -> 0.82)
    assert report["mean_dice"] > report["mean_dice_before"] + 0.2
    assert report["folding_percent"] < 0.5
    for word in ("white matter", "ventricles", "mean", "folding", "overview.png"):
        assert word in result.output
    _check_png(out / "overview.png", 3)
