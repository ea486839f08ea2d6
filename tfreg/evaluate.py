"""Evaluate registration on a data spec's split: one row per pair and a summary.

Each pair goes through the same pipeline as `tfreg register` (`tfreg.register.register_volumes`):
the original files, moving resampled onto the fixed grid when needed, then a trained model or
instance optimisation. Metrics are computed on the fixed grid: Dice and HD95 (mm and voxels) over
the labels of the fixed label map, %folding, SDlogJ (plain and Learn2Reg's) and NDV of the
displacement, TRE with keypoints, the local NCC, and the runtime (excluding file I/O, including
compilation; the first pair of a shape pays the XLA compilation, later pairs of the same shape
reuse it). `format_table` prints the summary as a Markdown table under the leaderboards' names.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tfreg.errors import ConfigError, InputError
from tfreg.io import atomic_path, nifti_stem

__all__ = ["evaluate_spec", "summarize_rows", "format_summary", "format_table", "write_csv",
           "read_csv", "COLUMNS", "TABLE"]

#: CSV columns, in order.
COLUMNS = ("pair", "fixed", "moving", "mean_dice", "mean_dice_before", "mean_hd95_mm",
           "mean_hd95_vox", "folding_percent", "sdlogj", "sdlogj_l2r", "ndv_percent", "tre_mm",
           "tre_mm_before", "similarity", "similarity_before", "runtime_seconds")

#: Rows of the printed table: (column, what it is, the leaderboards' names for it, digits).
TABLE = (
    ("mean_dice", "Dice", "Learn2Reg DSC, LUMIR Dice", 4),
    ("mean_dice_before", "Dice before registration", "", 4),
    ("mean_hd95_mm", "HD95 (mm)", "LUMIR HD95", 3),
    ("mean_hd95_vox", "HD95 (voxels)", "Learn2Reg HD95 (OASIS)", 3),
    ("sdlogj", "SDlogJ", "std of log det J", 4),
    ("sdlogj_l2r", "SDlogJ, Learn2Reg's (+3, crop 2)", "Learn2Reg SDlogJ (LogJacDetStd)", 4),
    ("folding_percent", "% folding (det J <= 0)", "", 4),
    ("ndv_percent", "NDV (%)", "LUMIR NDV", 4),
    ("tre_mm", "TRE (mm)", "Learn2Reg TRE", 3),
    ("tre_mm_before", "TRE before registration (mm)", "", 3),
    ("similarity", "local NCC", "", 4),
    ("runtime_seconds", "runtime (s)", "", 2),
)


def evaluate_spec(spec_path: str | Path, *, split: str = "test", config=None,
                  model: str | Path | None = None, finetune: int = 0, device: str | None = None,
                  limit: int | None = None, keypoints: str | Path | None = None,
                  transforms: str | Path | None = None,
                  l2r_submission: str | Path | None = None,
                  on_pair: Callable[[int, int, dict], None] | None = None,
                  progress: Callable[[str, int, int, float], None] | None = None,
                  out: str | Path | None = None, resume: bool = False
                  ) -> tuple[list[dict], dict]:
    """Register and score every pair of a split; with `out`, keep the CSV current after each pair.

    The split's files are all decoded and checked before the first pair is registered (every
    problem is reported at once). With `out`, the CSV is rewritten (atomically) after each pair,
    so an interrupted or failing evaluation keeps every finished row; `resume` reads `out` and
    skips the pairs already in it.

    Args:
        spec_path: data spec YAML (`tfreg.data.DataSpec`).
        split: "train", "val" or "test".
        config: `tfreg.instance.InstanceConfig` for instance optimisation / finetuning.
        model: exported model folder, or None for instance optimisation (loaded once).
        finetune: instance-optimisation steps after the model.
        device: "cpu", "gpu", "gpu:N" or None.
        limit: score only the first `limit` pairs.
        keypoints: folder of Learn2Reg keypoint CSVs named after the images
            (`<keypoints>/<image name without .nii.gz>.csv`, voxel coordinates): adds the TRE.
        transforms: score external results instead of registering: a folder with, per pair,
            `disp_FIXED_MOVING.nii.gz` (`tfreg.transforms_io.l2r_name`; tfreg/Learn2Reg voxels,
            world mm or an ITK/ANTs warp) and optionally `affine_FIXED_MOVING.mat` (ITK/ANTs,
            applied after the warp); refined by `finetune` steps when given.
        l2r_submission: write each pair's field into this folder in the Learn2Reg submission
            layout (`disp_FIXED_MOVING.nii.gz`, voxels, float16 precision).
        on_pair: called as `on_pair(index, total, row)` after each pair.
        progress: per-pair stage progress callback (see `tfreg.register.register_volumes`).
        out: CSV written after each pair (None: only returned).
        resume: skip the pairs already in `out` (matched by fixed and moving paths).

    Returns:
        `(rows, summary)`: one dict per pair, earlier rows first (keys `COLUMNS` plus per-label
        `dice_<label>`), and `summarize_rows(rows)`.

    Raises:
        ConfigError: the split has no pairs, or the spec is invalid.
        InputError: bad files (all listed), a keypoint CSV is missing, or a pair that fails
            (rows so far are kept in `out`).
        Interrupted: Ctrl-C; rows so far are kept in `out`.
    """
    from tfreg.data import DataSpec
    from tfreg.errors import Interrupted, TfregError
    from tfreg.register import load_keypoints, load_pair, register_volumes

    spec = DataSpec.from_yaml(spec_path)
    pairs = spec.pairs(split)
    if not pairs:
        raise ConfigError(f"{spec_path}: split {split!r} has no pairs (add a 'split' section, or "
                          "choose another split with --split)")
    if limit is not None:
        pairs = pairs[:limit]
    csvs = ({(pair.fixed, pair.moving): _keypoint_files(keypoints, pair) for pair in pairs}
            if keypoints else None)
    spec.validate(deep=True, images={Path(p) for pair in pairs for p in (pair.fixed, pair.moving)})
    rows = []
    if resume and out is not None:
        wanted = {(str(pair.fixed), str(pair.moving)) for pair in pairs}
        rows = [row for row in read_csv(out) if (row["fixed"], row["moving"]) in wanted]
    finished = {(row["fixed"], row["moving"]) for row in rows}
    todo = [pair for pair in pairs if (str(pair.fixed), str(pair.moving)) not in finished]

    def kept(remaining: int) -> str:
        where = f"written to {out}" if out is not None else "scored"
        again = "; run the same command with --resume to finish" if out is not None else ""
        return f"{len(rows)} of {len(pairs)} pairs {where}, {remaining} remain{again}"

    for index, pair in enumerate(todo):
        try:
            fixed, moving, fixed_l, moving_l = load_pair(pair.fixed, pair.moving,
                                                         pair.fixed_labels, pair.moving_labels)
            points = (load_keypoints(*csvs[(pair.fixed, pair.moving)], fixed, moving)
                      if csvs else None)
            init = _external(transforms, pair, fixed) if transforms is not None else None
            result = register_volumes(fixed, moving, fixed_labels=fixed_l,
                                      moving_labels=moving_l, config=config, model=model,
                                      finetune=finetune, device=device, progress=progress,
                                      keypoints=points, init_disp=init)
            if l2r_submission is not None:
                from tfreg.transforms_io import l2r_name, save_field

                save_field(Path(l2r_submission) / l2r_name(pair.fixed, pair.moving), result.disp,
                           fixed.affine, "l2r")
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {kept(len(todo) - index)}") from None
        except TfregError as err:
            raise type(err)(f"{err}; {kept(len(todo) - index)}") from None
        rep = result.report
        row: dict[str, Any] = {
            "pair": f"{nifti_stem(pair.moving)}->{nifti_stem(pair.fixed)}",
            "fixed": str(pair.fixed), "moving": str(pair.moving),
        }
        for key in COLUMNS[3:]:
            row[key] = rep.get(key)
        for label, value in (rep.get("dice") or {}).items():
            row[f"dice_{label}"] = value
        rows.append(row)
        if out is not None:
            try:
                write_csv(out, rows)
            except KeyboardInterrupt:  # the write is atomic: the row is either in or not
                raise Interrupted(f"interrupted: {kept(len(todo) - index - 1)}") from None
        if on_pair:
            on_pair(len(finished) + index, len(pairs), row)
    return rows, summarize_rows(rows)


def read_csv(path: str | Path) -> list[dict]:
    """Rows of an evaluation CSV written by `write_csv` (numbers as floats, empty as None);
    no file = no rows.

    Raises:
        InputError: the file is not such a CSV.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            table = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{path}: cannot be read as an evaluation CSV ({err})") from None
    if table and not {"pair", "fixed", "moving"} <= set(table[0]):
        raise InputError(f"{path}: not an evaluation CSV of tfreg (no pair/fixed/moving columns)")
    rows = []
    for raw in table:
        row: dict[str, Any] = {}
        for key, text in raw.items():
            if key in ("pair", "fixed", "moving"):
                row[key] = text
            elif text in ("", None):
                row[key] = None
            else:
                try:
                    row[key] = float(text)
                except ValueError:
                    row[key] = text
        rows.append(row)
    return rows


