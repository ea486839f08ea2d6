"""A separately packaged plugin (tests/fixtures/toy_plugin, distribution 'tfreg-toy') is found
through its entry point once installed, listed by `tfreg methods` and trained by `tfreg train`.

The distribution is built and installed with pip into a temporary folder, used through
PYTHONPATH by subprocesses only; the test environment itself is not changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_train_runs_the_toy_plugin(toy_site, tmp_path):
    from tfreg.synthetic import write_collection

    spec = write_collection(tmp_path / "data", n=4, shape=(16, 16, 16))
    run_dir = tmp_path / "run"
    proc = run_tfreg(["train", "toy", "--data", str(spec), "--steps", "3", "--out", str(run_dir),
                      "--set", "loss.smooth_weight=0.5"], toy_site, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["method"] == "toy"
    assert config["train"]["steps"] == 3              # --steps beats the toy's default of 20
    assert config["train"]["learning_rate"] == 1e-3   # from the toy's own YAML
    assert config["loss"]["smooth_weight"] == 0.5     # --set
    assert config["model"] == {"features": 4}
    assert (run_dir / "model.weights.h5").is_file()


def test_plugin_guide_shows_the_toy_files_verbatim():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    for name, lang in [("pyproject.toml", "toml"), ("setup.cfg", "ini"),
                       ("tfreg_toy/__init__.py", "python"), ("tfreg_toy/toy.yaml", "yaml")]:
        text = (FIXTURE / name).read_text()
        assert f"```{lang}\n{text}```" in guide, f"docs/plugins.md is out of date with {name}"
