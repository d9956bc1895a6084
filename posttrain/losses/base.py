"""The loss plug-in interface: typed inputs, one output type, and the registry.

A plug-in writes its paper loss and nothing else (docs/custom_losses.md). It declares what it needs
(`needs_reference`), what it trains on (`data_kind`: "pairs" or "groups") and its `level`: a
"sequence" loss returns one value per example [B], a "token" loss one value per token [B, T]. The core
(posttrain.core.unified) aggregates them with the step's global counts, derives the per-token
coefficients c_t = -dL/dlp_t by autograd and backpropagates them through the model. The trainer asks
these questions; it never names a loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from posttrain.core.unified import StepCounts, StepLoss, aggregate
from posttrain.params import WithParams
from posttrain.registry import Registry


@dataclass
class PairLossInputs:
    """Per-token inputs of a pairwise loss for one micro-batch of B pairs.

    Per-token tensors are [B, T], zero where the mask is zero; masks are 1 on completion tokens
    (EOS included) and 0 on prompt and padding. `pair_weight` is 1 for real pairs and 0 for rows
    that only fill a micro-batch (the core gives them no weight). `extras` holds per-pair values
    from the data rows (name -> [B] tensor: any numeric field of the row beside the standard ones).
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor
    pair_weight: torch.Tensor
    ref_chosen_logps: Optional[torch.Tensor] = None
    ref_rejected_logps: Optional[torch.Tensor] = None
    chosen_token_weights: Optional[torch.Tensor] = None
    rejected_token_weights: Optional[torch.Tensor] = None
    extras: dict = field(default_factory=dict)

    LOGPS: ClassVar[tuple[str, ...]] = ("chosen_logps", "rejected_logps")  # what the core differentiates

    @property
    def example_weight(self) -> torch.Tensor:
        return self.pair_weight

    @property
    def token_mask(self) -> torch.Tensor:
        """The tokens a token-level pair loss scores: the chosen (demonstration) response's."""
        return self.chosen_mask


@dataclass
class LossOutput:
    """What a plug-in returns for one micro-batch. `loss`: the paper loss per example [B] (level
    "sequence") or per token [B, T] (level "token"), before any averaging. `metrics`: per-example values
    [B], averaged over the real examples of the step. `parts`: named components shaped like `loss`,
    aggregated like it and logged. `direct`: an optional scalar term outside the completion log-probs,
    already normalised for the step, that the core backpropagates as it is."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    direct: Optional[torch.Tensor] = None


class LossPlugin(WithParams):
    """Base class of every loss. Subclass it, give `Params` (a dataclass of hyperparameters with the
    paper's defaults), `level` and `__call__`, and register it with `@register_loss("name")`, or
    reference it from a recipe as `my_module:MyLoss`."""

    name: ClassVar[str] = ""
    needs_reference: bool = True
    level: str = "sequence"
    data_kind: ClassVar[str] = "pairs"
    needs_sampling_entropy: ClassVar[bool] = False  # groups: per-token entropy of the sampling policy (GTPO)
    # pairs: the row kinds it trains on ("demonstration": SFT data; "unpaired": KTO data; posttrain.data.readers)
    row_kinds: ClassVar[tuple[str, ...]] = ("pair",)

    def prepare_pairs(self, pairs: list, tokenizer) -> list:
        """Called once on the tokenised training and held-out pairs, before training. A loss that needs
        per-token weights (TAB-PO) sets `pair.chosen_weights` / `pair.rejected_weights` here."""
        return pairs

    def __call__(self, inputs) -> LossOutput:
        raise NotImplementedError  # abstractmethod: every plug-in defines it

    def step_loss(self, inputs, counts: StepCounts) -> StepLoss:
        """This micro-batch's share of the step loss, aggregated by `level` with the step's global counts."""
        out = self(inputs)

        def reduce(values: torch.Tensor) -> torch.Tensor:
            return aggregate(values, self.level, inputs.example_weight.to(values.dtype),
                             inputs.token_mask.to(values.dtype), counts)

        return StepLoss(reduce(out.loss), out.metrics, {name: reduce(v) for name, v in out.parts.items()},
                        out.direct)


LOSSES = Registry("loss", LossPlugin, "or give your own as 'module.path:ClassName'")
register_loss = LOSSES.register


def sequence_sums(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """S(y) = sum_t m_t lp_t (spec section 0)."""
    return (logps * mask).sum(-1)


def sequence_means(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A(y) = S(y) / sum_t m_t (spec section 0); 0 for an empty row."""
    return sequence_sums(logps, mask) / mask.sum(-1).clamp(min=1)


def preference_metrics(reward_w: torch.Tensor, reward_l: torch.Tensor, logps_w: torch.Tensor,
                       logps_l: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair metrics under TRL's names: implicit rewards, their margin and reward accuracy (share of
    pairs with r_w > r_l; not ranking accuracy), and the policy's sequence log-probs."""
    reward_w, reward_l = reward_w.detach(), reward_l.detach()
    return {
        "rewards/chosen": reward_w,
        "rewards/rejected": reward_l,
        "rewards/margins": reward_w - reward_l,
        "rewards/accuracies": (reward_w > reward_l).to(reward_w.dtype),
        "logps/chosen": logps_w.detach(),
        "logps/rejected": logps_l.detach(),
    }


def reference_sums(inputs: PairLossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """S_ref(y_w), S_ref(y_l) (detached), or zeros when the loss runs without a reference."""
    if inputs.ref_chosen_logps is None:
        zeros = inputs.chosen_logps.new_zeros(inputs.chosen_logps.shape[0])
        return zeros, zeros
    return (sequence_sums(inputs.ref_chosen_logps, inputs.chosen_mask).detach(),
            sequence_sums(inputs.ref_rejected_logps, inputs.rejected_mask).detach())
