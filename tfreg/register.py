"""Register one pair of files: the pipeline behind `tfreg register` and `tfreg evaluate`.

    io -> moving resampled onto the fixed grid by the affines -> intensity preprocessing
       -> trained model (optional) and/or instance optimisation -> back onto the fixed grid -> io

Everything the pipeline writes lives on the **fixed** grid and carries the fixed image's affine:
`warped.nii.gz`, `disp.nii.gz` (`(*S, N)` displacement in voxels of the fixed grid, channel `d`
along array axis `d`, pull: `warped(x) = moving(x + disp(x))`, where `moving` means the moving
image resampled onto the fixed grid by the two affines), `warped_labels.nii.gz` and `report.json`.

When the moving image lives on another grid, `disp` is still relative to the moving image
*resampled onto the fixed grid* (that is what `tfreg warp` applies), but the warped outputs
written here sample the original moving image once, through the composition of the displacement
and the grid-to-grid map, so no image is interpolated twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tfreg.errors import ConfigError, InputError, reason
from tfreg.io import Volume, atomic_path, load_volume, save_volume

__all__ = ["RegisterResult", "register_volumes", "register_files", "load_pair", "same_grid",
           "resolve_device", "device_name", "warp_file"]

#: Method-dependent register options (`tfreg.registry.RegisterHook`): name -> command-line flag.
METHOD_OPTIONS = {"recursions": "--cascades"}

#: output file names inside the output folder.
OUTPUTS = {"warped": "warped.nii.gz", "disp": "disp.nii.gz",
           "warped_labels": "warped_labels.nii.gz", "report": "report.json"}


@dataclass
class RegisterResult:
    """Arrays and report of one registration (all on the fixed grid).

    Attributes:
        warped: `(*S,)` float32 warped moving image.
        disp: `(*S, N)` float32 displacement, voxels, pull.
        warped_labels: `(*S,)` int32 warped moving labels, or None.
        report: JSON-safe dict (see `register_volumes`).
    """

    warped: np.ndarray
    disp: np.ndarray
    warped_labels: np.ndarray | None
    report: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- devices
def resolve_device(device: str | None) -> str | None:
    """`"cpu"`, `"gpu"`, `"gpu:1"` (case-insensitive) -> a TensorFlow device string; None = auto.

    Raises:
        ConfigError: malformed name, or a GPU that is not visible.
    """
    if device is None or device.lower() == "auto":
        return None
    import tensorflow as tf

    name = device.strip().lower()
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "gpu") or (index and not index.isdigit()):
        raise ConfigError(f"--device: expected 'cpu', 'gpu' or 'gpu:N', got {device!r}")
    if kind == "gpu":
        gpus = tf.config.list_physical_devices("GPU")
        wanted = int(index or 0)
        if wanted >= len(gpus):
            raise ConfigError(f"--device: {device} requested but "
                              f"{len(gpus) or 'no'} GPU{'s are' if len(gpus) != 1 else ' is'} "
                              "visible to TensorFlow")
    return f"/{kind.upper()}:{int(index or 0)}"


def device_name(device: str | None) -> str:
    """Human-readable name of the device that runs the computation (for reports)."""
    import tensorflow as tf

    if device is None:
        device = "/GPU:0" if tf.config.list_physical_devices("GPU") else "/CPU:0"
    if device.startswith("/GPU"):
        gpus = tf.config.list_physical_devices("GPU")
        index = int(device.split(":")[1])
        try:
            details = tf.config.experimental.get_device_details(gpus[index])
            return f"GPU:{index} ({details.get('device_name', 'unknown')})"
        except (IndexError, ValueError, RuntimeError):
            return f"GPU:{index}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU ({cores} cores, {cpu})"


# ---------------------------------------------------------------------------------------- grids
def same_grid(a: Volume, b: Volume, tol: float = 1e-4) -> bool:
    """Whether two volumes share shape and voxel-to-world affine (up to `tol` mm)."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=tol)


def _fixed_to_moving(fixed: Volume, moving: Volume) -> np.ndarray:
    """`(N+1, N+1)` voxel map from the fixed grid to the moving grid (through world space)."""
    n = fixed.ndims
    full = np.linalg.inv(moving.affine) @ fixed.affine
    keep = list(range(n)) + [3]
    return full[np.ix_(keep, keep)]


