"""Fraction splits of a pairs CSV keep every subject within one split."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from tfreg.data import DataSpec
from tfreg.errors import ConfigError
from tfreg.synthetic import write_collection


def _spec(folder: Path, text: str) -> DataSpec:
    path = folder / "data.yaml"
    path.write_text(text)
    return DataSpec.from_yaml(path)


def _subject(path: str, pattern: str = r"sub-(\d+)") -> str:
    return re.search(pattern, Path(path).name).group(1)


@pytest.fixture(scope="module")
def col(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("col")
    write_collection(root, n=10, shape=(8, 8, 8), seed=1)
    return root


def test_pairs_fraction_split_keeps_subjects_apart(col):
    # every ordered pair of 10 scans (90 rows): row-wise splits would put nearly every scan in
    # all three splits; the subject split must give disjoint scan sets.
    names = [f"images/sub-{i:02d}.nii.gz" for i in range(10)]
    # five disjoint cliques of two scans each, both directions -> 10 rows, 5 subject groups
    rows = [f"{names[a]},{names[b]}" for k in range(5)
            for a, b in itertools.permutations((2 * k, 2 * k + 1))]
    (col / "pairs.csv").write_text("\n".join(rows) + "\n")
    for seed in range(4):
        spec = _spec(col, "pairing: pairs\npairs: pairs.csv\nshape: [8, 8, 8]\n"
                          f"split: {{train: 0.6, val: 0.2, test: 0.2, seed: {seed}}}\n")
        scans = {s: {p for pair in spec.pairs(s) for p in (pair.fixed, pair.moving)}
                 for s in ("train", "val", "test")}
        counts = {s: len(spec.pairs(s)) for s in scans}
        assert counts == {"train": 6, "val": 2, "test": 2}
        for a, b in itertools.combinations(scans, 2):
            assert not scans[a] & scans[b], (seed, a, b)


def test_pairs_split_with_groups_keeps_sessions_of_a_subject_together(col):
    names = [f"images/sub-{i:02d}.nii.gz" for i in range(10)]
    rows = [f"{names[i]},{names[(i + 2) % 10]}" for i in range(0, 10, 2)]  # 0->2, 2->4, ... 8->0
    rows += [f"{names[i]},{names[i + 2]}" for i in range(1, 8, 2)]          # 1->3, ..., 7->9
    (col / "pairs.csv").write_text("\n".join(rows) + "\n")
    # without groups: even scans form one chain (5 rows), odd scans another (4 rows)
    spec = _spec(col, "pairing: pairs\npairs: pairs.csv\nshape: [8, 8, 8]\n"
                      "split: {train: 0.5, val: 0.5, seed: 0}\n")
    train = {_subject(p) for pair in spec.pairs("train") for p in (pair.fixed, pair.moving)}
    val = {_subject(p) for pair in spec.pairs("val") for p in (pair.fixed, pair.moving)}
    assert train and val and not train & val
    assert {int(s) % 2 for s in train} != {int(s) % 2 for s in val}
    # groups: 'sub-0([0-4])?' makes scans 05-09 one subject (no capture), which links the even
    # and the odd chain into one component -> refused with one line
    with pytest.raises(ConfigError, match=r"data\.yaml: split: cannot keep subjects apart: the "
                                          r"9 pairs link their scans into 1 group\(s\)"):
        _spec(col, "pairing: pairs\npairs: pairs.csv\nshape: [8, 8, 8]\n"
                   "groups: 'sub-0([0-4])?'\nsplit: {train: 0.5, val: 0.5, seed: 0}\n")


def test_pairs_split_refused_when_one_atlas_links_everything(col):
    names = [f"images/sub-{i:02d}.nii.gz" for i in range(10)]
    (col / "pairs.csv").write_text("".join(f"{names[0]},{n}\n" for n in names[1:]))
    with pytest.raises(ConfigError, match=r"cannot keep subjects apart: the 9 pairs link their "
                                          r"scans into 1 group\(s\) .* non-empty 'train' split "
                                          r"\(give one pairs CSV per split\)$"):
        _spec(col, "pairing: pairs\npairs: pairs.csv\nshape: [8, 8, 8]\n"
                   "split: {train: 0.8, val: 0.1, test: 0.1}\n")
    with pytest.raises(ConfigError, match=r"groups: only used with pairing: scan-to-scan or "
                                          "pairs"):
        _spec(col, "images: images/*.nii.gz\nshape: [8, 8, 8]\npairing: scan-to-atlas\n"
                   f"atlas: {names[0]}\ngroups: 'sub-(\\d+)'\n")
