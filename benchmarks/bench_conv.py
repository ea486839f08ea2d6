"""One 3x3x3 convolution, forward and both gradients: TensorFlow's kernels against
`tfreg.ops.convolution.conv` (and PyTorch's, when its environment is given).

Each side runs in a fresh process on the same number of threads; the table shows the best of
``--repeats`` timings per part and the process's peak memory:

* ``tf-native``: ``tf.nn.convolution`` and TensorFlow's ``Conv3DBackpropInputV2`` /
  ``Conv3DBackpropFilterV2`` (what Keras' ``Conv3D`` trains with);
* ``tfreg``: the same forward, the input gradient as a forward convolution with the flipped kernel,
  the kernel gradient as one matrix product per tap (`tfreg.ops.convolution`);
* ``torch`` (optional): ``torch.nn.functional.conv3d`` forward and ``backward()``;
* ``tf-native-eigen``, ``tfreg-eigen``: the first two with TensorFlow's oneDNN kernels off
  (``TF_ENABLE_ONEDNN_OPTS=0``; `tfreg` turns them on, TensorFlow's default on CPUs without
  AVX-512 VNNI/AMX is off), so TensorFlow's Eigen kernels run.

    python benchmarks/bench_conv.py --shape 96x112x96 --channels 32 [--in-channels 2] \
        --threads 1 [--torch-python /tmp/vxmtorch/bin/python]

Results: a table on stdout and ``benchmarks/results/bench_conv.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import machine, peak_rss_gib, run_worker, shape_arg, write_report

HERE = Path(__file__).resolve().parent
SIDES = ("tf-native", "tfreg", "tf-native-eigen", "tfreg-eigen", "torch")


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (kernel selection, allocation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def worker_tf(side: str, shape: tuple[int, ...], cin: int, channels: int, threads: int,
              repeats: int) -> dict:
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    from tfreg.ops.convolution import _input_grad, _kernel_grad

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(1, *shape, cin)), tf.float32)
    g = tf.constant(rng.normal(size=(1, *shape, channels)), tf.float32)
    w = tf.constant(rng.normal(size=(3, 3, 3, cin, channels)) * 0.05, tf.float32)
    strides = [1] * 5
    if side.startswith("tf-native"):
        input_grad = lambda: tf.raw_ops.Conv3DBackpropInputV2(  # noqa: E731
            input_sizes=tf.constant([1, *shape, cin]), filter=w, out_backprop=g,
            strides=strides, padding="SAME")
        kernel_grad = lambda: tf.raw_ops.Conv3DBackpropFilterV2(  # noqa: E731
            input=x, filter_sizes=tf.constant(w.shape), out_backprop=g, strides=strides,
            padding="SAME")
    else:
        input_grad = lambda: _input_grad(g, w, "same")  # noqa: E731
        kernel_grad = lambda: _kernel_grad(x, g, w.shape, "same")  # noqa: E731
    forward = lambda: tf.nn.convolution(x, w, padding="SAME")  # noqa: E731
    out = {name: round(_best(lambda f=fn: f().numpy(), repeats), 3)
           for name, fn in (("forward", forward), ("input_grad", input_grad),
                            ("kernel_grad", kernel_grad))}
    out["peak_rss_gib"] = peak_rss_gib()
    out["version"] = f"tensorflow {tf.__version__}"
    from tfreg.ops.convolution import onednn_enabled

    out["onednn"] = onednn_enabled()
    return out


def worker_torch(shape: tuple[int, ...], cin: int, channels: int, threads: int,
                 repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(1, cin, *shape, requires_grad=True)
    w = (torch.randn(channels, cin, 3, 3, 3) * 0.05).requires_grad_()
    g = torch.randn(1, channels, *shape)

    def forward():
        with torch.no_grad():
            torch.nn.functional.conv3d(x, w, padding=1)

    def both_grads():
        x.grad = w.grad = None
        torch.nn.functional.conv3d(x, w, padding=1).backward(g)

    fwd = _best(forward, repeats)
    total = _best(both_grads, repeats)
    return {"forward": round(fwd, 3), "both_grads_minus_forward": round(total - fwd, 3),
            "peak_rss_gib": peak_rss_gib(), "version": f"torch {torch.__version__}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="96x112x96")
    parser.add_argument("--channels", type=int, default=32, help="output channels")
    parser.add_argument("--in-channels", type=int, default=None,
                        help="input channels (default: --channels)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch-python", default=None,
                        help="python of an environment with torch (optional third side)")
    parser.add_argument("--json", default=str(HERE / "results" / "bench_conv.json"))
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = shape_arg(args.shape)
    cin = args.in_channels or args.channels
    if args.worker:
        result = (worker_torch(shape, cin, args.channels, args.threads, args.repeats)
                  if args.worker == "torch" else
                  worker_tf(args.worker, shape, cin, args.channels, args.threads, args.repeats))
        print("RESULT " + json.dumps(result), flush=True)
        return

    sides = [s for s in SIDES if s != "torch"] + (["torch"] if args.torch_python else [])
    results = {}
    for side in sides:
        python = args.torch_python if side == "torch" else sys.executable
        cmd = [python, __file__, "--worker", side, "--shape", args.shape, "--channels",
               str(args.channels), "--in-channels", str(cin), "--threads", str(args.threads),
               "--repeats", str(args.repeats)]
        onednn = "0" if side.endswith("-eigen") else None  # None: tfreg's default
        results[side] = run_worker(cmd, env={"TF_CPP_MIN_LOG_LEVEL": "3",
                                             "TF_ENABLE_ONEDNN_OPTS": onednn})
        results[side]["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(f"3x3x3 convolution {cin}->{args.channels} at {args.shape}, "
          f"{args.threads} thread(s), best of {args.repeats} (s)")
    print(f"{'side':>15} {'forward':>8} {'input grad':>11} {'kernel grad':>12} {'total':>7} {'peak RSS':>9}")
    for side, r in results.items():
        if "error" in r:
            print(f"{side:>15} failed: {r['error']}")
            continue
        if side == "torch":
            grads = r["both_grads_minus_forward"]
            print(f"{side:>15} {r['forward']:8.3f} {'(both) ' + format(grads, '.3f'):>24} "
                  f"{r['forward'] + grads:7.3f} {r['peak_rss_gib']:8.2f}G")
        else:
            total = r["forward"] + r["input_grad"] + r["kernel_grad"]
            print(f"{side:>15} {r['forward']:8.3f} {r['input_grad']:11.3f} {r['kernel_grad']:12.3f} "
                  f"{total:7.3f} {r['peak_rss_gib']:8.2f}G")
    write_report(args.json, {"benchmark": "bench_conv", "shape": list(shape),
                             "in_channels": cin, "channels": args.channels, "threads": args.threads,
                             "repeats": args.repeats, "machine": machine(), "results": results})


if __name__ == "__main__":
    main()
