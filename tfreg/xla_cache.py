"""A persistent XLA compilation cache shared by tfreg processes, in the user's cache folder.

TensorFlow's XLA compiler can store the executables it builds in a folder and load them in later
processes (``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=...``), so a second
``tfreg register`` of images of the same shape skips most of its compilation. TensorFlow writes
those files in place and fails the computation when it finds a partial or unreadable one, so
tfreg never lets it write into the shared folder:

* the shared folder (`shared_dir`) holds complete files only, published by atomic renames;
* each process works in a private folder beside it, filled with hard links to the shared files
  when `enable` runs; TensorFlow reads and writes there; at exit, new files move into the shared
  folder (atomically; the first process to publish a file wins) and the private folder goes away;
* private folders left by killed processes are removed after a day, and the oldest shared files
  go when the folder exceeds `MAX_BYTES`.

The folder is ``$TFREG_XLA_CACHE`` if set (``off`` turns the cache off), else
``$XDG_CACHE_HOME/tfreg/xla`` or ``~/.cache/tfreg/xla``, with one subfolder per TensorFlow version
and CPU (executables are machine code for one CPU). Deleting it is always safe. No TensorFlow
import here: `enable` must run before the process's first XLA compilation (TensorFlow reads the
flag then), which the command line does at start-up.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

__all__ = ["ENV", "MAX_BYTES", "shared_dir", "enable", "enable_in_child", "publish", "prune"]

#: environment variable: the cache folder, or ``off``/``0`` to disable the cache
ENV = "TFREG_XLA_CACHE"

#: the shared folder is pruned (oldest files first) to this size when a process starts
MAX_BYTES = 2 * 1024**3

_FLAG = "--tf_xla_persistent_cache_directory"
_PRIVATE_PREFIX = ".proc-"
_STALE_SECONDS = 24 * 3600
_work: Path | None = None


def _machine() -> str:
    """TensorFlow version and a digest of the CPU model and its instruction-set flags."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tf_version = version("tensorflow")
    except PackageNotFoundError:
        tf_version = "unknown"
    cpu = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu += "".join(sorted({line for line in fh
                                   if line.startswith(("flags", "model name", "Features"))}))
    except OSError:
        pass
    return f"tf{tf_version}-{hashlib.sha256(cpu.encode()).hexdigest()[:12]}"


def shared_dir() -> Path | None:
    """The shared cache folder for this TensorFlow and CPU; None when ``$TFREG_XLA_CACHE`` is
    ``off``, ``0``, ``no`` or ``false``."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "no", "false"):
        return None
    if value:
        base = Path(value).expanduser()
    else:
        home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = Path(home) / "tfreg" / "xla"
    return base / _machine()


def enable(folder: str | Path | None = None) -> Path | None:
    """Let this process's XLA compilations read and add to the shared cache.

    Sets ``TF_XLA_FLAGS`` (kept as it is when it already names a cache folder), links the shared
    files into a private folder and registers `publish` to run at exit. Call it before the first
    XLA compilation. Returns the private folder, or None when the cache is off, the folder cannot
    be written, or it was enabled already.
    """
    global _work
    if _work is not None or _FLAG in os.environ.get("TF_XLA_FLAGS", ""):
        return None
    shared = Path(folder) if folder is not None else shared_dir()
    if shared is None:
        return None
    try:
        shared.mkdir(parents=True, exist_ok=True)
        prune(shared)
        work = Path(tempfile.mkdtemp(prefix=_PRIVATE_PREFIX, dir=shared))
        for entry in shared.glob("*.pb"):
            try:
                os.link(entry, work / entry.name)
            except OSError:  # no hard links on this file system: a copy
                shutil.copy2(entry, work / entry.name)
    except OSError:
        return None
    _work = work
    flags = os.environ.get("TF_XLA_FLAGS", "")
    os.environ["TF_XLA_FLAGS"] = f"{flags} {_FLAG}={work}".strip()
    atexit.register(publish)
    return work


def enable_in_child() -> Path | None:
    """`enable` in a process started by one that enabled the cache: the inherited
    ``TF_XLA_FLAGS`` names the parent's private folder, where two processes must not write; this
    process gets a private folder of its own beside it. Does nothing when the parent's flag
    names no private folder of this module (the cache is off, or set by the user)."""
    flags = os.environ.get("TF_XLA_FLAGS", "").split()
    inherited = [f for f in flags if f.startswith(_FLAG + "=")]
    if not inherited:
        return None
    folder = Path(inherited[-1].split("=", 1)[1])
    if not folder.name.startswith(_PRIVATE_PREFIX):
        return None
    os.environ["TF_XLA_FLAGS"] = " ".join(f for f in flags if not f.startswith(_FLAG + "="))
    return enable(folder.parent)


def publish() -> int:
    """Move the files this process compiled into the shared folder and remove its private
    folder; returns the number of new files. Runs at exit after `enable`."""
    global _work
    work, _work = _work, None
    if work is None or not work.is_dir():
        return 0
    shared = work.parent
    added = 0
    for entry in work.glob("*.pb"):
        target = shared / entry.name
        try:
            if entry.stat().st_nlink > 1 or target.exists():
                continue  # linked from the shared folder, or published meanwhile by another
            os.replace(entry, target)  # a complete file, renamed on one file system: atomic
            added += 1
        except OSError:
            pass
    shutil.rmtree(work, ignore_errors=True)
    return added


def prune(shared: Path, max_bytes: int = MAX_BYTES) -> None:
    """Remove private folders older than a day and the oldest cache files beyond `max_bytes`."""
    now = time.time()
    files = []
    for entry in shared.iterdir():
        try:
            info = entry.stat()
            if entry.is_dir() and entry.name.startswith(_PRIVATE_PREFIX):
                if now - info.st_mtime > _STALE_SECONDS:
                    shutil.rmtree(entry, ignore_errors=True)
            elif entry.suffix == ".pb":
                files.append((info.st_mtime, info.st_size, entry))
        except OSError:
            continue
    total = sum(size for _, size, _ in files)
    for _, size, entry in sorted(files):
        if total <= max_bytes:
            break
        try:
            entry.unlink()
            total -= size
        except OSError:
            pass
