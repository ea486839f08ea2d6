"""``tfreg train``: train a registration method on a data spec, or resume a run."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from tfreg_cli.common import (check_empty_or_owned, check_inputs, check_output_dir,
                              user_errors)

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
#: files that mark a folder as a tfreg run directory (written when training starts).
RUN_MARKERS = ("config.yaml", "versions.yaml")


def _shortcuts(steps, epochs, batch_size, seed, learning_rate, precision, deterministic,
               xla) -> dict:
    """``--steps`` etc. as dotted ``train.*`` overrides (only the options given)."""
    values = {"train.steps": steps, "train.epochs": epochs, "train.batch_size": batch_size,
              "train.seed": seed, "train.learning_rate": learning_rate,
              "train.precision": precision, "train.deterministic": deterministic,
              "train.jit_compile": xla}
    return {key: value for key, value in values.items() if value is not None}


def _option_name(key: str) -> str:
    names = {"train.steps": "--steps", "train.epochs": "--epochs",
             "train.batch_size": "--batch-size", "train.seed": "--seed",
             "train.learning_rate": "--lr", "train.precision": "--precision",
             "train.deterministic": "--deterministic", "train.jit_compile": "--xla/--no-xla"}
    return names[key]


def _resolve_config(loaded, config_file: str | None, run_config: Path | None, sets: tuple,
                    shortcuts: dict) -> dict:
    """Method defaults < config file (or the resumed run's config.yaml) < --set < shortcuts."""
    from tfreg.config import load_yaml, method_defaults, parse_set, resolve

    source = run_config if run_config is not None else config_file
    file_cfg = load_yaml(source) if source is not None else None
    overrides = parse_set(sets)
    for key, value in shortcuts.items():
        overrides.pop(key, None)
        overrides[key] = value
        overrides.sources[key] = f"{_option_name(key)} {value}"
    notes: list[str] = []
    config = resolve(method_defaults(loaded.method), file_cfg, overrides,
                     file_source=str(source) if source else "config",
                     renamed=loaded.method.renamed, notes=notes)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    loaded.method.check_config(config, str(source) if source else "config")
    return config


def _devices(devices: str | None, gpus: str | None) -> list[str] | None:
    from tfreg.engine import configure_devices, parse_devices, parse_gpus
    from tfreg.errors import ConfigError

    if devices and gpus:
        raise ConfigError("--devices and --gpus: give one of them, not both")
    names = parse_devices(devices) if devices else parse_gpus(gpus)
    configure_devices(names, "--devices" if devices else "--gpus")
    return names


@click.command("train", short_help="Train a registration method (or resume a run).")
@click.argument("method", required=False)
@click.option("--data", "data", type=click.Path(dir_okay=False),
              help="The training data: tfreg's data spec YAML (images, labels, pairing, "
                   "shape...) or the method's own format (see 'tfreg methods'). Optional with "
                   "--resume: the run's data is used.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML config merged over the method's defaults (unknown keys are errors).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override one config value, e.g. --set train.learning_rate=3e-4 "
                   "(repeatable; applied after --config).")
@click.option("--out", "out", type=click.Path(file_okay=False),
              help="Run directory [default: runs/<method>-<date>-<time>]; an existing folder "
                   "must be empty or a tfreg run directory (never a folder of your own files).")
@click.option("--resume", "resume", type=click.Path(file_okay=False),
              help="Continue the run in this directory from its newest checkpoint, with its "
                   "config.yaml (--set and the shortcut options below may change values).")
@click.option("--steps", type=click.IntRange(min=0), help="Shortcut for --set train.steps=N.")
@click.option("--epochs", type=click.IntRange(min=0),
              help="Shortcut for --set train.epochs=N (steps = N x train.steps_per_epoch).")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Shortcut for --set train.batch_size=B: the global batch, divided evenly "
                   "over the replicas.")
@click.option("--seed", type=int, help="Shortcut for --set train.seed=S.")
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True),
              help="Shortcut for --set train.learning_rate=LR.")
@click.option("--precision", type=click.Choice(PRECISIONS),
              help="Shortcut for --set train.precision=...; mixed_float16 computes layers in "
                   "float16 with loss scaling (GPU), mixed_bfloat16 in bfloat16 (CPUs with "
                   "bfloat16 support); fields and losses stay float32.")
@click.option("--deterministic", is_flag=True, default=None,
              help="Shortcut for --set train.deterministic=true (TensorFlow op determinism; "
                   "slower).")
@click.option("--xla/--no-xla", "xla", default=None,
              help="Shortcut for train.jit_compile: XLA-compile the forward and backward pass "
                   "(fast on GPU; slow for 3D convolution gradients on CPU).")
@click.option("--devices", type=str, metavar="LIST",
              help="Devices for data-parallel training, e.g. cpu:0,cpu:1 (logical CPU devices) "
                   "or gpu:0,gpu:1 (MirroredStrategy) [default: the first GPU, else the CPU]. "
                   "With TF_CONFIG set, multi-worker training is used instead.")
@click.option("--gpus", type=str, metavar="all|LIST",
              help="Train on all GPUs ('all') or the listed indices (0,1); same as --devices "
                   "gpu:0,gpu:1,...")
