"""Traced step functions kept on disk, so that later processes call them without tracing.

Building the TensorFlow graph of an instance-optimisation step from Python (tracing: ~1,400
operations for one velocity level, forward and gradient) takes 0.4-0.9 s on a 2-core CPU, and
each `tfreg register` call traced every stage's step again. The graph depends only on tfreg's
code, the TensorFlow and NumPy versions, the settings and the argument shapes, so:

* `store` writes a traced function's graph (its ``FunctionDef`` and the functions it calls,
  renamed after the entry's key) into the store, then returns it loaded;
* `load` reads an entry, adds its functions to TensorFlow's runtime and returns a
  `StoredFunction` that calls the graph directly with the caller's variables: ~5 ms instead of
  a trace, the same graph and so the same numbers. Its name does not depend on how many
  functions the process traced before, so the persistent XLA cache (`tfreg.xla_cache`) finds its
  executable in every later process;
* `align_names` moves TensorFlow's name counter to a fixed value, so that functions traced after
  it get the same names whether this process stored its steps or loaded them.

The store is off until `enable` runs (the command line does at start-up, before TensorFlow is
imported: this module imports it only when a function is stored or loaded); library calls trace
as before. Folder: ``$TFREG_TRACE_CACHE`` if set (``off`` disables it), else
``$XDG_CACHE_HOME/tfreg/traces`` or ``~/.cache/tfreg/traces``, one subfolder per digest of
tfreg's source and the TensorFlow and NumPy versions (older subfolders are removed, keeping the
newest `KEEP_VERSIONS`). Entries are written to a temporary file and renamed into place; an
unreadable entry is removed and the function traced again. Deleting the folder is always safe.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = ["ENV", "KEEP_VERSIONS", "NAME_STEP", "StoredFunction", "enable", "disable", "folder",
           "entry_path", "load", "store", "align_names"]

#: environment variable: the store's folder, or ``off``/``0`` to disable it
ENV = "TFREG_TRACE_CACHE"

#: version subfolders kept (the newest by modification time)
KEEP_VERSIONS = 3

#: `align_names` moves the name counter to the next multiple of this
NAME_STEP = 1 << 15

_MAGIC = b"tfreg-function-1\n"
_folder: Path | None = None
_code_digest: str | None = None


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _tfreg_source_digest() -> str:
    """sha256 of every ``.py`` file of the tfreg package (relative path and content)."""
    global _code_digest
    if _code_digest is None:
        root = Path(__file__).resolve().parent
        digest = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
        digest.update(f"tf {_version('tensorflow')} numpy {_version('numpy')}".encode())
        _code_digest = digest.hexdigest()[:20]
    return _code_digest


def _base_dir() -> Path | None:
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "no", "false"):
        return None
    if value:
        return Path(value).expanduser()
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(home) / "tfreg" / "traces"


def enable(base: str | Path | None = None) -> Path | None:
    """Turn the store on for this process (`base`: the folder instead of ``$TFREG_TRACE_CACHE``
    or the user's cache). Returns this version's subfolder, or None when the store is off or
    its folder cannot be created."""
    global _folder
    base = Path(base) if base is not None else _base_dir()
    if base is None:
        _folder = None
        return None
    target = base / _tfreg_source_digest()
    try:
        target.mkdir(parents=True, exist_ok=True)
        os.utime(target)
        _prune(base, keep=target)
    except OSError:
        _folder = None
        return None
    _folder = target
    return target


def disable() -> None:
    """Turn the store off for this process."""
    global _folder
    _folder = None


def folder() -> Path | None:
    """This process's store folder (None when off)."""
    return _folder


def _prune(base: Path, keep: Path) -> None:
    """Remove version subfolders beyond the newest `KEEP_VERSIONS` (never `keep`)."""
    subs = [p for p in base.iterdir() if p.is_dir() and p != keep]
    subs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in subs[KEEP_VERSIONS - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def _key_digest(key: Any) -> str:
    return hashlib.sha256(repr(key).encode()).hexdigest()[:24]


def entry_path(key: Any) -> Path | None:
    """Where the entry of `key` lives (None when the store is off)."""
    return None if _folder is None else _folder / f"{_key_digest(key)}.fn"


class StoredFunction:
    """A stored graph bound to the caller's variables: ``fn(*tensors)`` returns its output
    tensor, or its tuple of output tensors, as the traced function did.

    Attributes:
        name: the function's name in TensorFlow's runtime.
    """

    def __init__(self, name: str, variables: Sequence[tf.Variable], captures: list[int],
                 num_outputs: int, as_tuple: bool = False):
        self.name = name
        self._handles = [variables[i].handle for i in captures]
        self._num_outputs = num_outputs
        self._tuple = as_tuple
        from tensorflow.python.eager import context

        self._context = context.context()

    def __call__(self, *args) -> tf.Tensor | tuple[tf.Tensor, ...]:
        import tensorflow as tf

        inputs = [tf.convert_to_tensor(a) for a in args] + self._handles
        outputs = self._context.call_function(self.name.encode(), inputs, self._num_outputs)
        return tuple(outputs) if self._tuple else outputs[0]


def _rename(library, prefix: str) -> str:
    """Rename every function of `library` (FunctionDefLibrary; the first is the entry) to
    ``prefix_k`` and its references; returns the entry's new name."""
    names = {fn.signature.name: f"{prefix}_{k}" for k, fn in enumerate(library.function)}
    for fn in library.function:
        fn.signature.name = names[fn.signature.name]
        for node in fn.node_def:
            if node.op in names:
                node.op = names[node.op]
            for attr in node.attr.values():
                if attr.HasField("func") and attr.func.name in names:
                    attr.func.name = names[attr.func.name]
                for ref in attr.list.func:
                    if ref.name in names:
                        ref.name = names[ref.name]
    return library.function[0].signature.name


def _register(library) -> None:
    from tensorflow.python.eager import context

    ctx = context.context()
    for fn in reversed(library.function):  # callees first
        if not ctx.has_function(fn.signature.name):
            ctx.add_function_def(fn)


def store(key: Any, concrete, variables: Sequence[tf.Variable]) -> StoredFunction | None:
    """Write the graph of `concrete` (a traced ``ConcreteFunction``) under `key` and return it
    loaded (`load`). `variables`: every variable the function captures; a function that captures
    anything else (a tensor constant), or returns anything but a tensor or a flat tuple of
    tensors, is not stored. Returns None when the store is off or the
    function cannot be stored; the caller keeps using `concrete`."""
    path = entry_path(key)
    if path is None:
        return None
    import tensorflow as tf
    from tensorflow.core.framework import function_pb2

    outputs = concrete.structured_outputs
    as_tuple = isinstance(outputs, tuple)
    flat = list(outputs) if as_tuple else [outputs]
    if not flat or not all(isinstance(t, tf.Tensor) for t in flat):
        return None  # only a tensor or a flat tuple of tensors
    captures = []
    for captured in concrete.captured_inputs:
        match = [i for i, var in enumerate(variables) if captured is var.handle]
        if not match:
            return None
        captures.append(match[0])
    library = function_pb2.FunctionDefLibrary()
    library.function.append(concrete.function_def)
    library.function.extend(concrete.graph.as_graph_def().library.function)
    name = _rename(library, f"tfreg_{path.stem}")
    header = json.dumps({"key": repr(key), "name": name, "captures": captures,
                         "outputs": len(flat), "tuple": as_tuple,
                         "written": time.time()}).encode()
    temporary = None
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as fh:
            temporary = Path(fh.name)
            fh.write(_MAGIC + header + b"\n" + library.SerializeToString())
        os.replace(temporary, path)
    except OSError:  # e.g. the folder was removed meanwhile (another version's prune)
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        return None
    return load(key, variables)


def load(key: Any, variables: Sequence[tf.Variable]) -> StoredFunction | None:
    """The stored function of `key` bound to `variables` (in the order given to `store`), or
    None when the store is off, has no such entry, or the entry is unreadable (then removed)."""
    path = entry_path(key)
    if path is None or not path.is_file():
        return None
    from tensorflow.core.framework import function_pb2

    try:
        data = path.read_bytes()
        if not data.startswith(_MAGIC):
            raise ValueError("not a stored function")
        header, _, body = data[len(_MAGIC):].partition(b"\n")
        meta = json.loads(header)
        if meta["key"] != repr(key):
            raise ValueError("another key")
        library = function_pb2.FunctionDefLibrary.FromString(body)
        if library.function[0].signature.name != meta["name"]:
            raise ValueError("inconsistent entry")
        if max(meta["captures"], default=-1) >= len(variables):
            raise ValueError("captures more variables than given")
        _register(library)
    except Exception:  # noqa: BLE001 - a damaged entry: trace again and replace it
        path.unlink(missing_ok=True)
        return None
    return StoredFunction(meta["name"], variables, meta["captures"], int(meta["outputs"]),
                          bool(meta.get("tuple", False)))


def align_names() -> None:
    """Move TensorFlow's process-wide name counter (the number in a traced function's name,
    which the persistent XLA cache's keys contain) to the next multiple of `NAME_STEP`, so that
    what is traced next gets the same names in every process that reaches this point with a
    counter below it, whatever it traced or loaded before."""
    from tensorflow.python.framework import ops

    current = ops.uid()
    for _ in range(-current % NAME_STEP):
        ops.uid()
