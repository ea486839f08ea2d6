"""The training stages of the ``affine`` and ``avsm`` methods.

The original's epoch-based switches (400 batches per epoch) become stage boundaries, each a step
count in the ``schedule:`` section:

==================  ===========================================  ==========================
stage               what trains / computes                       original (epochs)
==================  ===========================================  ==========================
``affine_ncc``      affine net, 1 step, global NCC               0-100
``affine_task``     affine net, 1 step, task similarity          100-200
``affine_sym``      + symmetry loss                              200-300
``affine_multi``    ``model.affine_train_steps`` steps,          300-
                    learning rate x ``schedule.multi_lr_factor``
``vsvf``            (avsm) momentum net, 1 vSVF step, affine     0-100 of the vSVF training
                    net frozen (``model.affine_test_steps``)
``vsvf_two``        ``model.vsvf_steps`` vSVF steps, learning    100-200
                    rate x ``schedule.multi_lr_factor``
``vsvf_sym``        + inverse consistency                        200-500
==================  ===========================================  ==========================

A stage of 0 steps is skipped.
"""
from __future__ import annotations

from tfreg.errors import ConfigError
from tfreg.registry import Stage

from .model import model_options

__all__ = ["affine_stages", "avsm_stages"]

_AFFINE_1 = ("affine_theta_1", "affine_warped_1")
_AFFINE_T = ("affine_theta_train", "affine_warped_train")


def _count(section: dict, key: str) -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"schedule.{key}: expected an integer >= 0, got {value!r}")
    return value


def _factor(section: dict) -> float:
    value = section.get("multi_lr_factor")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"schedule.multi_lr_factor: expected a number > 0, got {value!r}")
    return float(value)


def _vsvf_outputs(steps: int) -> tuple[str, ...]:
    return tuple(f"vsvf_{name}_{k}" for k in range(1, steps + 1)
                 for name in ("momentum", "velocity", "disp", "warped"))


def affine_stages(config: dict) -> list[Stage]:
    """The four affine stages (``schedule.affine_*_steps``)."""
    section = config.get("schedule") or {}
    lr = float(config["train"]["learning_rate"])
    return [
        Stage("affine_ncc", _count(section, "affine_ncc_steps"), outputs=_AFFINE_1),
        Stage("affine_task", _count(section, "affine_task_steps"), outputs=_AFFINE_1),
        Stage("affine_sym", _count(section, "affine_sym_steps"), outputs=_AFFINE_1),
        Stage("affine_multi", _count(section, "affine_multi_steps"), outputs=_AFFINE_T,
              learning_rate=lr * _factor(section)),
    ]


def avsm_stages(config: dict) -> list[Stage]:
    """The affine stages, then the three vSVF stages with the affine network frozen."""
    section = config.get("schedule") or {}
    opts = model_options(config)
    lr = float(config["train"]["learning_rate"])
    frozen = ("avsm_affine",)
    stages = affine_stages(config)
    one = _count(section, "vsvf_one_steps")
    two = _count(section, "vsvf_two_steps")
    sym = _count(section, "vsvf_sym_steps")
    multi_lr = lr * _factor(section) if opts.vsvf_steps > 1 else lr
    stages += [
        Stage("vsvf", one, outputs=_vsvf_outputs(1), frozen=frozen, freeze_steps=one),
        Stage("vsvf_two", two, outputs=_vsvf_outputs(opts.vsvf_steps), learning_rate=multi_lr,
              frozen=frozen, freeze_steps=two),
        Stage("vsvf_sym", sym, outputs=_vsvf_outputs(opts.vsvf_steps), learning_rate=multi_lr,
              frozen=frozen, freeze_steps=sym),
    ]
    return stages
