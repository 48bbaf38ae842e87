"""Configuration knobs declared once: a default, bounds and a description on the dataclass field.

``knob(default, ge=..., gt=..., le=..., lt=..., doc=...)`` is a ``dataclasses.field`` whose metadata
holds the bounds and the description; the choices of a knob are its ``Literal`` type. Everything
else comes from that one declaration:

* the core checks a config against it (:func:`check`: the error names ``Class.field`` and the rule);
* the pipeline's params models (:mod:`lmforge.params`) are derived from the same fields
  (:func:`knobs`), and through them the Prefect run form and the errors that name a params key.

Standard library only: the training core uses it where the orchestration stack is not installed.
"""

from __future__ import annotations

import functools
import math
import operator
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

BOUND_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def knob(
    default: Any = MISSING,
    *,
    doc: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with its bounds and description (no default: a required knob)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"doc": doc, "bounds": bounds})


@dataclass(frozen=True)
class Knob:
    """One declared knob: its name, resolved type, default (``MISSING``: required), description, bounds."""

    name: str
    type: Any
    default: Any
    doc: str
    bounds: dict[str, float]


@functools.cache
def knobs(cls: type) -> dict[str, Knob]:
    """The knobs of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: Knob(
            f.name, hints[f.name], f.default, f.metadata.get("doc", ""), dict(f.metadata.get("bounds", {}))
        )
        for f in fields(cls)
    }


def _members(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _fits(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if typing.get_origin(tp) is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # a container or other generic: the config's own checks, if any


def _in_bounds(value: Any, bounds: dict[str, float]) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return True  # None, a choice: bounds are for numbers
    if isinstance(value, float) and math.isnan(value):
        return False
    tests = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}
    return all(tests[name](value, limit) for name, limit in bounds.items())


def rule(k: Knob) -> str:
    """What a knob accepts, in words: "an int >= 1", "a float > 0 and < 1", "one of 'adamw', 'muon'"."""
    parts = []
    for tp in _members(k.type):
        if typing.get_origin(tp) is Literal:
            parts.append("one of " + ", ".join(repr(c) for c in typing.get_args(tp)))
        elif tp is type(None):
            parts.append("None")
        else:
            name = getattr(tp, "__name__", str(tp))
            article = "an" if name[0] in "aeiou" else "a"
            limits = " and ".join(f"{BOUND_SYMBOLS[b]} {v}" for b, v in k.bounds.items())
            parts.append(f"{article} {name}" + (f" {limits}" if limits and tp in (int, float) else ""))
    return " or ".join(parts)


def check(config: Any) -> None:
    """Raise ``ValueError`` naming ``Class.field`` for the first knob outside its type or bounds."""
    cls = type(config)
    for k in knobs(cls).values():
        value = getattr(config, k.name)
        if not any(_fits(value, tp) for tp in _members(k.type)) or not _in_bounds(value, k.bounds):
            raise ValueError(f"{cls.__name__}.{k.name} must be {rule(k)}, got {value!r}")
