"""Export a model as a self-contained model directory, and load it back.

`export_model(model, config, model_dir, ...)` writes the directory from a Keras model and its
resolved config; `export(run_dir, model_dir)` rebuilds a training run's model and calls it;
importers of foreign models call it directly.

Model directory::

    saved_model/        TF SavedModel, loadable with plain `tf.saved_model.load` (no tfreg):
                          register(fixed, moving) -> {"warped", "displacement"
                                                      [, "inverse_displacement"]}
                            fixed, moving: float32 (B, *S, 1); warped (B, *S, 1);
                            displacement (B, *S, N): voxels, fixed grid, channel d along array
                            axis d, pull: warped(x) = moving(x + displacement(x));
                            inverse_displacement (B, *S, N), for models that output their
                            inverse ("inverse_disp": diffeomorphic and bidirectional ones):
                            fixed(y + inverse_displacement(y)) maps the fixed image onto the
                            moving one
                          warp(image, displacement) -> {"warped"}
                            nearest-neighbour (for label maps cast to float32),
                            image (B, *S, C), nearest border outside
    model.keras         the Keras model (needs tfreg and the method's plugin to load)
    model.weights.h5    its weights (for rebuilding with changed settings, `load_model(overrides)`)
    config.yaml         the run's resolved config
    tfreg_model.json    {method, inshape, ndims, preprocessing, tfreg_version, ...}

Inputs must already be preprocessed the way `preprocessing` says (shape, intensity
normalisation); ``tfreg register`` does that for files. The ``register`` signature computes every
model input from ``(fixed, moving)`` through the method's `ModelIO.inference_inputs`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import tfreg
from tfreg.errors import ConfigError, InputError, reason
from tfreg.io import atomic_path

__all__ = ["export", "export_model", "load_model", "read_model_info", "restore_checkpoint",
           "RegistrationModel", "MODEL_INFO", "build_from_run"]

#: Name of the JSON description inside a model directory.
MODEL_INFO = "tfreg_model.json"


class _Holder:
    """The method's `ModelIO` and the config, kept out of TensorFlow's object tracking."""

    def __init__(self, io: Any, config: dict):
        self.io = io
        self.config = config


class _Exported(tf.Module):
    """The SavedModel's root: the Keras model and two signature functions."""

    def __init__(self, model: keras.Model, inshape: tuple[int, ...], io: Any, config: dict):
        super().__init__(name="tfreg_model")
        self.model = model
        # plain holders: tf.Module would wrap (and alter) a dict attribute for tracking
        self._settings = _Holder(io, copy.deepcopy(config))
        ndims = len(inshape)
        image = tf.TensorSpec((None, *inshape, 1), tf.float32)
        self.register = tf.function(
            self._register, input_signature=[image, image])
        self.warp = tf.function(
            self._warp, input_signature=[tf.TensorSpec((None, *inshape, None), tf.float32),
                                         tf.TensorSpec((None, *inshape, ndims), tf.float32)])

    def _register(self, fixed: tf.Tensor, moving: tf.Tensor) -> dict[str, tf.Tensor]:
        return _predict(self.model, self._settings.io, self._settings.config, fixed, moving)

    def _warp(self, image: tf.Tensor, displacement: tf.Tensor) -> dict[str, tf.Tensor]:
        from tfreg.layers import warp

        return {"warped": warp(image, displacement, interp="nearest")}


def _predict(model: keras.Model, io: Any, config: dict, fixed: tf.Tensor, moving: tf.Tensor
             ) -> dict[str, tf.Tensor]:
    """The `register` signature's outputs for a preprocessed pair: ``warped``, ``displacement``
    and, when the model outputs ``inverse_disp``, ``inverse_displacement`` (all float32)."""
    outputs = model(io.model_inputs(config, fixed, moving), training=False)
    out = {"warped": tf.cast(outputs[io.warped], tf.float32),
           "displacement": tf.cast(outputs[io.disp], tf.float32)}
    if "inverse_disp" in outputs:
        out["inverse_displacement"] = tf.cast(outputs["inverse_disp"], tf.float32)
    return out


def _read_run(run_dir: Path) -> tuple[dict, Any]:
    """The run's config.yaml and its `RunState` (None without state.json)."""
    from tfreg.config import load_yaml
    from tfreg.engine import RunState

    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml (not a tfreg run directory)")
    return load_yaml(config_path), RunState.load(run_dir)


def _run_inshape(run_dir: Path, config: dict, state: Any) -> tuple[int, ...]:
    if state is not None and state.inshape:
        return tuple(int(s) for s in state.inshape)
    spec = _load_spec(run_dir, config)
    shape = getattr(spec, "shape", None)
    if shape is None:
        raise ConfigError(f"{run_dir}: cannot tell the model's input shape (no state.json)")
    return tuple(int(s) for s in shape)