def _sample_moving(moving: np.ndarray, disp: np.ndarray, to_moving: np.ndarray | None,
                   interp: str) -> np.ndarray:
    """`moving(T(x + disp(x)))` on the fixed grid, with `T` the fixed->moving voxel map.

    Args:
        moving: `(*Sm,)` image or label map on its own grid.
        disp: `(*S, N)` displacement in fixed voxels.
        to_moving: `(N+1, N+1)` voxel map, or None when both grids are the same.
        interp: "linear" (images) or "nearest" (labels).

    Outside the moving image: the nearest border value on a shared grid (tfreg's default);
    across grids, the image minimum (labels: 0), as the resampling onto the fixed grid does.
    """
    import tensorflow as tf

    from tfreg import layers

    n = disp.shape[-1]
    if to_moving is not None:
        grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in disp.shape[:-1]],
                                    indexing="ij"), axis=-1)
        points = grid + disp
        coords = points @ to_moving[:n, :n].T + to_moving[:n, n]
        # layers.warp adds the output grid: pass coordinates relative to it
        disp = (coords - grid).astype(np.float32)
    image = moving[None, ..., None]
    fill = None
    if interp == "nearest":
        image = image.astype(np.int32)
        fill = 0 if to_moving is not None else None
    elif to_moving is not None:
        fill = float(moving.min())
    out = layers.warp(tf.constant(image), tf.constant(disp[None], tf.float32), interp=interp,
                      fill_value=fill)
    return out.numpy()[0, ..., 0]


# -------------------------------------------------------------------------------------- loading
def load_pair(fixed: str | Path, moving: str | Path, fixed_labels: str | Path | None = None,
              moving_labels: str | Path | None = None
              ) -> tuple[Volume, Volume, Volume | None, Volume | None]:
    """Load and cross-check a pair and its optional label maps.

    Raises:
        InputError: one line naming the file: unreadable, wrong rank, NaN, a label map whose grid
            differs from its image's, 2D/3D mismatch, a label map given for only one side.
    """
    if (fixed_labels is None) != (moving_labels is None) and fixed_labels is not None:
        raise InputError(f"{fixed_labels}: --fixed-labels needs --moving-labels too "
                         "(Dice compares the warped moving labels with the fixed labels)")
    fixed_v = load_volume(fixed)
    moving_v = load_volume(moving)
    if fixed_v.ndims != moving_v.ndims:
        raise InputError(f"{moving}: is {moving_v.ndims}D {moving_v.shape} but the fixed image "
                         f"{fixed} is {fixed_v.ndims}D {fixed_v.shape}")
    labels = []
    for path, image in ((fixed_labels, fixed_v), (moving_labels, moving_v)):
        if path is None:
            labels.append(None)
            continue
        lab = load_volume(path, label=True)
        if lab.shape != image.shape:
            raise InputError(f"{path}: shape {lab.shape} does not match its image {image.path} "
                             f"{image.shape}")
        if not np.allclose(lab.affine, image.affine, atol=1e-3):
            raise InputError(f"{path}: its affine differs from its image {image.path} "
                             "(label map and image must share one grid)")
        labels.append(lab)
    return fixed_v, moving_v, labels[0], labels[1]


def _check_image(volume: Volume) -> None:
    if volume.data.size == 0 or float(volume.data.max()) == float(volume.data.min()):
        raise InputError(f"{volume.path}: image is constant (nothing to register)")


