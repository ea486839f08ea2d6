"""Training step time: tfreg's VoxelMorph against voxelmorph 0.3.x (PyTorch) on the CPU.

Both sides train the closest network each package offers on one random pair, batch 1, with
MSE + 0.01 * Grad(l2) and Adam (lr 1e-4), on the same number of CPU threads:

* ``tf``: the `voxelmorph` method's default model (U-Net encoder 16/32/32/32, decoder
  32/32/32/32/32/16/16, SVF integrated with 7 squarings at half resolution), built through the method
  registry, one `tf.function` step (optionally XLA-compiled with ``--tf-jit``), Keras' Adam.
* ``tf-pairwise``: the same method configured as ``VxmPairwise``'s network (encoder 16/32/32/32,
  decoder 32/32/32/16/16: one convolution per level, the last at full resolution; velocity predicted
  and integrated at full resolution), the nearest architecture tfreg offers to the torch side.
* ``tf-native-conv``: ``tf`` with Keras' own convolution gradients instead of
  `tfreg.ops.convolution`'s (the A/B of that change).
* ``tf-keras-act``: ``tf`` with Keras' LeakyReLU (its gradient reads the pre-activation, which
  is then kept for the backward pass) instead of `tfreg.layers.LeakyReLU` (the A/B of that change).
* ``tf-lapirn``: LapIRN's default three-level model (all levels trained, as in its level-3
  stage once the lower levels are unfrozen), MSE on the final warped image + 0.01 Grad on the final
  displacement;
* ``tf-lapirn-unaligned``: ``tf-lapirn`` with the kernel gradient's flat input left at 28
  channels (112-byte rows, so TensorFlow copies every tap's slice): the A/B of the 64-byte row
  alignment in `tfreg.ops.convolution`;
* ``tf-ncc``, ``tf-ncc-plain``: ``tf`` with local NCC (window 9, voxelmorph's squared form)
  instead of MSE as the image term, the NCC compiled as its own XLA function (the default,
  ``jit="auto"``) or as plain graph ops (``jit=False``, as before that default): what the image
  loss costs in a step;
* ``tf-cascade``: the recursive cascade with ``base: voxelmorph`` (affine stem + three VoxelMorph
  U-Nets), the same loss (needs sizes divisible by 32, e.g. 96x128x96);
* ``torch-match``: voxelmorph-torch's ``VxmPairwise`` with features ``(f, 2f, 2f, 2f)``, ``f``
  chosen so that its parameter count is closest to that of the first tfreg side in ``--sides``
  (measured in the first repeat): VoxelMorph at equal parameter count, for methods without a
  PyTorch peer that installs;
* ``torch-lapirn``: the original LapIRN (PyTorch, github.com/cwmok/LapIRN, the three models
  ``Miccai2020_LDR_laplacian_unit_add_lvl1/2/3`` of ``Train_LapIRN_diff.py``, ``start_channel`` 7,
  ``range_flow`` 0.4, every level trained as in its level-3 stage once unfrozen), imported from a
  checkout of that repository given with ``--lapirn-code DIR/Code`` (its ``.cuda()`` calls are made
  no-ops so that it runs on the CPU), the same loss on its final warped image and displacement: the
  peer for ``tf-lapirn``;
* voxelmorph-torch: ``vxm.nn.models.VxmPairwise(nb_features=(16, 32, 32, 32), integration_steps=7)``
  (integration at full resolution), MSE and Grad written here in a few lines (0.3.x deprecated its
  loss classes), ``torch.optim.Adam``.

Each measurement is a fresh process (start-up is excluded; the first ``--warmup`` steps, which
include tracing and compilation, are reported separately). Runs alternate A/B ``--repeats`` times so
that the machine's load hits both sides alike; the table shows the median seconds per step and the
ratio torch/tfreg per repeat (> 1 means tfreg is faster).

The torch side needs its own environment (never installed with tfreg)::

    python -m venv /tmp/vxmtorch && /tmp/vxmtorch/bin/pip install "voxelmorph==0.3.*" torch
    python benchmarks/bench_train_vs_torch.py --torch-python /tmp/vxmtorch/bin/python
    git clone https://github.com/cwmok/LapIRN /tmp/LapIRN   # for --sides tf-lapirn,torch-lapirn
    python benchmarks/bench_train_vs_torch.py --sides tf-lapirn,torch-lapirn \
        --lapirn-code /tmp/LapIRN/Code --shapes 96x128x96

Results: a table on stdout and ``benchmarks/results/bench_train_vs_torch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import machine, peak_rss_gib, run_worker, shape_arg, write_report

HERE = Path(__file__).resolve().parent



PAIRWISE = {"enc_features": [16, 32, 32, 32], "dec_features": [32, 32, 32, 16, 16],
            "int_resolution": 1, "svf_resolution": 1}


def worker_tf(shape: tuple[int, ...], steps: int, warmup: int, threads: int, jit: bool,
              side: str = "tf") -> dict:
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras

    from tfreg.config import method_defaults
    from tfreg.losses import MSE, Grad
    from tfreg.registry import discover

    if side == "tf-native-conv":
        from tfreg.layers import _FastGradientConv
        del _FastGradientConv.convolution_op  # Keras' convolution (and gradients) again
    if side == "tf-keras-act":
        from tfreg.layers import LeakyReLU
        del LeakyReLU.call  # Keras' activation (and gradient) again
    if side == "tf-lapirn-unaligned":
        from tfreg.ops import convolution
        convolution._aligned_channels = lambda channels, itemsize: channels  # rows as before
    name = {"tf-lapirn": "lapirn", "tf-lapirn-unaligned": "lapirn",
            "tf-cascade": "cascade"}.get(side, "voxelmorph")
    method = discover().get(name).method
    config = method_defaults(method)
    if side == "tf-pairwise":
        config["model"].update(PAIRWISE)
    if side == "tf-cascade":
        config["model"]["base"] = "voxelmorph"
    model = method.build_model(config, shape)
    field_key = "preint_flow" if name == "voxelmorph" else "disp"
    mse, grad = MSE(), Grad("l2")
    if side in ("tf-ncc", "tf-ncc-plain"):
        from tfreg.ops.similarity import local_ncc

        jit_ncc = "auto" if side == "tf-ncc" else False
        mse = lambda a, b: -local_ncc(a, b, 9, jit=jit_ncc)  # noqa: E731
    optimizer = keras.optimizers.Adam(1e-4)
    rng = np.random.default_rng(0)
    fixed = tf.constant(rng.random((1, *shape, 1), np.float32))
    moving = tf.constant(rng.random((1, *shape, 1), np.float32))

    from common import mse_grad_step

    step = tf.function(mse_grad_step(model, mse, grad, optimizer, field=field_key),
                       jit_compile=jit)

    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        float(step(fixed, moving))
        times.append(time.perf_counter() - t0)
    params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    return {"times": times, "params": params, "peak_rss_gib": peak_rss_gib(),
            "version": f"tensorflow {tf.__version__}"}


def _torch_steps(model, forward, shape: tuple[int, ...], steps: int, warmup: int) -> list:
    """Seconds of each of ``warmup + steps`` Adam steps (lr 1e-4) of MSE + 0.01 Grad(l2) on one
    random pair; ``forward(moving, fixed) -> (field, warped)``, channels first."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    fixed = torch.rand(1, 1, *shape)
    moving = torch.rand(1, 1, *shape)
    axes = range(2, 2 + len(shape))
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        field, warped = forward(moving, fixed)
        grad = sum((torch.diff(field, dim=d) ** 2).mean() for d in axes) / len(shape)
        loss = ((warped - fixed) ** 2).mean() + 0.01 * grad
        loss.backward()
        optimizer.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    return times


