"""RPO: DPO plus an SFT regulariser on the chosen response (Liu et al. 2024); spec section 3.

Built with the combination mechanism from the registered `dpo` and `sft` plug-ins (looked up by
name in the registry; this module imports neither):

    sum_times_beta   L = L_DPO + alpha * beta * (-S(y_w))          Liu et al.'s code (cumulative; main paper)
    mean_per_seq     L = L_DPO + alpha * mean_t(-lp_t(y_w))         Liu et al.'s average variant (OpenRLHF)
    token_mean_batch L = L_DPO + alpha * token mean of -lp over all chosen tokens of the step   (TRL)

each averaged over pairs (or tokens) of the whole optimiser step. alpha is Liu et al.'s eta.
Defaults: the paper's cumulative form with eta = 0.005.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from posttrain.losses.base import register_loss
from posttrain.losses.registry import CombinedLoss, get_loss_class

_SFT_REDUCTION = {"sum_times_beta": "sum_per_seq", "mean_per_seq": "mean_per_seq",
                  "token_mean_batch": "token_mean_batch"}


@register_loss("rpo")
class RPOLoss(CombinedLoss):
    @dataclass
    class Params:
        beta: float = 0.1
        alpha: float = 0.005
        reduction: Literal["sum_times_beta", "mean_per_seq", "token_mean_batch"] = "sum_times_beta"

        def validate(self):
            if self.beta <= 0:
                raise ValueError(f"beta must be positive, got {self.beta}")
            if self.alpha < 0:
                raise ValueError(f"alpha (the SFT weight) must be >= 0, got {self.alpha}")

    def __init__(self, params=None):
        params = params if params is not None else self.Params()
        params.validate()
        dpo_cls, sft_cls = get_loss_class("dpo"), get_loss_class("sft")
        dpo = dpo_cls(dpo_cls.Params(beta=params.beta))
        sft = sft_cls(sft_cls.Params(reduction=_SFT_REDUCTION[params.reduction]))
        weight = params.alpha * params.beta if params.reduction == "sum_times_beta" else params.alpha
        super().__init__([(1.0, dpo), (weight, sft)])
        self.params = params