@click.option("--fast-dev-run", "fast_dev_run", type=click.IntRange(min=1), metavar="N",
              help="Smoke run: N steps of every stage (staged or not), validation once, no "
                   "periodic checkpoints; the run directory is complete and exportable.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@user_errors
def train(method, data, config_file, sets, out, resume, steps, epochs, batch_size, seed,
          learning_rate, precision, deterministic, xla, devices, gpus, fast_dev_run,
          quiet) -> None:
    """Train METHOD on the pairs of the data spec given by --data.

    The config is the method's defaults, then --config, then --set, then the shortcut options;
    it is validated (unknown keys and wrong types are errors) and saved, resolved, as
    RUN_DIR/config.yaml with versions.yaml beside it. Checkpoints (model, optimizer, step,
    stage) go to RUN_DIR/checkpoints every train.checkpoint_every steps and at the end of each
    stage; TensorBoard logs to RUN_DIR/logs; the final model to RUN_DIR/model.keras and
    RUN_DIR/model.weights.h5. Ctrl-C (or SIGTERM) saves a checkpoint and stops; continue with
    'tfreg train --resume RUN_DIR'.

    With several devices the global batch (--batch-size) is split evenly over the replicas,
    each replica reading its own batches. With TF_CONFIG set, start the same command on every
    worker; the chief (or worker 0) writes RUN_DIR.

    \b
    Examples:
      tfreg train voxelmorph --data oasis.yaml --steps 2000 --out runs/vxm
      tfreg train lapirn --data tiny.yaml --fast-dev-run 2 --out runs/smoke
      tfreg train voxelmorph --data oasis.yaml --devices cpu:0,cpu:1 --batch-size 2
      tfreg train --resume runs/vxm --steps 4000
    """
    from tfreg.errors import ConfigError

    shortcuts = _shortcuts(steps, epochs, batch_size, seed, learning_rate, precision,
                           deterministic, xla)
    run_config = None
    if resume:
        if out:
            raise ConfigError("--out: cannot be combined with --resume (the run directory is "
                              "the one being resumed)")
        if config_file:
            raise ConfigError("--config: cannot be combined with --resume (the run's "
                              "config.yaml is used; change values with --set)")
        run_dir = Path(resume)
        run_config = run_dir / "config.yaml"
        if not run_config.is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml in this folder (not a tfreg "
                              "run directory)")
    elif method is None:
        raise click.UsageError("missing METHOD (or give --resume RUN_DIR)")
    elif data is None:
        raise click.UsageError("missing option '--data' (the training data)")
    check_inputs(data, config_file)
    if out:  # a user's folder is never overwritten: only a new, empty or tfreg run folder
        check_empty_or_owned(out, RUN_MARKERS, "--out", "run directory")
    check_output_dir(out or resume or "runs", "--resume" if resume else "--out")

    names = _devices(devices, gpus)

    from tfreg.config import load_yaml
    from tfreg.registry import discover

    if resume:
        saved = load_yaml(run_config)
        saved_method = saved.get("method")
        if method is not None and method != saved_method:
            raise ConfigError(f"{run_config}: the run trained '{saved_method}', not '{method}'")
        method = saved_method
        if data is None:
            data = saved.get("data")
            if not data:
                raise ConfigError(f"{run_config}: no data spec recorded; give --data")
    loaded = discover().get(method)
    if loaded.method.stages is not None and (steps is not None or epochs is not None):
        option = "--steps" if steps is not None else "--epochs"
        raise ConfigError(f"{option}: method '{method}' trains in stages with step counts of "
                          "their own; set them in its config with --set (see "
                          f"'{loaded.method.default_config}')")
    if fast_dev_run is not None and resume:
        raise ConfigError("--fast-dev-run: cannot be combined with --resume")
    config = _resolve_config(loaded, config_file, run_config, sets, shortcuts)
    data_path = Path(data).resolve()
    config["data"] = str(data_path)
    if not resume:
        run_dir = Path(out) if out else Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"

    from tfreg.engine import make_strategy

    strategy = make_strategy(names)  # before other TensorFlow work (multi-worker needs this)
    data_obj = _open_data(loaded.method, data_path, config)

    from tfreg.engine import TrainingInterrupted, train as run_training

    try:
        result = run_training(loaded, config, data_obj, run_dir, resume=bool(resume),
                              strategy=strategy, verbose=0 if quiet else 1,
                              fast_dev_run=fast_dev_run)
    except TrainingInterrupted as err:
        _report_interrupt(err)
        sys.exit(128 + int(err.signum))
    click.echo(f"run directory: {result.run_dir}")
    click.echo(f"  TensorBoard: tensorboard --logdir {result.run_dir / 'logs'}")
    click.echo(f"  export:      tfreg export {result.run_dir} -o MODEL_DIR")


def _report_interrupt(err) -> None:
    """What was kept, then the resume command on a line of its own (stderr); a further Ctrl-C
    meanwhile ends the process without another message (`tfreg_cli.interrupt.reporting`)."""
    import signal

    from tfreg_cli import interrupt

    interrupt.reporting()
    if sys.stdout.isatty() or sys.stderr.isatty():  # the progress bar holds the line
        click.echo("", err=True)
    if err.run_dir is None:      # not raised by the engine's loop
        click.echo(str(err), err=True)
        return
    checkpoints = Path(err.run_dir) / "checkpoints"
    if err.saved:
        click.echo(f"{signal.Signals(err.signum).name}: training stopped at step {err.step}, "
                   f"checkpoint saved in {checkpoints}", err=True)
    else:
        click.echo(f"interrupted twice at step {err.step}: stopped at once without saving"
                   + (f"; the newest checkpoint in {checkpoints} is kept" if err.resumable
                      else "; no checkpoint was saved"), err=True)
    if err.resumable:
        click.echo(f"resume with: tfreg train --resume {err.run_dir}", err=True)


def _open_data(method, path: Path, config: dict):
    """Open and fully validate ``--data`` with the method's data source, after checking the
    divisibility rule of the resolved config (so a wrong shape is refused before the data is
    read)."""
    data = method.data_source.open(path, config, method.divisor(config))
    for note in getattr(data, "notes", None) or []:
        click.echo(f"note: {note}")
    return data
