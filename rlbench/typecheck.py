"""Typed building: a mapping read from YAML into a dataclass, each value checked against its
field's type hint (nested dataclasses, ``Literal``, unions, lists, tuples, dicts). A bad value
raises ``ConfigError`` naming the dotted field, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from rlbench.errors import ConfigError
from rlbench.registry import did_you_mean


def build_dataclass(
    cls: type, data: Any, path: str, extra: dict[str, Any] | None = None, reserved: tuple[str, ...] = ()
) -> Any:
    """An instance of dataclass ``cls`` from ``data``, every field checked. ``path`` is the
    section's dotted name for messages; ``extra`` are fields built already (plug-in sections);
    ``reserved`` are keys the caller handles, listed among the valid ones."""
    if not isinstance(data, Mapping):
        raise ConfigError(path or "config", data, f"a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs: dict[str, Any] = dict(extra or {})
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in known:
            choices = [*reserved, *known]
            raise ConfigError(
                where,
                value,
                f"unknown field{did_you_mean(str(key), choices)}; "
                f"valid fields{' of ' + path if path else ''}: {', '.join(choices)}",
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, where)  # type: ignore[arg-type]
        else:
            kwargs[key] = check_type(value, tp, where)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(path) from None


def check_type(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to type ``tp`` (a YAML scalar to the field's type), else ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        raise ConfigError(where, value, f"one of {', '.join(repr(a) for a in allowed)}")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return check_type(value, option, where)
            except ConfigError as err:
                errors.append(err.allowed)
        raise ConfigError(where, value, " or ".join(errors + (["null"] if type(None) in options else [])))
    if origin in (tuple, list):
        (item_type, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(where, value, "a list")
        items = [check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, Mapping):
            raise ConfigError(where, value, "a mapping")
        items = value.items()
        return {check_type(k, key_type, where): check_type(v, value_type, f"{where}.{k}") for k, v in items}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(where, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(where, value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(where, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(where, value, "a string")
    raise TypeError(f"unsupported config field type {tp!r} at {where}")


def flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of nested mappings."""
    for key, value in data.items():
        if isinstance(value, Mapping):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
