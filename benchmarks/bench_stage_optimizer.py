"""Size of the first Adam updates of a parameter that starts training in a later stage: one Adam
shared by every stage (tfreg before protocol 2) against a fresh Adam per stage (now).

The parameter gets a constant gradient from its first step on, after N steps of earlier stages in
which it received none (LapIRN: level 2 starts after 30000 level-1 steps). The table gives the
update at its k-th step divided by the learning rate, measured with keras.optimizers.Adam
(defaults) and, beside it, the closed form
``(1 - b1**k) / (1 - b1**(N + k)) / sqrt((1 - b2**k) / (1 - b2**(N + k)))``. A fresh Adam steps
``lr`` exactly for a constant gradient. Writes benchmarks/results/stage_optimizer.json.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tfreg.io import atomic_path  # noqa: E402

LR = 1e-3
STEPS = (1, 2, 5, 10)


def measured(before: int) -> list[float]:
    """Updates (in units of LR) of parameter `b` at its steps 1..max(STEPS), after `before`
    steps of an Adam that updated only parameter `a` (before = 0: a fresh Adam)."""
    a = keras.Variable(np.zeros(()), dtype="float32")
    b = keras.Variable(np.zeros(()), dtype="float32")
    adam = keras.optimizers.Adam(learning_rate=LR)
    adam.build([a, b])
    one = np.ones((), "float32")
    for _ in range(before):
        adam.apply([one], [a])
    out = []
    for _ in range(max(STEPS)):
        old = float(b.numpy())
        adam.apply([one, one], [a, b])
        out.append((old - float(b.numpy())) / LR)
    return out


def closed_form(before: int, k: int) -> float:
    t = before + k
    return (1 - 0.9**k) / (1 - 0.9**t) / math.sqrt((1 - 0.999**k) / (1 - 0.999**t))


def main() -> None:
    rows = []
    for before, label in ((0, "fresh Adam per stage"), (2000, "shared Adam, after 2000 steps"),
                          (30000, "shared Adam, after 30000 steps (LapIRN level 1)")):
        sim = measured(min(before, 2000)) if before <= 2000 else None
        for k in STEPS:
            rows.append({"setting": label, "steps_before": before, "step": k,
                         "measured_update_over_lr": None if sim is None else round(sim[k - 1], 4),
                         "closed_form_update_over_lr": round(closed_form(before, k), 4)})
    print(f"{'setting':<50}{'step':>5}{'measured/lr':>13}{'closed form/lr':>16}")
    for row in rows:
        m = row["measured_update_over_lr"]
        print(f"{row['setting']:<50}{row['step']:>5}{'-' if m is None else f'{m:.3f}':>13}"
              f"{row['closed_form_update_over_lr']:>16.3f}")
    out = Path(__file__).resolve().parent / "results" / "stage_optimizer.json"
    out.parent.mkdir(exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps({"learning_rate": LR, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
