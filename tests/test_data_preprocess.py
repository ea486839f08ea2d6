"""tfreg.data.preprocess: crop/pad, resampling, normalisation, and their inversion."""

from __future__ import annotations

import numpy as np
import pytest

from tfreg.data import Preprocessing, PrepRecord, field_to_source
from tfreg.errors import ConfigError, InputError
from tfreg.io import Volume


def _vol(data, spacing=None, origin=None) -> Volume:
    affine = np.eye(4)
    if spacing is not None:
        affine[:3, :3] = np.diag(list(spacing) + [1.0] * (3 - len(spacing)))
    if origin is not None:
        affine[:3, 3] = origin
    return Volume(np.asarray(data), affine)


def _world(affine, shape):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    pts = np.concatenate([grid, np.zeros((*shape, 3 - len(shape))), np.ones((*shape, 1))], -1)
    return (pts @ affine.T)[..., :3]


@pytest.mark.parametrize("ndims", [2, 3])
def test_centred_crop_and_pad_copy_voxels_exactly(ndims):
    rng = np.random.default_rng(0)
    src_shape, out_shape = (10, 7, 9)[:ndims], (8, 9, 9)[:ndims]
    data = rng.uniform(1, 2, size=src_shape).astype(np.float32)
    prep = Preprocessing(out_shape, normalize="none")
    record = prep.plan(_vol(data))
    out = prep.apply(_vol(data), record)
    # axis 0: crop 10 -> 8 starting at 1; axis 1: pad 7 -> 9 with one voxel before and after
    want = np.full(out_shape, data.min(), np.float32)
    want[(slice(None), slice(1, 8))] = data[(slice(1, 9), slice(None))]
    np.testing.assert_array_equal(out, want)
    assert record.matrix[0, ndims] == 1 and record.matrix[1, ndims] == -1
    # the preprocessed grid's world affine puts voxel 0 where source voxel (1, -1, 0) is
    origin = np.zeros(4)
    origin[3] = 1
    src_voxel = np.array([1.0, -1.0, 0.0, 1.0])
    np.testing.assert_allclose(record.affine @ origin, src_voxel)


def test_foreground_fit_centres_the_bounding_box():
    data = np.zeros((20, 20, 20), np.float32)
    data[2:8, 10:16, 5:9] = 1.0
    prep = Preprocessing((8, 8, 8), fit="foreground", normalize="none")
    out = prep.apply(_vol(data))
    # bbox centres 4.5, 12.5, 6.5; window centre 3.5 -> starts 1, 9, 3
    np.testing.assert_array_equal(out, data[1:9, 9:17, 3:11])
    assert out.sum() == data.sum()  # the whole object is kept


def test_label_map_follows_the_image_record():
    image = np.zeros((20, 20), np.float32)
    image[12:18, 2:6] = 5.0
    labels = (image > 0).astype(np.int32) * 3
    prep = Preprocessing((8, 8), fit="foreground")
    record = prep.plan(_vol(image))
    img = prep.apply(_vol(image), record)
    lab = prep.apply(_vol(labels), record, label=True)
    assert lab.dtype == np.int32
    np.testing.assert_array_equal(lab == 3, img == 1.0)
    with pytest.raises(InputError, match=r"shape \(19, 20\) differs from its image's \(20, 20\)"):
        prep.apply(_vol(labels[:19]), record, label=True)


@pytest.mark.parametrize("ndims", [2, 3])
def test_resampling_by_voxel_size_is_exact_for_a_world_linear_ramp(ndims):
    coef = np.array([0.5, -0.25, 0.125])
    src_spacing = (2.0, 1.0, 1.5)[:ndims]
    src_shape = (16, 30, 20)[:ndims]
    vol = _vol(np.zeros(src_shape), src_spacing, (3.0, -2.0, 1.0))
    vol.data = (_world(vol.affine, src_shape) @ coef + 10).astype(np.float32)
    prep = Preprocessing((12, 12, 12)[:ndims], spacing=(1.0, 2.0, 1.0)[:ndims], normalize="none")
    record = prep.plan(vol)
    out = prep.apply(vol, record)
    np.testing.assert_allclose(np.diag(record.matrix)[:ndims], [0.5, 2.0, 2 / 3][:ndims])
    want = _world(record.affine, record.shape) @ coef + 10
    np.testing.assert_allclose(out, want, atol=1e-4)
    # voxel sizes of the preprocessed grid are the requested ones
    np.testing.assert_allclose(np.linalg.norm(record.affine[:3, :ndims], axis=0),
                               (1.0, 2.0, 1.0)[:ndims])


def test_normalisations():
    data = np.arange(101, dtype=np.float32).reshape(101, 1)
    def run(**kw):
        return Preprocessing((101, 1), **kw).apply(_vol(data))[:, 0]
    np.testing.assert_allclose(run(normalize="minmax"), np.arange(101) / 100, atol=1e-6)
    z = run(normalize="zscore")
    np.testing.assert_allclose(z, (np.arange(101) - 50) / np.arange(101).std(), atol=1e-5)
    pct = run(normalize="percentile", percentiles=(1.0, 99.0))  # 1 and 99 -> 0 and 1
    np.testing.assert_allclose(pct, np.clip((np.arange(101) - 1) / 98, 0, 1), atol=1e-6)
    np.testing.assert_array_equal(run(normalize="none"), np.arange(101))
    flat = Preprocessing((3, 3)).apply(_vol(np.full((3, 3), 7.0, np.float32)))
    np.testing.assert_array_equal(flat, 0)  # constant image: no division by zero


