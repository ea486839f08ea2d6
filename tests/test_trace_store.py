"""tfreg.trace_store: traced steps stored on disk, loaded by later processes instead of traced."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from registerproc import register_in_process
from tfreg import trace_store


@pytest.fixture
def store(tmp_path):
    folder = trace_store.enable(tmp_path / "traces")
    assert folder is not None and folder.parent == tmp_path / "traces"
    yield folder
    trace_store.disable()


def _adam_like_step():
    """A small stateful function of the kind instance optimisation stores: variables captured,
    a gradient inside, a loop (a nested function in the graph)."""
    param = tf.Variable(tf.zeros((4, 5)))
    count = tf.Variable(0.0)

    def step(lr, target):
        with tf.GradientTape() as tape:
            smooth = tf.while_loop(lambda i, x: i < 3, lambda i, x: (i + 1, 0.5 * (x + param)),
                                   (0, param))[1]
            loss = tf.reduce_sum(tf.square(smooth - target))
        grad = tape.gradient(loss, param)
        count.assign_add(1.0)
        param.assign_sub(lr * grad / tf.sqrt(count))
        return loss

    return param, count, tf.function(step, autograph=False)


def test_a_stored_function_computes_what_the_traced_one_did(store):
    target = tf.constant(np.arange(20, dtype=np.float32).reshape(4, 5) / 10)
    param, count, traced = _adam_like_step()
    losses_traced = [float(traced(tf.constant(0.1), target)) for _ in range(4)]
    after_traced = param.numpy()

    param.assign(tf.zeros_like(param))
    count.assign(0.0)
    key = ("test", "adam-like", 1)
    concrete = traced.get_concrete_function(tf.constant(0.1), target)
    stored = trace_store.store(key, concrete, [param, count])
    assert stored is not None and trace_store.entry_path(key).is_file()
    assert stored.name.startswith("tfreg_")
    losses_stored = [float(stored(tf.constant(0.1), target)) for _ in range(4)]
    np.testing.assert_array_equal(losses_stored, losses_traced)
    np.testing.assert_array_equal(param.numpy(), after_traced)
    assert float(count) == 4.0

    # loaded again, bound to other variables of the same shapes (a later process's)
    other, other_count = tf.Variable(tf.zeros((4, 5))), tf.Variable(0.0)
    again = trace_store.load(key, [other, other_count])
    assert again is not None
    assert [float(again(tf.constant(0.1), target)) for _ in range(4)] == losses_traced
    np.testing.assert_array_equal(other.numpy(), after_traced)
    assert not np.array_equal(after_traced, 0)  # the steps did move the parameter


def test_missing_unreadable_and_foreign_entries_give_none(store):
    param, count, traced = _adam_like_step()
    target = tf.zeros((4, 5))
    assert trace_store.load(("nothing", "here"), [param, count]) is None
    key = ("test", "damaged")
    trace_store.entry_path(key).write_bytes(b"not a stored function")
    assert trace_store.load(key, [param, count]) is None
    assert not trace_store.entry_path(key).exists()  # removed, to be traced and stored again
    concrete = traced.get_concrete_function(tf.constant(0.1), target)
    assert trace_store.store(key, concrete, [param, count]) is not None
    # an entry whose header names another key (e.g. a digest collision) is not used
    path = trace_store.entry_path(key)
    path.write_bytes(path.read_bytes().replace(b"damaged", b"changed", 1))
    assert trace_store.load(key, [param, count]) is None


def test_a_removed_folder_means_tracing_not_an_error(store):
    import shutil

    param, count, traced = _adam_like_step()
    concrete = traced.get_concrete_function(tf.constant(0.1), tf.zeros((4, 5)))
    shutil.rmtree(store)  # e.g. pruned by a process of another tfreg version
    assert trace_store.store(("test", "gone"), concrete, [param, count]) is None
    assert trace_store.load(("test", "gone"), [param, count]) is None


def test_a_function_capturing_a_tensor_constant_is_not_stored(store):
    weights = tf.constant(np.linspace(0, 1, 5, dtype=np.float32))  # captured, not a variable
    param = tf.Variable(tf.ones((5,)))
    fn = tf.function(lambda x: tf.reduce_sum(param * weights * x), autograph=False)
    concrete = fn.get_concrete_function(tf.ones((5,)))
    assert trace_store.store(("test", "constant"), concrete, [param]) is None
    assert not trace_store.entry_path(("test", "constant")).exists()


def test_off_and_folder_choice(monkeypatch, tmp_path):
    monkeypatch.setenv(trace_store.ENV, "off")
    assert trace_store.enable() is None and trace_store.folder() is None
    assert trace_store.entry_path(("k",)) is None
    monkeypatch.setenv(trace_store.ENV, str(tmp_path / "t"))
    try:
        folder = trace_store.enable()
        assert folder is not None and folder.parent == tmp_path / "t"
    finally:
        trace_store.disable()


def test_old_versions_are_pruned(tmp_path):
    base = tmp_path / "traces"
    for k in range(5):
        (base / f"old{k}").mkdir(parents=True)
        os.utime(base / f"old{k}", (1000 + k, 1000 + k))
    try:
        current = trace_store.enable(base)
    finally:
        trace_store.disable()
    left = sorted(p.name for p in base.iterdir())
    assert current.name in left
    assert len(left) == trace_store.KEEP_VERSIONS
    assert {"old4", "old3"} <= set(left) - {current.name}


def test_align_names_moves_the_counter_to_the_next_multiple():
    from tensorflow.python.framework import ops

    ops.uid()
    trace_store.align_names()
    first = ops.uid()  # the counter stopped on a multiple: the next number is one past it
    assert first % trace_store.NAME_STEP == 1
    trace_store.align_names()
    second = ops.uid()
    assert second == first + trace_store.NAME_STEP


def _register(tmp_path: Path, store: str, lam: float, out: str) -> tuple[np.ndarray, str]:
    return register_in_process(tmp_path / "xla", store, tmp_path / out, lam)


def _steps(folder: Path) -> int:
    """Entries of instance-optimisation steps (their key, in the header, starts so)."""
    return sum(p.read_bytes().split(b"\n", 2)[1].startswith(b'{"key": "(\'instance\'')
               for p in folder.rglob("*.fn"))


def test_other_settings_are_other_entries(store):
    """Every setting is part of a step's key: another smoothness weight stores three new steps
    (plain graphs here, no XLA), and gives another field."""
    from scipy import ndimage

    from tfreg import instance
    from tfreg.ops import compile_cache

    rng = np.random.default_rng(0)
    fixed = ndimage.gaussian_filter(rng.random((40, 40)), 2).astype(np.float32)
    moving = np.roll(fixed, 2, axis=0)
    fields = []
    for lam in (1.0, 2.0):
        compile_cache.clear()  # as a new process would
        cfg = instance.InstanceConfig(levels=(2, 1), iterations=(3, 3), learning_rate=(0.1, 0.1),
                                      ncc_win=(3, 3), affine_iterations=2, affine_level=1,
                                      min_level_size=4, min_affine_size=4, jit=False, lam=lam)
        fields.append(instance.register_arrays(fixed, moving, cfg).disp)
        assert _steps(store) == 3 * len(fields)
    assert not np.array_equal(*fields)
    compile_cache.clear()


def test_registration_processes_store_then_load_the_same_steps(tmp_path):
    """The first process stores its three steps (affine, two levels); the second loads them,
    finds their XLA executables, and computes exactly what a process without the store does."""
    traces = tmp_path / "traces"
    plain, _ = _register(tmp_path, "off", 1.0, "plain.npy")
    first, _ = _register(tmp_path, str(traces), 1.0, "first.npy")
    entries = {p.name: p.stat().st_ino for p in traces.rglob("*.fn")}
    assert _steps(traces) == 3  # besides the compiled ops it ran eagerly (`compiled`)
    compiled = sorted(p.name for p in (tmp_path / "xla").glob("*.pb"))
    second, log = _register(tmp_path, str(traces), 1.0, "second.npy")
    # every XLA executable it ran was found under the stored functions' names: nothing new
    assert sorted(p.name for p in (tmp_path / "xla").glob("*.pb")) == compiled
    # loaded, not stored again (a store writes a new file in place of the old one)
    assert {p.name: p.stat().st_ino for p in traces.rglob("*.fn")} == entries
    assert "Loading cached entry" in log                            # XLA executables found
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(second, plain)
    assert np.abs(plain).max() > 0.5  # the registration moved something


def _pair_fn():
    """A two-output function that passes for tfreg's own code (`_Compiled` stores only that)."""
    def pair(a, b):
        return tf.reduce_sum(a * b, axis=-1), tf.sin(a) - b

    pair.__module__ = "tfreg.test_pair"
    return pair


