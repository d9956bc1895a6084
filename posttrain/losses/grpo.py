"""GRPO (DeepSeekMath, Shao et al. 2024) with TRL 1.16's variants (DAPO, Dr. GRPO, BNPO); spec section 6.

Advantages (`compute_advantages`, on the whole rollout batch; TRL semantics):

    A_i = r_i - mean_group(r),  / (std + 1e-4) unless scale_rewards = "none"
          std: "group" = Bessel-corrected std within the group, "batch" = over the whole rollout batch

Per-token loss (TRL `_compute_loss`):

    rho_t  = exp(lp_t - lp_old,t)          importance_sampling_level "sequence" (GSPO): exp(mean_t(lp - lp_old))
    l_t    = -min(rho_t A, clip(rho_t, 1 - epsilon, 1 + epsilon_high) A) + beta * KL_t
    KL_t   = exp(lp_ref - lp) - (lp_ref - lp) - 1   (k3), times rho_t if use_bias_correction_kl (TRL 1.16 default)

Aggregation (`loss_type`). In posttrain every denominator is global (the whole optimiser step,
all micro-batches and processes), so the loss and its gradient do not depend on the split:

    grpo     sum_i (sum_t m l / |o_i|) / (completions in the step)       sequence-mean of token-means
    bnpo     sum_{i,t} m l / (completion tokens in the step)              token-mean
    dapo     sum_{i,t} m l / (completion tokens in the step)              identical to bnpo here
    dr_grpo  sum_{i,t} m l / (completions in the step * max_completion_length)

TRL normalises `grpo`, `bnpo` and `dr_grpo` per micro-batch (a mean over the micro-batch's
sequences or tokens, divided by the accumulation steps); only `dapo` divides by a global token count
(`num_items_in_batch / num_processes`). So with global denominators `bnpo` and `dapo` are the same
loss; they differ only in TRL under accumulation or several processes. For one micro-batch on one
process posttrain equals TRL 1.16 for all four (tested to 1e-9).

Gradient through the unified core (spec section 10): the PPO term with pi_ref = pi_old, A per token
and 1_stable = the clip indicator (the branch of the min that follows rho); the KL term with
pi_ref = pi_theta (or pi_old with the bias correction) and A = -beta dKL/dlp. Sequence-level
importance sampling uses the GSPO denominator pi_theta * (pi_old / pi_theta)^(1/|o|).

Defaults are TRL 1.16's: beta 0.0 (no reference pass), epsilon 0.2, epsilon_high = epsilon,
scale_rewards "group", loss_type "dapo", use_bias_correction_kl True. DAPO's paper settings are
`epsilon_high: 0.28, beta: 0.0, loss_type: dapo`; Dr. GRPO is `scale_rewards: none, loss_type: dr_grpo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from posttrain.core.unified import policy_gradient_surrogate, with_value
from posttrain.losses.base import LossOutput, LossPlugin
from posttrain.losses.group import (GroupLossInputs, RolloutBatch, as_token_tensor, completion_lengths,
                                    group_normalised_advantages, ppo_clip)
from posttrain.losses.registry import register_loss


@register_loss("grpo")
class GRPOLoss(LossPlugin):
    data_kind = "groups"
    level = "token"

    @dataclass
    class Params:
        beta: float = 0.0  # KL coefficient (TRL >= 0.19 default; DeepSeekMath used 0.04)
        epsilon: float = 0.2
        epsilon_high: Optional[float] = None  # None -> epsilon; DAPO clip-higher: 0.28
        scale_rewards: Literal["group", "batch", "none"] = "group"
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
        max_completion_length: Optional[int] = None  # dr_grpo's constant denominator
        use_bias_correction_kl: bool = True  # TRL 1.16: KL term multiplied by the ratio
        importance_sampling_level: Literal["token", "sequence"] = "token"  # "sequence" = GSPO

        def validate(self):
            if self.beta < 0:
                raise ValueError(f"beta (KL coefficient) must be >= 0, got {self.beta}")
            if not 0 < self.epsilon < 1:
                raise ValueError(f"epsilon (lower clip) must be in (0, 1), got {self.epsilon}")
            if self.epsilon_high is not None and self.epsilon_high <= 0:
                raise ValueError(f"epsilon_high must be positive (or null for epsilon), got {self.epsilon_high}")
            if self.loss_type == "dr_grpo" and (self.max_completion_length is None or self.max_completion_length < 1):
                raise ValueError("loss_type dr_grpo divides by completions x max_completion_length: set "
                                 "max_completion_length (the generation limit, a positive integer).")

    def __init__(self, params=None):
        super().__init__(params)
        self.needs_reference = self.params.beta > 0
        self.level = "token" if self.params.loss_type in ("bnpo", "dapo") else "sequence"

    def compute_advantages(self, batch: RolloutBatch) -> torch.Tensor:
        """One advantage per completion [N] (group baseline, TRL's std scaling)."""
        return group_normalised_advantages(batch.rewards, batch.group_index, self.params.scale_rewards)

    def _aggregation(self, inputs: GroupLossInputs) -> tuple[torch.Tensor, float]:
        """Per-row token coefficient [N, 1] and the global normaliser."""
        p, n = self.params, inputs.normaliser
        w = inputs.completion_weight.to(inputs.logps.dtype)[:, None]
        if p.loss_type == "grpo":
            return w / completion_lengths(inputs.mask)[:, None], n.sequences
        if p.loss_type in ("bnpo", "dapo"):
            return w, n.tokens
        return w, n.sequences * p.max_completion_length  # dr_grpo

    def __call__(self, inputs: GroupLossInputs) -> LossOutput:
        p = self.params
        lp, mask = inputs.logps, inputs.mask.to(inputs.logps.dtype)
        old = inputs.old()
        adv = as_token_tensor(inputs.advantages, lp)
        eps_high = p.epsilon if p.epsilon_high is None else p.epsilon_high
        row, norm = self._aggregation(inputs)
        weight = mask * row  # W_it: the token's coefficient in the step sum (before / norm)

        log_ratio = lp - old
        if p.importance_sampling_level == "token":
            log_w = log_ratio
        else:  # GSPO: one ratio per sequence, exp of the mean token log-ratio
            log_w = ((log_ratio * mask).sum(-1) / completion_lengths(mask))[:, None]
        coef = torch.exp(log_w)
        pg_token, stable = ppo_clip(coef, adv, p.epsilon, eps_high)
        pg_value = (pg_token * weight).sum() / norm

        if p.importance_sampling_level == "token":
            pg_surrogate = policy_gradient_surrogate(lp, old, adv.expand_as(lp), weight, norm, stable)
            denominator = old
        else:
            # d/dlp_s of sum_t W_t l_t(coef) = -coef * m_s / |o| * sum_t W_t 1_stable A_t: the core with
            # pi_ref = pi_theta (pi_old / pi_theta)^(1/|o|), i.e. lp_ref = lp - log coef (detached).
            denominator = lp.detach() - log_w.detach()
            seq_adv = (weight * stable * adv).sum(-1, keepdim=True) / completion_lengths(mask)[:, None]
            pg_surrogate = policy_gradient_surrogate(lp, denominator, seq_adv.expand_as(lp), mask, norm)

        metrics = self._clip_metrics(coef, adv, mask, p.epsilon, eps_high)
        value, surrogate = pg_value, pg_surrogate
        parts = {}
        if p.beta > 0:
            if inputs.ref_logps is None:
                raise ValueError("GRPO with beta > 0 needs ref_logps (the reference policy's log-probs).")
            d = inputs.ref_logps.detach() - lp
            kl = torch.exp(d) - d - 1  # k3, >= 0
            dkl = 1 - torch.exp(d.detach())  # dKL/dlp
            if not p.use_bias_correction_kl:
                kl_value = p.beta * (kl * weight).sum() / norm
                kl_surrogate = policy_gradient_surrogate(lp, lp, -p.beta * dkl, weight, norm)
            else:
                kl_value = p.beta * (kl * coef * weight).sum() / norm
                if p.importance_sampling_level == "token":  # d(KL rho)/dlp = rho (dKL + KL)
                    kl_adv = -p.beta * (dkl + kl.detach())
                    kl_surrogate = policy_gradient_surrogate(lp, denominator, kl_adv, weight, norm)
                else:  # d/dlp_s sum_t W_t KL_t coef = coef (W_s dKL_s + m_s / |o| sum_t W_t KL_t)
                    spread = (weight * kl.detach()).sum(-1, keepdim=True) / completion_lengths(mask)[:, None]
                    kl_adv = -p.beta * (weight * dkl + spread)
                    kl_surrogate = policy_gradient_surrogate(lp, denominator, kl_adv, mask, norm)
            value, surrogate = value + kl_value, surrogate + kl_surrogate
            metrics["kl"] = ((kl * mask).sum(-1) / completion_lengths(mask)).detach()
            parts = {"loss/policy": pg_value.detach(), "loss/kl": kl_value.detach()}
        return LossOutput(with_value(value, surrogate), metrics, parts)

    @staticmethod
    def _clip_metrics(coef, adv, mask, eps_low, eps_high) -> dict[str, torch.Tensor]:
        """Per completion: share of its tokens clipped low / high / either (TRL's clip_ratio names)."""
        low = ((coef < 1 - eps_low) & (adv < 0)).to(mask.dtype).expand_as(mask)
        high = ((coef > 1 + eps_high) & (adv > 0)).to(mask.dtype).expand_as(mask)
        n = completion_lengths(mask)
        return {"clip_ratio/low_mean": ((low * mask).sum(-1) / n).detach(),
                "clip_ratio/high_mean": ((high * mask).sum(-1) / n).detach(),
                "clip_ratio/region_mean": (((low + high).clamp(max=1) * mask).sum(-1) / n).detach()}
