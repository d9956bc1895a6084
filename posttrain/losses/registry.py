"""Loss registry: built-in names, `@register_loss`, and `module.path:ClassName` references."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable

import torch

from posttrain.errors import RecipeError
from posttrain.imports import import_object
from posttrain.losses.base import LossOutput, LossPlugin, PairLossInputs

LOSSES: dict[str, type[LossPlugin]] = {}


def register_loss(name: str):
    """Class decorator: make a LossPlugin subclass available to recipes as `loss: {name: ...}`."""

    def decorate(cls: type[LossPlugin]) -> type[LossPlugin]:
        if name in LOSSES and LOSSES[name] is not cls:
            raise ValueError(f"a loss named {name!r} is already registered ({LOSSES[name].__module__})")
        cls.name = name
        LOSSES[name] = cls
        return cls

    return decorate


def _import_reference(ref: str, search_dirs: Iterable[Path]) -> type[LossPlugin]:
    return import_object(ref, search_dirs, f"loss {ref!r}", LossPlugin)


def get_loss_class(name: str, search_dirs: Iterable[Path] = ()) -> type[LossPlugin]:
    if ":" in name:
        return _import_reference(name, search_dirs)
    if name not in LOSSES:
        hint = difflib.get_close_matches(name, list(LOSSES), n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise RecipeError(f"unknown loss {name!r}.{extra} Registered losses: {', '.join(sorted(LOSSES))}; or give "
                          f"your own as 'module.path:ClassName'.")
    return LOSSES[name]


def build_loss_term(term, index: int = 0, search_dirs: Iterable[Path] = ()) -> LossPlugin:
    from posttrain.config import build_dataclass

    cls = get_loss_class(term.name, search_dirs)
    params = build_dataclass(cls.Params, term.params or {}, where=f"loss[{index}].params ({term.name})")
    try:
        return cls(params)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"loss[{index}] ({term.name}): {exc}") from None


class CombinedLoss(LossPlugin):
    """A weighted sum of loss plug-ins (like TRL's `loss_weights`): sum_i w_i * L_i.

    Each term keeps its own normaliser; metrics keep their names, and each term's value is also
    logged as `loss/<name>`.
    """

    name = "combined"
    level = "mixed"

    def __init__(self, terms: list[tuple[float, LossPlugin]]):
        self.terms = terms
        self.needs_reference = any(plugin.needs_reference for _, plugin in terms)
        kinds = {plugin.data_kind for _, plugin in terms}
        if len(kinds) > 1:
            raise RecipeError(f"losses combined in one recipe must train on the same data kind, got {sorted(kinds)}.")
        self.data_kind = kinds.pop()

    def prepare_pairs(self, pairs: list, tokenizer) -> list:
        for _, plugin in self.terms:
            pairs = plugin.prepare_pairs(pairs, tokenizer)
        return pairs

    def __call__(self, inputs: PairLossInputs) -> LossOutput:
        total = None
        metrics: dict[str, torch.Tensor] = {}
        parts: dict[str, torch.Tensor] = {}
        for weight, plugin in self.terms:
            out = plugin(inputs)
            total = weight * out.loss if total is None else total + weight * out.loss
            metrics.update(out.metrics)
            parts.update(out.parts)
            parts[f"loss/{plugin.name}"] = out.loss.detach()
        return LossOutput(total, metrics, parts)


def build_loss(terms, search_dirs: Iterable[Path] = ()) -> LossPlugin:
    plugins = [(t.weight, build_loss_term(t, i, search_dirs)) for i, t in enumerate(terms)]
    if len(plugins) == 1 and plugins[0][0] == 1.0:
        return plugins[0][1]
    return CombinedLoss(plugins)


def validate_loss_terms(terms, search_dirs: Iterable[Path] = ()) -> None:
    """Check names and parameters (recipe validation, before any model loads)."""
    build_loss(terms, search_dirs)
