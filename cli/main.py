"""Entry point of the ``tfreg`` command. Subcommands are imported lazily, so ``tfreg --help`` and
the light commands stay fast and one broken command module cannot take the others down."""

from __future__ import annotations

import importlib
import os
import sys

import click

import tfreg

# command name -> "module:attribute" of a click.Command
COMMANDS = {
    "demo": "tfreg_cli.cmd_demo:demo",
    "methods": "tfreg_cli.cmd_methods:methods",
    "train": "tfreg_cli.cmd_train:train",
    "export": "tfreg_cli.cmd_export:export",
    "register": "tfreg_cli.cmd_register:register",
    "warp": "tfreg_cli.cmd_warp:warp",
    "convert": "tfreg_cli.cmd_convert:convert",
    "evaluate": "tfreg_cli.cmd_evaluate:evaluate",
    "show": "tfreg_cli.cmd_show:show",
    "import-voxelmorph": "tfreg_cli.cmd_import:import_voxelmorph",
}


class LazyGroup(click.Group):
    """A click group that imports each command module only when the command is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise

            @click.command(name, help="(not available in this build)")
            def unavailable() -> None:
                raise click.ClickException(f"'tfreg {name}' is not available in this build")

            return unavailable
        return getattr(module, attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(tfreg.__version__, prog_name="tfreg")
@click.option("--verbose", is_flag=True,
              help="Show TensorFlow's and CUDA's start-up and log lines (hidden by default; "
                   "also TFREG_VERBOSE=1).")
def cli(verbose: bool) -> None:
    """tfreg: learning-based deformable image registration (TensorFlow / Keras 3).

    Fields are displacements in voxels on the fixed grid, pull convention:
    warped(x) = moving(x + u(x)).
    """
    from tfreg_cli.common import show_warnings

    show_warnings()


def _verbose(argv: list[str]) -> bool:
    """``--verbose`` before the command name, or TFREG_VERBOSE set to a true value."""
    if os.environ.get("TFREG_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    for arg in argv:
        if arg == "--verbose":
            return True
        if not arg.startswith("-"):
            return False
    return False


def main() -> None:
    """Console-script entry point: a quiet start (`tfreg_cli.quiet`), Ctrl-C that ends the
    command within about a second (`tfreg_cli.interrupt`), the persistent XLA compilation cache
    (`tfreg.xla_cache`), then the command. After a signal
    (exit 130, 143) the process ends at once, without waiting for TensorFlow's threads."""
    from tfreg_cli import interrupt, quiet

    quiet.install(verbose=_verbose(sys.argv[1:]))
    interrupt.install()
    if not {"-h", "--help", "--version"} & set(sys.argv[1:]):
        from tfreg import xla_cache

        xla_cache.enable()  # compiled steps persist across calls ($TFREG_XLA_CACHE, off to disable)
    try:
        cli(prog_name="tfreg")
    except SystemExit as done:
        if isinstance(done.code, int) and done.code >= 128:  # a signal (130 Ctrl-C, 143 TERM)
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(done.code)
        raise


if __name__ == "__main__":
    main()
