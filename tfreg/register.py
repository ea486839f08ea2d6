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

Also written: `affine.mat` (the affine stage as an ITK/ANTs transform from fixed to moving
physical space; identity without one), with `inverse=True` `disp_inverse.nii.gz` (on the
**moving** grid, its voxels, pull: `fixed_warped(y) = fixed(y + disp_inverse(y))` maps the fixed
image onto the moving one), and with `itk=True` the ITK/ANTs files (`tfreg.transforms_io`):
`itk_warp.nii.gz` + `affine.mat`/`affine.txt` reproduce `warped.nii.gz` from the original moving
image (`transformlist=[itk_warp, affine]`), and `itk_inverse_warp.nii.gz` with `--inverse`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tfreg.errors import ConfigError, InputError, reason
from tfreg.io import Volume, atomic_path, check_label_grid, load_volume, save_volume

__all__ = ["RegisterResult", "register_volumes", "register_files", "load_pair", "same_grid",
           "score", "load_keypoints",
           "resolve_device", "device_name", "warp_file"]

#: Method-dependent register options (`tfreg.registry.RegisterHook`): name -> command-line flag.
METHOD_OPTIONS = {"recursions": "--cascades"}

#: output file names inside the output folder.
OUTPUTS = {"warped": "warped.nii.gz", "disp": "disp.nii.gz",
           "warped_labels": "warped_labels.nii.gz", "report": "report.json",
           "disp_inverse": "disp_inverse.nii.gz", "affine": "affine.mat",
           "affine_txt": "affine.txt", "itk_warp": "itk_warp.nii.gz",
           "itk_inverse_warp": "itk_inverse_warp.nii.gz"}
#: files an earlier `register` (or `show`) left in an output folder that a new run removes when
#: it does not write them again (they would describe another registration).
STALE_OUTPUTS = tuple(OUTPUTS.values()) + ("overview.png",)


@dataclass
class RegisterResult:
    """Arrays and report of one registration (all on the fixed grid).

    Attributes:
        warped: `(*S,)` float32 warped moving image.
        disp: `(*S, N)` float32 displacement, voxels, pull.
        warped_labels: `(*S,)` int32 warped moving labels, or None.
        report: JSON-safe dict (see `register_volumes`).
        affine: `(N, N+1)` centred voxel affine of the affine stage (`tfreg.instance`) or of
            the model's affine part (its method's `RegisterReport.affine`), or None:
            `disp(x) = Aff(x + warp(x)) - x` with `warp` the deformable part.
        inverse: `(*S, N)` float32 inverse displacement on the fixed grid (fixed voxels, pull:
            `x = y + inverse(y)` satisfies `x + disp(x) = y`), or None when not asked for.
        inverse_warp: `(*S, N)` float32 inverse of the deformable part alone (fixed grid), or
            None.
        maps: per-voxel maps a model's method adds (`tfreg.registry.RegisterReport.maps`), on
            the fixed grid, by name (written as ``<name>.nii.gz``).
    """

    warped: np.ndarray
    disp: np.ndarray
    warped_labels: np.ndarray | None
    report: dict[str, Any] = field(default_factory=dict)
    affine: np.ndarray | None = None
    inverse: np.ndarray | None = None
    inverse_warp: np.ndarray | None = None
    maps: dict[str, np.ndarray] = field(default_factory=dict)


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
    from tfreg.initialise import fixed_to_moving

    return fixed_to_moving(fixed, moving)


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

    from tfreg.ops.sampling import warp

    n = disp.shape[-1]
    if to_moving is not None:
        grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in disp.shape[:-1]],
                                    indexing="ij"), axis=-1)
        points = grid + disp
        coords = points @ to_moving[:n, :n].T + to_moving[:n, n]
        # warp adds the output grid: pass coordinates relative to it
        disp = (coords - grid).astype(np.float32)
    image = moving[None, ..., None]
    fill = None
    if interp == "nearest":
        image = image.astype(np.int32)
        fill = 0 if to_moving is not None else None
    elif to_moving is not None:
        fill = float(moving.min())
    out = warp(tf.constant(image), tf.constant(disp[None], tf.float32), interp=interp,
                      fill_value=fill)
    return out.numpy()[0, ..., 0]


