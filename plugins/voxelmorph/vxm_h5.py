"""Import voxelmorph TensorFlow ``VxmDense`` models saved as Keras 2 HDF5 (``.h5``) files.

voxelmorph's TF models load only under legacy Keras 2. This module reads such a file with h5py
alone (voxelmorph is never imported), rebuilds the same network with this plugin's
``build_model``, copies the weights, and writes a tfreg model directory for
``tfreg register --model`` (`tfreg.export.export_model`). The plugin provides the
``tfreg import-voxelmorph`` command (`command`).

File layout read here (what ``model.save("x.h5")`` writes under Keras 2):

- root attribute ``model_config``: JSON ``{"class_name": "VxmDense", "config": {...}}`` where
  ``config`` holds the constructor arguments (neurite's ``LoadableModel`` stores them there);
- group ``model_weights`` (or the root itself for a ``save_weights`` file) with attribute
  ``layer_names`` (the layers in graph order) and, per layer, a group whose attribute
  ``weight_names`` lists its arrays (``kernel``, ``bias``).

Weights are matched by *role*, not by name: the convolution layers of the file are taken in graph
order (first the encoder, then the decoder, the full-resolution convs and the flow head) and paired
with the tfreg model's convolutions in the same order; every kernel shape must agree, so a file that
does not have the structure its arguments describe is refused with a message naming the layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tfreg.errors import ConfigError, InputError

__all__ = ["VxmFile", "ConvWeights", "read_h5", "vxm_to_config", "load_weights_by_role",
           "build_model", "import_voxelmorph", "DEFAULT_UNET_FEATURES"]

#: voxelmorph's ``default_unet_features()``: encoder and decoder features.
DEFAULT_UNET_FEATURES = [[16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]]

#: VxmDense arguments that do not change the network's function and are ignored.
_IGNORED_ARGS = ("name", "metadata", "reg_field")
#: VxmDense arguments tfreg maps (the others are refused by name).
_KNOWN_ARGS = ("inshape", "nb_unet_features", "nb_unet_levels", "unet_feat_mult",
               "nb_unet_conv_per_level", "int_steps", "int_resolution", "int_downsize",
               "svf_resolution", "unet_half_res", "bidir", "use_probs", "src_feats", "trg_feats",
               "input_model", "hyp_model", "fill_value", *_IGNORED_ARGS)


@dataclass
class ConvWeights:
    """One layer's arrays from the file.

    Attributes:
        name: the layer's name in the file (for messages only).
        kernel: `(*k, in, out)` float32 (k = 3 per spatial axis for VxmDense).
        bias: `(out,)` float32, or None if the layer has no bias.
    """

    name: str
    kernel: np.ndarray
    bias: np.ndarray | None


@dataclass
class VxmFile:
    """Content of a voxelmorph ``.h5`` file.

    Attributes:
        path: the file.
        class_name: the saved model class (``"VxmDense"``), or None for a weights-only file.
        args: the stored constructor arguments (empty for a weights-only file).
        layers: layers that hold weights, in the file's graph order.
        keras_version: Keras version that wrote the file ("" if not recorded).
    """

    path: Path
    class_name: str | None
    args: dict[str, Any]
    layers: list[ConvWeights] = field(default_factory=list)
    keras_version: str = ""


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _names(attr: Any) -> list[str]:
    return [_text(v) for v in np.asarray(attr).ravel()] if attr is not None else []


def read_h5(path: str | Path) -> VxmFile:
    """Read the stored arguments and weights of a voxelmorph ``.h5`` model with h5py.

    Raises:
        InputError: ``"<file>: ..."`` when the file is missing, not HDF5, or not a Keras 2 model /
            weights file.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise InputError(f"{path}: not an HDF5 file (expected a Keras 2 .h5 model saved by "
                         "voxelmorph)") from None
    with handle as f:
        class_name, args = None, {}
        if "model_config" in f.attrs:
            try:
                model_config = json.loads(_text(f.attrs["model_config"]))
                class_name = str(model_config["class_name"])
                args = dict(model_config.get("config") or {})
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{path}: the 'model_config' attribute is not valid JSON "
                                 "with 'class_name' and 'config'") from None
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise InputError(f"{path}: no Keras weights found (no 'layer_names' attribute); "
                             "is this a voxelmorph model saved as .h5?")
        layers: list[ConvWeights] = []
        for layer_name in _names(root.attrs["layer_names"]):
            group = root[layer_name]
            # weight paths are relative to the layer group; a nested model lists several layers
            by_owner: dict[str, list[np.ndarray]] = {}
            for weight_name in _names(group.attrs.get("weight_names")):
                owner = weight_name.rsplit("/", 1)[0] if "/" in weight_name else layer_name
                by_owner.setdefault(owner, []).append(np.asarray(group[weight_name], np.float32))
            for owner, arrays in by_owner.items():
                kernels = [a for a in arrays if a.ndim >= 3]
                biases = [a for a in arrays if a.ndim == 1]
                if len(kernels) != 1 or len(biases) > 1 or len(arrays) != len(kernels) + len(biases):
                    shapes = [a.shape for a in arrays]
                    raise InputError(f"{path}: layer '{owner}' holds weights {shapes}, which is "
                                     "not a convolution (kernel + bias) of a VxmDense model")
                layers.append(ConvWeights(owner, kernels[0], biases[0] if biases else None))
        version = _text(f.attrs.get("keras_version", root.attrs.get("keras_version", "")))
    return VxmFile(path, class_name, args, layers, version)


