"""`register_volumes(..., outputs_ready=...)`: the outputs are handed over before the checks and
metrics run (`register_files` writes them meanwhile)."""

from __future__ import annotations

import numpy as np

from tfreg import instance
from tfreg import register as register_module
from tfreg.io import Volume
from tfreg.synthetic import phantom, smooth_random_field, warp_numpy

SHAPE = (24, 24, 24)


def test_outputs_are_handed_over_before_the_metrics(monkeypatch):
    rng = np.random.default_rng(2)
    image, labels = phantom(SHAPE, rng, jitter=0.0)
    truth = smooth_random_field(SHAPE, max_disp=2.0, smoothness=5.0, rng=rng)
    moving_labels = warp_numpy(labels, -truth, order=0).astype(np.int32)
    moving = warp_numpy(image, -truth, order=1).astype(np.float32)
    events, handed = [], {}
    scored = register_module._score_pair

    def score_pair(*args, **kwargs):
        events.append("metrics")
        return scored(*args, **kwargs)

    def outputs_ready(warped, disp, warped_labels):
        events.append("outputs")
        handed.update(warped=warped, disp=disp, warped_labels=warped_labels)

    monkeypatch.setattr(register_module, "_score_pair", score_pair)
    grid = np.eye(4)
    result = register_module.register_volumes(
        Volume(image.astype(np.float32), grid, path="fixed"), Volume(moving, grid, path="moving"),
        fixed_labels=Volume(labels.astype(np.int32), grid, path="fl"),
        moving_labels=Volume(moving_labels, grid, path="ml"),
        config=instance.make_config("fast", levels=1, iterations=(5,), affine_iterations=3),
        outputs_ready=outputs_ready)
    assert events == ["outputs", "metrics"]
    assert handed["warped"] is result.warped and handed["disp"] is result.disp
    assert handed["warped_labels"] is result.warped_labels
    assert result.warped.dtype == np.float32 and result.disp.shape == (*SHAPE, 3)
    assert "mean_dice" in result.report
