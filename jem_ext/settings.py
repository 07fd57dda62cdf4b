"""Typed settings: each setting is a field of a frozen dataclass that owns its name, type,
default, range or choices, help text and flag.

A *group* is a frozen dataclass whose fields are declared with :func:`setting`; its docstring's
first line is not used, its ``GROUP`` class attribute names the ``--help`` section. From the
groups come, without a second list anywhere:

* the command line: :func:`add_flags` adds each setting as an argparse flag (same ``dest``,
  default, choices and help text);
* the flat dict of a config file (``dest`` -> value): :func:`flat_values` and
  :func:`group_from_flat`;
* the checks of a value read from a file or given to a library call: :func:`value_problem`
  (type, then range or choices, then the setting's own ``check``).

A setting's ``dest`` (the key in the flat dict and the argparse name) defaults to the field
name; its flag to ``--`` + ``dest`` with dashes. This module imports nothing above it: the
trainer's and the evaluation's groups build on it, and the shared ones (the chain, the speed
options) sit beside it at the package's top level.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ._cli import finite_float

__all__ = [
    "Range",
    "Spec",
    "add_flags",
    "flat_values",
    "group_from_flat",
    "int_list",
    "setting",
    "specs",
    "value_problem",
]

KINDS = ("int", "float", "str", "bool", "int_list", "str_list")


@dataclass(frozen=True)
class Range:
    """Accepted values of a numeric setting: ``lo <= v <= hi`` (``<`` where open)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, v: float) -> bool:
        return (self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)) and (
            self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        )

    def __str__(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return " and ".join(parts)


POSITIVE, NON_NEGATIVE, FRACTION = Range(1), Range(0), Range(0, 1)
GREATER_THAN_ZERO = Range(0, lo_open=True)


def int_list(text: str) -> list[int]:
    """An argparse type: integers separated by commas or spaces ("" is the empty list)."""
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None


@dataclass(frozen=True)
class Spec:
    """What a setting is (kept in its field's metadata; see :func:`setting`).

    Attributes:
        dest: the key in the flat dict and the argparse ``dest``.
        kind: one of :data:`KINDS`.
        default: the default value.
        help: the ``--help`` text, or a callable giving it (text built from a registry).
        flags: the option strings (default ``--`` + ``dest`` with dashes).
        choices: the accepted values, or a callable giving them (a registry read late).
        range: the accepted range of a number (each element's, for a list).
        negated: a bool flag that stores False (``--no-x`` for ``x``).
        metavar: argparse's metavar.
        check: ``check(value)`` -> why the value is refused, or None (e.g. a registry lookup).
        path: a path, stored absolute.
        required: a flag that must be given (its default is None).

    A ``str_list`` setting is a repeatable flag: each use adds one string (default: none).
    """

    dest: str
    kind: str
    default: Any
    help: str | Callable[[], str]
    flags: tuple[str, ...] = ()
    choices: tuple[Any, ...] | Callable[[], tuple[Any, ...]] | None = None
    range: Range | None = None
    negated: bool = False
    metavar: str | None = None
    check: Callable[[Any], str | None] | None = None
    path: bool = False
    required: bool = False

    def option_strings(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.dest.replace("_", "-"),)

    def allowed(self) -> tuple[Any, ...] | None:
        return self.choices() if callable(self.choices) else self.choices

    def help_text(self) -> str:
        return self.help() if callable(self.help) else self.help


def setting(
    default: Any,
    help: str | Callable[[], str],
    *,
    kind: str | None = None,
    dest: str = "",
    **spec: Any,
) -> Any:
    """A dataclass field that is a setting (see :class:`Spec` for the keywords).

    ``kind`` defaults from the default's type (bool, int, float, list -> int_list); a setting
    whose default is None or a string, or a ``str_list``, names it.
    """
    if kind is None:
        kind = {bool: "bool", int: "int", float: "float", list: "int_list"}.get(type(default), "")
    if kind not in KINDS:
        raise ValueError(f"setting with default {default!r}: name its kind ({', '.join(KINDS)})")
    meta = {"dest": dest, "kind": kind, "default": default, "help": help, **spec}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata={"setting": meta})
    return dataclasses.field(default=default, metadata={"setting": meta})