def _unet_features(args: Mapping[str, Any], source: str) -> tuple[list[int], list[int], int]:
    """Encoder/decoder features and convs per level from VxmDense's U-Net arguments."""
    feats = args.get("nb_unet_features")
    levels = args.get("nb_unet_levels")
    mult = args.get("unet_feat_mult", 1) or 1
    per_level = args.get("nb_unet_conv_per_level", 1) or 1
    if not isinstance(per_level, int) or per_level < 1:
        raise InputError(f"{source}: nb_unet_conv_per_level: expected an integer >= 1, "
                         f"got {per_level!r}")
    if feats is None:
        if levels is not None:
            raise InputError(f"{source}: nb_unet_levels is set but nb_unet_features is not an integer")
        enc, dec = DEFAULT_UNET_FEATURES
        return list(enc), list(dec), int(per_level)
    if isinstance(feats, int) and not isinstance(feats, bool):
        if not isinstance(levels, int) or levels < 2:
            raise InputError(f"{source}: nb_unet_features is an integer, so nb_unet_levels must be "
                             f"an integer >= 2, got {levels!r}")
        base = np.round(feats * float(mult) ** np.arange(levels)).astype(int)
        enc = np.repeat(base[:-1], per_level).tolist()
        dec = np.repeat(np.flip(base), per_level).tolist()
        return [int(v) for v in enc], [int(v) for v in dec], int(per_level)
    try:
        enc, dec = feats
        enc = [int(v) for v in enc]
        dec = [int(v) for v in dec]
    except (TypeError, ValueError):
        raise InputError(f"{source}: nb_unet_features: expected [[encoder...], [decoder...]] or "
                         f"an integer, got {feats!r}") from None
    if levels is not None:
        raise InputError(f"{source}: nb_unet_levels is set but nb_unet_features is not an integer")
    return enc, dec, int(per_level)


