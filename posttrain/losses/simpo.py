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
from posttrain.losses.base import LossOutput, LossPlugin, PairLossInputs, sequence_sums
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
        adv_w = (-dloss_dz * p.beta / n_w * weight)[:, None]
        adv_l = (dloss_dz * p.beta / n_l * weight)[:, None]
        value = (weight * per_pair).sum() / n
        surrogate = (policy_gradient_surrogate(inputs.chosen_logps, inputs.chosen_logps, adv_w, inputs.chosen_mask, n)
                     + policy_gradient_surrogate(inputs.rejected_logps, inputs.rejected_logps, adv_l,
                                                 inputs.rejected_mask, n))
        parts = {}
        if p.sft_weight:
            mask = inputs.chosen_mask * weight[:, None]
            tokens = inputs.normaliser.chosen_tokens
            sft = -(inputs.chosen_logps * mask).sum() / tokens
            value = value + p.sft_weight * sft
            surrogate = surrogate + policy_gradient_surrogate(
                inputs.chosen_logps, inputs.chosen_logps, torch.full_like(mask, p.sft_weight), mask, tokens)
            parts["loss/sft"] = sft.detach()
        reward_w, reward_l = (p.beta * a_w).detach(), (p.beta * a_l).detach()
        metrics = {
            "rewards/chosen": reward_w,
            "rewards/rejected": reward_l,
            "rewards/margins": reward_w - reward_l,
            "rewards/accuracies": (reward_w > reward_l).to(reward_w.dtype),
            "logps/chosen": a_w.detach(),
            "logps/rejected": a_l.detach(),
        }
        return LossOutput(with_value(value, surrogate), metrics, parts)