def test_compiled_ops_called_eagerly_use_the_store(store):
    """`compile_cache.compiled` functions (the warps, integration, ... that run as their own
    XLA functions) are stored per argument shapes, and give what the traced function gives."""
    from tfreg.ops import compile_cache

    compile_cache.clear()
    rng = np.random.default_rng(3)
    x = tf.constant(rng.random((2, 9, 7)).astype(np.float32))
    y = tf.constant(rng.random((2, 9, 7)).astype(np.float32))
    fn = compile_cache.compiled(("test.pair", 1), _pair_fn())
    first = fn(x, y)
    assert isinstance(first, tuple) and len(first) == 2
    entries = {p.name: p.stat().st_ino for p in store.glob("*.fn")}
    assert len(entries) == 1
    expected = (np.sum(x.numpy() * y.numpy(), axis=-1), np.sin(x.numpy()) - y.numpy())
    for got, want in zip(first, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # another process (the in-memory cache cleared) loads the entry instead of storing again
    compile_cache.clear()
    fn = compile_cache.compiled(("test.pair", 1), _pair_fn())
    again = fn(x, y)
    assert {p.name: p.stat().st_ino for p in store.glob("*.fn")} == entries
    for got, want in zip(again, first):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    fn(x[:1], y[:1])  # another shape: another entry
    assert len(list(store.glob("*.fn"))) == 2
    # inside a traced function it is the tf.function (no stored call in a graph)
    outer = tf.function(lambda a, b: fn(a, b)[0] * 2.0)
    np.testing.assert_allclose(outer(x, y).numpy(), 2 * expected[0], rtol=1e-5)
    compile_cache.clear()


def test_compiled_functions_from_outside_tfreg_are_not_stored(store):
    """Entries are valid for one version of tfreg's code; a plugin's own function is not
    covered, so it is traced in every process instead of stored."""
    from tfreg.ops import compile_cache

    compile_cache.clear()
    fn = compile_cache.compiled(("test.outside",), lambda a: a * 3.0)  # defined in this test
    assert float(fn(tf.constant(2.0))) == 6.0
    assert not list(store.glob("*.fn"))
    compile_cache.clear()
