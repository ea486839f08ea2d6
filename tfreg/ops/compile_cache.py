"""One bounded cache of compiled TensorFlow functions, shared by every op and instance optimisation.

XLA-compiled functions are expensive to build (tracing plus compilation, seconds) and each holds
its compiled executables, so tfreg keeps them in one least-recently-used cache of at most
`MAX_ENTRIES` entries (environment variable ``TFREG_COMPILE_CACHE``, default 64): a long process
that sees many shapes evicts the oldest instead of growing without bound. Thread-safe (instance
optimisation compiles later pyramid levels in background threads).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import tensorflow as tf

__all__ = ["MAX_ENTRIES", "cached", "compiled", "clear", "size"]

MAX_ENTRIES = max(1, int(os.environ.get("TFREG_COMPILE_CACHE", "64")))

_ENTRIES: OrderedDict[Hashable, Any] = OrderedDict()
_LOCK = threading.Lock()


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


def compiled(key: Hashable, fn: Callable, *, jit: bool = True) -> Callable:
    """``tf.function(fn, jit_compile=jit, autograph=False)``, one per `key` (and `jit`).

    `key` must name everything `fn` closes over that changes what it computes (static options,
    shapes of captured constants); the arguments' shapes are handled by `tf.function` retracing.
    """
    return cached(("tf.function", key, bool(jit)),
                  lambda: tf.function(fn, jit_compile=bool(jit), autograph=False))


def clear() -> None:
    """Drop every cached function."""
    with _LOCK:
        _ENTRIES.clear()


def size() -> int:
    """Number of cached entries."""
    with _LOCK:
        return len(_ENTRIES)
