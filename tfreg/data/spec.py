"""The data spec: which scans, how they pair, how they split, how they are preprocessed.

`DataSpec.from_yaml` validates everything that can be checked without decoding voxels: keys and
values, that every file exists and is a readable 2D/3D image (header only), that label maps have
their image's shape, pair CSVs, splits. `DataSpec.validate(deep=True)` then reads every volume
(truncated files, NaN/Inf, non-integer labels) and, with a cache, stores the preprocessed result.
The format is documented in ``configs/data/README.md``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tfreg.data import _checks as chk
from tfreg.data.augment import Augmentation
from tfreg.data.cache import VolumeCache, default_cache_dir
from tfreg.data.preprocess import Preprocessing, PrepRecord
from tfreg.data.sources import (Learn2RegDataset, PairRow, group_of, read_pairs_csv,
                                resolve_images, resolve_labels, resolve_paths)
from tfreg.errors import ConfigError, InputError, TfregError, all_problems
from tfreg.io import Volume, check_label_grid, load_volume, read_info

__all__ = ["DataSpec", "Pair", "Scan", "PairSampler", "SPEC_KEYS", "PAIRINGS", "SPLITS"]

SPEC_KEYS = ("images", "labels", "shape", "pairing", "groups", "atlas", "atlas_labels",
             "atlas_role", "pairs", "split", "preprocess", "cache", "augment")
PAIRINGS = ("scan-to-scan", "scan-to-atlas", "pairs")
SPLITS = ("train", "val", "test")
_PREP_KEYS = ("spacing", "fit", "threshold", "normalize", "percentiles")


@dataclass(frozen=True)
class Pair:
    """One registration pair (file paths; labels None when the spec has none)."""

    fixed: str
    moving: str
    fixed_labels: str | None = None
    moving_labels: str | None = None


@dataclass(frozen=True)
class Scan:
    """An image and its label map (None without labels)."""

    image: Path
    labels: Path | None = None


class DataSpec:
    """A validated data spec. Build it with `from_yaml` or `from_dict`.

    Attributes:
        source: the YAML path (or the name given to `from_dict`), used in messages.
        base_dir: folder relative paths are resolved against.
        shape: network input shape `(*S,)`; `ndims` = len(shape).
        pairing: ``"scan-to-scan"``, ``"scan-to-atlas"`` or ``"pairs"``.
        has_labels: every scan has a label map (batches then carry ``*_labels``).
        preprocessing: `Preprocessing` settings (stored with exported models).
        augmentation: `Augmentation` or None (off).
        cache_dir: HDF5 cache folder or None.
        scans: every distinct `Scan` (images, atlas, CSV files).
        notes: decisions worth telling the user (e.g. labels taken from a dataset JSON).
    """

    def __init__(self, *, source: str, base_dir: Path, scans: list[Scan],
                 preprocessing: Preprocessing, pairing: str, items: dict[str, list[int]],
                 pair_lists: dict[str, list[tuple[int, int]]], groups: list[str] | None,
                 atlas: int | None, atlas_role: str, augmentation: Augmentation | None,
                 cache_dir: Path | None, notes: list[str]):
        self.source = source
        self.base_dir = base_dir
        self.scans = scans
        self.preprocessing = preprocessing
        self.pairing = pairing
        self._items = items
        self._pair_lists = pair_lists
        self._groups = groups
        self.atlas = atlas
        self.atlas_role = atlas_role
        self.augmentation = augmentation
        self.cache_dir = cache_dir
        self.notes = notes
        self._cache = VolumeCache(cache_dir, preprocessing) if cache_dir is not None else None

    # ------------------------------------------------------------------------ construction
    @classmethod
    def from_yaml(cls, path: str | Path) -> "DataSpec":
        """Read and validate a data spec YAML; relative paths are relative to its folder.

        Raises:
            ConfigError: bad keys or values (``"<file>: <key>: <problem>"``).
            InputError: a named data file is missing, unreadable or has the wrong shape.
        """
        from tfreg.config import load_yaml

        path = Path(path)
        return cls.from_dict(load_yaml(path), path.parent, source=str(path))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base_dir: str | Path = ".",
                  source: str | None = None) -> "DataSpec":
        """Validate a spec given as a dict (same keys as the YAML), paths relative to `base_dir`."""
        return _build(chk.mapping(d, source or "data spec", "(top level)"), Path(base_dir),
                      source or "data spec")

    # ---------------------------------------------------------------------------- queries
    @property
    def shape(self) -> tuple[int, ...]:
        return self.preprocessing.shape

    @property
    def ndims(self) -> int:
        return len(self.shape)

    @property
    def has_labels(self) -> bool:
        return bool(self.scans) and all(s.labels is not None for s in self.scans)

    def _check_split(self, split: str) -> str:
        if split not in SPLITS:
            raise ConfigError(f"{self.source}: unknown split '{split}'"
                              + chk.did_you_mean(split, SPLITS) + f" (one of {', '.join(SPLITS)})")
        return split

    def images(self, split: str = "train") -> list[str]:
        """Image paths of a split (for ``pairing: pairs``: the images its pairs use)."""
        self._check_split(split)
        if self.pairing == "pairs":
            used = dict.fromkeys(i for p in self._pair_lists[split] for i in p)
            return [str(self.scans[i].image) for i in used]
        return [str(self.scans[i].image) for i in self._items[split]]

    def pair_indices(self, split: str = "train") -> list[tuple[int, int]]:
        """The fixed list of `(fixed, moving)` scan indices of a split (see `pairs`)."""
        return list(self._pair_lists[self._check_split(split)])

    def pairs(self, split: str = "val") -> list[Pair]:
        """The fixed list of pairs of a split, for evaluation.

        scan-to-scan: consecutive images within each group (``i -> i+1``: fixed = image i,
        moving = image i+1), or Learn2Reg's ``registration_val`` pairs with ``split: learn2reg``;
        scan-to-atlas: every image with the atlas; pairs: the CSV rows. Without a ``split``
        section everything is in ``train`` and ``val``/``test`` are empty.
        """
        out = []
        for fi, mi in self.pair_indices(split):
            f, m = self.scans[fi], self.scans[mi]
            out.append(Pair(str(f.image), str(m.image),
                            None if f.labels is None else str(f.labels),
                            None if m.labels is None else str(m.labels)))
        return out

    def sampler(self, split: str = "train", shuffle: bool = True, seed: int = 0) -> "PairSampler":
        """Element index -> `(fixed, moving)` scan indices, deterministic for `seed`."""
        return PairSampler(self, self._check_split(split), shuffle, seed)

    def summary(self) -> str:
        """One line: counts, pairing, shape, splits."""
        sizes = ", ".join(f"{s} {len(self.pair_indices(s))} pairs" for s in SPLITS)
        labels = "with labels" if self.has_labels else "without labels"
        text = (f"{self.source}: {len(self.scans)} scans {labels}, {self.pairing}, "
                f"input shape {list(self.shape)}; {sizes}")
        return text + "".join(f"; {note}" for note in self.notes)

    def describe(self) -> dict[str, Any]:
        """JSON/YAML-safe description of the spec (for run records)."""
        return {
            "source": self.source,
            "pairing": self.pairing,
            "scans": len(self.scans),
            "labels": self.has_labels,
            "preprocessing": self.preprocessing.to_dict(),
            "augment": None if self.augmentation is None else self.augmentation.to_dict(),
            "cache": None if self.cache_dir is None else str(self.cache_dir),
            "pairs": {s: len(self._pair_lists[s]) for s in SPLITS},
        }

    def check_divisible(self, n: int) -> None:
        """Refuse an input shape that a method cannot downsample `n`-fold.

        Raises:
            ConfigError: ``"<file>: shape: [..] is not divisible by n ...; use e.g. [..]"``.
        """
        if n <= 1 or all(s % n == 0 for s in self.shape):
            return
        suggestion = [int(math.ceil(s / n) * n) for s in self.shape]
        raise ConfigError(f"{self.source}: shape: {list(self.shape)} is not divisible by {n}, "
                          f"which the method needs; use e.g. {suggestion} (crop/pad is automatic)")

    # ------------------------------------------------------------------------ preprocessing
    def plan(self, volume: Volume) -> PrepRecord:
        """The preprocessing record of an image (geometry and intensity map)."""
        return self.preprocessing.plan(volume)

    def preprocess(self, volume: Volume, label: bool = False, record: PrepRecord | None = None
                   ) -> np.ndarray:
        """Apply the spec's resample/crop/pad/normalize to one loaded volume.

        Args:
            volume: from `tfreg.io.load_volume`.
            label: a label map (nearest, no normalisation, int32).
            record: `plan(image)`; pass the image's record for its label map so both get the
                same geometry. Keep it to invert the preprocessing (`PrepRecord.restore`,
                `tfreg.data.field_to_source`).

        Returns:
            `(*shape,)` float32 image or int32 label map.
        """
        return self.preprocessing.apply(volume, record, label=label)

    def load_scan(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Preprocessed `(image float32 (*S), labels int32 (*S) or None)` of a scan, through the
        cache when there is one."""
        scan = self.scans[index]
        if self._cache is not None:
            image, labels, _ = self._cache.get(scan.image, scan.labels, lambda: self._build(scan))
            return image, labels
        image, labels, _ = self._build(scan)
        return image, labels

    def _build(self, scan: Scan) -> tuple[np.ndarray, np.ndarray | None, PrepRecord]:
        volume = load_volume(scan.image)
        record = self.preprocessing.plan(volume)
        image = self.preprocessing.apply(volume, record)
        labels = None
        if scan.labels is not None:
            lab = load_volume(scan.labels, label=True)
            if lab.shape != volume.shape:
                raise InputError(f"{scan.labels}: shape {lab.shape} differs from its image "
                                 f"{scan.image} {volume.shape}")
            labels = self.preprocessing.apply(lab, record, label=True)
        return image, labels, record

    def validate(self, deep: bool = False, workers: int | None = None,
                 images: set[Path] | None = None) -> int:
        """Check the data before training (or evaluation).

        Shallow checks (headers, keys, files) already ran when the spec was built. With `deep`,
        every volume is decoded: truncated data, NaN/Inf voxels and non-integer labels are
        reported now rather than mid-training. With a cache, preprocessed scans are stored on the
        way (and scans already cached, whose files are unchanged, are not read again).

        Args:
            deep: decode every volume.
            workers: reader threads (default: up to 4).
            images: check only the scans of these image paths (e.g. one split's pairs).

        Returns:
            The number of scans checked.

        Raises:
            InputError: every bad file, in scan order (one line for one problem; else a numbered
                list in the error's `details` and a summary line).
        """
        if not deep:
            return 0
        workers = workers or min(4, os.cpu_count() or 1)
        wanted = None if images is None else {_norm(Path(p)) for p in images}
        indices = [i for i, scan in enumerate(self.scans)
                   if wanted is None or _norm(Path(scan.image)) in wanted]

        def check(index: int) -> TfregError | None:
            try:
                if self._cache is not None:
                    self.load_scan(index)
                    return None
                scan = self.scans[index]
                image = load_volume(scan.image)
                if scan.labels is not None:
                    labels = load_volume(scan.labels, label=True)
                    if labels.shape != image.shape:
                        raise InputError(f"{scan.labels}: shape {labels.shape} differs from its "
                                         f"image {scan.image} {image.shape}")
            except TfregError as err:
                return err
            return None

        with ThreadPoolExecutor(max_workers=workers) as pool:
            problems = [err for err in pool.map(check, indices) if err is not None]
        all_problems(problems, f"{self.source}: {len(indices)} scans checked")
        return len(indices)


