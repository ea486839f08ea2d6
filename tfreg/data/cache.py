"""HDF5 cache of preprocessed volumes.

A cache is a folder of HDF5 files, one per scan (an image and its label map) and preprocessing.
A file's name encodes three hashes::

    <stem>-<paths>-<settings>-<stat>.h5
      paths:    absolute paths of the image and its label map
      settings: `Preprocessing.to_dict()` and the cache format version
      stat:     size and modification time (ns) of both files

so an entry is used only when all of them match; when a source file changes, the next access
writes a new entry and deletes the stale ones of the same scan and settings. Entries of other
settings (another spec sharing the folder) are left alone.

Each file holds ``image`` (float32), optionally ``labels`` (int16, or int32 when needed) and the
`PrepRecord` as JSON in the ``record`` attribute. Files are written under a temporary name and
moved into place (``os.replace``), so two processes building the same entry at once each write a
complete file and the last one wins; readers never see a partial file. An unreadable entry is
treated as missing and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from tfreg.data.preprocess import Preprocessing, PrepRecord
from tfreg.errors import InputError
from tfreg.io import atomic_path, nifti_stem

__all__ = ["VolumeCache", "default_cache_dir", "CACHE_VERSION"]

#: bump when the stored layout or the preprocessing code changes meaning.
CACHE_VERSION = 1

Entry = tuple[np.ndarray, "np.ndarray | None", PrepRecord]


def default_cache_dir() -> Path:
    """``$TFREG_CACHE_DIR``, else ``$XDG_CACHE_HOME/tfreg/data``, else ``~/.cache/tfreg/data``."""
    if os.environ.get("TFREG_CACHE_DIR"):
        return Path(os.environ["TFREG_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tfreg" / "data"


def _digest(payload: object, n: int = 12) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def _h5(path: Path, mode: str):
    """Open an HDF5 file without HDF5's own file locks (entries are immutable once renamed into
    place; the locks fail on some network file systems)."""
    import h5py

    try:
        return h5py.File(path, mode, locking=False)
    except TypeError:  # h5py < 3.5
        return h5py.File(path, mode)


def _stat(path: Path | None) -> list[int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    return [int(st.st_size), int(st.st_mtime_ns)]


class VolumeCache:
    """Preprocessed scans stored as HDF5 files in `folder` (see the module docstring).

    Args:
        folder: cache folder (created on first write).
        preprocessing: the settings the entries were made with (part of the key).
    """

    def __init__(self, folder: str | Path, preprocessing: Preprocessing):
        self.folder = Path(folder)
        self.preprocessing = preprocessing
        self._settings = _digest({"version": CACHE_VERSION, "prep": preprocessing.to_dict()})

    def _prefix(self, image: Path, labels: Path | None) -> str:
        ident = _digest([str(Path(image).resolve()),
                         None if labels is None else str(Path(labels).resolve())])
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", nifti_stem(image))[:48]
        return f"{stem}-{ident}-{self._settings}"

    def entry_path(self, image: Path, labels: Path | None) -> Path:
        """Where the entry of the current state of these files lives."""
        stat = _digest([_stat(image), _stat(labels)])
        return self.folder / f"{self._prefix(image, labels)}-{stat}.h5"

    def load(self, image: Path, labels: Path | None) -> Entry | None:
        """The cached `(image, labels or None, record)`, or None when absent or stale."""
        path = self.entry_path(image, labels)
        if not path.is_file():
            return None
        try:
            with _h5(path, "r") as h5:
                img = h5["image"][()]
                lab = h5["labels"][()].astype(np.int32) if "labels" in h5 else None
                record = PrepRecord.from_dict(json.loads(h5.attrs["record"]))
        except (OSError, KeyError, ValueError):
            return None  # damaged or foreign: rebuilt by the caller
        if (labels is None) != (lab is None):
            return None
        return img, lab, record

    def store(self, image: Path, labels: Path | None, entry: Entry,
              stat_before: str | None = None) -> Path | None:
        """Write an entry atomically and delete stale entries of the same scan and settings.

        `stat_before`: `entry_path` taken before the sources were read; when the files changed
        while being read, nothing is stored (returns None).
        """
        path = self.entry_path(image, labels)
        if stat_before is not None and str(path) != stat_before:
            return None
        img, lab, record = entry
        with atomic_path(path, suffix=".h5") as tmp:
            with _h5(tmp, "w") as h5:
                h5.create_dataset("image", data=np.asarray(img, np.float32))
                if lab is not None:
                    small = lab.size == 0 or (lab.min() >= -32768 and lab.max() <= 32767)
                    h5.create_dataset("labels", data=lab.astype(np.int16 if small else np.int32))
                h5.attrs["record"] = json.dumps(record.to_dict())
                h5.attrs["source"] = json.dumps({
                    "image": str(Path(image).resolve()), "labels":
                        None if labels is None else str(Path(labels).resolve()),
                    "stat": [_stat(image), _stat(labels)], "version": CACHE_VERSION,
                    "preprocessing": self.preprocessing.to_dict()})
        for old in self.folder.glob(f"{glob_escape(self._prefix(image, labels))}-*.h5"):
            if old != path:
                old.unlink(missing_ok=True)
        return path

    def get(self, image: Path, labels: Path | None, build: Callable[[], Entry]) -> Entry:
        """The cached entry, or `build()` it, store it and return it."""
        hit = self.load(image, labels)
        if hit is not None:
            return hit
        before = str(self.entry_path(image, labels))
        entry = build()
        self.store(image, labels, entry, stat_before=before)
        return entry


def glob_escape(text: str) -> str:
    """Escape glob metacharacters (``[``, ``*``, ``?``) in a file-name prefix."""
    return re.sub(r"([*?\[])", r"[\1]", text)
