"""tf.data pipeline of registration pairs.

Element index ``k`` -> `PairSampler` -> two scans loaded (through the HDF5 cache when the spec
has one) and preprocessed in parallel (``num_parallel_calls``) -> optional augmentation ->
batch -> prefetch. The result is deterministic for a seed: the pair, and the augmentation's
random numbers, depend only on ``(seed, k)``; parallel maps keep their order.

Distribution: with ``strategy.distribute_datasets_from_function(fn)``, ``fn(input_context)``
should call ``make_dataset(spec, batch_size=input_context.get_per_replica_batch_size(global),
input_context=input_context)``. `batch_size` is always the batch of the dataset returned (per
replica in that case); the element indices are sharded
``shard(num_input_pipelines, input_pipeline_id)`` before any file is read, so each worker
loads only its own share and no element is seen twice within a pass.
"""

from __future__ import annotations

from typing import Any

from tfreg.data.spec import DataSpec
from tfreg.errors import ConfigError

__all__ = ["make_dataset"]

#: length of a repeated dataset (effectively endless; elements are computed from their index).
_FOREVER = 2**62


def make_dataset(spec: DataSpec, split: str = "train", batch_size: int = 1, seed: int = 0,
                 shuffle: bool = True, repeat: bool = True, input_context: Any = None,
                 num_parallel_calls: int | None = None):
    """Batches of registration pairs.

    Args:
        spec: a validated `DataSpec`.
        split: ``"train"``, ``"val"`` or ``"test"``.
        batch_size: batch of the returned dataset (per replica under
            ``distribute_datasets_from_function``, see the module docstring).
        seed: pairs (with `shuffle`) and augmentation are a function of ``(seed, index)``.
        shuffle: random pairs, epoch by epoch (see `PairSampler`); False: the split's fixed pair
            list `spec.pairs(split)` in order.
        repeat: endless, with full batches only; False: one pass, the last batch may be smaller.
        input_context: `tf.distribute.InputContext` or None.
        num_parallel_calls: parallel loads (default ``tf.data.AUTOTUNE``).

    Returns:
        `tf.data.Dataset` of dicts ``{"fixed": float32 (B, *S, 1), "moving": float32 (B, *S, 1)}``
        plus ``"fixed_labels"``, ``"moving_labels"`` int32 `(B, *S, 1)` when the spec has labels.

    Raises:
        ConfigError: unknown split, or a split without pairs.
    """
    import tensorflow as tf

    from tfreg.data.synth import LabelMapSource

    if isinstance(spec, LabelMapSource):  # pairs synthesised from label maps
        return spec.dataset(split, batch_size=batch_size, seed=seed, shuffle=shuffle,
                            repeat=repeat, input_context=input_context)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{spec.source}: batch size must be a positive integer, got "
                          f"{batch_size!r}")
    sampler = spec.sampler(split, shuffle=shuffle, seed=seed)
    if len(sampler) == 0:
        hint = (" (without a split: section every scan is in 'train')" if split != "train" else
                " (scan-to-scan needs two scans of one group)")
        raise ConfigError(f"{spec.source}: split '{split}' has no pairs{hint}")
    shape = tuple(spec.shape)
    labels = spec.has_labels
    augmentation = spec.augmentation
    calls = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls

    def load(k: Any) -> list:
        fixed, moving = sampler(int(k))
        f_img, f_lab = spec.load_scan(fixed)
        m_img, m_lab = spec.load_scan(moving)
        out = [f_img[..., None], m_img[..., None]]
        if labels:
            out += [f_lab[..., None], m_lab[..., None]]
        return out

    types = [tf.float32, tf.float32] + ([tf.int32, tf.int32] if labels else [])
    base_seed = tf.constant([int(seed) % (2**31), 0x5EED], tf.int64)

    def element(k: tf.Tensor) -> dict[str, tf.Tensor]:
        arrays = tf.numpy_function(load, [k], types, stateful=False)
        for array in arrays:
            array.set_shape((*shape, 1))
        out = {"fixed": arrays[0], "moving": arrays[1]}
        if labels:
            out["fixed_labels"], out["moving_labels"] = arrays[2], arrays[3]
        if augmentation is not None:
            from tfreg.data.augment import augment_scan

            seeds = tf.random.experimental.stateless_split(
                tf.random.experimental.stateless_fold_in(base_seed, k), 2)
            roles = ("fixed", "moving") if augmentation.apply_to == "both" else ("moving",)
            for n, role in enumerate(roles):
                image, lab = augment_scan(out[role], out.get(f"{role}_labels"), augmentation,
                                          seeds[n])
                out[role] = image
                if labels:
                    out[f"{role}_labels"] = lab
        return out

    dataset = tf.data.Dataset.range(_FOREVER if repeat else len(sampler))
    if input_context is not None and input_context.num_input_pipelines > 1:
        dataset = dataset.shard(input_context.num_input_pipelines,
                                input_context.input_pipeline_id)
    dataset = dataset.map(element, num_parallel_calls=calls, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=repeat)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    if input_context is not None:
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)
