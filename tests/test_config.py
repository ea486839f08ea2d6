"""Config loading, --set parsing, merging and validation (tfreg.config)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tfreg.config import (TRAIN_DEFAULTS, did_you_mean, dump_yaml, get_dotted, load_yaml,
                          method_defaults, parse_set, resolve, set_dotted)
from tfreg.errors import ConfigError
from tfreg.registry import Method

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

DEFAULTS = {
    "method": "vm",
    "data": None,
    "model": {"enc": [16, 32], "int_steps": 7, "bidir": False, "extra": None,
              "weights": [1.0, 0.5]},
    "loss": {"image": "mse", "smooth_weight": 0.01},
    "train": {"steps": 1000, "learning_rate": 1e-4, "batch_size": 1, "clip_norm": None},
}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------ load_yaml
def test_load_yaml_reads_mapping_and_yaml12_floats(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  learning_rate: 1e-4\n  steps: 3\nname: x\n")
    assert load_yaml(path) == {"train": {"learning_rate": 0.0001, "steps": 3}, "name": "x"}


def test_load_yaml_empty_file_is_empty_mapping(tmp_path):
    assert load_yaml(write(tmp_path / "e.yaml", "# nothing\n")) == {}


def test_load_yaml_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value) == f"{path}: file not found"


def test_load_yaml_not_a_mapping(tmp_path):
    path = write(tmp_path / "l.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value) == f"{path}: expected a mapping of keys at the top level, got a list"


def test_load_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    message = str(err.value)
    assert "\n" not in message
    assert re.fullmatch(rf"{re.escape(str(path))}: invalid YAML: .+ \(line \d+\)", message)


def test_load_yaml_duplicate_key(tmp_path):
    path = write(tmp_path / "d.yaml", "train:\n  steps: 1\n  steps: 2\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value) == f"{path}: invalid YAML: duplicate key 'steps' (line 3)"


# ------------------------------------------------------------------------------------ parse_set
def test_parse_set_values_are_yaml():
    got = parse_set(["train.steps=3", "train.learning_rate=1e-3", "model.bidir=true",
                     "model.enc=[8, 16]", "loss.image=ncc", "train.clip_norm=null",
                     "data=a=b.yaml"])
    assert dict(got) == {"train.steps": 3, "train.learning_rate": 0.001, "model.bidir": True,
                         "model.enc": [8, 16], "loss.image": "ncc", "train.clip_norm": None,
                         "data": "a=b.yaml"}
    assert got.sources["train.steps"] == "--set train.steps=3"


def test_parse_set_last_occurrence_wins():
    got = parse_set(["train.steps=3", "train.steps=4"])
    assert dict(got) == {"train.steps": 4}
    assert got.sources == {"train.steps": "--set train.steps=4"}


@pytest.mark.parametrize("item, message", [
    ("train.steps", "--set train.steps: expected key=value, e.g. train.steps=100"),
    ("=3", "--set =3: invalid key ''; use dotted names such as train.learning_rate"),
    ("train..steps=3",
     "--set train..steps=3: invalid key 'train..steps'; use dotted names such as "
     "train.learning_rate"),
])
def test_parse_set_bad_syntax(item, message):
    with pytest.raises(ConfigError) as err:
        parse_set([item])
    assert str(err.value) == message


def test_parse_set_bad_yaml_value_names_the_set_text():
    with pytest.raises(ConfigError) as err:
        parse_set(["model.enc=[1, 2"])
    assert str(err.value).startswith("--set model.enc=[1, 2: model.enc: invalid value: ")
    assert "\n" not in str(err.value)


# -------------------------------------------------------------------------------------- resolve
def test_resolve_precedence_defaults_file_set():
    file_cfg = {"train": {"steps": 50, "batch_size": 2}, "loss": {"image": "ncc"}}
    got = resolve(DEFAULTS, file_cfg, parse_set(["train.steps=7"]), file_source="c.yaml")
    assert got["train"] == {"steps": 7, "learning_rate": 1e-4, "batch_size": 2, "clip_norm": None}
    assert got["loss"] == {"image": "ncc", "smooth_weight": 0.01}
    assert got["model"] == DEFAULTS["model"]


def test_resolve_does_not_modify_inputs():
    file_cfg = {"model": {"enc": [1]}}
    before_defaults = yaml.safe_dump(DEFAULTS)
    resolve(DEFAULTS, file_cfg, parse_set(["model.int_steps=3"]))
    assert yaml.safe_dump(DEFAULTS) == before_defaults
    assert file_cfg == {"model": {"enc": [1]}}


def test_resolve_without_file_or_overrides_equals_defaults():
    assert resolve(DEFAULTS, None, None) == DEFAULTS


def test_resolve_unknown_key_in_file():
    with pytest.raises(ConfigError) as err:
        resolve(DEFAULTS, {"train": {"batchsize": 2}}, {}, file_source="configs/x.yaml")
    assert str(err.value) == "configs/x.yaml: train.batchsize: unknown key " \
                             "(did you mean 'batch_size'?)"


def test_resolve_unknown_key_in_set():
    with pytest.raises(ConfigError) as err:
        resolve(DEFAULTS, None, parse_set(["train.step=5"]))
    assert str(err.value) == "--set train.step=5: train.step: unknown key (did you mean 'steps'?)"


def test_resolve_unknown_key_without_close_match():
    with pytest.raises(ConfigError) as err:
        resolve(DEFAULTS, {"zzz": 1}, {}, file_source="c.yaml")
    assert str(err.value) == "c.yaml: zzz: unknown key"


def test_resolve_key_at_wrong_level_suggests_full_path():
    with pytest.raises(ConfigError) as err:
        resolve(DEFAULTS, {"steps": 3}, {}, file_source="c.yaml")
    assert str(err.value) == "c.yaml: steps: unknown key (did you mean 'train.steps'?)"


@pytest.mark.parametrize("item, message", [
    ("train.steps=abc", "--set train.steps=abc: train.steps: expected an integer, got 'abc'"),
    ("train.steps=2.5", "--set train.steps=2.5: train.steps: expected an integer, got 2.5"),
    ("train.steps=true", "--set train.steps=true: train.steps: expected an integer, got true"),
    ("model.bidir=1", "--set model.bidir=1: model.bidir: expected true or false, got 1"),
    ("loss.image=3", "--set loss.image=3: loss.image: expected a string, got 3"),
    ("model.enc=16", "--set model.enc=16: model.enc: expected a list of integers, got 16"),
    ("model.enc=[16, x]", "--set model.enc=[16, x]: model.enc[1]: expected an integer, got 'x'"),
    ("train=3", "--set train=3: train: expected a mapping, got 3"),
    ("train.learning_rate=fast",
     "--set train.learning_rate=fast: train.learning_rate: expected a number, got 'fast'"),
    ("train.steps=null", "--set train.steps=null: train.steps: expected an integer, got null"),
])
def test_resolve_type_errors_in_set(item, message):
    with pytest.raises(ConfigError) as err:
        resolve(DEFAULTS, None, parse_set([item]))
    assert str(err.value) == message


def test_resolve_type_error_in_file_names_file():
    with pytest.raises(ConfigError) as err:
        resolve(DEFAULTS, {"train": {"batch_size": "two"}}, {}, file_source="run.yaml")
    assert str(err.value) == "run.yaml: train.batch_size: expected an integer, got 'two'"


def test_resolve_int_allowed_where_float_expected_and_stored_as_float():
    got = resolve(DEFAULTS, {"train": {"learning_rate": 1}}, parse_set(["model.weights=[1, 2]"]))
    assert got["train"]["learning_rate"] == 1.0 and isinstance(got["train"]["learning_rate"], float)
    assert got["model"]["weights"] == [1.0, 2.0]
    assert all(isinstance(w, float) for w in got["model"]["weights"])


def test_resolve_null_default_accepts_any_value():
    got = resolve(DEFAULTS, {"data": "d.yaml", "train": {"clip_norm": 1.5}},
                  parse_set(["model.extra.depth=3", "model.extra.kind=unet"]))
    assert got["data"] == "d.yaml"
    assert got["train"]["clip_norm"] == 1.5
    assert got["model"]["extra"] == {"depth": 3, "kind": "unet"}


def test_resolve_nested_mapping_defaults_validated_recursively():
    defaults = {"model": {"encoder": {"features": [8, 16], "norm": "none"}}}
    got = resolve(defaults, {"model": {"encoder": {"norm": "batch"}}},
                  parse_set(["model.encoder={features: [4, 8]}"]))
    assert got == {"model": {"encoder": {"features": [4, 8], "norm": "batch"}}}
    with pytest.raises(ConfigError) as err:
        resolve(defaults, {"model": {"encoder": {"nrom": "batch"}}}, {}, file_source="f.yaml")
    assert str(err.value) == "f.yaml: model.encoder.nrom: unknown key (did you mean 'norm'?)"


def test_resolve_empty_section_changes_nothing():
    assert resolve(DEFAULTS, {"model": None}, {})["model"] == DEFAULTS["model"]


def test_resolve_plain_override_dict_uses_generic_source():
    with pytest.raises(ConfigError) as err:
        resolve(DEFAULTS, None, {"model.int_steps": "x"})
    assert str(err.value) == "overrides: model.int_steps: expected an integer, got 'x'"


# ----------------------------------------------------------------------------------- helpers
def test_did_you_mean():
    assert did_you_mean("batchsize", ["batch_size", "steps"]) == " (did you mean 'batch_size'?)"
    assert did_you_mean("qqq", ["batch_size", "steps"]) == ""


def test_get_and_set_dotted():
    cfg: dict = {"train": {"steps": 3}}
    assert get_dotted(cfg, "train.steps") == 3
    assert get_dotted(cfg, "train.nope", None) is None
    with pytest.raises(KeyError):
        get_dotted(cfg, "model.x")
    set_dotted(cfg, "model.enc.depth", 4)
    set_dotted(cfg, "train.steps", 5)
    assert cfg == {"train": {"steps": 5}, "model": {"enc": {"depth": 4}}}


def test_dump_yaml_round_trip_and_atomic(tmp_path):
    cfg = {"method": "vm", "train": {"learning_rate": 1e-4, "steps": 3}, "model": {"enc": (8, 16)},
           "data": tmp_path / "d.yaml"}
    path = dump_yaml(cfg, tmp_path / "config.yaml")
    assert load_yaml(path) == {"method": "vm", "train": {"learning_rate": 1e-4, "steps": 3},
                               "model": {"enc": [8, 16]}, "data": str(tmp_path / "d.yaml")}
    dump_yaml({"method": "other"}, path)  # replaces
    assert load_yaml(path) == {"method": "other"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


# ----------------------------------------------------------------------------- train defaults
def test_train_defaults_match_the_documented_contract():
    text = ARCHITECTURE.read_text()
    block = re.search(r"`TRAIN_DEFAULTS`.*?```yaml\n(.*?)```", text, re.S).group(1)
    assert TRAIN_DEFAULTS == yaml.safe_load(block)


def _method(tmp_path: Path, yaml_text: str) -> Method:
    return Method(name="m", summary="test", default_config=write(tmp_path / "m.yaml", yaml_text),
                  build_model=lambda config, inshape: None, build_loss=lambda config: None)


def test_method_defaults_merges_train_defaults_under_method_yaml(tmp_path):
    method = _method(tmp_path, "model:\n  depth: 2\ntrain:\n  steps: 20\n  learning_rate: 1\n")
    got = method_defaults(method)
    train = dict(TRAIN_DEFAULTS["train"], steps=20, learning_rate=1.0)
    assert got == {"method": "m", "data": None, "train": train, "model": {"depth": 2}}


def test_method_defaults_unknown_train_key_names_the_yaml(tmp_path):
    method = _method(tmp_path, "train:\n  step: 20\n")
    with pytest.raises(ConfigError) as err:
        method_defaults(method)
    assert str(err.value) == f"{tmp_path / 'm.yaml'}: train.step: unknown key " \
                             "(did you mean 'steps'?)"


def test_method_defaults_rejects_other_method_name(tmp_path):
    method = _method(tmp_path, "method: other\n")
    with pytest.raises(ConfigError) as err:
        method_defaults(method)
    assert str(err.value) == f"{tmp_path / 'm.yaml'}: method: expected 'm', got 'other'"


def test_resolved_run_config_can_be_used_as_config_file(tmp_path):
    method = _method(tmp_path, "model:\n  depth: 2\n")
    defaults = method_defaults(method)
    first = resolve(defaults, None, parse_set(["train.steps=3", "data=d.yaml"]))
    path = dump_yaml(first, tmp_path / "config.yaml")
    assert resolve(defaults, load_yaml(path), {}, file_source=path) == first
