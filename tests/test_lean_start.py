"""The CLI's short start and end (`tfreg_cli.lean_start`), in fresh processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_tensorflow_imports_without_keras_optional_packages():
    probe = """
        import sys
        {install}
        import tensorflow, keras
        print(sorted(n for n in ("IPython", "matplotlib") if n in sys.modules))
        import matplotlib.pyplot  # still importable afterwards
        print("pyplot", matplotlib.pyplot.__name__)
    """
    plain = _run(probe.format(install=""))
    assert plain.returncode == 0, plain.stderr[-2000:]
    loaded_by_keras = eval(plain.stdout.splitlines()[0])
    if "matplotlib" not in loaded_by_keras:
        pytest.skip("this Keras does not import matplotlib at import time")
    lean = _run(probe.format(install="from tfreg_cli import lean_start; lean_start.install()"))
    assert lean.returncode == 0, lean.stderr[-2000:]
    first, second = lean.stdout.splitlines()[:2]
    assert eval(first) == []
    assert second == "pyplot matplotlib.pyplot"


def test_exit_now_runs_exit_handlers_flushes_and_keeps_the_code(tmp_path):
    marker = tmp_path / "handler_ran"
    done = _run(f"""
        import atexit, sys
        from tfreg_cli import lean_start
        atexit.register(lambda: open({str(marker)!r}, "w").write("yes"))
        sys.stdout.write("unflushed output")  # no newline: still in the buffer
        lean_start.exit_now(3)
        print("never")
    """)
    assert done.returncode == 3
    assert done.stdout == "unflushed output"
    assert marker.read_text() == "yes"


def test_command_output_and_exit_code_survive_the_fast_exit(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tfreg", "methods"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "voxelmorph" in done.stdout