class PairSampler:
    """Element index ``k`` -> `(fixed, moving)` scan indices of a split; deterministic.

    ``shuffle=False``: the split's fixed pair list (`DataSpec.pairs`), cycled.
    ``shuffle=True``: epochs of ``len(self)`` elements; epoch ``e`` visits a permutation
    (seeded by ``(seed, e)``) of the split's scans (scan-to-scan: each scan is the fixed image once,
    with a random moving scan of its group; scan-to-atlas: each scan once with the atlas) or of
    its CSV rows (pairs). Element ``k`` depends only on ``(seed, k)``, not on the thread or
    worker that computes it.
    """

    def __init__(self, spec: DataSpec, split: str, shuffle: bool, seed: int):
        self.spec, self.split, self.shuffle = spec, split, shuffle
        self.seed = int(seed) % (2**63)
        self._pairs = spec._pair_lists[split]
        self._partners: dict[int, list[int]] = {}
        if shuffle and spec.pairing == "scan-to-scan":
            items = spec._items[split]
            groups = spec._groups or ["" for _ in spec.scans]
            for i in items:
                others = [j for j in items if j != i and groups[j] == groups[i]]
                if others:
                    self._partners[i] = others
            self._candidates = [i for i in items if i in self._partners]
        elif shuffle and spec.pairing == "scan-to-atlas":
            self._candidates = list(spec._items[split])
        else:
            self._candidates = list(range(len(self._pairs)))

    def __len__(self) -> int:
        return len(self._candidates)

    def __call__(self, k: int) -> tuple[int, int]:
        n = len(self._candidates)
        if n == 0:
            raise ConfigError(f"{self.spec.source}: split '{self.split}' has no pairs")
        if not self.shuffle:
            return self._pairs[k % n]
        epoch, pos = divmod(int(k), n)
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        pick = self._candidates[order[pos]]
        if self.spec.pairing == "pairs":
            return self._pairs[pick]
        if self.spec.pairing == "scan-to-atlas":
            atlas = self.spec.atlas
            return (atlas, pick) if self.spec.atlas_role == "fixed" else (pick, atlas)
        partners = self._partners[pick]
        rng = np.random.default_rng([self.seed, epoch, pos, 1])
        return pick, partners[int(rng.integers(len(partners)))]


