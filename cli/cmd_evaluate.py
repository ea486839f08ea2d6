"""``tfreg evaluate``: register every pair of a data spec's split and score it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tfreg_cli.cmd_register import StageProgress, build_config, instance_options
from tfreg_cli.common import user_errors


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
              help="CSV with one row per pair (Dice per label too); the summary goes to "
                   "<out>.summary.json beside it.")
@click.option("--keypoints", type=click.Path(), default=None,
              help="Folder of Learn2Reg keypoint CSVs, <folder>/<image name>.csv per image "
                   "(voxel coordinates, x,y,z per line): adds the TRE in mm.")
@click.option("--limit", type=click.IntRange(min=1),
              help="Only the first N pairs of the split (quick checks).")
@click.option("--device", default=None, metavar="cpu|gpu|gpu:N",
              help="Where to compute (default: a GPU if TensorFlow sees one, else the CPU).")
@click.option("-q", "--quiet", is_flag=True, help="No per-pair lines, only the summary.")
@user_errors
def evaluate(data, split, model, finetune, preset, iterations, levels, lam, learning_rate,
             similarity, no_affine, affine_iterations, xla, out, keypoints, limit, device, quiet):
    """Register the pairs of DATA's split (a data spec YAML) and report Dice, HD95 (mm and
    voxels), SDlogJ (plain and Learn2Reg's), %folding, NDV, TRE (with --keypoints) and runtime
    per pair (CSV) and on average, printed as a Markdown table with the leaderboards' names."""
    from tfreg.errors import ConfigError
    from tfreg.evaluate import evaluate_spec, format_table, write_csv
    from tfreg.register import write_json

    if finetune and not model:
        raise ConfigError("--finetune: needs --model")
    cfg = build_config(preset, iterations, levels, lam, learning_rate, similarity, no_affine,
                       affine_iterations, xla)

    def on_pair(index: int, total: int, row: dict) -> None:
        if quiet:
            return
        dice = row.get("mean_dice")
        click.echo(f"[{index + 1}/{total}] {row['pair']}: "
                   + (f"Dice {dice:.3f}, " if dice is not None else "")
                   + f"folding {row['folding_percent']:.3f}%, {row['runtime_seconds']:.1f} s")

    progress = StageProgress(enabled=False)
    rows, summary = evaluate_spec(data, split=split, config=cfg, model=model, finetune=finetune,
                                  device=device, limit=limit, on_pair=on_pair, progress=progress,
                                  keypoints=keypoints)
    csv_path = write_csv(out, rows)
    summary.update(data=str(data), split=split, method=f"model {model}" if model else
                   f"instance optimisation ({preset})")
    summary_path = write_json(Path(str(out) + ".summary.json") if not str(out).endswith(".csv")
                              else Path(str(out)[:-4] + ".summary.json"), summary)
    click.echo(format_table(summary))
    click.echo(f"per pair:  {csv_path}\nsummary:   {summary_path}")
