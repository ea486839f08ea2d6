"""LapIRN's coarse-to-fine training schedule as training-engine stages.

Stage ``level1`` trains the 1/4-resolution CRN alone. Stage ``level2`` trains levels 1 and 2 on
the level-2 outputs, with level 1 frozen for its first ``freeze_steps`` steps; stage ``level3``
does the same for levels 1-3 with levels 1 and 2 frozen at first. Freezing is by layer-name
prefix (``lapirn_l1``, ``lapirn_l2``; see `network`).
"""

from __future__ import annotations

from tfreg.errors import ConfigError
from tfreg.registry import Stage

from .network import LEVELS, level_outputs, model_options

__all__ = ["DEFAULT_SCHEDULE", "stages"]

#: The original's iteration counts (30k / 30k / 60k) and unfreezing step.
DEFAULT_SCHEDULE = {"level1_steps": 30000, "level2_steps": 30000, "level3_steps": 60000,
                    "freeze_steps": 2000}


def _count(section: dict, key: str, minimum: int) -> int:
    value = section.get(key, DEFAULT_SCHEDULE[key])
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"schedule.{key}: expected an integer >= {minimum}, "
                          f"got {value!r}")
    return value


def stages(config: dict) -> list[Stage]:
    """The three training stages of a resolved config (``schedule:`` section).

    Returns:
        ``[Stage("level1", n1, outputs=<level 1>), Stage("level2", n2, outputs=<level 2>,
        frozen=("lapirn_l1",), freeze_steps=M), Stage("level3", n3, outputs=<level 3>,
        frozen=("lapirn_l1", "lapirn_l2"), freeze_steps=M)]``; every stage uses
        ``train.learning_rate``.

    Raises:
        ConfigError: a step count is not an integer >= 0. ``level{l}_steps: 0`` skips that level's
            training (e.g. to train only the coarse levels of a quick run).
    """
    section = config.get("schedule") or {}
    variant = model_options(config).variant
    freeze = _count(section, "freeze_steps", 0)
    out = []
    for level in range(1, LEVELS + 1):
        frozen = tuple(f"lapirn_l{lower}" for lower in range(1, level))
        out.append(Stage(name=f"level{level}", steps=_count(section, f"level{level}_steps", 0),
                         outputs=level_outputs(level, variant), frozen=frozen,
                         freeze_steps=freeze if frozen else 0))
    return out
