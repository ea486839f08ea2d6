"""Method plugins: the method protocol (`Method` and its parts) and discovery through the
``tfreg.methods`` entry points.

A method is one frozen `Method` object, exposed by a distribution in its packaging metadata::

    [options.entry_points]
    tfreg.methods =
        toy = tfreg_toy:METHOD
    tfreg.commands =                      # optional: extra top-level ``tfreg`` commands
        toy-import = tfreg_toy.importer:command

tfreg's own methods are declared the same way and use nothing a third party could not. Every part
of the protocol beyond the model and loss builders is optional; its default is tfreg's standard
behaviour, which a method may also name explicitly (the built-ins do):

=================  ==========================================  ==================================
part               what a method declares                      default
=================  ==========================================  ==================================
``data``           `DataSource`: ``--data`` -> batches,        `tfreg.data.SPEC_DATA` (tfreg's
                   validation, inference preprocessing          data spec, NIfTI pairs)
``io``             `ModelIO`: named inputs, warped/disp         ``("moving", "fixed")`` ->
                   outputs, float32 fields, inference inputs    ``warped``, ``disp``
``stages``         ``(config) -> [Stage]``                      one stage of ``train.steps``
``optimizer``      ``(config, stage) -> keras Optimizer``,      `adam` (fresh per stage)
                   built fresh for every stage
``build_loss``     ``(config) -> LossFn(batch, outputs, ctx)``  (required); ``ctx`` is a
                                                                `LossContext` with the steps
``divisible_by``   int or ``(config) -> int``                   1
``register_hook``  `RegisterHook`: ``tfreg register`` options   none
                   and report entries
=================  ==========================================  ==================================

`discover()` loads each entry point in its own ``try``: a plugin that fails to import or does not
meet the protocol is recorded in `Registry.failures` with a one-line reason, and the other methods
keep working. A name declared by two distributions is recorded as a failure naming both. The
default YAML must sit beside the plugin's module (or be an absolute path); a plugin without it
fails at discovery.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.metadata
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from tfreg.config import did_you_mean, get_dotted, load_yaml, method_defaults
from tfreg.errors import ConfigError, MethodError

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

__all__ = ["ENTRY_POINT_GROUP", "COMMANDS_GROUP", "API_VERSION", "SUPPORTED_API_VERSIONS",
           "Stage", "LossContext", "ModelIO", "DataSource", "RegisterHook", "RegisterReport",
           "Method", "LoadedMethod", "Registry", "discover", "adam", "LossFn", "Validator"]

#: Entry-point group that method plugins declare.
ENTRY_POINT_GROUP = "tfreg.methods"
#: Entry-point group of extra top-level commands (``name = module:click_command``).
COMMANDS_GROUP = "tfreg.commands"
#: Version of the method protocol this tfreg writes its plugins against.
API_VERSION = 2
#: `Method.api_version` values this tfreg can run.
SUPPORTED_API_VERSIONS = frozenset({2})

#: ``LossFn(batch, outputs, ctx: LossContext) -> {term name: weighted scalar}``; the engine
#: minimises the sum.
LossFn = Callable[[dict, dict, "LossContext"], dict]
#: ``Validator(model) -> {metric name: value}``, called at checkpoints (higher is better is not
#: assumed; each metric is logged as ``val/<name>``).
Validator = Callable[["keras.Model"], dict]


@dataclass(frozen=True)
class Stage:
    """One training stage.

    Args:
        name: label of the stage, e.g. ``"level1"``; also used for checkpoints and resuming.
        steps: number of training steps of this stage (>= 0).
        outputs: model outputs computed in this stage (None = all); the engine trains a
            sub-model with these outputs, sharing weights.
        learning_rate: None = the config's ``train.learning_rate``.
        frozen: layer-name prefixes frozen for the first `freeze_steps` steps.
        freeze_steps: number of steps the `frozen` layers stay frozen.
        keep_optimizer: continue with the previous stage's optimizer (its moments and step
            counter) instead of a fresh one from `Method.optimizer`.
        prepare: ``(model, data, config) -> data``, called when the stage starts (and when a
            run resumes inside it) with the model as trained so far, the opened data and the
            resolved config; the stage draws its batches from the returned data (through the
            method's `DataSource.dataset`). For inputs that depend on earlier stages and stay
            fixed in this one: computed once, not in every step. It runs outside the
            distribution strategy's scope, on every worker: read the model, create no
            weights. None = the opened data.
        training_model: ``(model) -> keras.Model``, the model this stage trains, built from
            the method's model and sharing its layers (no new weights); its inputs are a dict
            whose keys are keys of the batch. Exclusive with `outputs`. None = the method's
            model (with `outputs`).
    """

    name: str
    steps: int
    outputs: tuple[str, ...] | None = None
    learning_rate: float | None = None
    frozen: tuple[str, ...] = ()
    freeze_steps: int = 0
    keep_optimizer: bool = False
    prepare: Callable[["keras.Model", Any, dict], Any] | None = None
    training_model: Callable[["keras.Model"], "keras.Model"] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Stage.name must be a non-empty string. Received: name={self.name!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"Stage.steps must be an int >= 0. Received: steps={self.steps!r}")
        if not isinstance(self.freeze_steps, int) or self.freeze_steps < 0:
            raise ValueError("Stage.freeze_steps must be an int >= 0. "
                             f"Received: freeze_steps={self.freeze_steps!r}")
        for name in ("prepare", "training_model"):
            hook = getattr(self, name)
            if hook is not None and not callable(hook):
                raise ValueError(f"Stage.{name} must be callable or None. Received: {hook!r}")
        if self.training_model is not None and self.outputs is not None:
            raise ValueError("Stage.training_model and Stage.outputs are exclusive: the "
                             "training model computes what the stage trains")
        if self.outputs is not None:
            object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "frozen", tuple(self.frozen))


@dataclass(frozen=True)
class LossContext:
    """What a `LossFn` knows about the training progress (third argument of the loss).

    Attributes:
        stage: the current `Stage`.
        step: int64 scalar tensor, the global step index of this update (0 for the first
            update of the run, counting every stage).
        stage_step: int64 scalar tensor, the step index inside the stage (0 first).

    The steps are tensors fed to the compiled step function, so a weight such as
    ``tf.where(ctx.step >= 1000, w, 0.0)`` switches on at step 1000 without retracing.
    """

    stage: Stage
    step: Any
    stage_step: Any


@dataclass(frozen=True)
class ModelIO:
    """Names of the model's inputs and outputs.

    Args:
        inputs: model input names, in the order of the model's input dict; every training batch
            holds them (plus whatever the loss reads).
        warped: the output holding the warped moving image `(B, *S, 1)`.
        disp: the output holding the registration displacement `(B, *S, N)` (voxels, fixed grid,
            pull); what export, validation and ``tfreg register`` use.
        fields: `fnmatch` patterns of outputs that are spatial transforms (displacements,
            velocities, affine matrices): the engine refuses a model that computes them in
            anything but float32 (also under mixed precision).
        inference_inputs: ``(config, fixed, moving) -> {input name: tensor}``, TensorFlow ops
            computing every model input from the two preprocessed images `(B, *S, 1)` float32;
            used by export (it is part of the SavedModel's ``register`` signature) and
            ``tfreg register``. None = ``{"fixed": fixed, "moving": moving}``, which requires
            `inputs` to be exactly those two.
    """

    inputs: tuple[str, ...] = ("moving", "fixed")
    warped: str = "warped"
    disp: str = "disp"
    fields: tuple[str, ...] = ("disp",)
    inference_inputs: Callable[[dict, Any, Any], dict] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "fields", tuple(self.fields))
        if not self.inputs or not all(isinstance(n, str) and n for n in self.inputs):
            raise ValueError(f"ModelIO.inputs must be non-empty names. Received: {self.inputs!r}")
        if self.inference_inputs is None and set(self.inputs) != {"fixed", "moving"}:
            raise ValueError("ModelIO.inference_inputs is needed for inputs other than "
                             f"('moving', 'fixed'). Received: inputs={self.inputs!r}")
        if self.inference_inputs is not None and not callable(self.inference_inputs):
            raise ValueError("ModelIO.inference_inputs must be callable or None.")

    def is_field(self, output: str) -> bool:
        """Whether the output called `output` is declared a field."""
        return any(fnmatch.fnmatchcase(output, p) for p in self.fields)

    def model_inputs(self, config: dict, fixed: Any, moving: Any) -> dict:
        """The model's input dict for a preprocessed `(fixed, moving)` batch (TF tensors)."""
        if self.inference_inputs is None:
            return {"fixed": fixed, "moving": moving}
        inputs = dict(self.inference_inputs(config, fixed, moving))
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise MethodError(f"ModelIO.inference_inputs: no value for model input '{missing[0]}'")
        return {n: inputs[n] for n in self.inputs}


@dataclass(frozen=True)
class DataSource:
    """How a method turns the ``--data`` argument of ``tfreg train`` into training batches.

    Args:
        open: ``(path, config, divisible_by) -> data``: read and fully validate the ``--data``
            file (tfreg's data spec, or the method's own format), refuse a spatial shape that
            does not divide by `divisible_by`, and raise a one-line `tfreg.errors.TfregError`
            naming the file for anything wrong, before training starts. `data` is any object the
            other callables understand.
        dataset: ``(data, config, *, split, batch_size, seed, shuffle, repeat, input_context)
            -> tf.data.Dataset`` of dict batches holding every model input (`ModelIO.inputs`)
            and whatever the loss reads. `batch_size` is per replica; with an `input_context`
            (`tf.distribute.InputContext`) shard by ``input_pipeline_id``.
        inshape: ``(data) -> spatial shape`` of the model. None: taken from the first model
            input of the dataset's element spec.
        preprocessing: ``(data) -> dict | None``: the inference preprocessing record that
            export stores and ``tfreg register`` applies to NIfTI inputs, in the vocabulary of
            `tfreg.data.Preprocessing` (``shape``, ``spacing``, ``fit``, ``threshold``,
            ``normalize``, ``percentiles``). None (or returning None): the model cannot be used
            by ``tfreg register``; it says so.
        validation: ``(data, config, io) -> Validator | None``: metrics at checkpoints (and once
            in a ``--fast-dev-run``). None: no validation.
        describe: one line saying what ``--data`` is for this source (help and messages).
    """

    open: Callable[[Path, dict, int], Any]
    dataset: Callable[..., "tf.data.Dataset"]
    inshape: Callable[[Any], tuple[int, ...]] | None = None
    preprocessing: Callable[[Any], dict | None] | None = None
    validation: Callable[[Any, dict, ModelIO], Validator | None] | None = None
    describe: str = "a data file"

    def __post_init__(self) -> None:
        for attr in ("open", "dataset"):
            if not callable(getattr(self, attr)):
                raise ValueError(f"DataSource.{attr} must be callable. "
                                 f"Received: {attr}={getattr(self, attr)!r}")
        for attr in ("inshape", "preprocessing", "validation"):
            value = getattr(self, attr)
            if value is not None and not callable(value):
                raise ValueError(f"DataSource.{attr} must be callable or None. "
                                 f"Received: {attr}={value!r}")


@dataclass(frozen=True)
class RegisterReport:
    """What a `RegisterHook` adds to one ``tfreg register --model`` run.

    Attributes:
        entries: JSON-safe entries merged into ``report.json``.
        lines: lines printed after the summary.
        maps: per-voxel maps `(*S)` or `(*S, C)` on the model's (preprocessed) fixed grid,
            e.g. an uncertainty map; ``tfreg register`` resamples each onto the fixed image's
            grid (linear) and writes it as ``<name>.nii.gz`` (listed in the report's outputs).
            Names are lower-case letters, digits and ``_``, and not one of register's own.
        affine: the affine part of the model's transform, when it has one: `(N, N+1)` centred
            voxel affine on the model's input grid (preprocessed fixed voxel -> preprocessed
            moving voxel, ``y = A (x - c) + b + c``, ``c = (inshape - 1) / 2``), with
            ``x + disp(x) = Aff(x + w(x))`` for the rest ``w`` of the transform. ``tfreg
            register`` maps it onto the fixed grid and reports it as ``affine`` (voxels) and
            ``affine_world`` (RAS mm, 3D), writes it to ``affine.mat`` and, with ``--itk``, the
            rest as ``itk_warp.nii.gz``. None: no affine part (``affine.mat`` is the identity).
    """

    entries: dict = field(default_factory=dict)
    lines: tuple[str, ...] = ()
    maps: dict = field(default_factory=dict)
    affine: Any = None

    def __post_init__(self) -> None:
        import re

        for name in self.maps:
            if not (isinstance(name, str) and re.fullmatch(r"[a-z][a-z0-9_]*", name)):
                raise ValueError("RegisterReport.maps names must be lower-case identifiers. "
                                 f"Received: {name!r}")


@dataclass(frozen=True)
class RegisterHook:
    """A method's additions to ``tfreg register --model``.

    Args:
        overrides: ``(config, options) -> {dotted key: value}``: how the method's model is
            rebuilt for the register options given (``options`` holds the values of the
            method-dependent options, e.g. ``{"recursions": K}`` for ``--cascades K``). Raise
            `tfreg.errors.ConfigError` naming the option for a model that cannot honour it.
            None: the method takes no such options (giving one is an error).
        report: ``(keras_model, config, inputs, options) -> RegisterReport | None``, called after
            the prediction with the rebuilt float32 Keras model, the model's config as exported
            (before overrides) and its preprocessed input dict (NumPy, batch of one).
    """

    overrides: Callable[[dict, dict], dict] | None = None
    report: Callable[["keras.Model", dict, dict, dict], RegisterReport | None] | None = None


def adam(config: dict, stage: Stage) -> "keras.optimizers.Optimizer":
    """tfreg's default optimizer factory: a fresh ``keras.optimizers.Adam`` (Keras defaults,
    beta_1 0.9, beta_2 0.999, epsilon 1e-7) at the stage's learning rate. The engine sets the
    learning rate before every step (stage rate and ``train.lr_schedule``)."""
    import keras

    rate = stage.learning_rate if stage.learning_rate is not None else \
        get_dotted(config, "train.learning_rate")
    return keras.optimizers.Adam(learning_rate=float(rate))


def _spec_data() -> "DataSource":
    from tfreg.data.source import SPEC_DATA

    return SPEC_DATA


@dataclass(frozen=True)
class Method:
    """A registration method, as exposed by a plugin's ``tfreg.methods`` entry point.

    Args:
        name: the method's name; must equal the entry-point name.
        summary: one-line description shown by ``tfreg methods``.
        default_config: the method's default YAML: a path relative to the plugin's module (it
            ships beside the code, as package data) or absolute; after discovery it is absolute.
        build_model: ``(config, inshape) -> keras.Model``; `inshape` is the spatial shape. Dict
            inputs named as `io.inputs`, dict outputs including `io.warped` `(B, *S, 1)` and
            `io.disp` `(B, *S, N)` (voxels, fixed grid, pull: ``warped(x) = moving(x + disp(x))``).
        build_loss: ``(config) -> LossFn``, where ``LossFn(batch, outputs, ctx)`` returns named,
            already weighted scalar terms; `ctx` is a `LossContext` (stage and step counters).
        stages: ``(config) -> Sequence[Stage]``; None = one stage (see `resolve_stages`).
        data: the `DataSource` reading ``--data``; None = tfreg's data spec
            (`tfreg.data.SPEC_DATA`).
        io: the model's named inputs and outputs (`ModelIO`).
        optimizer: ``(config, stage) -> keras.optimizers.Optimizer``, called at the start of
            every stage (unless the stage has ``keep_optimizer``), so each stage starts with
            fresh moments and step counter. Default `adam`.
        divisible_by: every spatial size of the data must divide by this: an int, or
            ``(config) -> int`` computed from the resolved config (checked before the data).
        register_hook: the method's ``tfreg register --model`` options and report, or None.
        sections: its own config sections declared once, ``{"loss": LossDataclass, ...}``, with
            checks from `tfreg.validation` (`number`, `integer`, `choice`...): the core validates
            them before any work, and their defaults fill keys the YAML leaves out.
        renamed: deprecated key names still accepted, ``{"loss.lambda": "loss.smooth_weight"}``
            (old dotted key -> new); using one prints a one-line deprecation hint.
        api_version: version of the protocol the plugin was written for.
    """

    name: str
    summary: str
    default_config: str | Path
    build_model: Callable[[dict, tuple[int, ...]], "keras.Model"]
    build_loss: Callable[[dict], LossFn]
    stages: Callable[[dict], Sequence[Stage]] | None = None
    data: DataSource | None = None
    io: ModelIO = field(default_factory=ModelIO)
    optimizer: Callable[[dict, Stage], "keras.optimizers.Optimizer"] = adam
    divisible_by: int | Callable[[dict], int] = 1
    register_hook: RegisterHook | None = None
    sections: Mapping[str, type] = field(default_factory=dict)
    renamed: Mapping[str, str] = field(default_factory=dict)
    api_version: int = API_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("Method.name must be a non-empty string. "
                             f"Received: name={self.name!r}")
        if not isinstance(self.summary, str) or not self.summary.strip() or "\n" in self.summary:
            raise ValueError("Method.summary must be one non-empty line. "
                             f"Received: summary={self.summary!r}")
        if not isinstance(self.default_config, (str, Path)):
            raise ValueError("Method.default_config must be a path. "
                             f"Received: default_config={self.default_config!r}")
        for attr in ("build_model", "build_loss", "optimizer"):
            if not callable(getattr(self, attr)):
                raise ValueError(f"Method.{attr} must be callable. "
                                 f"Received: {attr}={getattr(self, attr)!r}")
        if self.stages is not None and not callable(self.stages):
            raise ValueError(f"Method.stages must be callable or None. Received: {self.stages!r}")
        for attr, kind in (("data", DataSource), ("io", ModelIO), ("register_hook", RegisterHook)):
            value = getattr(self, attr)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"Method.{attr} must be a tfreg.registry.{kind.__name__}. "
                                 f"Received: {attr}={value!r}")
        if self.io is None:
            raise ValueError("Method.io must be a tfreg.registry.ModelIO. Received: io=None")
        import dataclasses as _dc

        for section, schema in dict(self.sections).items():
            if section in ("train", "method", "data") or not (
                    isinstance(schema, type) and _dc.is_dataclass(schema)):
                raise ValueError(f"Method.sections must map the method's own section names to "
                                 f"dataclasses. Received: {section!r}: {schema!r}")
        for old, new in dict(self.renamed).items():
            if not (isinstance(old, str) and isinstance(new, str) and "." in old and "." in new):
                raise ValueError("Method.renamed must map dotted keys to dotted keys. "
                                 f"Received: {old!r}: {new!r}")
        div = self.divisible_by
        if not callable(div) and (not isinstance(div, int) or isinstance(div, bool) or div < 1):
            raise ValueError("Method.divisible_by must be an int >= 1 or a callable. "
                             f"Received: divisible_by={div!r}")

    @property
    def data_source(self) -> DataSource:
        """`data`, or tfreg's data spec source when the method declares none."""
        return self.data if self.data is not None else _spec_data()

    def load_defaults(self) -> dict:
        """The method's default YAML as a dict (`ConfigError` naming the file)."""
        return load_yaml(self.default_config)

    def check_config(self, config: dict, source: str = "config") -> dict:
        """Validate the declared `sections` of a resolved config (`tfreg.validation`).

        Returns:
            ``{section: dataclass instance}``.

        Raises:
            ConfigError: ``"<source>: <section>.<key>: expected <what>, got <value>"``.
        """
        from tfreg.validation import check_section

        return {name: check_section(schema, config.get(name), name, source)
                for name, schema in self.sections.items()}

    def divisor(self, config: dict) -> int:
        """The divisibility rule for a resolved config (`divisible_by`), checked to be an int >= 1.

        Raises:
            ConfigError: invalid ``model:`` values the rule reads (raised by the method).
            MethodError: the rule returned something other than an int >= 1.
        """
        value = self.divisible_by(config) if callable(self.divisible_by) else self.divisible_by
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MethodError(f"method '{self.name}': divisible_by returned {value!r}, expected "
                              "an int >= 1")
        return value

    def resolve_stages(self, config: dict) -> list[Stage]:
        """The training stages for a resolved `config`.

        Without `stages`: one ``Stage("train", steps)`` where steps is
        ``train.epochs * train.steps_per_epoch`` if ``train.epochs`` is set, else ``train.steps``.
        """
        if self.stages is not None:
            stages = list(self.stages(config))
            for stage in stages:
                if not isinstance(stage, Stage):
                    raise MethodError(f"method '{self.name}': stages() returned {stage!r}, "
                                      "expected Stage objects")
            names = [stage.name for stage in stages]
            if len(set(names)) != len(names):
                raise MethodError(f"method '{self.name}': stage names repeat: {names}")
            if stages and stages[0].keep_optimizer:
                raise MethodError(f"method '{self.name}': the first stage '{names[0]}' has "
                                  "keep_optimizer but no stage before it")
            return stages
        epochs = get_dotted(config, "train.epochs", None)
        if epochs is not None:
            steps = int(epochs) * int(get_dotted(config, "train.steps_per_epoch"))
        else:
            steps = int(get_dotted(config, "train.steps"))
        return [Stage("train", steps)]


@dataclass(frozen=True)
class LoadedMethod:
    """A discovered method with the distribution that provides it."""

    method: Method
    dist_name: str
    dist_version: str

    @property
    def name(self) -> str:
        return self.method.name


@dataclass(frozen=True)
class Registry:
    """Result of `discover()`.

    Attributes:
        methods: name -> `LoadedMethod` for every method that loaded and passed the checks.
        failures: name -> one-line reason for every method that did not.
    """

    methods: dict[str, LoadedMethod] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        """Sorted names of the working methods."""
        return sorted(self.methods)

    def __contains__(self, name: object) -> bool:
        return name in self.methods

    def get(self, name: str) -> LoadedMethod:
        """The method called `name`.

        Raises:
            MethodError: ``"unknown method 'x' (did you mean 'y'?); available: a, b"``, or
                ``"method 'x' failed to load: <reason>"``.
        """
        if name in self.methods:
            return self.methods[name]
        if name in self.failures:
            raise MethodError(f"method '{name}' failed to load: {self.failures[name]}")
        hint = did_you_mean(name, [*self.methods, *self.failures])
        available = ", ".join(self.names()) or "none"
        raise MethodError(f"unknown method '{name}'{hint}; available: {available}")


def _entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """Entry points of `group` over the installed distributions (one per distribution name)."""
    return list(importlib.metadata.entry_points(group=group))


def _dist_of(ep: Any) -> tuple[str, str]:
    """(name, version) of the distribution declaring an entry point."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "unknown"
    return str(dist.name or "unknown"), str(dist.version or "unknown")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    message = text[0] if text else ""
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _module_dir(ep: Any) -> Path | None:
    """Folder of the module an entry point refers to (``pkg.mod:ATTR`` -> folder of pkg/mod)."""
    module_name = str(ep.value).split(":")[0].strip()
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    return Path(file).resolve().parent if file else None


def _find_default_config(method: Method, ep: Any) -> Path | None:
    """The default YAML: absolute, or beside the entry point's module (no other place)."""
    path = Path(method.default_config)
    if path.is_absolute():
        return path if path.is_file() else None
    module_dir = _module_dir(ep)
    if module_dir is None:
        return None
    candidate = module_dir / path
    return candidate if candidate.is_file() else None


class _SpecError(Exception):
    """A loaded plugin object does not meet the `Method` spec (message: one-line reason)."""


def _check(obj: Any, ep: Any) -> Method:
    """Validate a loaded entry-point object; raise `_SpecError` with a one-line reason."""
    if not isinstance(obj, Method):
        raise _SpecError(f"{ep.value} is a {type(obj).__name__}, expected a tfreg.registry.Method")
    if obj.api_version not in SUPPORTED_API_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_API_VERSIONS))
        raise _SpecError(f"api_version {obj.api_version!r} is not supported "
                         f"(this tfreg supports {supported})")
    if obj.name != ep.name:
        raise _SpecError(f"entry point '{ep.name}' points to a method named '{obj.name}'")
    found = _find_default_config(obj, ep)
    if found is None:
        where = _module_dir(ep)
        relative = not Path(obj.default_config).is_absolute()
        beside = f" beside {where}" if where is not None and relative else ""
        raise _SpecError(f"default config '{obj.default_config}' not found{beside} (ship it with "
                         "the plugin as package data)")
    method = dataclasses.replace(obj, default_config=found)
    try:
        method.check_config(method_defaults(method), str(found))
    except ConfigError as err:
        raise _SpecError(str(err)) from None
    return method


