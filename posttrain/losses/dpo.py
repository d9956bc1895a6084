"""DPO (Rafailov et al. 2023), cDPO label smoothing, IPO in TRL's form; spec section 1.

    h      = (S(y_w) - S(y_l)) - (S_ref(y_w) - S_ref(y_l))          S = summed completion log-probs
    sigmoid: L = -(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h)  (eps = label_smoothing, cDPO)
    ipo:     L = (h_ipo - 1/(2 beta))^2,  h_ipo = (S_w - S_ref,w)/|y_w| - (S_l - S_ref,l)/|y_l|

Sequence level: one loss per pair, averaged over the pairs of the optimiser step by the core. Its
coefficients (spec section 10, by autograd) are c = +beta sigma(-beta h) on every chosen token and
-beta sigma(-beta h) on every rejected token for plain DPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F

from posttrain.losses.base import (LossOutput, LossPlugin, PairLossInputs, preference_metrics, reference_sums,
                                   register_loss, sequence_sums)


@register_loss("dpo")
class DPOLoss(LossPlugin):
    level = "sequence"

    @dataclass
    class Params:
        beta: float = 0.1
        loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
        label_smoothing: float = 0.0  # cDPO's eps
        reference_free: bool = False

        def validate(self):
            if self.beta <= 0:
                raise ValueError(f"beta must be positive, got {self.beta}")
            if not 0 <= self.label_smoothing < 0.5:
                raise ValueError(f"label_smoothing (cDPO eps) must be in [0, 0.5), got {self.label_smoothing}")

    def __init__(self, params=None):
        super().__init__(params)
        self.needs_reference = not self.params.reference_free

    def __call__(self, inputs: PairLossInputs) -> LossOutput:
        p = self.params
        beta = p.beta
        s_w = sequence_sums(inputs.chosen_logps, inputs.chosen_mask)
        s_l = sequence_sums(inputs.rejected_logps, inputs.rejected_mask)
        r_w, r_l = reference_sums(inputs) if self.needs_reference else (s_w.new_zeros(s_w.shape),) * 2
        if p.loss_type == "sigmoid":
            h = (s_w - s_l) - (r_w - r_l)
            eps = p.label_smoothing
            per_pair = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        else:
            n_w = inputs.chosen_mask.sum(-1).clamp(min=1)
            n_l = inputs.rejected_mask.sum(-1).clamp(min=1)
            h_ipo = (s_w - r_w) / n_w - (s_l - r_l) / n_l
            per_pair = (h_ipo - 1 / (2 * beta)) ** 2
        return LossOutput(per_pair, preference_metrics(beta * (s_w - r_w), beta * (s_l - r_l), s_w, s_l))