def test_padding_uses_the_normalised_background():
    data = np.full((4, 4), 5.0, np.float32)
    data[1:3, 1:3] = 9.0
    out = Preprocessing((6, 6), normalize="minmax").apply(_vol(data))
    assert out[0, 0] == 0.0 and out[2, 2] == 1.0 and out.min() == 0.0


@pytest.mark.parametrize("ndims", [2, 3])
def test_restore_inverts_crop_pad_and_keeps_labels(ndims):
    rng = np.random.default_rng(2)
    src_shape = (9, 12, 6)[:ndims]
    data = rng.integers(0, 5, size=src_shape).astype(np.int32)
    prep = Preprocessing((12, 8, 8)[:ndims], normalize="none")
    record = prep.plan(_vol(data.astype(np.float32)))
    out = prep.apply(_vol(data), record, label=True)
    back = record.restore(out, order=0)
    assert back.dtype == np.int32 and back.shape == src_shape
    # axis 1 was cropped 12 -> 8 from index 2: those voxels come back, the rest is fill (0)
    keep = (slice(None), slice(2, 10))
    np.testing.assert_array_equal(back[keep], data[keep])
    assert np.all(back[:, :2] == 0) and np.all(back[:, 10:] == 0)
    edge = record.restore(out.astype(np.float32), order=1, fill_value=None)
    np.testing.assert_array_equal(edge[:, :2], np.repeat(data[:, 2:3], 2, axis=1))


def test_record_dict_roundtrip():
    prep = Preprocessing((8, 8, 8), spacing=(2.0, 2.0, 2.0), normalize="percentile")
    vol = _vol(np.random.default_rng(0).normal(size=(10, 11, 12)).astype(np.float32))
    record = prep.plan(vol)
    again = PrepRecord.from_dict(record.to_dict())
    np.testing.assert_array_equal(again.matrix, record.matrix)
    np.testing.assert_array_equal(prep.apply(vol, again), prep.apply(vol, record))
    assert Preprocessing.from_dict(prep.to_dict()) == prep


def test_field_to_source_hand_computed_cases():
    # 1. same whole-voxel crop for fixed and moving: a constant field stays the same constant
    prep = Preprocessing((8, 8, 8), normalize="none")
    rec = prep.plan(_vol(np.zeros((10, 12, 6), np.float32)))
    disp = np.zeros((8, 8, 8, 3), np.float32)
    disp[..., 0] = 2.0
    disp[..., 2] = -1.5
    out = field_to_source(disp, rec)
    assert out.shape == (10, 12, 6, 3)
    np.testing.assert_allclose(out[..., 0], 2.0)
    np.testing.assert_allclose(out[..., 2], -1.5)
    np.testing.assert_allclose(out[..., 1], 0.0)

    # 2. resampled 1 mm -> 2 mm: one preprocessed voxel = two original voxels
    prep2 = Preprocessing((8, 8), spacing=(2.0, 2.0), normalize="none")
    rec2 = prep2.plan(_vol(np.zeros((16, 16), np.float32)))
    disp2 = np.zeros((8, 8, 2), np.float32)
    disp2[..., 1] = 1.0
    out2 = field_to_source(disp2, rec2)
    np.testing.assert_allclose(out2[..., 1], 2.0, atol=1e-5)
    np.testing.assert_allclose(out2[..., 0], 0.0, atol=1e-5)

    # 3. fixed and moving cropped at different places (foreground fit): zero predicted motion
    #    still means "moving voxel y = x + (t_moving - t_fixed)" in original coordinates
    prep3 = Preprocessing((6, 6), fit="foreground", normalize="none")
    a = np.zeros((20, 20), np.float32)
    a[2:6, 3:7] = 1.0
    b = np.zeros((20, 20), np.float32)
    b[10:14, 9:13] = 1.0
    rec_a, rec_b = prep3.plan(_vol(a)), prep3.plan(_vol(b))
    out3 = field_to_source(np.zeros((6, 6, 2), np.float32), rec_a, rec_b)
    np.testing.assert_allclose(out3[..., 0], 8.0, atol=1e-5)
    np.testing.assert_allclose(out3[..., 1], 6.0, atol=1e-5)


def test_settings_validation_messages():
    with pytest.raises(ConfigError, match=r"^d\.yaml: preprocess\.normalise: unknown key "
                                          r"\(did you mean 'normalize'\?\)$"):
        Preprocessing.from_dict({"shape": [8, 8], "normalise": "minmax"}, "d.yaml", "preprocess.")
    with pytest.raises(ConfigError, match=r"normalize: expected one of .*got 'zscor' "
                                          r"\(did you mean 'zscore'\?\)"):
        Preprocessing.from_dict({"shape": [8, 8], "normalize": "zscor"}, "d.yaml")
    with pytest.raises(ConfigError, match=r"percentiles: expected 0 <= p_low < p_high <= 100"):
        Preprocessing.from_dict({"shape": [8, 8], "percentiles": [99, 1]}, "d.yaml")
    with pytest.raises(ConfigError, match=r"spacing: expected a list of 2 positive numbers"):
        Preprocessing.from_dict({"shape": [8, 8], "spacing": [1, 1, 1]}, "d.yaml")
    with pytest.raises(InputError, match=r"is 3D \(4, 4, 4\), but the input shape \[8, 8\] is 2D"):
        Preprocessing((8, 8)).plan(_vol(np.zeros((4, 4, 4), np.float32)))