def _load_spec(run_dir: Path, config: dict) -> Any:
    from tfreg.data import DataSpec

    if not config.get("data"):
        raise ConfigError(f"{run_dir / 'config.yaml'}: data: no data spec recorded")
    return DataSpec.from_yaml(config["data"])


def _preprocessing(run_dir: Path, state: Any, config: dict) -> dict | None:
    """The inference preprocessing record the engine stored in state.json (None when the
    method's data source declares none); for a run without state.json, the data spec's."""
    if state is not None:
        return state.preprocessing
    try:
        prep = getattr(_load_spec(run_dir, config), "preprocessing", None)
    except ConfigError:
        return None
    return prep.to_dict() if hasattr(prep, "to_dict") else prep


def _load_weights(model: keras.Model, path: Path) -> None:
    """Load a ``.weights.h5`` file into `model`; a damaged or mismatched file is an InputError."""
    try:
        model.load_weights(str(path))
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot load these weights into the model "
                         f"({reason(err)})") from None


def restore_checkpoint(model: keras.Model, prefix: str) -> None:
    """Restore every weight of `model` from a training checkpoint (optimizer state and counters
    in it are ignored).

    Raises:
        InputError: the checkpoint lacks a weight of the model (a half-restored model is never
            returned), or cannot be read.
    """
    try:
        status = tf.train.Checkpoint(model=model).restore(prefix)
        status.assert_existing_objects_matched()
        status.expect_partial()
    except AssertionError as err:
        missing = str(err).strip().splitlines()[0] if str(err).strip() else "some weights"
        raise InputError(f"{prefix}: the checkpoint does not hold every weight of the model "
                         f"({missing[:160]})") from None
    except (ValueError, tf.errors.OpError) as err:
        raise InputError(f"{prefix}: cannot restore this checkpoint into the model "
                         f"({reason(err)})") from None


def build_from_run(run_dir: str | Path, checkpoint: str | None = None
                   ) -> tuple[Any, keras.Model, dict, Any]:
    """Rebuild a run's model (float32) with its trained weights.

    Weights come from `checkpoint` (a checkpoint prefix) if given, else ``model.weights.h5``,
    else the newest checkpoint.

    Returns:
        `(loaded_method, model, config, state)`: `state` is the run's
        `tfreg.engine.RunState` (a default one without state.json) with `inshape` filled in.

    Raises:
        ConfigError: not a run directory, an invalid config.yaml or state.json, or no trained
            weights in it.
        InputError: weights that cannot be loaded into the model.
        MethodError: the run's method is not installed.
    """
    from tfreg.config import method_defaults, resolve
    from tfreg.engine import RunState, dtype_policy
    from tfreg.registry import discover

    run_dir = Path(run_dir)
    config, state = _read_run(run_dir)
    loaded = discover().get(config.get("method"))
    config = resolve(method_defaults(loaded.method), config, None,
                     file_source=run_dir / "config.yaml", renamed=loaded.method.renamed)
    inshape = _run_inshape(run_dir, config, state)
    with dtype_policy("float32"):
        model = loaded.method.build_model(config, inshape)
    weights = run_dir / "model.weights.h5"
    if checkpoint is None and weights.is_file():
        _load_weights(model, weights)
    else:
        prefix = checkpoint or tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
        if prefix is None:
            raise ConfigError(f"{run_dir}: no trained weights (neither model.weights.h5 nor a "
                              "checkpoint)")
        if not tf.io.gfile.exists(f"{prefix}.index"):
            raise ConfigError(f"--checkpoint {prefix}: no such checkpoint")
        restore_checkpoint(model, prefix)
    state = state or RunState()
    state.inshape = list(inshape)
    return loaded, model, config, state


