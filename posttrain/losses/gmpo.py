"""GMPO, Geometric-Mean Policy Optimization (Zhao et al. 2025), as TRL 1.16's experimental `GMPOTrainer`.

GRPO's arithmetic mean of token ratios is replaced by their geometric mean, clipped per token in log
space, so one outlier token cannot swing a sequence's weight:

    l_t      = lp_t - lp_old,t
    clip_t   = min(l_t, clamp(l_t, -epsilon, epsilon_high)) for A > 0, max(...) for A < 0   (PPO's min, in log space)
    w_i      = exp(sum_t m_t clip_t / |o_i|)
    L_i      = -w_i A_i + beta * mean_t KL_t                 KL_t the k3 estimator, as GRPO's
    loss     = mean over the step's completions               (sequence level)

Advantages as GRPO's (`scale_rewards`; or `rollout.advantage_estimator`). Defaults are TRL's and the
paper's: epsilon = epsilon_high = 0.4 (ratio range (e^-0.4, e^0.4)), beta = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from posttrain.losses.base import LossOutput, register_loss
from posttrain.losses.group import GroupLossInputs, ScaledRewardLoss, as_token_tensor, completion_lengths


@register_loss("gmpo")
class GMPOLoss(ScaledRewardLoss):
    level = "sequence"

    @dataclass
    class Params:
        beta: float = 0.0
        epsilon: float = 0.4  # log-space clip: the ratio stays above exp(-epsilon)
        epsilon_high: Optional[float] = None  # None -> epsilon; the ratio stays below exp(epsilon_high)
        scale_rewards: Literal["group", "batch", "none"] = "group"

        def validate(self):
            if self.beta < 0:
                raise ValueError(f"beta (KL coefficient) must be >= 0, got {self.beta}")
            if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
                raise ValueError("epsilon and epsilon_high (log-space clip bounds) must be positive")

    def __call__(self, inputs: GroupLossInputs) -> LossOutput:
        p = self.params
        lp, mask = inputs.logps, inputs.mask.to(inputs.logps.dtype)
        adv = as_token_tensor(inputs.advantages, lp)
        eps_high = p.epsilon if p.epsilon_high is None else p.epsilon_high
        log_ratio = inputs.log_ratio()
        clamped = torch.clamp(log_ratio, min=-p.epsilon, max=eps_high)
        clipped = torch.where(adv > 0, torch.minimum(log_ratio, clamped), torch.maximum(log_ratio, clamped))
        lengths = completion_lengths(mask)
        weight = torch.exp((clipped * mask).sum(-1) / lengths)
        per_completion = -weight * adv[:, 0]
        low = ((log_ratio < -p.epsilon) & (adv < 0)).to(mask.dtype)
        high = ((log_ratio > eps_high) & (adv > 0)).to(mask.dtype)
        low_share, high_share = ((low * mask).sum(-1) / lengths).detach(), ((high * mask).sum(-1) / lengths).detach()
        metrics = {"clip_ratio/low_mean": low_share, "clip_ratio/high_mean": high_share,
                   "clip_ratio/region_mean": (((low + high).clamp(max=1) * mask).sum(-1) / lengths).detach()}
        if p.beta > 0:
            if inputs.ref_logps is None:
                raise ValueError("GMPO with beta > 0 needs ref_logps (the reference policy's log-probs).")
            d = inputs.ref_logps.detach() - lp
            kl = ((torch.exp(d) - d - 1) * mask).sum(-1) / lengths
            per_completion = per_completion + p.beta * kl
            metrics["kl"] = kl.detach()
        return LossOutput(per_completion, metrics)
