"""Training pairs synthesised from label maps (a data source any method can train on).

Images of any contrast can be registered by a network that never saw a real image: every step
draws two label maps, deforms each by a random smooth non-folding deformation and synthesises an
image from each with random intensities (the idea of SynthMorph, Hoffmann et al., IEEE TMI 2022).
A data file with a ``label_maps:`` section selects this source (see ``configs/data/synthseg.yaml``)::

    label_maps:
      train: maps/seg_0[1-8].nii.gz      # glob, list or text file, relative to this YAML
      val: [maps/seg_09.nii.gz, maps/seg_10.nii.gz]
      drop_from: 500                     # labels >= this become background (null: keep all)
    shape: [96, 112, 96]                 # maps cropped to their common bounding box, resampled
    deform: {max_disp: 2.5, spacing: 16} # voxels; max_disp < spacing / (2 N): cannot fold
    intensity: {std: 0.05, blur: [0.5, 1.2], bias: 0.3, gamma: 0.25, noise: 0.02}

One element, all in TensorFlow (``tf.data``, stateless random ops), a function of ``(seed, k)``
only:

1. two maps ``i, j`` of the split (uniform, independent; validation: consecutive pairs in order);
2. per map a displacement `tfreg.data.augment.random_disp` (uniform ``+/- max_disp`` voxels at
   control points ``spacing`` voxels apart, linearly interpolated); each partial derivative is
   below ``r = 2 max_disp / spacing``, and ``r < 1 / N`` makes ``I + J`` diagonally dominant at
   every voxel, so the deformation cannot fold; the label map is warped by nearest neighbour;
3. per image: label ``l`` gets a mean ``U(0, 1)`` and a within-label standard deviation
   ``U(0, std)``; Gaussian blur with ``sigma ~ U(blur)`` voxels; gamma, a smooth multiplicative
   bias field and Gaussian noise as `tfreg.data.augment` does; min-max to ``[0, 1]``.

Batches: ``{"fixed", "moving"}`` float32 `(B, *S, 1)` and ``{"fixed_labels", "moving_labels"}``
int32 `(B, *S, 1)` with the original label values, as `tfreg.data.make_dataset` gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tfreg.data import _checks as chk
from tfreg.errors import ConfigError, InputError

__all__ = ["SynthSettings", "LabelMapSource", "load_label_maps", "is_label_map_spec"]

_KEYS = ("label_maps", "shape", "deform", "intensity", "seed")
_MAP_KEYS = ("train", "val", "drop_from")
_DEFORM_KEYS = ("max_disp", "spacing")
_INTENSITY_KEYS = ("std", "blur", "bias", "gamma", "noise")


def is_label_map_spec(data: Mapping[str, Any]) -> bool:
    """Whether a parsed data YAML selects this source (it has a ``label_maps:`` section)."""
    return isinstance(data, Mapping) and "label_maps" in data


@dataclass(frozen=True)
class SynthSettings:
    """Random settings of the synthesis (units: voxels; intensities in [0, 1])."""

    max_disp: float = 2.5
    spacing: float = 16.0
    std: float = 0.05
    blur: tuple[float, float] = (0.5, 1.2)
    bias: float = 0.3
    gamma: float = 0.25
    noise: float = 0.02

    def check(self, shape: Sequence[int], source: str) -> "SynthSettings":
        """Refuse a deformation that could fold on a grid of `shape` (see the module docstring)."""
        from tfreg.data.augment import _control_shape

        ndims = len(shape)
        ctrl = _control_shape(tuple(shape), self.spacing)
        actual = min((n - 1) / (g - 1) for n, g in zip(shape, ctrl))
        if self.max_disp > 0 and not 2 * self.max_disp / actual < 1.0 / ndims:
            raise chk.fail(source, "deform.max_disp", f"must be < {actual / (2 * ndims):.3g} "
                           f"voxels with control points {actual:.3g} voxels apart in {ndims}D "
                           f"(max_disp < spacing / (2 N) cannot fold), got {self.max_disp}")
        if not 0 <= self.blur[0] <= self.blur[1]:
            raise chk.fail(source, "intensity.blur", f"expected [low, high] with 0 <= low <= high, "
                           f"got {list(self.blur)}")
        return self


def _bounding_box(maps: list[np.ndarray]) -> tuple[slice, ...]:
    mask = np.zeros(maps[0].shape, bool)
    for m in maps:
        mask |= m > 0
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


def load_label_maps(paths: Sequence[str | Path], shape: Sequence[int],
                    drop_from: int | None = 500) -> np.ndarray:
    """Label maps of one space brought to `shape`: labels ``>= drop_from`` set to 0, all maps
    cropped to the union bounding box of their labels, resampled by nearest neighbour.

    Args:
        paths: NIfTI label maps with one common grid shape.
        shape: output spatial shape (2D or 3D, as the maps).
        drop_from: label values from this on become background; None keeps all.

    Returns:
        `(len(paths), *shape)` int32.

    Raises:
        InputError: unreadable maps, maps of different shapes or of another rank than `shape`.
    """
    from scipy import ndimage

    from tfreg.io import load_volume

    maps = []
    for path in paths:
        data = load_volume(path, label=True).data
        if data.ndim != len(shape):
            raise InputError(f"{path}: is {data.ndim}D but shape {list(shape)} is "
                             f"{len(shape)}D")
        if maps and data.shape != maps[0].shape:
            raise InputError(f"{path}: shape {list(data.shape)} differs from {paths[0]} "
                             f"{list(maps[0].shape)} (label maps must share one grid)")
        if drop_from is not None:
            data = np.where(data >= drop_from, 0, data)
        maps.append(data.astype(np.int32))
    box = _bounding_box(maps)
    out = np.empty((len(maps), *shape), np.int32)
    for k, m in enumerate(maps):
        crop = m[box]
        coords = [np.linspace(0, n - 1, s) for n, s in zip(crop.shape, shape)]
        grid = np.meshgrid(*coords, indexing="ij")
        out[k] = ndimage.map_coordinates(crop, grid, order=0, mode="nearest")
    return out


class LabelMapSource:
    """The label-map synthesis source (see the module docstring).

    Holds the label maps of both splits in memory (as indices into `values`) and builds
    `tf.data` pipelines of synthesised pairs. Duck-compatible with `tfreg.data.DataSpec` where the
    engine needs it: `shape`, `ndims`, `has_labels`, `source`, `check_divisible`, `validate`,
    `pair_indices`, `preprocessing`, `summary`.

    Args:
        maps: ``{"train": (n, *S) int32, "val": (m, *S) int32}`` label maps (original values).
        settings: random settings.
        source: name for messages (the YAML path).
        seed: base seed added to the engine's seed.
    """

    has_labels = True

    def __init__(self, maps: Mapping[str, np.ndarray], settings: SynthSettings,
                 source: str = "label maps", seed: int = 0):
        shapes = {tuple(m.shape[1:]) for m in maps.values()}
        if len(shapes) != 1:
            raise ConfigError(f"{source}: label maps of the splits differ in shape {shapes}")
        self.shape = shapes.pop()
        self.source = source
        self.settings = settings.check(self.shape, source)
        self.seed = int(seed)
        values = np.unique(np.concatenate([np.unique(m) for m in maps.values()]))
        self.values = np.union1d(values, [0]).astype(np.int32)
        self.maps = {split: np.searchsorted(self.values, m).astype(np.int32)
                     for split, m in maps.items()}
        self.notes: list[str] = []

    # ------------------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base_dir: str | Path = ".",
                  source: str = "<dict>") -> "LabelMapSource":
        """Parse and load a ``label_maps:`` data file (every problem one line naming the key)."""
        from tfreg.data.sources import resolve_paths

        chk.check_keys(d, _KEYS, source, "")
        base = Path(base_dir)
        section = chk.mapping(d["label_maps"], source, "label_maps")
        chk.check_keys(section, _MAP_KEYS, source, "label_maps.")
        if "train" not in section:
            raise chk.fail(source, "label_maps.train", "missing (the label maps to train on)")
        if "shape" not in d:
            raise chk.fail(source, "shape", "missing (the network input shape, e.g. [96, 112, 96])")
        shape = tuple(chk.int_list(d["shape"], source, "shape"))
        if any(n < 8 for n in shape):
            raise chk.fail(source, "shape", f"every size must be >= 8, got {list(shape)}")
        drop = section.get("drop_from", 500)
        if drop is not None:
            drop = chk.integer(drop, source, "label_maps.drop_from", low=1)
        paths = {split: resolve_paths(section[split], base, source, f"label_maps.{split}")
                 for split in ("train", "val") if section.get(split) is not None}
        for split, items in paths.items():
            for path in items:
                if not Path(path).is_file():
                    raise InputError(f"{path}: file not found (named by {source}: "
                                     f"label_maps.{split})")
        deform = chk.mapping(d.get("deform") or {}, source, "deform")
        chk.check_keys(deform, _DEFORM_KEYS, source, "deform.")
        inten = chk.mapping(d.get("intensity") or {}, source, "intensity")
        chk.check_keys(inten, _INTENSITY_KEYS, source, "intensity.")
        defaults = SynthSettings()
        values: dict[str, Any] = {}
        for key in _DEFORM_KEYS:
            if key in deform:
                values[key] = chk.number(deform[key], source, f"deform.{key}", low=0.0)
        for key in ("std", "bias", "gamma", "noise"):
            if key in inten:
                values[key] = chk.number(inten[key], source, f"intensity.{key}", low=0.0)
        if "blur" in inten:
            blur = inten["blur"]
            blur = [blur, blur] if isinstance(blur, (int, float)) and not isinstance(blur, bool) \
                else chk.number_list(blur, source, "intensity.blur", lengths=(2,))
            values["blur"] = (float(blur[0]), float(blur[1]))
        settings = SynthSettings(**{**defaults.__dict__, **values})
        if settings.spacing < 2:
            raise chk.fail(source, "deform.spacing", f"expected >= 2 voxels, got {settings.spacing}")
        all_paths = [p for items in paths.values() for p in items]
        stack = load_label_maps(all_paths, shape, drop)
        maps, start = {}, 0
        for split, items in paths.items():
            maps[split] = stack[start:start + len(items)]
            start += len(items)
        seed = chk.integer(d.get("seed", 0), source, "seed", low=0)
        return cls(maps, settings, source, seed)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "LabelMapSource":
        from tfreg.config import load_yaml

        path = Path(path)
        return cls.from_dict(load_yaml(path), path.parent, str(path))

    # ------------------------------------------------------------------ DataSpec-like queries
    @property
    def ndims(self) -> int:
        return len(self.shape)

    @property
    def preprocessing(self):
        """Inference preprocessing of models trained here (`tfreg.data.Preprocessing`): images
        cropped/padded to `shape`, min-max scaled to [0, 1] as the synthesised ones are."""
        from tfreg.data.preprocess import Preprocessing

        return Preprocessing.from_dict({"normalize": "minmax", "shape": list(self.shape)},
                                       source=self.source)

    def summary(self) -> str:
        counts = ", ".join(f"{len(m)} {split}" for split, m in self.maps.items())
        return (f"{self.source}: label-map synthesis, {counts} maps, shape "
                f"{'x'.join(map(str, self.shape))}, {len(self.values) - 1} labels")

    def check_divisible(self, n: int) -> None:
        if any(s % n for s in self.shape):
            raise chk.fail(self.source, "shape", f"{list(self.shape)} is not divisible by {n}, "
                           "which the method needs")

    def validate(self, deep: bool = False, workers: int | None = None) -> int:
        """Everything was checked while loading; returns the number of maps."""
        return sum(len(m) for m in self.maps.values())

    def pair_indices(self, split: str = "train") -> list[tuple[int, int]]:
        """Map pairs of a split in order: ``(k, k + 1)`` cyclically (validation pairs)."""
        n = len(self.maps.get(split, ()))
        if n < 2:
            return [(0, 0)] if n == 1 else []
        return [(k, (k + 1) % n) for k in range(n)]

    # ------------------------------------------------------------------------------ synthesis
    def dataset(self, split: str = "train", batch_size: int = 1, seed: int = 0,
                shuffle: bool = True, repeat: bool = True, input_context: Any = None):
        """`tf.data.Dataset` of synthesised pair batches (see the module docstring).

        `shuffle`: random map pairs (else the split's `pair_indices` in order); `repeat`:
        endless (else one pass over `pair_indices`).
        """
        import tensorflow as tf

        if split not in self.maps:
            raise ConfigError(f"{self.source}: no label maps for split '{split}' "
                              f"(label_maps.{split})")
        maps = tf.constant(self.maps[split])
        values = tf.constant(self.values)
        pairs = tf.constant(np.asarray(self.pair_indices(split), np.int32).reshape(-1, 2))
        base = tf.constant([(int(seed) + self.seed) % (2**31), 0x5E7], tf.int64)
        n_maps = len(self.maps[split])

        @tf.autograph.experimental.do_not_convert  # plain graph code; autograph costs ~10x trace
        def element(k):
            key = tf.random.experimental.stateless_fold_in(base, k)
            seeds = tf.random.experimental.stateless_split(key, 3)
            if shuffle:
                ij = tf.random.stateless_uniform((2,), seeds[0], 0, n_maps, dtype=tf.int32)
            else:
                ij = pairs[k % tf.shape(pairs, out_type=tf.int64)[0]]
            out = {}
            for n, role in enumerate(("fixed", "moving")):
                image, labels = self.synthesize(tf.gather(maps, ij[n]), values, seeds[n + 1])
                out[role], out[f"{role}_labels"] = image, labels
            return out

        count = 2**62 if repeat else len(self.pair_indices(split))
        ds = tf.data.Dataset.range(count)
        if input_context is not None and input_context.num_input_pipelines > 1:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch_size, drop_remainder=repeat).prefetch(tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.deterministic = True
        if input_context is not None:
            options.experimental_distribute.auto_shard_policy = \
                tf.data.experimental.AutoShardPolicy.OFF
        return ds.with_options(options)

    def deformation(self, seed):
        """The random displacement `(1, *S, N)` (voxels, pull) for a `(2,)` stateless seed."""
        from tfreg.data.augment import Augmentation, random_disp

        aug = Augmentation(max_disp=self.settings.max_disp, spacing=self.settings.spacing)
        return random_disp(self.shape, aug, seed)

    def synthesize(self, index_map, values, seed):
        """One image from one map of label indices `(*S,)`: ``(image (*S, 1) float32 in [0, 1],
        labels (*S, 1) int32)`` (original label values, deformed like the image)."""
        import tensorflow as tf

        from tfreg.data.augment import Augmentation, augment_scan
        from tfreg.layers import warp

        s = self.settings
        seeds = tf.random.experimental.stateless_split(seed, 6)
        index = index_map[None, ..., None]
        if s.max_disp > 0:
            index = warp(index, self.deformation(seeds[0]), interp="nearest")
        index = tf.cast(index[0], tf.int32)
        k = int(self.values.size)
        means = tf.random.stateless_uniform((k,), seeds[1])
        stds = tf.random.stateless_uniform((k,), seeds[2], 0.0, s.std)
        image = tf.gather(means, index) + tf.gather(stds, index) * \
            tf.random.stateless_normal(tf.shape(index), seeds[3])
        sigma = tf.random.stateless_uniform((), seeds[4], s.blur[0], s.blur[1] + 1e-6)
        image = gaussian_blur(image[None], sigma, radius=int(math.ceil(2.5 * s.blur[1])))[0]
        if s.gamma or s.bias or s.noise:
            aug = Augmentation(gamma=s.gamma, bias=s.bias, noise=s.noise)
            image, _ = augment_scan(image, None, aug, seeds[5])
        lo, hi = tf.reduce_min(image), tf.reduce_max(image)
        image = (image - lo) / tf.maximum(hi - lo, 1e-6)
        return image, tf.gather(values, index)


def gaussian_blur(x, sigma, radius: int):
    """Separable Gaussian blur of `(B, *S, C)` with a tensor `sigma` (voxels) and a fixed kernel
    `radius`; nearest-border padding. ``sigma`` near 0 leaves `x` unchanged."""
    import tensorflow as tf

    if radius < 1:
        return x
    t = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(t / tf.maximum(sigma, 1e-3)))
    kernel = kernel / tf.reduce_sum(kernel)
    ndims = len(x.shape) - 2
    for d in range(ndims):
        axis = d + 1
        n = x.shape[axis]
        first = tf.gather(x, [0], axis=axis)
        last = tf.gather(x, [n - 1], axis=axis)
        padded = tf.concat([first] * radius + [x] + [last] * radius, axis=axis)
        index = [slice(None)] * (ndims + 2)
        out = 0.0
        for i in range(2 * radius + 1):
            index[axis] = slice(i, i + n)
            out = out + kernel[i] * padded[tuple(index)]
        x = out
    return x
