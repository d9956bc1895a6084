"""SFT: negative log-likelihood of the chosen (demonstration) response.

    token_mean_batch (default, level token):  -lp_t per chosen token, averaged over the chosen tokens of the step
    mean_per_seq     (level sequence):        mean_t(-lp_t) per pair, averaged over the pairs of the step
    sum_per_seq      (level sequence):        sum_t(-lp_t) per pair, averaged over the pairs of the step

Unified core (spec section 10, SFT row): the coefficient is the reduction's per-token weight (1 per
step token for the token mean), so the gradient is c * grad log pi on every demonstration token. The
denominators are global, so the loss does not depend on how the step is split into micro-batches or
processes (TRL's token mean is per micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.losses.base import LossOutput, LossPlugin, PairLossInputs, register_loss


@register_loss("sft")
class SFTLoss(LossPlugin):
    needs_reference = False
    level = "token"
    row_kinds = ("pair", "demonstration")  # TRL's SFT formats (messages; prompt, completion) as well as pairs

    @dataclass
    class Params:
        reduction: Literal["token_mean_batch", "mean_per_seq", "sum_per_seq"] = "token_mean_batch"

    def __init__(self, params=None):
        super().__init__(params)
        self.level = "token" if self.params.reduction == "token_mean_batch" else "sequence"

    def __call__(self, inputs: PairLossInputs) -> LossOutput:
        nll = -inputs.chosen_logps * inputs.chosen_mask
        lengths = inputs.chosen_mask.sum(-1).clamp(min=1)
        metrics = {"nll/chosen": nll.sum(-1).detach() / lengths}
        if self.params.reduction == "token_mean_batch":
            return LossOutput(nll, metrics)
        if self.params.reduction == "mean_per_seq":
            return LossOutput(nll.sum(-1) / lengths, metrics)
        return LossOutput(nll.sum(-1), metrics)