# ------------------------------------------------------------------------------ building
class _Scans:
    """Distinct scans in order of first appearance."""

    def __init__(self) -> None:
        self.scans: list[Scan] = []
        self._index: dict[tuple[Path, Path | None], int] = {}

    def add(self, image: Path, labels: Path | None) -> int:
        key = (image, labels)
        if key not in self._index:
            self._index[key] = len(self.scans)
            self.scans.append(Scan(image, labels))
        return self._index[key]


def _norm(path: Path) -> Path:
    return Path(os.path.normpath(os.path.abspath(path)))


def _build(d: Mapping[str, Any], base: Path, source: str) -> DataSpec:
    chk.check_keys(d, SPEC_KEYS, source)
    pairing = chk.choice(d.get("pairing", "scan-to-scan"), PAIRINGS, source, "pairing")
    _check_pairing_keys(d, pairing, source)
    notes: list[str] = []

    # images and labels
    images: list[Path] = []
    labels: list[Path | None] = []
    l2r: Learn2RegDataset | None = None
    if "images" in d and d["images"] is not None:
        images, l2r = resolve_images(d["images"], base, source)
        label_value = d.get("labels")
        if label_value is False:
            labels = [None] * len(images)
        elif label_value is None:
            if l2r is not None and all(p is not None for p in l2r.labels):
                labels = list(l2r.labels)
                notes.append(f"label maps from {l2r.path.name}")
            else:
                labels = [None] * len(images)
        else:
            labels = list(resolve_labels(label_value, images, base, source))
    elif pairing != "pairs":
        raise chk.fail(source, "images", "missing (a glob, list or text file of image paths)")
    elif d.get("labels") not in (None, False):
        raise chk.fail(source, "labels", "with pairing: pairs and no images, give label paths "
                       "in the CSV columns fixed_labels, moving_labels")

    table = _Scans()
    items = [table.add(img, lab) for img, lab in zip(images, labels)]
    by_image = {_norm(img): i for img, i in zip(images, items)}

    # atlas
    atlas = None
    atlas_role = "fixed"
    if pairing == "scan-to-atlas":
        atlas_path = _single_path(d.get("atlas"), base, source, "atlas")
        atlas_labels = None
        if d.get("atlas_labels") is not None:
            atlas_labels = _single_path(d["atlas_labels"], base, source, "atlas_labels")
        atlas_role = chk.choice(d.get("atlas_role", "fixed"), ("fixed", "moving"), source,
                                "atlas_role")
        atlas = table.add(atlas_path, atlas_labels)
        items = [i for i in items if _norm(table.scans[i].image) != _norm(atlas_path)]

    # pairs CSV(s)
    csv_rows: dict[str, list[tuple[int, int]]] | None = None
    if pairing == "pairs":
        csv_rows = _read_pairs(d["pairs"], base, source, table, by_image,
                               has_split="split" in d and d["split"] is not None)

    # headers: existence, rank, label shapes
    shapes = _check_headers(table.scans, source)

    # input shape and preprocessing
    prep_section = dict(chk.mapping(d.get("preprocess") or {}, source, "preprocess"))
    chk.check_keys(prep_section, _PREP_KEYS, source, "preprocess.")
    if d.get("shape") is None:
        distinct = sorted({shapes[i] for i in range(len(table.scans))})
        if len(distinct) != 1:
            raise chk.fail(source, "shape", f"missing, and the images have different shapes "
                           f"{[list(s) for s in distinct[:3]]}; set the network input shape")
        prep_section["shape"] = list(distinct[0])
        notes.append(f"input shape {list(distinct[0])} taken from the images")
    else:
        prep_section["shape"] = list(chk.int_list(d["shape"], source, "shape"))
    preprocessing = Preprocessing.from_dict(prep_section, source, prefix="preprocess.")
    ndims = len(preprocessing.shape)
    for i, scan in enumerate(table.scans):
        if len(shapes[i]) != ndims:
            raise InputError(f"{scan.image}: is {len(shapes[i])}D {list(shapes[i])}, but shape "
                             f"{list(preprocessing.shape)} in {source} is {ndims}D")

    # labels all-or-none
    with_labels = [s.labels is not None for s in table.scans]
    if any(with_labels) and not all(with_labels):
        missing = table.scans[with_labels.index(False)]
        key = "atlas_labels" if atlas is not None and missing is table.scans[atlas] else "labels"
        raise chk.fail(source, key, f"{missing.image} has no label map but other scans do "
                       "(give every scan a label map, or set labels: false)")

    # groups
    groups = None
    if d.get("groups") is not None:
        if not isinstance(d["groups"], str):
            raise chk.fail(source, "groups", f"expected a regular expression, got "
                           f"{chk.kind(d['groups'])}")
        try:
            pattern = re.compile(d["groups"])
        except re.error as err:
            raise chk.fail(source, "groups", f"invalid regular expression ({err})") from None
        groups = [group_of(s.image, pattern, source) for s in table.scans]

    # splits
    split_items, pair_lists = _splits(d.get("split"), pairing, items, table, by_image, base,
                                      source, groups, l2r, csv_rows, notes)
    if pairing == "scan-to-scan":
        for split in SPLITS:
            if split not in pair_lists:
                pair_lists[split] = _consecutive(split_items[split], groups)
    elif pairing == "scan-to-atlas":
        for split in SPLITS:
            pair_lists[split] = [(atlas, i) if atlas_role == "fixed" else (i, atlas)
                                 for i in split_items[split]]

    # cache and augmentation
    cache_value = d.get("cache", False)
    if cache_value is None or cache_value is False:
        cache_dir = None
    elif cache_value is True:
        cache_dir = default_cache_dir()
    elif isinstance(cache_value, str) and cache_value.strip():
        cache_dir = Path(os.path.expanduser(cache_value))
        cache_dir = cache_dir if cache_dir.is_absolute() else base / cache_dir
    else:
        raise chk.fail(source, "cache", f"expected true, false or a folder, got "
                       f"{chk.kind(cache_value)}")
    augmentation = None
    if d.get("augment") not in (None, False):
        augmentation = Augmentation.from_dict(chk.mapping(d["augment"], source, "augment"),
                                              source)
        augmentation = augmentation if augmentation.enabled else None

    return DataSpec(source=source, base_dir=base, scans=table.scans, preprocessing=preprocessing,
                    pairing=pairing, items=split_items, pair_lists=pair_lists, groups=groups,
                    atlas=atlas, atlas_role=atlas_role, augmentation=augmentation,
                    cache_dir=cache_dir, notes=notes)


