"""SFT: negative log-likelihood of the chosen (demonstration) response.

    token_mean_batch (default): sum over chosen tokens of -lp_t / (chosen tokens in the optimiser step)
    mean_per_seq:               sum over pairs of mean_t(-lp_t) / (pairs in the optimiser step)
    sum_per_seq:                sum over pairs of sum_t(-lp_t)  / (pairs in the optimiser step)

Unified core (spec section 10, SFT row): pi_ref = pi_theta, no mask, A = the reduction's per-token
weight (1 for the token mean), so the gradient is A * grad log pi on every demonstration token. The
normalisers are global, so the loss does not depend on how the step is split into micro-batches or
processes (TRL's token mean is per micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.core.unified import policy_gradient_surrogate, with_value
from posttrain.losses.base import LossOutput, LossPlugin, PairLossInputs
from posttrain.losses.registry import register_loss


@register_loss("sft")
class SFTLoss(LossPlugin):
    needs_reference = False
    level = "token"

    @dataclass
    class Params:
        reduction: Literal["token_mean_batch", "mean_per_seq", "sum_per_seq"] = "token_mean_batch"

    def __init__(self, params=None):
        super().__init__(params)
        self.level = "token" if self.params.reduction == "token_mean_batch" else "sequence"

    def __call__(self, inputs: PairLossInputs) -> LossOutput:
        mask = inputs.chosen_mask * inputs.pair_weight[:, None]
        lengths = inputs.chosen_mask.sum(-1).clamp(min=1)
        reduction = self.params.reduction
        if reduction == "token_mean_batch":
            normaliser, token_weight = inputs.normaliser.chosen_tokens, torch.ones_like(lengths)
        elif reduction == "mean_per_seq":
            normaliser, token_weight = inputs.normaliser.sequences, 1.0 / lengths
        else:
            normaliser, token_weight = inputs.normaliser.sequences, torch.ones_like(lengths)
        advantages = token_weight[:, None].expand_as(mask)
        value = -(inputs.chosen_logps * mask * advantages).sum() / normaliser
        surrogate = policy_gradient_surrogate(inputs.chosen_logps, inputs.chosen_logps, advantages, mask, normaliser)
        nll = -(inputs.chosen_logps * inputs.chosen_mask).sum(-1) / lengths
        return LossOutput(with_value(value, surrogate), {"nll/chosen": nll.detach()})
