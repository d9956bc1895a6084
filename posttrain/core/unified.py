"""The unified policy-gradient estimator and global normalisation.

Spec section 10 ("Towards a Unified View of LLM Post-Training", Lv et al. 2025):

    grad = 1_stable * (1 / pi_ref) * A * grad pi_theta

per token, summed over completion tokens and divided by a global normaliser. The surrogate whose
gradient is exactly that is  -sum_t 1_stable,t * A_t * exp(lp_t - lp_ref,t) / normaliser  with
A and lp_ref detached: with lp_ref = lp (pi_ref = pi_theta, as for SFT, REINFORCE and DPO) the
ratio is 1 and the gradient is A * grad log pi; with lp_ref = lp_old it is the PPO/GRPO ratio.

Global normalisation (NeMo-RL's loss contract): the normaliser counts sequences or tokens over the
whole optimiser step, across micro-batches and processes, so that summing the micro-batch losses
gives the same loss, and the same gradient, however the step is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Normaliser:
    """Global counts over one optimiser step (all micro-batches, all processes)."""

    sequences: float  # pairs for pair losses, completions for group losses
    tokens: float  # loss tokens: chosen + rejected for pairs, completion tokens for groups
    chosen_tokens: float = 0.0  # pairs only: tokens of the chosen responses


def policy_gradient_surrogate(logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
                              mask: torch.Tensor, normaliser: float,
                              stable_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Loss whose gradient is -sum_t 1_stable * A_t * grad pi_theta / pi_ref / normaliser.

    logps: per-token log pi_theta [N, T] (with grad); ref_logps: the denominator's log-probs [N, T]
    (detached here); advantages: [N, T] or [N, 1] (detached); mask: completion-token mask [N, T];
    stable_mask: the stabilisation mask 1_stable (for example the PPO clip indicator), or None.
    """
    weight = mask if stable_mask is None else mask * stable_mask
    ratio = torch.exp(logps - ref_logps.detach())
    return -(weight * advantages.detach() * ratio).sum() / normaliser


def with_value(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """A tensor equal to `value` whose gradient is that of `surrogate` (logged losses stay the paper losses)."""
    return value.detach() + (surrogate - surrogate.detach())