def _torch_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def worker_torch(shape: tuple[int, ...], steps: int, warmup: int, threads: int,
                 match_params: int = 0) -> dict:
    import torch
    import voxelmorph as vxm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ndim = len(shape)

    def build(f: int):
        return vxm.nn.models.VxmPairwise(ndim, 1, 1, nb_features=(f, 2 * f, 2 * f, 2 * f),
                                         integration_steps=7)

    if match_params:  # the width whose parameter count is closest to the target (monotone in f)
        low, high = 2, 512
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if _torch_params(build(mid)) < match_params else (low, mid)
        width = min((low, high), key=lambda f: abs(_torch_params(build(f)) - match_params))
        model = build(width)
    else:
        model = vxm.nn.models.VxmPairwise(ndim, 1, 1, nb_features=(16, 32, 32, 32),
                                          integration_steps=7)
    times = _torch_steps(model, lambda m, f: model(m, f, return_warped_source=True,
                                                  return_field_type="velocity"),
                         shape, steps, warmup)
    return {"times": times, "params": _torch_params(model), "peak_rss_gib": peak_rss_gib(),
            "version": f"torch {torch.__version__}, voxelmorph {vxm.__version__}"}


def worker_torch_lapirn(shape: tuple[int, ...], steps: int, warmup: int, threads: int,
                        code: str) -> dict:
    """The original LapIRN's three levels (its own modules, imported from `code`)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # the original moves its grids and transforms to CUDA in __init__: keep them on the CPU
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, code)
    import miccai2020_model_stage as original  # noqa: E402  (the peer's own module)

    if len(shape) != 3 or any(s % 8 for s in shape):
        raise ValueError(f"torch-lapirn: a 3D shape with sizes divisible by 8, got {shape}")
    quarter = tuple(s // 4 for s in shape)
    half = tuple(s // 2 for s in shape)
    lvl1 = original.Miccai2020_LDR_laplacian_unit_add_lvl1(
        2, 3, 7, is_train=True, imgshape=quarter, range_flow=0.4)
    lvl2 = original.Miccai2020_LDR_laplacian_unit_add_lvl2(
        2, 3, 7, is_train=True, imgshape=half, range_flow=0.4, model_lvl1=lvl1)
    model = original.Miccai2020_LDR_laplacian_unit_add_lvl3(
        2, 3, 7, is_train=True, imgshape=shape, range_flow=0.4, model_lvl2=lvl2)
    times = _torch_steps(model, lambda m, f: model(m, f)[:2], shape, steps, warmup)
    return {"times": times, "params": _torch_params(model), "peak_rss_gib": peak_rss_gib(),
            "version": f"torch {torch.__version__}, original LapIRN"}


SIDES = ("tf", "tf-ncc", "tf-ncc-plain", "tf-pairwise", "tf-native-conv", "tf-keras-act",
         "tf-lapirn", "tf-lapirn-unaligned", "tf-cascade", "torch", "torch-match", "torch-lapirn")


def _run(python: str, side: str, args: argparse.Namespace, shape: str,
         match_params: int = 0) -> dict:
    cmd = [python, __file__, "--worker", side, "--shape", shape, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--match-params", str(match_params)]
    if args.lapirn_code:
        cmd += ["--lapirn-code", args.lapirn_code]
    if args.tf_jit:
        cmd.append("--tf-jit")
    return run_worker(cmd, env={"TF_CPP_MIN_LOG_LEVEL": "3"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="96x112x96")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--repeats", type=int, default=3, help="A/B alternations")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tf-jit", action="store_true", help="XLA-compile tfreg's step")
    parser.add_argument("--sides", default="tf,torch",
                        help=f"comma-separated subset of {', '.join(SIDES)}")
    parser.add_argument("--torch-python", default="/tmp/vxmtorch/bin/python",
                        help="python of the environment with voxelmorph 0.3.x and torch")
    parser.add_argument("--lapirn-code", default="",
                        help="the original LapIRN's Code folder (for --sides ...,torch-lapirn)")
    parser.add_argument("--json", default=str(HERE / "results" / "bench_train_vs_torch.json"))
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--match-params", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        shape = shape_arg(args.shape)
        result = (worker_torch_lapirn(shape, args.steps, args.warmup, args.threads,
                                      args.lapirn_code)
                  if args.worker == "torch-lapirn" else
                  worker_torch(shape, args.steps, args.warmup, args.threads, args.match_params)
                  if args.worker.startswith("torch") else
                  worker_tf(shape, args.steps, args.warmup, args.threads, args.tf_jit, args.worker))
        print("RESULT " + json.dumps(result), flush=True)
        return

    sides = [side.strip() for side in args.sides.split(",") if side.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        parser.error(f"--sides: unknown {', '.join(unknown)} (choose from {', '.join(SIDES)})")
    tf_sides = [side for side in sides if side.startswith("tf")]
    if "torch-match" in sides and (not tf_sides
                                   or sides.index(tf_sides[0]) > sides.index("torch-match")):
        parser.error("--sides: torch-match needs a tfreg side before it (its parameter count)")
    if "torch-lapirn" in sides and not Path(args.lapirn_code, "miccai2020_model_stage.py").is_file():
        parser.error("--sides torch-lapirn: --lapirn-code must name the original LapIRN's Code "
                     "folder (with miccai2020_model_stage.py)")
    rows = []
    for shape in args.shapes.split(","):
        per_side: dict[str, list[dict]] = {side: [] for side in sides}
        for rep in range(args.repeats):
            order = sides if rep % 2 == 0 else sides[::-1]  # A/B, then B/A
            for side in order:
                python = args.torch_python if side.startswith("torch") else sys.executable
                target = 0
                if side == "torch-match":
                    done = [r for r in per_side[tf_sides[0]] if "params" in r]
                    target = done[0]["params"] if done else 0
                res = _run(python, side, args, shape, target)
                res["load_average_1min"] = round(os.getloadavg()[0], 2)
                per_side[side].append(res)
                if "error" in res:
                    print(f"{shape} {side} repeat {rep}: failed ({res['error']})", flush=True)
                    continue
                timed = res["times"][args.warmup:]
                print(f"{shape:>12} {side:>14} repeat {rep}: {statistics.median(timed):7.3f} s/step"
                      f"  first {res['times'][0]:6.2f} s  peak RSS {res['peak_rss_gib']:.2f} GiB"
                      f"  load {res['load_average_1min']}", flush=True)
        ok = {side: [r for r in runs if "error" not in r] for side, runs in per_side.items()}
        medians = {side: [statistics.median(r["times"][args.warmup:]) for r in runs]
                   for side, runs in ok.items()}
        row = {"shape": list(shape_arg(shape)), "runs": per_side, "sides": {}}
        for side in sides:
            row["sides"][side] = {
                "median_s": round(statistics.median(medians[side]), 4) if medians[side] else None,
                "params": ok[side][0]["params"] if ok[side] else None,
                "peak_rss_gib": max(r["peak_rss_gib"] for r in ok[side]) if ok[side] else None}
            peer = next((p for p in ("torch-lapirn", "torch-match", "torch") if p in sides), "torch")
            if peer in sides and not side.startswith("torch") and medians[side] and medians[peer]:
                # per repeat, so both sides of a ratio ran under the same load
                row["sides"][side]["torch_over_this_per_repeat"] = [
                    round(t / f, 3) for f, t in zip(medians[side], medians[peer])]
        rows.append(row)
        for side, r in row["sides"].items():
            print(f"{shape} {side:>14}: {r['median_s']} s/step, {r['params']} params, peak RSS "
                  f"{r['peak_rss_gib']} GiB, torch/this per repeat "
                  f"{r.get('torch_over_this_per_repeat', '-')}", flush=True)

    report = {"benchmark": "bench_train_vs_torch", "threads": args.threads, "tf_jit": args.tf_jit,
              "steps": args.steps, "warmup": args.warmup,
              "machine": machine(), "results": rows}
    write_report(args.json, report)


if __name__ == "__main__":
    main()
