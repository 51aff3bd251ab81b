"""A method's options, checked against the types its dataclass declares, and parsed from `NAME=VALUE` text.

`check_options(cls, options)` is what `vtprune.make` runs: unknown names, and values whose type does not match the
field's annotation (`int`, `float`, `bool`, `str`, `tuple[int, ...]`, `X | None`, ...), are refused with one line
naming the option, its type and the value. Ranges are the method's own business (its `__post_init__`).
`parse_options(cls, ["start_layer=16"])` turns command-line text into typed values for the same check.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import types
import typing
from typing import Any, Union

from .errors import VTPruneError


def option_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a method dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}


def type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(kind))
    if origin is tuple:
        args = typing.get_args(kind)
        inner = f"{type_name(args[0])}, ..." if len(args) == 2 and args[1] is Ellipsis else ", ".join(map(type_name, args))
        return f"tuple[{inner}]"
    return "None" if kind is type(None) else getattr(kind, "__name__", str(kind))


def conforms(value: Any, kind: Any) -> bool:
    """Whether `value` is a value of the annotation `kind` (ints count as floats; bools are not numbers)."""
    if kind is Any:
        return True
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        return any(conforms(value, arg) for arg in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(kind)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args))
    if isinstance(kind, type):
        return isinstance(value, kind)
    return True


def check_options(cls: type, options: dict[str, Any], method: str) -> dict[str, Any]:
    """The options with tuple fields given as lists turned into tuples; refuses unknown names and mistyped values."""
    types_ = option_types(cls)
    unknown = sorted(set(options) - set(types_))
    if unknown:
        raise VTPruneError(
            f"method {method!r} has no option {', '.join(unknown)}; its options: {', '.join(sorted(types_))}"
        )
    out = {}
    for name, value in options.items():
        kind = types_[name]
        if isinstance(value, list):
            value = tuple(value)
        if not conforms(value, kind):
            raise VTPruneError(f"{method} option {name}={value!r}: expected {type_name(kind)}")
        out[name] = value
    return out


def parse_value(text: str) -> Any:
    """A Python literal (16, 0.5, True, None, (9, 18), 'x'), else the text itself (a bare word)."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def parse_pairs(pairs: list[str], what: str = "option") -> dict[str, Any]:
    """`["start_layer=16", "scope=sample"]` -> {"start_layer": 16, "scope": "sample"} (values as Python literals)."""
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise VTPruneError(f"{what} {pair!r}: write NAME=VALUE, e.g. start_layer=16")
        options[name.strip()] = parse_value(value)
    return options


def parse_options(cls: type, pairs: list[str], method: str) -> dict[str, Any]:
    """NAME=VALUE pairs parsed and checked against the fields of method class `cls`."""
    return check_options(cls, parse_pairs(pairs), method)


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`fastv:layer=2,scope=sample` -> ("fastv", {"layer": 2, "scope": "sample"}) (names checked when made)."""
    name, _, options = spec.partition(":")
    pairs = split_top_level(options) if options else []
    return name.strip(), parse_pairs(pairs)


def split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: "a=1,b=(9, 18)" -> ["a=1", "b=(9, 18)"]."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]