def _check_pairing_keys(d: Mapping[str, Any], pairing: str, source: str) -> None:
    own = {"scan-to-atlas": ("atlas", "atlas_labels", "atlas_role"), "pairs": ("pairs",)}
    if pairing == "scan-to-atlas" and d.get("groups") is not None:
        raise chk.fail(source, "groups", "only used with pairing: scan-to-scan or pairs "
                       "(pairing is scan-to-atlas)")
    for mode, keys in own.items():
        for key in keys:
            if mode != pairing and d.get(key) is not None:
                raise chk.fail(source, key, f"only used with pairing: {mode} (pairing is "
                               f"{pairing})")
    if pairing == "scan-to-atlas" and d.get("atlas") is None:
        raise chk.fail(source, "atlas", "missing (pairing: scan-to-atlas needs an atlas image)")
    if pairing == "pairs" and d.get("pairs") is None:
        raise chk.fail(source, "pairs", "missing (pairing: pairs needs a CSV of "
                       "fixed,moving[,fixed_labels,moving_labels])")


def _single_path(value: Any, base: Path, source: str, key: str) -> Path:
    if not isinstance(value, str) or not value.strip() or any(c in value for c in "*?["):
        raise chk.fail(source, key, f"expected one file path, got {chk.kind(value)}")
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def _read_pairs(value: Any, base: Path, source: str, table: _Scans, by_image: dict[Path, int],
                has_split: bool) -> dict[str, list[tuple[int, int]]]:
    """``pairs``: one CSV (all rows, split later) or ``{train: csv, val: csv, test: csv}``."""
    if isinstance(value, Mapping):
        chk.check_keys(value, SPLITS, source, "pairs.")
        if has_split:
            raise chk.fail(source, "split", "not used when pairs gives one CSV per split")
        files = {split: value[split] for split in SPLITS if value.get(split) is not None}
    else:
        files = {"all": value}
    out: dict[str, list[tuple[int, int]]] = {}
    for split, text in files.items():
        key = "pairs" if split == "all" else f"pairs.{split}"
        if not isinstance(text, str) or not text.strip():
            raise chk.fail(source, key, f"expected a CSV file, got {chk.kind(text)}")
        csv_path = Path(os.path.expanduser(text))
        csv_path = csv_path if csv_path.is_absolute() else base / csv_path
        out[split] = [_row_to_pair(row, csv_path, table, by_image)
                      for row in read_pairs_csv(csv_path, source, key)]
    return out


