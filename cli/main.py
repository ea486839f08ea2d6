"""Entry point of the ``tfreg`` command. Subcommands are imported lazily, so ``tfreg --help`` and
the light commands stay fast and one broken command module cannot take the others down."""

from __future__ import annotations

import importlib
import os

import click

# TensorFlow's C++ start-up chatter is noise on a command line; users can still raise it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
def cli() -> None:
    """tfreg: learning-based deformable image registration (TensorFlow / Keras 3).

    Fields are displacements in voxels on the fixed grid, pull convention:
    warped(x) = moving(x + u(x)).
    """


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="tfreg")


if __name__ == "__main__":
    main()
