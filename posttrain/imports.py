"""Import a user's plug-in given as `module.path:Name` (a loss, a reward, a generation engine)."""

from __future__ import annotations

import difflib
import importlib
import sys
from pathlib import Path
from typing import Iterable, Optional

from posttrain.errors import RecipeError


def import_object(ref: str, search_dirs: Iterable[Path], what: str, base: Optional[type] = None):
    """The attribute `Name` of `module.path`, searched for in `search_dirs` (the recipe's directory), the
    working directory and the Python path. `what` names the recipe entry in errors ("loss 'my:Loss'");
    with `base`, the object must be a subclass of it."""
    module_name, _, attr = ref.partition(":")
    extra = list(dict.fromkeys([str(Path(d).resolve()) for d in search_dirs] + [str(Path.cwd())]))
    for directory in extra:
        if directory not in sys.path:
            sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any error in it is theirs to see
        raise RecipeError(
            f"{what}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}). The module is "
            f"searched for in the recipe's directory, the working directory and the Python path "
            f"({', '.join(extra)}); check the file name and that the module imports on its own."
        ) from None
    obj = getattr(module, attr, None)
    if obj is None:
        hint = difflib.get_close_matches(attr, [n for n in vars(module) if not n.startswith("_")], n=1)
        raise RecipeError(f"{what}: module {module_name!r} has no attribute {attr!r}."
                          f"{f' Did you mean {hint[0]!r}?' if hint else ''}")
    if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
        raise RecipeError(f"{what} is not a subclass of {base.__module__}.{base.__qualname__}.")
    return obj
