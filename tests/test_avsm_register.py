"""`tfreg register --model` with the `affine` and `avsm` methods: the affine part of the one-pass
result goes to report.json (voxels and RAS mm) and affine.mat (ITK/ANTs).

The models are untrained with the head of the affine network set to a known affine (zero
weights, bias = parameters), so the expected map is known without running tfreg: it is composed
here by hand from the model grid to the world through the preprocessing's resampling, and the
written affine.mat is read back with SimpleITK.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from tfreg.config import method_defaults, set_dotted
from tfreg.export import export_model
from tfreg.registry import discover
from tfreg.synthetic import phantom
from tfreg_cli.main import cli

INSHAPE = (16, 16, 16)
#: model grid: 16^3 voxels of 2 mm; original fixed grid: 20 x 18 x 22 voxels of 1.5 mm, oblique.
PREP = {"shape": list(INSHAPE), "spacing": [2.0, 2.0, 2.0], "fit": "center", "threshold": None,
        "normalize": "minmax", "percentiles": [1.0, 99.0]}
SOURCE_SHAPE = (20, 18, 22)
#: the known map in the model's normalised coordinates x in [-1, 1]: y = A x + b
THETA_A = np.array([[0.95, 0.08, 0.0], [-0.06, 1.05, 0.03], [0.02, 0.0, 0.9]])
THETA_B = np.array([0.1, -0.05, 0.08])


def _world(shape) -> np.ndarray:
    """An oblique 1.5 mm grid (rotation about z by 10 degrees)."""
    a = np.deg2rad(10)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rot * 1.5
    out[:3, 3] = [-14.0, 9.0, -20.0]
    return out


def _model(name: str, tmp_path, zero_momentum: bool = False):
    loaded = discover().get(name)
    config = method_defaults(loaded.method)
    set_dotted(config, "model.affine_train_steps", 1)
    set_dotted(config, "model.affine_test_steps", 1)
    if name == "avsm":
        set_dotted(config, "model.momentum_features", [4, 4, 4, 4, 4])
        set_dotted(config, "model.vsvf_steps", 1)
        set_dotted(config, "model.integration_steps", 2)
    model = loaded.method.build_model(config, INSHAPE)
    head = model.get_layer("avsm_affine_fc2")
    kernel, _ = head.get_weights()
    head.set_weights([np.zeros_like(kernel),
                      np.concatenate([THETA_A.ravel(), THETA_B]).astype(np.float32)])
    if zero_momentum:   # v = 0: the vSVF map is the affine map
        for layer in model.layers:
            if layer.name.startswith("avsm_momentum") and layer.get_weights():
                layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    return export_model(model, config, tmp_path / name, method=loaded, inshape=INSHAPE,
                        preprocessing=PREP)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(0)
    fixed, _ = phantom(SOURCE_SHAPE, rng)
    moving, _ = phantom(SOURCE_SHAPE, rng)
    paths = {}
    for name, data in (("fixed", fixed), ("moving", moving)):
        paths[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), _world(SOURCE_SHAPE)), str(paths[name]))
    return paths


def _expected_world_map() -> np.ndarray:
    """Fixed RAS point -> moving RAS point, composed by hand.

    Model normalised coords n = 2 v / 15 - 1 for model voxels v; model voxel v <-> original voxel
    x = Z v + t with Z = 2 mm / 1.5 mm and t centring the model grid on the original one; world
    = W x.
    """
    w = _world(SOURCE_SHAPE)
    zoom = 2.0 / 1.5
    src_c = (np.asarray(SOURCE_SHAPE) - 1) / 2
    v_to_x = np.eye(4)
    v_to_x[:3, :3] = np.eye(3) * zoom
    v_to_x[:3, 3] = src_c - zoom * 7.5
    v_to_n = np.eye(4)
    v_to_n[:3, :3] = np.eye(3) * 2 / 15
    v_to_n[:3, 3] = -1
    theta = np.eye(4)
    theta[:3, :3], theta[:3, 3] = THETA_A, THETA_B
    world_to_v = np.linalg.inv(v_to_x) @ np.linalg.inv(w)
    return w @ v_to_x @ np.linalg.inv(v_to_n) @ theta @ v_to_n @ world_to_v


def _register(model_dir, pair, out, *extra):
    result = CliRunner().invoke(cli, [str(a) for a in ["register", pair["fixed"], pair["moving"],
                                                       "--model", model_dir, "-o", out, *extra]])
    assert result.exit_code == 0, result.output
    return result, json.loads((out / "report.json").read_text())


def _model_grid_inside(shape) -> np.ndarray:
    """Fixed-grid voxels inside the model grid (where the model's field is not extended by its
    border values when it is resampled onto the fixed grid)."""
    c = (np.asarray(shape) - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"), -1)
    model_v = (grid - (c - 2.0 / 1.5 * 7.5)) / (2.0 / 1.5)
    return grid, np.all((model_v >= 0) & (model_v <= 15), axis=-1)


def test_avsm_model_reports_and_writes_its_affine_part(pair, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    model_dir = _model("avsm", tmp_path, zero_momentum=True)
    out = tmp_path / "out"
    result, report = _register(model_dir, pair, out, "--itk")
    expected = _expected_world_map()
    np.testing.assert_allclose(np.asarray(report["affine_world"]), expected, atol=1e-4)
    assert report["affine_steps"] == 1
    assert "affine part (1 step of the affine network)" in result.output
    # affine.mat read by SimpleITK (LPS points): the same map
    tx = sitk.ReadTransform(str(out / "affine.mat"))
    lps = np.diag([-1.0, -1.0, 1.0])
    for p in ([0.0, 0.0, 0.0], [12.0, -7.0, 5.0], [-20.0, 15.0, 3.0]):
        got = lps @ np.asarray(tx.TransformPoint(tuple(float(c) for c in lps @ p)))
        np.testing.assert_allclose(got, expected[:3, :3] @ p + expected[:3, 3], atol=1e-4)
    # zero momentum: the vSVF map is the affine map, so the voxel affine of the fixed grid
    # reproduces the written field (another code path: the model's dense displacement,
    # resampled onto the fixed grid) and the rest (the ITK warp) is ~0
    disp = nib.load(str(out / "disp.nii.gz")).get_fdata()
    aff = np.asarray(report["affine"])
    grid, inside = _model_grid_inside(SOURCE_SHAPE)
    c = (np.asarray(SOURCE_SHAPE) - 1) / 2
    from_affine = (grid - c) @ aff[:, :3].T + aff[:, 3] + c - grid
    assert inside.mean() > 0.5
    np.testing.assert_allclose(disp[inside], from_affine[inside], atol=2e-3)
    assert np.linalg.norm(from_affine[inside], axis=-1).mean() > 0.5   # measured: 1.4 voxels
    warp = nib.load(str(out / "itk_warp.nii.gz")).get_fdata()[..., 0, :]
    assert np.abs(warp[inside]).max() < 0.02      # mm; the affine part moves about 2 mm


def test_inverse_of_the_rest_from_a_full_inverse():
    """A model's full inverse ``phi^-1`` with an affine part ``phi = Aff o (id + w)`` gives the
    inverse of ``w`` alone; here ``w`` is a translation ``t``, so that inverse is ``-t``."""
    from tfreg.register import _rest_inverse

    shape = (24, 20)
    a, t = np.array([[1.1, 0.1, 1.5], [-0.05, 0.9, -2.0]]), np.array([0.7, -0.4])
    c = (np.asarray(shape) - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"), -1)
    # phi^-1(y) = Aff^-1(y) - t
    a_inv = np.linalg.inv(a[:, :2])
    full_inverse = (grid - c - a[:, 2]) @ a_inv.T + c - t - grid
    rest = _rest_inverse(full_inverse.astype(np.float32), a)
    inner = (slice(4, -4), slice(4, -4))      # Aff(z) stays inside the grid
    np.testing.assert_allclose(rest[inner], np.broadcast_to(-t, rest[inner].shape), atol=1e-4)
