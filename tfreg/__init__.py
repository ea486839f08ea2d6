"""tfreg: learning-based deformable image registration with TensorFlow and Keras 3.

Conventions (see docs/architecture.md): arrays are channels-last ``(batch, *spatial, channels)``;
displacement fields live on the fixed grid, in voxels, channel ``d`` along array axis ``d``, and
follow the pull convention ``warped(x) = moving(x + u(x))``.
"""

__version__ = "0.1.0"
