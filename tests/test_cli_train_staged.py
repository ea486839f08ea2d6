"""`tfreg train` refuses shortcut step counts for methods that train in stages (they would be
ignored silently otherwise)."""

from pathlib import Path

from click.testing import CliRunner

import tfreg_plugins.lapirn
from tfreg_cli.main import cli


def test_steps_with_a_staged_method_is_a_one_line_error(tiny_collection, tmp_path):
    result = CliRunner().invoke(cli, ["train", "lapirn", "--data", str(tiny_collection),
                                      "--steps", "3", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    yaml = Path(tfreg_plugins.lapirn.__file__).resolve().parent / "lapirn.yaml"  # beside the code
    assert result.output.strip() == (
        "Error: --steps: method 'lapirn' trains in stages with step counts of their own; "
        f"set them in its config with --set (see '{yaml}')")
    assert not (tmp_path / "run").exists()