# --------------------------------------------------------------------------------- the pipeline
def register_volumes(fixed: Volume, moving: Volume, *, fixed_labels: Volume | None = None,
                     moving_labels: Volume | None = None, config=None,
                     model: str | Path | None = None, finetune: int = 0,
                     recursions: int | None = None, device: str | None = None,
                     progress: Callable[[str, int, int, float], None] | None = None
                     ) -> RegisterResult:
    """Register `moving` to `fixed` (loaded volumes; any grids, same number of axes).

    Args:
        fixed, moving: images from `tfreg.io.load_volume`.
        fixed_labels, moving_labels: optional label maps on their image's grid (both or none for
            Dice/HD95; `moving_labels` alone still gives `warped_labels`).
        config: `tfreg.instance.InstanceConfig` (default: the "accurate" preset).
        model: exported model folder; None = instance optimisation only.
        finetune: with `model`: instance-optimisation steps after the network (0 = none).
        recursions: with a recursive `model` (its method's `RegisterHook` takes the
            ``recursions`` option): run it with this many recursions; what the report gets is
            the method's (e.g. a table of the similarity after each recursion).
        device: "cpu", "gpu", "gpu:N" or None (TensorFlow's choice).
        progress: `progress(stage, step, total, loss)` callback.

    Returns:
        `RegisterResult`. Its report holds: `runtime_seconds` (from the loaded volumes to the
        warped outputs: resampling, preprocessing, compilation, optimisation or prediction,
        warping; not file I/O, not the metrics below), `device`, `method`, `similarity` and
        `similarity_before` (`tfreg.instance.local_ncc`), `folding_percent`, `sdlogj`, and with
        both label maps `dice`/`hd95_mm` per label, `mean_dice`, `mean_hd95_mm`,
        `mean_dice_before` (labels resampled onto the fixed grid, not registered); `resampled`
        (whether the moving grid differed), `stage_seconds`, `affine`, `config`; with a model
        whose method has a register report hook, its entries and `method_summary` (lines).
    """
    import tensorflow as tf

    from tfreg import instance, metrics

    _check_image(fixed)
    _check_image(moving)
    tf_device = resolve_device(device)
    start = time.perf_counter()
    resampled = not same_grid(fixed, moving)
    to_moving = _fixed_to_moving(fixed, moving) if resampled else None
    if resampled:
        from tfreg.io import resample_to_grid

        moving_on_fixed = resample_to_grid(moving, fixed.affine, fixed.shape, order=1,
                                           fill_value=float(moving.data.min()))
    else:
        moving_on_fixed = moving.data
    fixed_n = instance.normalize_image(fixed.data)
    moving_n = instance.normalize_image(moving_on_fixed)
    cfg = config or instance.PRESETS["accurate"]
    report: dict[str, Any] = {}
    with tf.device(tf_device) if tf_device else contextlib.nullcontext():
        if model is None:
            result = instance.register_arrays(fixed_n, moving_n, cfg, progress=progress)
            disp = result.disp
            report.update(method="instance optimisation", config=_config_dict(result.config),
                          affine=np.asarray(result.affine).tolist(),
                          stage_seconds={k: round(v, 3) for k, v in result.stage_seconds.items()})
            sim_after, sim_before = result.similarity, result.initial_similarity
        else:
            disp, model_info = _predict(model, fixed, Volume(moving_on_fixed, fixed.affine,
                                                            None, moving.path), progress,
                                        options={"recursions": recursions})
            report.update(method=f"model {model_info['method']}", model=str(model),
                          model_inshape=list(model_info["inshape"]))
            extra = model_info.get("report")
            if extra is not None:
                report.update(extra.entries)
                if extra.lines:
                    report["method_summary"] = list(extra.lines)
            if finetune > 0:
                disp, stage = _finetune(fixed_n, moving_n, disp, cfg, finetune, progress)
                report.update(finetune_steps=int(finetune), config=_config_dict(cfg),
                              stage_seconds=stage)
            sim_before = instance.local_ncc(fixed_n, moving_n)
            sim_after = instance.local_ncc(fixed_n, _sample_moving(moving_n, disp, None, "linear"))
        warped = _sample_moving(moving.data.astype(np.float32), disp, to_moving, "linear")
        warped_labels = None
        if moving_labels is not None:
            warped_labels = _sample_moving(moving_labels.data, disp, to_moving, "nearest")
    runtime = time.perf_counter() - start
    report.update(
        runtime_seconds=round(runtime, 3),
        device=device_name(tf_device),
        fixed_shape=list(fixed.shape), moving_shape=list(moving.shape), resampled=resampled,
        similarity=round(float(sim_after), 5), similarity_before=round(float(sim_before), 5),
        similarity_metric="local NCC, window 7, signed, weighted by fixed-image contrast "
                          "(1 = identical images)",
        folding_percent=round(metrics.folding_percent(disp), 5),
        sdlogj=round(metrics.sdlogj(disp), 5),
    )
    if fixed_labels is not None and warped_labels is not None:
        labels = sorted(int(v) for v in np.unique(fixed_labels.data) if v != 0)
        dice = metrics.dice(fixed_labels.data, warped_labels, labels=labels)
        hd = metrics.hd95(fixed_labels.data, warped_labels, spacing=fixed.spacing, labels=labels)
        unregistered = _sample_moving(moving_labels.data, np.zeros_like(disp), to_moving, "nearest")
        before = metrics.dice(fixed_labels.data, unregistered, labels=labels)
        report.update(
            mean_dice=_round(metrics.mean_dice(dice)), mean_hd95_mm=_round(metrics.mean_dice(hd)),
            mean_dice_before=_round(metrics.mean_dice(before)),
            dice={str(k): _round(v) for k, v in dice.items()},
            hd95_mm={str(k): _round(v) for k, v in hd.items()},
        )
    return RegisterResult(warped.astype(np.float32), disp.astype(np.float32), warped_labels, report)


