"""`tfreg register` across contrasts: --similarity mind|nmi, the worse-than-start warning and the
histogram contrast hint (`tfreg.contrast`)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from click.testing import CliRunner
from scipy import ndimage

from tfreg import contrast
from tfreg.io import Volume
from tfreg.metrics import dice, mean_dice
from tfreg.register import register_volumes
from tfreg.synthetic import phantom, smooth_random_field, warp_numpy
from tfreg_cli.main import cli

SHAPE = (32, 32, 32)
#: T1-like (WM bright, CSF dark) and T2-like (CSF bright, WM dark) intensities of the phantom.
T1 = np.array([0.0, 0.25, 0.55, 0.85, 0.65, 0.4, 0.7])
T2 = np.array([0.0, 0.95, 0.6, 0.3, 0.45, 0.9, 0.4])
QUICK = dict(preset="fast", levels=2, iterations=(40, 30), affine_iterations=30)


def _pair(seed: int = 5):
    rng = np.random.default_rng(seed)
    _, labels = phantom(SHAPE, rng, jitter=0.0)
    truth = smooth_random_field(SHAPE, max_disp=3.0, smoothness=5.0, rng=rng)
    moving_labels = warp_numpy(labels, -truth, order=0).astype(np.int32)
    moving_labels = np.roll(moving_labels, 2, axis=0)
    fixed = ndimage.gaussian_filter(T1[labels], 0.7).astype(np.float32)
    moving = ndimage.gaussian_filter(T2[moving_labels], 0.7).astype(np.float32)
    return fixed, moving, labels.astype(np.int32), moving_labels


def test_histograms_separate_contrasts():
    fixed, moving, labels, moving_labels = _pair()
    same = ndimage.gaussian_filter(T1[moving_labels], 0.7)
    assert contrast.histogram_distance(fixed, same) < 0.05
    assert contrast.foreground_correlation(fixed, same) > 0.3
    assert contrast.foreground_correlation(fixed, moving) < -0.2
    assert not contrast.check(fixed, same, same, None, "ncc").different_contrasts
    assert contrast.check(fixed, moving, moving, None, "ncc").different_contrasts


def test_worse_than_start_is_flagged():
    fixed, moving, _, _ = _pair()
    aligned = ndimage.gaussian_filter(T2[_pair()[2]], 0.7).astype(np.float32)
    bad = np.roll(aligned, 6, axis=1)
    report = contrast.check(fixed, moving, bad, aligned, "ncc")
    assert report.worse_than_start and report.nmi_after < report.nmi_affine
    assert report.mind_after > report.mind_affine
    assert any("less than" in w and "the affine stage" in w and "--similarity mind" in w
               for w in report.warnings)
    assert any(w.startswith("hint:") and "--similarity mind" in w for w in report.warnings)
    good = contrast.check(fixed, moving, aligned, None, "mind")
    assert not good.worse_than_start and good.warnings == []


def _volume(data, path):
    return Volume(np.asarray(data, np.float32), np.eye(4), path=path)


def test_mind_registers_t2_to_t1_and_ncc_gets_the_hint(tmp_path):
    fixed, moving, labels, moving_labels = _pair()
    from tfreg import instance

    result = register_volumes(_volume(fixed, "fixed"), _volume(moving, "moving"),
                              config=instance.make_config(similarity="mind", **QUICK))
    before = mean_dice(dice(labels, moving_labels))
    after = mean_dice(dice(labels, warp_numpy(moving_labels, result.disp, order=0)))
    assert after > before + 0.1, (before, after)
    assert result.report["warnings"] == [] and not result.report["contrast"]["worse_than_start"]

    # the command line with a same-contrast similarity: the hint, in the output and report.json
    for name, data in (("fixed", fixed), ("moving", moving)):
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    out = tmp_path / "out"
    run = CliRunner().invoke(cli, ["register", str(tmp_path / "fixed.nii.gz"),
                                   str(tmp_path / "moving.nii.gz"), "-o", str(out), "-q",
                                   "--similarity", "ncc", "--preset", "fast", "--levels", "2",
                                   "--iterations", "40,30", "--affine-iterations", "30"])
    assert run.exit_code == 0, run.output
    hints = [line for line in run.output.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and "--similarity mind" in hints[0]
    report = json.loads((out / "report.json").read_text())
    assert report["contrast"]["different_contrasts"] and hints[0] in report["warnings"]


def _pool_half_numpy(x):
    """Mean of voxels 2q-1, 2q, 2q+1 inside the volume, per axis (pool_half's definition)."""
    for axis in range(x.ndim):
        n = x.shape[axis]
        rows = []
        for q in range(-(-n // 2)):
            lo, hi = max(2 * q - 1, 0), min(2 * q + 2, n)
            rows.append(np.take(x, range(lo, hi), axis=axis).mean(axis=axis))
        x = np.stack(rows, axis=axis)
    return x


def test_checks_on_coarsened_images_keep_their_verdicts():
    fixed, moving, _, _ = _pair()
    aligned = ndimage.gaussian_filter(T2[_pair()[2]], 0.7).astype(np.float32)
    bad = np.roll(aligned, 6, axis=1)
    # 32^3 voxels pooled once to 16^3: the measures are those of the pooled images
    nmi_values, mind_values = contrast.measures(fixed, [moving, bad], max_voxels=16 ** 3)
    small = [_pool_half_numpy(x.astype(np.float64)).astype(np.float32)
             for x in (fixed, moving, bad)]
    assert small[0].shape == (16, 16, 16)
    full_nmi, full_mind = contrast.measures(small[0], small[1:], max_voxels=None)
    np.testing.assert_allclose(nmi_values, full_nmi, rtol=1e-4)
    np.testing.assert_allclose(mind_values, full_mind, rtol=1e-4)
    assert abs(nmi_values[0] - contrast.nmi(fixed, moving)) > 1e-3  # the pooling happened
    report = contrast.check(fixed, moving, bad, aligned, "ncc", max_voxels=16 ** 3)
    assert report.worse_than_start and report.nmi_after < report.nmi_affine
    good = contrast.check(fixed, moving, aligned, None, "mind", max_voxels=16 ** 3)
    assert not good.worse_than_start and good.warnings == []
