"""Building a recipe's loss: registered names or `module.path:ClassName`, their params checked, and
weighted sums of several losses."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from posttrain.core.unified import StepCounts, StepLoss
from posttrain.errors import RecipeError
from posttrain.losses.base import LOSSES, LossPlugin


def get_loss_class(name: str, search_dirs: Iterable[Path] = ()) -> type[LossPlugin]:
    return LOSSES.get(name, search_dirs)


def build_loss_term(term, index: int = 0, search_dirs: Iterable[Path] = ()) -> LossPlugin:
    cls = get_loss_class(term.name, search_dirs)
    params = LOSSES.params(cls, term.params, f"loss[{index}].params ({term.name})")
    try:
        return cls(params)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"loss[{index}] ({term.name}): {exc}") from None


class CombinedLoss(LossPlugin):
    """A weighted sum of loss plug-ins (like TRL's `loss_weights`): sum_i w_i * L_i.

    Each term is aggregated at its own level; metrics keep their names, and each term's value is
    also logged as `loss/<name>`.
    """

    name = "combined"

    def __init__(self, terms: list[tuple[float, LossPlugin]]):
        self.terms = terms
        self.needs_reference = any(plugin.needs_reference for _, plugin in terms)
        kinds = {plugin.data_kind for _, plugin in terms}
        if len(kinds) > 1:
            raise RecipeError(f"losses combined in one recipe must train on the same data kind, got {sorted(kinds)}.")
        self.data_kind = kinds.pop()
        self.level = " + ".join(dict.fromkeys(plugin.level for _, plugin in terms))

    def prepare_pairs(self, pairs: list, tokenizer) -> list:
        for _, plugin in self.terms:
            pairs = plugin.prepare_pairs(pairs, tokenizer)
        return pairs

    def step_loss(self, inputs, counts: StepCounts) -> StepLoss:
        total, direct, metrics, parts = 0.0, None, {}, {}
        for weight, plugin in self.terms:
            out = plugin.step_loss(inputs, counts)
            total = total + weight * out.loss
            if out.direct is not None:
                direct = weight * out.direct if direct is None else direct + weight * out.direct
            metrics.update(out.metrics)
            parts.update(out.parts)
            parts[f"loss/{plugin.name}"] = out.loss.detach()
        return StepLoss(total, metrics, parts, direct)


class SharedParamsTerm(LossPlugin):
    """A reference-free, sequence-level term of a built-in combined loss, given its parent's validated
    params (SimPO's, CPO's and ORPO's preference terms)."""

    needs_reference = False
    level = "sequence"

    def __init__(self, params):
        self.params = params


def with_chosen_nll(term: LossPlugin, nll_weight: float) -> list[tuple[float, LossPlugin]]:
    """The terms of `term` + nll_weight * the token mean of -lp over the step's chosen tokens (the `sft` loss)."""
    if not nll_weight:
        return [(1.0, term)]
    sft = get_loss_class("sft")
    return [(1.0, term), (nll_weight, sft(sft.Params(reduction="token_mean_batch")))]


def build_loss(terms, search_dirs: Iterable[Path] = ()) -> LossPlugin:
    if not terms:
        raise RecipeError("loss must name at least one loss (for example `loss: {name: dpo}`); `posttrain losses` "
                          "lists them.")
    plugins = [(t.weight, build_loss_term(t, i, search_dirs)) for i, t in enumerate(terms)]
    if len(plugins) == 1 and plugins[0][0] == 1.0:
        return plugins[0][1]
    return CombinedLoss(plugins)
