"""DPO (Rafailov et al. 2023), cDPO label smoothing, IPO in TRL's form; spec section 1.

    h      = (S(y_w) - S(y_l)) - (S_ref(y_w) - S_ref(y_l))          S = summed completion log-probs
    sigmoid: L = -(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h)  (eps = label_smoothing, cDPO)
    ipo:     L = (h_ipo - 1/(2 beta))^2,  h_ipo = (S_w - S_ref,w)/|y_w| - (S_l - S_ref,l)/|y_l|

Gradient through the unified core (spec section 10): pi_ref = pi_theta, no mask, and the
sequence-level advantage A = -dL/dS on every chosen token and +dL/dS... on rejected tokens, i.e.
+beta sigma(-beta h) and -beta sigma(-beta h) for plain DPO. The normaliser is the number of pairs
in the optimiser step (sequence-level).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from posttrain.core.unified import with_value
from posttrain.losses.base import (LossOutput, LossPlugin, PairLossInputs, pair_surrogate, preference_metrics,
                                   reference_sums, sequence_sums)
from posttrain.losses.registry import register_loss


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
        r_w, r_l = r_w.detach(), r_l.detach()
        if p.loss_type == "sigmoid":
            h = (s_w - s_l) - (r_w - r_l)
            eps = p.label_smoothing
            per_pair = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
            dloss_dh = -beta * ((1 - eps) * torch.sigmoid(-beta * h) - eps * torch.sigmoid(beta * h))
            adv_w, adv_l = -dloss_dh, dloss_dh  # per token: dh/dlp_t = +1 on y_w, -1 on y_l
        else:
            n_w = inputs.chosen_mask.sum(-1).clamp(min=1)
            n_l = inputs.rejected_mask.sum(-1).clamp(min=1)
            h_ipo = (s_w - r_w) / n_w - (s_l - r_l) / n_l
            per_pair = (h_ipo - 1 / (2 * beta)) ** 2
            dloss_dh = 2 * (h_ipo - 1 / (2 * beta))
            adv_w, adv_l = -dloss_dh / n_w, dloss_dh / n_l
        weight = inputs.pair_weight
        n = inputs.normaliser.sequences
        surrogate = pair_surrogate(inputs, adv_w, adv_l, n)
        loss = with_value((weight * per_pair).sum() / n, surrogate)
        metrics = preference_metrics(beta * (s_w - r_w), beta * (s_l - r_l), s_w, s_l)
        return LossOutput(loss, metrics)
