"""Typed values from plain dicts: a recipe section or a plug-in's `Params` built from YAML, with errors
that name the key path and suggest a close match. Knows nothing of posttrain's sections or plug-ins."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Mapping, Optional, Union

from posttrain.errors import RecipeError

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")

def _convert(value: Any, tp: Any, where: str, problems: list[str], hints: Mapping[str, str]) -> Any:
    """`value` as type `tp`. A wrong value raises; the mistakes inside a nested section go to `problems`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:
            return _convert(value, options[0], where, problems, hints)
        errors = []
        for arg in options:
            attempt: list[str] = []
            try:
                result = _convert(value, arg, where, attempt, hints)
            except RecipeError as exc:
                attempt = exc.problems
            if not attempt:
                return result
            errors = attempt
        raise RecipeError(*(errors or [f"{where}: invalid value {value!r}"]))
    if origin is Literal:
        if value not in args:
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}.{extra}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping (section with keys), got {value!r}")
        return _build(tp, value, where, problems, hints)
    if origin is list:
        (item_tp,) = args or (Any,)
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{where}[{i}]", problems, hints) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise RecipeError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `5e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{where}: expected a string, got {value!r}")
    raise RecipeError(f"{where}: unsupported type {_type_name(tp)}")

def build_dataclass(cls: type, values: dict, where: str = "", problems: Optional[list[str]] = None,
                    hints: Optional[Mapping[str, str]] = None) -> Any:
    """Build dataclass `cls` from `values`. Every unknown key (with a close-match hint, or `hints[key]`,
    a sentence for a name the user knows from elsewhere) and every wrong value is found in one pass.
    Without `problems` they are raised together as one RecipeError; with it they are appended there and
    the object is built from the keys that were right, the others keeping their defaults."""
    collected: list[str] = [] if problems is None else problems
    built = _build(cls, values, where, collected, hints or {})
    if problems is None and collected:
        raise RecipeError(*collected)
    return built


def _build(cls: type, values: dict, where: str, problems: list[str], hints: Mapping[str, str]) -> Any:
    types_of = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            extra = f" {hints[key]}" if key in hints else f" Did you mean {close[0]!r}?" if close else ""
            valid = f"Valid keys here: {', '.join(names)}." if names else "No keys are valid here."
            problems.append(f"unknown key {path!r}.{extra} {valid}")
            continue
        try:
            kwargs[key] = _convert(value, types_of[key], path, problems, hints)
        except RecipeError as exc:
            problems.extend(exc.problems)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field left out
        raise RecipeError(f"{where or cls.__name__}: {exc}") from None
