"""One validation vocabulary (tfreg.validation): declared config sections with ranges and
choices, "expected X, got Y" messages, did-you-mean, and renamed keys with a deprecation hint."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from tfreg.config import method_defaults, parse_set, resolve
from tfreg.errors import ConfigError
from tfreg.registry import discover
from tfreg.validation import check_section, choice, integer, number, rename_keys


@dataclass(frozen=True)
class Loss:
    image: str = choice("mse", ("mse", "ncc"))
    smooth_weight: float | None = number(None, low=0.0, nullable=True)
    ncc_window: int = integer(9, low=1)
    sigma: float = number(1.0, low=0.0, low_open=True)


@pytest.mark.parametrize("values, message", [
    ({"image": "nc"}, "cfg.yaml: loss.image: expected one of mse, ncc, got 'nc'"),
    ({"smooth_weight": -1}, "cfg.yaml: loss.smooth_weight: expected null or a number >= 0, got -1"),
    ({"ncc_window": 0}, "cfg.yaml: loss.ncc_window: expected an integer >= 1, got 0"),
    ({"ncc_window": 9.5}, "cfg.yaml: loss.ncc_window: expected an integer >= 1, got 9.5"),
    ({"sigma": 0}, "cfg.yaml: loss.sigma: expected a number > 0, got 0"),
    ({"smooth_wieght": 1}, "cfg.yaml: loss.smooth_wieght: unknown key (did you mean "
                           "'smooth_weight'?)"),
])
def test_section_checks_speak_one_vocabulary(values, message):
    with pytest.raises(ConfigError) as err:
        check_section(Loss, values, "loss", "cfg.yaml")
    assert str(err.value) == message


def test_section_defaults_and_values():
    loss = check_section(Loss, {"image": "ncc", "smooth_weight": 2}, "loss")
    assert (loss.image, loss.smooth_weight, loss.ncc_window, loss.sigma) == ("ncc", 2, 9, 1.0)


def test_rename_keys_in_files_and_overrides():
    notes = []
    nested = rename_keys({"loss": {"lambda": 0.5, "image": "ncc"}},
                         {"loss.lambda": "loss.smooth_weight"}, "my.yaml", notes)
    assert nested == {"loss": {"image": "ncc", "smooth_weight": 0.5}}
    flat = rename_keys(parse_set(["loss.lambda=2"]), {"loss.lambda": "loss.smooth_weight"},
                       "overrides", notes)
    assert dict(flat) == {"loss.smooth_weight": 2}
    assert notes == ["my.yaml: loss.lambda is deprecated, use loss.smooth_weight",
                     "--set loss.lambda=2: loss.lambda is deprecated, use loss.smooth_weight"]
    with pytest.raises(ConfigError) as err:
        rename_keys({"loss": {"lambda": 1, "smooth_weight": 2}},
                    {"loss.lambda": "loss.smooth_weight"}, "my.yaml")
    assert str(err.value) == ("my.yaml: loss.lambda: renamed to loss.smooth_weight; give only "
                              "loss.smooth_weight")


@pytest.mark.parametrize("name, old", [("voxelmorph", "lambda"), ("lapirn", "smooth"),
                                       ("cascade", "reg_weight")])
def test_builtins_use_one_name_for_the_smoothness_weight(name, old):
    """Every built-in calls it loss.smooth_weight; its old name still resolves to it."""
    method = discover().get(name).method
    defaults = method_defaults(method)
    assert "smooth_weight" in defaults["loss"] and old not in defaults["loss"]
    notes = []
    config = resolve(defaults, None, parse_set([f"loss.{old}=0.25"]), renamed=method.renamed,
                     notes=notes)
    assert config["loss"]["smooth_weight"] == 0.25
    assert notes == [f"--set loss.{old}=0.25: loss.{old} is deprecated, use loss.smooth_weight"]
    method.check_config(config)


def test_train_refuses_a_value_out_of_range_before_reading_data(tmp_path):
    from tfreg_cli.main import cli

    spec = tmp_path / "missing-images.yaml"
    spec.write_text("images: nowhere/*.nii.gz\n")
    result = CliRunner().invoke(cli, ["train", "cascade", "--data", str(spec), "--set",
                                      "loss.similarity=lncc", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: config: loss.similarity: expected one of gncc, ncc, "
                                     "got 'lncc'")
