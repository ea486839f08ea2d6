"""``tfreg evaluate``: register every pair of a data spec's split and score it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tfreg_cli.cmd_register import StageProgress, build_config, instance_options
from tfreg_cli import interrupt
from tfreg_cli.common import (check_input_dirs, check_inputs, check_output_dir,
                              check_output_file, user_errors)


@click.command("evaluate", short_help="Score registration on a data spec's test split.")
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test",
              show_default=True, help="Which split of the data spec to evaluate.")
@click.option("--model", type=click.Path(file_okay=False),
              help="Exported model folder; without it every pair is registered by instance "
                   "optimisation.")
@click.option("--finetune", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --model: N instance-optimisation steps after the network.")
@instance_options
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False),
              default="evaluation.csv", show_default=True,
              help="CSV with one row per pair (Dice per label too), rewritten after each pair "
                   "so an interrupted run keeps its rows; the summary goes to "
                   "<out>.summary.json beside it.")
@click.option("--resume", is_flag=True,
              help="Keep the rows already in the CSV given by -o and register only the pairs "
                   "missing from it (after Ctrl-C or a failing pair).")
@click.option("--keypoints", type=click.Path(), default=None,
              help="Folder of Learn2Reg keypoint CSVs, <folder>/<image name>.csv per image "
                   "(voxel coordinates, x,y,z per line): adds the TRE in mm.")
@click.option("--transforms", type=click.Path(file_okay=False), default=None,
              help="Score external results instead of registering: a folder with "
                   "disp_FIXED_MOVING.nii.gz per pair (tfreg/Learn2Reg voxels, world mm or an "
                   "ITK/ANTs warp) and optionally affine_FIXED_MOVING.mat (ITK/ANTs).")
@click.option("--l2r-submission", type=click.Path(file_okay=False), default=None,
              help="Also write every pair's field into this folder in the Learn2Reg submission "
                   "layout: disp_FIXED_MOVING.nii.gz (voxels, float16 precision).")
@click.option("--limit", type=click.IntRange(min=1),
              help="Only the first N pairs of the split (quick checks).")
@click.option("--device", default=None, metavar="cpu|gpu|gpu:N",
              help="Where to compute (default: a GPU if TensorFlow sees one, else the CPU).")
@click.option("-q", "--quiet", is_flag=True, help="No per-pair lines, only the summary.")
@user_errors
def evaluate(data, split, model, finetune, preset, iterations, levels, lam, learning_rate,
             similarity, no_affine, affine_iterations, xla, out, resume, keypoints, transforms,
             l2r_submission, limit, device, quiet):
    """Register the pairs of DATA's split (a data spec YAML) and report Dice, HD95 (mm and
    voxels), SDlogJ (plain and Learn2Reg's), %folding, NDV, TRE (with --keypoints) and runtime
    per pair (CSV) and on average, printed as a Markdown table with the leaderboards' names."""
    from tfreg.errors import ConfigError
    from tfreg.evaluate import evaluate_spec, format_table, write_csv
    from tfreg.register import write_json

    if finetune and not (model or transforms):
        raise ConfigError("--finetune: needs --model or --transforms")
    if model and transforms:
        raise ConfigError("--transforms: give either --model or --transforms, not both")
    check_inputs(data)
    check_input_dirs(model, keypoints, transforms)
    summary_out = (Path(str(out) + ".summary.json") if not str(out).endswith(".csv")
                   else Path(str(out)[:-4] + ".summary.json"))
    check_output_file(out, "-o")
    check_output_file(summary_out, "-o")
    if l2r_submission is not None:
        check_output_dir(l2r_submission, "--l2r-submission")
    cfg = build_config(preset, iterations, levels, lam, learning_rate, similarity, no_affine,
                       affine_iterations, xla)

    def on_pair(index: int, total: int, row: dict) -> None:
        interrupt.set_message(f"interrupted: {index + 1} of {total} pairs written to {out}, "
                              f"{total - index - 1} remain; run the same command with --resume "
                              "to finish")
        if quiet:
            return
        dice = row.get("mean_dice")
        click.echo(f"[{index + 1}/{total}] {row['pair']}: "
                   + (f"Dice {dice:.3f}, " if dice is not None else "")
                   + f"folding {row['folding_percent']:.3f}%, {row['runtime_seconds']:.1f} s")

    progress = StageProgress(enabled=False)
    rows, summary = evaluate_spec(data, split=split, config=cfg, model=model, finetune=finetune,
                                  device=device, limit=limit, on_pair=on_pair, progress=progress,
                                  out=out, resume=resume, keypoints=keypoints,
                                  transforms=transforms, l2r_submission=l2r_submission)
    csv_path = write_csv(out, rows)
    summary.update(data=str(data), split=split, method=f"model {model}" if model else
                   f"external transforms {transforms}" if transforms else
                   f"instance optimisation ({preset})")
    summary_path = write_json(summary_out, summary)
    click.echo(format_table(summary))
    click.echo(f"per pair:  {csv_path}\nsummary:   {summary_path}")
