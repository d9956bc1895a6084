"""The unified policy-gradient core: global aggregation, and the one gradient path of every loss.

Spec section 10 ("Towards a Unified View of LLM Post-Training", Lv et al. 2025): every post-training
gradient is  sum_t c_t grad log pi_theta(y_t | x, y_<t)  for a per-token coefficient c_t (the
"advantage" of the unified estimator: 1_stable * A * pi_theta / pi_ref). A loss plug-in writes its
paper loss L as a function of the completion log-probs lp; the core derives

    c_t = -dL / d lp_t

by autograd on a detached copy of lp (a small [B, T] tensor, never the model), then backpropagates
the surrogate  -sum_t c_t lp_t  through the model. Its gradient is exactly that of L (chain rule), so
no loss derives advantages by hand, and every loss, a user's too, logs its coefficients in one unit.

Global aggregation (NeMo-RL's loss contract): a loss declares its `level`. A sequence-level loss
returns one value per example [B] (pair or completion), a token-level loss one value per token
[B, T]; the core divides the weighted sum by the count of examples or tokens of the whole optimiser
step (all micro-batches, all processes), so the micro-batch losses add up to the step loss, and
their gradients to its gradient, however the step is split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

LEVELS = ("sequence", "token")


@dataclass(frozen=True)
class StepCounts:
    """Global counts over one optimiser step (all micro-batches, all processes): the denominators.

    `examples`: pairs (pair losses) or completions (group losses). `tokens`: the tokens a token-level
    loss averages over: chosen-response tokens for pairs (an SFT term), completion tokens for groups."""

    examples: float
    tokens: float


def aggregate(values: torch.Tensor, level: str, example_weight: torch.Tensor, token_mask: torch.Tensor,
              counts: StepCounts) -> torch.Tensor:
    """This micro-batch's share of the step loss: sum(weight * values) / (the step's examples or tokens).

    values: [B] for level "sequence", [B, T] (aligned with `token_mask`) for level "token";
    example_weight [B] is 0 for filler rows; token_mask [B, T] marks the tokens a token-level loss scores."""
    if level == "sequence":
        if values.shape != example_weight.shape:
            raise ValueError(f"a sequence-level loss returns one value per example, shape {tuple(example_weight.shape)}; "
                             f"got {tuple(values.shape)}")
        return (values * example_weight).sum() / counts.examples
    if level == "token":
        if values.shape != token_mask.shape:
            raise ValueError(f"a token-level loss returns one value per token, shape {tuple(token_mask.shape)}; got "
                             f"{tuple(values.shape)}")
        return (values * token_mask * example_weight[:, None]).sum() / counts.tokens
    raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


@dataclass
class StepLoss:
    """A loss's share of the step: `loss` (scalar, the paper loss), `metrics` (per example [B], detached),
    `parts` (scalar components, detached), `direct` (an optional scalar term outside the completion
    log-probs, e.g. an entropy bonus on the model's own outputs, backpropagated as it is)."""

    loss: torch.Tensor
    metrics: dict
    parts: dict
    direct: Optional[torch.Tensor] = None


def backward_through_coefficients(step_loss: Callable[[dict], StepLoss], logps: dict[str, torch.Tensor],
                                  backward: Callable[[torch.Tensor], None],
                                  weights: Optional[dict[str, torch.Tensor]] = None) -> tuple[StepLoss, dict]:
    """Run `step_loss` on detached copies of the log-prob tensors `logps` (name -> [B, T], with the model's
    graph), take c = -dL/dlp for each by autograd, and call `backward(-sum c * lp (+ direct))` on the model
    graph. `weights` (name -> [B, T], constants) scale the coefficients first: the engine/trainer mismatch
    correction (posttrain.core.mismatch). Returns the StepLoss (values detached) and the coefficients (name ->
    [B, T], weighted)."""
    leaves = {name: value.detach().requires_grad_(True) for name, value in logps.items()}
    with torch.enable_grad():
        result = step_loss(leaves)
    coefficients = {name: torch.zeros_like(value) for name, value in leaves.items()}
    if result.loss.requires_grad:
        names = list(leaves)
        grads = torch.autograd.grad(result.loss, [leaves[n] for n in names], allow_unused=True)
        for name, grad in zip(names, grads):
            if grad is not None:
                coefficients[name] = -grad.detach()
    for name, weight in (weights or {}).items():
        coefficients[name] = coefficients[name] * weight.to(coefficients[name].dtype)
    surrogate = -sum((coefficients[name] * logps[name]).sum() for name in logps)
    if result.direct is not None:
        surrogate = surrogate + result.direct
    backward(surrogate)
    detached = StepLoss(result.loss.detach(), {k: v.detach() for k, v in result.metrics.items()},
                        {k: v.detach() for k, v in result.parts.items()}, None)
    return detached, coefficients