def export_model(model: keras.Model, config: dict, model_dir: str | Path, *, method: Any,
                 inshape: tuple[int, ...], preprocessing: dict | None,
                 extra_info: dict | None = None) -> Path:
    """Write the model directory described in the module docstring, atomically.

    Args:
        model: a float32 Keras model of `method` (built by its ``build_model``), with weights.
        config: its resolved config (saved as ``config.yaml``).
        model_dir: output folder; replaced if it is an earlier export, refused if it is another
            non-empty folder.
        method: the `tfreg.registry.LoadedMethod` (or `Method`) the model belongs to.
        inshape: the model's spatial input shape.
        preprocessing: the inference preprocessing record (`tfreg.data.Preprocessing` dict) that
            ``tfreg register`` applies; None when the method's data source declares none.
        extra_info: more entries for ``tfreg_model.json`` (training step, where an imported model
            came from...).

    Returns:
        `model_dir`.
    """
    from tfreg.config import dump_yaml
    from tfreg.engine import check_model

    model_dir = Path(model_dir)
    if model_dir.exists() and (not model_dir.is_dir() or (
            any(model_dir.iterdir()) and not (model_dir / MODEL_INFO).is_file())):
        raise ConfigError(f"{model_dir}: exists and is not an exported tfreg model; choose "
                          "another output folder")
    spec = getattr(method, "method", method)
    check_model(model, spec, "float32")
    inshape = tuple(int(s) for s in inshape)
    info = {
        "method": spec.name,
        "inshape": list(inshape),
        "ndims": len(inshape),
        "preprocessing": preprocessing,
        "tfreg_version": tfreg.__version__,
        "plugin": {"distribution": getattr(method, "dist_name", "unknown"),
                   "version": getattr(method, "dist_version", "unknown")},
        "signatures": {
            "register": "(fixed, moving) float32 (B, *S, 1) -> {warped (B, *S, 1), "
                        "displacement (B, *S, N) voxels, pull"
                        + (", inverse_displacement (B, *S, N)"
                           if "inverse_disp" in getattr(model, "output", {}) else "") + "}",
            "warp": "(image (B, *S, C), displacement (B, *S, N)) -> {warped}, nearest",
        },
        **(extra_info or {}),
    }
    with atomic_path(model_dir, directory=True) as tmp:
        module = _Exported(model, inshape, spec.io, config)
        tf.saved_model.save(module, str(tmp / "saved_model"),
                            signatures={"register": module.register, "warp": module.warp})
        model.save_weights(str(tmp / "model.weights.h5"))
        model.save(str(tmp / "model.keras"))
        dump_yaml(config, tmp / "config.yaml")
        (tmp / MODEL_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return model_dir


def export(run_dir: str | Path, model_dir: str | Path, *, checkpoint: str | None = None,
           extra_info: dict | None = None) -> Path:
    """Export a training run: rebuild its model with the trained weights (`build_from_run`) and
    write it with `export_model`, recording the run's preprocessing and step.

    Args:
        run_dir: a training run directory.
        model_dir: output folder (see `export_model`).
        checkpoint: export this checkpoint prefix instead of the final weights.
        extra_info: more entries for ``tfreg_model.json``.

    Returns:
        `model_dir`.
    """
    run_dir, model_dir = Path(run_dir), Path(model_dir)
    if model_dir.exists() and (not model_dir.is_dir() or (
            any(model_dir.iterdir()) and not (model_dir / MODEL_INFO).is_file())):
        raise ConfigError(f"{model_dir}: exists and is not an exported tfreg model; choose "
                          "another output folder")
    from tfreg.engine import RunState

    loaded, model, config, state = build_from_run(run_dir, checkpoint)
    recorded = RunState.load(run_dir)  # None for a run without state.json
    return export_model(model, config, model_dir, method=loaded, inshape=tuple(state.inshape),
                        preprocessing=_preprocessing(run_dir, recorded, config),
                        extra_info={"step": state.step, **(extra_info or {})})


class RegistrationModel:
    """A loaded model directory.

    Attributes:
        inshape: spatial input shape `S`.
        ndims: 2 or 3.
        config: the resolved training config (with overrides applied).
        method: the method's name.
        preprocessing: preprocessing settings the inputs must follow (dict or None).
        info: the whole ``tfreg_model.json``.
    """

    def __init__(self, model_dir: Path, info: dict, config: dict, register_fn, warp_fn,
                 keras_model: keras.Model | None = None):
        self.model_dir = model_dir
        self.info = info
        self.config = config
        self.method = info["method"]
        self.inshape = tuple(info["inshape"])
        self.ndims = len(self.inshape)
        self.preprocessing = info.get("preprocessing")
        self.keras_model = keras_model
        self._register = register_fn
        self._warp = warp_fn

    def _batched(self, array: Any, name: str, channels: int | None = 1) -> tuple[tf.Tensor, bool]:
        """`(*S)` or `(B, *S, C)` → float32 `(B, *S, C)` and whether a batch axis was given."""
        array = np.asarray(array)
        if array.shape == self.inshape:
            array, batched = array[None, ..., None], False
        elif array.ndim == self.ndims + 2 and tuple(array.shape[1:-1]) == self.inshape:
            batched = True
        else:
            want = f"({', '.join(map(str, self.inshape))})"
            raise InputError(f"{name}: expected shape {want} or (B, *{want}, C), got "
                             f"{tuple(array.shape)}")
        if channels is not None and array.shape[-1] != channels:
            raise InputError(f"{name}: expected {channels} channel(s), got {array.shape[-1]}")
        return tf.convert_to_tensor(array.astype(np.float32)), batched

    def register(self, fixed: Any, moving: Any, *, inverse: bool = False) -> tuple:
        """Register `moving` to `fixed` (preprocessed arrays at `inshape`).

        Args:
            fixed, moving: `(*S)` or `(B, *S, 1)` arrays.
            inverse: also return the model's inverse displacement (None when the model has no
                `inverse_displacement` output).

        Returns:
            `(warped, displacement)`: `(*S)` and `(*S, N)` for unbatched inputs, else
            `(B, *S, 1)` and `(B, *S, N)`; displacement in voxels, pull convention. With
            `inverse`, a third item: the inverse displacement, same layout, or None.
        """
        fixed_t, batched = self._batched(fixed, "fixed")
        moving_t, _ = self._batched(moving, "moving")
        if fixed_t.shape[0] != moving_t.shape[0]:
            raise InputError(f"moving: batch of {moving_t.shape[0]} does not match fixed's "
                             f"{fixed_t.shape[0]}")
        out = self._register(fixed=fixed_t, moving=moving_t)
        warped, disp = out["warped"].numpy(), out["displacement"].numpy()
        inv = out["inverse_displacement"].numpy() if "inverse_displacement" in out else None
        if not batched:
            warped, disp = warped[0, ..., 0], disp[0]
            inv = None if inv is None else inv[0]
        return (warped, disp, inv) if inverse else (warped, disp)

    def warp(self, image: Any, displacement: Any) -> np.ndarray:
        """Nearest-neighbour warp (label maps): `(*S)` or `(B, *S, C)` image, `(*S, N)` or
        `(B, *S, N)` displacement; returns the image's layout (float32)."""
        image_t, batched = self._batched(image, "image", channels=None)
        disp = np.asarray(displacement, dtype=np.float32)
        if disp.ndim == self.ndims + 1:
            disp = disp[None]
        out = self._warp(image=image_t, displacement=tf.convert_to_tensor(disp))["warped"]
        out = out.numpy()
        return out if batched else out[0, ..., 0]


def _apply_overrides(config: dict, method: Any, overrides: dict, source: Path) -> dict:
    """`config` with dotted `overrides`, validated against the method's defaults."""
    from tfreg.config import method_defaults, resolve

    sources = {key: f"overrides {key}={value!r}" for key, value in overrides.items()}
    return resolve(method_defaults(method), config, dict(overrides), file_source=source,
                   override_sources=sources, renamed=method.renamed)


def read_model_info(model_dir: str | Path) -> tuple[dict, dict]:
    """``(tfreg_model.json, config.yaml)`` of a model directory.

    Raises:
        ConfigError: not a model directory, or a damaged one.
    """
    from tfreg.config import load_yaml

    model_dir = Path(model_dir)
    info_path = model_dir / MODEL_INFO
    if not info_path.is_file():
        raise ConfigError(f"{model_dir}: not an exported tfreg model (no {MODEL_INFO})")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{info_path}: not valid JSON ({err})") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{info_path}: not a tfreg model description (expected a JSON object)")
    return info, load_yaml(model_dir / "config.yaml")


