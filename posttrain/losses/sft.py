"""SFT: negative log-likelihood of the chosen (demonstration) response, token-level.

    L = sum over chosen completion tokens of -lp_t  /  (chosen tokens in the whole optimiser step)

Unified core (spec section 10, SFT row): pi_ref = pi_theta, A = 1, no mask, so the gradient is
grad log pi on every demonstration token. The normaliser is global, so the loss does not depend on
how the step is split into micro-batches or processes (TRL's token mean is per micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass

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
        pass

    def __call__(self, inputs: PairLossInputs) -> LossOutput:
        mask = inputs.chosen_mask * inputs.pair_weight[:, None]
        n_tokens = inputs.normaliser.chosen_tokens
        value = -(inputs.chosen_logps * mask).sum() / n_tokens
        surrogate = policy_gradient_surrogate(inputs.chosen_logps, inputs.chosen_logps,
                                              torch.ones_like(inputs.chosen_logps), mask, n_tokens)
        nll = -(inputs.chosen_logps * inputs.chosen_mask).sum(-1) / inputs.chosen_mask.sum(-1).clamp(min=1)
        return LossOutput(with_value(value, surrogate), {"nll/chosen": nll.detach()})
