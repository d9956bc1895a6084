"""Reward registry: built-in names, `@register_reward`, `module.path:name` references, and recipe terms.

A recipe's `rewards:` list holds RewardTerms. A term's `name` is a registered reward ("math", ...) or a
reference "module.path:attr" to a RewardFunction subclass (built with `params`) or to a plain function
`fn(completion, example, **params)`. The module is searched for in the recipe's directory, the working
directory and the Python path.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from posttrain.config import RewardTerm
from posttrain.errors import RecipeError
from posttrain.imports import import_object
from posttrain.registry import Registry
from posttrain.typed import build_dataclass
from posttrain.rewards.base import FunctionReward, RewardFunction

REWARDS = Registry("reward", RewardFunction, "or give your own as 'module.path:function' or "
                                               "'module.path:RewardClass'")
register_reward = REWARDS.register


def _import_reference(ref: str, search_dirs: Iterable[Path]) -> Union[type[RewardFunction], Callable[..., Any]]:
    target = import_object(ref, search_dirs, f"reward {ref!r}")
    if isinstance(target, type) and not issubclass(target, RewardFunction):
        raise RecipeError(f"reward {ref!r} is a class but not a subclass of posttrain.rewards.RewardFunction.")
    if not callable(target):
        raise RecipeError(f"reward {ref!r} is a {type(target).__name__}, not a function or RewardFunction class.")
    return target


def get_reward(name: str, search_dirs: Iterable[Path] = ()) -> Union[type[RewardFunction], Callable[..., Any]]:
    """The RewardFunction class or user function a term's name refers to."""
    if ":" in name:
        return _import_reference(name, search_dirs)
    return REWARDS.get(name)


def build_reward_function(term: RewardTerm, index: int = 0, search_dirs: Iterable[Path] = ()) -> RewardFunction:
    """The RewardFunction of one term, its params checked (unknown keys, types, the reward's own rules)."""
    target = get_reward(term.name, search_dirs)
    where = f"rewards[{index}] ({term.name})"
    params = term.params or {}
    if isinstance(target, type):
        built = build_dataclass(target.Params, params, where=f"rewards[{index}].params ({term.name})")
        try:
            return target(built)
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"{where}: {exc}") from None
    try:
        inspect.signature(target).bind("completion", "example", **params)
    except TypeError as exc:
        raise RecipeError(f"{where}: the function cannot be called as fn(completion, example"
                          f"{''.join(', ' + k + '=...' for k in params)}): {exc}. A function reward takes the "
                          f"completion and the example, and its params as keyword arguments.") from None
    except ValueError:  # no signature to inspect (a builtin): the first call will tell
        pass
    return FunctionReward(target, term.name, dict(params))


def as_reward_term(term: Union[RewardTerm, dict], index: int = 0) -> RewardTerm:
    if isinstance(term, RewardTerm):
        return term
    if isinstance(term, dict):
        return build_dataclass(RewardTerm, term, where=f"rewards[{index}]")
    raise RecipeError(f"rewards[{index}]: expected a mapping with `name` (and `weight`, `params`), got {term!r}.")


def build_reward_functions(terms: Iterable[Union[RewardTerm, dict]],
                           search_dirs: Iterable[Path] = ()) -> tuple[list[RewardTerm], list[RewardFunction]]:
    """Check a recipe's reward terms and build their functions (in this process)."""
    terms = [as_reward_term(t, i) for i, t in enumerate(terms)]
    search_dirs = list(search_dirs)
    if not terms:
        raise RecipeError("rewards: give at least one reward, e.g. `rewards: [{name: math}]`.")
    seen: dict[str, int] = {}
    for i, term in enumerate(terms):
        if isinstance(term.weight, bool) or not isinstance(term.weight, (int, float)) or not math.isfinite(term.weight):
            raise RecipeError(f"rewards[{i}] ({term.name}): weight must be a finite number, got {term.weight!r}.")
        if term.display_name in seen:
            raise RecipeError(f"rewards[{i}]: the name {term.display_name!r} is already used by rewards["
                              f"{seen[term.display_name]}]; give one of them a `label` (its name in the logs).")
        seen[term.display_name] = i
    return terms, [build_reward_function(t, i, search_dirs) for i, t in enumerate(terms)]


def validate_reward_terms(terms: Iterable[Union[RewardTerm, dict]], search_dirs: Iterable[Path] = ()) -> None:
    """Check names, weights and parameters (recipe validation, before any model loads)."""
    build_reward_functions(terms, search_dirs)


def importable_term(term: RewardTerm, function: RewardFunction, index: int) -> RewardTerm:
    """The term with a name a fresh worker process can resolve: a registered reward that its own module
    registered (not posttrain) becomes the reference "module:Class", which the worker imports."""
    if ":" in term.name:
        module = term.name.partition(":")[0]
    elif type(function).__module__.startswith("posttrain.rewards."):
        return term
    else:
        module = type(function).__module__
        term = RewardTerm(f"{module}:{type(function).__qualname__}", term.weight, term.params, term.display_name)
    if module == "__main__":
        raise RecipeError(f"rewards[{index}] ({term.name}) is defined in the script being run (__main__), which "
                          f"reward worker processes cannot import. Move it to a module and reference it as "
                          f"'module:name', or set num_workers: 0.")
    return term
