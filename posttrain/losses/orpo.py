"""ORPO (Hong, Lee, Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model"), Eq. 6-7.

    A(y)     = S(y) / |y|                         the mean completion log-prob, log P(y | x) in the paper
    log odds = log(P / (1 - P)) = A - log(1 - exp(A))
    L_OR     = -logsigmoid(log odds(y_w) - log odds(y_l))
    L        = L_SFT + beta * L_OR                 beta is the paper's lambda (TRL's name and default 0.1)

L_SFT is the NLL of the chosen response, a token mean over the step's chosen tokens (the registered
`sft` loss). TRL 1.16's experimental `ORPOTrainer` takes its NLL over the prompt and the response
(its `concatenated_forward`); posttrain follows the paper, so only the odds-ratio term is TRL's (tested
against TRL's `odds_ratio_loss`, which computes in float32). Reference-free. Logged rewards are
beta * A(y) (TRL's), with `log_odds_ratio` (= logsigmoid of the log-odds difference) and `log_odds_chosen`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.losses.base import LossOutput, PairLossInputs, preference_metrics, register_loss, sequence_means
from posttrain.losses.registry import CombinedLoss, SharedParamsTerm, with_chosen_nll


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class OddsRatio(SharedParamsTerm):
    """ORPO's odds-ratio term beta * L_OR (the `orpo` loss without its NLL)."""

    name = "orpo"

    def __call__(self, inputs: PairLossInputs) -> LossOutput:
        beta = self.params.beta
        a_w = sequence_means(inputs.chosen_logps, inputs.chosen_mask)
        a_l = sequence_means(inputs.rejected_logps, inputs.rejected_mask)
        log_odds = (a_w - a_l) - (log1mexp(a_w) - log1mexp(a_l))
        ratio = F.logsigmoid(log_odds)
        metrics = preference_metrics(beta * a_w, beta * a_l, a_w, a_l)
        metrics.update({"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()})
        return LossOutput(-beta * ratio, metrics)


@register_loss("orpo")
class ORPOLoss(CombinedLoss):
    @dataclass
    class Params:
        beta: float = 0.1  # the paper's lambda

        def validate(self):
            if self.beta <= 0:
                raise ValueError(f"beta (ORPO's lambda) must be positive, got {self.beta}")

    def __init__(self, params=None):
        params = params if params is not None else self.Params()
        params.validate()
        super().__init__(with_chosen_nll(OddsRatio(params), 1.0))
        self.params = params
