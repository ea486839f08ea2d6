"""tfreg.data.cache: HDF5 entries keyed by path, size, mtime and settings; concurrent builders."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

import tfreg.data.spec as spec_module
from tfreg.data import DataSpec
from tfreg.synthetic import write_collection


def _minmax(path: Path) -> np.ndarray:
    data = np.asarray(nib.load(str(path)).dataobj, np.float64)
    return (data - data.min()) / (data.max() - data.min())


def _make(folder: Path, cache: Path, normalize: str = "minmax") -> DataSpec:
    return DataSpec.from_dict({"images": "images/*.nii.gz", "labels": "labels/{stem}.nii.gz",
                               "shape": [16, 16, 16], "cache": str(cache),
                               "preprocess": {"normalize": normalize}}, folder, "data.yaml")


@pytest.fixture()
def col(tmp_path) -> Path:
    write_collection(tmp_path, n=3, shape=(16, 16, 16), seed=2)
    return tmp_path


def test_entries_are_built_once_and_served_without_reading_nifti(col, monkeypatch):
    cache = col / "cache"
    spec = _make(col, cache)
    assert spec.validate(deep=True) == 3
    files = sorted(cache.glob("*.h5"))
    assert len(files) == 3 and files[0].name.startswith("sub-00-")

    def no_nifti(*args, **kwargs):
        raise AssertionError("a cached scan was read from NIfTI")

    monkeypatch.setattr(spec_module, "load_volume", no_nifti)
    image, labels = _make(col, cache).load_scan(1)
    np.testing.assert_allclose(image, _minmax(col / "images" / "sub-01.nii.gz"), atol=1e-6)
    np.testing.assert_array_equal(labels, np.asarray(nib.load(str(col / "labels" /
                                                                  "sub-01.nii.gz")).dataobj))
    assert image.dtype == np.float32 and labels.dtype == np.int32
    with h5py.File(files[1], "r") as h5:
        assert h5["labels"].dtype == np.int16 and "record" in h5.attrs


def test_changed_source_file_rebuilds_and_drops_the_stale_entry(col):
    cache = col / "cache"
    spec = _make(col, cache)
    spec.validate(deep=True)
    path = col / "images" / "sub-02.nii.gz"
    new = np.zeros((16, 16, 16), np.float32)
    new[4:12, 4:12, 4:12] = 3.0
    nib.save(nib.Nifti1Image(new, np.eye(4)), str(path))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    image, _ = spec.load_scan(2)
    np.testing.assert_array_equal(image, new / 3.0)
    assert len(list(cache.glob("sub-02-*.h5"))) == 1 and len(list(cache.glob("*.h5"))) == 3


def test_other_settings_get_their_own_entries(col):
    cache = col / "cache"
    _make(col, cache, "minmax").validate(deep=True)
    zspec = _make(col, cache, "zscore")
    zspec.validate(deep=True)
    assert len(list(cache.glob("*.h5"))) == 6
    image, _ = zspec.load_scan(0)
    assert abs(float(image.mean())) < 1e-5 and abs(float(image.std()) - 1) < 1e-4


def test_damaged_entry_is_rebuilt(col):
    cache = col / "cache"
    spec = _make(col, cache)
    spec.validate(deep=True)
    entry = sorted(cache.glob("sub-00-*.h5"))[0]
    entry.write_bytes(entry.read_bytes()[:100])
    image, _ = spec.load_scan(0)
    np.testing.assert_allclose(image, _minmax(col / "images" / "sub-00.nii.gz"), atol=1e-6)
    with h5py.File(entry, "r") as h5:  # rewritten complete
        assert h5["image"].shape == (16, 16, 16)


def test_two_processes_building_the_same_cache_at_once(tmp_path):
    write_collection(tmp_path, n=6, shape=(16, 16, 16), seed=3)
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        from tfreg.data import DataSpec
        spec = DataSpec.from_dict({{"images": "images/*.nii.gz", "labels": "labels/*.nii.gz",
                                    "shape": [16, 16, 16], "cache": {str(cache)!r}}},
                                   {str(tmp_path)!r})
        for _ in range(3):
            for i in range(len(spec.scans)):
                spec._cache.store(spec.scans[i].image, spec.scans[i].labels,
                                  spec._build(spec.scans[i]))
        spec.validate(deep=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
             for _ in range(2)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    files = sorted(cache.glob("*.h5"))
    assert len(files) == 6 and not list(cache.glob(".*"))  # no temporary files left
    spec = _make(tmp_path, cache)
    for i in range(6):
        image, labels = spec.load_scan(i)
        np.testing.assert_allclose(image, _minmax(tmp_path / "images" / f"sub-0{i}.nii.gz"),
                                   atol=1e-6)
        assert labels.shape == (16, 16, 16)
