"""Checks of a config dataclass's values, from flags or a YAML file alike: each wrong value is refused in one
sentence that names its flag and what is valid."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

from megasae.errors import SettingError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path",
             type(None): "none"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


class _Wrong(Exception):
    pass


def _coerce(value, hint):
    """`value` as the type `hint` names (a YAML string for a path, a list for a tuple), or _Wrong."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        if value in args:
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg)
            except _Wrong:
                pass
    elif origin is tuple:
        items = (value,) if isinstance(value, str) else value  # `target_modules: layers.3` is one module
        if isinstance(items, (list, tuple)):
            return tuple(_coerce(item, args[0]) for item in items)
    elif hint is type(None):
        if value is None:
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif hint is str:
        if isinstance(value, (str, Path)):  # a field naming a file or a hub id takes a Path from the API
            return str(value)
    elif isinstance(value, hint):
        return value
    raise _Wrong


def check_types(cfg) -> None:
    """Every field of dataclass `cfg` of its annotated type (normalised in place), or a SettingError."""
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        try:
            setattr(cfg, field.name, _coerce(value, hints[field.name]))
        except _Wrong:
            raise SettingError(
                f"{flag(field.name)} must be {_describe(hints[field.name])}, got {value!r}."
            ) from None


def check_at_least(cfg, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        for one in value if isinstance(value, tuple) else (value,):  # a comma list checks each value
            if one is not None and one < minimum:
                raise SettingError(f"{flag(name)} must be at least {minimum}, got {one}.")


def check_outlier_factor(value: float | None) -> None:
    if value is not None and value < 1:
        raise SettingError(
            "--outlier-factor must be at least 1 (a multiple of the median activation norm; none keeps "
            f"every token), got {value}: it would leave out most tokens, or all of them."
        )
