"""rDPO, provably robust DPO (Chowdhury, Kini, Natarajan 2024); spec section 4.

For preference labels flipped at a known rate eps (0 <= eps < 0.5), with l(h) = -logsigmoid(beta h)
and h the DPO log-ratio difference (summed log-probs):

    L = [ (1-eps) l(h) - eps l(-h) ] / (1 - 2 eps)

an unbiased estimate of the clean loss. It is unbounded below (negative values are expected; do
not clamp). Sequence level; the core's coefficients are c = -dL/dh on chosen tokens and +dL/dh on
rejected, dL/dh = -beta [(1-eps) sigma(-beta h) + eps sigma(beta h)] / (1-2 eps).
TRL calls this loss_type="robust" with label_smoothing = eps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from posttrain.losses.base import (LossOutput, LossPlugin, PairLossInputs, preference_metrics, reference_sums,
                                   register_loss, sequence_sums)


@register_loss("rdpo")
class RobustDPOLoss(LossPlugin):
    level = "sequence"

    @dataclass
    class Params:
        beta: float = 0.1
        eps: float = 0.1  # the label flip rate; TRL's docs recommend 0.1

        def validate(self):
            if self.beta <= 0:
                raise ValueError(f"beta must be positive, got {self.beta}")
            if not 0 <= self.eps < 0.5:
                raise ValueError(f"eps is the label flip rate and must satisfy 0 <= eps < 0.5 (at 0.5 the labels carry "
                                 f"no information and the loss divides by 1 - 2 eps = 0); got {self.eps}")

    def __call__(self, inputs: PairLossInputs) -> LossOutput:
        beta, eps = self.params.beta, self.params.eps
        s_w = sequence_sums(inputs.chosen_logps, inputs.chosen_mask)
        s_l = sequence_sums(inputs.rejected_logps, inputs.rejected_mask)
        r_w, r_l = reference_sums(inputs)
        h = (s_w - s_l) - (r_w - r_l)
        per_pair = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
        return LossOutput(per_pair, preference_metrics(beta * (s_w - r_w), beta * (s_l - r_l), s_w, s_l))