def _row_to_pair(row: PairRow, csv_path: Path, table: _Scans, by_image: dict[Path, int]
                 ) -> tuple[int, int]:
    indices = []
    for role, image, labels in (("fixed", row.fixed, row.fixed_labels),
                                ("moving", row.moving, row.moving_labels)):
        if not image.is_file():
            raise InputError(f"{csv_path}: line {row.line}: {role} image {image}: file not found")
        if labels is not None and not labels.is_file():
            raise InputError(f"{csv_path}: line {row.line}: {role}_labels {labels}: file not "
                             "found")
        if by_image:
            known = by_image.get(_norm(image))
            if known is None:
                raise InputError(f"{csv_path}: line {row.line}: {role} image {image} is not "
                                 "among the spec's images")
            if labels is None:
                labels = table.scans[known].labels
        indices.append(table.add(image, labels))
    return indices[0], indices[1]


def _check_headers(scans: list[Scan], source: str) -> list[tuple[int, ...]]:
    """Read every header once; image shapes (spatial) in scan order. Every bad file is reported
    at once (`tfreg.errors.all_problems`); a label map whose header differs slightly from its
    image's is accepted with a warning (`tfreg.io.check_label_grid`)."""
    seen: dict[Path, Any] = {}
    problems: list[InputError] = []

    def info_of(path: Path):
        if path not in seen:
            try:
                seen[path] = read_info(path)
            except InputError as err:
                seen[path] = None
                problems.append(InputError(f"{err} (named by {source})"))
        return seen[path]

    shapes = []
    checked: set[tuple[Path, Path]] = set()
    for scan in scans:
        info = info_of(scan.image)
        shapes.append(info.shape if info is not None else ())
        if scan.labels is None or info is None:
            continue
        lab = info_of(scan.labels)
        if lab is None or (scan.labels, scan.image) in checked:
            continue
        checked.add((scan.labels, scan.image))
        try:
            note = check_label_grid(scan.labels, lab.affine, lab.shape, scan.image, info.affine,
                                    info.shape)
        except InputError as err:
            problems.append(err)
            continue
        if note:
            logging.getLogger("tfreg").warning(note)
    all_problems(problems, source)
    return shapes


