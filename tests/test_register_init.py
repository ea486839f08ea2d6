"""World-space initialisation of `tfreg register` (tfreg.initialise): headers rotated and shifted,
little coverage, very different fields of view."""

from __future__ import annotations

import numpy as np
import pytest

from tfreg import initialise, instance
from tfreg.errors import InputError
from tfreg.io import Volume
from tfreg.register import register_volumes
from tfreg.demo import make_sample_pair
from tfreg.synthetic import deformed_subject

INNER = (18, 28, 22)  # elongated, so that right-angle rotations look different
PAD = 3
SHAPE = tuple(n + 2 * PAD for n in INNER)
SPACING = 2.0
#: quick settings: one deformable level, few steps.
QUICK = instance.make_config("fast", levels=1, iterations=40, affine_iterations=30)


def _grid(shape=SHAPE, origin=None) -> np.ndarray:
    """Voxel-to-world matrix: 2 mm voxels, centred on the world origin unless `origin` given."""
    affine = np.diag([SPACING] * 3 + [1.0])
    affine[:3, 3] = -SPACING * (np.asarray(shape) - 1) / 2 if origin is None else origin
    return affine


@pytest.fixture(scope="module")
def subjects():
    """The demo's pair at 18x28x22 in a 3-voxel background margin: two synthetic subjects, the moving one also rotated by 8
    degrees and shifted by 3 voxels, with labels."""
    pair = make_sample_pair(INNER, seed=4)
    # a bright blob near one end of the long axis (like a cerebellum) and the other end cut
    # flat: the phantom alone is almost symmetric under half turns, which no initialisation
    # could tell apart (nor any registration)
    grid = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in INNER], indexing="ij")
    blob = ((grid[0] / 4.0) ** 2 + ((grid[1] - 8.0) / 5.0) ** 2 + ((grid[2] + 3.0) / 4.0) ** 2) <= 1
    cut = grid[1] < -9.0
    for side in ("fixed", "moving"):
        pair[side] = np.where(blob, np.float32(0.95), np.where(cut, np.float32(0), pair[side]))
        pair[side + "_labels"] = np.where(blob, 7, np.where(cut, 0, pair[side + "_labels"])
                                          ).astype(np.int32)
    # background margin: what lies beyond the moving grid is filled differently on a shared grid
    # (border values) and across grids (0), which is not what these tests compare
    pair = {k: np.pad(v, PAD) for k, v in pair.items()}
    return (pair["fixed"], pair["fixed_labels"]), (pair["moving"], pair["moving_labels"])


def _register(fixed, moving, moving_affine):
    (f_img, f_lab), (m_img, m_lab) = fixed, moving
    f = Volume(f_img, _grid(), path="fixed")
    m = Volume(m_img, moving_affine, path="moving")
    return register_volumes(f, m, fixed_labels=Volume(f_lab, _grid()),
                            moving_labels=Volume(m_lab, moving_affine), config=QUICK).report


@pytest.fixture(scope="module")
def plain(subjects):
    """The pair with consistent headers (both centred on the world origin)."""
    return _register(*subjects, _grid())


def test_rotated_and_shifted_moving_header_gives_the_same_result(subjects, plain):
    """The moving header rotated by 90 degrees about the third axis and shifted by 100 mm: the
    world-space start undoes both, so Dice matches the plain pair within 0.01. Resampling by the
    headers first (the former pipeline) leaves the brain outside the fixed field of view."""
    fixed, moving = subjects
    rotation = np.array([[0.0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    shift = np.eye(4)
    shift[:3, 3] = [100.0, 0.0, 0.0]
    moved = _register(fixed, moving, shift @ rotation @ _grid())
    assert plain["mean_dice"] > plain["mean_dice_before"] + 0.15, plain
    assert moved["mean_dice_before"] < 0.1  # by the headers alone nothing overlaps
    assert moved["initialisation"]["method"].startswith("centres, rotation"), \
        moved["initialisation"]
    assert abs(moved["mean_dice"] - plain["mean_dice"]) < 0.01, (moved["mean_dice"],
                                                                 plain["mean_dice"])
    assert moved["folding_percent"] < 0.5


def test_origin_at_a_corner_against_a_centred_fixed_grid(subjects):
    """OASIS-like header (origin at a corner) against a centred fixed grid: the centres are
    aligned before anything is resampled, the headers alone would leave little overlap."""
    (f_img, _), (m_img, _) = subjects
    fixed = Volume(f_img, _grid())
    centred = initialise.initial_alignment(fixed, Volume(m_img, _grid()))
    corner = initialise.initial_alignment(fixed, Volume(m_img, _grid(origin=[0.0, 0.0, 0.0])))
    assert corner.method == "centres", corner.scores
    assert corner.scores["centres"] > corner.scores["headers"] + 0.05
    # the moving origin moved by half its field of view, (shape - 1) / 2 voxels: the start moves
    # by as much, and is otherwise the start of the consistent headers
    shift = (np.asarray(SHAPE) - 1) / 2
    np.testing.assert_allclose(corner.voxel_map[:3, :3], centred.voxel_map[:3, :3], atol=1e-6)
    np.testing.assert_allclose(corner.voxel_map[:3, 3], centred.voxel_map[:3, 3] + shift,
                               atol=1e-3)


def test_initial_alignment_recovers_a_pure_shift():
    """The same image with its header shifted by (30, -20, 10) mm: the chosen start maps each fixed
    voxel to the world point 30, -20, 10 mm away, i.e. G = identity + shift in voxels."""
    image, _ = deformed_subject(SHAPE, seed=3)
    fixed = Volume(image, _grid())
    moved = _grid()
    moved[:3, 3] += [30.0, -20.0, 10.0]
    start = initialise.initial_alignment(fixed, Volume(image, moved))
    np.testing.assert_allclose(start.voxel_map[:3, :3], np.eye(3), atol=1e-6)
    np.testing.assert_allclose(start.voxel_map[:3, 3], [15.0, -10.0, 5.0], atol=0.05)
    assert start.coverage > 0.99


def test_little_coverage_warns_and_none_refuses(subjects):
    """A 6-slice slab of the moving subject covers under 60% of the fixed foreground: a warning;
    a 2-slice one under 20%: refused, one line naming the moving file."""
    fixed, moving = subjects
    (m_img, _) = moving
    f = Volume(fixed[0], _grid(), path="fixed")
    slab = m_img[:, :, 10:16]
    start = initialise.initial_alignment(f, Volume(slab, _grid(slab.shape)))
    assert 0.3 < start.coverage < initialise.COVERAGE_WARN  # 6 of about 20 brain slices
    assert "covers only" in initialise.coverage_warning(start, "fixed", "moving")
    thin = m_img[:, :, 11:13]
    start = initialise.initial_alignment(f, Volume(thin, _grid(thin.shape)))
    with pytest.raises(InputError, match="^moving: covers only"):
        initialise.coverage_warning(start, "fixed", "moving")
    whole = initialise.initial_alignment(f, Volume(m_img, _grid()))
    assert whole.coverage > 0.99
    assert initialise.coverage_warning(whole, "fixed", "moving") is None
