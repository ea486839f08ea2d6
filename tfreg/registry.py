"""Method plugins: the `Method` spec and discovery through the ``tfreg.methods`` entry points.

A method is one frozen `Method` object, exposed by a distribution in its packaging metadata::

    [options.entry_points]
    tfreg.methods =
        toy = tfreg_toy:METHOD

tfreg's own methods are declared the same way. `discover()` loads each entry point in its own
``try``: a plugin that fails to import or does not meet the spec is recorded in
`Registry.failures` with a one-line reason, and the other methods keep working. A name declared
by two distributions is recorded as a failure naming both.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from tfreg.config import did_you_mean, get_dotted, load_yaml, method_defaults
from tfreg.errors import ConfigError, MethodError

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

__all__ = ["ENTRY_POINT_GROUP", "API_VERSION", "SUPPORTED_API_VERSIONS", "Stage", "Method",
           "LoadedMethod", "Registry", "discover"]

#: Entry-point group that method plugins declare.
ENTRY_POINT_GROUP = "tfreg.methods"
#: Version of the `Method` spec this tfreg writes its plugins against.
API_VERSION = 1
#: `Method.api_version` values this tfreg can run.
SUPPORTED_API_VERSIONS = frozenset({1})

#: ``LossFn(batch, outputs, stage) -> {term name: weighted scalar}``; the engine minimises the sum.
LossFn = Callable[[dict, dict, "Stage"], dict]


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
    """

    name: str
    steps: int
    outputs: tuple[str, ...] | None = None
    learning_rate: float | None = None
    frozen: tuple[str, ...] = ()
    freeze_steps: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Stage.name must be a non-empty string. Received: name={self.name!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"Stage.steps must be an int >= 0. Received: steps={self.steps!r}")
        if not isinstance(self.freeze_steps, int) or self.freeze_steps < 0:
            raise ValueError("Stage.freeze_steps must be an int >= 0. "
                             f"Received: freeze_steps={self.freeze_steps!r}")
        if self.outputs is not None:
            object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "frozen", tuple(self.frozen))


@dataclass(frozen=True)
class Method:
    """A registration method, as exposed by a plugin's ``tfreg.methods`` entry point.

    Args:
        name: the method's name; must equal the entry-point name.
        summary: one-line description shown by ``tfreg methods``.
        default_config: the method's default YAML. A relative path is looked up beside the
            plugin's module, then among the configs shipped with tfreg (`tfreg_configs`);
            after discovery it is an absolute path.
        build_model: ``(config, inshape) -> keras.Model``; `inshape` is the spatial shape.
            Dict inputs ``{"moving", "fixed"}`` ``(B, *S, 1)``; dict outputs including
            ``"warped"`` ``(B, *S, 1)`` and ``"disp"`` ``(B, *S, N)`` (voxels, fixed grid,
            pull: ``warped(x) = moving(x + disp(x))``).
        build_loss: ``(config) -> LossFn``, where ``LossFn(batch, outputs, stage)`` returns
            named, already weighted scalar terms.
        stages: ``(config) -> Sequence[Stage]``; None = one stage (see `resolve_stages`).
        data_pipeline: the method's own ``tf.data`` pipeline, called like
            `tfreg.data.make_dataset`: ``(spec, split=, batch_size=, seed=, shuffle=, repeat=,
            input_context=) -> tf.data.Dataset`` of dict batches; None = `make_dataset`.
        needs_divisible_by: the spatial shape must divide by this.
        api_version: version of this spec the plugin was written for.
    """

    name: str
    summary: str
    default_config: str | Path
    build_model: Callable[[dict, tuple[int, ...]], "keras.Model"]
    build_loss: Callable[[dict], LossFn]
    stages: Callable[[dict], Sequence[Stage]] | None = None
    data_pipeline: Callable[..., "tf.data.Dataset"] | None = None
    needs_divisible_by: int = 1
    api_version: int = API_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"Method.name must be a non-empty string. Received: name={self.name!r}")
        if not isinstance(self.summary, str) or not self.summary.strip() or "\n" in self.summary:
            raise ValueError("Method.summary must be one non-empty line. "
                             f"Received: summary={self.summary!r}")
        if not isinstance(self.default_config, (str, Path)):
            raise ValueError("Method.default_config must be a path. "
                             f"Received: default_config={self.default_config!r}")
        for attr in ("build_model", "build_loss"):
            if not callable(getattr(self, attr)):
                raise ValueError(f"Method.{attr} must be callable. "
                                 f"Received: {attr}={getattr(self, attr)!r}")
        for attr in ("stages", "data_pipeline"):
            value = getattr(self, attr)
            if value is not None and not callable(value):
                raise ValueError(f"Method.{attr} must be callable or None. "
                                 f"Received: {attr}={value!r}")
        if (not isinstance(self.needs_divisible_by, int) or isinstance(self.needs_divisible_by, bool)
                or self.needs_divisible_by < 1):
            raise ValueError("Method.needs_divisible_by must be an int >= 1. "
                             f"Received: needs_divisible_by={self.needs_divisible_by!r}")

    def load_defaults(self) -> dict:
        """The method's default YAML as a dict (`ConfigError` naming the file)."""
        return load_yaml(self.default_config)

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
    path = Path(method.default_config)
    if path.is_absolute():
        return path if path.is_file() else None
    candidates = []
    module_dir = _module_dir(ep)
    if module_dir is not None:
        candidates.append(module_dir / path)
    try:
        from tfreg_configs import config_path
        candidates.append(config_path(str(path)))
    except ImportError:
        pass
    return next((c for c in candidates if c.is_file()), None)


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
        raise _SpecError(f"default config '{obj.default_config}' not found")
    method = dataclasses.replace(obj, default_config=found)
    try:
        method_defaults(method)
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
