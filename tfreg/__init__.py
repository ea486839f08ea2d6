"""tfreg: learning-based deformable image registration with TensorFlow and Keras 3.

Conventions (see docs/architecture.md): arrays are channels-last ``(batch, *spatial, channels)``;
displacement fields live on the fixed grid, in voxels, channel ``d`` along array axis ``d``, and
follow the pull convention ``warped(x) = moving(x + u(x))``.
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# TensorFlow's oneDNN kernels (convolutions and their gradients, matrix products) are on by
# default only on CPUs with AVX-512 VNNI/BF16 or AMX; on AVX2 machines they are off, and a 3D
# convolution's forward and backward pass take 2-3x longer with the Eigen kernels used instead
# (benchmarks/README.md, "TensorFlow's oneDNN kernels"). The switch is read once, when
# TensorFlow is imported, so it is set here, before any tfreg module imports TensorFlow; a value
# the user set wins (``TF_ENABLE_ONEDNN_OPTS=0`` turns them off).
# `tfreg.ops.convolution.onednn_enabled` reports what the running TensorFlow uses.
if "tensorflow" not in _sys.modules:
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
