"""The custom training loop: stages, distributed steps, checkpoints, interruption and logging.

One training step, per replica (`strategy.run`):

1. the stage's sub-model maps the batch's model inputs (`ModelIO.inputs`) to its outputs (cast
   to float32, also under ``mixed_float16``);
2. the method's `LossFn` returns named, already weighted terms, given a `LossContext` with the
   global and in-stage step; their sum, divided by the number of replicas, is the replica's share
   of the global-batch loss;
3. gradients of the trainable, non-frozen variables are summed over replicas, clipped by their
   global norm if asked, and applied by the stage's optimizer (wrapped in a
   `LossScaleOptimizer` under ``mixed_float16``).

Every stage gets a fresh optimizer from the method's factory (`Method.optimizer`), so parameters
that start training in a later stage take the first steps of a fresh optimizer (Adam's bias
correction counts from the stage's first step); a stage with ``keep_optimizer`` continues the
previous one. The learning rate is set from Python before each step from the stage's base rate
and the schedule.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from tfreg.config import dump_yaml
from tfreg.errors import ConfigError, MethodError, TfregError
from tfreg.io import atomic_path
from tfreg.registry import LossContext

from .checkpoint import Checkpointer, RunState
from .logging import (TrainLogger, describe_distribution, distribution, record_distribution,
                      write_versions)
from .strategy import check_global_batch, is_chief, make_strategy

__all__ = ["train", "TrainResult", "TrainingInterrupted", "learning_rate_at", "dtype_policy",
           "check_model", "LR_SCHEDULES", "PRECISIONS"]

#: ``train.lr_schedule`` values.
LR_SCHEDULES = ("constant", "cosine", "exponential")
#: ``train.precision`` values.
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


class TrainingInterrupted(TfregError):
    """Training stopped on SIGINT/SIGTERM (message: what was kept and how to resume).

    Attributes:
        signum: the signal.
        run_dir: the run directory (``tfreg train --resume RUN_DIR`` continues it).
        step: training steps done.
        saved: a checkpoint of `step` was saved (the first signal); False after a second
            SIGINT, which stops at once: the newest earlier checkpoint is kept.
        resumable: the run has a checkpoint to resume from.
    """

    def __init__(self, message: str, signum: int, run_dir: Path | None = None,
                 step: int | None = None, saved: bool = True, resumable: bool = True):
        super().__init__(message)
        self.signum = signum
        self.run_dir, self.step, self.saved, self.resumable = run_dir, step, saved, resumable


@dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
        run_dir: the run directory.
        step: training steps done over all stages.
        finished: True when every stage completed (False never happens without an exception).
        losses: loss terms and ``total`` of the last step.
        history: per step ``{"step", "stage", "total", <terms>..., "lr", "time"}`` for the steps
            run by this call (``time``: seconds since the call started, at the end of the step).
        validation: ``(step, {metric: value})`` at each checkpoint (empty without a validator;
            tfreg's data spec source gives ``{"dice": mean val Dice}``).
        model: the trained Keras model (all outputs).
        strategy: the `tf.distribute.Strategy` used.
    """

    run_dir: Path
    step: int
    finished: bool
    losses: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    validation: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    model: keras.Model | None = None
    strategy: Any = None


def learning_rate_at(train_cfg: dict, base: float, step: int, total: int) -> float:
    """Learning rate at `step` of a stage of `total` steps with base rate `base`.

    ``constant``: `base`; ``cosine``: ``base * (1 + cos(pi * step / total)) / 2``;
    ``exponential``: ``base * lr_decay_rate ** (step / lr_decay_steps)``.
    """
    schedule = train_cfg.get("lr_schedule", "constant")
    if schedule == "constant":
        return float(base)
    if schedule == "cosine":
        return float(base) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    if schedule == "exponential":
        rate = float(train_cfg["lr_decay_rate"])
        return float(base) * rate ** (step / float(train_cfg["lr_decay_steps"]))
    raise ConfigError(f"train.lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, "
                      f"got '{schedule}'")


