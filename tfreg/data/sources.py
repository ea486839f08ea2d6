"""Turn the file-naming parts of a data spec into lists of paths.

Forms accepted for ``images`` (and for ``labels``, ``split`` lists):

* a glob (``images/*.nii.gz``; ``**`` recurses), sorted by name;
* a list of paths or globs;
* a text file (``.txt``/``.lst``): one path per line, ``#`` comments and blank lines ignored;
* a Learn2Reg dataset JSON (``.json``, ``images`` only): the ``image`` of each ``training`` entry
  (and its ``label``), plus the ``registration_val``/``registration_test`` pairs;
* ``labels`` only: a name template such as ``labelsTr/{stem}.nii.gz`` (``{stem}``: the image's
  file name without its image suffix; ``{name}``: the whole file name).

Relative paths are relative to the folder of the file that names them (the YAML for the spec,
a text file or CSV for their own lines). Existence is checked by the caller with `read_info`.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tfreg.data import _checks as chk
from tfreg.errors import ConfigError, InputError
from tfreg.io import nifti_stem

__all__ = ["Learn2RegDataset", "PairRow", "resolve_paths", "resolve_images", "resolve_labels",
           "read_pairs_csv", "read_path_list", "read_learn2reg", "group_of", "is_glob"]

_LIST_SUFFIXES = (".txt", ".lst")


def is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _join(base: Path, text: str) -> Path:
    path = Path(os.path.expanduser(text.strip()))
    return path if path.is_absolute() else base / path


def read_path_list(path: Path, source: str, key: str) -> list[Path]:
    """Paths listed in a text file, one per line, relative to the file's folder."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found (named by {source}: {key})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the list of paths ({err})") from None
    out = [_join(path.parent, line) for line in lines
           if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise InputError(f"{path}: lists no files (named by {source}: {key})")
    return out


def _expand(text: str, base: Path, source: str, key: str) -> list[Path]:
    """One string: glob, text file of paths, or a single path."""
    if not isinstance(text, str) or not text.strip():
        raise chk.fail(source, key, f"expected a path or glob, got {chk.kind(text)}")
    if is_glob(text):
        pattern = str(_join(base, text))
        found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not found:
            raise ConfigError(f"{source}: {key}: '{text}' matched no files (looked in {base})")
        return found
    path = _join(base, text)
    if path.suffix.lower() in _LIST_SUFFIXES:
        return read_path_list(path, source, key)
    return [path]


def resolve_paths(value: Any, base: Path, source: str, key: str) -> list[Path]:
    """A glob, text file, single path, or a list of paths/globs -> list of paths (no duplicates)."""
    if isinstance(value, str):
        paths = _expand(value, base, source, key)
    elif isinstance(value, (list, tuple)) and value:
        paths = []
        for i, item in enumerate(value):
            paths.extend(_expand(item, base, source, f"{key}[{i}]"))
    else:
        raise chk.fail(source, key, "expected a glob, a list of paths, or a text file of paths, "
                       f"got {chk.kind(value)}")
    seen: set[Path] = set()
    for p in paths:
        if p in seen:
            raise chk.fail(source, key, f"{p} is listed twice")
        seen.add(p)
    return paths


@dataclass
class Learn2RegDataset:
    """The parts of a Learn2Reg ``*_dataset.json`` that tfreg uses (paths resolved)."""

    path: Path
    images: list[Path]
    labels: list[Path | None]
    val_pairs: list[tuple[Path, Path]] = field(default_factory=list)
    test_pairs: list[tuple[Path, Path]] = field(default_factory=list)
    shape: tuple[int, ...] | None = None


def read_learn2reg(path: Path, source: str, key: str) -> Learn2RegDataset:
    """Parse a Learn2Reg dataset JSON (``training`` entries, ``registration_val/_test`` pairs)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found (named by {source}: {key})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable JSON file ({err})") from None
    training = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(training, list) or not training:
        raise InputError(f"{path}: not a Learn2Reg dataset JSON (no 'training' list)")
    base = path.parent
    images: list[Path] = []
    labels: list[Path | None] = []
    for i, entry in enumerate(training):
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise InputError(f"{path}: training[{i}]: expected an entry with an 'image' path")
        images.append(_join(base, entry["image"]))
        lab = entry.get("label")
        labels.append(_join(base, lab) if isinstance(lab, str) else None)

    def pairs(name: str) -> list[tuple[Path, Path]]:
        out = []
        for i, entry in enumerate(meta.get(name) or []):
            if not (isinstance(entry, dict) and isinstance(entry.get("fixed"), str)
                    and isinstance(entry.get("moving"), str)):
                raise InputError(f"{path}: {name}[{i}]: expected 'fixed' and 'moving' paths")
            out.append((_join(base, entry["fixed"]), _join(base, entry["moving"])))
        return out

    shape = None
    tensor_shape = meta.get("tensorImageShape")
    if isinstance(tensor_shape, dict) and isinstance(tensor_shape.get("0"), list):
        shape = tuple(int(v) for v in tensor_shape["0"])
    return Learn2RegDataset(path, images, labels, pairs("registration_val"),
                            pairs("registration_test"), shape)


def resolve_images(value: Any, base: Path, source: str
                   ) -> tuple[list[Path], Learn2RegDataset | None]:
    """The ``images`` key: paths, plus the parsed dataset JSON when one was given."""
    if isinstance(value, str) and not is_glob(value) and value.lower().endswith(".json"):
        dataset = read_learn2reg(_join(base, value), source, "images")
        return list(dataset.images), dataset
    return resolve_paths(value, base, source, "images"), None


def resolve_labels(value: Any, images: list[Path], base: Path, source: str) -> list[Path]:
    """The ``labels`` key: one label path per image.

    A template is filled per image; a glob, list or text file must list as many files as there
    are images and is matched to them in sorted order of the images.
    """
    if isinstance(value, str) and "{" in value:
        out = []
        for image in images:
            try:
                text = value.format(stem=nifti_stem(image), name=image.name)
            except (KeyError, IndexError, ValueError) as err:
                raise chk.fail(source, "labels", f"bad template '{value}' ({err!r}); use "
                               "{stem} or {name}") from None
            out.append(_join(base, text))
        return out
    paths = resolve_paths(value, base, source, "labels")
    if len(paths) != len(images):
        raise chk.fail(source, "labels", f"found {len(paths)} label files for {len(images)} images "
                       "(use a template such as 'labels/{stem}.nii.gz' to match by name)")
    return paths


@dataclass(frozen=True)
class PairRow:
    """One row of a pairs CSV (paths resolved)."""

    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    line: int = 0


def read_pairs_csv(path: Path, source: str, key: str) -> list[PairRow]:
    """Read ``fixed,moving[,fixed_labels,moving_labels]`` rows; an optional header row starts with
    ``fixed``. Paths are relative to the CSV's folder."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found (named by {source}: {key})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read ({err})") from None
    rows: list[PairRow] = []
    width = None
    for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [c.strip() for c in row]
        if not cells or all(not c for c in cells) or cells[0].startswith("#"):
            continue
        if not rows and width is None and cells[0].lower() == "fixed":
            width = len(cells)
            if width not in (2, 4):
                raise InputError(f"{path}: line {line_no}: header must be fixed,moving"
                                 "[,fixed_labels,moving_labels]")
            continue
        if len(cells) not in (2, 4) or any(not c for c in cells):
            raise InputError(f"{path}: line {line_no}: expected 2 or 4 non-empty columns "
                             "(fixed,moving[,fixed_labels,moving_labels]), got "
                             f"{len(cells)}")
        if width is not None and len(cells) != width:
            raise InputError(f"{path}: line {line_no}: expected {width} columns like the first "
                             f"row, got {len(cells)}")
        width = len(cells)
        paths = [_join(path.parent, c) for c in cells]
        rows.append(PairRow(paths[0], paths[1], *(paths[2:] if width == 4 else (None, None)),
                            line=line_no))
    if not rows:
        raise InputError(f"{path}: lists no pairs (named by {source}: {key})")
    return rows


def group_of(image: Path, pattern: re.Pattern, source: str) -> str:
    """Group key of an image: the first capture group (or the whole match) of `pattern` searched
    in its stem."""
    found = pattern.search(nifti_stem(image))
    if found is None:
        raise ConfigError(f"{source}: groups: pattern '{pattern.pattern}' does not match "
                          f"'{nifti_stem(image)}' ({image})")
    return found.group(1) if pattern.groups else found.group(0)
