"""The loss plug-in interface: typed inputs, one output type, and a registry.

A plug-in declares what it needs (`needs_reference`), what its normaliser counts (`level`:
"sequence" or "token") and what data it trains on (`data_kind`: "pairs" or "groups"). The trainer
asks these questions; it never names a loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from posttrain.core.unified import Normaliser, policy_gradient_surrogate
from posttrain.params import WithParams


@dataclass
class PairLossInputs:
    """Per-token inputs of a pairwise loss for one micro-batch of B pairs.

    Per-token tensors are [B, T], zero where the mask is zero; masks are 1 on completion tokens
    (EOS included) and 0 on prompt and padding. `pair_weight` is 1 for real pairs and 0 for rows
    that only fill a micro-batch (they must add nothing to the loss or the metrics).
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor
    normaliser: Normaliser
    pair_weight: torch.Tensor
    ref_chosen_logps: Optional[torch.Tensor] = None
    ref_rejected_logps: Optional[torch.Tensor] = None
    chosen_token_weights: Optional[torch.Tensor] = None
    rejected_token_weights: Optional[torch.Tensor] = None
    extras: dict = field(default_factory=dict)


@dataclass
class LossOutput:
    """`loss`: this micro-batch's share of the step loss (globally normalised; its value is the paper
    loss, its gradient may come from the unified core). `metrics`: per-pair values [B] (detached),
    averaged by the trainer over the real pairs of the step. `parts`: further globally normalised
    shares (loss components), summed by the trainer like `loss`."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class LossPlugin(WithParams):
    """Base class of every loss. Subclass it, give `Params` (a dataclass of hyperparameters with the
    paper's defaults) and `__call__`, and register it with `@register_loss("name")`, or reference it
    from a recipe as `my_module:MyLoss`."""

    name: ClassVar[str] = ""
    needs_reference: bool = True
    level: ClassVar[str] = "sequence"
    data_kind: ClassVar[str] = "pairs"
    needs_sampling_entropy: ClassVar[bool] = False  # groups: per-token entropy of the sampling policy (GTPO)


    def prepare_pairs(self, pairs: list, tokenizer) -> list:
        """Called once on the tokenised training and held-out pairs, before training. A loss that needs
        per-token weights (TAB-PO) sets `pair.chosen_weights` / `pair.rejected_weights` here."""
        return pairs

    def __call__(self, inputs: PairLossInputs) -> LossOutput:
        raise NotImplementedError  # abstractmethod: every plug-in defines it


def sequence_sums(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """S(y) = sum_t m_t lp_t (spec section 0)."""
    return (logps * mask).sum(-1)


def sequence_means(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A(y) = S(y) / sum_t m_t (spec section 0); 0 for an empty row."""
    return sequence_sums(logps, mask) / mask.sum(-1).clamp(min=1)


def pair_surrogate(inputs: PairLossInputs, adv_w: torch.Tensor, adv_l: torch.Tensor,
                   normaliser: float) -> torch.Tensor:
    """The unified-core surrogate (spec section 10) with pi_ref = pi_theta for a pairwise loss: advantages
    adv_w on chosen tokens and adv_l on rejected tokens, per pair [B] or per token [B, T], zero-weight
    rows removed. Its gradient is -sum_t A_t grad lp_t / normaliser."""
    weight = inputs.pair_weight
    adv_w = (adv_w * weight)[:, None] if adv_w.dim() == 1 else adv_w * weight[:, None]
    adv_l = (adv_l * weight)[:, None] if adv_l.dim() == 1 else adv_l * weight[:, None]
    return (policy_gradient_surrogate(inputs.chosen_logps, inputs.chosen_logps, adv_w, inputs.chosen_mask, normaliser)
            + policy_gradient_surrogate(inputs.rejected_logps, inputs.rejected_logps, adv_l, inputs.rejected_mask,
                                        normaliser))


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
    """S_ref(y_w), S_ref(y_l), or zeros when the loss runs without a reference."""
    if inputs.ref_chosen_logps is None:
        zeros = inputs.chosen_logps.new_zeros(inputs.chosen_logps.shape[0])
        return zeros, zeros
    return (sequence_sums(inputs.ref_chosen_logps, inputs.chosen_mask),
            sequence_sums(inputs.ref_rejected_logps, inputs.rejected_mask))
