"""One bounded cache of compiled TensorFlow functions, shared by every op and instance optimisation.

XLA-compiled functions are expensive to build (tracing plus compilation, seconds) and each holds
its compiled executables, so tfreg keeps them in one least-recently-used cache of at most
`MAX_ENTRIES` entries (environment variable ``TFREG_COMPILE_CACHE``, default 64): a long process
that sees many shapes evicts the oldest instead of growing without bound. Thread-safe (instance
optimisation compiles later pyramid levels in background threads).

It also decides what ``jit="auto"`` (the default of the warping and integration ops and layers)
means: compile an op as its own XLA function when its output has at least `AUTO_MIN_VOXELS`
voxels and it is not being traced into a function built here (`jit_function`, `compiled`), whose
own `jit` decides (XLA compiles such a function whole). Below that size the plain TensorFlow graph
takes milliseconds and a compilation (0.3-1 s per shape) would not pay.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import tensorflow as tf

__all__ = ["MAX_ENTRIES", "AUTO_MIN_VOXELS", "cached", "compiled", "jit_function", "check_jit",
           "use_jit", "static_voxels", "clear", "size"]

MAX_ENTRIES = max(1, int(os.environ.get("TFREG_COMPILE_CACHE", "64")))

#: ``jit="auto"`` compiles ops whose output has at least this many voxels (e.g. 41^3 and up)
AUTO_MIN_VOXELS = 2**16

_ENTRIES: OrderedDict[Hashable, Any] = OrderedDict()
_LOCK = threading.Lock()
_TRACING = threading.local()  # depth of compiled functions being traced in this thread


def cached(key: Hashable, build: Callable[[], Any]) -> Any:
    """The object stored under `key`, built by ``build()`` on a miss (least recently used out).

    `build` runs outside the lock; if two threads miss at once, the first stored object wins.
    """
    with _LOCK:
        if key in _ENTRIES:
            _ENTRIES.move_to_end(key)
            return _ENTRIES[key]
    value = build()
    with _LOCK:
        if key in _ENTRIES:
            _ENTRIES.move_to_end(key)
            return _ENTRIES[key]
        _ENTRIES[key] = value
        while len(_ENTRIES) > MAX_ENTRIES:
            _ENTRIES.popitem(last=False)
        return value


def jit_function(fn: Callable, jit: bool = True) -> Callable:
    """``tf.function(fn, jit_compile=jit, autograph=False)``, not cached.

    Ops called with ``jit="auto"`` while `fn` is traced do not build XLA functions of their own:
    with ``jit=True`` XLA compiles the whole of `fn`, with False the caller asked for no XLA. Use
    it for any compiled function that calls tfreg's ops.
    """
    def traced(*args, **kwargs):  # runs while tf.function traces
        _TRACING.depth = getattr(_TRACING, "depth", 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _TRACING.depth -= 1

    return tf.function(traced, jit_compile=bool(jit), autograph=False)


class _Compiled:
    """A `jit_function` that, called eagerly with tensors while the store of traced functions
    (`tfreg.trace_store`) is enabled, runs the stored graph for the arguments' shapes (loaded,
    or traced and stored on first use) instead of tracing it in this process. Anywhere else
    (inside a traced function, other arguments, the store off) it is the `tf.function`."""

    def __init__(self, key: Hashable, fn: Callable, jit: bool):
        self.key = key
        self.jit = jit
        self.function = jit_function(fn, jit)
        self._by_shapes: dict[tuple, Callable] = {}
        # the store's entries are valid for one version of tfreg's code (`trace_store`): code
        # from elsewhere (a plugin's function) is traced in every process
        self._storable = str(getattr(fn, "__module__", None) or "").startswith("tfreg.")

    def __call__(self, *args, **kwargs):
        from tfreg import trace_store

        if (kwargs or not self._storable or trace_store.folder() is None
                or not tf.executing_eagerly()
                or not all(isinstance(a, tf.Tensor) for a in args)):
            return self.function(*args, **kwargs)
        shapes = tuple((a.dtype.name, tuple(a.shape)) for a in args)
        fn = self._by_shapes.get(shapes)
        if fn is None:
            key = ("compiled", self.key, self.jit, shapes)
            fn = trace_store.load(key, [])
            if fn is None:
                fn = trace_store.store(key, self.function.get_concrete_function(*args), []) \
                    or self.function
            self._by_shapes[shapes] = fn
        return fn(*args)


def compiled(key: Hashable, fn: Callable, *, jit: bool = True) -> Callable:
    """`jit_function` ``(fn, jit)``, one per `key` (and `jit`); called eagerly, it uses the
    store of traced functions when that is enabled (see `_Compiled`).

    `key` must name everything `fn` closes over that changes what it computes (static options,
    shapes of captured constants); the arguments' shapes are handled by `tf.function` retracing.
    """
    return cached(("tf.function", key, bool(jit)), lambda: _Compiled(key, fn, bool(jit)))


def check_jit(jit) -> bool | str:
    """Validate a `jit` argument: True, False or ``"auto"`` (numpy bools accepted)."""
    if isinstance(jit, (bool, np.bool_)):
        return bool(jit)
    if isinstance(jit, str) and jit == "auto":
        return jit
    raise ValueError(f"`jit` must be True, False or 'auto'. Received: jit={jit!r}")


def static_voxels(x: tf.Tensor) -> int:
    """Static number of voxels of a `(batch, *spatial, channels)` tensor (0 when unknown)."""
    spatial = x.shape[1:-1] if x.shape.rank is not None and x.shape.rank > 2 else None
    if spatial is None or any(s is None for s in spatial):
        return 0
    return int(np.prod(spatial))


def use_jit(jit: bool | str, voxels: int) -> bool:
    """Whether an op with `voxels` output voxels runs as its own XLA function.

    True and False are obeyed; ``"auto"`` compiles when ``voxels >= AUTO_MIN_VOXELS`` and the op
    is not being traced into a `jit_function` (whose `jit` then decides).
    """
    if jit != "auto":
        return bool(jit)
    return voxels >= AUTO_MIN_VOXELS and getattr(_TRACING, "depth", 0) == 0


def clear() -> None:
    """Drop every cached function."""
    with _LOCK:
        _ENTRIES.clear()


def size() -> int:
    """Number of cached entries."""
    with _LOCK:
        return len(_ENTRIES)
