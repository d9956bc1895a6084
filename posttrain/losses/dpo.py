"""DPO (Rafailov et al. 2023; spec section 1) and TRL 1.16's DPO loss family, as `loss_type`s of one loss.

With S the summed completion log-probs, rho_w = S(y_w) - S_ref(y_w), rho_l = S(y_l) - S_ref(y_l),
h = rho_w - rho_l, a_w = rho_w / |y_w|, a_l = rho_l / |y_l|, sigma the logistic function, eps =
label_smoothing and tau = discopop_tau:

    sigmoid       -(1-eps) log sigma(beta h) - eps log sigma(-beta h)      (eps > 0: cDPO; TRL: eps = 0)
    ipo           (a_w - a_l - 1/(2 beta))^2                               (Azar et al. 2023, Eq. 17; TRL's per-token form)
    sigmoid_norm  -log sigma(beta (a_w - a_l))
    hinge         relu(1 - beta h)                                         (SLiC, Zhao et al. 2023)
    exo_pair      q log(q / (1-eps)) + (1-q) log((1-q) / eps),  q = sigma(beta h)   (EXO, Ji et al. 2024, Eq. 16)
    nca_pair      -log sigma(beta rho_w) - 1/2 log sigma(-beta rho_w) - 1/2 log sigma(-beta rho_l)  (NCA, Chen et al. 2024)
    bco_pair      -log sigma(beta rho_w) - log sigma(-beta rho_l)          (BCO, Jung et al. 2024, paired)
    sppo_hard     (rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2          (SPPO, Wu et al. 2024, hard labels)
    aot           sigmoid on d = sort(S_w - S_l) - sort(S_ref,w - S_ref,l)  (AOT, Melnyk et al. 2024)
    aot_unpaired  sigmoid on d = sort(rho_w) - sort(rho_l)
    apo_zero      1 - sigma(beta rho_w) + sigma(beta rho_l)                (APO, D'Oosterlinck et al. 2024, Eq. 7)
    apo_down      sigma(beta rho_w) + 1 - sigma(beta h)                    (APO, Eq. 8)
    discopop      (1 - m) (-log sigma(z)) + m exp(-z),  z = beta h, m = sigma(z / tau)  (DiscoPOP, Lu et al. 2024, Eq. 5)

`aot` and `aot_unpaired` sort over the pairs of the micro-batch, as TRL sorts over its per-device
batch: they depend on how a step is split (`train.micro_batch_size`), which no other loss here does.

Sequence level: one loss per pair, averaged over the pairs of the optimiser step by the core; the
coefficients (spec section 10) come by autograd. Logged rewards are beta * rho (TRL's names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F

from posttrain.losses.base import (LossOutput, LossPlugin, PairLossInputs, preference_metrics, reference_sums,
                                   register_loss, sequence_sums)

LossType = Literal["sigmoid", "ipo", "sigmoid_norm", "hinge", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                   "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop"]


class Margins(NamedTuple):
    """Per-pair quantities the formulas are written in (see the module docstring)."""

    s_w: torch.Tensor
    s_l: torch.Tensor
    r_w: torch.Tensor
    r_l: torch.Tensor
    n_w: torch.Tensor  # completion lengths |y_w|, |y_l|
    n_l: torch.Tensor
    real: torch.Tensor  # pairs with weight > 0 (not a short step's filler rows)

    @property
    def rho_w(self):
        return self.s_w - self.r_w

    @property
    def rho_l(self):
        return self.s_l - self.r_l

    @property
    def h(self):
        return self.rho_w - self.rho_l

    @property
    def a_w(self):
        return self.rho_w / self.n_w

    @property
    def a_l(self):
        return self.rho_l / self.n_l


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _sorted_over_real_pairs(values: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """`values` with the real pairs' entries sorted among themselves (zero-weight filler rows stay put)."""
    out = values.clone()
    out[real] = torch.sort(values[real]).values
    return out


def _exo_pair(m: Margins, beta: float, eps: float) -> torch.Tensor:
    z = beta * m.h
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))


