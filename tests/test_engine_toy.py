"""A tiny registration method and in-memory data used by the engine tests (importable helpers),
plus sanity tests of the toy itself.

The toy network: ``concat(fixed, moving) -> Conv(4, relu) 'enc' -> Conv(ndims) 'flow' -> disp``,
``warped = warp(moving, disp)``; a second head ``'aux'`` predicts ``disp_aux`` from ``enc`` so that
stages can train different outputs. Loss terms: ``sim`` = MSE(fixed, warped) (when ``warped`` is an
output of the stage), ``smooth`` = 0.01 * Grad(l2) of the stage's field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tfreg.config import TRAIN_DEFAULTS
from tfreg.layers import SpatialTransformer
from tfreg.losses import MSE, Grad
from tfreg.registry import DataSource, LoadedMethod, Method, ModelIO, Stage

TOY_YAML = "toy.yaml"  # never read: configs are built by toy_config()


@dataclass(frozen=True)
class ToySpec:
    """Stand-in for a data spec: `n` smooth random subjects of spatial `shape`."""

    shape: tuple[int, ...] = (16, 16, 16)
    n: int = 8


def toy_images(spec: ToySpec) -> np.ndarray:
    """`(n, *shape, 1)` float32 smooth blobs in [0, 1], fixed for a given spec."""
    rng = np.random.default_rng(1234)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in spec.shape], indexing="ij")
    out = []
    for _ in range(spec.n):
        centre = rng.uniform(-0.3, 0.3, size=len(spec.shape))
        radius = rng.uniform(0.3, 0.6)
        dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
        out.append(np.exp(-dist2 / (2 * radius**2)))
    return np.stack(out)[..., None].astype("float32")


def toy_pipeline(spec: ToySpec, split: str = "train", batch_size: int = 1, seed: int = 0,
                 shuffle: bool = True, repeat: bool = True, input_context=None) -> tf.data.Dataset:
    """Pairs (i, i+1 mod n) of `toy_images`, shuffled by `seed`, sharded per input pipeline."""
    images = toy_images(spec)
    fixed = images
    moving = np.roll(images, -1, axis=0)
    ds = tf.data.Dataset.from_tensor_slices({"fixed": fixed, "moving": moving})
    if input_context is not None and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if shuffle:
        ds = ds.shuffle(spec.n, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=True).prefetch(2)


#: The toy's data source: `data` is a `ToySpec` (no file is read).
TOY_DATA = DataSource(
    open=lambda path, config, divisor: ToySpec(),
    dataset=lambda data, config, **kwargs: toy_pipeline(data, **kwargs),
)


def build_toy_model(config: dict, inshape: tuple[int, ...]) -> keras.Model:
    ndims = len(inshape)
    conv = keras.layers.Conv3D if ndims == 3 else keras.layers.Conv2D
    fixed = keras.Input((*inshape, 1), name="fixed")
    moving = keras.Input((*inshape, 1), name="moving")
    x = keras.layers.Concatenate(name="concat")([moving, fixed])
    # explicit seeds: the initial weights do not depend on the global random state
    x = conv(4, 3, padding="same", activation="relu", name="enc",
             kernel_initializer=keras.initializers.GlorotUniform(seed=1))(x)
    # field heads compute in float32 under mixed precision (the engine refuses anything else)
    disp = conv(ndims, 3, padding="same", name="flow", dtype="float32",
                kernel_initializer=keras.initializers.RandomNormal(stddev=1e-2, seed=2))(x)
    disp_aux = conv(ndims, 3, padding="same", name="aux", dtype="float32",
                    kernel_initializer=keras.initializers.RandomNormal(stddev=1e-2, seed=3))(x)
    disp = keras.layers.Activation("linear", dtype="float32", name="disp")(disp)
    disp_aux = keras.layers.Activation("linear", dtype="float32", name="disp_aux")(disp_aux)
    warped = SpatialTransformer(name="transformer", dtype="float32")([moving, disp])
    return keras.Model({"fixed": fixed, "moving": moving},
                       {"warped": warped, "disp": disp, "disp_aux": disp_aux}, name="toy")


def build_toy_loss(config: dict):
    mse, grad = MSE(), Grad("l2")

    def loss_fn(batch: dict, outputs: dict, ctx) -> dict:
        terms = {}
        if "warped" in outputs:
            terms["sim"] = mse(batch["fixed"], outputs["warped"])
        field = outputs["disp"] if "disp" in outputs else outputs["disp_aux"]
        terms["smooth"] = 0.01 * grad(None, field)
        return terms

    return loss_fn


def toy_stages(config: dict) -> list[Stage]:
    """Two stages: ``aux`` (only the aux head, 'enc' frozen for its first step), then ``main``."""
    steps = config["train"]["steps"]
    return [Stage("aux", steps, outputs=("disp_aux",), learning_rate=1e-2, frozen=("enc",),
                  freeze_steps=1),
            Stage("main", steps)]


def toy_method(staged: bool = False) -> LoadedMethod:
    """The toy as a discovered method (distribution 'tfreg-tests')."""
    method = Method(name="toy", summary="Tiny test network.", default_config=str(TOY_YAML),
                    build_model=build_toy_model, build_loss=build_toy_loss,
                    stages=toy_stages if staged else None, data=TOY_DATA,
                    io=ModelIO(fields=("disp", "disp_aux")))
    return LoadedMethod(method, "tfreg-tests", "0")


def toy_config(**train) -> dict:
    """A resolved-looking config: `TRAIN_DEFAULTS` with `train` overrides, quiet logging."""
    config = {"method": "toy", "data": None, **copy.deepcopy(TRAIN_DEFAULTS)}
    config["train"].update({"steps": 4, "learning_rate": 1e-3, "log_every": 1, "image_every": 2,
                            "checkpoint_every": 2})
    config["train"].update(train)
    return config


def test_toy_pipeline_batches_and_shards():
    spec = ToySpec(shape=(8, 8), n=4)
    batch = next(iter(toy_pipeline(spec, batch_size=2, shuffle=False)))
    assert batch["fixed"].shape == (2, 8, 8, 1) and batch["moving"].shape == (2, 8, 8, 1)
    images = toy_images(spec)
    np.testing.assert_array_equal(batch["moving"][0], images[1])  # moving = next subject

    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1,
                                     num_replicas_in_sync=2)
    shard = list(toy_pipeline(spec, batch_size=1, shuffle=False, repeat=False, input_context=ctx))
    assert len(shard) == 2
    np.testing.assert_array_equal(shard[0]["fixed"][0], images[1])


def test_toy_model_outputs():
    model = build_toy_model({}, (8, 8))
    out = model({"fixed": np.zeros((1, 8, 8, 1), "float32"),
                 "moving": np.zeros((1, 8, 8, 1), "float32")})
    assert out["warped"].shape == (1, 8, 8, 1) and out["disp"].shape == (1, 8, 8, 2)


def read_events(log_dir: str | Path) -> dict[str, dict[int, np.ndarray]]:
    """TensorBoard summaries in `log_dir`: ``{tag: {step: value array}}`` (parsed with
    TensorFlow's own protos, independent of the writer code)."""
    from tensorflow.core.util import event_pb2

    out: dict[str, dict[int, np.ndarray]] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = tf.make_ndarray(value.tensor)
    return out


def weights_by_name(model: keras.Model) -> dict[str, np.ndarray]:
    """``{variable path: value}`` of a model's weights."""
    return {v.path: np.array(v.numpy()) for v in model.weights}


#: ``tfreg train`` options for a tiny VoxelMorph (16^3 volumes, 4 features per level).
TINY_VXM = ["--set", "model.enc_features=[4, 4, 4, 4]",
            "--set", "model.dec_features=[4, 4, 4, 4, 4, 4, 4]"]


def write_tiny_data(folder: str | Path, n: int = 4) -> Path:
    """Synthetic 16^3 subjects with labels and their data spec; returns the spec path."""
    from tfreg.synthetic import write_collection

    return write_collection(folder, n=n, shape=(16, 16, 16), seed=0)
