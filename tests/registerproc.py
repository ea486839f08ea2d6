"""A small instance-optimisation run in a fresh process, shared by the persistent-cache tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = """
import sys
import numpy as np
from scipy import ndimage
from tfreg import instance, trace_store, xla_cache
xla_cache.enable(sys.argv[1])
if sys.argv[2] != "off":
    trace_store.enable(sys.argv[2])
rng = np.random.default_rng(0)
fixed = ndimage.gaussian_filter(rng.random((48, 48)), 2).astype(np.float32)
moving = np.roll(fixed, 2, axis=0)
cfg = instance.InstanceConfig(levels=(2, 1), iterations=(3, 3), learning_rate=(0.1, 0.1),
                              ncc_win=(3, 3), affine_iterations=2, affine_level=1,
                              min_level_size=4, min_affine_size=4, jit=True,
                              lam=float(sys.argv[3]))
np.save(sys.argv[4], instance.register_arrays(fixed, moving, cfg).disp)
"""


def register_in_process(xla: Path, traces: Path | str, out: Path, lam: float = 1.0
                        ) -> tuple[np.ndarray, str]:
    """Register a 48x48 pair in a fresh Python with the XLA cache in `xla` and the trace store
    in `traces` ("off": none). Returns the displacement and the process's log (TensorFlow's
    cache messages included)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0",
           "TF_CPP_VMODULE": "device_executable_persistor=1"}
    env.pop("TF_XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(xla), str(traces), str(lam),
                           str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out), proc.stderr
