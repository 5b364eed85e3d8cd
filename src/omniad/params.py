"""Hyper-parameters: the one mechanism that resolves presets and validates values, and the help read from
docstrings.

A detector's ``__init__`` stores its arguments as given (scikit-learn's rule). At ``fit`` (and at ``load``) the
base resolves them once: a parameter left at None takes its value from the chosen preset, then from the
method's ``defaults``; then every value is checked against the method's ``constraints``. Out-of-range values are
refused with the parameter's name, never silently clipped.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any


@dataclass(frozen=True)
class Interval:
    """A number between ``low`` and ``high`` (None: unbounded); ``integer`` asks for a whole number."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    allow_none: bool = False

    def check(self, name: str, value: Any) -> Any:
        """``value`` as its one type (int for whole-number intervals: 3.0 -> 3; else float), or ValueError."""
        if value is None and self.allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if self.integer and (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if not (low_ok and high_ok):
            raise ValueError(f"{name} must be in {self.describe()}, got {value!r}")
        return int(value) if self.integer else float(value)

    def describe(self) -> str:
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{low}, {high}{right}"


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values."""

    values: tuple[Any, ...]

    def check(self, name: str, value: Any) -> Any:
        if value not in self.values:
            raise ValueError(f"{name} must be one of {', '.join(repr(v) for v in self.values)}; got {value!r}")
        return value


@dataclass(frozen=True)
class Each:
    """A sequence whose every item meets ``item`` (and that has ``length`` items when given)."""

    item: Interval | Options
    length: int | None = None
    allow_none: bool = False

    def check(self, name: str, value: Any) -> Any:
        """``value`` as a tuple of checked items (lists from JSON or YAML compare equal to tuples)."""
        if value is None and self.allow_none:
            return None
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise ValueError(f"{name} must be a sequence, got {value!r}")
        if self.length is not None and len(value) != self.length:
            raise ValueError(f"{name} must have {self.length} items, got {len(value)}")
        if len(value) == 0:
            raise ValueError(f"{name} must not be empty")
        return tuple(self.item.check(f"{name}[{i}]", v) for i, v in enumerate(value))


@dataclass(frozen=True)
class Either:
    """A value that meets ``first`` or ``second`` (e.g. a side or an (height, width) pair)."""

    first: Interval | Options | Each
    second: Interval | Options | Each

    def check(self, name: str, value: Any) -> Any:
        try:
            return self.first.check(name, value)
        except ValueError as first_error:
            try:
                return self.second.check(name, value)
            except ValueError as second_error:
                raise ValueError(f"{first_error}; or {second_error}") from None


POSITIVE_INT = Interval(1, None, integer=True)
FRACTION = Interval(0.0, 1.0, high_open=True)  # [0, 1)
NON_NEGATIVE = Interval(0.0, None)


def fill_params(
    params: Mapping[str, Any],
    presets: Mapping[str, Mapping[str, Any]],
    defaults: Mapping[str, Any],
    owner: str,
) -> dict[str, Any]:
    """Hyper-parameters with every None filled: from the preset ``params["preset"]`` picks (methods without
    presets pass {}), then from ``defaults`` (e.g. a method's own post-processing)."""
    values = dict(params)
    if presets:
        preset = values.get("preset")
        if preset not in presets:
            raise ValueError(f"{owner}: unknown preset {preset!r}; use one of {', '.join(sorted(presets))}")
        values.update({k: v for k, v in presets[preset].items() if values.get(k) is None})
    values.update({k: v for k, v in defaults.items() if values.get(k) is None})
    return values


def check_params(
    values: Mapping[str, Any], constraints: Mapping[str, Any], owner: str, *, skip_none: bool = False
) -> dict[str, Any]:
    """Refuse any value outside its constraint (``Interval`` / ``Options`` / ``Each``), naming the parameter;
    return the values normalised (sequences as tuples, whole numbers as int). ``skip_none``: leave values still
    None unchecked (a method's ``derive_params`` fills them next)."""
    out = dict(values)
    for name, constraint in constraints.items():
        if name not in values or (skip_none and values[name] is None):
            continue
        try:
            out[name] = constraint.check(name, values[name])
        except ValueError as err:
            raise ValueError(f"{owner}: {err}") from None
    return out


def as_namespace(values: Mapping[str, Any]) -> SimpleNamespace:
    """Resolved values as attributes (``self.resolved_.iterations``)."""
    return SimpleNamespace(**values)


def init_params(cls: type) -> list[inspect.Parameter]:
    """Keyword hyper-parameters of ``__init__`` across the class hierarchy (most derived first, no repeats)."""
    seen: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self" and p.name not in seen:
                seen[p.name] = p
    return list(seen.values())


def docstring_args(doc: str) -> dict[str, str]:
    """Parse a Google-style "Args:" section into {name: description} (continuation lines joined)."""
    out: dict[str, str] = {}
    lines = doc.expandtabs().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return out
    indent = None
    current = None
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        if width == indent and ":" in line:
            name, _, text = line.strip().partition(":")
            current = name.strip().lstrip("*")
            out[current] = text.strip()
        elif current is not None:
            out[current] += " " + line.strip()
    return out


__all__ = [
    "Each",
    "Either",
    "FRACTION",
    "Interval",
    "NON_NEGATIVE",
    "Options",
    "POSITIVE_INT",
    "as_namespace",
    "docstring_args",
    "init_params",
    "check_params",
    "fill_params",
]
