"""`tfreg register --method lddmm` on a tiny 2D pair: outputs, report and a lower mismatch."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from click.testing import CliRunner

from tfreg_cli.main import cli


def _write(path, data, spacing=(1.0, 1.0)):
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([*spacing, 1.0, 1.0])), str(path))


def test_register_method_lddmm(tmp_path):
    shape = (20, 20)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    moving = np.exp(-((grid - 9.5) ** 2).sum(-1) / 20.0)
    fixed = np.exp(-((grid - np.array([11.0, 9.5])) ** 2).sum(-1) / 20.0)
    _write(tmp_path / "f.nii.gz", fixed)
    _write(tmp_path / "m.nii.gz", moving)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["register", str(tmp_path / "f.nii.gz"),
                                       str(tmp_path / "m.nii.gz"), "-o", str(out), "-q",
                                       "--method", "lddmm", "--iterations", "4", "--no-xla",
                                       "--inverse"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "lddmm"
    image = report["lddmm_energy"]["image"]
    assert image[1] < 0.8 * image[0], image
    disp = nib.load(str(out / "disp.nii.gz")).get_fdata()
    assert disp.shape == (*shape, 2)
    # fixed blob at 11, moving blob at 9.5 along axis 0: warped(x) = moving(x + disp(x)) pulls
    # from 1.5 voxels back, so disp ~ -1.5 at the fixed blob's centre (4 iterations: over half)
    assert -2.0 < disp[11, 10, 0] < -0.75, disp[11, 10, 0]
    assert "geodesic" in report["inverse_method"]


def test_register_method_lddmm_rejects_instance_options(tmp_path):
    data = np.random.default_rng(0).random((8, 8))
    _write(tmp_path / "f.nii.gz", data)
    _write(tmp_path / "m.nii.gz", data[::-1])
    result = CliRunner().invoke(cli, ["register", str(tmp_path / "f.nii.gz"),
                                       str(tmp_path / "m.nii.gz"), "-o", str(tmp_path / "o"),
                                       "--method", "lddmm", "--levels", "2"])
    assert result.exit_code != 0
    assert "--levels: not used by --method lddmm" in result.output
