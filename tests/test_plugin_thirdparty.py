"""A separately packaged plugin (tests/fixtures/toy_plugin, distribution 'tfreg-toy') is found
through its entry point once installed, listed by `tfreg methods`, trained by `tfreg train` on its
own .npz data format (an extra model input, two stages with different optimizers, a loss weight
that changes with the step), exported by `tfreg export` and used by `tfreg register --model`.

The distribution is built and installed with pip into a temporary folder, used through
PYTHONPATH by subprocesses only; the test environment itself is not changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "toy_plugin"


def run_tfreg(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, "-m", "tfreg", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def toy_site(tmp_path_factory) -> Path:
    """Install the toy distribution into a temporary target folder; return that folder."""
    work = tmp_path_factory.mktemp("toy_plugin")
    source = work / "src"
    shutil.copytree(FIXTURE, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))  # builds write into the source tree: use a copy
    site = work / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "tfreg_toy" / "toy.yaml").is_file()  # package data shipped
    return site


def test_methods_lists_the_toy_plugin_with_its_distribution(toy_site, tmp_path):
    proc = run_tfreg(["methods"], toy_site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    toy = [row for row in rows if row and row[0] == "toy"]
    assert len(toy) == 1, proc.stdout
    assert toy[0][-2:] == ["tfreg-toy", "0.1.0"]
    assert " ".join(toy[0][1:-2]) == "Toy method: one convolution predicts the field (plugin example)."
    assert "toy:" not in proc.stdout  # not among the failures


def _blobs(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """`(n, *shape)` smooth Gaussian blobs with random centres (values in [0, 1])."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return np.stack([np.exp(-sum((g - c) ** 2 for g, c in zip(grid, centre)) / 0.3)
                     for centre in rng.uniform(-0.3, 0.3, (n, len(shape)))]).astype("float32")


@pytest.fixture(scope="module")
def toy_run(toy_site, tmp_path_factory):
    """`tfreg train toy --data toy.npz` (2D 16x16, 3 + 2 steps), then `tfreg export`."""
    work = tmp_path_factory.mktemp("toy_run")
    np.savez(work / "toy.npz", images=_blobs(4, (16, 16)))
    run_dir = work / "run"
    proc = run_tfreg(["train", "toy", "--data", str(work / "toy.npz"), "--out", str(run_dir), "-q",
                      "--set", "schedule.coarse_steps=3", "--set", "schedule.fine_steps=2",
                      "--set", "loss.smooth_weight=0.5", "--set", "train.checkpoint_every=1"],
                     toy_site, work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_tfreg(["export", str(run_dir), "-o", str(work / "model")], toy_site, work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work


def test_train_runs_the_toy_plugin_on_its_own_data(toy_run):
    run_dir = toy_run / "run"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["method"] == "toy"
    assert config["schedule"]["coarse_steps"] == 3    # --set
    assert config["train"]["learning_rate"] == 1e-3   # from the toy's own YAML
    assert config["loss"]["smooth_weight"] == 0.5     # --set
    assert config["model"] == {"features": 4, "hyper": 0.5}
    state = json.loads((run_dir / "state.json").read_text())
    assert state["stages"] == ["coarse", "fine"] and state["step"] == 5 and state["finished"]
    assert state["inshape"] == [16, 16]
    assert state["preprocessing"] == {"shape": [16, 16], "normalize": "minmax"}


def test_toy_stages_use_their_own_optimizers(toy_run):
    """Checkpoint 3 (end of 'coarse') holds an Adam: 3 iterations, two slots (moments) per
    trained variable; checkpoint 5 (end of 'fine') a fresh SGD with momentum: 2 iterations, one
    slot per variable."""
    import tensorflow as tf

    def optimizer_state(step):
        prefix = str(toy_run / "run" / "checkpoints" / f"ckpt-{step}")
        names = [n for n, _ in tf.train.list_variables(prefix) if n.startswith("optimizer/")]
        trained = sum(n.startswith("optimizer/_trainable_variables/") for n in names)
        slots = sum(n.startswith("optimizer/_variables/") for n in names)
        key = next(n for n in names if n.startswith("optimizer/_iterations/"))
        return int(tf.train.load_checkpoint(prefix).get_tensor(key)), trained, slots

    iterations, trained, slots = optimizer_state(3)
    assert (iterations, slots) == (3, 2 * trained) and trained > 0
    iterations, trained, slots = optimizer_state(5)
    assert (iterations, slots) == (2, trained)


def test_toy_model_registers_nifti_files_with_its_recorded_preprocessing(toy_run, tmp_path,
                                                                        toy_site):
    """`tfreg register --model` applies the recorded min-max normalisation and feeds the extra
    'hyper' input from the config: its displacement equals the SavedModel's on the pair
    min-max normalised by hand (an independent path: NumPy + plain TensorFlow, no tfreg)."""
    import nibabel as nib
    import tensorflow as tf

    images = _blobs(2, (16, 16), seed=3) * 250.0 + 10.0   # not in [0, 1]: normalisation matters
    for i, name in enumerate(("fixed", "moving")):
        nib.save(nib.Nifti1Image(images[i], np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    out = tmp_path / "out"
    proc = run_tfreg(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"),
                      "--model", str(toy_run / "model"), "-o", str(out), "-q"], toy_site, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    disp = nib.load(str(out / "disp.nii.gz")).get_fdata()

    saved = tf.saved_model.load(str(toy_run / "model" / "saved_model"))
    norm = [(a - a.min()) / (a.max() - a.min()) for a in images]
    expected = saved.signatures["register"](fixed=tf.constant(norm[0][None, ..., None]),
                                            moving=tf.constant(norm[1][None, ..., None]))
    expected = expected["displacement"].numpy()[0]
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(disp, expected, atol=1e-6)
    info = json.loads((toy_run / "model" / "tfreg_model.json").read_text())
    assert info["preprocessing"] == {"shape": [16, 16], "normalize": "minmax"}


def test_toy_fast_dev_run_and_bad_data_file(toy_site, tmp_path):
    np.savez(tmp_path / "bad.npz", volumes=np.zeros((2, 16, 16), "float32"))
    proc = run_tfreg(["train", "toy", "--data", str(tmp_path / "bad.npz"), "--out",
                      str(tmp_path / "r0")], toy_site, tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"Error: {tmp_path / 'bad.npz'}: no array 'images' (found: volumes)")
    assert not (tmp_path / "r0").exists()

    np.savez(tmp_path / "toy.npz", images=_blobs(3, (16, 16)))
    proc = run_tfreg(["train", "toy", "--data", str(tmp_path / "toy.npz"), "--fast-dev-run", "1",
                      "--out", str(tmp_path / "r1"), "-q"], toy_site, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = json.loads((tmp_path / "r1" / "state.json").read_text())
    assert (state["step"], state["stages"], state["finished"]) == (2, ["coarse", "fine"], True)


def test_plugin_guide_shows_the_toy_files_verbatim():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    for name, lang in [("pyproject.toml", "toml"), ("setup.cfg", "ini"),
                       ("tfreg_toy/__init__.py", "python"), ("tfreg_toy/data.py", "python"),
                       ("tfreg_toy/toy.yaml", "yaml")]:
        text = (FIXTURE / name).read_text()
        assert f"```{lang}\n{text}```" in guide, f"docs/plugins.md is out of date with {name}"
