"""Method discovery through entry points (tfreg.registry) and `tfreg methods`."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

import tfreg
from tfreg import registry
from tfreg.config import TRAIN_DEFAULTS
from tfreg.errors import MethodError
from tfreg.registry import LoadedMethod, Method, Stage, discover

BUILTINS = {"voxelmorph", "lapirn", "cascade"}


class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint: name, value, dist and load()."""

    def __init__(self, name: str, obj: Any = None, *, dist: str = "tfreg-fake",
                 version: str = "1.2.3", value: str | None = None, error: Exception | None = None):
        self.name = name
        self.value = value or f"fake_{name}:METHOD"
        self.group = registry.ENTRY_POINT_GROUP
        self.dist = SimpleNamespace(name=dist, version=version)
        self._obj = obj
        self._error = error

    def load(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._obj


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    """Each test discovers on its own; the process-wide cache is restored afterwards."""
    monkeypatch.setattr(registry, "_CACHE", None)


@pytest.fixture
def yaml_file(tmp_path) -> Path:
    path = tmp_path / "fake.yaml"
    path.write_text("model:\n  depth: 2\ntrain:\n  steps: 5\n")
    return path


def make_method(name: str, config: Path | str, **kwargs: Any) -> Method:
    return Method(name=name, summary=f"The {name} method.", default_config=config,
                  build_model=lambda cfg, inshape: None, build_loss=lambda cfg: None, **kwargs)


def use_entry_points(monkeypatch, *eps: FakeEntryPoint) -> None:
    monkeypatch.setattr(registry, "_entry_points", lambda group: list(eps))


# ----------------------------------------------------------------------------- real built-ins
def test_builtins_are_discovered_through_the_entry_point_group():
    reg = discover(refresh=True)
    # every built-in method (an entry point of the tfreg distribution itself) must load: a
    # built-in reported as a failure is a broken installation, not an acceptable outcome
    builtins = {ep.name for ep in registry._entry_points(registry.ENTRY_POINT_GROUP)
                if registry._dist_of(ep)[0] == "tfreg"}
    assert BUILTINS <= builtins
    assert not {name: reg.failures[name] for name in builtins & set(reg.failures)}
    assert builtins <= set(reg.methods)
    for name in builtins:
        loaded = reg.get(name)
        assert (loaded.dist_name, loaded.dist_version) == ("tfreg", tfreg.__version__)
        assert loaded.method.name == name
        assert Path(loaded.method.default_config).is_absolute()
        assert Path(loaded.method.default_config).is_file()


def test_discover_is_cached_until_refresh(monkeypatch, yaml_file):
    calls = []

    def entry_points(group):
        calls.append(group)
        return [FakeEntryPoint("a", make_method("a", yaml_file))]

    monkeypatch.setattr(registry, "_entry_points", entry_points)
    first = discover()
    assert discover() is first
    assert discover(refresh=True) is not first
    assert calls == ["tfreg.methods", "tfreg.methods"]


# ------------------------------------------------------------------------------------ loading
def test_loaded_method_records_distribution_and_resolves_config(monkeypatch, yaml_file):
    method = make_method("good", yaml_file)
    use_entry_points(monkeypatch, FakeEntryPoint("good", method, dist="tfreg-good", version="0.3"))
    reg = discover(refresh=True)
    assert reg.failures == {}
    loaded = reg.get("good")
    assert isinstance(loaded, LoadedMethod)
    assert (loaded.name, loaded.dist_name, loaded.dist_version) == ("good", "tfreg-good", "0.3")
    assert loaded.method.default_config == yaml_file
    assert loaded.method.load_defaults() == {"model": {"depth": 2}, "train": {"steps": 5}}


def test_relative_default_config_is_found_beside_the_plugin_module(monkeypatch, tmp_path,
                                                                    yaml_file):
    module = types.ModuleType("fake_plugin_pkg")
    module.__file__ = str(tmp_path / "__init__.py")
    monkeypatch.setitem(sys.modules, "fake_plugin_pkg", module)
    method = make_method("rel", "fake.yaml")
    use_entry_points(monkeypatch, FakeEntryPoint("rel", method, value="fake_plugin_pkg:METHOD"))
    assert discover(refresh=True).get("rel").method.default_config == yaml_file


def test_broken_plugin_is_reported_and_others_still_work(monkeypatch, yaml_file):
    use_entry_points(
        monkeypatch,
        FakeEntryPoint("broken", error=ModuleNotFoundError("No module named 'torch'")),
        FakeEntryPoint("good", make_method("good", yaml_file)),
    )
    reg = discover(refresh=True)
    assert reg.failures == {"broken": "ModuleNotFoundError: No module named 'torch'"}
    assert reg.names() == ["good"]
    assert reg.get("good").method.name == "good"
    with pytest.raises(MethodError) as err:
        reg.get("broken")
    assert str(err.value) == "method 'broken' failed to load: " \
                             "ModuleNotFoundError: No module named 'torch'"


def test_multiline_import_error_becomes_one_line(monkeypatch):
    use_entry_points(monkeypatch, FakeEntryPoint("x", error=RuntimeError("first line\nsecond")))
    assert discover(refresh=True).failures == {"x": "RuntimeError: first line"}


@pytest.mark.parametrize("case, reason", [
    ("not_a_method", "fake_p:METHOD is a dict, expected a tfreg.registry.Method"),
    ("api_version", "api_version 1 is not supported (this tfreg supports 2)"),
    ("name_mismatch", "entry point 'p' points to a method named 'q'"),
    ("missing_config", "default config 'nowhere.yaml' not found (ship it with the plugin as "
                       "package data)"),
])
def test_plugin_not_meeting_the_spec_is_a_failure(monkeypatch, yaml_file, case, reason):
    obj = {
        "not_a_method": {"name": "p"},
        "api_version": make_method("p", yaml_file, api_version=1),
        "name_mismatch": make_method("q", yaml_file),
        "missing_config": make_method("p", "nowhere.yaml"),
    }[case]
    use_entry_points(monkeypatch, FakeEntryPoint("p", obj))
    assert discover(refresh=True).failures == {"p": reason}


def test_plugin_without_its_yaml_fails_instead_of_loading_a_builtins(monkeypatch, tmp_path):
    """A third-party plugin naming 'voxelmorph.yaml' without shipping it must not get the
    built-in's defaults: discovery fails with one line naming where it looked."""
    module = types.ModuleType("fake_forgetful_pkg")
    module.__file__ = str(tmp_path / "__init__.py")
    monkeypatch.setitem(sys.modules, "fake_forgetful_pkg", module)
    method = make_method("mine", "voxelmorph.yaml")
    use_entry_points(monkeypatch, FakeEntryPoint("mine", method, value="fake_forgetful_pkg:METHOD"))
    reg = discover(refresh=True)
    assert reg.names() == []
    assert reg.failures == {"mine": f"default config 'voxelmorph.yaml' not found beside {tmp_path} "
                                    "(ship it with the plugin as package data)"}


def test_plugin_with_unknown_train_key_in_yaml_is_a_failure(monkeypatch, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  lr: 0.1\n")
    use_entry_points(monkeypatch, FakeEntryPoint("p", make_method("p", path)))
    assert discover(refresh=True).failures == {"p": f"{path}: train.lr: unknown key"}


def test_invalid_method_fields_fail_at_construction(yaml_file):
    with pytest.raises(ValueError, match=r"^Method.summary must be one non-empty line\."):
        Method(name="x", summary="two\nlines", default_config=yaml_file,
               build_model=lambda c, s: None, build_loss=lambda c: None)
    with pytest.raises(ValueError, match=r"^Method.build_loss must be callable\."):
        Method(name="x", summary="s", default_config=yaml_file,
               build_model=lambda c, s: None, build_loss="mse")


# --------------------------------------------------------------------------------- duplicates
def test_name_claimed_by_two_distributions_names_both(monkeypatch, yaml_file):
    use_entry_points(
        monkeypatch,
        FakeEntryPoint("vm", make_method("vm", yaml_file), dist="tfreg", version="0.1.0"),
        FakeEntryPoint("vm", make_method("vm", yaml_file), dist="vm-fork", version="2.0"),
        FakeEntryPoint("other", make_method("other", yaml_file)),
    )
    reg = discover(refresh=True)
    assert reg.names() == ["other"]
    with pytest.raises(MethodError) as err:
        reg.get("vm")
    assert str(err.value) == ("method 'vm' failed to load: declared by two distributions, "
                              "'tfreg' 0.1.0 and 'vm-fork' 2.0; uninstall one")


def test_same_distribution_seen_twice_is_not_a_duplicate(monkeypatch, yaml_file):
    method = make_method("vm", yaml_file)
    use_entry_points(monkeypatch, FakeEntryPoint("vm", method), FakeEntryPoint("vm", method))
    reg = discover(refresh=True)
    assert reg.failures == {} and reg.names() == ["vm"]


# ------------------------------------------------------------------------------- unknown name
def test_unknown_method_suggests_and_lists(monkeypatch, yaml_file):
    use_entry_points(monkeypatch, *(FakeEntryPoint(n, make_method(n, yaml_file))
                                    for n in ("voxelmorph", "lapirn", "cascade")))
    reg = discover(refresh=True)
    with pytest.raises(MethodError) as err:
        reg.get("voxelmorh")
    assert str(err.value) == ("unknown method 'voxelmorh' (did you mean 'voxelmorph'?); "
                              "available: cascade, lapirn, voxelmorph")
    with pytest.raises(MethodError) as err:
        reg.get("zzz")
    assert str(err.value) == "unknown method 'zzz'; available: cascade, lapirn, voxelmorph"


def test_unknown_method_with_nothing_installed(monkeypatch):
    use_entry_points(monkeypatch)
    with pytest.raises(MethodError) as err:
        discover(refresh=True).get("voxelmorph")
    assert str(err.value) == "unknown method 'voxelmorph'; available: none"


# ------------------------------------------------------------------------------------- stages
def test_default_stage_uses_train_steps_or_epochs(yaml_file):
    method = make_method("m", yaml_file)
    train = dict(TRAIN_DEFAULTS["train"], steps=12)
    assert method.resolve_stages({"train": train}) == [Stage("train", 12)]
    train.update(epochs=3, steps_per_epoch=7)
    assert method.resolve_stages({"train": train}) == [Stage("train", 21)]


def test_custom_stages(yaml_file):
    def stages(config):
        return [Stage("level1", config["n"], outputs=["warped_l1"]), Stage("level2", 4)]

    method = make_method("m", yaml_file, stages=stages)
    got = method.resolve_stages({"n": 5})
    assert got == [Stage("level1", 5, outputs=("warped_l1",)), Stage("level2", 4)]

    bad = make_method("m", yaml_file, stages=lambda config: [("level1", 5)])
    with pytest.raises(MethodError) as err:
        bad.resolve_stages({})
    assert str(err.value) == "method 'm': stages() returned ('level1', 5), expected Stage objects"


def test_stage_validates_steps():
    with pytest.raises(ValueError) as err:
        Stage("s", -1)
    assert str(err.value) == "Stage.steps must be an int >= 0. Received: steps=-1"


# ----------------------------------------------------------------------------- tfreg methods
def test_methods_command_lists_table_and_failures(monkeypatch, yaml_file):
    from tfreg_cli.main import cli

    use_entry_points(
        monkeypatch,
        FakeEntryPoint("vm", make_method("vm", yaml_file), dist="tfreg", version="0.1.0"),
        FakeEntryPoint("toy", make_method("toy", yaml_file), dist="tfreg-toy", version="10.0"),
        FakeEntryPoint("bad", error=ImportError("cannot import name 'x' from 'y'")),
    )
    result = CliRunner().invoke(cli, ["methods"])
    assert result.exit_code == 0, result.output
    assert result.output == (
        "NAME  DESCRIPTION      DISTRIBUTION  VERSION\n"
        "toy   The toy method.  tfreg-toy     10.0\n"
        "vm    The vm method.   tfreg         0.1.0\n"
        "\n"
        "failed to load:\n"
        "  bad: ImportError: cannot import name 'x' from 'y'\n"
    )


def test_methods_command_with_nothing_installed(monkeypatch):
    from tfreg_cli.main import cli

    use_entry_points(monkeypatch)
    result = CliRunner().invoke(cli, ["methods"])
    assert (result.exit_code, result.output) == (0, "no methods installed\n")


def test_methods_help():
    from tfreg_cli.main import cli

    result = CliRunner().invoke(cli, ["methods", "--help"], prog_name="tfreg")
    assert result.exit_code == 0
    assert result.output.startswith("Usage: tfreg methods [OPTIONS]\n")
    assert "entry-point group" in result.output
    listing = CliRunner().invoke(cli, ["--help"])
    assert "List the installed registration methods." in listing.output
