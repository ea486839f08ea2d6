"""Largest deviation of tfreg's layers and losses from voxelmorph's stored TensorFlow outputs.

Reads `../shared/fixtures/voxelmorph_tf/layers_{2d,3d}.npz` (voxelmorph 0.2 outputs, see the
fixture README) and prints, for every layer and loss that the parity tests check, the largest
absolute difference from the reference (and the reference's largest magnitude). Used to guard the
numerics refactor: the numbers before and after must agree within float32 rounding.

    python benchmarks/bench_parity.py [--out benchmarks/results/parity.json]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "voxelmorph_tf"


def _cases(ref: dict) -> dict:
    from tfreg import layers as L
    from tfreg import losses

    shape = ref["img"].shape[1:-1]
    return {
        "st_linear": (L.SpatialTransformer()([ref["img"], ref["disp"]]), ref["st_linear"]),
        "st_linear_2ch": (L.SpatialTransformer()([ref["img2"], ref["disp"]]), ref["st_linear_2ch"]),
        "st_nearest": (L.SpatialTransformer("nearest")([ref["lab"], ref["disp"]]), ref["st_nearest"]),
        "st_affine": (L.SpatialTransformer()([ref["img"], ref["affine"]]),
                      ref["st_affine_shift_center"]),
        "st_fill0": (L.SpatialTransformer(fill_value=0)([ref["img"], 3 * ref["disp"]]), ref["st_fill0"]),
        "vecint_ss7": (L.VecInt(7)(ref["vel"]), ref["vecint_ss7"]),
        "rescale_0.5": (L.RescaleTransform(0.5)(ref["disp"]), ref["rescale_0.5"]),
        "rescale_2": (L.RescaleTransform(2)(ref["disp"]), ref["rescale_2"]),
        "compose": (L.ComposeTransform()([ref["disp"], ref["vel"]]), ref["compose_disp_disp"]),
        "affine_to_field": (L.AffineToField(shape)(ref["affine"]), ref["affine_to_dense_shift_center"]),
        "loss_ncc_win9": (losses.NCC()(ref["img"], ref["st_linear"]), ref["loss_ncc_win9"][0]),
        "loss_mse": (losses.MSE()(ref["img"], ref["st_linear"]), ref["loss_mse"]),
        "loss_grad_l1": (losses.Grad("l1")(None, ref["disp"]), ref["loss_grad_l1"][0]),
        "loss_grad_l2": (losses.Grad("l2")(None, ref["disp"]), ref["loss_grad_l2"][0]),
        "loss_grad_l2_mult2": (losses.Grad("l2", loss_mult=2)(None, ref["disp"]),
                               ref["loss_grad_l2_mult2"][0]),
        "loss_dice_soft": (losses.Dice()(losses.one_hot(ref["lab"], 4),
                                         losses.one_hot(ref["st_nearest"], 4)), ref["loss_dice_soft"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON output (default: print only)")
    args = parser.parse_args()
    if not FIXTURES.is_dir():
        raise SystemExit(f"{FIXTURES}: voxelmorph fixtures are absent")
    rows = {}
    print(f"{'case':<22}{'2d max|diff|':>14}{'3d max|diff|':>14}{'3d max|ref|':>13}")
    for name in ("layers_2d", "layers_3d"):
        with np.load(FIXTURES / f"{name}.npz", allow_pickle=False) as data:
            ref = {k: data[k] for k in data.files}
        for case, (got, want) in _cases(ref).items():
            got = np.asarray(got, np.float64)
            want = np.asarray(want, np.float64)
            rows.setdefault(case, {})[name[-2:]] = {
                "max_abs_diff": float(np.abs(got - want).max()),
                "max_abs_ref": float(np.abs(want).max())}
    for case, r in rows.items():
        print(f"{case:<22}{r['2d']['max_abs_diff']:>14.3e}{r['3d']['max_abs_diff']:>14.3e}"
              f"{r['3d']['max_abs_ref']:>13.3g}")
    if args.out:
        from tfreg.io import atomic_path

        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
