"""Entry point of the ``tfreg`` command. Subcommands are imported lazily, so ``tfreg --help`` and
the light commands stay fast and one broken command module cannot take the others down.

Besides tfreg's own commands, every installed distribution may add top-level commands through
the ``tfreg.commands`` entry-point group (``name = module:click_command``), read from packaging
metadata without importing the plugin; tfreg's own names win a clash."""

from __future__ import annotations

import importlib
import os
import sys

import click

import tfreg
from tfreg_cli.common import user_errors

#: Entry-point group of commands added by plugins (`tfreg.registry.COMMANDS_GROUP`; not imported
#: from there to keep ``tfreg --help`` light).
COMMANDS_GROUP = "tfreg.commands"

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
}


def plugin_commands() -> dict[str, str]:
    """Command name -> ``module:attribute`` of the ``tfreg.commands`` entry points (tfreg's own
    command names excluded)."""
    from importlib.metadata import entry_points

    return {name: value for name, (value, _) in _plugin_entry_points().items()}


def _plugin_entry_points() -> dict[str, tuple[str, str]]:
    """Command name -> (``module:attribute``, distribution name) of the plugin commands."""
    from importlib.metadata import entry_points

    found: dict[str, tuple[str, str]] = {}
    for ep in entry_points(group=COMMANDS_GROUP):
        if ep.name not in COMMANDS:
            dist = getattr(getattr(ep, "dist", None), "name", None) or "a plugin"
            found.setdefault(ep.name, (ep.value, dist))
    return found


class LazyGroup(click.Group):
    """A click group that imports each command module only when the command is used."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``tfreg --help``; plugin commands are described from their
        packaging metadata, without importing the plugin (which may load TensorFlow)."""
        plugins = _plugin_entry_points()
        rows = []
        for name in self.list_commands(ctx):
            if name in plugins:
                rows.append((name, f"(from {plugins[name][1]}; see 'tfreg {name} --help')"))
                continue
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({**plugin_commands(), **COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from_plugin = name not in COMMANDS
        target = COMMANDS.get(name) or plugin_commands().get(name)
        if target is None:
            return None
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name.strip())
            command = getattr(module, attr.strip())
        except Exception as err:  # noqa: BLE001 - one broken command must not break the others
            if not from_plugin and not (isinstance(err, ModuleNotFoundError)
                                        and err.name == module_name):
                raise
            why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

            @click.command(name, help=f"(not available: {why})")
            def unavailable() -> None:
                raise click.ClickException(f"'tfreg {name}' is not available ({why})")

            return unavailable
        if from_plugin and command.callback is not None \
                and not getattr(command.callback, "_tfreg_user_errors", False):
            command.callback = user_errors(command.callback)
            command.callback._tfreg_user_errors = True
        return command


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
    (`tfreg.xla_cache`) and store of traced steps (`tfreg.trace_store`), then the command.
    TensorFlow imports without Keras (imported later by what needs it) and without the notebook
    and plotting packages Keras would load, and a command that imported TensorFlow ends without
    the interpreter's teardown (`tfreg_cli.lean_start`). After a signal (exit 130, 143) the
    process ends at once, without waiting for TensorFlow's threads."""
    from tfreg_cli import interrupt, lean_start, quiet

    quiet.install(verbose=_verbose(sys.argv[1:]))
    interrupt.install()
    lean_start.install()
    if not {"-h", "--help", "--version"} & set(sys.argv[1:]):
        from tfreg import trace_store, xla_cache

        xla_cache.enable()  # compiled steps persist across calls ($TFREG_XLA_CACHE, off to disable)
        trace_store.enable()  # and their traced graphs ($TFREG_TRACE_CACHE, off to disable)
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
        code = 0 if done.code is None else done.code
        # (not under a profiler: it writes its results after the interpreter's own exit)
        if isinstance(code, int) and "tensorflow" in sys.modules and sys.getprofile() is None:
            lean_start.exit_now(code)
        raise


if __name__ == "__main__":
    main()
