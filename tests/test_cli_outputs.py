"""The output side of every command: outputs checked before any work (one line, exit 1), user
folders never overwritten, stale outputs removed, evaluate keeping rows on interrupt, Ctrl-C
exiting 130, quiet start-up, every data problem reported at once, label-header tolerance.

Tests run as root here, so a folder with mode 0o555 is still writable. Unwritable outputs are
made with what fails for root too: a path under a regular file, ``/proc/...`` (cannot create),
``/sys/...`` (permission denied), and a folder made immutable with ``chattr +i`` when the file
system supports it (skipped otherwise).
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from tfreg.errors import InputError, Interrupted
from tfreg_cli.main import cli

ENV = {**os.environ, "TFREG_VERBOSE": ""}


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    """Tiny inputs, a regular file to put paths under, and an existing run folder."""
    rng = np.random.default_rng(0)
    image = _nifti(tmp_path / "img.nii.gz", rng.random((8, 8)).astype(np.float32))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    spec = tmp_path / "data.yaml"
    spec.write_text("images: [img.nii.gz]\n")
    run = tmp_path / "run"
    run.mkdir()
    return {"image": image, "blocker": blocker, "spec": spec, "run": run, "root": tmp_path}


def _immutable(tmp_path: Path) -> Path | None:
    folder = tmp_path / "immutable"
    folder.mkdir()
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)],
                                                   capture_output=True).returncode != 0:
        return None
    return folder


def _commands(f: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """Each writing command with its output at (or, for file outputs, beside) `out`."""
    image, spec, run = str(f["image"]), str(f["spec"]), str(f["run"])
    return {
        "register": ["register", image, image, "-o", str(out)],
        "warp": ["warp", image, image, "-o", str(out) + ".nii.gz"],
        "convert": ["convert", image, str(out) + ".nii.gz", "--to", "world"],
        "evaluate": ["evaluate", spec, "-o", str(out) + ".csv"],
        "show": ["show", run, "-o", str(out) + ".png"],
        "train": ["train", "voxelmorph", "--data", spec, "--out", str(out)],
        "export": ["export", run, "-o", str(out)],
        "demo": ["demo", "-o", str(out)],
        "import-voxelmorph": ["import-voxelmorph", image, "-o", str(out)],
    }


#: runs the CLI like the `tfreg` script and says on stdout whether TensorFlow was imported.
WRAPPER = ("import atexit, sys\n"
           "atexit.register(lambda: print('TF' if 'tensorflow' in sys.modules else 'noTF'))\n"
           "sys.argv = ['tfreg', *sys.argv[1:]]\n"
           "from tfreg_cli.main import main\n"
           "main()\n")


def _run_subprocess(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=120)
    return proc, time.perf_counter() - start


def _assert_one_line(proc: subprocess.CompletedProcess, *parts: str) -> None:
    """Exit 1; the whole stderr is one `Error: ...` line; TensorFlow was never imported."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    assert proc.stdout.splitlines()[-1:] == ["noTF"], proc.stdout


# ---------------------------------------------------------------------- unwritable outputs
def test_every_command_refuses_an_unwritable_output_in_one_line(files):
    """Per command, in a subprocess: an output under /proc gives one stderr line, exit 1,
    before TensorFlow is imported. In-process: under a regular file, /sys, an immutable folder."""
    for name, args in _commands(files, Path("/proc/tfreg-test/out")).items():
        proc, _ = _run_subprocess(args, files["root"])
        _assert_one_line(proc, "/proc")
    targets = [(files["blocker"] / "out", "is a file, not a folder"),
               (Path("/sys/tfreg-test"), "/sys/tfreg-test")]
    immutable = _immutable(files["root"])
    if immutable is not None:
        targets.append((immutable / "out", "not permitted"))
    try:
        for target, part in targets:
            for name, args in _commands(files, target).items():
                result = CliRunner().invoke(cli, args)
                assert result.exit_code == 1, (name, result.output)
                lines = result.output.strip().splitlines()
                assert len(lines) == 1 and part in lines[0], (name, result.output)
        # nothing was left behind by the checks
        assert sorted(p.name for p in files["root"].iterdir()) == sorted(
            ["img.nii.gz", "a_file", "data.yaml", "run"] + (["immutable"] if immutable else []))
        if immutable is not None:
            assert list(immutable.iterdir()) == []
    finally:
        if immutable is not None:
            subprocess.run(["chattr", "-i", str(immutable)], check=False)


