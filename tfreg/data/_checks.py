"""Small validators for data-spec values. Errors: ``<source>: <dotted.key>: <problem>``."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from tfreg.errors import ConfigError

try:  # shared did-you-mean helper of the config module
    from tfreg.config import did_you_mean
except ImportError:  # pragma: no cover - the config module ships with tfreg
    import difflib

    def did_you_mean(name: str, options: Iterable[str]) -> str:
        found = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
        return f" (did you mean '{found[0]}'?)" if found else ""


def fail(source: str, key: str, problem: str) -> ConfigError:
    """A `ConfigError` ``"<source>: <key>: <problem>"`` (to be raised by the caller)."""
    return ConfigError(f"{source}: {key}: {problem}")


def kind(value: Any) -> str:
    """Short description of a value for messages: ``"a list"``, ``"'abc'"``, ``"3.5"``."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "nothing (null)"
    return repr(value)


def check_keys(section: Mapping[str, Any], allowed: Iterable[str], source: str,
               prefix: str = "") -> None:
    """Refuse keys outside `allowed`, with a did-you-mean hint."""
    allowed = list(allowed)
    for key in section:
        if key not in allowed:
            raise fail(source, f"{prefix}{key}", "unknown key" + did_you_mean(str(key), allowed))


def mapping(value: Any, source: str, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise fail(source, key, f"expected a mapping of keys, got {kind(value)}")
    return value


def choice(value: Any, options: Iterable[str], source: str, key: str) -> str:
    options = list(options)
    if not isinstance(value, str) or value not in options:
        hint = did_you_mean(str(value), options) if isinstance(value, str) else ""
        raise fail(source, key, f"expected one of {', '.join(options)}, got {kind(value)}{hint}")
    return value


def number(value: Any, source: str, key: str, *, low: float | None = None,
           high: float | None = None, low_open: bool = False) -> float:
    """A finite number within ``[low, high]`` (``(low, high]`` with `low_open`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(source, key, f"expected a number, got {kind(value)}")
    if low is not None and (value < low or (low_open and value == low)):
        raise fail(source, key, f"expected a number {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise fail(source, key, f"expected a number <= {high}, got {value}")
    return float(value)


def integer(value: Any, source: str, key: str, *, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(source, key, f"expected an integer, got {kind(value)}")
    if low is not None and value < low:
        raise fail(source, key, f"expected an integer >= {low}, got {value}")
    return int(value)


def boolean(value: Any, source: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise fail(source, key, f"expected true or false, got {kind(value)}")
    return value


def int_list(value: Any, source: str, key: str, *, lengths: Iterable[int] = (2, 3),
             low: int = 1) -> tuple[int, ...]:
    lengths = tuple(lengths)
    if not isinstance(value, (list, tuple)) or len(value) not in lengths or any(
            isinstance(v, bool) or not isinstance(v, int) or v < low for v in value):
        sizes = " or ".join(str(n) for n in lengths)
        raise fail(source, key, f"expected a list of {sizes} integers >= {low}, got {kind(value)}"
                   + (f" {list(value)}" if isinstance(value, (list, tuple)) else ""))
    return tuple(int(v) for v in value)


def number_list(value: Any, source: str, key: str, *, lengths: Iterable[int] = (2, 3),
                positive: bool = True) -> tuple[float, ...]:
    lengths = tuple(lengths)
    ok = isinstance(value, (list, tuple)) and len(value) in lengths and all(
        not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        and (v > 0 or not positive) for v in value)
    if not ok:
        sizes = " or ".join(str(n) for n in lengths)
        what = "positive numbers" if positive else "numbers"
        raise fail(source, key, f"expected a list of {sizes} {what}, got {kind(value)}"
                   + (f" {list(value)}" if isinstance(value, (list, tuple)) else ""))
    return tuple(float(v) for v in value)
