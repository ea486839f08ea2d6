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


def test_keras_is_not_loaded_by_tensorflow_but_imports_later_with_its_optimizers():
    probe = """
        import sys
        {install}
        import tensorflow
        print("keras" in sys.modules)
        import keras
        from keras.src.optimizers import Adam
        # Keras' optimizers are registered for loading when keras is imported
        layer = keras.layers.Dense(2)
        print(type(Adam(0.1)).__name__, layer(tensorflow.ones((1, 3))).shape)
    """
    plain = _run(probe.format(install=""))
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stdout.splitlines()[0] == "True"   # what the finder changes
    lean = _run(probe.format(install="from tfreg_cli import lean_start; lean_start.install()"))
    assert lean.returncode == 0, lean.stderr[-2000:]
    first, second = lean.stdout.splitlines()[:2]
    assert first == "False"
    assert second == "Adam (1, 2)"


def test_register_without_a_model_never_imports_keras(tmp_path):
    """`tfreg register` (instance optimisation) runs without Keras in the process."""
    import numpy as np
    import nibabel as nib

    rng = np.random.default_rng(0)
    base = np.zeros((16, 16, 16), np.float32)
    base[4:12, 5:11, 4:12] = 1.0
    base += 0.05 * rng.random(base.shape, dtype=np.float32)
    for name, data in (("f", base), ("m", np.roll(base, 1, axis=0))):
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    done = _run(f"""
        import sys, atexit
        atexit.register(lambda: print("keras loaded:", "keras" in sys.modules))
        sys.argv = ["tfreg", "register", {str(tmp_path / 'f.nii.gz')!r},
                    {str(tmp_path / 'm.nii.gz')!r}, "-o", {str(tmp_path / 'out')!r},
                    "--preset", "fast", "--iterations", "3", "--affine-iterations", "2",
                    "--no-xla", "-q"]
        from tfreg_cli.main import main
        main()
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "keras loaded: False" in done.stdout
    assert (tmp_path / "out" / "warped.nii.gz").is_file()
