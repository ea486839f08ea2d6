"""One vocabulary for invalid settings, and declared config sections.

Every message about a bad value reads ``<source>: <key>: expected <what>, got <value>`` (plus
``(did you mean 'x'?)`` for names), built here. A method declares each of its own config
sections (``model:``, ``loss:``...) once, as a dataclass whose fields carry their checks::

    @dataclass(frozen=True)
    class Loss:
        image: str = choice("mse", ("mse", "ncc"))
        smooth_weight: float | None = number(None, low=0.0, nullable=True)
        ncc_window: int = integer(9, low=1)

    Method(..., sections={"loss": Loss})

`check_section` validates a resolved section against it (after the YAML layer has checked keys and
types) and returns the typed instance; the core calls it for every declared section before any
work starts. Renamed keys stay accepted for one release through ``Method.renamed`` with a one-line
deprecation hint (`rename_keys`).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from tfreg.errors import ConfigError

__all__ = ["show", "did_you_mean", "expected", "number", "integer", "choice", "flag",
           "integers", "value", "check_section", "section_defaults", "rename_keys"]


# ------------------------------------------------------------------------------------ messages
def show(value: Any) -> str:
    """A value as written in YAML, for messages (``null``, ``true``, ``'text'``, ``0.5``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest option, or ``""``."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def expected(source: str, key: str, what: str, got: Any) -> ConfigError:
    """``ConfigError("<source>: <key>: expected <what>, got <value>")``."""
    prefix = f"{source}: " if source else ""
    return ConfigError(f"{prefix}{key}: expected {what}, got {show(got)}")


# -------------------------------------------------------------------------------- declarations
@dataclasses.dataclass(frozen=True)
class _Check:
    kind: str                                  # number | integer | choice | flag | integers | any
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    options: tuple = ()
    nullable: bool = False

    def describe(self) -> str:
        if self.kind == "choice":
            what = "one of " + ", ".join(str(o) for o in self.options)
        elif self.kind == "flag":
            what = "true or false"
        elif self.kind == "integers":
            what = "a non-empty list of integers" + self._range()
        elif self.kind == "any":
            what = "any value"
        else:
            what = ("an integer" if self.kind == "integer" else "a number") + self._range()
        return f"null or {what}" if self.nullable else what

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            return f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f" <= {self.high:g}"
        return ""

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable or self.kind == "any"
        if self.kind == "any":
            return True
        if self.kind == "flag":
            return isinstance(value, bool)
        if self.kind == "choice":
            return value in self.options
        if self.kind == "integers":
            return (isinstance(value, (list, tuple)) and len(value) > 0
                    and all(self._scalar_ok(v, integer=True) for v in value))
        return self._scalar_ok(value, integer=self.kind == "integer")

    def _scalar_ok(self, value: Any, integer: bool) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if integer and not isinstance(value, int):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value <= self.high


def _field(default: Any, check: _Check, help: str) -> Any:
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default),
                                 metadata={"check": check, "help": help})
    return dataclasses.field(default=default, metadata={"check": check, "help": help})


def number(default: float | None, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, nullable: bool = False, help: str = "") -> Any:
    """A number field (ints accepted), optionally bounded: ``[low, high]`` or ``(low, high]``."""
    return _field(default, _Check("number", low, high, low_open, (), nullable), help)


def integer(default: int | None, *, low: int | None = None, high: int | None = None,
            nullable: bool = False, help: str = "") -> Any:
    """An integer field, optionally bounded (inclusive)."""
    return _field(default, _Check("integer", low, high, False, (), nullable), help)


def choice(default: Any, options: Iterable[Any], *, nullable: bool = False,
           help: str = "") -> Any:
    """A field taking one of `options`."""
    return _field(default, _Check("choice", options=tuple(options), nullable=nullable), help)


def flag(default: bool, *, help: str = "") -> Any:
    """A true/false field."""
    return _field(default, _Check("flag"), help)


def integers(default: list[int] | None, *, low: int | None = None, nullable: bool = False,
             help: str = "") -> Any:
    """A non-empty list of integers, each >= `low`."""
    return _field(default, _Check("integers", low, None, False, (), nullable), help)


def value(default: Any, *, help: str = "") -> Any:
    """A field the section does not check (e.g. a value checked where it is used)."""
    return _field(default, _Check("any"), help)


