"""``tfreg register``: register one pair of images, with or without a trained model."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tfreg_cli.common import check_input_dirs, check_inputs, check_output_dir, user_errors


class StageProgress:
    """Stage progress on stderr: one click progress bar per stage (affine, level 1/3, ...)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.stage: str | None = None
        self.bar = None
        self.done = 0
        self.loss = float("nan")

    def __call__(self, stage: str, step: int, total: int, loss: float) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.done = 0
            self.bar = click.progressbar(length=max(total, 1), label=f"  {stage:<28}",
                                         file=sys.stderr, width=24,
                                         item_show_func=self._loss_text)
            self.bar.__enter__()
        self.loss = loss
        if self.bar is not None and step > self.done:
            self.bar.update(step - self.done, current_item=loss)
            self.done = step

    def _loss_text(self, loss) -> str | None:
        if loss is None or loss != loss:  # NaN: no loss for this stage
            return None
        return f"loss {loss:+.4f}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def parse_per_level(text: str | None, name: str, kind=int):
    """`"200"` -> 200; `"200,100,50"` -> (200, 100, 50); None -> None."""
    from tfreg.errors import ConfigError

    if text is None:
        return None
    try:
        values = tuple(kind(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{name}: expected a number or comma-separated numbers (one per "
                          f"level), got {text!r}") from None
    if not values:
        raise ConfigError(f"{name}: expected at least one value, got {text!r}")
    if any(v < 0 for v in values):
        raise ConfigError(f"{name}: values must be >= 0, got {text!r}")
    return values[0] if len(values) == 1 else values


def _deprecated_lambda(ctx: click.Context, param: click.Parameter, value):
    """``--lambda`` (old name of ``--smooth-weight``): accepted with a one-line hint."""
    if value is None:
        return None
    click.echo("note: --lambda is deprecated, use --smooth-weight", err=True)
    if ctx.params.get("lam") is not None:
        raise click.UsageError("--lambda: give only --smooth-weight (--lambda is its old name)")
    ctx.params["lam"] = value
    return None


def _keep_deprecated_value(ctx: click.Context, param: click.Parameter, value):
    """``--smooth-weight``, or the value a deprecated ``--lambda`` already set."""
    if value is not None and ctx.params.get("lam") is not None:
        raise click.UsageError("--lambda: give only --smooth-weight (--lambda is its old name)")
    return value if value is not None else ctx.params.get("lam")


def instance_options(func):
    """The instance-optimisation options shared by `register` and `evaluate`."""
    options = [
        click.option("--preset", type=click.Choice(["accurate", "fast", "best"]),
                     default="accurate", show_default=True,
                     help="Instance-optimisation settings: 'accurate' (affine, then half- and "
                          "full-resolution stages, smoothness weight 1, damped steps where the "
                          "images carry no contrast), 'fast' (affine, then half resolution) or "
                          "'best' (as accurate, with a full-resolution field and window 9 in "
                          "the last stage and smoothness weight 2; slower)."),
        click.option("--iterations", metavar="N[,N...]",
                     help="Optimisation steps per level, one number for all levels or one per "
                          "level, coarse to fine (default: from the preset)."),
        click.option("--levels", type=click.IntRange(1, 5),
                     help="Number of pyramid levels of the deformable stage, ending at the "
                          "preset's finest level (accurate: 2 levels, half and full resolution; "
                          "fast: 1 level, half resolution)."),
        click.option("--smooth-weight", "lam", type=click.FloatRange(min=0),
                     callback=_keep_deprecated_value,
                     help="Weight of the smoothness penalty mean|grad v|^2 on the velocity "
                          "(larger = smoother, default: from the preset)."),
        click.option("--lambda", type=click.FloatRange(min=0), expose_value=False,
                     hidden=True, callback=_deprecated_lambda,
                     help="Deprecated name of --smooth-weight."),
        click.option("--lr", "learning_rate", metavar="LR[,LR...]",
                     help="Adam step size per level, in voxels of velocity (default: preset)."),
        click.option("--similarity", type=click.Choice(["ncc", "mse", "mind", "nmi", "mk_lncc"]),
                     help="Image similarity of the affine and deformable stages: 'ncc' local "
                          "normalised cross-correlation (default; one contrast, robust to "
                          "intensity differences), 'mse' (same contrast and scale), 'mind' "
                          "(MIND-SSC descriptors; different contrasts, e.g. T2 to T1) or 'nmi' "
                          "(normalised mutual information; different contrasts) or 'mk_lncc' "
                          "(multi-kernel local NCC of AVSM, windows from the image size; one "
                          "contrast)."),
        click.option("--no-affine", is_flag=True, default=False,
                     help="Skip the moments + affine initialisation (inputs already aligned)."),
        click.option("--affine-iterations", type=click.IntRange(min=0),
                     help="Adam steps of the affine stage (default: from the preset)."),
        click.option("--xla/--no-xla", "xla", default=None,
                     help="XLA-compile the optimisation steps (default: on; compiles once "
                          "per image shape, then runs several times faster on CPU)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_config(preset: str, iterations, levels, lam, learning_rate, similarity, no_affine,
                 affine_iterations, xla):
    """An `InstanceConfig` from the command-line options (None = keep the preset's value)."""
    from tfreg import instance

    return instance.make_config(
        preset,
        iterations=parse_per_level(iterations, "--iterations", int),
        levels=levels,
        lam=lam,
        learning_rate=parse_per_level(learning_rate, "--lr", float),
        similarity=similarity,
        affine=False if no_affine else None,
        affine_iterations=affine_iterations,
        jit=xla,
    )


@click.command("register", short_help="Register a moving image to a fixed image (or many pairs).")
@click.argument("fixed", type=click.Path(dir_okay=False), required=False)
@click.argument("moving", type=click.Path(dir_okay=False), required=False)
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="tfreg-out",
              show_default=True,
              help="Output folder: warped.nii.gz, disp.nii.gz, warped_labels.nii.gz, "
                   "report.json, affine.mat (ITK/ANTs; 3D). Outputs of an earlier run there are "
                   "replaced or removed (other files are kept). With --pairs: one subfolder per "
                   "pair and summary.csv.")
@click.option("--pairs", "pairs_csv", type=click.Path(dir_okay=False),
              help="Register every pair of a CSV in one process instead of FIXED MOVING: a "
                   "header row with the columns fixed, moving and optionally fixed_labels, "
                   "moving_labels, fixed_keypoints, moving_keypoints, id (relative paths from "
                   "the CSV's folder). Compiles once per image shape; pairs whose folder holds "
                   "a report.json are skipped (rerun to resume); writes OUT/summary.csv.")
@click.option("--shard", metavar="K/N",
              help="With --pairs: register only share K of N (every N-th row from row K), so "
                   "that N processes split the CSV; each rewrites summary.csv when it ends.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --pairs: register N pairs at a time in N worker processes (one "
                   "process keeps about 1.6 cores busy, so use it on machines with more cores; "
                   "memory N times one registration's).")
@click.option("--moving-labels", type=click.Path(dir_okay=False),
              help="Label map of MOVING: warped with nearest neighbour to warped_labels.nii.gz.")
@click.option("--fixed-labels", type=click.Path(dir_okay=False),
              help="Label map of FIXED: Dice and HD95 per label go into report.json "
                   "(needs --moving-labels).")
@click.option("--fixed-keypoints", type=click.Path(dir_okay=False),
              help="Learn2Reg keypoint CSV of FIXED (voxel coordinates, x,y,z per line): the "
                   "TRE in mm goes into report.json (needs --moving-keypoints).")
@click.option("--moving-keypoints", type=click.Path(dir_okay=False),
              help="Keypoint CSV of MOVING, row k matching row k of --fixed-keypoints.")
@click.option("--model", type=click.Path(file_okay=False),
              help="Exported model folder (tfreg export), or 'builtin': the small network "
                   "shipped with tfreg (trained from label maps, hash-checked at load; its "
                   "manifest's notice, printed when used, says what the version is worth). "
                   "Without it the pair is registered by instance optimisation, no training "
                   "needed.")
@click.option("--finetune", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --model or --init: N instance-optimisation steps that refine the "
                   "network's (or the initial) field (a diffeomorphic correction composed "
                   "with it). With --init builtin, 0 means the preset's finest-level steps.")
@click.option("--init", "init", type=click.Path(dir_okay=False),
              help="Start from an external result instead of --model: a displacement field "
                   "(tfreg voxels, world mm, or an ITK/ANTs warp); refine it with --finetune. "
                   "'builtin': the preset's affine stage, then the shipped network on the "
                   "aligned pair, refined by instance optimisation at the finest level (use "
                   "--similarity mind across contrasts).")
@click.option("--init-affine", type=click.Path(dir_okay=False),
              help="ITK/ANTs affine (.mat/.txt) of the external result, applied after --init's "
                   "warp as ANTs' transformlist=[warp, affine]; alone, an affine start.")
@click.option("--inverse", is_flag=True, default=False,
              help="Also write disp_inverse.nii.gz (on MOVING's grid: maps the fixed image onto "
                   "the moving one) and the inverse-consistency error in mm to report.json.")
@click.option("--itk", is_flag=True, default=False,
              help="Also write the ITK/ANTs files: itk_warp.nii.gz (LPS mm) and affine.txt "
                   "beside affine.mat; transformlist=[itk_warp, affine] reproduces warped.nii.gz "
                   "from the original MOVING (3D).")
@click.option("--cascades", "recursions", type=click.IntRange(min=1), default=None,
              help="With --model of a recursive method (one whose plugin takes this option, "
                   "e.g. a shared-weight cascade): run K recursions (K may exceed the trained "
                   "count); the method's report (e.g. the similarity after each recursion) goes "
                   "into report.json and the summary.")
@instance_options
@click.option("--method", "reg_method", type=click.Choice(["instance", "lddmm"]),
              default="instance", show_default=True,
              help="Without --model: 'instance' (affine + stationary velocity field, NCC) or "
                   "'lddmm' (optimisation-based vector-momentum LDDMM, geodesic shooting, "
                   "sum of squared differences; inputs must be affinely aligned; spacing from "
                   "FIXED's header). For lddmm, --iterations is the number of iterations "
                   "(default 50) and --lr the step (gd: 4e-6, adam: 5e-4).")
@click.option("--lddmm-optimizer", type=click.Choice(["gd", "adam"]), default="gd",
              show_default=True,
              help="With --method lddmm: 'gd' the original fixed-step gradient descent, "
                   "'adam' usually reaches a lower energy in the same iterations.")
@click.option("--device", default=None, metavar="cpu|gpu|gpu:N",
              help="Where to compute (default: a GPU if TensorFlow sees one, else the CPU).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, only the summary.")
@user_errors
def register(fixed, moving, out_dir, pairs_csv, shard, jobs, moving_labels, fixed_labels,
             fixed_keypoints, moving_keypoints, model, finetune, init, init_affine, inverse, itk,
             recursions, preset,
             iterations, levels, lam, learning_rate, similarity, no_affine, affine_iterations,
             xla, reg_method, lddmm_optimizer, device, quiet):
    """Register MOVING to FIXED (NIfTI files, 2D or 3D), or every pair of a CSV (--pairs).

    Without --model the pair is registered by instance optimisation: a moments and affine
    initialisation, then a multi-resolution diffeomorphic (stationary velocity field) stage
    maximising local NCC. MOVING may be on another grid or orientation: it is resampled onto
    FIXED's grid by the two affines first. Every output is on FIXED's grid with its affine; the
    displacement is in voxels, pull convention: warped(x) = moving(x + disp(x)).
    """
    from tfreg.errors import ConfigError

    if jobs > 1 and pairs_csv is None:
        raise ConfigError("--jobs: needs --pairs")
    if pairs_csv is not None or shard is not None:
        return _register_pairs(pairs_csv, shard, out_dir, jobs, fixed=fixed, moving=moving,
                               per_pair={"--moving-labels": moving_labels,
                                         "--fixed-labels": fixed_labels,
                                         "--fixed-keypoints": fixed_keypoints,
                                         "--moving-keypoints": moving_keypoints,
                                         "--init": init, "--init-affine": init_affine},
                               model=model, finetune=finetune, recursions=recursions,
                               inverse=inverse, itk=itk, device=device, quiet=quiet,
                               method_args=(reg_method, preset, iterations, levels, lam,
                                            learning_rate, similarity, no_affine,
                                            affine_iterations, xla, lddmm_optimizer))
    if fixed is None or moving is None:
        raise ConfigError("register: give FIXED and MOVING images, or --pairs pairs.csv")
    model, init, init_builtin = _builtin_choice(model, init, init_affine)
    if finetune and not (model or init or init_affine):
        raise ConfigError("--finetune: needs --model or --init (instance optimisation without a "
                          "model is the default; use --iterations to change its steps)")
    if recursions is not None and not model:
        raise ConfigError("--cascades: needs --model (a trained recursive model)")
    check_inputs(fixed, moving, moving_labels, fixed_labels, fixed_keypoints, moving_keypoints,
                 init, init_affine)
    check_input_dirs(model)
    check_output_dir(out_dir, "-o")
    cfg = method_config(model, init, reg_method, preset, iterations, levels, lam, learning_rate,
                        similarity, no_affine, affine_iterations, xla, lddmm_optimizer)
    if init_builtin and finetune == 0:
        from tfreg import builtin

        finetune = builtin.refine_steps(cfg)
    from tfreg.register import register_files

    progress = StageProgress(enabled=not quiet)
    try:
        report, written = register_files(fixed, moving, out_dir, fixed_labels=fixed_labels,
                                         moving_labels=moving_labels, config=cfg, model=model,
                                         finetune=finetune, recursions=recursions,
                                         device=device, progress=progress,
                                         fixed_keypoints=fixed_keypoints,
                                         moving_keypoints=moving_keypoints, init=init,
                                         init_affine=init_affine, inverse=inverse, itk=itk,
                                         model_init=init_builtin)
    finally:
        progress.close()
    click.echo(summary_text(report, written))


def _builtin_choice(model, init, init_affine):
    """``(model, init, init_builtin)`` with 'builtin' replaced by the shipped model's folder
    (hash-checked): ``--model builtin`` uses the network alone, ``--init builtin`` its
    prediction as the start of instance optimisation."""
    from tfreg import builtin
    from tfreg.errors import ConfigError

    if init is not None and str(init) == builtin.NAME:
        if model is not None:
            raise ConfigError("--init builtin: give either --model or --init builtin, not both")
        if init_affine is not None:
            raise ConfigError("--init builtin: cannot be combined with --init-affine")
        choice = builtin.resolve(builtin.NAME), None, True
    else:
        choice = builtin.resolve(model), init, False
    notice = builtin.notice() if builtin.NAME in (str(model), str(init)) else None
    if notice:
        click.echo(notice, err=True)
    return choice


def method_config(model, init, reg_method, preset, iterations, levels, lam, learning_rate,
                  similarity, no_affine, affine_iterations, xla, lddmm_optimizer):
    """The registration config of the command-line options (instance or LDDMM)."""
    if reg_method == "lddmm":
        return lddmm_config(model, init, iterations, learning_rate, lddmm_optimizer, xla,
                            levels=levels, lam=lam, similarity=similarity,
                            affine_iterations=affine_iterations)
    return build_config(preset, iterations, levels, lam, learning_rate, similarity, no_affine,
                        affine_iterations, xla)


def _register_pairs(pairs_csv, shard, out_dir, jobs, *, fixed, moving, per_pair, model,
                    finetune, recursions, inverse, itk, device, quiet, method_args):
    """``register --pairs``: checks, then `tfreg.batch_register` with one progress bar."""
    from tfreg import batch_register
    from tfreg.errors import ConfigError, InputError

    if pairs_csv is None:
        raise ConfigError("--shard: needs --pairs")
    model = _builtin_choice(model, None, None)[0]
    if fixed is not None or moving is not None:
        raise ConfigError("--pairs: give either FIXED MOVING or --pairs, not both")
    given = [name for name, value in per_pair.items() if value is not None]
    if given:
        raise ConfigError(f"{given[0]}: not used with --pairs (labels and keypoints are columns "
                          "of the CSV)")
    if finetune and not model:
        raise ConfigError("--finetune: needs --model")
    if recursions is not None and not model:
        raise ConfigError("--cascades: needs --model (a trained cascade model)")
    k, n = batch_register.parse_shard(shard)
    pairs = batch_register.read_pairs(pairs_csv)
    check_input_dirs(model)
    check_output_dir(out_dir, "-o")
    cfg = method_config(model, None, *method_args)
    mine = batch_register.shard_rows(pairs, k, n)
    todo = [p for p in mine if not batch_register.is_done(p, out_dir)]
    share = f" (share {k}/{n}: {len(mine)})" if n > 1 else ""
    click.echo(f"{len(pairs)} pairs{share}; {len(mine) - len(todo)} done before, "
               f"{len(todo)} to register into {out_dir}", err=True)
    failed = []
    bar = click.progressbar(length=len(todo), label="  registering", file=sys.stderr,
                            width=24, show_eta=True, show_pos=True,
                            item_show_func=lambda text: text)

    def on_pair(pair, row):
        if row["status"] == "failed":
            failed.append(f"{pair.id}: {row['error']}")
        if not quiet:
            bar.update(1, current_item=f"{pair.id} {row['seconds']} s")

    rows = []
    try:
        if not quiet:
            bar.__enter__()
        options = dict(config=cfg, model=model, finetune=finetune, recursions=recursions,
                       device=device, inverse=inverse, itk=itk)
        if jobs > 1:
            rows = batch_register.register_pairs_parallel(todo, out_dir, jobs, on_pair=on_pair,
                                                          **options)
        else:
            rows = batch_register.register_pairs(todo, out_dir, on_pair=on_pair, **options)
    finally:
        if not quiet:
            bar.__exit__(None, None, None)
        summary = batch_register.write_summary(pairs, out_dir, rows)
    timed = [r["seconds"] for r in rows if r["status"] == "done"]
    if timed:
        click.echo(f"{len(timed)} registered, {sum(timed) / len(timed):.1f} s per pair "
                   "(file I/O and metrics included)")
    click.echo(f"summary: {summary}")
    for line in failed:
        click.echo(line, err=True)
    if failed:
        raise InputError(f"{len(failed)} of {len(todo)} pairs failed (error.txt in their "
                         f"folders; rerun to retry them)")


def lddmm_config(model, init, iterations, learning_rate, optimizer, xla, **unused):
    """A `tfreg.ops.lddmm.LddmmConfig` from the command line (`ConfigError` for options that
    --method lddmm does not use)."""
    from tfreg.errors import ConfigError
    from tfreg.ops.lddmm import LddmmConfig

    if model or init:
        raise ConfigError("--method lddmm: registers without --model/--init (optimisation only)")
    for name, value in unused.items():
        if value is not None:
            raise ConfigError(f"--{name.replace('_', '-')}: not used by --method lddmm")
    iters = parse_per_level(iterations, "--iterations", int)
    step = parse_per_level(learning_rate, "--lr", float)
    if isinstance(iters, tuple) or isinstance(step, tuple):
        raise ConfigError("--iterations/--lr: --method lddmm takes one value each")
    cfg = {"optimizer": optimizer}
    if iters is not None:
        cfg["iterations"] = iters
    if step is not None:
        cfg["step_size" if optimizer == "gd" else "learning_rate"] = step
    if xla is not None:
        cfg["jit"] = bool(xla)
    return LddmmConfig(**cfg)


def summary_text(report: dict, written: dict) -> str:
    """A few lines: quality figures, runtime and where the outputs are."""
    lines = [f"runtime {report['runtime_seconds']:.1f} s on {report['device']} "
             "(excluding file I/O, including compilation)",
             f"similarity (local NCC) {report['similarity_before']:.3f} -> "
             f"{report['similarity']:.3f}",
             f"folding {report['folding_percent']:.3f}% of voxels; NDV {report['ndv_percent']:.4f}%; "
             f"SDlogJ {report['sdlogj']:.3f}"
             + (f" (Learn2Reg's {report['sdlogj_l2r']:.3f})"
                if report.get("sdlogj_l2r") is not None else "")]
    if report.get("mean_dice") is not None:
        hd = report.get("mean_hd95_mm")
        lines.append(f"mean Dice {report['mean_dice_before']:.3f} -> {report['mean_dice']:.3f} "
                     f"over {len(report['dice'])} labels"
                     + (f"; mean HD95 {hd:.2f} mm ({report['mean_hd95_vox']:.2f} voxels)"
                        if hd is not None else ""))
    if report.get("tre_mm") is not None:
        lines.append(f"TRE {report['tre_mm_before']:.2f} -> {report['tre_mm']:.2f} mm over "
                     f"{report['keypoints']} keypoints")
    ic = report.get("inverse_consistency_mm")
    if ic and ic.get("mean") is not None:
        lines.append(f"inverse consistency |phi(phi^-1(y)) - y|: mean {ic['mean']:.4f} mm, "
                     f"max {ic['max']:.4f} mm ({report['inverse_method']})")
    lines.extend(report.get("method_summary") or [])  # the method's register report hook
    for name, path in written.items():
        lines.append(f"{name + ':':<15}{Path(path)}")
    lines.extend(report.get("warnings") or [])
    return "\n".join(lines)