def _external(folder: str | Path, pair, fixed) -> np.ndarray:
    """A pair's external result from `folder` as a tfreg displacement on the fixed grid."""
    from tfreg.transforms_io import l2r_name, read_transform

    name = l2r_name(pair.fixed, pair.moving)
    field = Path(folder) / name
    affine = Path(folder) / ("affine" + name[len("disp"):-len(".nii.gz")] + ".mat")
    if not field.is_file() and not affine.is_file():
        raise InputError(f"{field}: missing transform for {pair.moving} -> {pair.fixed} "
                         "(--transforms expects disp_FIXED_MOVING.nii.gz per pair)")
    return read_transform(field if field.is_file() else None,
                          affine=affine if affine.is_file() else None, reference=fixed).data


def _keypoint_files(folder: str | Path, pair) -> tuple[Path, Path]:
    """`<folder>/<stem>.csv` for the fixed and the moving image of a pair; checked to exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: --keypoints folder does not exist")
    out = []
    for image in (pair.fixed, pair.moving):
        path = folder / f"{nifti_stem(image)}.csv"
        if not path.is_file():
            raise InputError(f"{path}: missing keypoint CSV for {image} (--keypoints expects "
                             "<folder>/<image name>.csv for every image of the split)")
        out.append(path)
    return out[0], out[1]


def _stats(values: list) -> dict[str, float | None]:
    vals = np.array([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if vals.size == 0:
        return {"mean": None, "sd": None}
    return {"mean": round(float(vals.mean()), 5), "sd": round(float(vals.std(ddof=0)), 5)}


def summarize_rows(rows: list[dict]) -> dict:
    """Mean and standard deviation of each numeric column over pairs."""
    summary: dict[str, Any] = {"pairs": len(rows)}
    for key in COLUMNS[3:]:
        summary[key] = _stats([r.get(key) for r in rows])
    return summary


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """Write the per-pair rows (all columns seen in any row), atomically."""
    if not rows:
        raise InputError(f"{path}: no rows to write")
    keys = list(COLUMNS)
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})
    path = Path(path)
    with atomic_path(path, suffix=".csv") as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return path


def format_table(summary: dict) -> str:
    """The summary as a Markdown table: metric, mean ± sd over pairs, the leaderboards' names.

    Rows whose metric was not computed (no labels, no keypoints) are left out; the table pastes
    into a README or an issue as it is.
    """
    lines = [f"| metric ({summary['pairs']} pairs) | mean ± sd | leaderboard name |",
             "|---|---:|---|"]
    for key, what, names, digits in TABLE:
        s = summary.get(key) or {}
        if s.get("mean") is None:
            continue
        lines.append(f"| {what} | {s['mean']:.{digits}f} ± {s['sd']:.{digits}f} | {names} |")
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """Readable lines: Dice mean ± sd, HD95, %folding, SDlogJ, runtime."""
    def fmt(key: str, digits: int = 3, unit: str = "") -> str:
        s = summary.get(key) or {}
        if s.get("mean") is None:
            return "n/a"
        return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}{unit}"

    return "\n".join([
        f"pairs           {summary['pairs']}",
        f"Dice            {fmt('mean_dice')}   (before: {fmt('mean_dice_before')})",
        f"HD95            {fmt('mean_hd95_mm', 2, ' mm')}",
        f"folding         {fmt('folding_percent', 4, ' %')}",
        f"SDlogJ          {fmt('sdlogj')}",
        f"local NCC       {fmt('similarity')}   (before: {fmt('similarity_before')})",
        f"runtime         {fmt('runtime_seconds', 2, ' s')}",
    ])