# ---------------------------------------------------------------------------------- checking
def _fields(schema: type) -> tuple[dataclasses.Field, ...]:
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise TypeError(f"a config section must be declared as a dataclass, got {schema!r}")
    return dataclasses.fields(schema)


def section_defaults(schema: type) -> dict[str, Any]:
    """The declared defaults of a section as a plain dict."""
    return dataclasses.asdict(schema())


def check_section(schema: type, values: Mapping[str, Any] | None, section: str,
                  source: str = "config") -> Any:
    """Validate a resolved config section against its declaration.

    Args:
        schema: the section's dataclass (fields from `number`, `integer`, `choice`...).
        values: the section's values (missing keys take the declared defaults).
        section: its name in messages, e.g. ``"loss"``.
        source: the config's name in messages.

    Returns:
        An instance of `schema`.

    Raises:
        ConfigError: ``"<source>: <section>.<key>: expected <what>, got <value>"``, or an
            unknown key (with did-you-mean).
    """
    values = dict(values or {})
    names = [f.name for f in _fields(schema)]
    for key in values:
        if key not in names:
            raise ConfigError(f"{source}: {section}.{key}: unknown key"
                              f"{did_you_mean(key, names)}")
    kwargs = {}
    for f in _fields(schema):
        if f.name not in values:
            continue
        check = f.metadata.get("check")
        got = values[f.name]
        if check is not None and not check.accepts(got):
            raise expected(source, f"{section}.{f.name}", check.describe(), got)
        kwargs[f.name] = got
    return schema(**kwargs)


def rename_keys(tree: Mapping[str, Any] | None, renamed: Mapping[str, str], source: str,
                notes: list[str] | None = None) -> Any:
    """`tree` (a nested config, or flat ``--set`` overrides with dotted keys) with deprecated
    keys moved to their new names; the input is not changed.

    Args:
        tree: a config file's content or `tfreg.config.Overrides`.
        renamed: old dotted key -> new dotted key (e.g. ``{"loss.lambda": "loss.smooth_weight"}``).
        source: the file, for the hint (a ``--set`` names itself).
        notes: receives one line per renamed key, e.g.
            ``"--set loss.lambda=1: loss.lambda is deprecated, use loss.smooth_weight"``.

    Raises:
        ConfigError: both the old and the new name are given.
    """
    if tree is None or not renamed:
        return tree
    out = _copy(tree)
    sources = getattr(out, "sources", None)
    for old, new in renamed.items():
        if old in out:  # flat overrides
            where = sources.get(old, source) if sources is not None else source
            if new in out:
                raise ConfigError(f"{where}: {old}: renamed to {new}; give only {new}")
            out[new] = out.pop(old)
            if sources is not None:
                sources[new] = sources.pop(old, where)
        else:
            found, val = _pop(out, old)
            if not found:
                continue
            where = source
            if _has(out, new):
                raise ConfigError(f"{where}: {old}: renamed to {new}; give only {new}")
            _put(out, new, val)
        if notes is not None:
            notes.append(f"{where}: {old} is deprecated, use {new}")
    return out


def _copy(tree: Mapping[str, Any]) -> Any:
    if hasattr(tree, "sources"):
        out = type(tree)()
        out.sources = dict(tree.sources)
    else:
        out = {}
    for key, val in tree.items():
        out[key] = _copy(val) if isinstance(val, Mapping) else val
    return out


def _pop(tree: dict, dotted: str) -> tuple[bool, Any]:
    *parents, leaf = dotted.split(".")
    level: Any = tree
    for part in parents:
        level = level.get(part) if isinstance(level, Mapping) else None
        if level is None:
            return False, None
    if isinstance(level, dict) and leaf in level:
        return True, level.pop(leaf)
    return False, None


def _has(tree: Mapping, dotted: str) -> bool:
    level: Any = tree
    for part in dotted.split("."):
        if not isinstance(level, Mapping) or part not in level:
            return False
        level = level[part]
    return True


def _put(tree: dict, dotted: str, val: Any) -> None:
    *parents, leaf = dotted.split(".")
    level = tree
    for part in parents:
        level = level.setdefault(part, {})
    level[leaf] = val