def load_model(model_dir: str | Path, overrides: dict | None = None, *,
               rebuild: bool = False) -> RegistrationModel:
    """Load an exported model directory.

    Args:
        model_dir: written by `export_model`.
        overrides: dotted config keys to change (e.g. ``{"model.cascades": 5}``); implies
            `rebuild`.
        rebuild: rebuild the Keras model through the method's ``build_model`` (with the
            overrides) and load the saved weights; needs the method's plugin. Otherwise the
            SavedModel is used (the plugin is not needed).

    Raises:
        ConfigError: not a model directory (or a damaged one), or an invalid override.
        InputError: the saved model or weights cannot be loaded.
        MethodError: `rebuild` and the method is not installed.
    """
    model_dir = Path(model_dir)
    info, config = read_model_info(model_dir)
    if not overrides and not rebuild:
        try:
            saved = tf.saved_model.load(str(model_dir / "saved_model"))
        except (OSError, ValueError, tf.errors.OpError) as err:
            raise InputError(f"{model_dir / 'saved_model'}: cannot load the SavedModel "
                             f"({reason(err)})") from None
        return RegistrationModel(model_dir, info, config, saved.signatures["register"],
                                 saved.signatures["warp"])

    from tfreg.engine import dtype_policy
    from tfreg.layers import warp
    from tfreg.registry import discover

    loaded = discover().get(info["method"])
    config = _apply_overrides(config, loaded.method, overrides or {}, model_dir / "config.yaml")
    inshape = tuple(info["inshape"])
    with dtype_policy("float32"):
        model = loaded.method.build_model(config, inshape)
    _load_weights(model, model_dir / "model.weights.h5")

    @tf.function
    def register_fn(fixed, moving):
        return _predict(model, loaded.method.io, config, fixed, moving)

    @tf.function
    def warp_fn(image, displacement):
        return {"warped": warp(image, displacement, interp="nearest")}

    return RegistrationModel(model_dir, info, config, register_fn, warp_fn, keras_model=model)