def _round(value: float, digits: int = 5) -> float | None:
    value = float(value)
    return None if not np.isfinite(value) else round(value, digits)


def _config_dict(cfg) -> dict:
    import dataclasses

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def _predict(model_dir: str | Path, fixed: Volume, moving: Volume,
             progress: Callable | None, options: dict | None = None
             ) -> tuple[np.ndarray, dict]:
    """Network displacement on the original fixed grid (fixed voxels), and the model info.

    The inputs are prepared by the preprocessing record the model was exported with. When the
    model's method is installed and has a `RegisterHook`, the model is rebuilt through it: with
    the overrides its hook derives from `options` (method-dependent options, e.g.
    ``{"recursions": K}``; None values = not given), and its report hook adds to the info
    (``info["report"]``, a `RegisterReport`)."""
    from tfreg.data import Preprocessing, field_to_source
    from tfreg.errors import TfregError
    from tfreg.export import load_model, read_model_info
    from tfreg.registry import discover

    given = {k: v for k, v in (options or {}).items() if v is not None}
    info_json, saved_config = read_model_info(model_dir)
    name = info_json.get("method")
    loaded = discover().methods.get(name)
    hook = loaded.method.register_hook if loaded is not None else None
    for key in given:
        flag = METHOD_OPTIONS.get(key, key)
        if loaded is None:
            raise ConfigError(f"{flag}: needs the plugin of method '{name}' installed "
                              f"(model {model_dir})")
        if hook is None or hook.overrides is None:
            raise ConfigError(f"{flag}: method '{name}' of model {model_dir} takes no such "
                              "option")
    rebuild = hook is not None and (hook.report is not None or bool(given))
    overrides = None
    if rebuild:
        flags = ", ".join(METHOD_OPTIONS.get(k, k) for k in given) or "--model"
        try:
            overrides = dict(hook.overrides(saved_config, given)) \
                if given and hook.overrides is not None else {}
            model = load_model(model_dir, overrides=overrides, rebuild=True)
        except TfregError as err:
            raise ConfigError(f"{flags}: model {model_dir}: {reason(err)}") from None
    else:
        model = load_model(model_dir)
    if model.ndims != fixed.ndims:
        raise InputError(f"{fixed.path}: is {fixed.ndims}D but the model {model_dir} expects "
                         f"{model.ndims}D inputs of shape {model.inshape}")
    if model.preprocessing is None:
        raise ConfigError(f"{model_dir}: the model records no inference preprocessing (its "
                          "method's data source declares none), so tfreg register cannot "
                          "prepare NIfTI inputs for it")
    settings = dict(model.preprocessing)
    settings["shape"] = list(model.inshape)
    prep = Preprocessing.from_dict(settings, source=f"{model_dir}/tfreg_model.json",
                                   prefix="preprocessing.")
    rec_f, rec_m = prep.plan(fixed), prep.plan(moving)
    f_in, m_in = prep.apply(fixed, rec_f), prep.apply(moving, rec_m)
    if progress:
        progress("network", 0, 1, float("nan"))
    _, disp = model.register(f_in, m_in)
    if progress:
        progress("network", 1, 1, float("nan"))
    info = {"method": model.method, "inshape": model.inshape}
    if rebuild and hook.report is not None:
        import tensorflow as tf

        inputs = loaded.method.io.model_inputs(
            model.config, tf.constant(f_in[None, ..., None], tf.float32),
            tf.constant(m_in[None, ..., None], tf.float32))
        inputs = {k: np.asarray(v) for k, v in inputs.items()}
        info["report"] = hook.report(model.keras_model, saved_config, inputs, given)
    return field_to_source(disp, rec_f, rec_m), info