def _discopop(m: Margins, beta: float, tau: float) -> torch.Tensor:
    z = beta * m.h
    mix = torch.sigmoid(z / tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


# loss_type -> per-pair loss, from the margins and the params (b = beta, e = label_smoothing)
FORMULAS: dict[str, Callable[[Margins, "DPOLoss.Params"], torch.Tensor]] = {
    "sigmoid": lambda m, p: _smoothed_sigmoid(p.beta * m.h, p.label_smoothing),
    "ipo": lambda m, p: (m.a_w - m.a_l - 1 / (2 * p.beta)) ** 2,
    "sigmoid_norm": lambda m, p: -F.logsigmoid(p.beta * (m.a_w - m.a_l)),
    "hinge": lambda m, p: torch.relu(1 - p.beta * m.h),
    "exo_pair": lambda m, p: _exo_pair(m, p.beta, p.label_smoothing),
    "nca_pair": lambda m, p: (-F.logsigmoid(p.beta * m.rho_w) - 0.5 * F.logsigmoid(-p.beta * m.rho_w)
                              - 0.5 * F.logsigmoid(-p.beta * m.rho_l)),
    "bco_pair": lambda m, p: -F.logsigmoid(p.beta * m.rho_w) - F.logsigmoid(-p.beta * m.rho_l),
    "sppo_hard": lambda m, p: (m.rho_w - 0.5 / p.beta) ** 2 + (m.rho_l + 0.5 / p.beta) ** 2,
    "aot": lambda m, p: _smoothed_sigmoid(p.beta * (_sorted_over_real_pairs(m.s_w - m.s_l, m.real)
                                                    - _sorted_over_real_pairs(m.r_w - m.r_l, m.real)),
                                          p.label_smoothing),
    "aot_unpaired": lambda m, p: _smoothed_sigmoid(p.beta * (_sorted_over_real_pairs(m.rho_w, m.real)
                                                             - _sorted_over_real_pairs(m.rho_l, m.real)),
                                                   p.label_smoothing),
    "apo_zero": lambda m, p: 1 - torch.sigmoid(p.beta * m.rho_w) + torch.sigmoid(p.beta * m.rho_l),
    "apo_down": lambda m, p: torch.sigmoid(p.beta * m.rho_w) + 1 - torch.sigmoid(p.beta * m.h),
    "discopop": lambda m, p: _discopop(m, p.beta, p.discopop_tau),
}


@register_loss("dpo")
class DPOLoss(LossPlugin):
    level = "sequence"

    @dataclass
    class Params:
        beta: float = 0.1
        loss_type: LossType = "sigmoid"
        label_smoothing: float = 0.0  # eps: cDPO (sigmoid), EXO's target (exo_pair, which needs eps > 0), aot
        discopop_tau: float = 0.05  # DiscoPOP's temperature (TRL's default)
        reference_free: bool = False

        def validate(self):
            if self.beta <= 0:
                raise ValueError(f"beta must be positive, got {self.beta}")
            if not 0 <= self.label_smoothing < 0.5:
                raise ValueError(f"label_smoothing (cDPO eps) must be in [0, 0.5), got {self.label_smoothing}")
            if self.loss_type == "exo_pair" and self.label_smoothing <= 0:
                raise ValueError("exo_pair needs label_smoothing > 0 (its target distribution is (1-eps, eps); "
                                 "the EXO paper and TRL suggest 1e-3)")
            if self.discopop_tau <= 0:
                raise ValueError(f"discopop_tau must be positive, got {self.discopop_tau}")

    def __init__(self, params=None):
        super().__init__(params)
        self.needs_reference = not self.params.reference_free

    def __call__(self, inputs: PairLossInputs) -> LossOutput:
        s_w = sequence_sums(inputs.chosen_logps, inputs.chosen_mask)
        s_l = sequence_sums(inputs.rejected_logps, inputs.rejected_mask)
        r_w, r_l = reference_sums(inputs) if self.needs_reference else (s_w.new_zeros(s_w.shape),) * 2
        margins = Margins(s_w, s_l, r_w, r_l, inputs.chosen_mask.sum(-1).clamp(min=1),
                          inputs.rejected_mask.sum(-1).clamp(min=1), inputs.pair_weight > 0)
        beta = self.params.beta
        return LossOutput(FORMULAS[self.params.loss_type](margins, self.params),
                          preference_metrics(beta * margins.rho_w, beta * margins.rho_l, s_w, s_l))
