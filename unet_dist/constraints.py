"""What a config value may be, declared once on its field and checked in one pass.

A field says its constraint next to its type with ``typing.Annotated``::

    steps: Annotated[int, Ge(1)] = 400  # total optimiser steps

Why Annotated: ``typing.get_type_hints`` hides the constraint from code that only wants the type
(the loader's type check, the sweep's space check), while :func:`field_constraints` and the
configuration table (scripts/gen_config_doc.py) read it from the same place. Each constraint says
what is wrong with a value (:meth:`problem`, ``None`` when it is fine) and how the docs show it
(``str``). Rules that tie two keys together are :class:`Rule` objects, listed by the schema.

Types (int, float, bool, str, one-of via ``Literal``) are checked as values are read, by
:mod:`unet_dist.config`; the constraints here run after, on values of the right type.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Ge:
    """A number >= ``low``."""

    low: float

    def problem(self, value: Any) -> Optional[str]:
        return None if value >= self.low else f"must be >= {num(self.low)}"

    def __str__(self) -> str:
        return f">= {num(self.low)}"


@dataclass(frozen=True)
class Gt:
    """A number > ``low``."""

    low: float

    def problem(self, value: Any) -> Optional[str]:
        return None if value > self.low else f"must be > {num(self.low)}"

    def __str__(self) -> str:
        return f"> {num(self.low)}"


@dataclass(frozen=True)
class Within:
    """A number in ``[low, high]`` (both ends included)."""

    low: float
    high: float

    def problem(self, value: Any) -> Optional[str]:
        return None if self.low <= value <= self.high else f"must be in [{num(self.low)}, {num(self.high)}]"

    def __str__(self) -> str:
        return f"in [{num(self.low)}, {num(self.high)}]"


@dataclass(frozen=True)
class Equals:
    """The one value the rest of the package supports (``why`` says what fixes it)."""

    value: Any
    why: str

    def problem(self, value: Any) -> Optional[str]:
        return None if value == self.value else f"must be {self.value} ({self.why})"

    def __str__(self) -> str:
        return f"= {self.value} ({self.why})"


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Name:
    """A name that becomes a folder or a run name: letters, digits, ``-``, ``_``, ``.``, not
    starting with ``.``/``-``; ``optional``: the empty string (a documented "use the default")."""

    optional: bool = False

    def problem(self, value: Any) -> Optional[str]:
        if self.optional and value == "":
            return None
        return None if NAME_RE.fullmatch(value) else "must be letters, digits, '-', '_' or '.' (not first)"

    def __str__(self) -> str:
        return ("empty or " if self.optional else "") + "letters, digits, `-` `_` `.`"


@dataclass(frozen=True)
class NotEmpty:
    """A path, URL or name that must be given."""

    def problem(self, value: Any) -> Optional[str]:
        return None if value.strip() else "must not be empty"

    def __str__(self) -> str:
        return "not empty"


@dataclass(frozen=True)
class TrackingUri:
    """An MLflow tracking URI: empty (the default store), a path, or ``scheme://...`` with a scheme
    MLflow has a store for, so ``htp://host`` fails here rather than deep in MLflow."""

    def problem(self, value: Any) -> Optional[str]:
        from unet_dist.tracking_store import uri_problem  # tracking URIs are read in one place

        return uri_problem(value)

    def __str__(self) -> str:
        return "empty, a path, or http(s)://, sqlite:///, postgresql://, ... (MLflow's stores)"


@dataclass(frozen=True)
class Pair:
    """``[height, width]``-like lists: exactly two items, each meeting ``each``; ``ordered``: the
    first <= the second (a range)."""

    each: Any
    ordered: bool = False
    names: tuple[str, str] = ("height", "width")

    def problem(self, value: Any) -> Optional[str]:
        shape = f"must be [{', '.join(self.names)}]"
        if len(value) != 2:
            return f"{shape}, two items"
        bad = [self.each.problem(v) for v in value]
        if any(bad):
            return f"{shape}, each {next(b for b in bad if b).removeprefix('must be ')}"
        if self.ordered and value[0] > value[1]:
            return f"{shape} with {self.names[0]} <= {self.names[1]}"
        return None

    def __str__(self) -> str:
        order = f", {self.names[0]} <= {self.names[1]}" if self.ordered else ""
        return f"[{', '.join(self.names)}], each {self.each}{order}"


@dataclass(frozen=True)
class Rule:
    """A rule over several keys. ``keys[0]`` is the key it is about; an error names the place
    (file or ``--set``) of whichever of ``keys`` was given last, since that is the edit to look at."""

    keys: tuple[str, ...]
    text: str  # what keys[0] must be, for messages and the docs: "<= train.steps"
    holds: Callable[[Any], bool]
    detail: Optional[Callable[[Any], str]] = None  # the bound for this config, when it is computed

    def message(self, cfg: Any) -> str:
        got = ", ".join(f"{k}={value_text(get(cfg, k))}" for k in self.keys)
        detail = f" ({self.detail(cfg)})" if self.detail else ""
        return f"key '{self.keys[0]}' must be {self.text}{detail}, got {got}"


def get(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def num(x: float) -> str:
    """2 not 2.0, 4294967295 not 4.29497e+09, 0.5 as 0.5."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def value_text(value: Any) -> str:
    if isinstance(value, float):
        return num(value)
    return repr(value) if isinstance(value, str) else str(value)


@functools.cache  # a class's annotations do not change; validate() asks for them on every config
def field_constraints(cls: type) -> dict[str, tuple[Any, ...]]:
    """Field name -> the constraints its ``Annotated`` type carries (empty for plain types)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: tuple(m for m in getattr(hints[f.name], "__metadata__", ()) if hasattr(m, "problem"))
            for f in dataclasses.fields(cls)}


def field_problems(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, 'key ... must be ...')`` for every field of the dataclass ``obj`` (and the
    dataclasses inside it) whose value breaks its declared constraint; ``None`` values (of optional
    fields) have nothing to check."""
    out = []
    for name, constraints in field_constraints(type(obj)).items():
        value, key = getattr(obj, name), f"{prefix}{name}"
        if dataclasses.is_dataclass(value):
            out += field_problems(value, key + ".")
            continue
        if value is None:
            continue
        for c in constraints:
            reason = c.problem(value)
            if reason:
                out.append((key, f"key '{key}' {reason}, got {value_text(value)}"))
                break
    return out


