"""Training targets: the optimised initial momentum of each training pair, computed once by
optimisation-based LDDMM (`tfreg.ops.lddmm.register_pair`) and cached as HDF5.

One file per pair in the cache folder, named by a digest of the two images' resolved paths, their
sizes and modification times, and every setting that changes the result (the LDDMM config and the
preprocessing): a changed input or setting gives a new name, so an entry is reused exactly when
its inputs are unchanged. Files are written atomically (`tfreg.io.atomic_path`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfreg.errors import InputError
from tfreg.io import atomic_path

__all__ = ["MomentumCache", "pair_key", "TargetPair", "optimise_targets"]

CACHE_VERSION = 1


def _stat(path: str | Path) -> list[int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    return [int(st.st_size), int(st.st_mtime_ns)]


def pair_key(fixed: str | Path, moving: str | Path, settings: dict) -> str:
    """Digest of a pair's files (paths, sizes, modification times) and the `settings` dict."""
    if dataclasses.is_dataclass(settings):
        settings = dataclasses.asdict(settings)
    payload = {"version": CACHE_VERSION,
               "files": [[str(Path(p).resolve()), _stat(p)] for p in (fixed, moving)],
               "settings": settings}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


class MomentumCache:
    """HDF5 entries ``<folder>/momentum-<key>.h5`` holding ``momentum`` `(*S, N)` float32 and
    the attributes given at `store` (e.g. the final energies)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"momentum-{key}.h5"

    def load(self, key: str) -> np.ndarray | None:
        """The cached momentum, or None (missing or unreadable entry)."""
        import h5py

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with h5py.File(path, "r") as fh:
                return np.asarray(fh["momentum"], np.float32)
        except (OSError, KeyError):
            return None

    def store(self, key: str, momentum: np.ndarray, attrs: dict | None = None) -> Path:
        import h5py

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        with atomic_path(path, suffix=".h5") as tmp:
            with h5py.File(tmp, "w") as fh:
                fh.create_dataset("momentum", data=np.asarray(momentum, np.float32),
                                  compression="gzip", compression_opts=1)
                for name, value in (attrs or {}).items():
                    fh.attrs[name] = value
        return path

    def get(self, key: str, build: Callable[[], tuple[np.ndarray, dict]]) -> tuple[np.ndarray, bool]:
        """``(momentum, reused)``: the cached entry, or ``build()`` stored first."""
        cached = self.load(key)
        if cached is not None:
            return cached, True
        momentum, attrs = build()
        self.store(key, momentum, attrs)
        return np.asarray(momentum, np.float32), False


@dataclass(frozen=True)
class TargetPair:
    """One training pair: its files (for the cache key) and its preprocessed images `(*S)`."""

    fixed_path: str
    moving_path: str
    fixed: np.ndarray
    moving: np.ndarray


def optimise_targets(pairs: Sequence[TargetPair], cfg, settings: dict, cache: MomentumCache,
                     verbose: bool = True) -> tuple[list[np.ndarray], dict]:
    """The optimised initial momentum `(*S, N)` of every pair, from the cache or computed by
    `tfreg.ops.lddmm.register_pair` (unit voxel spacing) and stored.

    Args:
        pairs: the training pairs.
        cfg: `tfreg.ops.lddmm.LddmmConfig` of the optimisation.
        settings: everything else the result depends on (preprocessing, shape); part of the key.
        cache: where entries live.
        verbose: a progress bar (a terminal) or one line per pair (a log) on stdout.

    Returns:
        ``(momenta, counts)`` with ``counts = {"optimised": n, "reused": n}``.
    """
    from tfreg.ops import lddmm

    full = {"lddmm": dataclasses.asdict(cfg), **settings}
    bar = None
    if verbose and sys.stdout.isatty():
        import keras

        bar = keras.utils.Progbar(len(pairs), unit_name="pair")
    counts = {"optimised": 0, "reused": 0}
    momenta = []
    for i, pair in enumerate(pairs):
        def build(pair=pair):
            result = lddmm.register_pair(pair.fixed, pair.moving, None, cfg)
            reg, image = result.history[-1]
            return result.momentum, {"regularity": reg, "image": image,
                                     "seconds": result.seconds}

        key = pair_key(pair.fixed_path, pair.moving_path, full)
        momentum, reused = cache.get(key, build)
        counts["reused" if reused else "optimised"] += 1
        momenta.append(momentum)
        if bar is not None:
            bar.update(i + 1, values=[("optimised", counts["optimised"])])
        elif verbose:
            print(f"momentum targets: {i + 1}/{len(pairs)} pairs ({counts['reused']} reused, "
                  f"{counts['optimised']} optimised)", flush=True)
    return momenta, counts
