"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TFREG_XLA_CACHE", "off")  # commands run by tests leave ~/.cache alone
os.environ.setdefault("TFREG_TRACE_CACHE", "off")

import tfreg  # noqa: E402,F401  (sets TensorFlow's switches before any test module imports it)

#: tests marked ``@pytest.mark.slow`` (learning checks of a minute or more) run only with
#: ``TFREG_SLOW_TESTS=1``, so that the default suite stays under 15 minutes on two CPU cores.
RUN_SLOW = os.environ.get("TFREG_SLOW_TESTS") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a learning check of a minute or more; runs with "
                                       "TFREG_SLOW_TESTS=1")


def pytest_collection_modifyitems(config, items):
    if RUN_SLOW:
        return
    skip = pytest.mark.skip(reason="slow learning check; set TFREG_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


#: reference data beside the checkout (fixtures, sample scans); tests that need it skip without it.
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("reference data folder ../shared is absent")
    return SHARED


@pytest.fixture(scope="session")
def vxm_fixtures(shared_dir: Path) -> Path:
    path = shared_dir / "fixtures" / "voxelmorph_tf"
    if not path.is_dir():
        pytest.skip("voxelmorph reference fixtures are absent")
    return path


@pytest.fixture(scope="session")
def tiny_collection(tmp_path_factory) -> Path:
    """Six synthetic 24^3 subjects with labels and a minimal data spec; returns the spec path."""
    from tfreg.synthetic import write_collection

    return write_collection(tmp_path_factory.mktemp("tiny"), n=6, shape=(24, 24, 24), seed=0)


def _blob_labels(shape: tuple[int, ...], n_labels: int = 5, margin: int = 6, seed: int = 0):
    """Integer label map of smooth random blobs (labels 1..n_labels), background 0 within
    `margin` voxels of the border; NumPy/SciPy only."""
    import numpy as np
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    fields = [ndimage.gaussian_filter(rng.normal(size=shape), 3.0) for _ in range(n_labels)]
    labels = (np.argmax(np.stack(fields), axis=0) + 1).astype(np.int32)
    inside = np.zeros(shape, bool)
    inside[tuple(slice(margin, n - margin) for n in shape)] = True
    labels[~inside] = 0
    return labels


@pytest.fixture(scope="session")
def blob_labels():
    """``blob_labels(shape, n_labels=5, margin=6, seed=0)`` -> int32 label map of random blobs."""
    return _blob_labels
