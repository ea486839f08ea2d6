"""Quicksilver's data source: tfreg's data spec, the optimised LDDMM momentum of every training
pair as target, and random patches.

`open`: the spec is read and checked by tfreg (`tfreg.data.spec_data.open_spec`); every axis
must hold a patch; the momenta of the ``train`` pairs are optimised once
(`targets.optimise_targets`) and cached as HDF5 (``targets.cache``, default
``$TFREG_CACHE_DIR/../quicksilver``), reused while the files and settings are unchanged.

`dataset`: element ``k`` is one training pair drawn with replacement and
``schedule.patches_per_pair`` patch starts drawn with replacement among the starts of the
``schedule.train_stride`` grid whose patch holds a non-zero voxel of either image
(`patches.foreground_starts`): ``{"moving", "fixed"}``
`(*S, 1)`, ``"momentum"`` `(*S, N)` (the target) and ``"starts"`` `(K, N)` int32. The model cuts
the patches (`layers.GatherPatches`). The correction stage's data (`model.prepare_correction`,
once per training pair when the stage starts) replaces ``"momentum"`` by ``"residual"``
`(*S, N)` (target minus the trained prediction network's momentum) and adds ``"fixed_back"``
`(*S, 1)` (the fixed image warped back by the shot prediction), the original's precomputed
inputs of the correction network.

Validation (Dice of warped label maps on the ``val`` pairs) and the inference preprocessing
record are tfreg's (`tfreg.data.SPEC_DATA`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfreg.data import SPEC_DATA, DataSpec
from tfreg.data.cache import default_cache_dir
from tfreg.data.spec_data import open_spec
from tfreg.errors import ConfigError
from tfreg.registry import DataSource

from . import patches, targets

__all__ = ["QuicksilverData", "QUICKSILVER_DATA", "lddmm_config", "open_data"]


@dataclass
class QuicksilverData:
    """What ``--data`` opened to: the spec, the training pairs' preprocessed images
    `(P, *S)` and their optimised momenta `(P, *S, N)`, the foreground patch starts of each
    pair, and how many momenta were reused from the cache. The correction stage's data has
    `residual` `(P, *S, N)` and `fixed_back` `(P, *S)` too, and no `momentum`."""

    spec: DataSpec
    fixed: np.ndarray
    moving: np.ndarray
    momentum: np.ndarray | None
    starts: list[np.ndarray]
    counts: dict
    cache_dir: Path
    notes: list[str] = field(default_factory=list)
    residual: np.ndarray | None = None
    fixed_back: np.ndarray | None = None


def lddmm_config(config: dict):
    """`tfreg.ops.lddmm.LddmmConfig` of the target optimisation from the ``lddmm:`` section."""
    from tfreg.ops.lddmm import LddmmConfig

    s = config["lddmm"]
    return LddmmConfig(alpha=s["alpha"], beta=s["beta"], gamma=s["gamma"], power=s["power"],
                       sigma=s["sigma"], steps=s["steps"],
                       inverse_iterations=s["inverse_iterations"], iterations=s["iterations"],
                       optimizer=s["optimizer"], step_size=s["step_size"],
                       learning_rate=s["learning_rate"], jit=s["jit"])


def _cache_dir(config: dict) -> Path:
    given = config["targets"]["cache"]
    return Path(given).expanduser() if given else default_cache_dir().parent / "quicksilver"


def open_data(path: Path, config: dict, divisible_by: int) -> QuicksilverData:
    """Check the settings, read the spec, check it suits patches, optimise (or reuse) the
    training momenta."""
    from .model import check_settings

    check_settings(config)
    spec = open_spec(path, config, divisible_by)
    if not isinstance(spec, DataSpec):
        raise ConfigError(f"{path}: quicksilver trains on image pairs and their optimised "
                          "momenta; a label_maps: (synthesis) spec is not supported")
    patch = int(config["model"]["patch"])
    if min(spec.shape) < patch:
        raise ConfigError(f"{spec.source}: shape: {list(spec.shape)} has an axis shorter than "
                          f"the {patch}-voxel patch (model.patch)")
    pairs = spec.pair_indices("train")
    if not pairs:
        raise ConfigError(f"{spec.source}: split 'train' has no pairs")
    images = {i: spec.load_scan(i)[0] for i in sorted({i for p in pairs for i in p})}
    items = [targets.TargetPair(str(spec.scans[f].image), str(spec.scans[m].image),
                                images[f], images[m]) for f, m in pairs]
    cache_dir = _cache_dir(config)
    settings = {"preprocessing": spec.preprocessing.to_dict(), "shape": list(spec.shape)}
    momenta, counts = targets.optimise_targets(items, lddmm_config(config), settings,
                                               targets.MomentumCache(cache_dir))
    fixed = np.stack([p.fixed for p in items]).astype(np.float32)
    moving = np.stack([p.moving for p in items]).astype(np.float32)
    stride = int(config["schedule"]["train_stride"])
    starts = [patches.foreground_starts(p.moving, p.fixed, patch, stride) for p in items]
    empty = [i for i, s in enumerate(starts) if len(s) == 0]
    if empty:
        f, m = pairs[empty[0]]
        raise ConfigError(f"{spec.source}: pair {spec.scans[f].image} / {spec.scans[m].image}: "
                          "both images are zero everywhere (no patch to train on)")
    notes = [*getattr(spec, "notes", []),
             f"momentum targets: {counts['optimised']} optimised, {counts['reused']} reused "
             f"from {cache_dir}"]
    return QuicksilverData(spec, fixed, moving, np.stack(momenta), starts, counts, cache_dir,
                           notes)


def _dataset(data: QuicksilverData, config: dict, *, split: str, batch_size: int, seed: int,
             shuffle: bool, repeat: bool, input_context=None) -> tf.data.Dataset:
    """Random training elements (see the module docstring); `split` other than train has no
    patch data (validation uses the spec's pairs)."""
    if split != "train":
        raise ConfigError(f"{data.spec.source}: quicksilver draws patches from the train split "
                          f"only, not '{split}'")
    k = int(config["schedule"]["patches_per_pair"])
    volumes = {"fixed": data.fixed[..., None], "moving": data.moving[..., None]}
    if data.residual is not None:       # the correction stage (`model.prepare_correction`)
        volumes.update(residual=data.residual, fixed_back=data.fixed_back[..., None])
    else:
        volumes["momentum"] = data.momentum
    volumes = {key: tf.constant(value) for key, value in volumes.items()}
    counts = np.array([len(s) for s in data.starts], np.int64)
    offsets = tf.constant(np.concatenate([[0], np.cumsum(counts)[:-1]]), tf.int64)
    counts_t = tf.constant(counts)
    all_starts = tf.constant(np.concatenate(data.starts))
    n = len(counts)

    def sample(index):
        seeds = tf.stack([tf.cast(seed, tf.int64), index])
        pair = tf.random.stateless_uniform([], seeds, 0, n, tf.int64)
        picks = tf.random.stateless_uniform([k], seeds + 1, 0, 2**62, tf.int64) % counts_t[pair]
        element = {key: tf.gather(value, pair) for key, value in volumes.items()}
        element["starts"] = tf.gather(all_starts, offsets[pair] + picks)
        return element

    ds = tf.data.Dataset.range(2**62 if repeat else n)
    if input_context is not None:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return ds.map(sample).batch(batch_size, drop_remainder=repeat).prefetch(1)


QUICKSILVER_DATA = DataSource(
    open=open_data,
    dataset=_dataset,
    inshape=lambda data: SPEC_DATA.inshape(data.spec),
    preprocessing=lambda data: SPEC_DATA.preprocessing(data.spec),
    validation=lambda data, config, io: SPEC_DATA.validation(data.spec, config, io),
    describe="a tfreg data spec YAML; the train pairs' LDDMM momenta are optimised and cached",
)
