"""SimPO (Meng, Xia, Chen 2024); spec section 2. Reference-free.

    A(y)  = S(y) / |y|                       mean completion log-prob (EOS counted)
    z     = beta * (A(y_w) - A(y_l)) - gamma,  gamma = beta * gamma_beta_ratio (or given directly)
    sigmoid: L = -(1-ls) logsigmoid(z) - ls logsigmoid(-z);   hinge: L = relu(1 - z)
    + sft_weight * (token mean of -lp over chosen tokens)    (off by default, as in the paper)

Logged rewards are beta * A(y) (gamma excluded, as in the authors' code). Gradient through the
unified core: A_t = -dL/dz * beta/|y_w| on chosen tokens, +dL/dz * beta/|y_l| on rejected tokens.
Defaults are the authors' config: beta = 2.0, gamma_beta_ratio = 0.25.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from posttrain.core.unified import policy_gradient_surrogate, with_value
from posttrain.losses.base import (LossOutput, LossPlugin, PairLossInputs, pair_surrogate, preference_metrics,
                                   sequence_sums)
from posttrain.losses.registry import register_loss


@register_loss("simpo")
class SimPOLoss(LossPlugin):
    needs_reference = False
    level = "sequence"

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

    def __call__(self, inputs: PairLossInputs) -> LossOutput:
        p = self.params
        n_w = inputs.chosen_mask.sum(-1).clamp(min=1)
        n_l = inputs.rejected_mask.sum(-1).clamp(min=1)
        a_w = sequence_sums(inputs.chosen_logps, inputs.chosen_mask) / n_w
        a_l = sequence_sums(inputs.rejected_logps, inputs.rejected_mask) / n_l
        z = p.beta * (a_w - a_l) - p.margin
        if p.loss_type == "sigmoid":
            ls = p.label_smoothing
            per_pair = -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
            dloss_dz = -(1 - ls) * torch.sigmoid(-z) + ls * torch.sigmoid(z)
        else:
            per_pair = torch.relu(1 - z)
            dloss_dz = -(z < 1).to(z.dtype)
        weight = inputs.pair_weight
        n = inputs.normaliser.sequences
        value = (weight * per_pair).sum() / n
        surrogate = pair_surrogate(inputs, -dloss_dz * p.beta / n_w, dloss_dz * p.beta / n_l, n)
        parts = {}
        if p.sft_weight:
            mask = inputs.chosen_mask * weight[:, None]
            tokens = inputs.normaliser.chosen_tokens
            sft = -(inputs.chosen_logps * mask).sum() / tokens
            value = value + p.sft_weight * sft
            surrogate = surrogate + policy_gradient_surrogate(
                inputs.chosen_logps, inputs.chosen_logps, torch.full_like(mask, p.sft_weight), mask, tokens)
            parts["loss/sft"] = sft.detach()
        metrics = preference_metrics(p.beta * a_w, p.beta * a_l, a_w, a_l)
        return LossOutput(with_value(value, surrogate), metrics, parts)
