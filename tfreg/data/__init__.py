"""Getting data in: data specs, preprocessing, HDF5 cache, augmentation and the tf.data pipeline.

Public API::

    spec = DataSpec.from_yaml("data.yaml")     # validates keys, files and headers
    spec.validate(deep=True)                    # decodes every volume (NaN/Inf, truncation)
    spec.check_divisible(16)
    ds = make_dataset(spec, "train", batch_size=1, seed=0)
    spec.pairs("val")                           # [Pair(fixed, moving, fixed_labels, moving_labels)]
    record = spec.plan(volume); x = spec.preprocess(volume, record=record)
    record.restore(array); field_to_source(disp, fixed_record, moving_record)

``SPEC_DATA`` is the `tfreg.registry.DataSource` of methods trained on data specs.
The spec format is documented in ``configs/data/README.md``; TensorFlow is imported only by
`make_dataset` and the augmentation.
"""

from tfreg.data.augment import Augmentation
from tfreg.data.cache import VolumeCache, default_cache_dir
from tfreg.data.pipeline import make_dataset
from tfreg.data.preprocess import PrepRecord, Preprocessing, affine_to_source, field_to_source
from tfreg.data.spec import DataSpec, Pair, PairSampler, Scan
from tfreg.data.synth import LabelMapSource


def open_data(path):
    """The data file behind ``--data``: a `LabelMapSource` when the YAML has a ``label_maps:``
    section (pairs synthesised from label maps, `tfreg.data.synth`), else a `DataSpec`."""
    from pathlib import Path

    from tfreg.config import load_yaml
    from tfreg.data.synth import is_label_map_spec

    if is_label_map_spec(load_yaml(path)):
        return LabelMapSource.from_yaml(path)
    return DataSpec.from_yaml(Path(path))
from tfreg.data.spec_data import SPEC_DATA

__all__ = [
    "DataSpec",
    "LabelMapSource",
    "open_data",
    "Pair",
    "Scan",
    "PairSampler",
    "make_dataset",
    "Preprocessing",
    "PrepRecord",
    "field_to_source",
    "affine_to_source",
    "Augmentation",
    "VolumeCache",
    "default_cache_dir",
    "SPEC_DATA",
]
