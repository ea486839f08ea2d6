"""YAML configs: loading, ``--set`` overrides, merging with validation, and atomic saving.

A resolved config is built from three layers, later ones winning:

1. the method's defaults (``method_defaults``: `TRAIN_DEFAULTS` under the method's own YAML),
2. the user's config file (``--config``),
3. ``--set a.b=value`` overrides.

Every key of layers 2 and 3 must exist in layer 1, and its value must have the default's type.
Errors are one line, ``<source>: <dotted.key>: <problem> [(did you mean 'x'?)]``, where the source
is the file or the ``--set`` text.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

import yaml

from tfreg.errors import ConfigError
from tfreg.io import atomic_path

__all__ = [
    "TRAIN_DEFAULTS", "Overrides", "did_you_mean", "load_yaml", "parse_set", "resolve",
    "method_defaults", "dump_yaml", "get_dotted", "set_dotted",
]

#: The engine's ``train:`` section, merged under every method's defaults. A method's YAML may
#: override these values but not add keys to ``train:``.
TRAIN_DEFAULTS: dict[str, Any] = {
    "train": {
        "steps": 1000,             # steps of a single-stage method
        "epochs": None,            # if set: epochs * steps_per_epoch replaces steps
        "steps_per_epoch": 100,
        "batch_size": 1,           # global batch (divides by the replica count)
        "learning_rate": 1.0e-4,
        "lr_schedule": "constant",  # constant | cosine | exponential
        "lr_decay_rate": 0.5,      # exponential: factor per lr_decay_steps
        "lr_decay_steps": 10000,
        "clip_norm": None,         # global-norm gradient clipping
        "seed": 0,
        "deterministic": False,    # tf.config.experimental.enable_op_determinism()
        "precision": "float32",    # float32 | mixed_float16 | mixed_bfloat16
        "checkpoint_every": 500,
        "keep_checkpoints": 3,
        "log_every": 10,           # TensorBoard scalars
        "image_every": 200,        # TensorBoard mid-slice images
        "val_pairs": 4,            # validation pairs scored (Dice) at checkpoints; 0 = off
        "jit_compile": False,      # XLA for forward+backward (slow conv3d gradients on CPU)
    }
}

_MISSING = object()
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")


# --------------------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """Safe YAML loader that refuses duplicate keys and reads ``1e-4`` as a float (YAML 1.2)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<` merge keys are handled by PyYAML
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys are reported by PyYAML
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One-line description of a YAML error, with its line number when known."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    where = f" (line {mark.line + 1})" if mark is not None and "(line" not in problem else ""
    return f"{problem}{where}"


def load_yaml(path: str | Path) -> dict:
    """Read a YAML file whose top level is a mapping (an empty file gives ``{}``).

    Raises:
        ConfigError: ``"<path>: <problem>"`` when the file is missing, unreadable, not valid YAML,
            has a duplicate key, or its top level is not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a YAML file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, "
                          f"got {_kind(data)}")
    return data


def dump_yaml(cfg: Mapping[str, Any], path: str | Path) -> Path:
    """Write `cfg` as YAML atomically (`tfreg.io.atomic_path`).

    Tuples are written as lists; key order is kept. Returns the path.
    """
    path = Path(path)
    text = yaml.safe_dump(_plain(cfg), sort_keys=False, default_flow_style=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _plain(value: Any) -> Any:
    """Convert tuples, Paths and NumPy scalars into plain YAML-safe Python values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # NumPy scalar
        return value.item()
    return value


# ------------------------------------------------------------------------------------ helpers
def did_you_mean(name: str, options: Iterable[str]) -> str:
    """Hint for a misspelt `name`: ``" (did you mean 'x'?)"`` (leading space), or ``""``.

    Example:
    >>> did_you_mean("batchsize", ["batch_size", "steps"])
    " (did you mean 'batch_size'?)"
    """
    matches = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def get_dotted(cfg: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    """Value at dotted `key` (``"train.steps"``); `default` if given and the key is absent.

    Raises:
        KeyError: the key is absent and no `default` was given.
    """
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is _MISSING:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted `key` in `cfg` in place, creating intermediate mappings as needed."""
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


# --------------------------------------------------------------------------------- overrides
class Overrides(dict):
    """``--set`` overrides: flat ``{dotted key: value}`` in command-line order.

    ``sources[key]`` is the ``--set`` text that gave the key; `resolve` names it in errors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sources: dict[str, str] = {}


def parse_set(items: Iterable[str]) -> Overrides:
    """Parse ``["a.b=value", ...]``; each value is read as YAML (``3`` int, ``1e-4`` float,
    ``true`` bool, ``null``, ``[16, 32]`` list, anything else a string).

    A key given twice keeps the last value.

    Raises:
        ConfigError: ``"--set <text>: <problem>"`` for a missing ``=``, a malformed key or a
            value that is not valid YAML.
    """
    result = Overrides()
    for item in items:
        source = f"--set {item}"
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"{source}: expected key=value, e.g. train.steps=100")
        if not _KEY_RE.match(key):
            raise ConfigError(f"{source}: invalid key {key!r}; use dotted names such as "
                              "train.learning_rate")
        try:
            value = yaml.load(text, Loader=_Loader) if text.strip() else None  # noqa: S506
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: {key}: invalid value: {_yaml_problem(err)}") from None
        result.pop(key, None)  # keep command-line order of the last occurrence
        result[key] = value
        result.sources[key] = source
    return result


# ------------------------------------------------------------------------------- validation
def _kind(value: Any) -> str:
    """Readable name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


def _show(value: Any) -> str:
    """Value as written in YAML-ish form for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _expected(default: Any) -> str:
    """What a value must be to replace `default`."""
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, list):
        item = _item_default(default)
        return f"a list of {_plural(item)}" if item is not None else "a list"
    return _kind(default)


def _plural(item_default: Any) -> str:
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}[type(item_default)]


def _item_default(default: list) -> Any:
    """A representative item of a homogeneous default list (ints and floats mixed count as
    numbers), or None when items are not checked (empty, nested or mixed lists)."""
    kinds = {type(v) for v in default}
    if not kinds:
        return None
    if kinds <= {int, float} and float in kinds:
        return 0.0
    if len(kinds) == 1 and next(iter(kinds)) in (bool, int, float, str):
        return default[0]
    return None


def _check_scalar(default: Any, value: Any) -> tuple[bool, Any]:
    """Whether `value` may replace scalar `default`, and the value to store (int -> float)."""
    if isinstance(default, bool):
        return isinstance(value, bool), value
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool), value
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if isinstance(default, str):
        return isinstance(value, str), value
    return True, value


def _find_key(tree: Mapping[str, Any], name: str, prefix: str = "") -> list[str]:
    """Dotted paths of every key called `name` anywhere in `tree`."""
    found = []
    for key, sub in tree.items():
        path = f"{prefix}{key}"
        if key == name:
            found.append(path)
        if isinstance(sub, Mapping):
            found.extend(_find_key(sub, name, f"{path}."))
    return found


def _unknown_key(source: str, dotted: str, level: Mapping[str, Any], root: Mapping[str, Any]
                 ) -> ConfigError:
    name = dotted.rsplit(".", 1)[-1]
    hint = did_you_mean(name, level)
    if not hint:
        elsewhere = [p for p in _find_key(root, name) if p != dotted]
        if len(elsewhere) == 1:
            hint = f" (did you mean '{elsewhere[0]}'?)"
    return ConfigError(f"{source}: {dotted}: unknown key{hint}")


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _check_value(default: Any, value: Any, dotted: str, source: str) -> Any:
    """Check a list or scalar `value` against its non-null, non-mapping `default`."""
    if isinstance(default, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {dotted}: expected {_expected(default)}, "
                              f"got {_show(value)}")
        item_default = _item_default(default)
        out = []
        for index, item in enumerate(value):
            if item_default is not None:
                ok, item = _check_scalar(item_default, item)
                if not ok:
                    raise ConfigError(f"{source}: {dotted}[{index}]: expected "
                                      f"{_expected(item_default)}, got {_show(item)}")
            out.append(copy.deepcopy(item))
        return out
    ok, stored = _check_scalar(default, value)
    if not ok:
        raise ConfigError(f"{source}: {dotted}: expected {_expected(default)}, got {_show(value)}")
    return stored


def _merge_checked(default: Any, current: Any, value: Any, dotted: str, source: str,
                   root: Mapping[str, Any]) -> Any:
    """`value` checked against `default` and merged over `current` (a new object).

    Mappings merge key by key; lists and scalars replace. Below a ``null`` default anything is
    accepted (mappings still merge).
    """
    if default is None:
        if isinstance(current, dict) and isinstance(value, Mapping):
            out = copy.deepcopy(current)
            for key, sub in value.items():
                out[key] = _merge_checked(None, out.get(key), sub, _join(dotted, key), source, root)
            return out
        return copy.deepcopy(value)
    if isinstance(default, dict):
        if value is None:  # an empty section (`model:` with nothing under it) changes nothing
            return copy.deepcopy(current)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {dotted}: expected a mapping, got {_show(value)}")
        out = copy.deepcopy(current) if isinstance(current, dict) else copy.deepcopy(default)
        for key, sub in value.items():
            sub_dotted = _join(dotted, key)
            if key not in default:
                raise _unknown_key(source, sub_dotted, default, root)
            out[key] = _merge_checked(default[key], out.get(key, default[key]), sub, sub_dotted,
                                      source, root)
        return out
    return _check_value(default, value, dotted, source)


def resolve(defaults: Mapping[str, Any], file_cfg: Mapping[str, Any] | None,
            overrides: Mapping[str, Any] | None = None, *, file_source: str | Path = "config",
            override_sources: Mapping[str, str] | None = None,
            renamed: Mapping[str, str] | None = None,
            notes: list[str] | None = None) -> dict[str, Any]:
    """Merge ``defaults < file_cfg < overrides`` with validation against the defaults tree.

    Args:
        defaults: the complete tree of allowed keys with default values (see `method_defaults`).
            A ``null`` default accepts any value; nested mappings are checked key by key.
        file_cfg: the user's config file content (or None). Nested mappings.
        overrides: flat ``{"dotted.key": value}``, e.g. from `parse_set` (or None). A mapping
            value merges into that section.
        file_source: name of the file in messages.
        override_sources: dotted key -> text naming the override in messages; defaults to
            ``overrides.sources`` for `parse_set` results, else ``"overrides"``.
        renamed: deprecated dotted keys -> their new names (a method's ``renamed``); the old
            names are accepted in `file_cfg` and `overrides`.
        notes: receives a one-line deprecation hint per old name used.

    Returns:
        A new nested dict. An int given where the default is a float is stored as a float.

    Raises:
        ConfigError: ``"<source>: <dotted.key>: unknown key (did you mean 'x'?)"`` or
            ``"<source>: <dotted.key>: expected <type>, got <value>"``.
    """
    from tfreg.validation import rename_keys

    defaults = dict(defaults)
    merged: dict[str, Any] = copy.deepcopy(defaults)
    if renamed:
        file_cfg = rename_keys(file_cfg, renamed, str(file_source), notes)
        if overrides and override_sources is not None and not hasattr(overrides, "sources"):
            tagged = Overrides()
            tagged.update(overrides)
            tagged.sources.update(override_sources)
            overrides = tagged
        overrides = rename_keys(overrides, renamed, "overrides", notes)
        if override_sources is not None and hasattr(overrides, "sources"):
            override_sources = dict(overrides.sources)
    if file_cfg is not None:
        merged = _merge_checked(defaults, merged, file_cfg, "", str(file_source), defaults)
    if overrides:
        sources = override_sources if override_sources is not None else \
            getattr(overrides, "sources", {})
        for dotted, value in overrides.items():
            source = sources.get(dotted, "overrides")
            if not isinstance(dotted, str) or not _KEY_RE.match(dotted):
                raise ConfigError(f"{source}: invalid key {dotted!r}")
            nested: dict[str, Any] = {}
            set_dotted(nested, dotted, value)
            merged = _merge_checked(defaults, merged, nested, "", source, defaults)
    return merged


# ---------------------------------------------------------------------------- method defaults
class MethodDefaults(Protocol):
    """What `method_defaults` reads of a `tfreg.registry.Method`."""

    name: str
    default_config: str | Path
    sections: Mapping[str, type]


def method_defaults(method: MethodDefaults) -> dict[str, Any]:
    """Defaults tree of a method: ``method`` (its name), ``data`` (null) and `TRAIN_DEFAULTS`,
    under the method's own YAML (which may change ``train:`` values but not add keys to it).

    Raises:
        ConfigError: the YAML is invalid, sets ``method:`` to another name, or has an unknown or
            mistyped ``train:`` key (the message names the YAML file).
    """
    from tfreg.validation import section_defaults

    path = Path(method.default_config)
    own = load_yaml(path)
    base: dict[str, Any] = {"method": method.name, "data": None, **copy.deepcopy(TRAIN_DEFAULTS)}
    for name, schema in dict(getattr(method, "sections", None) or {}).items():
        base[name] = section_defaults(schema)   # the declaration's defaults; the YAML may change them
    for key, value in own.items():
        if key == "method":
            if value != method.name:
                raise ConfigError(f"{path}: method: expected {method.name!r}, got {_show(value)}")
        elif key in TRAIN_DEFAULTS:
            base[key] = _merge_checked(TRAIN_DEFAULTS[key], base[key], value, key, str(path),
                                       TRAIN_DEFAULTS)
        elif key in base and isinstance(value, Mapping):
            base[key].update(copy.deepcopy(dict(value)))  # checked by Method.check_config
        else:
            base[key] = copy.deepcopy(value)
    return base
