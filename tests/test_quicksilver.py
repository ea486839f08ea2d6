"""Quicksilver pieces: patch gathering and reassembly (against slicing, exact round trips, full
coverage, patch 0 kept, background skipped), the patch network's architecture (shapes 15 -> 8 ->
5 -> 8 -> 15, unshared encoders, dropout positions, Monte-Carlo sampling), the momentum cache and
whole-image prediction."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tfreg_plugins.quicksilver import patches


def test_axis_starts_stride_14_plus_end_patch():
    assert patches.axis_starts(32, 15, 14) == [0, 14, 17]
    assert patches.axis_starts(29, 15, 14) == [0, 14]
    assert patches.axis_starts(15, 15, 14) == [0]
    with pytest.raises(ValueError):
        patches.axis_starts(10, 15, 14)


def _all_patches(volume: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """`(P, *Pt, C)` patches of `volume` `(*S, C)` by slicing (the reference for `gather`)."""
    return np.stack([volume[tuple(slice(s, s + 15) for s in start)] for start in starts])


@pytest.mark.parametrize("shape", [(32, 20), (16, 30, 17)])
def test_gather_and_reassembly_exact(shape):
    starts = patches.patch_starts(shape)
    rng = np.random.default_rng(0)
    field = rng.normal(size=(*shape, 2)).astype(np.float32)
    got = patches.gather(field[None], starts[None]).numpy()[0]
    np.testing.assert_array_equal(got, _all_patches(field, starts))     # slicing reference
    ones = np.ones((1, len(starts)), np.float32)
    back = patches.reassemble(got[None], ones, starts, shape).numpy()[0]
    np.testing.assert_allclose(back, field, atol=1e-6)  # every voxel covered, overlaps agree
    # averaging: two different values on an overlap give their mean; a skipped patch adds nothing
    values = np.ones((1, len(starts), *[15] * len(shape), 1), np.float32)
    values[0, 0] = 3.0
    merged = patches.reassemble(values, ones, starts, shape).numpy()[0]
    assert merged[(0,) * len(shape)][0] == 3.0
    overlap = (14,) + (0,) * (len(shape) - 1)            # covered by patch 0 and the next
    assert merged[overlap][0] == pytest.approx(2.0)
    weights = ones.copy()
    weights[0, 1:] = 0.0                                 # only patch 0 kept
    only = patches.reassemble(values, weights, starts, shape).numpy()[0]
    assert only[overlap][0] == 3.0 and only[(-1,) * len(shape)][0] == 0.0


def test_background_patches_skipped_patch_zero_kept():
    shape = (32, 32)
    moving = np.zeros(shape, np.float32)
    fixed = np.zeros(shape, np.float32)
    moving[2, 3] = 1.0           # only in patch 0 (starts 0,0)
    fixed[31, 31] = 1.0          # only in the last patch (17, 17)
    starts = patches.patch_starts(shape)
    keep = patches.foreground(patches.gather(moving[None, ..., None], starts[None]),
                              patches.gather(fixed[None, ..., None], starts[None])).numpy()[0]
    assert keep.tolist() == [1.0] + [0.0] * 7 + [1.0]
    # training starts on the stride grid whose window holds a non-zero voxel of either image
    grid = patches.foreground_starts(moving, fixed, 15, 14)
    assert grid.tolist() == [[0, 0], [17, 17]]
    every = patches.foreground_starts(moving, fixed, 15, 1)
    expect = [[i, j] for i in range(18) for j in range(18)
              if (i <= 2 and j <= 3) or (i + 14 >= 31 and j + 14 >= 31)]
    assert every.tolist() == expect


def test_network_shapes_unshared_encoders_and_dropout():
    import keras

    from tfreg_plugins.quicksilver.network import build_network

    det = build_network(3, features=2)
    x = np.random.default_rng(0).random((1, 15, 15, 15, 1)).astype(np.float32)
    out = det({"moving": x, "fixed": x[::-1]})["momentum"]
    assert tuple(out.shape) == (1, 15, 15, 15, 3)
    names = [layer.name for layer in det.layers]
    assert "enc_moving_1_conv0" in names and "enc_fixed_1_conv0" in names
    a = det.get_layer("enc_moving_1_conv0").get_weights()[0]
    b = det.get_layer("enc_fixed_1_conv0").get_weights()[0]
    assert not np.allclose(a, b)                         # two encoders, two sets of weights
    assert det.get_layer("enc_moving_1_pool").output.shape[1:4] == (8, 8, 8)
    assert det.get_layer("enc_moving_2_pool").output.shape[1:4] == (5, 5, 5)
    assert det.get_layer("dec_0_1_crop").output.shape[1:4] == (8, 8, 8)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in det.layers)
    # one PReLU slope per layer, 0.25 at start
    assert det.get_layer("enc_moving_1_prelu0").get_weights()[0].size == 1

    prob = build_network(2, features=2, dropout=0.2)
    drops = [layer for layer in prob.layers if isinstance(layer, keras.layers.Dropout)]
    # encoders: 3 per block x 2 blocks x 2 images; decoders: 3 in block 1, 2 in block 2, x 2
    assert len(drops) == 12 + 5 * 2
    y = np.random.default_rng(1).random((1, 15, 15, 1)).astype(np.float32)
    batch = {"moving": y, "fixed": y.T.reshape(y.shape)}
    first = prob(batch, training=False)["momentum"].numpy()
    np.testing.assert_array_equal(first, prob(batch, training=False)["momentum"].numpy())
    samples = [prob(batch, training=True)["momentum"].numpy() for _ in range(2)]
    assert samples[0].shape == (1, 15, 15, 2)
    assert not np.allclose(samples[0], samples[1])       # Monte-Carlo samples differ


def test_momentum_cache_reuse_invalidation_and_atomic_write(tmp_path):
    import nibabel as nib

    from tfreg_plugins.quicksilver.targets import MomentumCache, pair_key

    data = np.random.default_rng(0).random((6, 6)).astype(np.float32)
    for name in ("f", "m"):
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    f, m = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    cache = MomentumCache(tmp_path / "cache")
    calls = []

    def build():
        calls.append(1)
        return np.full((6, 6, 2), float(len(calls)), np.float32), {"energy": 0.5}

    key = pair_key(f, m, {"sigma": 0.2})
    first, reused = cache.get(key, build)
    assert not reused and first[0, 0, 0] == 1.0
    again, reused = cache.get(pair_key(f, m, {"sigma": 0.2}), build)
    assert reused and len(calls) == 1 and again[0, 0, 0] == 1.0
    assert pair_key(f, m, {"sigma": 0.1}) != key              # settings are part of the key
    nib.save(nib.Nifti1Image(data * 2, np.eye(4)), str(f))     # changed input -> new entry
    os.utime(f, ns=(1, 1))
    _, reused = cache.get(pair_key(f, m, {"sigma": 0.2}), build)
    assert not reused and len(calls) == 2
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".h5", ".h5"]  # no temps


def test_whole_image_prediction_skips_background_and_samples():
    import tensorflow as tf

    from tfreg_plugins.quicksilver.layers import PatchNetworks

    shape = (32, 32)
    moving = np.zeros((1, *shape, 1), np.float32)
    fixed = np.zeros((1, *shape, 1), np.float32)
    moving[0, 2:10, 2:10] = 1.0                  # only patch 0 (rows/cols 0..14) has content
    nets = PatchNetworks(shape, features=2, dropout=0.2, correction=False, mc_samples=3,
                         patch_batch=4)
    whole = nets.whole_image(moving, fixed, "prediction", sample=True).numpy()[0]
    assert whole.shape == (32, 32, 2)
    assert np.abs(whole[20:, 20:]).max() == 0.0  # no patch covers it: 0
    assert np.abs(whole[:14, :14]).max() > 0.0   # patch 0 predicted (the original drops it)
    # one deterministic network call on patch 0 gives the same values there (chunked batches)
    det = PatchNetworks(shape, features=2, correction=False, patch_batch=3)
    out = det.whole_image(moving, fixed).numpy()[0]
    patch0 = det.prediction({"moving": tf.constant(moving[:, :15, :15]),
                             "fixed": tf.constant(fixed[:, :15, :15])})["momentum"].numpy()[0]
    np.testing.assert_allclose(out[:14, :14], patch0[:14, :14], atol=1e-6)
    # Monte-Carlo samples differ
    a = nets.whole_image(moving, fixed, "prediction", sample=True).numpy()
    b = nets.whole_image(moving, fixed, "prediction", sample=True).numpy()
    assert not np.allclose(a, b)
