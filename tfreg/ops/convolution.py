"""Stride-1 convolution with a faster, leaner gradient on CPU (2D and 3D, channels last).

TensorFlow's CPU kernels for the two convolution gradients (``Conv3DBackpropInputV2`` and
``Conv3DBackpropFilterV2``) build an im2col buffer of ``voxels x taps x channels`` floats
(3.6 GB for one 3x3x3, 32-channel layer at 96x112x96) and are 3-4x slower than the forward
convolution. `conv` keeps TensorFlow's forward convolution and replaces both gradients:

* input gradient: the forward convolution of the (padded) output gradient with the kernel
  flipped in space and transposed in channels (a correlation is the adjoint of a correlation);
* kernel gradient: for each kernel tap ``t``, ``dK[t] = X_t^T G`` where ``X_t`` is the padded
  input shifted by ``t``. On the padded grid flattened in C order a spatial shift is a constant
  offset, so every ``X_t`` is a contiguous slice of one flat array and no patch buffer is built:
  ``prod(kernel)`` matrix products of ``(B * prod(padded), C_in)^T x (B * prod(padded), C_out)``.
  The flat input's rows are padded with zero channels to a multiple of 64 bytes where that is
  cheap (28 -> 32 channels), so that each shifted slice shares the array's buffer instead of
  being copied (`_aligned_channels`: 1.6-1.9x faster kernel gradient at 28 and 56 channels).
  The products run over slabs of output planes (`SLAB_BYTES`), so the padded copies stay small.

Measured at 96x112x96, 32 -> 32 channels, 1 thread (`benchmarks/bench_conv.py`): forward +
both gradients 5.8 s instead of 11.1 s, without the two 3.6 GB buffers. On small volumes the
one-product-per-tap form costs more than TensorFlow's single kernel (24^3, 8 channels: 0.079 s
against 0.054 s), so `supports` declines inputs below `MIN_VOXELS` voxels. Under mixed precision
the kernel gradient's products accumulate in float32.
Values match TensorFlow's own gradients to float32 rounding (tests/test_convolution.py).

With TensorFlow's oneDNN kernels on (`onednn_enabled`; `tfreg` turns them on when it is imported
before TensorFlow) every convolution is faster, and `conv`'s gradients stay ahead of oneDNN's
from 16 input channels (96x112x96, 1 thread, forward + both gradients: 32 -> 32 2.75 s against
3.41 s, 16 -> 3 0.35 against 0.83 s); with fewer input channels `supports` leaves the layer to
oneDNN (2 -> 16: 0.20 against 0.45 s).

In a traced step the gradient's work is ordered with `tfreg.ops.scheduling.after`: the padded
input is made only once the output gradient exists, the kernel gradient's slabs and taps run one
after the other, and the input gradient waits for the kernel gradient. Without this the
executor padded every layer's input during the forward pass and postponed the kernel gradients
while the input gradients ran on down the network: at 160x192x224 the default VoxelMorph
training step peaked at 13.9 GiB resident, with it at 8.8 GiB (benchmarks/README.md).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from tfreg.ops.scheduling import after

__all__ = ["conv", "supports", "in_xla_compilation", "onednn_enabled", "MIN_VOXELS",
           "ONEDNN_MIN_CHANNELS"]

#: byte alignment under which TensorFlow shares a first-axis slice's buffer (Eigen's maximum)
ALIGN_BYTES = 64
#: padded input bytes per slab of the kernel gradient (bounds its temporary copies)
SLAB_BYTES = 256 * 2 ** 20
#: spatial voxels from which `conv`'s gradients beat TensorFlow's kernels (about 25^3)
MIN_VOXELS = 2 ** 14
#: input channels from which `conv`'s gradients beat TensorFlow's oneDNN kernels (when on)
ONEDNN_MIN_CHANNELS = 16

_ONEDNN: bool | None = None  # `onednn_enabled`'s answer, once asked


def onednn_enabled() -> bool:
    """Whether the running TensorFlow uses its oneDNN CPU kernels (``TF_ENABLE_ONEDNN_OPTS``,
    read when TensorFlow was imported; `tfreg` turns it on unless the user set it)."""
    global _ONEDNN
    if _ONEDNN is None:
        try:
            from tensorflow.python.util import _pywrap_util_port  # no public equivalent

            _ONEDNN = bool(_pywrap_util_port.IsMklEnabled())
        except (ImportError, AttributeError):
            _ONEDNN = False
    return _ONEDNN


def supports(ndims: int, kernel_size: Sequence[int], strides: Sequence[int],
             dilation_rate: Sequence[int], padding: str, groups: int = 1,
             spatial_shape: Sequence[int | None] | None = None,
             in_channels: int | None = None) -> bool:
    """Whether `conv` handles this configuration and pays off for it (else use the framework's
    convolution). ``spatial_shape``: the input's spatial sizes when known; a volume of fewer than
    `MIN_VOXELS` voxels is left to the framework. ``in_channels``: with TensorFlow's oneDNN
    kernels on (`onednn_enabled`), inputs of fewer than `ONEDNN_MIN_CHANNELS` channels are left
    to them (96x112x96, 1 thread: 2 -> 16 channels 0.20 s forward + backward against 0.45 s,
    5 -> 28 0.62 against 0.98 s; from 16 channels `conv` is faster: 32 -> 32 2.75 against 3.41 s).
    """
    small = (spatial_shape is not None and all(n is not None for n in spatial_shape)
             and int(np.prod([int(n) for n in spatial_shape])) < MIN_VOXELS)
    if in_channels is not None and int(in_channels) < ONEDNN_MIN_CHANNELS and onednn_enabled():
        return False
    return (ndims in (2, 3) and groups == 1 and padding in ("same", "valid") and not small
            and all(int(s) == 1 for s in strides) and all(int(d) == 1 for d in dilation_rate)
            and (padding == "valid" or all(int(k) % 2 == 1 for k in kernel_size)))


def in_xla_compilation() -> bool:
    """Whether ops are being traced into an XLA-compiled function (``jit_compile=True``, also
    through enclosing functions).

    XLA drops control dependencies and copies every shifted slice, so `conv`'s kernel gradient
    would hold one padded copy of the input per kernel tap for every layer at once (a 92 GiB
    buffer for the default VoxelMorph step at 160x192x224); XLA's own convolution gradients do
    without. `tfreg.layers.Conv2D`/`Conv3D` use TensorFlow's convolution there.
    """
    from tensorflow.python.ops import control_flow_util  # no public equivalent

    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def _pads(kernel_shape: Sequence[int], padding: str) -> list[int]:
    """Zero padding per side and spatial axis of the forward convolution."""
    return [(k - 1) // 2 if padding == "same" else 0 for k in kernel_shape]


def _input_grad(g: tf.Tensor, kernel: tf.Tensor, padding: str) -> tf.Tensor:
    """d(loss)/d(input) = correlation of the padded output gradient with the flipped kernel."""
    ndims = len(kernel.shape) - 2
    ks = list(kernel.shape[:ndims])
    flipped = tf.reverse(kernel, axis=list(range(ndims)))
    flipped = tf.transpose(flipped, list(range(ndims)) + [ndims + 1, ndims])
    if padding == "same":  # odd kernels: the full correlation's padding is the forward's own
        return tf.nn.convolution(g, flipped, padding="SAME")  # (no padded copy of g)
    full = [k - 1 - p for k, p in zip(ks, _pads(ks, padding))]
    g = tf.pad(g, [[0, 0]] + [[f, f] for f in full] + [[0, 0]])
    return tf.nn.convolution(g, flipped, padding="VALID")


def _aligned_channels(channels: int, itemsize: int) -> int:
    """Channels per row of the flat input in `_kernel_grad`: rounded up so that a row is a
    multiple of `ALIGN_BYTES` when that adds at most half the channels (else `channels`).

    TensorFlow slices the flat array along its first axis without copying only where both ends
    of the slice fall on an `ALIGN_BYTES` boundary; with 28 float32 channels (112-byte rows)
    nearly every tap's slice is a full copy, which doubles the kernel gradient's time.
    """
    per_row = max(ALIGN_BYTES // itemsize, 1)
    aligned = -(-channels // per_row) * per_row
    return aligned if 2 * aligned <= 3 * channels else channels


def _kernel_grad(x: tf.Tensor, g: tf.Tensor, kernel_shape: Sequence[int],
                 padding: str) -> tf.Tensor:
    """d(loss)/d(kernel) as one matrix product per tap over the flattened padded grid.

    With static shapes the output planes (first spatial axis) are taken in slabs of about
    `SLAB_BYTES` of padded input each, so the padded copies of ``x`` and ``g`` never exceed a
    slab (at 160x192x224 and 48 channels: 0.25 GiB instead of 1.3 + 0.8 GiB); the slabs' sums
    are added up.
    """
    ndims = len(kernel_shape) - 2
    ks = [int(k) for k in kernel_shape[:ndims]]
    cin, cout = int(kernel_shape[-2]), int(kernel_shape[-1])
    pads = _pads(ks, padding)
    half = x.dtype in (tf.float16, tf.bfloat16)  # sums over every voxel: accumulate in float32
    cin_rows = _aligned_channels(cin, 4 if half else x.dtype.size)
    other = [[p, p] for p in pads[1:]] + [[0, cin_rows - cin]]
    static = all(n is not None for n in (*x.shape, *g.shape))
    if not static:
        xp = tf.pad(x, [[0, 0], [pads[0], pads[0]]] + other)
        total = _taps(xp, g, ks, cin_rows, half)
    else:
        n0, out0 = int(x.shape[1]), int(g.shape[1])
        plane_bytes = (int(x.shape[0]) * cin_rows * (4 if half else x.dtype.size)
                       * int(np.prod([int(n) + 2 * p for n, p in zip(x.shape[2:-1], pads[1:])])))
        planes = max(1, SLAB_BYTES // plane_bytes)
        total = None
        for a in range(0, out0, planes):
            b = min(out0, a + planes)
            # output planes [a, b) read padded planes [a, b + k0 - 1), i.e. x planes [lo, hi)
            lo, hi = a - pads[0], b + ks[0] - 1 - pads[0]
            # one slab after the other: its padded copy is made once the previous one is used
            xs = (x if total is None else after(total, x))[:, max(lo, 0):min(hi, n0)]
            xp = tf.pad(xs, [[0, 0], [max(0, -lo), max(0, hi - n0)]] + other)
            part = _taps(xp, g if (a, b) == (0, out0) else g[:, a:b], ks, cin_rows, half)
            total = part if total is None else total + part
    if cin_rows != cin:
        total = total[:, :cin]
    return tf.cast(tf.reshape(total, [*ks, cin, cout]), x.dtype)


def _taps(xp: tf.Tensor, g: tf.Tensor, ks: list[int], cin_rows: int, half: bool) -> tf.Tensor:
    """``(prod(ks), cin_rows, C_out)`` kernel-gradient sums of one padded input ``xp``
    `(B, *P, cin_rows)` against the output gradient ``g`` `(B, *O, C_out)`, ``P = O + ks - 1``."""
    ndims = len(ks)
    cout = int(g.shape[-1])
    # the output gradient placed at the low corner of the padded grid (zeros elsewhere)
    gp = tf.pad(g, [[0, 0]] + [[0, k - 1] for k in ks] + [[0, 0]])
    if any(s is None for s in xp.shape[1:-1]):
        padded = tf.unstack(tf.shape(xp)[1:-1])
    else:
        padded = [int(s) for s in xp.shape[1:-1]]
    strides = [1] * ndims
    for a in range(ndims - 2, -1, -1):
        strides[a] = strides[a + 1] * padded[a + 1]
    x_flat = tf.reshape(xp, [-1, cin_rows])
    # the last `largest` rows of the flat gradient lie in the zero high corner of the last batch
    # element's padded grid, so they are dropped and every shifted slice of x stays in range
    largest = sum((k - 1) * s for k, s in zip(ks, strides))
    g_flat = tf.reshape(gp, [-1, cout])
    rows = tf.shape(g_flat)[0] - largest
    g_flat = g_flat[:rows]
    if half:
        x_flat, g_flat = tf.cast(x_flat, tf.float32), tf.cast(g_flat, tf.float32)
    # the narrower operand goes first: (N x 16)^T (N x 32) runs 1.5x faster than (N x 32)^T
    # (N x 16) on this CPU, (N x 3)^T (N x 16) 2x faster than the other way round
    swap = cout < cin_rows
    taps = []
    for tap in np.ndindex(*ks):
        offset = sum(t * s for t, s in zip(tap, strides))
        # a misaligned slice is a copy: take it once the previous tap's product is done
        source = after(taps[-1], x_flat) if taps else x_flat
        window = source[offset:offset + rows]
        taps.append(tf.matmul(g_flat, window, transpose_a=True) if swap
                    else tf.matmul(window, g_flat, transpose_a=True))
    stacked = tf.stack(taps)
    return tf.transpose(stacked, [0, 2, 1]) if swap else stacked


def conv(x: tf.Tensor, kernel: tf.Tensor, padding: str = "same",
         bias: tf.Tensor | None = None) -> tf.Tensor:
    """Stride-1 correlation of ``x`` (B, *S, C_in) with ``kernel`` (*K, C_in, C_out), plus
    ``bias`` (C_out,) when given.

    ``padding``: "same" (odd kernels) or "valid". Returns (B, *S', C_out), the same values as
    `tf.nn.convolution` (+ ``bias``); only the gradients are computed differently (see the module
    docstring). The bias is part of the op so that its gradient (a sum of the output gradient)
    is taken before the others, and the output gradient is not held for it.
    """
    padding = padding.lower()
    ndims = len(kernel.shape) - 2
    if not supports(ndims, kernel.shape[:ndims], [1] * ndims, [1] * ndims, padding):
        raise ValueError(f"tfreg.ops.conv: unsupported kernel {kernel.shape} with padding {padding!r}")

    def gradients(x, kernel, g):
        # In a graph the executor would otherwise pad x during the forward pass and put
        # off the kernel gradient's products while the input gradients run on down the
        # network, keeping every layer's padded input and output gradient alive at once:
        # the kernel gradient starts when g exists and finishes before the input gradient.
        dkernel = _kernel_grad(after(g, x), g, kernel.shape, padding)
        return _input_grad(after(dkernel, g), kernel, padding), dkernel

    if bias is None:
        @tf.custom_gradient
        def _conv(x, kernel):
            return (tf.nn.convolution(x, kernel, padding=padding.upper()),
                    lambda g: gradients(x, kernel, g))

        # variables are read first: the custom gradient then sees tensors only
        return _conv(tf.convert_to_tensor(x), tf.convert_to_tensor(kernel))

    @tf.custom_gradient
    def _conv_bias(x, kernel, bias):
        y = tf.nn.convolution(x, kernel, padding=padding.upper()) + bias

        def grad(g):
            dbias = tf.reduce_sum(g, axis=list(range(ndims + 1)))
            dx, dkernel = gradients(x, kernel, after(dbias, g))
            return dx, dkernel, dbias
        return y, grad

    return _conv_bias(tf.convert_to_tensor(x), tf.convert_to_tensor(kernel),
                      tf.convert_to_tensor(bias))