def test_missing_input_is_answered_before_tensorflow(files):
    """`register missing.nii.gz` answers in one line without importing TensorFlow (measured:
    0.7 s on the loaded 2-core machine, against 12.8 s before, most of it TensorFlow's import)."""
    proc, seconds = _run_subprocess(["register", "missing.nii.gz", str(files["image"]),
                                     "-o", "out"], files["root"])
    _assert_one_line(proc, "missing.nii.gz: file not found")
    assert not (files["root"] / "out").exists()


def test_output_checks_leave_nothing_and_name_the_problem(tmp_path):
    from tfreg.outputs import check_output_dir, check_output_file

    check_output_dir(tmp_path / "a" / "b" / "c", "-o")
    check_output_file(tmp_path / "d" / "e.nii.gz", "-o")
    assert list(tmp_path.iterdir()) == []  # probe folders and files removed
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match=r"^-o .*f/g: cannot be created: .*f is a file"):
        check_output_dir(tmp_path / "f" / "g", "-o")
    with pytest.raises(InputError, match=r"exists and is a file, not a folder"):
        check_output_dir(tmp_path / "f", "-o")
    with pytest.raises(InputError, match=r"is a folder; give a file name"):
        check_output_file(tmp_path, "-o")


def test_os_error_mid_command_is_one_line(monkeypatch, tmp_path):
    """An OSError that happens anyway (disk full) becomes `<path>: <reason>`, exit 1."""
    import errno

    import tfreg.register

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "w.nii.gz"))

    monkeypatch.setattr(tfreg.register, "warp_file", full)
    image = _nifti(tmp_path / "i.nii.gz", np.ones((4, 4), np.float32))
    result = CliRunner().invoke(cli, ["warp", str(image), str(image), "-o",
                                      str(tmp_path / "w.nii.gz")])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tmp_path / 'w.nii.gz'}: No space left on device"


def test_ctrl_c_exits_130_on_its_own_line(monkeypatch, tmp_path):
    import tfreg.register

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tfreg.register, "warp_file", interrupted)
    image = _nifti(tmp_path / "i.nii.gz", np.ones((4, 4), np.float32))
    result = CliRunner().invoke(cli, ["warp", str(image), str(image), "-o",
                                      str(tmp_path / "w.nii.gz")])
    assert result.exit_code == 130
    assert result.output.strip().splitlines() == ["interrupted (Ctrl-C)"]


# -------------------------------------------------------------------- user folders and stale
def test_train_refuses_a_users_folder_but_reuses_a_run(files):
    notes = files["root"] / "notes"
    notes.mkdir()
    (notes / "config.yaml").write_text("mine: true\n")
    proc, _ = _run_subprocess(["train", "voxelmorph", "--data", str(files["spec"]), "--out",
                               str(notes)], files["root"])
    _assert_one_line(proc, "--out", "notes", "is not empty and is not a tfreg run directory")
    assert (notes / "config.yaml").read_text() == "mine: true\n"

    from tfreg.outputs import check_empty_or_owned

    (notes / "versions.yaml").write_text("tfreg: 0\n")  # now it looks like a run directory
    check_empty_or_owned(notes, ("config.yaml", "versions.yaml"), "--out", "run directory")
    check_empty_or_owned(files["root"] / "new", ("config.yaml",), "--out", "run directory")


def test_export_refuses_a_users_folder(files):
    mine = files["root"] / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("x")
    result = CliRunner().invoke(cli, ["export", str(files["run"]), "-o", str(mine)])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "exists and is not an exported tfreg model" in result.output
    assert (mine / "a.txt").read_text() == "x"


