"""One registry class for every kind of plug-in: losses, rewards, prompt samplers, generation engines.

A plug-in is named in a recipe by its registered name or as `module.path:ClassName` (imported from the
recipe's directory, the working directory or the Python path). Its hyperparameters are a `Params`
dataclass on the class (the paper's defaults, an optional `validate()`), built from the recipe's
`params` mapping with posttrain.typed, so a typo or a wrong value is a one-paragraph RecipeError that
names the recipe key, before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Iterable, Iterator

from posttrain.errors import RecipeError
from posttrain.imports import import_object
from posttrain.typed import build_dataclass


class Registry:
    """Plug-ins of one kind, by name. `kind` names them in messages ("loss"), `base` is the class every
    plug-in must subclass, `hint` says how to add your own."""

    def __init__(self, kind: str, base: type, hint: str = ""):
        self.kind, self.base, self.hint = kind, base, hint
        self._classes: dict[str, type] = {}

    # a read-only mapping of name -> class
    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __getitem__(self, name: str) -> type:
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def items(self):
        return self._classes.items()

    def pop(self, name: str, default=None):
        """Remove a registration (a test's or an interactive session's own plug-in)."""
        return self._classes.pop(name, default)

    def register(self, name: str):
        """Class decorator: make a `base` subclass available to recipes as `name`."""

        def decorate(cls: type) -> type:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"@register({name!r}) decorates a {self.base.__qualname__} subclass, not {cls!r}")
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"a {self.kind} named {name!r} is already registered "
                                 f"({self._classes[name].__module__})")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorate

    def get(self, name: str, search_dirs: Iterable[Path] = ()) -> type:
        """The class a recipe's name refers to: a registered name or `module.path:ClassName`."""
        if ":" in name:
            return import_object(name, search_dirs, f"{self.kind} {name!r}", self.base)
        if name not in self._classes:
            close = difflib.get_close_matches(name, list(self._classes), n=1)
            extra = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"unknown {self.kind} {name!r}.{extra} Registered {self.kind}s: "
                              f"{', '.join(sorted(self._classes))}"
                              f"{'; ' + self.hint if self.hint else ''}.")
        return self._classes[name]

    def params(self, cls: type, values: dict | None, where: str) -> Any:
        """`cls.Params` built from a recipe's mapping and validated (RecipeError naming `where`)."""
        params_cls = getattr(cls, "Params", None)
        if params_cls is None or not dataclasses.is_dataclass(params_cls):
            if values:
                raise RecipeError(f"{where}: {self.kind} {getattr(cls, 'name', cls.__name__)!r} takes no params, "
                                  f"got {', '.join(map(str, values))}.")
            return None
        params = build_dataclass(params_cls, values or {}, where=where)
        check = getattr(params, "validate", None)
        if callable(check):
            try:
                check()
            except (ValueError, TypeError) as exc:
                raise RecipeError(f"{where}: {exc}") from None
        return params
