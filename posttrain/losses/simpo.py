"""SimPO (Meng, Xia, Chen 2024); spec section 2. Reference-free.

    A(y)  = S(y) / |y|                       mean completion log-prob (EOS counted)
    z     = beta * (A(y_w) - A(y_l)) - gamma,  gamma = beta * gamma_beta_ratio (or given directly)
    sigmoid: L = -(1-ls) logsigmoid(z) - ls logsigmoid(-z);   hinge: L = relu(1 - z)
    + sft_weight * (token mean of -lp over chosen tokens)    (off by default, as in the paper)

Logged rewards are beta * A(y) (gamma excluded, as in the authors' code). The preference term is
sequence level; the SFT term, a token mean over the step's chosen tokens, is the registered `sft` loss
added by the combination mechanism (logged as loss/sft). The core's coefficients are
c_t = -dL/dz * beta/|y_w| on chosen tokens and +dL/dz * beta/|y_l| on rejected tokens.
Defaults are the authors' config: beta = 2.0, gamma_beta_ratio = 0.25.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from posttrain.losses.base import LossOutput, PairLossInputs, preference_metrics, register_loss, sequence_sums
from posttrain.losses.registry import CombinedLoss, SharedParamsTerm, with_chosen_nll


class SimPOPreference(SharedParamsTerm):
    """SimPO's preference term (the `simpo` loss without its optional SFT term)."""

    name = "simpo"

    def __call__(self, inputs: PairLossInputs) -> LossOutput:
        p = self.params
        a_w = sequence_sums(inputs.chosen_logps, inputs.chosen_mask) / inputs.chosen_mask.sum(-1).clamp(min=1)
        a_l = sequence_sums(inputs.rejected_logps, inputs.rejected_mask) / inputs.rejected_mask.sum(-1).clamp(min=1)
        z = p.beta * (a_w - a_l) - p.margin
        if p.loss_type == "sigmoid":
            per_pair = -(1 - p.label_smoothing) * F.logsigmoid(z) - p.label_smoothing * F.logsigmoid(-z)
        else:
            per_pair = torch.relu(1 - z)
        return LossOutput(per_pair, preference_metrics(p.beta * a_w, p.beta * a_l, a_w, a_l))


@register_loss("simpo")
class SimPOLoss(CombinedLoss):

    @dataclass
    class Params:
        beta: float = 2.0
        gamma_beta_ratio: float = 0.25
        gamma: Optional[float] = None  # the absolute margin; when set it overrides gamma_beta_ratio
        loss_type: Literal["sigmoid", "hinge"] = "sigmoid"
        label_smoothing: float = 0.0
        sft_weight: float = 0.0

        def validate(self):
            if self.beta <= 0:
                raise ValueError(f"beta must be positive, got {self.beta}")
            if not 0 <= self.label_smoothing < 0.5:
                raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
            if self.sft_weight < 0:
                raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")

        @property
        def margin(self) -> float:
            return self.gamma if self.gamma is not None else self.beta * self.gamma_beta_ratio

    def __init__(self, params=None):
        params = params if params is not None else self.Params()
        params.validate()
        super().__init__(with_chosen_nll(SimPOPreference(params), params.sft_weight))
        self.params = params