def _consecutive(items: list[int], groups: list[str] | None) -> list[tuple[int, int]]:
    """Pairs ``(items[i], items[i+1])`` within each group, groups in order of appearance."""
    by_group: dict[str, list[int]] = {}
    for i in items:
        by_group.setdefault(groups[i] if groups else "", []).append(i)
    return [(members[k], members[k + 1]) for members in by_group.values()
            for k in range(len(members) - 1)]


def _splits(value: Any, pairing: str, items: list[int], table: _Scans, by_image: dict[Path, int],
            base: Path, source: str, groups: list[str] | None, l2r: Learn2RegDataset | None,
            csv_rows: dict[str, list[tuple[int, int]]] | None, notes: list[str]
            ) -> tuple[dict[str, list[int]], dict[str, list[tuple[int, int]]]]:
    """Scans per split (scan pairings) and fixed pair lists where the split defines them."""
    empty: dict[str, list[int]] = {s: [] for s in SPLITS}
    if pairing == "pairs":
        assert csv_rows is not None
        if "all" not in csv_rows:  # one CSV per split
            return empty, {s: csv_rows.get(s, []) for s in SPLITS}
        rows = csv_rows["all"]
        if value is None:
            return empty, {"train": rows, "val": [], "test": []}
        fractions, seed = _fractions(value, source)
        return empty, _divide_pairs_by_subject(rows, fractions, seed, groups, source)

    if value is None:
        return {"train": list(items), "val": [], "test": []}, {}
    if value == "learn2reg":
        return _learn2reg_split(items, table, by_image, source, l2r, notes)
    if not isinstance(value, Mapping):
        raise chk.fail(source, "split", "expected fractions {train: 0.8, val: 0.1, test: 0.1, "
                       "seed: 0}, lists of images per split, or 'learn2reg'; got "
                       f"{chk.kind(value)}")
    chk.check_keys(value, (*SPLITS, "seed"), source, "split.")
    given = {s: value[s] for s in SPLITS if value.get(s) is not None}
    numeric = [s for s, v in given.items() if isinstance(v, (int, float))
               and not isinstance(v, bool)]
    if numeric:
        fractions, seed = _fractions(value, source)
        if groups:  # keep a group (e.g. one subject's sessions) within one split
            names = list(dict.fromkeys(groups[i] for i in items))
            parts = _divide(len(names), fractions, seed)
            chosen = {s: {names[k] for k in parts[s]} for s in SPLITS}
            return {s: [i for i in items if groups[i] in chosen[s]] for s in SPLITS}, {}
        parts = _divide(len(items), fractions, seed)
        return {s: [items[k] for k in sorted(parts[s])] for s in SPLITS}, {}

    if "seed" in value:
        raise chk.fail(source, "split.seed", "only used with fractions")
    allowed = set(items)
    taken: dict[int, str] = {}
    out: dict[str, list[int]] = {}
    for split in SPLITS:
        if split not in given:
            continue
        out[split] = []
        for path in resolve_paths(given[split], base, source, f"split.{split}"):
            index = by_image.get(_norm(path))
            if index is None or index not in allowed:
                raise chk.fail(source, f"split.{split}", f"{path} is not among the images")
            if index in taken:
                raise chk.fail(source, f"split.{split}", f"{path} is also in split "
                               f"'{taken[index]}'")
            taken[index] = split
            out[split].append(index)
    if "train" not in out:
        out["train"] = [i for i in items if i not in taken]
    for split in SPLITS:
        out.setdefault(split, [])
    return out, {}


