"""tfreg.data.DataSpec: the spec format, pairing, splits, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from tfreg.data import DataSpec, Pair
from tfreg.errors import ConfigError, InputError, TfregError
from tfreg.synthetic import write_collection


def _spec(folder: Path, text: str) -> DataSpec:
    path = folder / "data.yaml"
    path.write_text(text)
    return DataSpec.from_yaml(path)


@pytest.fixture()
def col(tmp_path) -> Path:
    """Four 16^3 subjects: images/sub-0X.nii.gz, labels/sub-0X.nii.gz."""
    write_collection(tmp_path, n=4, shape=(16, 16, 16), seed=1)
    return tmp_path


def _names(paths) -> list[str]:
    return [Path(p).name for p in paths]


# ------------------------------------------------------------------------------- minimal spec
def test_minimal_spec_of_the_synthetic_collection(tiny_collection):
    spec = DataSpec.from_yaml(tiny_collection)
    assert spec.shape == (24, 24, 24) and spec.ndims == 3 and spec.has_labels
    assert spec.pairing == "scan-to-scan" and len(spec.scans) == 6
    pairs = spec.pairs("train")
    assert len(pairs) == 5  # consecutive: 00->01, 01->02, ... 04->05
    assert _names([pairs[0].fixed, pairs[0].moving]) == ["sub-00.nii.gz", "sub-01.nii.gz"]
    assert Path(pairs[0].fixed_labels).parent.name == "labels"
    assert spec.pairs("val") == [] and spec.pairs("test") == []
    assert spec.validate(deep=True) == 6
    assert "6 scans with labels" in spec.summary()


def test_2d_collection_and_shape_taken_from_images(tmp_path):
    write_collection(tmp_path, n=3, shape=(20, 24), seed=0)
    spec = _spec(tmp_path, "images: images/*.nii.gz\n")
    assert spec.shape == (20, 24) and not spec.has_labels
    assert any("taken from the images" in n for n in spec.notes)


def test_path_forms_list_textfile_template(col):
    (col / "train.txt").write_text("# scans\nimages/sub-00.nii.gz\n\nimages/sub-02.nii.gz\n")
    spec = _spec(col, "images: train.txt\nlabels: labels/{stem}.nii.gz\nshape: [16, 16, 16]\n")
    assert _names(s.image for s in spec.scans) == ["sub-00.nii.gz", "sub-02.nii.gz"]
    assert _names(s.labels for s in spec.scans) == ["sub-00.nii.gz", "sub-02.nii.gz"]
    spec = _spec(col, "images: [images/sub-03.nii.gz, 'images/sub-0[12].nii.gz']\n"
                      "shape: [16, 16, 16]\n")
    assert _names(s.image for s in spec.scans) == ["sub-03.nii.gz", "sub-01.nii.gz",
                                                   "sub-02.nii.gz"]


def test_learn2reg_dataset_json(col):
    meta = {
        "name": "TOY", "tensorImageShape": {"0": [16, 16, 16]},
        "training": [{"image": f"./images/sub-0{i}.nii.gz", "label": f"./labels/sub-0{i}.nii.gz"}
                     for i in range(4)],
        "registration_val": [{"fixed": "./images/sub-02.nii.gz",
                              "moving": "./images/sub-03.nii.gz"}],
    }
    (col / "TOY_dataset.json").write_text(json.dumps(meta))
    spec = _spec(col, "images: TOY_dataset.json\nshape: [16, 16, 16]\nsplit: learn2reg\n")
    assert spec.has_labels  # label maps of the JSON entries
    assert spec.pairs("val") == [Pair(*(str(col / "images" / "sub-02.nii.gz"),
                                        str(col / "images" / "sub-03.nii.gz"),
                                        str(col / "labels" / "sub-02.nii.gz"),
                                        str(col / "labels" / "sub-03.nii.gz")))]
    assert _names(spec.images("train")) == ["sub-00.nii.gz", "sub-01.nii.gz"]
    assert spec.pairs("test") == []


def test_shipped_oasis_spec_parses_a_learn2reg_layout(tmp_path):
    from tfreg_configs import config_path

    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    entries = []
    for i in range(1, 5):
        name = f"OASIS_{i:04d}_0000.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)),
                 str(tmp_path / "imagesTr" / name))
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)),
                 str(tmp_path / "labelsTr" / name))
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"training": entries, "registration_val": [
        {"fixed": "./imagesTr/OASIS_0003_0000.nii.gz",
         "moving": "./imagesTr/OASIS_0004_0000.nii.gz"}]}
    (tmp_path / "OASIS_dataset.json").write_text(json.dumps(meta))
    shutil.copy(config_path("data/oasis.yaml"), tmp_path / "oasis.yaml")
    spec = DataSpec.from_yaml(tmp_path / "oasis.yaml")
    assert spec.shape == (160, 224, 192) and spec.has_labels
    assert len(spec.pairs("val")) == 1 and len(spec.images("train")) == 2
    spec.check_divisible(16)


# -------------------------------------------------------------------------- pairing and splits
def test_scan_to_atlas(col):
    spec = _spec(col, "images: images/sub-0[1-3].nii.gz\nlabels: labels/{stem}.nii.gz\n"
                      "shape: [16, 16, 16]\npairing: scan-to-atlas\natlas: images/sub-00.nii.gz\n"
                      "atlas_labels: labels/sub-00.nii.gz\n")
    pairs = spec.pairs("train")
    assert [Path(p.fixed).name for p in pairs] == ["sub-00.nii.gz"] * 3
    assert _names(p.moving for p in pairs) == ["sub-01.nii.gz", "sub-02.nii.gz", "sub-03.nii.gz"]
    sampler = spec.sampler("train", shuffle=True, seed=3)
    drawn = {sampler(k) for k in range(3)}  # one epoch: every scan once with the atlas
    assert {f for f, _ in drawn} == {spec.atlas} and len({m for _, m in drawn}) == 3
    with pytest.raises(ConfigError, match=r"data\.yaml: atlas_labels: .*has no label map"):
        _spec(col, "images: images/*.nii.gz\nlabels: labels/*.nii.gz\nshape: [16, 16, 16]\n"
                   "pairing: scan-to-atlas\natlas: images/sub-00.nii.gz\n")


def test_pairs_csv_with_header_and_label_columns(col):
    (col / "lists").mkdir()
    (col / "lists" / "pairs.csv").write_text(
        "fixed,moving,fixed_labels,moving_labels\n"
        "../images/sub-00.nii.gz,../images/sub-01.nii.gz,../labels/sub-00.nii.gz,"
        "../labels/sub-01.nii.gz\n"
        "../images/sub-02.nii.gz,../images/sub-03.nii.gz,../labels/sub-02.nii.gz,"
        "../labels/sub-03.nii.gz\n")
    spec = _spec(col, "pairing: pairs\npairs: lists/pairs.csv\nshape: [16, 16, 16]\n")
    assert spec.has_labels and len(spec.pairs("train")) == 2
    assert Path(spec.pairs("train")[1].moving_labels).name == "sub-03.nii.gz"


def test_pairs_csv_naming_an_unknown_file(col):
    (col / "pairs.csv").write_text("images/sub-00.nii.gz,images/sub-01.nii.gz\n"
                                   "images/sub-00.nii.gz,images/sub-09.nii.gz\n")
    with pytest.raises(InputError, match=r"pairs\.csv: line 2: moving image .*sub-09\.nii\.gz: "
                                         r"file not found$"):
        _spec(col, "pairing: pairs\npairs: pairs.csv\nshape: [16, 16, 16]\n")
    (col / "pairs.csv").write_text("images/sub-00.nii.gz,labels/sub-01.nii.gz\n")
    with pytest.raises(InputError, match=r"line 1: moving image .*labels/sub-01\.nii\.gz is not "
                                         "among the spec's images"):
        _spec(col, "images: images/*.nii.gz\npairing: pairs\npairs: pairs.csv\nshape: [16,16,16]\n")


def test_split_fractions_are_seeded_and_keep_groups_together(tmp_path):
    write_collection(tmp_path, n=8, shape=(8, 8, 8), seed=0)
    spec = _spec(tmp_path, "images: images/*.nii.gz\nshape: [8, 8, 8]\n"
                           "split: {train: 0.5, val: 0.25, test: 0.25, seed: 4}\n")
    sizes = {s: len(spec.images(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 4, "val": 2, "test": 2}
    assert set().union(*(spec.images(s) for s in sizes)) == {str(s.image) for s in spec.scans}
    again = _spec(tmp_path, "images: images/*.nii.gz\nshape: [8, 8, 8]\n"
                            "split: {train: 0.5, val: 0.25, test: 0.25, seed: 4}\n")
    assert again.images("val") == spec.images("val")
    # groups: sub-00/01 are one subject, sub-02/03 another, ...: a group never straddles splits
    grouped = _spec(tmp_path, "images: images/*.nii.gz\nshape: [8, 8, 8]\n"
                              "groups: 'sub-0([0-7])'\n"
                              "split: {train: 0.5, val: 0.5, seed: 0}\n")
    assert len(grouped.images("train")) == 4
    grouped = _spec(tmp_path, "images: images/*.nii.gz\nshape: [8, 8, 8]\n"
                              "groups: 'sub-(\\d)'\nsplit: {train: 0.5, val: 0.5}\n")
    # group = first digit of the subject number: everything is group '0' -> one split only
    assert sorted(len(grouped.images(s)) for s in ("train", "val")) == [0, 8]


def test_groups_restrict_random_pairs(tmp_path):
    write_collection(tmp_path, n=6, shape=(8, 8, 8), seed=0)
    for i, name in enumerate(sorted((tmp_path / "images").iterdir())):
        name.rename(name.with_name(f"s{i // 2}_t{i % 2}.nii.gz"))  # subjects s0..s2, 2 times each
    spec = _spec(tmp_path, "images: images/*.nii.gz\nshape: [8, 8, 8]\ngroups: '^(s\\d)_'\n")
    assert len(spec.pairs("train")) == 3  # one consecutive pair per subject
    sampler = spec.sampler("train", shuffle=True, seed=0)
    for k in range(24):
        f, m = sampler(k)
        assert f != m and spec.scans[f].image.name[:2] == spec.scans[m].image.name[:2]


def test_explicit_split_lists(col):
    spec = _spec(col, "images: images/*.nii.gz\nshape: [16, 16, 16]\n"
                      "split:\n  val: [images/sub-01.nii.gz]\n  test: images/sub-03.nii.gz\n")
    assert _names(spec.images("train")) == ["sub-00.nii.gz", "sub-02.nii.gz"]
    assert _names(spec.images("val")) == ["sub-01.nii.gz"]
    with pytest.raises(ConfigError, match=r"split\.test: .*sub-01\.nii\.gz is also in split 'val'"):
        _spec(col, "images: images/*.nii.gz\nshape: [16, 16, 16]\n"
                   "split:\n  val: [images/sub-01.nii.gz]\n  test: [images/sub-01.nii.gz]\n")
    with pytest.raises(ConfigError, match=r"split: fractions must add up to 1, got 0\.9"):
        _spec(col, "images: images/*.nii.gz\nshape: [16,16,16]\nsplit: {train: 0.8, val: 0.1}\n")


def test_missing_split_makes_val_empty_for_make_dataset(tiny_collection):
    from tfreg.data import make_dataset

    spec = DataSpec.from_yaml(tiny_collection)
    with pytest.raises(ConfigError, match=r"split 'val' has no pairs \(without a split: section"):
        make_dataset(spec, split="val")
    with pytest.raises(ConfigError, match=r"unknown split 'vall' \(did you mean 'val'\?\)"):
        spec.pairs("vall")


# ------------------------------------------------------------------------ bad input, one line
def test_unknown_key_with_hint(col):
    with pytest.raises(ConfigError, match=r"^.*data\.yaml: image: unknown key "
                                          r"\(did you mean 'images'\?\)$"):
        _spec(col, "image: images/*.nii.gz\nshape: [16, 16, 16]\n")
    with pytest.raises(ConfigError, match=r"data\.yaml: augment\.affine\.rotation: unknown key "
                                          r"\(did you mean 'rotate'\?\)"):
        _spec(col, "images: images/*.nii.gz\naugment: {affine: {rotation: 5}}\n")
    with pytest.raises(ConfigError, match=r"data\.yaml: atlas: only used with pairing: "
                                          r"scan-to-atlas"):
        _spec(col, "images: images/*.nii.gz\natlas: images/sub-00.nii.gz\n")


def test_empty_glob(col):
    with pytest.raises(ConfigError, match=r"data\.yaml: images: 'scans/\*\.nii\.gz' matched no "
                                          "files"):
        _spec(col, "images: scans/*.nii.gz\nshape: [16, 16, 16]\n")


def test_missing_file(col):
    with pytest.raises(InputError, match=r"images/sub-07\.nii\.gz: file not found "
                                         r"\(named by .*data\.yaml\)$"):
        _spec(col, "images: [images/sub-00.nii.gz, images/sub-07.nii.gz]\nshape: [16, 16, 16]\n")


def test_unreadable_nifti(col):
    (col / "images" / "sub-01.nii.gz").write_bytes(b"definitely not an image")
    with pytest.raises(InputError, match=r"sub-01\.nii\.gz: not a readable NIfTI"):
        _spec(col, "images: images/*.nii.gz\nshape: [16, 16, 16]\n")


def test_truncated_nifti_found_by_deep_validation(col):
    path = col / "images" / "sub-02.nii.gz"
    path.write_bytes(path.read_bytes()[:-600])
    spec = _spec(col, "images: images/*.nii.gz\nshape: [16, 16, 16]\n")  # header still fine
    with pytest.raises(InputError, match=r"sub-02\.nii\.gz: truncated or corrupt"):
        spec.validate(deep=True)


def test_4d_volume(col):
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 2), np.float32), np.eye(4)),
             str(col / "images" / "sub-01.nii.gz"))
    with pytest.raises(InputError, match=r"sub-01\.nii\.gz: has shape \(16, 16, 16, 2\): a 4D"):
        _spec(col, "images: images/*.nii.gz\nshape: [16, 16, 16]\n")


@pytest.mark.parametrize("value,word", [(np.nan, "NaN"), (-np.inf, "Inf")])
def test_nan_inf_found_by_deep_validation(col, value, word):
    data = np.zeros((16, 16, 16), np.float32)
    data[3, 4, 5] = value
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(col / "images" / "sub-03.nii.gz"))
    spec = _spec(col, "images: images/*.nii.gz\nlabels: labels/*.nii.gz\nshape: [16, 16, 16]\n")
    with pytest.raises(InputError, match=rf"sub-03\.nii\.gz: contains 1 {word} voxels$"):
        spec.validate(deep=True)


def test_labels_with_another_shape(col):
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 15), np.int16), np.eye(4)),
             str(col / "labels" / "sub-02.nii.gz"))
    with pytest.raises(InputError, match=r"labels/sub-02\.nii\.gz: shape \[16, 16, 15\] differs "
                                         r"from its image .*images/sub-02\.nii\.gz \[16, 16, 16\]"):
        _spec(col, "images: images/*.nii.gz\nlabels: labels/*.nii.gz\nshape: [16, 16, 16]\n")


def test_label_count_mismatch_and_bad_template(col):
    with pytest.raises(ConfigError, match=r"labels: found 2 label files for 4 images"):
        _spec(col, "images: images/*.nii.gz\nlabels: labels/sub-0[01].nii.gz\n")
    with pytest.raises(InputError, match=r"seg_sub-00\.nii\.gz: file not found"):
        _spec(col, "images: images/*.nii.gz\nlabels: labels/seg_{stem}.nii.gz\n")


def test_shape_not_divisible(col):
    spec = _spec(col, "images: images/*.nii.gz\nshape: [16, 20, 12]\n")
    spec.check_divisible(4)
    with pytest.raises(ConfigError, match=r"data\.yaml: shape: \[16, 20, 12\] is not divisible "
                                          r"by 8, which the method needs; "
                                          r"use e\.g\. \[16, 24, 16\]"):
        spec.check_divisible(8)


def test_wrong_dimensionality_and_bad_values(col):
    with pytest.raises(InputError, match=r"is 3D \[16, 16, 16\], but shape \[16, 16\] .* is 2D"):
        _spec(col, "images: images/*.nii.gz\nshape: [16, 16]\n")
    with pytest.raises(ConfigError, match=r"data\.yaml: shape: expected a list of 2 or 3 integers"):
        _spec(col, "images: images/*.nii.gz\nshape: 16\n")
    with pytest.raises(ConfigError, match=r"pairing: expected one of .*got 'scan2scan'"):
        _spec(col, "images: images/*.nii.gz\npairing: scan2scan\n")
    # the old limit spacing / 2 let folding fields through (3.9 at spacing 8): 3D bound is 8 / 6
    with pytest.raises(ConfigError, match=r"augment\.deform\.max_disp: must be < 1\.333 in 3D"):
        _spec(col, "images: images/*.nii.gz\naugment: {deform: {max_disp: 3.9, spacing: 8}}\n")
    with pytest.raises(ConfigError, match=r"augment\.affine\.shear: must be < 0\.5 in 3D"):
        _spec(col, "images: images/*.nii.gz\naugment: {affine: {shear: 0.6}}\n")


def test_user_errors_exit_non_zero_with_one_line(col):
    from tfreg_cli.common import user_errors

    @click.command()
    @click.argument("path")
    @user_errors
    def check(path):
        DataSpec.from_yaml(path).validate(deep=True)

    (col / "data.yaml").write_text("images: nothing/*.nii.gz\n")
    result = CliRunner().invoke(check, [str(col / "data.yaml")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "images: 'nothing/*.nii.gz' matched no files" in lines[0]
    assert issubclass(ConfigError, TfregError) and issubclass(InputError, TfregError)


def test_readme_examples_use_only_known_keys():
    """Every YAML example in configs/data/README.md parses and uses valid keys and sections."""
    import re

    import yaml

    from tfreg.data import Augmentation, Preprocessing
    from tfreg.data.spec import SPEC_KEYS
    from tfreg_configs import config_path

    text = config_path("data/README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    for block in blocks:
        d = yaml.safe_load(block)
        assert set(d) <= set(SPEC_KEYS), set(d) - set(SPEC_KEYS)
        if "preprocess" in d:
            Preprocessing.from_dict({"shape": d.get("shape", [8, 8, 8]), **d["preprocess"]}, "x")
        if "augment" in d:
            assert Augmentation.from_dict(d["augment"], "x").enabled
