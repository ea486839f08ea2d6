"""Training engine: `tf.distribute` strategies, multi-stage schedules, checkpoints and resume,
TensorBoard logging and mixed precision.

Run directory written by `train`::

    config.yaml         resolved config (with ``method:`` and ``data:``)
    versions.yaml       tfreg, TensorFlow, Keras, NumPy, Python and plugin versions
    state.json          step, stage, stage_step, finished, inshape, newest checkpoint
    checkpoints/        tf.train.CheckpointManager: model + optimizer + counters
    logs/               TensorBoard scalars and images
    model.weights.h5    final weights
    model.keras         final Keras model
"""

from .checkpoint import Checkpointer, RunState
from .logging import versions, write_versions
from .loop import (LR_SCHEDULES, PRECISIONS, TrainingInterrupted, TrainResult, check_model,
                   dtype_policy, learning_rate_at, train)
from .strategy import (check_global_batch, configure_devices, is_chief, make_strategy,
                       loopback_tf_configs, multi_worker_config, parse_devices, parse_gpus)

__all__ = [
    "train", "TrainResult", "TrainingInterrupted", "learning_rate_at", "LR_SCHEDULES", "PRECISIONS",
    "make_strategy", "configure_devices", "parse_devices", "parse_gpus", "is_chief",
    "multi_worker_config", "loopback_tf_configs", "check_global_batch", "Checkpointer", "RunState", "dtype_policy",
    "check_model", "versions", "write_versions",
]
