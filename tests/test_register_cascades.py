"""`tfreg register --model M --cascades K` (recursive cascades with shared weights): one pass
gives the similarity after every recursion, and K = the trained count reproduces the exported
model itself."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from tfreg_cli.main import cli

SETS = ["model.cascades=2", "model.shared_weights=true", "model.affine_stem=false",
        "model.vtn_levels=3", "model.vtn_channels=4"]


@pytest.fixture(scope="module")
def collection32(tmp_path_factory):
    from tfreg.synthetic import write_collection

    # the cascade method needs sizes divisible by 32
    return write_collection(tmp_path_factory.mktemp("c32"), n=3, shape=(32, 32, 32), seed=1)


@pytest.fixture(scope="module")
def cascade_model(collection32, tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    args = ["train", "cascade", "--data", str(collection32), "--steps", "2", "-q",
            "--out", str(root / "run")]
    for item in SETS:
        args += ["--set", item]
    runner = CliRunner()
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["export", str(root / "run"), "-o", str(root / "model")])
    assert result.exit_code == 0, result.output
    return root / "model"


def test_cascades_table_and_trained_count_match_the_exported_model(cascade_model, collection32,
                                                                   tmp_path):
    import tensorflow as tf

    images = sorted((collection32.parent / "images").glob("*.nii.gz"))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["register", str(images[0]), str(images[1]), "--model",
                                      str(cascade_model), "--cascades", "4", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "report.json").read_text())["recursions"]
    assert [r["recursions"] for r in rows] == [1, 2, 3, 4]
    assert [r["trained"] for r in rows] == [False, True, False, False]
    assert "2 (trained)" in result.output

    # Independent path: the SavedModel exported with the trained count (no rebuild, no tfreg).
    fixed = nib.load(images[0]).get_fdata().astype("float32")
    moving = nib.load(images[1]).get_fdata().astype("float32")
    norm = [(a - a.min()) / (a.max() - a.min()) for a in (fixed, moving)]
    loaded = tf.saved_model.load(str(cascade_model / "saved_model"))
    warped = loaded.signatures["register"](fixed=tf.constant(norm[0][None, ..., None]),
                                          moving=tf.constant(norm[1][None, ..., None]))["warped"]
    r = np.corrcoef(norm[0].ravel(), np.asarray(warped).ravel())[0, 1]
    # 1e-4: float32 network outputs through two different graphs (Keras rebuild vs SavedModel).
    assert rows[1]["global_r"] == pytest.approx(r, abs=1e-4)


def test_cascades_needs_a_model(tiny_collection, tmp_path):
    images = sorted((tiny_collection.parent / "images").glob("*.nii.gz"))
    result = CliRunner().invoke(cli, ["register", str(images[0]), str(images[1]),
                                      "--cascades", "3", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --cascades: needs --model (a trained recursive model)"


def test_recursion_rows_match_independently_applied_recursions(cascade_model, collection32,
                                                               tmp_path):
    """With flows of ~2 voxels (the 2-step model's flow head scaled up), the rows of the table
    differ measurably, and each equals K applications of the one-cascade network composed and
    resampled with SciPy (not tfreg's warp/compose)."""
    import shutil

    from scipy import ndimage

    from tfreg.export import load_model

    model = tmp_path / "model"
    shutil.copytree(cascade_model, model)
    images = sorted((collection32.parent / "images").glob("*.nii.gz"))
    fixed = nib.load(images[0]).get_fdata().astype("float32")
    moving = nib.load(images[1]).get_fdata().astype("float32")
    f_n, m_n = [(a - a.min()) / (a.max() - a.min()) for a in (fixed, moving)]
    one = load_model(model, overrides={"model.cascades": 1}).keras_model
    head = one.get_layer("cascade").get_layer("upsamp1to0")
    flow = one({"fixed": f_n[None, ..., None], "moving": m_n[None, ..., None]})["disp"]
    head.set_weights([w * (2.0 / float(np.abs(flow).max())) for w in head.get_weights()])
    one.save_weights(str(model / "model.weights.h5"))

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["register", str(images[0]), str(images[1]), "--model",
                                      str(model), "--cascades", "3", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "report.json").read_text())["recursions"]

    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in fixed.shape],
                                indexing="ij"))
    agg = np.zeros_like(grid)
    warped = m_n
    expected = []
    for _ in range(3):
        f = one({"fixed": f_n[None, ..., None], "moving": warped[None, ..., None].astype("float32")})
        f = np.moveaxis(np.asarray(f["disp"][0], np.float64), -1, 0)
        # compose: first agg, then f -> f + agg(x + f)
        agg = f + np.stack([ndimage.map_coordinates(a, grid + f, order=1, mode="nearest") for a in agg])
        warped = ndimage.map_coordinates(m_n.astype(np.float64), grid + agg, order=1, mode="nearest")
        expected.append(np.corrcoef(f_n.ravel(), warped.ravel())[0, 1])
    got = [row["global_r"] for row in rows]
    tol = 2e-4  # float32 network and sampling against float64 SciPy
    assert min(abs(got[1] - got[0]), abs(got[2] - got[1])) > 10 * tol  # rows differ measurably
    np.testing.assert_allclose(got, expected, atol=tol)
