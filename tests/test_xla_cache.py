"""tfreg.xla_cache: XLA executables persist across processes, published atomically."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from registerproc import register_in_process
from tfreg import xla_cache

SCRIPT = """
import sys
from tfreg import xla_cache
work = xla_cache.enable(sys.argv[1])
assert work is not None and work.parent == __import__("pathlib").Path(sys.argv[1])
import tensorflow as tf
f = tf.function(lambda x: tf.reduce_sum(tf.sin(x) * x), jit_compile=True)
print(float(f(tf.linspace(0.0, 1.0, 17))))
"""


def _run(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0",
           "TF_CPP_VMODULE": "device_executable_persistor=1"}
    env.pop("TF_XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], capture_output=True,
                          text=True, env=env, timeout=600)


def test_second_process_loads_what_the_first_compiled(tmp_path):
    shared = tmp_path / "xla"
    first = _run(shared)
    assert first.returncode == 0, first.stderr[-2000:]
    files = sorted(p.name for p in shared.glob("*.pb"))
    assert files, "nothing was published"
    assert not [p for p in shared.iterdir() if p.is_dir()]  # the private folder is gone
    assert "Loading cached entry" not in first.stderr
    second = _run(shared)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout == first.stdout  # the same value from the loaded executable
    assert "Loading cached entry" in second.stderr
    assert sorted(p.name for p in shared.glob("*.pb")) == files


def test_folder_choice_and_off(monkeypatch, tmp_path):
    monkeypatch.setenv(xla_cache.ENV, "off")
    assert xla_cache.shared_dir() is None
    assert xla_cache.enable() is None
    monkeypatch.setenv(xla_cache.ENV, str(tmp_path / "c"))
    assert xla_cache.shared_dir().parent == tmp_path / "c"
    assert xla_cache.shared_dir().name.startswith("tf")
    monkeypatch.delenv(xla_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert xla_cache.shared_dir().parent == tmp_path / "xdg" / "tfreg" / "xla"
    # a cache folder the user already gave TensorFlow is left alone
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_persistent_cache_directory=/elsewhere")
    assert xla_cache.enable(tmp_path / "mine") is None
    assert os.environ["TF_XLA_FLAGS"] == "--tf_xla_persistent_cache_directory=/elsewhere"


def test_a_child_process_gets_its_own_private_folder(monkeypatch, tmp_path):
    shared = tmp_path / "shared"
    parent_private = shared / ".proc-parent"
    parent_private.mkdir(parents=True)
    (shared / "entry.pb").write_bytes(b"compiled")
    monkeypatch.setattr(xla_cache, "_work", None)  # as in a fresh child process
    monkeypatch.setenv("TF_XLA_FLAGS", f"--other=1 --tf_xla_persistent_cache_directory="
                                       f"{parent_private}")
    own = xla_cache.enable_in_child()
    try:
        assert own is not None and own.parent == shared and own != parent_private
        assert (own / "entry.pb").read_bytes() == b"compiled"  # the shared entries, linked
        flags = os.environ["TF_XLA_FLAGS"].split()
        assert "--other=1" in flags
        assert [f for f in flags if "cache_directory" in f] == \
            [f"--tf_xla_persistent_cache_directory={own}"]
    finally:
        xla_cache.publish()
    assert not own.exists()
    # a folder the user named (not a private one of this module) is left alone
    monkeypatch.setenv("TF_XLA_FLAGS", f"--tf_xla_persistent_cache_directory={tmp_path}")
    assert xla_cache.enable_in_child() is None


def test_prune_removes_stale_private_folders_and_oldest_files(tmp_path):
    stale, fresh = tmp_path / ".proc-old", tmp_path / ".proc-new"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - 2 * 24 * 3600
    os.utime(stale, (old, old))
    for i in range(4):
        path = tmp_path / f"e{i}.pb"
        path.write_bytes(b"x" * 100)
        os.utime(path, (old + i, old + i))
    xla_cache.prune(tmp_path, max_bytes=250)
    assert not stale.exists() and fresh.exists()
    assert sorted(p.name for p in tmp_path.glob("*.pb")) == ["e2.pb", "e3.pb"]


def test_a_second_registration_process_compiles_nothing(tmp_path):
    # the step functions of later stages compile in background threads; their traced names
    # (part of the cache key) must not depend on how those threads interleave
    shared = tmp_path / "xla"
    register_in_process(shared, "off", tmp_path / "first.npy")
    files = sorted(p.name for p in shared.glob("*.pb"))
    assert len(files) >= 3  # the affine step and the two levels' steps at least
    _, second = register_in_process(shared, "off", tmp_path / "second.npy")
    assert "Loading cached entry" in second
    assert sorted(p.name for p in shared.glob("*.pb")) == files
