"""The one-line-error check shared by the CLI tests."""
from __future__ import annotations


def one_line_error(result, *parts: str) -> str:
    """Assert that a `click.testing.Result` exited with 1 and exactly one ``Error...`` line
    containing every part, and no traceback. Returns the line."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]