def vxm_to_config(vxm: VxmFile, overrides: Mapping[str, Any] | None = None
                  ) -> tuple[dict[str, Any], tuple[int, ...]]:
    """Map VxmDense constructor arguments to a tfreg ``voxelmorph`` ``model:`` section.

    Args:
        vxm: the file's content (`read_h5`).
        overrides: VxmDense arguments given by the user; they replace the stored ones (needed for
            a weights-only file, which stores none: at least ``inshape``).

    Returns:
        ``({"model": {...}}, inshape)``.

    Raises:
        InputError: ``"<file>: <argument>: ..."`` naming an unsupported class or option.
    """
    source = str(vxm.path)
    args = {**vxm.args, **(overrides or {})}
    if vxm.class_name is not None and vxm.class_name != "VxmDense":
        raise InputError(f"{source}: voxelmorph model class '{vxm.class_name}' is not supported "
                         "(tfreg imports VxmDense models)")
    unknown = sorted(k for k in args if k not in _KNOWN_ARGS)
    if unknown:
        raise InputError(f"{source}: VxmDense option '{unknown[0]}' is not supported by tfreg")
    if args.get("inshape") is None:
        raise InputError(f"{source}: the file stores no VxmDense arguments (weights only); give at "
                         "least inshape, e.g. --arg inshape=[160,192,224]")
    for key, bad in (("use_probs", lambda v: bool(v)),
                     ("input_model", lambda v: v is not None),
                     ("hyp_model", lambda v: v is not None),
                     ("src_feats", lambda v: v not in (None, 1)),
                     ("trg_feats", lambda v: v not in (None, 1))):
        if key in args and bad(args[key]):
            raise InputError(f"{source}: VxmDense option {key}={args[key]!r} is not supported by "
                             "tfreg (supported: use_probs=False, no input_model/hyp_model, "
                             "src_feats=trg_feats=1)")
    try:
        inshape = tuple(int(s) for s in args["inshape"])
    except (TypeError, ValueError):
        raise InputError(f"{source}: inshape: expected a list of integers, "
                         f"got {args['inshape']!r}") from None
    enc, dec, per_level = _unet_features(args, source)
    int_res = args.get("int_resolution", 2)
    if args.get("int_downsize") is not None:  # deprecated alias, wins as in voxelmorph
        int_res = args["int_downsize"]
    svf_res = args.get("svf_resolution", 1)
    if args.get("unet_half_res"):
        svf_res = 2
    steps = args.get("int_steps", 7)
    for key, value in (("int_steps", steps), ("int_resolution", int_res),
                       ("svf_resolution", svf_res)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise InputError(f"{source}: {key}: expected an integer, got {value!r}")
    fill = args.get("fill_value")
    model = {
        "variant": "maxpool",
        "enc_features": enc,
        "dec_features": dec,
        "conv_per_level": per_level,
        "int_steps": int(steps),
        "int_resolution": int(int_res),
        "svf_resolution": int(svf_res),
        "bidir": bool(args.get("bidir", False)),
        "fill_value": None if fill is None else float(fill),
    }
    return {"model": model}, inshape


def _conv_layers(model: Any) -> list[Any]:
    """The convolution layers of a tfreg model, in graph order."""
    import keras

    return [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv3D))]


def load_weights_by_role(model: Any, vxm: VxmFile) -> None:
    """Copy the file's convolution weights into a tfreg VoxelMorph model by role.

    Both sides are lists of convolutions in graph order (U-Net encoder, decoder, final convs, flow
    head); they are paired in that order and every kernel and bias shape must match.

    Raises:
        InputError: different number of convolutions, or a shape mismatch (naming both layers).
    """
    ours = _conv_layers(model)
    theirs = vxm.layers
    if len(ours) != len(theirs):
        raise InputError(f"{vxm.path}: holds {len(theirs)} convolution layers, but the VxmDense "
                         f"arguments describe {len(ours)}; the file does not match its arguments")
    pairs = []
    for layer, weights in zip(ours, theirs):
        want = tuple(layer.kernel.shape)
        if tuple(weights.kernel.shape) != want:
            raise InputError(f"{vxm.path}: layer '{weights.name}' has kernel shape "
                             f"{tuple(weights.kernel.shape)}, expected {want} for tfreg layer "
                             f"'{layer.name}'")
        if weights.bias is None or tuple(weights.bias.shape) != tuple(layer.bias.shape):
            got = None if weights.bias is None else tuple(weights.bias.shape)
            raise InputError(f"{vxm.path}: layer '{weights.name}' has bias shape {got}, expected "
                             f"{tuple(layer.bias.shape)} for tfreg layer '{layer.name}'")
        pairs.append((layer, weights))
    for layer, weights in pairs:
        layer.set_weights([weights.kernel, weights.bias])


