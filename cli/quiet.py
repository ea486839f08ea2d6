"""A quiet start: TensorFlow's and CUDA's start-up lines kept off the console.

`install(verbose=False)` runs in `tfreg_cli.main` before anything imports TensorFlow:

1. it sets ``TF_CPP_MIN_LOG_LEVEL=2`` (C++ INFO and WARNING off; a value the user set wins),
   silences the Python loggers of TensorFlow and absl below ERROR and ignores Python warnings
   raised inside TensorFlow and Keras;
2. lines that no setting silences (absl's "All log messages before absl::InitializeLog()",
   "Could not find cuda drivers", the ``E0000 ... cuInit`` line on CPU-only machines, oneDNN and
   CPU-feature notes) are filtered: file descriptor 2 is redirected to a pipe for the life of the
   process, a thread reads it and forwards every line that is not such noise to the real stderr.
   Python's own ``sys.stderr`` (click messages, tracebacks) writes to the real stderr directly,
   so nothing tfreg prints is delayed or reordered.

With ``verbose=True`` (``tfreg --verbose ...`` or ``TFREG_VERBOSE=1``) nothing is filtered and
TensorFlow's C++ log level is 0.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import re
import sys
import threading
import warnings

__all__ = ["install", "is_noise", "NOISE"]

#: patterns of C-level start-up lines that carry no information for a tfreg user.
NOISE = [re.compile(p) for p in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called",
    r"^[IW]\d{4} [\d:. ]+\d+ \S+:\d+\]",                       # absl INFO / WARNING lines
    r"^E\d{4} [\d:. ]+\d+ \S+:\d+\].*(cuInit|CUDA|cuda|cuDNN|cuFFT|cuBLAS|"
    r"computation_placer|TensorRT|TF-TRT)",                     # CUDA errors on CPU machines
    r"oneDNN custom operations are on",
    r"This TensorFlow binary is optimized to use available CPU instructions",
    r"To enable the following instructions: .* rebuild TensorFlow",
    r"Could not find cuda drivers on your machine",
    # a warm persistent XLA cache (`tfreg.xla_cache`): TensorFlow tries each entry as text
    # before reading it as the binary it is, and logs the failed first try
    r"^E\d{4} [\d:. ]+\d+ text_format\.cc:\d+\] Error parsing text-format "
    r"tensorflow\.XlaSerializedCacheEntry",
    # XLA's "slow operation" alarm (compilation under load) and its continuation lines
    r"^E\d{4} [\d:. ]+\d+ slow_operation_alarm\.cc:\d+\]",
    r"^Constant folding an instruction is taking",
    r"^\s+%[\w.\-]+ = \S+\[",
    r"^This isn't necessarily a bug; constant-folding is inherently a trade-off",
    r"^If you'd like to file a bug, run with envvar XLA_FLAGS",
    r"^\s*$",
)]


def is_noise(line: str) -> bool:
    """Whether a C-level stderr line is TensorFlow/CUDA start-up noise."""
    return any(p.search(line) for p in NOISE)


_installed = False


def install(verbose: bool = False) -> None:
    """Set TensorFlow's logging before it is imported and filter what cannot be set (see the
    module docstring). Safe to call twice; does nothing to the streams when fd 2 is not a real
    file descriptor (e.g. inside a test runner that captured it)."""
    global _installed
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("tensorflow", "absl", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Python warnings raised inside TensorFlow/Keras (e.g. on loading a saved model) concern
    # their internals, not the user's input
    warnings.filterwarnings("ignore", module=r"(keras|tensorflow|absl|tf_keras)(\.|$)")
    if _installed:
        return
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    # Python-level writes go straight to the real stderr, flushed per line: a line leaves in one
    # write (print's text and its newline together), so the filter thread's lines cannot land
    # in the middle of it.
    sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(real), "wb", buffering=0),
                                  encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                                  errors="backslashreplace", line_buffering=True)
    thread = threading.Thread(target=_forward, args=(read_end, real), daemon=True,
                              name="tfreg-stderr-filter")
    thread.start()
    _installed = True

    def restore() -> None:
        try:
            os.dup2(real, 2)  # closes the pipe's last write end: the thread sees EOF
        except OSError:
            return
        thread.join(timeout=1.0)

    atexit.register(restore)


def _forward(read_end: int, real: int) -> None:
    """Copy lines from the pipe to the real stderr, dropping noise."""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        pending = b""
        while True:
            try:
                chunk = pipe.read(65536)
            except OSError:
                return
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                if not is_noise(raw.decode("utf-8", "replace")):
                    os.write(real, raw + b"\n")
        if pending and not is_noise(pending.decode("utf-8", "replace")):
            os.write(real, pending)