def _finetune(fixed_n: np.ndarray, moving_n: np.ndarray, disp: np.ndarray, cfg, steps: int,
              progress: Callable | None) -> tuple[np.ndarray, dict]:
    """Continue from a network displacement `u_net` with `steps` diffeomorphic correction steps.

    The moving image is pre-warped by `u_net`, a stationary velocity field starting at zero is
    optimised on the finest pyramid level of `cfg` (no affine stage), and the result is composed:
    `disp = compose(u_net, exp(v))`, i.e. `warped(x) = moving(y + u_net(y))` with
    `y = x + exp(v)(x)`.
    At step 0 this is exactly the network's result.
    """
    import dataclasses

    import tensorflow as tf

    from tfreg import instance, layers

    level = cfg.levels[-1] if cfg.levels else 1
    index = len(cfg.levels) - 1 if cfg.levels else 0
    ft = dataclasses.replace(
        cfg, levels=(level,), iterations=(int(steps),),
        learning_rate=(cfg.learning_rate[index] if cfg.levels else 0.1,),
        ncc_win=(cfg.ncc_win[index] if cfg.levels else 5,), affine=False)
    prewarped = _sample_moving(moving_n, disp, None, "linear")
    result = instance.register_arrays(fixed_n, prewarped, ft, progress=progress)
    total = layers.compose(tf.constant(disp[None]), tf.constant(result.disp[None]))
    return total.numpy()[0], {k: round(v, 3) for k, v in result.stage_seconds.items()}


# ------------------------------------------------------------------------------------ file level
def register_files(fixed: str | Path, moving: str | Path, out_dir: str | Path, *,
                   fixed_labels: str | Path | None = None, moving_labels: str | Path | None = None,
                   config=None, model: str | Path | None = None, finetune: int = 0,
                   recursions: int | None = None, device: str | None = None,
                   progress: Callable[[str, int, int, float], None] | None = None
                   ) -> tuple[dict, dict[str, Path]]:
    """Register two files and write the outputs into `out_dir` (atomic writes).

    Returns:
        `(report, written)` with `written` = output name -> path.
    """
    fixed_v, moving_v, fixed_l, moving_l = load_pair(fixed, moving, fixed_labels, moving_labels)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    result = register_volumes(fixed_v, moving_v, fixed_labels=fixed_l, moving_labels=moving_l,
                              config=config, model=model, finetune=finetune,
                              recursions=recursions, device=device, progress=progress)
    report = dict(result.report)
    report.update(fixed=str(fixed), moving=str(moving),
                  fixed_labels=None if fixed_labels is None else str(fixed_labels),
                  moving_labels=None if moving_labels is None else str(moving_labels))
    written = {}
    written["warped"] = save_volume(out_dir / OUTPUTS["warped"], result.warped, fixed_v.affine,
                                    fixed_v.header)
    written["disp"] = save_volume(out_dir / OUTPUTS["disp"], result.disp, fixed_v.affine)
    if result.warped_labels is not None:
        written["warped_labels"] = save_volume(out_dir / OUTPUTS["warped_labels"],
                                               result.warped_labels, fixed_v.affine, fixed_v.header)
    report["outputs"] = {k: str(v) for k, v in written.items()}
    written["report"] = write_json(out_dir / OUTPUTS["report"], report)
    return report, written


def write_json(path: str | Path, data: dict) -> Path:
    """Write `data` as indented JSON, atomically."""
    path = Path(path)
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def warp_file(moving: str | Path, disp: str | Path, out: str | Path, *, nearest: bool = False
              ) -> Path:
    """Apply a displacement field file to an image or label map and write the result.

    The field lives on the fixed grid (its affine); the moving image may be on another grid: it is
    sampled at `T(x + disp(x))` with `T` the fixed->moving voxel map from the two affines.

    Raises:
        InputError: unreadable files, a field that is not `(*S, N)`, 2D/3D mismatch.
    """
    field_v = load_volume(disp, allow_vector=True)
    if not field_v.vector:
        raise InputError(f"{disp}: expected a displacement field (*S, N) with N = 2 or 3 "
                         f"components in the last axis, got shape {field_v.data.shape}")
    moving_v = load_volume(moving, label=nearest)
    if moving_v.ndims != field_v.ndims:
        raise InputError(f"{moving}: is {moving_v.ndims}D but the field {disp} is "
                         f"{field_v.ndims}D")
    grid = Volume(np.zeros(field_v.shape, np.float32), field_v.affine)
    to_moving = None if same_grid(grid, moving_v) else _fixed_to_moving(grid, moving_v)
    data = moving_v.data if nearest else moving_v.data.astype(np.float32)
    out_data = _sample_moving(data, field_v.data.astype(np.float32), to_moving,
                              "nearest" if nearest else "linear")
    header = moving_v.header if to_moving is None else None
    return save_volume(out, out_data, field_v.affine, header)