def test_register_removes_stale_outputs_and_show_resolves_paths(tmp_path, monkeypatch):
    """A second `register` into the same folder without labels removes the first run's
    warped_labels and overview; `show` works from another working directory and writes the
    format its suffix names."""
    import tfreg.register as reg

    def fake(fixed, moving, **kwargs):  # the pipeline's file handling, not its numerics
        disp = np.zeros(fixed.shape + (fixed.ndims,), np.float32)
        labels = None if kwargs.get("moving_labels") is None else kwargs["moving_labels"].data
        return reg.RegisterResult(moving.data, disp, labels, {"runtime_seconds": 0.0})

    monkeypatch.setattr(reg, "register_volumes", fake)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    fixed = _nifti(data / "f.nii.gz", rng.random((12, 12)).astype(np.float32))
    moving = _nifti(data / "m.nii.gz", rng.random((12, 12)).astype(np.float32))
    labels = _nifti(data / "l.nii.gz", (rng.random((12, 12)) > 0.5).astype(np.int16))
    monkeypatch.chdir(data)
    out = tmp_path / "out"
    reg.register_files("f.nii.gz", "m.nii.gz", out, moving_labels="l.nii.gz")
    (out / "overview.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    assert (out / "warped_labels.nii.gz").exists()
    report, written = reg.register_files("f.nii.gz", "m.nii.gz", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "disp.nii.gz", "notes.txt", "report.json", "warped.nii.gz"]
    assert report["fixed"] == os.path.join("..", "data", "f.nii.gz")

    from tfreg.visualize import show_result_dir

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    magic = {".png": b"\x89PNG", ".jpg": b"\xff\xd8\xff", ".pdf": b"%PDF"}
    for suffix, head in magic.items():
        path = show_result_dir(out, tmp_path / f"view{suffix}")
        assert path.read_bytes()[:len(head)] == head, suffix
    assert b"<svg" in show_result_dir(out, tmp_path / "view.svg").read_bytes()[:2000]
    result = CliRunner().invoke(cli, ["show", str(out), "-o", str(tmp_path / "view.tif")])
    assert result.exit_code == 1 and "unsupported figure format '.tif'" in result.output
    del fixed, moving, labels


# ----------------------------------------------------------------------------------- evaluate
def _fake_pipeline(monkeypatch, interrupt_at: int | None = None, fail_at: int | None = None):
    """Replace registration by a stub; returns the list of moving images it was called with."""
    import tfreg.register as reg

    calls = []

    def fake(fixed, moving, **kwargs):
        calls.append(Path(moving.path).name)
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        if fail_at is not None and len(calls) == fail_at:
            raise InputError(f"{moving.path}: image is constant (nothing to register)")
        disp = np.zeros(fixed.shape + (fixed.ndims,), np.float32)
        return reg.RegisterResult(moving.data, disp, None,
                                  {"folding_percent": 0.0, "runtime_seconds": float(len(calls))})

    monkeypatch.setattr(reg, "register_volumes", fake)
    return calls


@pytest.fixture()
def five_pairs(tmp_path) -> Path:
    from tfreg.synthetic import write_collection

    return write_collection(tmp_path / "data", n=6, shape=(8, 8), seed=2)


def test_evaluate_keeps_rows_on_interrupt_and_resumes(monkeypatch, tmp_path, five_pairs):
    from tfreg.evaluate import evaluate_spec, read_csv

    out = tmp_path / "eval.csv"
    calls = _fake_pipeline(monkeypatch, interrupt_at=5)
    with pytest.raises(Interrupted, match=r"4 of 5 pairs written to .*eval.csv, 1 remain"):
        evaluate_spec(five_pairs, split="train", out=out)
    assert len(read_csv(out)) == 4
    calls = _fake_pipeline(monkeypatch)
    rows, summary = evaluate_spec(five_pairs, split="train", out=out, resume=True)
    assert calls == ["sub-05.nii.gz"]  # only the missing pair was registered
    assert len(rows) == 5 and summary["pairs"] == 5
    # runtimes: 1, 2, 3, 4 from the first call, 1 from the resumed one
    assert summary["runtime_seconds"]["mean"] == pytest.approx((1 + 2 + 3 + 4 + 1) / 5)
    assert [r["pair"] for r in read_csv(out)] == [r["pair"] for r in rows]


def test_evaluate_failing_pair_keeps_rows_and_cli_exit_codes(monkeypatch, tmp_path, five_pairs):
    from tfreg.evaluate import read_csv

    out = tmp_path / "eval.csv"
    _fake_pipeline(monkeypatch, fail_at=3)
    result = CliRunner().invoke(cli, ["evaluate", str(five_pairs), "--split", "train", "-o",
                                      str(out), "-q"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "2 of 5 pairs written" in result.output
    assert "3 remain" in result.output and len(read_csv(out)) == 2
    _fake_pipeline(monkeypatch, interrupt_at=1)
    result = CliRunner().invoke(cli, ["evaluate", str(five_pairs), "--split", "train", "-o",
                                      str(out), "-q", "--resume"])
    assert result.exit_code == 130 and "2 of 5 pairs written" in result.output


def test_evaluate_validates_every_file_first(monkeypatch, tmp_path, five_pairs):
    """Two truncated scans: both reported before any pair is registered."""
    calls = _fake_pipeline(monkeypatch)
    for name in ("sub-02.nii.gz", "sub-04.nii.gz"):
        path = five_pairs.parent / "images" / name
        path.write_bytes(path.read_bytes()[:-40])
    result = CliRunner().invoke(cli, ["evaluate", str(five_pairs), "--split", "train", "-o",
                                      str(tmp_path / "e.csv")])
    assert result.exit_code == 1 and calls == []
    lines = result.output.strip().splitlines()
    assert len(lines) == 3, result.output
    assert lines[0].strip().startswith("1.") and "sub-02" in lines[0]
    assert lines[1].strip().startswith("2.") and "sub-04" in lines[1]
    assert lines[2].startswith("Error: ") and "2 problems" in lines[2]


# ------------------------------------------------------------------------ label-header tolerance
def test_label_header_tolerance():
    """The OASIS sample's label header (zooms 0.98125, 0.96875; origin shifted by 3 and 6 mm on a
    160x192x144 grid) is accepted with a warning; 10 % zooms or a shift over 5 % of the field of
    view are errors that say how to fix them."""
    from tfreg.io import check_label_grid

    shape = (160, 192, 144)
    image = np.eye(4)
    oasis = np.array([[0.98125, 0, 0, 3], [0, 0.96875, 0, 6], [0, 0, 1, 0], [0, 0, 0, 1]])
    note = check_label_grid("seg.nii.gz", oasis, shape, "img.nii.gz", image, shape)
    assert "using the image's header" in note and "3.1%" in note
    assert check_label_grid("seg.nii.gz", image, shape, "img.nii.gz", image, shape) is None
    with pytest.raises(InputError, match=r"voxel sizes by 10\.0%.*copy the image's header"):
        check_label_grid("seg.nii.gz", np.diag([1.1, 1, 1, 1]), shape, "img.nii.gz", image, shape)
    shifted = np.eye(4)
    shifted[0, 3] = 0.06 * np.linalg.norm(np.array(shape) - 1)  # 6 % of the diagonal
    with pytest.raises(InputError, match=r"positions by up to"):
        check_label_grid("seg.nii.gz", shifted, shape, "img.nii.gz", image, shape)


def test_load_pair_uses_the_image_header_for_a_close_label_map(tmp_path):
    from tfreg.register import load_pair

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = _nifti(tmp_path / "i.nii.gz", np.random.default_rng(0).random((10, 10)).astype(
        np.float32), affine)
    labels = _nifti(tmp_path / "l.nii.gz", np.ones((10, 10), np.int16),
                    np.diag([2.06, 1.96, 2.0, 1.0]))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("tfreg").addHandler(handler)
    try:
        _, moving, _, moving_l = load_pair(image, image, None, labels)
    finally:
        logging.getLogger("tfreg").removeHandler(handler)
    np.testing.assert_array_equal(moving_l.affine, moving.affine)
    assert any("header differs slightly" in r.getMessage() for r in records)


# --------------------------------------------------------------------------- quiet start
def test_noise_filter_patterns():
    from tfreg_cli.quiet import is_noise

    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796035515.433229    8187 cudart_stub.cc:31] Could not find cuda drivers on "
        "your machine, GPU will not be used.",
        "E0000 00:00:1796035520.1 8187 cuda_executor.cc:1228] failed call to cuInit: "
        "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
        "I0000 00:00:1.2 1 port.cc:153] oneDNN custom operations are on. You may see slightly "
        "different numerical results",
        "E0000 00:00:1796104913.442809    5939 text_format.cc:378] Error parsing text-format "
        "tensorflow.XlaSerializedCacheEntry: 2:1: Expected identifier, got: 5",
    ]
    keep = ["Error: missing.nii.gz: file not found",
            "E0000 00:00:1.2 1 op_kernel.cc:1830] OP_REQUIRES failed: out of memory",
            "E0000 00:00:1.2 1 text_format.cc:378] Error parsing text-format tfreg.Other: 1:1",
            "Fatal Python error: Segmentation fault"]
    assert all(is_noise(line) for line in noise)
    assert not any(is_noise(line) for line in keep)


def test_quiet_start_hides_tensorflow_noise_but_keeps_other_output(tmp_path):
    script = ("from tfreg_cli import quiet; quiet.install()\n"
              "import os, sys, tensorflow as tf\n"
              "tf.config.list_physical_devices('GPU')\n"
              "os.write(2, b'C-level line kept\\n')\n"
              "print('python line kept', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stderr.splitlines()) == ["C-level line kept", "python line kept"]


def test_ctrl_c_inside_a_long_native_call_exits_130_within_2_s(tmp_path):
    """The main thread is stuck in one C call (as in a long XLA compilation) that Python's signal
    handler cannot interrupt; the watchdog still ends the process promptly with status 130."""
    import signal

    script = ("import hashlib, sys\n"
              "from tfreg_cli import interrupt\n"
              "interrupt.install()\n"
              "print('ready', flush=True)\n"
              "hashlib.pbkdf2_hmac('sha256', b'x', b'y', 2**31 - 1)\n"
              "print('not interrupted', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    seconds = time.perf_counter() - sent
    assert proc.returncode == 130, (out, err)
    assert err.splitlines() == ["interrupted (Ctrl-C)"] and "not interrupted" not in out
    assert seconds < 2.0, seconds


def test_second_ctrl_c_ends_a_command_that_stops_gracefully(tmp_path):
    """Training installs its own SIGINT handler (finish the step, save): the first Ctrl-C is
    acknowledged at once, the second ends the process with 130 even inside a long C call."""
    import signal

    script = ("import hashlib, signal\n"
              "from tfreg_cli import interrupt\n"
              "interrupt.install()\n"
              "signal.signal(signal.SIGINT, lambda *a: None)\n"
              "print('ready', flush=True)\n"
              "hashlib.pbkdf2_hmac('sha256', b'x', b'y', 2**31 - 1)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # the first Ctrl-C is the command's to handle
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.perf_counter() - sent < 2.0
    assert err.splitlines() == [
        "stopping after the current step (Ctrl-C again to stop at once)",
        "interrupted twice: stopped at once without saving (the newest checkpoint is kept)"]


def test_a_command_reporting_its_interrupt_gets_no_second_message(tmp_path):
    """Training reports a second Ctrl-C itself (`interrupt.reporting()`, then its own line): the
    watchdog adds nothing, and ends the process with 130 if the command hangs on its way out."""
    import signal

    script = ("import signal, sys, time\n"
              "from tfreg_cli import interrupt\n"
              "interrupt.install()\n"
              "def stop(*a):\n"
              "    interrupt.reporting()\n"
              "    print('stopped by the command', file=sys.stderr, flush=True)\n"
              "    time.sleep(30)\n"      # a slow exit: the watchdog ends it
              "signal.signal(signal.SIGINT, lambda *a: signal.signal(signal.SIGINT, stop))\n"
              "print('ready', flush=True)\n"
              "while True: time.sleep(0.01)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.perf_counter() - sent < 3.0
    assert err.splitlines() == [
        "stopping after the current step (Ctrl-C again to stop at once)",
        "stopped by the command"]