def _check_train_config(tcfg: dict) -> None:
    """One-line `ConfigError` for values the engine cannot use."""
    def positive_int(key: str, allow_zero: bool = False) -> None:
        value = tcfg.get(key)
        low = 0 if allow_zero else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"train.{key}: expected an integer >= {low}, got {value!r}")

    def positive_number(key: str, nullable: bool = False) -> None:
        value = tcfg.get(key)
        if nullable and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"train.{key}: expected a number > 0, got {value!r}")

    for key in ("batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "image_every",
                "steps_per_epoch", "lr_decay_steps"):
        positive_int(key)
    positive_int("steps", allow_zero=True)
    if tcfg.get("epochs") is not None:
        positive_int("epochs", allow_zero=True)
    for key in ("learning_rate", "lr_decay_rate"):
        positive_number(key)
    positive_number("clip_norm", nullable=True)
    if tcfg.get("lr_schedule") not in LR_SCHEDULES:
        raise ConfigError(f"train.lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, "
                          f"got {tcfg.get('lr_schedule')!r}")
    if tcfg.get("precision") not in PRECISIONS:
        raise ConfigError(f"train.precision: expected one of {', '.join(PRECISIONS)}, "
                          f"got {tcfg.get('precision')!r}")


class _StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps (so a checkpoint is
    never taken in the middle of an update); a second SIGINT raises `KeyboardInterrupt`."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


