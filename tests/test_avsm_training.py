"""AVSM learns on tiny 2D data.

Always run (about 30 s): on one 32x32 pair (a phantom and its copy moved by a known affine and a
smooth deformation of up to 2 voxels), 40 steps of the affine stage and 30 of the vSVF stage each
bring the warped image closer to the fixed one.

With ``TFREG_SLOW_TESTS=1`` (about 4 minutes on a loaded 2-core CPU): the affine network recovers
known affines of held-out pairs, symmetric training makes the affine maps of (s, t) and (t, s)
closer to inverses, and the full method beats identity and the affine stage alone in Dice. 32x32
phantoms with random affines and deformations of up to 3 voxels, 200 affine and 300 vSVF steps of
4 pairs (doubled to (s, t), (t, s)).
"""
import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from tfreg.config import method_defaults, resolve
from tfreg.layers import affine_to_disp
from tfreg.metrics import dice, mean_dice
from tfreg.registry import discover
from tfreg.synthetic import deformed_subject, smooth_random_field, warp_numpy
from tfreg_plugins.avsm.losses import symmetric_batch

SHAPE = (32, 32)
N_TRAIN, N_VAL = 12, 4


def _random_affine(rng):
    """Centred voxel affine [R | t]: rotation up to 0.15 rad, scale 8 %, shift 2 voxels."""
    angle = rng.uniform(-0.15, 0.15)
    scale = 1 + rng.uniform(-0.08, 0.08, 2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    return np.concatenate([rot, rng.uniform(-2, 2, (2, 1))], axis=1)


def _apply(volume, aff, order=1):
    """volume(A (x - c) + b + c) with SciPy (independent of tfreg's sampler)."""
    c = (np.array(volume.shape) - 1) / 2
    return ndimage.affine_transform(volume, aff[:, :2], offset=c - aff[:, :2] @ c + aff[:, 2],
                                    order=order, mode="nearest")


def _homog(aff):
    return np.vstack([aff, [0, 0, 1]])


@pytest.fixture(scope="module")
def data():
    images, labels, affines = [], [], []
    for i in range(N_TRAIN + N_VAL):
        image, label = deformed_subject(SHAPE, 300 + i, max_disp=3.0)
        aff = _random_affine(np.random.default_rng(700 + i))
        images.append(_apply(image, aff))
        labels.append(_apply(label, aff, order=0).astype(np.int32))
        affines.append(aff)
    return np.stack(images).astype(np.float32), np.stack(labels), affines


def _with_data(method, images, n=N_TRAIN):
    """`method` reading in-memory random ordered pairs of the first `n` subjects, doubled as
    (s, t), (t, s)."""
    from tfreg import registry

    def pipeline(data, config=None, split="train", batch_size=1, seed=0, shuffle=True, repeat=True,
                 input_context=None):
        pairs = np.array([(i, j) for i in range(n) for j in range(n) if i != j], np.int32)
        table = tf.constant(images[:n, ..., None])
        ds = tf.data.Dataset.from_tensor_slices(pairs).shuffle(len(pairs), seed=seed).repeat()
        ds = ds.map(lambda p: {"fixed": tf.gather(table, p[0]), "moving": tf.gather(table, p[1])})
        return ds.batch(batch_size, drop_remainder=True).map(symmetric_batch)
    if hasattr(registry, "DataSource"):
        source = registry.DataSource(open=lambda path, config, divisor: None, dataset=pipeline)
        return dataclasses.replace(method, data=source)
    return dataclasses.replace(method, data_pipeline=pipeline)


SCHEDULE = {"affine_ncc_steps": 0, "affine_task_steps": 140, "affine_sym_steps": 60,
            "affine_multi_steps": 0}


def _train(name, images, tmp_path_factory, symmetric, schedule, n=N_TRAIN):
    from tfreg.engine import train

    method = discover().get(name).method
    over = {"model": {"affine_train_steps": 2, "affine_test_steps": 2},
            "loss": {"similarity": "mse", "affine_reg_epoch": 1, "symmetric": symmetric},
            "schedule": schedule,
            "train": {"learning_rate": 2e-3, "batch_size": 4, "checkpoint_every": 10000, "log_every": 10000,
                      "image_every": 10000, "val_pairs": 0}}
    if name == "avsm":
        over["model"].update({"vsvf_steps": 1, "integration_steps": 5,
                              "momentum_features": [8, 8, 16, 16, 16]})
    config = resolve(method_defaults(method), None, over)
    method = _with_data(method, images, n)
    run_dir = tmp_path_factory.mktemp(f"{name}_{symmetric}") / "run"
    return train(method, config, None, run_dir, verbose=0)


SLOW = pytest.mark.skipif(os.environ.get("TFREG_SLOW_TESTS") != "1",
                          reason="learning checks on 12 subjects (~4 min); set TFREG_SLOW_TESTS=1")


@pytest.mark.slow
def test_each_stage_improves_one_pair(tmp_path_factory):
    """Affine stage, then vSVF stage (affine frozen), trained on one pair only: each must reduce
    the image error, so a stage that does not learn (a lost gradient, a wrong frozen part) fails."""
    image, _ = deformed_subject(SHAPE, 5, max_disp=0.0)
    field = smooth_random_field(SHAPE, max_disp=2.0, smoothness=4.0, rng=np.random.default_rng(1))
    aff = np.array([[np.cos(0.12), -np.sin(0.12), 1.5], [np.sin(0.12), np.cos(0.12), -1.0]])
    moving = _apply(warp_numpy(image, -field, order=1), aff)
    images = np.stack([image, moving]).astype(np.float32)
    schedule = {"affine_ncc_steps": 0, "affine_task_steps": 40, "affine_sym_steps": 0,
                "affine_multi_steps": 0, "vsvf_one_steps": 30, "vsvf_two_steps": 0,
                "vsvf_sym_steps": 0}
    run = _train("avsm", images, tmp_path_factory, True, schedule, n=2)
    out = _predict(run.model, images, [(0, 1)], ("affine_warped", "warped"))
    err = {name: float(np.mean((warped[0, ..., 0] - image) ** 2))
           for name, warped in (("identity", moving[None, ..., None]),
                                ("affine", out["affine_warped"]), ("avsm", out["warped"]))}
    # measured with 30-40 steps per stage: identity 0.0203, affine 0.0077-0.0086, avsm 0.0036-0.0050
    assert err["affine"] < 0.6 * err["identity"], err
    assert err["avsm"] < 0.85 * err["affine"], err


@pytest.fixture(scope="module")
def avsm_run(data, tmp_path_factory):
    schedule = {**SCHEDULE, "vsvf_one_steps": 300, "vsvf_two_steps": 0, "vsvf_sym_steps": 0}
    return _train("avsm", data[0], tmp_path_factory, True, schedule)


@pytest.fixture(scope="module")
def plain_affine_run(data, tmp_path_factory):
    return _train("affine", data[0], tmp_path_factory, False, SCHEDULE)


def _val_pairs():
    return [(i, j) for i in range(N_TRAIN, N_TRAIN + N_VAL)
            for j in range(N_TRAIN, N_TRAIN + N_VAL) if i != j]


def _predict(model, images, pairs, outputs=("affine", "disp")):
    """Outputs for a list of (fixed, moving) index pairs, in one batched call of a sub-model."""
    import keras

    sub = keras.Model(model.input, {k: model.output[k] for k in outputs})
    fixed = np.stack([images[i] for i, _ in pairs])[..., None]
    moving = np.stack([images[j] for _, j in pairs])[..., None]
    return {k: v.numpy() for k, v in sub({"fixed": fixed, "moving": moving}).items()}


@SLOW
def test_affine_network_recovers_known_affines(avsm_run, data):
    """Held-out pairs: the predicted map is much closer to the true T_j^-1 T_i than the identity."""
    images, _, affines = data
    pairs = _val_pairs()
    pred = _predict(avsm_run.model, images, pairs, ("affine",))["affine"]
    err_net, err_id = [], []
    for k, (i, j) in enumerate(pairs):
        truth = (np.linalg.inv(_homog(affines[j])) @ _homog(affines[i]))[:2]
        true_disp = affine_to_disp(truth[None].astype(np.float32), SHAPE).numpy()[0]
        disp = affine_to_disp(pred[k:k + 1], SHAPE).numpy()[0]
        err_net.append(np.mean(np.linalg.norm(disp - true_disp, axis=-1)))
        err_id.append(np.mean(np.linalg.norm(true_disp, axis=-1)))
    # a hand-written loop of the same stage reached 0.57-0.62 of the identity's error
    assert np.mean(err_net) < 0.75 * np.mean(err_id), (np.mean(err_net), np.mean(err_id))


def _symmetry_error(model, images):
    pairs = _val_pairs()
    forward = _predict(model, images, pairs, ("affine",))["affine"]
    backward = _predict(model, images, [(j, i) for i, j in pairs], ("affine",))["affine"]
    return np.mean([np.abs(_homog(a) @ _homog(b) - np.eye(3)).sum()
                    for a, b in zip(forward, backward)])


@SLOW
def test_symmetric_training_lowers_the_inverse_consistency_error(avsm_run, plain_affine_run,
                                                                 data):
    """Same affine stages and seed; only the (s, t), (t, s) symmetry loss differs."""
    images = data[0]
    sym, plain = _symmetry_error(avsm_run.model, images), _symmetry_error(
        plain_affine_run.model, images)
    assert sym < 0.8 * plain, (sym, plain)


@SLOW
def test_avsm_beats_identity_and_the_affine_stage_in_dice(avsm_run, data):
    images, labels, _ = data
    pairs = _val_pairs()
    out = _predict(avsm_run.model, images, pairs)
    ident, aff, full = [], [], []
    for k, (i, j) in enumerate(pairs):
        aff_disp = affine_to_disp(out["affine"][k:k + 1], SHAPE).numpy()[0]
        ident.append(mean_dice(dice(labels[i], labels[j])))
        aff.append(mean_dice(dice(labels[i], warp_numpy(labels[j], aff_disp, order=0))))
        full.append(mean_dice(dice(labels[i], warp_numpy(labels[j], out["disp"][k], order=0))))
    ident, aff, full = np.mean(ident), np.mean(aff), np.mean(full)
    print(f"Dice identity {ident:.3f} affine {aff:.3f} avsm {full:.3f}")
    # measured when written: identity 0.258, affine 0.379, avsm 0.408
    assert aff > ident + 0.08, (ident, aff)
    assert full > aff + 0.01, (aff, full)