# -------------------------------------------------------------------------------------- loading
def load_pair(fixed: str | Path, moving: str | Path, fixed_labels: str | Path | None = None,
              moving_labels: str | Path | None = None
              ) -> tuple[Volume, Volume, Volume | None, Volume | None]:
    """Load and cross-check a pair and its optional label maps.

    Raises:
        InputError: one line naming the file: unreadable, wrong rank, NaN, a label map whose grid
            differs from its image's beyond `tfreg.io.check_label_grid`'s tolerance (a small
            difference is logged as a warning on the "tfreg" logger and the image's header is
            used), 2D/3D mismatch, a label map given for only one side.
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
        note = check_label_grid(path, lab.affine, lab.shape, image.path, image.affine,
                                image.shape)
        if note:
            logging.getLogger("tfreg").warning(note)
            lab = Volume(lab.data, image.affine, image.header, lab.path, lab.vector)
        labels.append(lab)
    return fixed_v, moving_v, labels[0], labels[1]


def load_keypoints(fixed_csv: str | Path | None, moving_csv: str | Path | None,
                   fixed: Volume, moving: Volume) -> tuple[np.ndarray, np.ndarray] | None:
    """Read a pair of Learn2Reg keypoint CSVs (voxel coordinates of `fixed` and of `moving`).

    Raises:
        InputError: only one CSV given, unreadable or malformed rows, different point counts,
            a point outside its image.
    """
    from tfreg.metrics import read_keypoints

    if fixed_csv is None and moving_csv is None:
        return None
    if fixed_csv is None or moving_csv is None:
        given = fixed_csv if moving_csv is None else moving_csv
        raise InputError(f"{given}: TRE needs both fixed and moving keypoints")
    points = []
    for path, image in ((fixed_csv, fixed), (moving_csv, moving)):
        pts = read_keypoints(path, image.ndims)
        outside = np.any((pts < -0.5) | (pts > np.asarray(image.shape) - 0.5), axis=1)
        if outside.any():
            row = int(np.argmax(outside)) + 1
            raise InputError(f"{path}: keypoint {row} {pts[row - 1].tolist()} lies outside its "
                             f"image {image.path} {list(image.shape)} (voxel coordinates "
                             "expected)")
        points.append(pts)
    if len(points[0]) != len(points[1]):
        raise InputError(f"{moving_csv}: has {len(points[1])} keypoints but {fixed_csv} has "
                         f"{len(points[0])} (one moving point per fixed point)")
    return points[0], points[1]


def _check_image(volume: Volume) -> None:
    if volume.data.size == 0 or float(volume.data.max()) == float(volume.data.min()):
        raise InputError(f"{volume.path}: image is constant (nothing to register)")


# --------------------------------------------------------------------------------- the pipeline
def register_volumes(fixed: Volume, moving: Volume, *, fixed_labels: Volume | None = None,
                     moving_labels: Volume | None = None, config=None,
                     model: str | Path | None = None, finetune: int = 0,
                     recursions: int | None = None, device: str | None = None,
                     progress: Callable[[str, int, int, float], None] | None = None,
                     keypoints: tuple[np.ndarray, np.ndarray] | None = None,
                     init_disp: np.ndarray | None = None, inverse: bool = False,
                     model_init: bool = False,
                     outputs_ready: Callable[[np.ndarray, np.ndarray, np.ndarray | None], None]
                     | None = None) -> RegisterResult:
    """Register `moving` to `fixed` (loaded volumes; any grids, same number of axes).

    Args:
        fixed, moving: images from `tfreg.io.load_volume`.
        fixed_labels, moving_labels: optional label maps on their image's grid (both or none for
            Dice/HD95; `moving_labels` alone still gives `warped_labels`).
        config: `tfreg.instance.InstanceConfig` (default: the "accurate" preset), or a
            `tfreg.ops.lddmm.LddmmConfig` for optimisation-based LDDMM (no model).
        model: exported model folder; None = instance optimisation only.
        finetune: with `model`: instance-optimisation steps after the network (0 = none).
        model_init: with `model`: the network initialises instance optimisation. The affine
            stage of `config` (if it has one) runs first, the network registers the affinely
            aligned pair, and `finetune` steps at the finest level of `config` refine the
            composition (``tfreg register --init builtin``).
        recursions: with a recursive `model` (its method's `RegisterHook` takes the
            ``recursions`` option): run it with this many recursions; what the report gets is
            the method's (e.g. a table of the similarity after each recursion).
        device: "cpu", "gpu", "gpu:N" or None (TensorFlow's choice).
        progress: `progress(stage, step, total, loss)` callback.
        keypoints: optional `(fixed_points, moving_points)`, `(K, N)` voxel coordinates of
            matching keypoints on the fixed and on the moving grid (Learn2Reg CSVs, see
            `tfreg.metrics.read_keypoints`): the report gets the TRE.
        init_disp: instead of `model`: an external result `(*S, N)` (fixed voxels, pull, e.g.
            from `tfreg.transforms_io.read_transform`) refined by `finetune` steps.
        inverse: also compute the inverse (`RegisterResult.inverse`): exact for instance
            optimisation (analytic inverse affine, integration of the negated velocity),
            fixed-point inversion (`tfreg.ops.inverse`) otherwise; the report gets
            `inverse_method` and `inverse_consistency_mm` (see `inverse_consistency`).
        outputs_ready: called as ``outputs_ready(warped, disp, warped_labels)`` (the arrays of
            the result) as soon as they exist, before the checks and metrics, e.g. to start
            writing them meanwhile.

    Returns:
        `RegisterResult`. Its report holds: `runtime_seconds` (from the loaded volumes to the
        warped outputs: resampling, preprocessing, compilation, optimisation or prediction,
        warping; not file I/O, not the metrics), `device`, `method`, `similarity` and
        `similarity_before` (`tfreg.instance.local_ncc`), and the metrics of `score`:
        `folding_percent`, `sdlogj`, `sdlogj_l2r`, `ndv_percent`; with both label maps
        `dice`/`hd95_mm`/`hd95_vox` per label, `mean_dice`, `mean_hd95_mm`, `mean_hd95_vox`,
        `mean_dice_before` (labels resampled onto the fixed grid, not registered); with
        keypoints `tre_mm`, `tre_mm_before`, `keypoints`; `contrast` (`tfreg.contrast.check`: NMI
        before, after the affine stage and after, whether the result is worse than its start,
        the histogram distance) and `warnings` (one-line messages the command line prints);
        `resampled` (whether the moving grid differed), `stage_seconds`, `affine` (centred voxel
        affine of the fixed grid: the affine stage, or a model's affine part), `affine_world`
        (3D: the same as a `(4, 4)` map of RAS mm points, fixed -> original moving), `config`;
        for instance optimisation with an affine stage `initialisation` (the world-space start,
        `tfreg.initialise`: chosen candidate, coverage, NMI of each candidate); with a model whose
        method has a register report hook, its entries and `method_summary` (lines).
    """
    import tensorflow as tf

    from tfreg import contrast, instance
    from tfreg.ops.fields import compose
    from tfreg.ops.lddmm import LddmmConfig

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
    maps: dict[str, np.ndarray] = {}
    with tf.device(tf_device) if tf_device else contextlib.nullcontext():
        affine, inverse_warp, inverse_how = None, None, None
        if model is None and init_disp is None and isinstance(cfg, LddmmConfig):
            disp, inverse_warp, sim_before, sim_after = _lddmm(fixed_n, moving_n, fixed.spacing,
                                                               cfg, progress, report)
            affine_warped, used = None, "ncc"
        elif model is None and init_disp is None:
            result, _ = _instance(fixed, moving, fixed_n, moving_n, cfg, progress, report)
            disp, affine = result.disp, np.asarray(result.affine, np.float64)
            report.update(method="instance optimisation", config=_config_dict(result.config),
                          affine=np.asarray(result.affine).tolist(),
                          stage_seconds={k: round(v, 3) for k, v in result.stage_seconds.items()})
            sim_after = result.similarity
            sim_before = instance.local_ncc(fixed_n, moving_n)
            affine_warped = _affine_warp(moving, fixed, affine) if result.config.affine \
                else None
            used = result.config.similarity
            if inverse:
                inverse_warp = _velocity_inverse(result, disp.shape[:-1], cfg)
        else:
            if model is not None:
                start_disp, net_moving = None, moving_on_fixed
                if model_init and isinstance(cfg, instance.InstanceConfig) and cfg.affine:
                    start_disp, affine = _affine_stage(fixed, moving, fixed_n, moving_n, cfg,
                                                       progress, report)
                    net_moving = _sample_moving(moving_on_fixed, start_disp, None, "linear")
                disp, model_info = _predict(model, fixed, Volume(net_moving, fixed.affine,
                                                                None, moving.path), progress,
                                            options={"recursions": recursions})
                report.update(method=f"model {model_info['method']}", model=str(model),
                              model_inshape=list(model_info["inshape"]))
                if start_disp is not None:   # moving(a(y)) with y = x + u_net(x)
                    disp = compose(tf.constant(start_disp[None]),
                                          tf.constant(disp[None], tf.float32)).numpy()[0]
                else:
                    affine = model_info.get("affine")      # the method's affine part, or None
                if model_init:
                    report["method"] = (f"instance optimisation initialised by the model "
                                        f"{model_info['method']}")
                if affine is not None:
                    report["affine"] = affine.tolist()
                if inverse and finetune == 0 and model_info["inverse"] is not None:
                    # the network's own inverse; with an affine part, that of the rest alone
                    inverse_warp = _rest_inverse(model_info["inverse"], affine)
                    inverse_how = "the model's inverse output"
                extra = model_info.get("report")
                if extra is not None:
                    report.update(extra.entries)
                    maps = dict(model_info.get("maps") or {})
                    if extra.lines:
                        report["method_summary"] = list(extra.lines)
            else:
                disp = np.asarray(init_disp, np.float32)
                if disp.shape != (*fixed.shape, fixed.ndims):
                    raise InputError(f"initial transform: shape {disp.shape} does not match the "
                                     f"fixed grid {(*fixed.shape, fixed.ndims)}")
                report.update(method="external transform")
            if finetune > 0:
                disp, stage = _finetune(fixed_n, moving_n, disp, cfg, finetune, progress)
                report.update(finetune_steps=int(finetune), config=_config_dict(cfg),
                              stage_seconds={**report.get("stage_seconds", {}), **stage})
            sim_before = instance.local_ncc(fixed_n, moving_n)
            sim_after = instance.local_ncc(fixed_n, _sample_moving(moving_n, disp, None, "linear"))
            affine_warped = None if affine is None else _affine_warp(moving, fixed, affine)
            used = cfg.similarity if finetune > 0 else "model"
        inverse_disp = None
        if inverse:
            inverse_disp, inverse_warp, how = _inverse(disp, affine, inverse_warp)
            how = inverse_how or how
            if isinstance(cfg, LddmmConfig):
                how = "exact: the forward map of the geodesic shooting"
            report.update(inverse_method=how,
                          inverse_consistency_mm=inverse_consistency(disp, inverse_disp,
                                                                     fixed.affine))
        warped = _sample_moving(moving.data.astype(np.float32), disp, to_moving, "linear")
        warped_labels = None
        if moving_labels is not None:
            warped_labels = _sample_moving(moving_labels.data, disp, to_moving, "nearest")
    runtime = time.perf_counter() - start
    warped = warped.astype(np.float32)
    disp = disp.astype(np.float32)
    if outputs_ready is not None:
        outputs_ready(warped, disp, warped_labels)
    if affine is not None and fixed.ndims == 3:
        from tfreg.transforms_io import affine_to_physical

        report["affine_world"] = affine_to_physical(affine, fixed.affine, fixed.shape).tolist()
    report.update(
        runtime_seconds=round(runtime, 3),
        device=device_name(tf_device),
        fixed_shape=list(fixed.shape), moving_shape=list(moving.shape), resampled=resampled,
        similarity=round(float(sim_after), 5), similarity_before=round(float(sim_before), 5),
        similarity_metric="local NCC, window 7, signed, weighted by fixed-image contrast "
                          "(1 = identical images)",
    )
    # not part of the runtime: the checks of tfreg.contrast (worse than its start? contrasts?),
    # TensorFlow ops in a second thread while the NumPy/SciPy metrics of `score` run here (on
    # 2 cores about 1.5 s less than one after the other at 96x112x96)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tfreg-check") as pool:
        pending_checks = pool.submit(contrast.check, fixed_n, moving_n,
                                     _sample_moving(moving_n, disp, None, "linear"),
                                     affine_warped, used)
        metrics = _score_pair(disp, fixed, fixed_labels, moving_labels, warped_labels, to_moving,
                              keypoints)
        checks = pending_checks.result()
    report.update(contrast=checks.to_dict(),
                  warnings=report.pop("init_warnings", []) + list(checks.warnings))
    report.update(metrics)
    return RegisterResult(warped, disp, warped_labels, report,
                          affine=affine, inverse=inverse_disp, inverse_warp=inverse_warp,
                          maps=maps)


def _score_pair(disp: np.ndarray, fixed: Volume, fixed_labels: Volume | None,
                moving_labels: Volume | None, warped_labels: np.ndarray | None,
                to_moving: np.ndarray | None,
                keypoints: tuple[np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    """`score` of a registered pair: labels resampled without registration for the Dice before,
    moving keypoints mapped onto the fixed grid."""
    unregistered = None
    if fixed_labels is not None and moving_labels is not None:
        unregistered = _sample_moving(moving_labels.data, np.zeros_like(disp), to_moving,
                                      "nearest")
    moving_points = None
    if keypoints is not None:
        moving_points = _points_on_fixed(keypoints[1], to_moving)
    return score(disp, fixed.spacing,
                 fixed_labels=None if fixed_labels is None else fixed_labels.data,
                 warped_labels=warped_labels if fixed_labels is not None else None,
                 unregistered_labels=unregistered,
                 keypoints=None if keypoints is None else (keypoints[0], moving_points))


def _affine_warp(moving: Volume, fixed: Volume, affine: np.ndarray) -> np.ndarray:
    """The moving image (normalised on its own grid) after the affine stage alone (centred
    `(N, N+1)` affine on the fixed grid), sampled once from its own grid."""
    import tensorflow as tf

    from tfreg import initialise
    from tfreg.ops.fields import affine_to_disp

    disp = affine_to_disp(tf.constant(np.asarray(affine, np.float32)[None]),
                                 fixed.shape)
    to_moving = None if same_grid(fixed, moving) else _fixed_to_moving(fixed, moving)
    return _sample_moving(initialise.normalise(moving.data), np.asarray(disp)[0], to_moving,
                          "linear")


def _instance(fixed: Volume, moving: Volume, fixed_n: np.ndarray, moving_n: np.ndarray, cfg,
              progress: Callable | None, report: dict):
    """Instance optimisation of a loaded pair, initialised in world space.

    With an affine stage, `tfreg.initialise.initial_alignment` measures both images on their
    own grids first and picks the headers, the centres of the foregrounds or one of their
    right-angle rotations: the start ``G`` (fixed voxels -> the moving image resampled by the
    headers, `moving_n`). The moving image is then resampled onto the fixed grid once, from its
    own grid, through ``G0``: ``G`` itself, or, when the fixed->moving voxel map through ``G`` is
    a signed axis permutation up to rounding, that map with its entries rounded (an exact copy of
    voxels, no interpolation). `tfreg.instance.register_arrays` starts from the rest,
    ``R = G0^-1 G`` (analytic), and the result is composed back: ``disp(x) = G0(x + disp_rel(x))
    - x`` relative to `moving_n`, the affine ``G0 o A_rel``. Resampling the headers alone could
    leave most of the head outside the fixed grid; resampling through a sub-voxel ``G`` blurs
    (it cost 0.07 Dice on a 48x40 test pair). With rounding, headers that differ by right
    angles and whole voxels give the same optimisation problem.

    The report gets `initialisation` (and a warning line when the moving image covers less than
    `initialise.COVERAGE_WARN` of the fixed foreground).

    Raises:
        InputError: it covers less than `initialise.COVERAGE_REFUSE` of the fixed foreground
            even after the initial alignment.
    """
    from tfreg import initialise, instance
    from tfreg.io import resample_to_grid

    if not cfg.affine:
        return instance.register_arrays(fixed_n, moving_n, cfg, progress=progress), None
    start = initialise.initial_alignment(fixed, moving)
    report["initialisation"] = start.to_dict()
    warning = initialise.coverage_warning(start, str(fixed.path), str(moving.path))
    if warning:
        report.setdefault("init_warnings", []).append(warning)
    n = fixed.ndims
    to_moving = _fixed_to_moving(fixed, moving)
    direct = to_moving @ start.voxel_map  # fixed voxels -> moving voxels
    rounded = np.round(direct)
    exact = np.allclose(direct[:n, :n], rounded[:n, :n], atol=1e-4)
    sampled = rounded if exact else direct
    g4 = np.eye(4)
    keep = list(range(n)) + [3]
    g4[np.ix_(keep, keep)] = sampled
    moving_start = resample_to_grid(moving, moving.affine @ g4, fixed.shape, order=1,
                                    fill_value=float(moving.data.min()))
    g0 = np.linalg.inv(to_moving) @ sampled  # fixed voxels -> fixed voxels
    rest = initialise.Initialisation(np.linalg.inv(g0) @ start.voxel_map, start.method,
                                     start.coverage)
    result = instance.register_arrays(fixed_n, _normalise_like(moving_start, moving.data), cfg,
                                      progress=progress, init_affine=rest.centred(fixed.shape))
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in fixed.shape],
                                indexing="ij"), axis=-1)
    result.disp = ((grid + result.disp) @ g0[:n, :n].T + g0[:n, n] - grid).astype(np.float32)
    outer = initialise.Initialisation(g0, start.method, start.coverage).centred(fixed.shape)
    rel = np.asarray(result.affine, np.float64)
    result.affine = np.concatenate([outer[:, :n] @ rel[:, :n],
                                    (outer[:, :n] @ rel[:, n] + outer[:, n])[:, None]], axis=1)
    return result, start


def _affine_stage(fixed: Volume, moving: Volume, fixed_n: np.ndarray, moving_n: np.ndarray,
                  cfg, progress: Callable | None, report: dict) -> tuple[np.ndarray, np.ndarray]:
    """The initialisation and affine stage of `cfg` alone (`_instance` without levels).

    Returns:
        `(disp, affine)`: the affine displacement `(*S, N)` on the fixed grid relative to
        `moving_n` (the moving image resampled by the headers), and its centred `(N, N+1)`
        voxel affine. The report gets `initialisation`, `affine` and the stage's time.
    """
    import dataclasses

    only_affine = dataclasses.replace(cfg, levels=(), iterations=(), learning_rate=(),
                                      ncc_win=())
    result, _ = _instance(fixed, moving, fixed_n, moving_n, only_affine, progress, report)
    affine = np.asarray(result.affine, np.float64)
    report.update(affine=affine.tolist(),
                  stage_seconds={k: round(v, 3) for k, v in result.stage_seconds.items()})
    return np.asarray(result.disp, np.float32), affine


def _normalise_like(data: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`data` mapped to [0, 1] by the 0th and 99.9th percentiles of `reference` (the image on
    its own grid, so resampling fill does not shift the window)."""
    from tfreg.ops.intensity import fit_intensity_map

    out = fit_intensity_map(reference, "percentile", (0.0, 99.9)).apply(data)
    return np.clip(out, 0.0, 1.0, out=out)


def _lddmm(fixed_n: np.ndarray, moving_n: np.ndarray, spacing, cfg,
           progress: Callable | None, report: dict) -> tuple:
    """Optimisation-based LDDMM on normalised images of one grid (no affine stage: the pair is
    expected to be affinely aligned). Returns ``(disp, forward map, similarity before, after)``
    and fills the report's `method`, `config`, `stage_seconds` and `lddmm_energy`."""
    import dataclasses

    from tfreg import instance
    from tfreg.ops import lddmm

    result = lddmm.register_pair(fixed_n, moving_n, spacing, cfg, progress=progress)
    first, last = result.history[0], result.history[-1]
    report.update(method="lddmm", config=dataclasses.asdict(cfg),
                  stage_seconds={"lddmm": round(result.seconds, 3)},
                  lddmm_energy={"regularity": [round(first[0], 6), round(last[0], 6)],
                                "image": [round(first[1], 6), round(last[1], 6)],
                                "note": "per voxel, before -> after"})
    return (result.disp, result.forward, instance.local_ncc(fixed_n, moving_n),
            instance.local_ncc(fixed_n, result.warped))


def _points_on_fixed(points: np.ndarray, to_moving: np.ndarray | None) -> np.ndarray:
    """Moving-grid voxel coordinates `(K, N)` -> fixed-grid voxel coordinates."""
    points = np.asarray(points, np.float64)
    if to_moving is None:
        return points
    n = points.shape[1]
    back = np.linalg.inv(to_moving)
    return points @ back[:n, :n].T + back[:n, n]


def score(disp: np.ndarray, spacing, *, fixed_labels: np.ndarray | None = None,
          warped_labels: np.ndarray | None = None,
          unregistered_labels: np.ndarray | None = None,
          keypoints: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """The metrics of one registered pair, under the report's names (docs/register.md).

    Args:
        disp: `(*S, N)` displacement in fixed voxels.
        spacing: fixed voxel size in mm.
        fixed_labels, warped_labels: `(*S,)` label maps (both, or none).
        unregistered_labels: `(*S,)` moving labels on the fixed grid without registration
            (gives `mean_dice_before`).
        keypoints: `(fixed_points, moving_points)`, both in fixed-grid voxel coordinates.

    Returns:
        `folding_percent`, `sdlogj`, `sdlogj_l2r` (Learn2Reg's SDlogJ; when every size >= 5),
        `ndv_percent` (LUMIR's NDV); with labels `dice`, `hd95_mm`, `hd95_vox` per label and
        their means `mean_dice`, `mean_hd95_mm`, `mean_hd95_vox` (Learn2Reg's HD95, spacing 1),
        `mean_dice_before`; with keypoints `tre_mm` and `tre_mm_before` (means over
        keypoints, Learn2Reg's TRE) and `keypoints` (their number).
    """
    from tfreg import metrics

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tfreg-hd95") as pool:
        # HD95 (SciPy's KD-tree queries, which release the GIL) beside the Jacobian metrics
        pending_hd = None
        if fixed_labels is not None and warped_labels is not None:
            labels = sorted(int(v) for v in np.unique(fixed_labels) if v != 0)
            spacings = [spacing] if np.allclose(spacing, 1.0) else [spacing, 1.0]
            pending_hd = pool.submit(metrics.hd95_spacings, fixed_labels, warped_labels,
                                     spacings, labels)
        out: dict[str, Any] = {name: None if value is None else round(value, 5)
                               for name, value in metrics.jacobian_summary(disp).items()}
        out["ndv_percent"] = round(metrics.ndv_percent(disp), 6)
        hd_all = None if pending_hd is None else pending_hd.result()
    if hd_all is not None:
        hd, hd_vox = hd_all[0], hd_all[-1]
        dice = metrics.dice(fixed_labels, warped_labels, labels=labels)
        out.update(
            mean_dice=_round(metrics.mean_dice(dice)), mean_hd95_mm=_round(metrics.mean_dice(hd)),
            mean_hd95_vox=_round(metrics.mean_dice(hd_vox)),
            dice={str(k): _round(v) for k, v in dice.items()},
            hd95_mm={str(k): _round(v) for k, v in hd.items()},
            hd95_vox={str(k): _round(v) for k, v in hd_vox.items()},
        )
        if unregistered_labels is not None:
            before = metrics.dice(fixed_labels, unregistered_labels, labels=labels)
            out["mean_dice_before"] = _round(metrics.mean_dice(before))
    if keypoints is not None:
        fixed_points, moving_points = keypoints
        errors = metrics.tre(fixed_points, moving_points, disp, spacing)
        before = metrics.tre(fixed_points, moving_points, np.zeros_like(disp), spacing)
        out.update(tre_mm=_round(errors.mean()), tre_mm_before=_round(before.mean()),
                   keypoints=int(len(errors)))
    return out


# ------------------------------------------------------------------------------------- inverse
def _velocity_inverse(result, shape: tuple[int, ...], cfg) -> np.ndarray | None:
    """Inverse of the deformable part of an instance-optimisation result: ``exp(-v)``."""
    from tfreg import instance

    if result.velocity is None:
        return np.zeros((*shape, len(shape)), np.float32)
    steps = (result.config or cfg).int_steps
    return instance.velocity_displacement(-result.velocity, result.velocity_level, shape,
                                          steps).numpy()


def _inverse(disp: np.ndarray, affine: np.ndarray | None, inverse_warp: np.ndarray | None
             ) -> tuple[np.ndarray, np.ndarray, str]:
    """Inverse of ``x -> Aff(x + v(x))`` on the fixed grid: ``y -> z + v^-1(z)``, ``z = Aff^-1 y``.

    Args:
        disp: `(*S, N)` full displacement (voxels, pull).
        affine: `(N, N+1)` centred voxel affine, or None (identity).
        inverse_warp: `(*S, N)` exact inverse of the deformable part ``v``, or None: then ``v``
            is inverted by fixed-point iteration.

    Returns:
        `(inverse displacement, inverse of the deformable part, method description)`.
    """
    import tensorflow as tf

    from tfreg.ops.fields import affine_to_disp, compose
    from tfreg.ops.inverse import invert_displacement
    from tfreg.transforms_io import deformable_part

    n = disp.shape[-1]
    how = ("exact: inverse affine and integration of the negated velocity" if affine is not None
           else "the model's inverse output")
    if inverse_warp is None:
        warp = disp if affine is None else deformable_part(disp, affine)
        inverse_warp = invert_displacement(warp[None].astype(np.float32), iterations=200,
                                           tolerance=1e-3).numpy()[0]
        how = "fixed-point inversion of the displacement"
    if affine is None:
        return inverse_warp.astype(np.float32), inverse_warp.astype(np.float32), how
    a = np.asarray(affine, np.float64)
    a_inv = np.linalg.inv(a[:, :n])
    inv_affine = np.concatenate([a_inv, (-a_inv @ a[:, n])[:, None]], axis=1)
    to_z = affine_to_disp(inv_affine[None].astype(np.float32), disp.shape[:-1])
    total = compose(tf.constant(inverse_warp[None], tf.float32), to_z)
    return total.numpy()[0], inverse_warp.astype(np.float32), how


def _rest_inverse(inverse: np.ndarray, affine: np.ndarray | None) -> np.ndarray:
    """The inverse of the deformable part ``w`` from a model's full inverse ``phi^-1`` (fixed
    grid, voxels, pull), for ``phi = Aff o (id + w)``: ``(id + w)^-1 = phi^-1 o Aff``."""
    if affine is None:
        return inverse
    import tensorflow as tf

    from tfreg.ops.fields import affine_to_disp, compose

    to_aff = affine_to_disp(np.asarray(affine, np.float32)[None], inverse.shape[:-1])
    return compose(tf.constant(np.asarray(inverse, np.float32)[None]), to_aff).numpy()[0]


def inverse_consistency(disp: np.ndarray, inverse: np.ndarray, affine: np.ndarray
                        ) -> dict[str, float]:
    """``|phi(phi^-1(y)) - y|`` in mm over the fixed grid points whose inverse image lies inside
    the grid (elsewhere `disp` is only extended by its border values).

    Returns:
        ``{"mean": mm, "max": mm, "fraction": share of voxels evaluated}``.
    """
    from tfreg.ops.inverse import composition_residual, residual_mm

    residual = composition_residual(disp[None], inverse[None]).numpy()[0]
    shape = np.asarray(disp.shape[:-1])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    target = grid + inverse
    inside = np.all((target >= 0) & (target <= shape - 1), axis=-1)
    if not inside.any():
        return {"mean": None, "max": None, "fraction": 0.0}
    stats = residual_mm(residual[inside], affine)
    return {"mean": round(stats["mean_mm"], 6), "max": round(stats["max_mm"], 6),
            "fraction": round(float(inside.mean()), 4)}


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
        except TfregError as err:
            raise ConfigError(f"{flags}: {reason(err)}") from None
        try:
            model = load_model(model_dir, overrides=overrides, rebuild=True)
        except TfregError as err:
            raise ConfigError(f"{flags}: model {model_dir}: {reason(err)}") from None
    else:
        model = _load_model_once(str(Path(model_dir).resolve()),
                                 _mtime(Path(model_dir) / "tfreg_model.json"))
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
    _, disp, inverse = model.register(f_in, m_in, inverse=True)
    if progress:
        progress("network", 1, 1, float("nan"))
    info = {"method": model.method, "inshape": model.inshape,
            # the network's inverse lives on the moving image's preprocessed grid
            "inverse": None if inverse is None else field_to_source(inverse, rec_m, rec_f)}
    if rebuild and hook.report is not None:
        import tensorflow as tf

        inputs = loaded.method.io.model_inputs(
            model.config, tf.constant(f_in[None, ..., None], tf.float32),
            tf.constant(m_in[None, ..., None], tf.float32))
        inputs = {k: np.asarray(v) for k, v in inputs.items()}
        extra = hook.report(model.keras_model, saved_config, inputs, given)
        if extra is not None and extra.affine is not None:
            info["affine"] = _model_affine(extra.affine, rec_f, rec_m, name)
        if extra is not None and extra.maps:
            # method maps live on the model grid: resample each onto the fixed image's grid
            info["maps"] = {key: rec_f.restore(np.asarray(array, np.float32), fill_value=0.0)
                            for key, array in extra.maps.items()}
        info["report"] = extra
    return field_to_source(disp, rec_f, rec_m), info


def _model_affine(affine, rec_f, rec_m, method: str) -> np.ndarray:
    """A register hook's affine (model grid) as a centred voxel affine of the fixed grid."""
    from tfreg.data import affine_to_source
    from tfreg.errors import MethodError

    n = rec_f.ndims
    affine = np.asarray(affine, np.float64)
    if affine.shape != (n, n + 1) or not np.all(np.isfinite(affine)):
        raise MethodError(f"method '{method}': its register hook's affine must be a finite "
                          f"({n}, {n + 1}) array, got shape {affine.shape}")
    return affine_to_source(affine, rec_f, rec_m)


@functools.lru_cache(maxsize=2)
def _load_model_once(model_dir: str, mtime: float):
    """`tfreg.export.load_model`, loaded once per folder (and modification time) per process,
    so `evaluate` does not reload the model for every pair."""
    from tfreg.export import load_model

    return load_model(model_dir)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


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

    from tfreg import instance
    from tfreg.ops.fields import compose

    level = cfg.levels[-1] if cfg.levels else 1
    index = len(cfg.levels) - 1 if cfg.levels else 0
    ft = dataclasses.replace(
        cfg, levels=(level,), iterations=(int(steps),),
        learning_rate=(cfg.learning_rate[index] if cfg.levels else 0.1,),
        ncc_win=(cfg.ncc_win[index] if cfg.levels else 5,), affine=False)
    prewarped = _sample_moving(moving_n, disp, None, "linear")
    result = instance.register_arrays(fixed_n, prewarped, ft, progress=progress)
    total = compose(tf.constant(disp[None]), tf.constant(result.disp[None]))
    return total.numpy()[0], {k: round(v, 3) for k, v in result.stage_seconds.items()}


# ------------------------------------------------------------------------------------ file level
def register_files(fixed: str | Path, moving: str | Path, out_dir: str | Path, *,
                   fixed_labels: str | Path | None = None, moving_labels: str | Path | None = None,
                   config=None, model: str | Path | None = None, finetune: int = 0,
                   recursions: int | None = None, device: str | None = None,
                   progress: Callable[[str, int, int, float], None] | None = None,
                   fixed_keypoints: str | Path | None = None,
                   moving_keypoints: str | Path | None = None,
                   init: str | Path | None = None, init_affine: str | Path | None = None,
                   inverse: bool = False, itk: bool = False, model_init: bool = False
                   ) -> tuple[dict, dict[str, Path]]:
    """Register two files and write the outputs into `out_dir` (atomic writes).

    Args:
        init, init_affine: instead of `model`, start from an external transform: a field file
            (tfreg, world or ITK/ANTs) and/or an ITK/ANTs affine applied after it
            (`tfreg.transforms_io.read_transform`), refined by `finetune` steps.
        inverse: also write `disp_inverse.nii.gz` (and `itk_inverse_warp.nii.gz` with `itk`).
        itk: also write `itk_warp.nii.gz` and `affine.txt` (ITK/ANTs, LPS mm).
        Others: see `register_volumes`.
    `fixed_keypoints`/`moving_keypoints`: Learn2Reg keypoint CSVs (both or none) for the TRE.

    Returns:
        `(report, written)` with `written` = output name -> path.
    """
    fixed_v, moving_v, fixed_l, moving_l = load_pair(fixed, moving, fixed_labels, moving_labels)
    keypoints = load_keypoints(fixed_keypoints, moving_keypoints, fixed_v, moving_v)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    init_disp = None
    if init is not None or init_affine is not None:
        from tfreg.transforms_io import read_transform

        if model is not None:
            raise ConfigError("--init: give either --model or an initial transform, not both")
        init_disp = read_transform(init, affine=init_affine, reference=fixed_v).data
    if (itk or init_disp is not None) and fixed_v.ndims != 3:
        raise InputError(f"{fixed}: ITK/ANTs transforms are supported for 3D images only")
    # the volumes are compressed in parallel threads (zlib releases the GIL; the field alone
    # takes ~0.4 s at 96x112x96), started as soon as they exist: meanwhile the checks and
    # metrics run
    pending: dict[str, concurrent.futures.Future] = {}

    def write(warped: np.ndarray, disp: np.ndarray, warped_labels: np.ndarray | None) -> None:
        volumes = {"warped": (warped, fixed_v.header), "disp": (disp, None)}
        if warped_labels is not None:
            volumes["warped_labels"] = (warped_labels, fixed_v.header)
        for name, (data, header) in volumes.items():
            pending[name] = pool.submit(save_volume, out_dir / OUTPUTS[name], data,
                                        fixed_v.affine, header)

    with concurrent.futures.ThreadPoolExecutor(3, thread_name_prefix="tfreg-write") as pool:
        result = register_volumes(fixed_v, moving_v, fixed_labels=fixed_l,
                                  moving_labels=moving_l, config=config, model=model,
                                  finetune=finetune, recursions=recursions, device=device,
                                  progress=progress, keypoints=keypoints, init_disp=init_disp,
                                  inverse=inverse, model_init=model_init, outputs_ready=write)
        if not pending:
            write(result.warped, result.disp, result.warped_labels)
        written = {name: job.result() for name, job in pending.items()}
    report = dict(result.report)
    report.update(fixed=_relative_to(fixed, out_dir), moving=_relative_to(moving, out_dir),
                  fixed_labels=_relative_to(fixed_labels, out_dir),
                  moving_labels=_relative_to(moving_labels, out_dir),
                  paths_relative_to="report")
    written.update(_write_transforms(out_dir, result, fixed_v, moving_v, itk=itk))
    for name, array in result.maps.items():   # a method's per-voxel maps (RegisterReport.maps)
        if name in OUTPUTS or name in written:
            raise ConfigError(f"model {model}: its method's map '{name}' would replace "
                              f"register's own output")
        written[name] = save_volume(out_dir / f"{name}.nii.gz", array, fixed_v.affine)
    report["outputs"] = {k: str(v) for k, v in written.items()}
    written["report"] = write_json(out_dir / OUTPUTS["report"], report)
    for name in STALE_OUTPUTS:  # an earlier run's outputs that this run does not replace
        if name not in {p.name for p in written.values()}:
            (out_dir / name).unlink(missing_ok=True)
    return report, written


def _relative_to(path: str | Path | None, out_dir: Path) -> str | None:
    """`path` relative to the output folder (as `report.json` records inputs), so the report
    stays valid from any working directory and when the folders move together."""
    if path is None:
        return None
    return os.path.relpath(Path(path).absolute(), Path(out_dir).absolute())


def _write_transforms(out_dir: Path, result: RegisterResult, fixed: Volume, moving: Volume, *,
                      itk: bool) -> dict[str, Path]:
    """`affine.mat` (3D), `disp_inverse.nii.gz`, and with `itk` the ITK/ANTs files."""
    from tfreg import transforms_io as tio

    written: dict[str, Path] = {}
    n = fixed.ndims
    affine = result.affine if result.affine is not None else np.eye(n, n + 1)
    if n == 3:
        physical = tio.affine_to_physical(affine, fixed.affine, fixed.shape)
        centre = fixed.affine[:3, :3] @ ((np.asarray(fixed.shape) - 1) / 2) + fixed.affine[:3, 3]
        written["affine"] = tio.write_itk_affine(out_dir / OUTPUTS["affine"], physical, centre)
        if itk:
            written["affine_txt"] = tio.write_itk_affine(out_dir / OUTPUTS["affine_txt"],
                                                         physical, centre)
            warp = tio.deformable_part(result.disp, affine)
            written["itk_warp"] = tio.save_field(out_dir / OUTPUTS["itk_warp"], warp,
                                                 fixed.affine, "itk")
            if result.inverse_warp is not None:
                written["itk_inverse_warp"] = tio.save_field(
                    out_dir / OUTPUTS["itk_inverse_warp"], result.inverse_warp, fixed.affine, "itk")
    if result.inverse is not None:
        written["disp_inverse"] = save_volume(out_dir / OUTPUTS["disp_inverse"],
                                              _inverse_on_moving(result, fixed, moving),
                                              moving.affine)
    return written


def _inverse_on_moving(result: RegisterResult, fixed: Volume, moving: Volume) -> np.ndarray:
    """The inverse as a field on the moving image's grid (its voxels, pull).

    For a moving voxel `m`: `y = G m` in fixed voxels (`G` the moving->fixed voxel map through the
    two affines), `z = Aff^-1(y)` exactly, `x = z + v^-1(z)` (the deformable part's inverse,
    interpolated once, border values outside), and the field is `G^-1 x - m`. On a shared grid
    this is `RegisterResult.inverse`.
    """
    if same_grid(fixed, moving):
        return result.inverse
    from scipy import ndimage

    n = fixed.ndims
    to_fixed = _fixed_to_moving(moving, fixed)  # moving voxels -> fixed voxels
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in moving.shape],
                                indexing="ij"), axis=-1)
    y = grid @ to_fixed[:n, :n].T + to_fixed[:n, n]
    if result.affine is None:
        z = y
    else:
        a = np.asarray(result.affine, np.float64)
        centre = (np.asarray(fixed.shape, np.float64) - 1) / 2.0
        z = (y - centre - a[:, n]) @ np.linalg.inv(a[:, :n]).T + centre
    coords = np.moveaxis(z, -1, 0)
    x = z + np.stack([ndimage.map_coordinates(result.inverse_warp[..., c], coords, order=1,
                                              mode="nearest") for c in range(n)], axis=-1)
    back = np.linalg.inv(to_fixed)
    return (x @ back[:n, :n].T + back[:n, n] - grid).astype(np.float32)