@contextmanager
def dtype_policy(name: str):
    """Temporarily set the global Keras dtype policy (layers keep the policy they were built
    with), e.g. ``"mixed_float16"`` for training or ``"float32"`` for export."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _submodel(model: keras.Model, outputs: tuple[str, ...] | None) -> keras.Model:
    """A model computing only `outputs` of `model`, sharing its layers and weights."""
    if outputs is None:
        return model
    structure = getattr(model, "output", None)
    if not isinstance(structure, dict):
        raise ConfigError(f"stage outputs {list(outputs)}: the model has no named outputs")
    missing = [name for name in outputs if name not in structure]
    if missing:
        raise ConfigError(f"stage outputs: '{missing[0]}' is not a model output "
                          f"(outputs: {', '.join(structure)})")
    return keras.Model(model.input, {name: structure[name] for name in outputs},
                       name=f"{model.name}_stage")


def _stage_model(model: keras.Model, stage: Any, strategy: tf.distribute.Strategy,
                 precision: str, input_names: tuple[str, ...]
                 ) -> tuple[keras.Model, tuple[str, ...]]:
    """The model `stage` trains (sharing `model`'s layers) and the batch keys it reads:
    `Stage.training_model` when set (its dict inputs), else `model` restricted to
    `Stage.outputs` reading `input_names`."""
    if stage.training_model is None:
        return _submodel(model, stage.outputs), input_names
    with strategy.scope(), dtype_policy(precision):
        trained = stage.training_model(model)
    if not isinstance(trained, keras.Model) or not isinstance(getattr(trained, "input", None),
                                                              dict):
        raise MethodError(f"stage '{stage.name}': training_model returned "
                          f"{type(trained).__name__}, expected a keras.Model with named (dict) "
                          "inputs")
    known = {id(v) for v in model.trainable_variables}
    new = [v.path for v in trained.trainable_variables if id(v) not in known]
    if new:
        raise MethodError(f"stage '{stage.name}': training_model made new weights ({new[0]}); "
                          "it must reuse the model's layers (new weights are never saved)")
    return trained, tuple(trained.input)


def _check_batch_keys(spec: Any, input_names: tuple[str, ...], batches: str) -> None:
    """Batches (element spec `spec`, described as `batches`) lacking an input of the model they
    feed: one-line `MethodError`."""
    if not isinstance(spec, dict):
        return
    missing = [name for name in input_names if name not in spec]
    if missing:
        raise MethodError(f"{batches} lack the model input '{missing[0]}' (batch keys: "
                          f"{', '.join(spec)})")


def _trainable(model: keras.Model, frozen: tuple[str, ...]) -> list:
    """Trainable variables of `model` whose path does not start with a frozen prefix."""
    return [v for v in model.trainable_variables
            if not any(v.path.startswith(prefix) for prefix in frozen)]


def _to_float32(outputs: dict) -> dict:
    return {k: tf.cast(v, tf.float32) if v.dtype.is_floating else v for k, v in outputs.items()}


def _make_step(strategy: tf.distribute.Strategy, model: keras.Model, variables: list,
               loss_fn: Callable, stage: Any, optimizer: keras.optimizers.Optimizer,
               clip_norm: float | None, mixed: bool, jit_compile: bool,
               input_names: tuple[str, ...]) -> Callable:
    """A `tf.function` ``step(dist_batch, global_step, stage_step)`` running one distributed
    training step and returning the loss terms (with ``"total"``) of the global batch; the two
    steps are int64 scalars handed to the loss in its `LossContext`."""
    replicas = strategy.num_replicas_in_sync

    def forward_backward(batch: dict, global_step: tf.Tensor, stage_step: tf.Tensor
                         ) -> tuple[dict, list]:
        inputs = {name: batch[name] for name in input_names}
        ctx = LossContext(stage=stage, step=global_step, stage_step=stage_step)
        with tf.GradientTape() as tape:
            outputs = _to_float32(model(inputs, training=True))
            terms = {k: tf.cast(v, tf.float32) for k, v in loss_fn(batch, outputs, ctx).items()}
            total = tf.add_n(list(terms.values())) if terms else tf.constant(0.0)
            share = total / replicas
            scaled = optimizer.scale_loss(share) if mixed else share
        grads = tape.gradient(scaled, variables)
        terms = {k: v / replicas for k, v in terms.items()}
        terms["total"] = share
        return terms, grads

    if jit_compile:
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(batch: dict, global_step: tf.Tensor, stage_step: tf.Tensor) -> dict:
        terms, grads = forward_backward(batch, global_step, stage_step)
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        grads = [g for g, _ in pairs]
        used = [v for _, v in pairs]
        if clip_norm and grads:
            ctx = tf.distribute.get_replica_context()
            if replicas > 1:  # clip the norm of the summed gradient, not each replica's share
                grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            scale = optimizer.dynamic_scale if mixed else 1.0
            grads = [g / scale for g in grads]
            grads, _ = tf.clip_by_global_norm(grads, clip_norm)
            # the optimizer sums over replicas again: hand it each replica's share
            grads = [g * (scale / replicas) for g in grads]
        if grads:
            optimizer.apply(grads, used)
        return terms

    @tf.function
    def step(dist_batch: Any, global_step: tf.Tensor, stage_step: tf.Tensor) -> dict:
        per_replica = strategy.run(replica_step, args=(dist_batch, global_step, stage_step))
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                for k, v in per_replica.items()}

    return step


def _field_layers(tensor: Any) -> list:
    """The layers that compute a symbolic Keras tensor back to (and including) the nearest
    layers with trainable weights on every path (the field's heads), looking inside nested
    functional models: the layers whose precision the field's values depend on directly."""
    found, seen = [], set()
    stack = [tensor]
    while stack:
        history = getattr(stack.pop(), "_keras_history", None)
        if not history:
            continue
        operation, node_index, tensor_index = history
        if isinstance(operation, keras.Model):  # nested functional model: its output's producer
            outputs = tf.nest.flatten(operation.output)
            stack.append(outputs[tensor_index] if tensor_index < len(outputs) else outputs[0])
            continue
        if id(operation) in seen or isinstance(operation, keras.layers.InputLayer):
            continue
        seen.add(id(operation))
        found.append(operation)
        if getattr(operation, "trainable_weights", None):
            continue  # a head: what comes before it is features, not the field
        nodes = getattr(operation, "_inbound_nodes", [])
        if node_index < len(nodes):
            stack.extend(tf.nest.flatten(nodes[node_index].input_tensors))
    return found


def check_model(model: keras.Model, method: Any, precision: str) -> None:
    """Refuse a model that does not match its method's `ModelIO` (one-line `MethodError`).

    Checks: the model's inputs are `io.inputs`; its outputs include `io.warped` and `io.disp`;
    every output declared a field (`io.fields`) is float32, and so is every layer computing it
    from its heads (the nearest layers with trainable weights) on, under ``mixed_float16`` and
    ``mixed_bfloat16`` too: a 20-voxel displacement in bfloat16 is quantised to 1/8 voxel.
    """
    io = method.io
    inputs = model.input if isinstance(model.input, dict) else None
    if inputs is None or set(inputs) != set(io.inputs):
        got = sorted(inputs) if inputs is not None else "unnamed inputs"
        raise MethodError(f"method '{method.name}': the model's inputs are {got}, its ModelIO "
                          f"declares {sorted(io.inputs)} (build a model with dict inputs)")
    outputs = model.output if isinstance(model.output, dict) else None
    if outputs is None:
        raise MethodError(f"method '{method.name}': the model has no named outputs (return a "
                          "dict of outputs)")
    for name in (io.warped, io.disp):
        if name not in outputs:
            raise MethodError(f"method '{method.name}': the model has no output '{name}' "
                              f"(outputs: {', '.join(outputs)})")
    for name, tensor in outputs.items():
        if not io.is_field(name):
            continue
        dtype = str(getattr(tensor.dtype, "name", tensor.dtype))
        low = [layer for layer in _field_layers(tensor)
               if getattr(layer, "compute_dtype", "float32") != "float32"]
        if dtype != "float32" or low:
            what = dtype if dtype != "float32" else \
                f"{low[0].compute_dtype} by layer '{low[0].name}'"
            raise MethodError(f"method '{method.name}': output '{name}' is a field but is "
                              f"computed in {what} under train.precision {precision}; fields "
                              "must stay float32 (give that layer dtype='float32')")


def _inshape(dataset_fn: Callable, source: Any, data: Any, io: Any) -> tuple[int, ...]:
    """Spatial input shape: the data source's, else the first model input's in the element spec.

    Raises:
        MethodError: the batches lack a model input.
        ConfigError: the shape cannot be told.
    """
    element = dataset_fn(None).element_spec
    _check_batch_keys(element, io.inputs, "the data batches")
    if source.inshape is not None:
        return tuple(int(s) for s in source.inshape(data))
    shape = tuple(element[io.inputs[0]].shape[1:-1])
    if all(isinstance(s, int) for s in shape) and shape:
        return shape
    raise ConfigError("data: the pipeline does not give a fixed spatial shape")


def _dataset_function(source: Any, data: Any, config: dict, global_batch: int,
                      seed: int) -> Callable:
    """``input_context -> tf.data.Dataset`` of per-replica training batches from the method's
    data source."""

    def dataset_fn(input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
        batch = (input_context.get_per_replica_batch_size(global_batch)
                 if input_context is not None else global_batch)
        return source.dataset(data, config, split="train", batch_size=batch, seed=seed,
                              shuffle=True, repeat=True, input_context=input_context)

    return dataset_fn


def _first_replica(value: Any, strategy: tf.distribute.Strategy) -> Any:
    """The local batch of the first replica of a distributed value."""
    return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], value)


def _save_final_model(model: keras.Model, run_dir: Path, log: TrainLogger) -> None:
    """``model.weights.h5`` and ``model.keras``, each written atomically."""
    with atomic_path(run_dir / "model.weights.h5") as tmp:
        model.save_weights(str(tmp))
    try:
        with atomic_path(run_dir / "model.keras") as tmp:
            model.save(str(tmp))
    except Exception as err:  # noqa: BLE001 - the weights suffice for export; say why
        log.message(f"warning: model.keras not written ({type(err).__name__}: {err}); "
                    "model.weights.h5 holds the trained weights")


def onednn_hint() -> str | None:
    """A one-line hint when CPU training runs without TensorFlow's oneDNN kernels although the
    user did not turn them off: TensorFlow was imported before tfreg (`tfreg/__init__.py` turns
    them on), and 3D convolutions then train 2-3x slower on AVX2 CPUs. None otherwise."""
    from tfreg.ops.convolution import onednn_enabled

    if (onednn_enabled() or os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip() == "0"
            or tf.config.list_logical_devices("GPU")):
        return None
    return ("note: TensorFlow's oneDNN CPU kernels are off because TensorFlow was imported "
            "before tfreg; import tfreg first or set TF_ENABLE_ONEDNN_OPTS=1 (3D convolutions "
            "train 2-3x faster)")


def train(method: Any, config: dict, data: Any, run_dir: str | Path, *,
          devices: list[str] | None = None, resume: bool = False,
          strategy: tf.distribute.Strategy | None = None, verbose: int = 1,
          fast_dev_run: int | None = None) -> TrainResult:
    """Train `method` on `data` with a resolved `config`, writing everything into `run_dir`.

    Args:
        method: a `tfreg.registry.LoadedMethod` (or `Method`).
        config: resolved config (``train:`` section as `tfreg.config.TRAIN_DEFAULTS`).
        data: what the method's data source opened from ``--data``
            (``method.data_source.open``), e.g. a `tfreg.data.DataSpec`.
        run_dir: run directory; created if needed.
        devices: ``["cpu:0", "cpu:1"]``, ``["gpu:0", ...]`` or None (one device); ignored when
            `strategy` is given. With ``TF_CONFIG`` set, multi-worker training.
        resume: continue from the newest checkpoint of `run_dir`.
        strategy: an existing `tf.distribute.Strategy` to use instead of `devices`.
        verbose: 1 shows a progress bar, 0 nothing.
        fast_dev_run: a smoke run: `fast_dev_run` steps of every stage (whatever its configured
            steps), validation once at the end, no periodic checkpoints; the run directory is
            complete (exportable).

    Returns:
        `TrainResult`.

    Raises:
        ConfigError: invalid ``train:`` values, batch not divisible by the replicas, or a run
            directory that already has checkpoints without `resume`.
        MethodError: a model that does not match the method's `ModelIO` (inputs, outputs,
            float32 fields); a stage's `training_model` with new weights or whose inputs its
            batches lack.
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was saved first.
    """
    loaded = method
    method = getattr(loaded, "method", loaded)
    source = method.data_source
    io = method.io
    run_dir = Path(run_dir).resolve()
    tcfg = config["train"]
    _check_train_config(tcfg)
    method.check_config(config)
    if fast_dev_run is not None and (isinstance(fast_dev_run, bool) or fast_dev_run < 1):
        raise ConfigError(f"--fast-dev-run: expected an integer >= 1, got {fast_dev_run!r}")
    strategy = strategy or make_strategy(devices)
    chief = is_chief(strategy)
    global_batch = int(tcfg["batch_size"])
    check_global_batch(global_batch, strategy)
    stages = method.resolve_stages(config)
    if fast_dev_run is not None:
        import dataclasses

        stages = [dataclasses.replace(s, steps=int(fast_dev_run),
                                      freeze_steps=min(s.freeze_steps, int(fast_dev_run)))
                  for s in stages]

    state = RunState.load(run_dir) if resume else None
    if not resume and (run_dir / "checkpoints" / "checkpoint").exists():
        raise ConfigError(f"{run_dir}: already holds checkpoints; resume it (--resume) or "
                          "choose another output folder")

    seed = int(tcfg["seed"])
    keras.utils.set_random_seed(seed)
    if tcfg["deterministic"]:
        tf.config.experimental.enable_op_determinism()
    precision = tcfg["precision"]
    mixed = precision == "mixed_float16"  # float16 needs loss scaling; bfloat16 does not
    # a resumed run sees other data than the first attempt: shift the pipeline seed
    data_seed = seed + (state.step if state else 0)
    dataset_fn = _dataset_function(source, data, config, global_batch, data_seed)
    inshape = _inshape(dataset_fn, source, data, io)

    with strategy.scope():
        with dtype_policy(precision):
            model = method.build_model(config, inshape)
        loss_fn = method.build_loss(config)
    check_model(model, method, precision)

    def make_optimizer(index: int) -> keras.optimizers.Optimizer:
        """A fresh optimizer for stage `index` (from the first stage of its keep_optimizer run)."""
        root = index
        while root > 0 and stages[root].keep_optimizer:
            root -= 1
        with strategy.scope():
            optimizer = method.optimizer(config, stages[root])
            if not isinstance(optimizer, keras.optimizers.Optimizer):
                raise MethodError(f"method '{method.name}': optimizer() returned "
                                  f"{type(optimizer).__name__}, expected a "
                                  "keras.optimizers.Optimizer")
            if mixed:
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(model.trainable_variables)
        return optimizer

    run_dir.mkdir(parents=True, exist_ok=True)  # only once the model and loss could be built
    ckpt = Checkpointer(run_dir, model, None, keep=tcfg["keep_checkpoints"], chief=chief)

    step, stage_index, stage_step = 0, 0, 0
    optimizer = None
    if resume:
        counters = ckpt.counters()
        if counters is not None:
            step, stage_index, stage_step = counters
            if stage_index < len(stages):  # the checkpoint holds this stage's optimizer
                optimizer = make_optimizer(stage_index)
                ckpt.set_optimizer(optimizer)
            ckpt.restore()

    if chief:
        dump_yaml(config, run_dir / "config.yaml")
        write_versions(run_dir, loaded if hasattr(loaded, "method") else None)
    log = TrainLogger(run_dir / "logs", enabled=chief, verbose=verbose)
    placement = distribution(strategy, global_batch)
    if chief:
        record_distribution(run_dir, placement, step)
    log.message(describe_distribution(placement))
    hint = onednn_hint()
    if hint:
        log.message(hint)
    names = [s.name for s in stages]
    preprocessing = source.preprocessing(data) if source.preprocessing is not None else None
    run_state = RunState(step=step, stage=stage_index, stage_step=stage_step,
                         stages=names, inshape=list(inshape),
                         stage_name=names[stage_index] if stage_index < len(stages) else "",
                         checkpoint=state.checkpoint if state else None,
                         preprocessing=preprocessing)
    remaining = sum(max(s.steps - (stage_step if i == stage_index else 0), 0)
                    for i, s in enumerate(stages) if i >= stage_index)
    if resume and remaining == 0:
        log.message(f"{run_dir}: training already complete at step {step}")

    last_saved = step if resume and ckpt.latest else -1
    history: list[dict[str, float]] = []
    last_terms: dict[str, float] = {}

    validator = None
    if chief and source.validation is not None:
        validator = source.validation(data, config, io)
    validation: list[tuple[int, dict[str, float]]] = []

    def run_validation() -> None:
        metrics = {k: float(v) for k, v in validator(model).items()}
        validation.append((step, metrics))
        for key, value in metrics.items():
            log.value(f"val/{key}", value, step)

    def save(stage_i: int, stage_s: int, validate: bool = True) -> None:
        nonlocal last_saved
        if step == last_saved:
            return
        path = ckpt.save(step, stage_i, stage_s)
        last_saved = step
        if chief:
            run_state.step, run_state.stage, run_state.stage_step = step, stage_i, stage_s
            run_state.stage_name = names[stage_i] if stage_i < len(names) else ""
            run_state.checkpoint = path
            run_state.save(run_dir)
        if validator is not None and validate and fast_dev_run is None:
            run_validation()

    checkpoint_every = tcfg["checkpoint_every"] if fast_dev_run is None else 2**62
    iterator = None
    started = time.perf_counter()
    try:
        with _StopRequest() as stop:
            for index, stage in enumerate(stages):
                if index < stage_index:
                    continue
                start = stage_step if index == stage_index else 0
                if start >= stage.steps:
                    continue
                if optimizer is None or index != stage_index or start == 0:
                    if not (stage.keep_optimizer and optimizer is not None):
                        optimizer = make_optimizer(index)
                    ckpt.set_optimizer(optimizer)
                stage_index = index
                if stage.prepare is not None:
                    if all(later.prepare is not None for later in stages[index:]):
                        iterator = None   # no later stage reads the opened data's batches
                    # inputs fixed for this stage, computed once from the model trained so far
                    log.message(f"stage '{stage.name}': preparing its data")
                    prepared_at = time.perf_counter()
                    stage_data = stage.prepare(model, data, config)
                    log.message(f"stage '{stage.name}': data prepared in "
                                f"{time.perf_counter() - prepared_at:.1f} s")
                    batches = iter(strategy.distribute_datasets_from_function(
                        _dataset_function(source, stage_data, config, global_batch,
                                          data_seed + index)))
                else:
                    if iterator is None:
                        iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
                    batches = iterator
                sub, input_names = _stage_model(model, stage, strategy, precision, io.inputs)
                _check_batch_keys(getattr(batches, "element_spec", None), input_names,
                                  f"stage '{stage.name}': its batches")
                base_lr = stage.learning_rate if stage.learning_rate is not None \
                    else tcfg["learning_rate"]
                steps_fns: dict[bool, Callable] = {}
                log.start_stage(stage.name, index, len(stages), stage.steps, start, step)
                for s in range(start, stage.steps):
                    frozen = bool(stage.frozen) and s < stage.freeze_steps
                    if frozen not in steps_fns:
                        variables = _trainable(sub, stage.frozen if frozen else ())
                        steps_fns[frozen] = _make_step(
                            strategy, sub, variables, loss_fn, stage, optimizer,
                            tcfg["clip_norm"], mixed, bool(tcfg.get("jit_compile", False)),
                            input_names)
                    lr = learning_rate_at(tcfg, base_lr, s, stage.steps)
                    optimizer.learning_rate = lr
                    batch = next(batches)
                    terms = _run_step(steps_fns[frozen], batch, step, s, precision)
                    step += 1
                    stage_step = s + 1
                    last_terms = terms
                    history.append({"step": step, "stage": index, **terms, "lr": lr,
                                    "time": time.perf_counter() - started})
                    shown = {k: v for k, v in terms.items() if k != "total"}
                    log.update(stage_step, {**shown, "total": terms["total"]})
                    if step % tcfg["log_every"] == 0 or stage_step == stage.steps:
                        log.scalars(step, shown, terms["total"], lr)
                    if chief and step % tcfg["image_every"] == 0:
                        _log_images(log, model, _first_replica(batch, strategy), step, io)
                    if step % checkpoint_every == 0:
                        save(index, stage_step)
                    if stop.signum is not None:
                        save(index, stage_step, validate=False)
                        raise _interrupted(stop.signum, run_dir, step)
                # a stage boundary is a resume point; a resumed run that finds stage_step ==
                # stage.steps moves on to the next stage (or extends the last one if its steps grew)
                save(index, stage.steps)
    except KeyboardInterrupt:
        log.flush()
        raise TrainingInterrupted(
            f"interrupted twice at step {step}: stopped without saving; the newest checkpoint "
            f"in {run_dir / 'checkpoints'} is kept", signal.SIGINT, run_dir, step, saved=False,
            resumable=last_saved >= 0) from None
    finally:
        log.flush()
        if not chief:
            ckpt.close()

    if validator is not None and fast_dev_run is not None:
        run_validation()
    if chief:
        _save_final_model(model, run_dir, log)
        run_state.step, run_state.finished = step, True
        run_state.save(run_dir)
        log.message(f"finished: {step} steps ({time.perf_counter() - started:.1f} s in this call)")
    log.close()
    return TrainResult(run_dir=run_dir, step=step, finished=True, losses=last_terms,
                       history=history, validation=validation, model=model,
                       strategy=strategy)


def _run_step(step_fn: Callable, batch: Any, step: int, stage_step: int, precision: str
              ) -> dict[str, float]:
    """One step; a missing reduced-precision kernel becomes a one-line `ConfigError`."""
    try:
        terms = step_fn(batch, tf.constant(step, tf.int64), tf.constant(stage_step, tf.int64))
        return {k: float(v) for k, v in terms.items()}
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as err:
        text = str(err)
        if precision == "float32" or "No OpKernel was registered" not in text:
            raise
        op = text.split("support Op '", 1)[-1].split("'", 1)[0]
        half = "float16" if precision == "mixed_float16" else "bfloat16"
        raise ConfigError(f"train.precision: {precision}: TensorFlow has no {half} kernel for "
                          f"'{op}' on this device; use float32"
                          + (" or mixed_bfloat16 (CPU)" if half == "float16" else "")
                          + " or train on a GPU") from None


def _interrupted(signum: int, run_dir: Path, step: int) -> TrainingInterrupted:
    name = signal.Signals(signum).name
    return TrainingInterrupted(
        f"{name}: training stopped at step {step}, checkpoint saved; continue with: "
        f"tfreg train --resume {run_dir}", signum, run_dir, step)


def _log_images(log: TrainLogger, model: keras.Model, batch: dict, step: int, io: Any) -> None:
    """Mid slices of fixed, moving and warped of the first sample of `batch` (when the batch
    holds ``fixed`` and ``moving`` images and the model's inputs)."""
    if any(key not in batch for key in ("fixed", "moving", *io.inputs)):
        return   # e.g. a stage's prepared batches (`Stage.prepare`)
    inputs = {name: batch[name][:1] for name in io.inputs}
    outputs = model(inputs, training=False)
    images = {"fixed": batch["fixed"][:1].numpy(), "moving": batch["moving"][:1].numpy()}
    if io.warped in outputs:
        images["warped"] = tf.cast(outputs[io.warped], tf.float32).numpy()
    log.images(step, images)
