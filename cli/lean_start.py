"""A shorter start and end of a ``tfreg`` process (what a user waits for besides the work).

* `install()` (in `tfreg_cli.main`, before anything imports TensorFlow): while TensorFlow or Keras
  is being imported, a finder on ``sys.meta_path`` answers "not installed" for the optional
  packages Keras loads at import time when they are present: IPython (for notebook display in its
  model file editor) and matplotlib (for its image gallery), about 1.4 s of a command's start on
  a 2-core machine. Keras guards both imports and only those two Keras features lose them. Once
  TensorFlow and Keras are imported the finder steps aside: ``tfreg show`` and the PNG overlays
  import matplotlib as usual.
* Keras itself: TensorFlow's own import loads Keras (``keras.src.optimizers``, inside a
  ``try``/``except ImportError``) so that Keras' optimizers are registered early; that is 0.4-0.5 s
  of every command's start. While TensorFlow is importing, the finder lets that import fail;
  whatever then needs Keras (the layers, models, training, export) imports it as usual, and its
  import registers the optimizers then. ``tfreg register`` without a model never needs it.
* `exit_now(code)`: ends the process once a command has finished without the interpreter's
  teardown of TensorFlow's modules and threads (0.7-2 s): the exit handlers run (log handlers,
  the stderr filter of `tfreg_cli.quiet`), the streams are flushed, then ``os._exit``. Every
  file tfreg writes is closed before a command returns (writes are atomic), so nothing is lost.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import os
import sys

__all__ = ["install", "exit_now", "SKIPPED", "DEFERRED"]

#: top-level packages that TensorFlow's and Keras' own imports do not get.
SKIPPED = ("IPython", "matplotlib")

#: packages during whose import `SKIPPED` are answered as absent.
_IMPORTING = ("tensorflow", "keras")

#: imported by TensorFlow's own import only to register early; not loaded while TensorFlow imports
DEFERRED = "keras"


def _being_imported(name: str) -> bool:
    """Whether module `name` is in the middle of its first import (its spec says so)."""
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


class _DeferredLoader(importlib.abc.Loader):
    """A loader whose module fails to load (ImportError), so that nothing of it is kept."""

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError(f"{module.__name__} is imported later, not during TensorFlow's import",
                          name=module.__name__)


class _SkipOptionalImports(importlib.abc.MetaPathFinder):
    """Answers `SKIPPED` packages as absent while TensorFlow or Keras is importing, and lets
    `DEFERRED` fail to load while TensorFlow is importing."""

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top == DEFERRED and _being_imported("tensorflow"):
            # a real spec (TensorFlow reads its origin to find Keras' folder) that fails to load
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None:
                spec.loader = _DeferredLoader()
            return spec
        if top not in SKIPPED:
            return None
        if any(_being_imported(name) for name in _IMPORTING):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


_finder = _SkipOptionalImports()


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once). Does nothing if TensorFlow is already
    imported."""
    if "tensorflow" in sys.modules or _finder in sys.meta_path:
        return
    sys.meta_path.insert(0, _finder)


def exit_now(code: int) -> None:
    """Run the exit handlers, flush the standard streams and end the process with `code`."""
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(code)
