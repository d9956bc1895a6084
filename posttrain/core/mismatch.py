"""Engine/trainer mismatch: the sampling policy is the engine's, pi_old the trainer's (docs/online_rl.md).

An engine with its own kernels (vLLM) samples from pi_engine, which differs from the trainer's pi_old on the same
weights by float rounding and more (another precision, another attention kernel). The PPO ratio is
pi_theta / pi_old, so the sample is then slightly off-policy for it. Per sampled token, with
delta_t = log pi_old(y_t) - log pi_engine(y_t):

    token level:     r_t = exp(delta_t)
    sequence level:  r_t = exp(sum_t' delta_t')   for every token of the completion

`tis` (truncated importance sampling; Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training") multiplies each token's policy-gradient coefficient c_t (spec section 10) by
min(r_t, cap); `mask` multiplies it by 1[1/cap <= r_t <= cap]; `none` leaves it. The weight is a constant of the
gradient (no gradient flows through it), and the step's denominators are unchanged, so the correction acts on the
coefficients of any loss plug-in alike, its KL term included. Without engine log-probs (the hf engine samples
the training model itself) pi_engine is pi_old: delta is exactly 0 and every weight exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MismatchWeights:
    """Per-token coefficient weights [N, T] and, over the real tokens, the sums the step's metrics need."""

    weights: torch.Tensor
    delta_sum: float  # sum of log pi_old - log pi_engine
    delta_abs_max: float  # max |log pi_old - log pi_engine|
    above_cap: float  # tokens whose ratio is above cap (what tis truncates)
    outside_band: float  # tokens whose ratio leaves [1/cap, cap] (what mask masks)
    tokens: float


def mismatch_weights(old_logps: torch.Tensor, engine_logps: torch.Tensor, mask: torch.Tensor, correction: str,
                     level: str, cap: float) -> MismatchWeights:
    """The correction's coefficient weights for completions with pi_old `old_logps` [N, T] and the engine's
    `engine_logps` [N, T]; `mask` [N, T] marks the real completion tokens."""
    real = mask.to(torch.float64)
    delta = (old_logps.detach().double() - engine_logps.double()) * real
    log_ratio = delta.sum(-1, keepdim=True).expand_as(delta) if level == "sequence" else delta
    ratio = torch.exp(log_ratio.clamp(max=80.0))
    above = ratio > cap
    outside = above | (ratio < 1.0 / cap)
    if correction == "tis":
        weights = torch.clamp(ratio, max=cap)
    elif correction == "mask":
        weights = (~outside).to(torch.float64)
    elif correction == "none":
        weights = torch.ones_like(ratio)
    else:
        raise ValueError(f"mismatch correction must be none, tis or mask, got {correction!r}")
    count = lambda flags: (flags.to(torch.float64) * real).sum().item()  # noqa: E731
    return MismatchWeights(weights=weights.to(old_logps.dtype), delta_sum=delta.sum().item(),
                           delta_abs_max=delta.abs().max().item() if delta.numel() else 0.0,
                           above_cap=count(above), outside_band=count(outside), tokens=real.sum().item())