def specs(group: type) -> Iterator[tuple[str, Spec]]:
    """``(field name, Spec)`` of each setting of a group class, in declaration order."""
    for f in dataclasses.fields(group):
        meta = f.metadata.get("setting")
        if meta is not None:
            yield f.name, Spec(**{**meta, "dest": meta["dest"] or f.name})


_TYPES: dict[str, Any] = {
    "int": int,
    "float": finite_float,
    "str": None,
    "int_list": int_list,
    "str_list": None,
}


def add_flags(parser: argparse.ArgumentParser, group: type, suppress_defaults: bool) -> None:
    """Add a group's settings to ``parser`` as one ``--help`` section (``group.GROUP``).

    Args:
        suppress_defaults: leave the defaults out (a parse then holds only the flags given).
    """
    section = parser.add_argument_group(group.GROUP)
    for _, s in specs(group):
        kw: dict[str, Any] = {"dest": s.dest, "help": s.help_text()}
        if not suppress_defaults:
            kw["default"] = list(s.default) if isinstance(s.default, list) else s.default
        if s.required:
            kw["required"] = True
        if s.kind == "bool":
            kw["action"] = "store_false" if s.negated else "store_true"
        else:
            if s.kind == "str_list":
                kw["action"] = "append"
            if _TYPES[s.kind] is not None:
                kw["type"] = _TYPES[s.kind]
            if s.choices is not None:
                kw["choices"] = s.allowed()
            if s.metavar is not None:
                kw["metavar"] = s.metavar
        section.add_argument(*s.option_strings(), **kw)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_problem(s: Spec, value: Any) -> str | None:
    if value is None:
        return None if s.default is None else "expected a value, got null"
    choices = s.allowed()
    if choices is not None:
        return None if value in choices else f"expected one of {', '.join(choices)}, got {value!r}"
    if s.kind == "bool":
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if s.kind == "int_list":
        ok = isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)
        return None if ok else f"expected a list of integers, got {value!r}"
    if s.kind == "str_list":
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return None if ok else f"expected a list of strings, got {value!r}"
    if s.kind == "int":
        return None if _is_int(value) else f"expected an integer, got {value!r}"
    if s.kind == "float":
        if not (_is_int(value) or isinstance(value, float)):
            return f"expected a number, got {value!r}"
        return None if math.isfinite(value) else f"expected a finite number, got {value!r}"
    return None if isinstance(value, str) else f"expected a string, got {value!r}"


def _range_problem(s: Spec, value: Any) -> str | None:
    if s.range is None or value is None:
        return None
    many = isinstance(value, (list, tuple))
    for v in value if many else [value]:
        if not s.range.contains(v):
            shown = list(value) if many else value
            return f"expected {'values ' if many else 'a value '}{s.range}, got {shown!r}"
    return None


def value_problem(s: Spec, value: Any, types_only: bool = False) -> str | None:
    """Why ``value`` is not a valid value of the setting (type, range, own check), or None."""
    problem = _type_problem(s, value)
    if problem is not None or types_only:
        return problem
    problem = _range_problem(s, value)
    if problem is None and s.check is not None and value is not None:
        problem = s.check(value)
    return problem


def group_from_flat(group: type, flat: dict[str, Any]) -> Any:
    """An instance of ``group`` from a flat dict holding every one of its ``dest`` keys (lists
    become tuples: a group is immutable). Values are taken as they are: check them first."""
    values = {}
    for name, s in specs(group):
        v = flat[s.dest]
        values[name] = tuple(v) if isinstance(v, list) else v
    return group(**values)


def flat_values(group: Any) -> dict[str, Any]:
    """The flat dict (``dest`` -> value, tuples as lists) of a group instance."""
    out = {}
    for name, s in specs(type(group)):
        v = getattr(group, name)
        out[s.dest] = list(v) if isinstance(v, tuple) else v
    return out
