"""Training batches for AVSM: tfreg's data pipeline, doubled as ``[(s, t); (t, s)]`` when
``loss.symmetric`` is set (the symmetry and inverse-consistency losses compare the halves)."""
from __future__ import annotations

import dataclasses

from tfreg.data import SPEC_DATA, make_dataset

from .losses import symmetric_batch

__all__ = ["symmetric_pipeline", "SYMMETRIC_DATA"]


def symmetric_pipeline(spec, *, split="train", batch_size=1, seed=0, shuffle=True, repeat=True,
                       input_context=None, symmetric: bool = True):
    """`tfreg.data.make_dataset`, each batch followed by its swapped copy (2x the batch)."""
    dataset = make_dataset(spec, split=split, batch_size=batch_size, seed=seed, shuffle=shuffle,
                           repeat=repeat, input_context=input_context)
    return dataset.map(symmetric_batch) if symmetric else dataset


def _dataset(spec, config: dict, *, split: str, batch_size: int, seed: int, shuffle: bool,
             repeat: bool, input_context=None):
    """`symmetric_pipeline`, doubled when the config's ``loss.symmetric`` is true."""
    symmetric = bool((config.get("loss") or {}).get("symmetric", True))
    return symmetric_pipeline(spec, split=split, batch_size=batch_size, seed=seed,
                              shuffle=shuffle, repeat=repeat, input_context=input_context,
                              symmetric=symmetric)


#: tfreg's data spec source (validation, checks, preprocessing record) with symmetric batches.
SYMMETRIC_DATA = dataclasses.replace(SPEC_DATA, dataset=_dataset)
