"""Every command listed by the lazy `tfreg` group imports and documents itself (a broken or
missing command module would otherwise only show up when a user runs it)."""

import pytest
from click.testing import CliRunner

from tfreg_cli.main import COMMANDS, cli, plugin_commands


@pytest.mark.parametrize("name", sorted({**COMMANDS, **plugin_commands()}))
def test_every_command_has_help(name):
    result = CliRunner().invoke(cli, [name, "--help"], prog_name="tfreg")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: tfreg {name} ")
    assert "not available in this build" not in result.output