def write_json(path: str | Path, data: dict) -> Path:
    """Write `data` as indented JSON, atomically."""
    path = Path(path)
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def warp_file(moving: str | Path, disp: str | Path | None, out: str | Path, *,
              nearest: bool = False, affine: str | Path | None = None,
              reference: str | Path | None = None) -> Path:
    """Apply a displacement field file to an image or label map and write the result.

    The field lives on the fixed grid (its affine); the moving image may be on another grid: it is
    sampled at `T(x + disp(x))` with `T` the fixed->moving voxel map from the two affines.

    Args:
        moving: image or label map to warp.
        disp: a field in any format `tfreg.transforms_io.read_transform` reads (tfreg voxels,
            world mm, ITK/ANTs warp), or None with `affine`.
        out: output NIfTI, on the field's grid (or `reference`'s).
        nearest: nearest-neighbour interpolation (label maps).
        affine: ITK/ANTs affine applied after the warp (ANTs' `transformlist=[warp, affine]`).
        reference: the fixed image defining the output grid (needed for an affine alone).

    Raises:
        InputError: unreadable files, a field that is not `(*S, N)`, 2D/3D mismatch.
    """
    from tfreg.transforms_io import field_format, read_transform

    if disp is None or affine is not None or reference is not None \
            or field_format(disp) != "tfreg":
        field_v = read_transform(disp, affine=affine, reference=reference)
        disp = disp or affine
    else:
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
