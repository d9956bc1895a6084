"""CPO (Xu et al. 2024, "Contrastive Preference Optimization"), as TRL 1.16's experimental `CPOTrainer`.
Reference-free: the preference term compares the policy's own log-probs, and a behaviour-cloning NLL
on the chosen response keeps the policy near the preferred data (Eq. 3 + Eq. 4 of the paper).

    u(y)     = S(y), or A(y) = S(y) / |y| for loss_type ipo;  AlphaPO (alpha != 0): (1 - exp(u)^-alpha) / alpha
    d        = u(y_w) - u(y_l)
    sigmoid: -(1-eps) logsigmoid(beta d) - eps logsigmoid(-beta d)    hinge: relu(1 - beta d)
    ipo:     (d - 1/(2 beta))^2
    + cpo_alpha * (token mean of -lp over the step's chosen tokens)   (the registered `sft` loss)

TRL's `loss_type: simpo` of the CPO trainer is posttrain's `simpo` (tested against it). Logged rewards
are beta * u(y). The preference term is sequence level, the NLL term token level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from posttrain.losses.base import LossOutput, PairLossInputs, preference_metrics, register_loss, sequence_sums
from posttrain.losses.registry import CombinedLoss, SharedParamsTerm, with_chosen_nll


class CPOPreference(SharedParamsTerm):
    """CPO's preference term (the `cpo` loss without its NLL)."""

    name = "cpo"

    def __call__(self, inputs: PairLossInputs) -> LossOutput:
        p = self.params
        s_w = sequence_sums(inputs.chosen_logps, inputs.chosen_mask)
        s_l = sequence_sums(inputs.rejected_logps, inputs.rejected_mask)
        if p.loss_type == "ipo":
            s_w, s_l = s_w / inputs.chosen_mask.sum(-1).clamp(min=1), s_l / inputs.rejected_mask.sum(-1).clamp(min=1)
        u_w, u_l = s_w, s_l
        if p.alpha != 0:
            u_w, u_l = ((1 - torch.exp(-p.alpha * s)) / p.alpha for s in (s_w, s_l))  # p^-alpha = exp(-alpha u)
        d = u_w - u_l
        if p.loss_type == "sigmoid":
            per_pair = -(1 - p.label_smoothing) * F.logsigmoid(p.beta * d) - p.label_smoothing * F.logsigmoid(-p.beta * d)
        elif p.loss_type == "hinge":
            per_pair = torch.relu(1 - p.beta * d)
        else:
            per_pair = (d - 1 / (2 * p.beta)) ** 2
        return LossOutput(per_pair, preference_metrics(p.beta * u_w, p.beta * u_l, s_w, s_l))


@register_loss("cpo")
class CPOLoss(CombinedLoss):
    @dataclass
    class Params:
        beta: float = 0.1
        loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
        label_smoothing: float = 0.0
        cpo_alpha: float = 1.0  # weight of the NLL on the chosen response
        alpha: float = 0.0  # AlphaPO's reward shape (0: log-probs, as CPO)

        def validate(self):
            if self.beta <= 0:
                raise ValueError(f"beta must be positive, got {self.beta}")
            if not 0 <= self.label_smoothing < 0.5:
                raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
            if self.cpo_alpha < 0:
                raise ValueError(f"cpo_alpha must be >= 0, got {self.cpo_alpha}")

    def __init__(self, params=None):
        params = params if params is not None else self.Params()
        params.validate()
        super().__init__(with_chosen_nll(CPOPreference(params), params.cpo_alpha))
        self.params = params