def _fractions(value: Any, source: str) -> tuple[dict[str, float], int]:
    value = chk.mapping(value, source, "split")
    chk.check_keys(value, (*SPLITS, "seed"), source, "split.")
    fractions = {s: chk.number(value.get(s, 0.0), source, f"split.{s}", low=0.0, high=1.0)
                 for s in SPLITS}
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise chk.fail(source, "split", f"fractions must add up to 1, got "
                       f"{sum(fractions.values()):g}")
    seed = chk.integer(value.get("seed", 0), source, "split.seed", low=0)
    return fractions, seed


def _divide(n: int, fractions: dict[str, float], seed: int) -> dict[str, list[int]]:
    """Shuffle ``range(n)`` with `seed` and cut it: val and test get ``round(f * n)``, train the
    rest."""
    order = [int(k) for k in np.random.default_rng(seed).permutation(n)]
    n_val = int(round(fractions["val"] * n))
    n_test = min(int(round(fractions["test"] * n)), n - n_val)
    return {"val": sorted(order[:n_val]), "test": sorted(order[n_val:n_val + n_test]),
            "train": sorted(order[n_val + n_test:])}


def _subjects(rows: list[tuple[int, int]], groups: list[str] | None) -> list[list[int]]:
    """Indices of `rows` grouped so that no scan (or `groups` subject) is in two groups.

    Two rows share a group when they share a scan or, with `groups`, scans of one subject:
    the connected components of the graph whose nodes are subjects and whose edges are pairs.
    """
    parent: dict[Any, Any] = {}

    def find(a: Any) -> Any:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def subject(scan: int) -> Any:
        return ("group", groups[scan]) if groups else scan

    for fixed, moving in rows:
        parent[find(subject(fixed))] = find(subject(moving))
    members: dict[Any, list[int]] = {}
    for k, (fixed, _) in enumerate(rows):
        members.setdefault(find(subject(fixed)), []).append(k)
    return list(members.values())


