"""The cascade method's additions to ``tfreg register --model`` (its `RegisterHook`).

``--cascades K`` (option ``recursions``) rebuilds a cascade model to run K recursions
(`recursion_overrides`: K cascades with shared weights, or each of n distinct cascades K/n times)
and reports the similarity to the fixed
image after each recursion, computed in one forward pass (`recursion_table`).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from tfreg.errors import ConfigError
from tfreg.registry import RegisterHook, RegisterReport

__all__ = ["REGISTER_HOOK", "recursion_overrides", "recursion_table", "recursion_report"]


def recursion_overrides(config: dict, options: dict) -> dict:
    """Config overrides that run a cascade model with ``options["recursions"] = K`` steps.

    Shared weights: ``{"model.cascades": K}`` (any K; K may exceed the trained count). Distinct
    cascades (n of them): each runs ``K / n`` times in order, ``{"model.repeats": K // n}`` (the
    original's test-time recursion).

    Raises:
        ConfigError: K < 1, or K not a multiple of the n distinct cascades.
    """
    recursions = options.get("recursions")
    if recursions is None:
        return {}
    recursions = int(recursions)
    model = config.get("model") or {}
    if recursions < 1:
        raise ConfigError(f"must be at least 1, got {recursions}")
    if model.get("shared_weights", False):
        return {"model.cascades": recursions}
    n = int(model.get("cascades") or 0)
    if n < 1 or recursions % n:
        raise ConfigError(f"{recursions} is not a multiple of the {n} distinct cascades of this "
                          f"model (each cascade runs K/{n} times; use K = {n}, {2 * n}, "
                          f"{3 * n}, ...)")
    return {"model.repeats": recursions // n}


def _round(value: float, digits: int = 5) -> float | None:
    value = float(value)
    return None if not np.isfinite(value) else round(value, digits)


def recursion_table(keras_model: Any, inputs: dict, trained: int | None = None) -> list[dict]:
    """Similarity to the fixed image after each recursion of a cascade model.

    Args:
        keras_model: a cascade model; its outputs ``warped_k`` (k = 0..K; 0 = affine stem only).
        inputs: its preprocessed input dict, ``fixed`` and ``moving`` `(1, *S, 1)`.
        trained: the number of cascades the model was trained with (marked in the table).

    Returns:
        One row per k (k = 0 only with the affine stem): ``{"recursions": k, "global_r":
        Pearson r, "local_ncc": signed local NCC (`tfreg.instance.local_ncc`), "trained":
        k == trained}``.
    """
    from tfreg import instance

    outputs = keras_model(inputs, training=False)
    fixed = np.asarray(inputs["fixed"])[0, ..., 0]
    steps = sorted(int(m.group(1)) for name in outputs
                   if (m := re.fullmatch(r"warped_(\d+)", name)))
    rows = []
    for k in steps:
        warped = np.asarray(outputs[f"warped_{k}"])[0, ..., 0]
        r = np.corrcoef(fixed.ravel(), warped.ravel())[0, 1]
        rows.append({"recursions": k, "global_r": _round(r),
                     "local_ncc": _round(instance.local_ncc(fixed, warped)),
                     "trained": trained is not None and k == trained})
    return rows


def recursion_report(keras_model: Any, config: dict, inputs: dict,
                     options: dict) -> RegisterReport | None:
    """With ``--cascades``: the `recursion_table` as ``report.json["recursions"]`` and as a table
    under the summary; nothing otherwise. `config` is the model's config as exported (its
    ``model.cascades`` is the trained count)."""
    if options.get("recursions") is None:
        return None
    model = config.get("model") or {}
    trained = model.get("cascades")
    if not model.get("shared_weights", False) and int(options["recursions"]) != trained:
        trained = None  # distinct cascades repeated in place: no step is the trained model
    rows = recursion_table(keras_model, inputs, trained)
    lines = ["recursions  global r   local NCC"]
    for row in rows:
        label = f"{row['recursions']}" + (" (trained)" if row["trained"] else "")
        lines.append(f"{label:<12}{row['global_r']:<11.4f}{row['local_ncc']:.4f}")
    return RegisterReport(entries={"recursions": rows}, lines=tuple(lines))


REGISTER_HOOK = RegisterHook(overrides=recursion_overrides, report=recursion_report)