def build_model(path: str | Path, overrides: Mapping[str, Any] | None = None
                ) -> tuple[Any, dict[str, Any], tuple[int, ...]]:
    """Read a voxelmorph ``.h5`` file and build the equivalent tfreg model with its weights.

    Args:
        path: the ``.h5`` file.
        overrides: VxmDense arguments replacing the stored ones.

    Returns:
        ``(keras_model, config, inshape)``: `config` is the full resolved ``voxelmorph`` config
        (method defaults with the ``model:`` section mapped from the file).

    Raises:
        InputError: see `read_h5`, `vxm_to_config` and `load_weights_by_role`.
    """
    return _build(read_h5(path), overrides)


def _build(vxm: VxmFile, overrides: Mapping[str, Any] | None
           ) -> tuple[Any, dict[str, Any], tuple[int, ...]]:
    from tfreg.config import method_defaults, resolve

    method = _this_method().method
    mapped, inshape = vxm_to_config(vxm, overrides)
    try:
        config = resolve(method_defaults(method), mapped, file_source=str(vxm.path))
        model = method.build_model(config, inshape)
    except ConfigError as err:
        raise InputError(f"{vxm.path}: cannot build the equivalent network: {err}") from None
    load_weights_by_role(model, vxm)
    return model, config, inshape


def _this_method() -> Any:
    """This plugin's method as discovered (`tfreg.registry.LoadedMethod`: resolved default YAML,
    distribution and version)."""
    from tfreg.registry import discover

    from . import METHOD

    return discover().get(METHOD.name)


def import_voxelmorph(path: str | Path, model_dir: str | Path,
                      overrides: Mapping[str, Any] | None = None, *,
                      normalize: str = "minmax") -> Path:
    """Convert a voxelmorph ``.h5`` model into a tfreg model directory.

    Args:
        path: the ``.h5`` file written by voxelmorph's ``model.save`` (or ``save_weights``; then
            `overrides` must give ``inshape`` and every non-default VxmDense argument).
        model_dir: output folder (``saved_model/``, ``model.keras``, ``model.weights.h5``,
            ``config.yaml``, ``tfreg_model.json``), usable with ``tfreg register --model``.
            Replaced if it holds an earlier export; another non-empty folder is refused.
        overrides: VxmDense arguments replacing the stored ones.
        normalize: intensity normalisation ``tfreg register`` applies to inputs (recorded in
            ``tfreg_model.json``): ``"minmax"`` (default: voxelmorph models expect intensities in
            [0, 1]), ``"zscore"``, ``"percentile"`` or ``"none"``.

    Returns:
        The model directory.

    Raises:
        InputError: unreadable file, unsupported class or option, weights that do not match.
        ConfigError: invalid `normalize`, or `model_dir` is another non-empty folder.
    """
    from tfreg.data.preprocess import Preprocessing
    from tfreg.export import export_model

    vxm = read_h5(path)
    model, config, inshape = _build(vxm, overrides)
    preprocessing = Preprocessing.from_dict({"shape": list(inshape), "normalize": normalize},
                                            source="--normalize").to_dict()
    imported_from = {"format": "voxelmorph-h5", "file": str(Path(path).resolve()),
                     "keras_version": vxm.keras_version}
    return export_model(model, config, model_dir, method=_this_method(), inshape=inshape,
                        preprocessing=preprocessing,
                        extra_info={"step": None, "imported_from": imported_from})
