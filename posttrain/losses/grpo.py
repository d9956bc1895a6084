"""GRPO (DeepSeekMath, Shao et al. 2024) with TRL 1.16's variants (DAPO, Dr. GRPO, BNPO); spec section 6.

Advantages (`compute_advantages`, on the whole rollout batch; TRL semantics):

    A_i = r_i - mean_group(r),  / (std + 1e-4) unless scale_rewards = "none"
          std: "group" = Bessel-corrected std within the group, "batch" = over the whole rollout batch

Per-token loss (TRL `_compute_loss`):

    rho_t  = exp(lp_t - lp_old,t)          importance_sampling_level "sequence" (GSPO): exp(mean_t(lp - lp_old))
    l_t    = -min(rho_t A, clip(rho_t, 1 - epsilon, 1 + epsilon_high) A) + beta * KL_t
    KL_t   = exp(lp_ref - lp) - (lp_ref - lp) - 1   (k3), times rho_t if use_bias_correction_kl (TRL 1.16 default)
    cispo: l_t = -sg(min(rho_t, epsilon_high)) A lp_t + beta KL_t        (MiniMax-M1; token mean like dapo)
    sapo:  l_t = -(4 / tau) sigmoid(tau (rho_t - 1)) A + beta KL_t,  tau = sapo_temperature_pos if A > 0 else _neg
           (SAPO, Gao et al. 2025; sequence-mean of token-means like grpo)

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

The aggregation is `per_completion` (posttrain.losses.group): grpo = seq_mean_token_mean, bnpo and dapo =
token_mean, dr_grpo = seq_mean_token_sum_norm. The core derives the coefficients by autograd (spec
section 10): c_t = 1_stable rho_t A on unclipped tokens (the branch of the min that follows rho), plus
the KL term's -beta dKL/dlp; sequence-level importance sampling (GSPO) spreads each completion's
clipped term over its tokens. The advantage estimator follows `scale_rewards` (group: group_mean_std,
batch: batch_std, none: group_mean) unless the recipe's `rollout.advantage_estimator` names another.

Defaults are TRL 1.16's: beta 0.0 (no reference pass), epsilon 0.2, epsilon_high = epsilon,
scale_rewards "group", loss_type "dapo", use_bias_correction_kl True. DAPO's paper settings are
`epsilon_high: 0.28, beta: 0.0, loss_type: dapo`; Dr. GRPO is `scale_rewards: none, loss_type: dr_grpo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from posttrain.losses.base import LossOutput, register_loss
from posttrain.losses.group import (GroupLossInputs, ScaledRewardLoss, as_token_tensor, completion_lengths,
                                    per_completion, ppo_clip)

AGGREGATION = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dapo": "token_mean",
               "dr_grpo": "seq_mean_token_sum_norm", "cispo": "token_mean", "sapo": "seq_mean_token_mean"}


@register_loss("grpo")
class GRPOLoss(ScaledRewardLoss):
    level = "token"

    @dataclass
    class Params:
        beta: float = 0.0  # KL coefficient (TRL >= 0.19 default; DeepSeekMath used 0.04)
        epsilon: float = 0.2
        epsilon_high: Optional[float] = None  # None -> epsilon; DAPO clip-higher: 0.28
        scale_rewards: Literal["group", "batch", "none"] = "group"
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"] = "dapo"
        max_completion_length: Optional[int] = None  # dr_grpo's constant denominator
        use_bias_correction_kl: bool = True  # TRL 1.16: KL term multiplied by the ratio
        importance_sampling_level: Literal["token", "sequence"] = "token"  # "sequence" = GSPO
        sapo_temperature_pos: float = 1.0  # SAPO's gate temperature for A > 0 (TRL 1.16's default)
        sapo_temperature_neg: float = 1.05  # ... and for A <= 0

        def validate(self):
            if self.beta < 0:
                raise ValueError(f"beta (KL coefficient) must be >= 0, got {self.beta}")
            if not 0 < self.epsilon < 1:
                raise ValueError(f"epsilon (lower clip) must be in (0, 1), got {self.epsilon}")
            if self.epsilon_high is not None and self.epsilon_high <= 0:
                raise ValueError(f"epsilon_high must be positive (or null for epsilon), got {self.epsilon_high}")
            if self.sapo_temperature_pos <= 0 or self.sapo_temperature_neg <= 0:
                raise ValueError("sapo_temperature_pos and sapo_temperature_neg must be positive")
            if self.loss_type == "cispo" and self.importance_sampling_level == "sequence":
                raise ValueError("cispo weights each token by its own clipped ratio: importance_sampling_level must "
                                 "be token (TRL refuses the combination too)")
            if self.loss_type == "dr_grpo" and (self.max_completion_length is None or self.max_completion_length < 1):
                raise ValueError("loss_type dr_grpo divides by completions x max_completion_length: set "
                                 "max_completion_length (the generation limit, a positive integer).")

    def __init__(self, params=None):
        super().__init__(params)
        self.aggregation = AGGREGATION[self.params.loss_type]
        self.level = "token" if self.aggregation == "token_mean" else "sequence"

    def __call__(self, inputs: GroupLossInputs) -> LossOutput:
        p = self.params
        lp, mask = inputs.logps, inputs.mask.to(inputs.logps.dtype)
        adv = as_token_tensor(inputs.advantages, lp)
        eps_high = p.epsilon if p.epsilon_high is None else p.epsilon_high
        log_ratio = inputs.log_ratio()
        if p.importance_sampling_level == "sequence":  # GSPO: one ratio per sequence, exp of the mean token log-ratio
            log_ratio = ((log_ratio * mask).sum(-1) / completion_lengths(mask))[:, None].expand_as(lp)
        coef = torch.exp(log_ratio)
        per_token = self._policy_term(coef, adv, lp, eps_high)
        metrics = self._clip_metrics(coef, adv, mask, p.epsilon, eps_high)
        parts = {}
        if p.beta > 0:
            if inputs.ref_logps is None:
                raise ValueError("GRPO with beta > 0 needs ref_logps (the reference policy's log-probs).")
            d = inputs.ref_logps.detach() - lp
            kl = torch.exp(d) - d - 1  # k3, >= 0
            kl_term = p.beta * kl * (coef if p.use_bias_correction_kl else 1.0)
            parts = {"loss/policy": self._aggregate(per_token, mask), "loss/kl": self._aggregate(kl_term, mask)}
            per_token = per_token + kl_term
            metrics["kl"] = ((kl * mask).sum(-1) / completion_lengths(mask)).detach()
        return LossOutput(self._aggregate(per_token, mask), metrics, parts)

    def _policy_term(self, coef: torch.Tensor, adv: torch.Tensor, lp: torch.Tensor, eps_high: float) -> torch.Tensor:
        """Per-token policy loss of `loss_type`: PPO's clipped surrogate; CISPO's -sg(min(rho, epsilon_high)) A lp
        (MiniMax-M1, Chen et al. 2025: the ratio is clipped and detached, every token keeps a gradient); SAPO's
        soft gate -(4 / tau) sigmoid(tau (rho - 1)) A with tau = sapo_temperature_pos for A > 0, else _neg
        (Gao et al. 2025). All as TRL 1.16 writes them."""
        p = self.params
        if p.loss_type == "cispo":
            return -torch.clamp(coef, max=eps_high).detach() * adv * lp
        if p.loss_type == "sapo":
            tau = torch.where(adv > 0, torch.full_like(adv, p.sapo_temperature_pos),
                              torch.full_like(adv, p.sapo_temperature_neg))
            return -torch.sigmoid(tau * (coef - 1)) * 4 / tau * adv
        return ppo_clip(coef, adv, p.epsilon, eps_high)[0]

    def _aggregate(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return per_completion(per_token, mask, self.aggregation, self.params.max_completion_length)[0]

    @staticmethod
    def _clip_metrics(coef, adv, mask, eps_low, eps_high) -> dict[str, torch.Tensor]:
        """Per completion: share of its tokens clipped low / high / either (TRL's clip_ratio names); the
        step logs their mean, and the least low-clipped and most high-clipped completion as TRL does."""
        low = ((coef < 1 - eps_low) & (adv < 0)).to(mask.dtype).expand_as(mask)
        high = ((coef > 1 + eps_high) & (adv > 0)).to(mask.dtype).expand_as(mask)
        n = completion_lengths(mask)
        low_share, high_share = ((low * mask).sum(-1) / n).detach(), ((high * mask).sum(-1) / n).detach()
        return {"clip_ratio/low_mean": low_share, "clip_ratio/high_mean": high_share,
                "clip_ratio/low_min": low_share, "clip_ratio/high_max": high_share,
                "clip_ratio/region_mean": (((low + high).clamp(max=1) * mask).sum(-1) / n).detach()}


@register_loss("gspo")
class GSPOLoss(GRPOLoss):
    """GSPO (Zheng et al. 2025): GRPO with one importance ratio per sequence, exp(mean_t(lp - lp_old)), and the
    paper's clip range (3e-4, 4e-4), no KL; TRL 1.16 runs it as GRPO with importance_sampling_level="sequence"."""

    @dataclass
    class Params(GRPOLoss.Params):
        epsilon: float = 3e-4
        epsilon_high: Optional[float] = 4e-4
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"] = "grpo"
        importance_sampling_level: Literal["token", "sequence"] = "sequence"