def _build(entry_points: Iterable[Any]) -> Registry:
    by_name: dict[str, list[Any]] = {}
    for ep in entry_points:
        by_name.setdefault(ep.name, []).append(ep)
    methods: dict[str, LoadedMethod] = {}
    failures: dict[str, str] = {}
    for name in sorted(by_name):
        eps = by_name[name]
        dists = sorted({_dist_of(ep) for ep in eps})
        if len(dists) > 1:
            listed = " and ".join(f"'{n}' {v}" for n, v in dists)
            failures[name] = f"declared by two distributions, {listed}; uninstall one"
            continue
        ep = eps[0]
        try:
            method = _check(ep.load(), ep)
        except _SpecError as err:
            failures[name] = str(err)
            continue
        except Exception as err:  # noqa: BLE001 - any plugin error must not stop the others
            failures[name] = _one_line(err)
            continue
        dist_name, dist_version = dists[0]
        methods[name] = LoadedMethod(method, dist_name, dist_version)
    return Registry(methods, failures)


_CACHE: Registry | None = None


def discover(refresh: bool = False) -> Registry:
    """Load every method declared in the ``tfreg.methods`` entry-point group.

    The result is cached for the process; `refresh=True` discovers again (e.g. after installing a
    plugin at run time, or in tests).
    """
    global _CACHE
    if _CACHE is None or refresh:
        _CACHE = _build(_entry_points(ENTRY_POINT_GROUP))
    return _CACHE
