"""The model shipped inside the package: its files match the manifest's SHA-256 (hashed here with
hashlib) and are listed in setup.cfg's package data; ``tfreg register --model builtin`` and
``--init builtin`` register a held-out brain pair across contrasts, scored with a Dice computed
here in NumPy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from tfreg import builtin
from tfreg_cli.main import cli

MAPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthseg_label_maps"
#: T1-like intensity by FreeSurfer label class (WM bright, GM mid, CSF dark); others 0.5
T1 = {0.9: (2, 41, 7, 46, 16, 28, 60), 0.55: (3, 42, 8, 47, 17, 18, 53, 54, 10, 49, 11, 50,
                                               12, 51, 13, 52, 26, 58),
      0.15: (4, 5, 14, 15, 24, 43, 44, 31, 63)}


def _run(args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _dice(a: np.ndarray, b: np.ndarray, labels) -> float:
    """Mean Dice over `labels`, written out here (not tfreg.metrics)."""
    scores = []
    for lab in labels:
        x, y = a == lab, b == lab
        scores.append(2.0 * np.logical_and(x, y).sum() / max(x.sum() + y.sum(), 1))
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def brains(tmp_path_factory) -> dict[str, Path]:
    """Held-out SynthSeg map 09 (labels >= 500 dropped) cropped to its labels' bounding box and
    sampled every 3rd voxel (3 mm); fixed: a T1-like image of it; moving: the map deformed by a
    smooth sine field (peak 2.5 voxels = 7.5 mm), with T2-like intensities (CSF bright, WM dark),
    so that the network has to work across contrasts."""
    if not MAPS.is_dir():
        pytest.skip("shared label maps not available")
    from scipy import ndimage

    data = np.asarray(nib.load(MAPS / "training_seg_09.nii.gz").dataobj)
    labels = np.where(data >= 500, 0, data).astype(np.int32)
    nz = np.nonzero(labels)
    labels = labels[tuple(slice(ax.min(), ax.max() + 1, 3) for ax in nz)]
    labels = np.pad(labels, 3)
    # a smooth field, 2.5 voxels (7.5 mm) at most: one sine period across the image per axis
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in labels.shape], indexing="ij")
    coords = [g + 2.5 * np.sin(2 * np.pi * grid[(d + 1) % 3] / labels.shape[(d + 1) % 3] + d)
              for d, g in enumerate(grid)]
    moving_labels = ndimage.map_coordinates(labels, coords, order=0, mode="nearest")
    t1 = np.full(int(labels.max()) + 1, 0.5, np.float32)
    t1[0] = 0.0
    for value, group in T1.items():
        t1[list(group)] = value
    t2 = np.where(t1 > 0, 1.05 - t1, 0.0).astype(np.float32)   # CSF bright, WM dark
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    root = tmp_path_factory.mktemp("brains")
    out = {}
    for name, lab, lut in (("fixed", labels, t1), ("moving", moving_labels, t2)):
        image = ndimage.gaussian_filter(lut[lab], 0.5).astype(np.float32)
        out[name] = root / f"{name}.nii.gz"
        out[name + "_labels"] = root / f"{name}_labels.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), str(out[name]))
        nib.save(nib.Nifti1Image(lab.astype(np.int32), affine), str(out[name + "_labels"]))
    return out


def _scores(pair: dict[str, Path], out: Path) -> tuple[float, float]:
    """(Dice before, Dice after) over the labels present in both maps."""
    fixed = np.asarray(nib.load(pair["fixed_labels"]).dataobj)
    moving = np.asarray(nib.load(pair["moving_labels"]).dataobj)
    warped = np.asarray(nib.load(out / "warped_labels.nii.gz").dataobj)
    labels = sorted((set(np.unique(fixed)) & set(np.unique(moving))) - {0})
    return _dice(fixed, moving, labels), _dice(fixed, warped, labels)


# ------------------------------------------------------------------------------ the files
def test_shipped_files_match_the_manifest_hashed_here():
    manifest = json.loads((builtin.ROOT / builtin.MANIFEST).read_text())
    folder = builtin.model_dir()
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((folder / rel).read_bytes()).hexdigest() == digest, rel
    assert builtin.verify() == folder.resolve()
    assert builtin.version() == manifest["version"]
    info = json.loads((folder / "tfreg_model.json").read_text())
    assert info["builtin_version"] == manifest["version"]
    assert sum((folder / rel).stat().st_size for rel in on_disk) < 5 * 2**20   # a few MB


def test_setup_cfg_ships_every_file_of_the_model():
    """`pip install .` copies package data by the globs of setup.cfg: each file of the model
    folder (and the manifest) must match one of the `tfreg` package's globs."""
    import configparser
    import fnmatch

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    value = cfg["options.package_data"]["tfreg"]
    # setuptools splits a value with newlines on newlines only (commas then stay in the names)
    globs = [g.strip() for g in (value.splitlines() if "\n" in value.strip() else value.split(","))
             if g.strip()]
    assert not any("," in g for g in globs), globs
    package = Path(builtin.__file__).resolve().parent
    files = [p.relative_to(package).as_posix() for p in builtin.ROOT.rglob("*") if p.is_file()]
    assert "models/builtin/manifest.json" in files
    # fnmatch's '*' also crosses '/', setuptools' does not: compare folder by folder
    unshipped = [f for f in files if not any(
        fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert not unshipped, unshipped


# ------------------------------------------------------------------------------ end to end
def test_model_builtin_runs_on_another_grid_and_does_no_harm(tmp_path, brains):
    """The pair (3 mm, about 60^3) is resampled to the model's 32x40x32 grid and the field
    mapped back. The pair is not affinely aligned, beyond the network's +/- 4 voxel matching
    range (docs/builtin-model.md), so this checks the path end to end: outputs on the fixed grid,
    no folding, Dice not lowered."""
    out = tmp_path / "model"
    result = _run(["register", brains["fixed"], brains["moving"], "--model", "builtin",
                   "--moving-labels", brains["moving_labels"], "-o", out, "-q"])
    assert result.exit_code == 0, result.output
    fixed = nib.load(brains["fixed"])
    disp = nib.load(out / "disp.nii.gz")
    assert disp.shape == (*fixed.shape, 3)
    np.testing.assert_allclose(disp.affine, fixed.affine)
    before, after = _scores(brains, out)
    assert after > before - 0.01, (before, after)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "model voxelmorph"
    assert report["folding_percent"] == 0.0


def test_init_builtin_refines_the_network(tmp_path, brains):
    out = tmp_path / "init"
    result = _run(["register", brains["fixed"], brains["moving"], "--init", "builtin",
                   "--preset", "fast", "--iterations", "10", "--affine-iterations", "10",
                   "--similarity", "mind", "--no-xla",
                   "--moving-labels", brains["moving_labels"], "-o", out, "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"].startswith("instance optimisation initialised by the model")
    assert report["finetune_steps"] == 10
    before, after = _scores(brains, out)
    assert after > before + 0.05, (before, after)
