"""Output-side guards: check that outputs can be created *before* any work is done, and turn an
`OSError` on the output side into one line.

Every command that writes calls `check_output_file` / `check_output_dir` on each output before it
loads TensorFlow or computes anything. The checks really try the file system (they create and
remove a probe file or folder), so they also fail where permission bits say yes but the write
would not succeed: a folder made immutable (``chattr +i``), a read-only mount, ``/proc`` or
``/sys``, a path below a regular file. Nothing is left behind by a check.

This module imports no TensorFlow and no NumPy (it runs during start-up).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from tfreg.errors import InputError

__all__ = ["check_output_file", "check_output_dir", "check_empty_or_owned", "os_error_line"]


def os_error_line(err: OSError, path: str | Path | None = None) -> str:
    """One line ``"<path>: <reason>"`` for an `OSError` (the path it names, else `path`).

    >>> os_error_line(PermissionError(13, "Permission denied", "/x/out.nii.gz"))
    '/x/out.nii.gz: Permission denied'
    """
    name = err.filename if err.filename is not None else path
    why = err.strerror or (str(err).strip().splitlines() or [type(err).__name__])[0]
    if err.filename2 is not None:
        why = f"{why} (-> {err.filename2})"
    return f"{name}: {why}" if name is not None else why


def _existing_ancestor(path: Path) -> Path:
    """The nearest folder at or above `path` that exists (raises when a file blocks the way)."""
    probe = path
    while True:
        if probe.exists():
            if not probe.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", str(probe))
            return probe
        if probe.parent == probe:
            return probe
        probe = probe.parent


def _probe_folder(folder: Path, *, what: str, target: Path) -> None:
    """Create the missing folders down to `folder` and a file in it, then remove what was made."""
    try:
        top = _existing_ancestor(folder)
    except NotADirectoryError as err:
        raise InputError(f"{what}{target}: cannot be created: {err.filename} is a file, not a "
                         "folder") from None
    made: list[Path] = []
    step = "create the folder"
    try:
        missing = []
        probe = folder
        while probe != top:
            missing.append(probe)
            probe = probe.parent
        for sub in reversed(missing):
            os.mkdir(sub)
            made.append(sub)
        step = "create files in"
        fd, name = tempfile.mkstemp(prefix=".tfreg-write-check-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        why = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
               errno.ENOENT: "not supported by this file system"}.get(
                   err.errno, err.strerror or type(err).__name__)
        where = folder if step == "create files in" else (err.filename or folder)
        raise InputError(f"{what}{target}: cannot {step} {where} ({why})") from None
    finally:
        for sub in reversed(made):
            try:
                os.rmdir(sub)
            except OSError:
                pass


def check_output_file(path: str | Path, option: str = "") -> Path:
    """Check that file `path` can be written (its folder created if needed); nothing is left.

    Args:
        path: the output file.
        option: the option that named it (e.g. ``"-o"``), put before the path in messages.

    Raises:
        InputError: ``"-o out/x.nii.gz: cannot write there (permission denied)"`` and the like;
            also when `path` is an existing folder.
    """
    path = Path(path)
    what = f"{option} " if option else ""
    if path.is_dir():
        raise InputError(f"{what}{path}: is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{what}{path}: exists and cannot be replaced (permission denied)")
    _probe_folder(path.parent if str(path.parent) else Path("."), what=what, target=path)
    return path


def check_output_dir(path: str | Path, option: str = "") -> Path:
    """Check that folder `path` can be created (or written into, when it exists).

    Raises:
        InputError: ``"-o some_file/out: cannot be created: some_file is a file, not a folder"``,
            ``"-o /proc/x: cannot write there (...)"``, an existing file at `path`.
    """
    path = Path(path)
    what = f"{option} " if option else ""
    if path.exists() and not path.is_dir():
        raise InputError(f"{what}{path}: exists and is a file, not a folder")
    _probe_folder(path, what=what, target=path)
    return path


def check_empty_or_owned(path: str | Path, markers: tuple[str, ...], option: str,
                         kind: str) -> None:
    """Refuse an existing, non-empty folder that is not one of tfreg's own, so a user's files
    are never replaced. A folder is tfreg's own (`kind`, e.g. "run directory") when it holds
    every name in `markers` (e.g. ``("config.yaml", "versions.yaml")`` for a run directory).

    Raises:
        InputError: ``"--out notes: is not empty and is not a tfreg run directory (holds a.txt,
            config.yaml); choose a new or empty folder"``.
    """
    path = Path(path)
    if not path.is_dir():
        return
    names = sorted(p.name for p in path.iterdir())
    if names and not all((path / marker).exists() for marker in markers):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise InputError(f"{option} {path}: is not empty and is not a tfreg {kind} (holds "
                         f"{shown}); choose a new or empty folder")