def _divide_pairs_by_subject(rows: list[tuple[int, int]], fractions: dict[str, float], seed: int,
                             groups: list[str] | None, source: str
                             ) -> dict[str, list[tuple[int, int]]]:
    """Fraction splits of CSV pairs that keep every subject within one split.

    The subject components (`_subjects`) are shuffled with `seed` and dealt out: val until it
    holds ``round(f_val * rows)`` pairs, then test likewise, the rest to train.

    Raises:
        ConfigError: a split with a positive fraction would get no pair, because the pairs link
            too many subjects together (e.g. one atlas in every pair).
    """
    components = _subjects(rows, groups)
    order = [int(k) for k in np.random.default_rng(seed).permutation(len(components))]
    targets = {"val": int(round(fractions["val"] * len(rows))),
               "test": int(round(fractions["test"] * len(rows)))}
    taken: dict[str, list[int]] = {s: [] for s in SPLITS}
    for k in order:
        split = next((s for s in ("val", "test") if len(taken[s]) < targets[s]), "train")
        taken[split].extend(components[k])
    wanted = [s for s in SPLITS if fractions[s] > 0 and (s == "train" or targets[s] > 0)]
    empty = [s for s in wanted if not taken[s]]
    if empty:
        raise chk.fail(source, "split", f"cannot keep subjects apart: the {len(rows)} pairs link "
                       f"their scans into {len(components)} group(s) sharing a subject, too few "
                       f"for a non-empty '{empty[0]}' split (give one pairs CSV per split)")
    return {s: [rows[k] for k in sorted(taken[s])] for s in SPLITS}


def _learn2reg_split(items: list[int], table: _Scans, by_image: dict[Path, int], source: str,
                     l2r: Learn2RegDataset | None, notes: list[str]
                     ) -> tuple[dict[str, list[int]], dict[str, list[tuple[int, int]]]]:
    if l2r is None:
        raise chk.fail(source, "split", "'learn2reg' needs images: <the dataset JSON>")
    val_pairs = []
    for fixed, moving in l2r.val_pairs:
        pair = []
        for path in (fixed, moving):
            index = by_image.get(_norm(path))
            if index is None:
                raise InputError(f"{l2r.path}: registration_val names {path}, which is not a "
                                 "training image of the JSON")
            pair.append(index)
        val_pairs.append((pair[0], pair[1]))
    val_scans = list(dict.fromkeys(i for p in val_pairs for i in p))
    held_out = set(val_scans)
    notes.append(f"split learn2reg: {len(val_pairs)} registration_val pairs, no test pairs")
    return ({"train": [i for i in items if i not in held_out], "val": val_scans, "test": []},
            {"val": val_pairs, "test": []})
