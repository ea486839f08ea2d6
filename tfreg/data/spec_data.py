"""tfreg's own data source for methods: ``--data`` is a data spec YAML (NIfTI pairs).

`SPEC_DATA` is the `tfreg.registry.DataSource` a method gets by default (and that tfreg's own
methods name explicitly): the spec is read and every volume decoded before training
(`DataSpec.validate(deep=True)`), batches come from `make_dataset`, validation is the mean Dice of
warped label maps (`tfreg.data.validation.ValDice`, when the spec has labels and a ``val``
split), and the spec's ``preprocessing:`` section is the inference record that export stores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tfreg.registry import DataSource, ModelIO

__all__ = ["SPEC_DATA", "open_spec", "spec_dataset"]


def open_spec(path: Path, config: dict, divisible_by: int):
    """Read the spec (a `DataSpec`, or a `LabelMapSource` when the YAML has a ``label_maps:``
    section), refuse a shape that does not divide by `divisible_by` (before any image is
    decoded), then decode every volume (`ConfigError`/`InputError` naming the file)."""
    from tfreg.data import open_data

    spec = open_data(path)
    spec.check_divisible(divisible_by)
    spec.validate(deep=True)
    return spec


def spec_dataset(spec, config: dict, *, split: str, batch_size: int, seed: int, shuffle: bool,
                 repeat: bool, input_context: Any = None):
    """`tfreg.data.make_dataset`: ``{"fixed", "moving"[, "fixed_labels", "moving_labels"]}``."""
    from tfreg.data.pipeline import make_dataset

    return make_dataset(spec, split=split, batch_size=batch_size, seed=seed, shuffle=shuffle,
                        repeat=repeat, input_context=input_context)


def _inshape(spec) -> tuple[int, ...]:
    return tuple(int(s) for s in spec.shape)


def _preprocessing(spec) -> dict | None:
    return spec.preprocessing.to_dict()


def _validation(spec, config: dict, io: ModelIO):
    from tfreg.data.validation import ValDice

    return ValDice.create(spec, int(config["train"]["val_pairs"]), io, config)


SPEC_DATA = DataSource(
    open=open_spec,
    dataset=spec_dataset,
    inshape=_inshape,
    preprocessing=_preprocessing,
    validation=_validation,
    describe="a tfreg data spec YAML (NIfTI images, labels, pairing, preprocessing)",
)
