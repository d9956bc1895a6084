"""TAB-PO, Token-level Adaptive Barrier PO (Fodeh, Ma, et al. 2026); spec section 5, reconstructed
from the authors' code (SarielMa/TAB-PO train_dpo.py).

Per pair (x, y_w, y_l), with raw token weights w_t (posttrain.data.token_weights; 1 without them)
renormalised to mean 1 over the n valid (completion) tokens of each sequence:

    w~_t   = w_t * n / sum_valid w_t
    s(y)   = (1/n) * sum_t w~_t lp_t                 policy (grad) and reference (no grad), same weights
    z      = (s_pi(y_w) - s_pi(y_l)) - (s_ref(y_w) - s_ref(y_l))
    L_pref = -logsigmoid(beta * z)
    g_t    = 1[lp_t(y_w) < log tau] * m_t           hard gate on the policy's own chosen log-prob
    L_bar  = sum_t w~_t g_t (-lp_t(y_w)) / max(1, sum_t w~_t g_t)
    L      = mean_pairs(L_pref) + lam * mean_pairs(L_bar)

Sequence level: both means divide by the step's pair count (the core). The coefficients the core
derives (spec section 10; the gate is not differentiated) are

    chosen:   c_t = beta sigma(-beta z) w~_t / n_w  +  lam w~_t g_t / max(1, sum w~ g)
    rejected: c_t = -beta sigma(-beta z) w~_t / n_l

Defaults are the authors' Config: beta 0.5, tau 0.66, lam 0.5; token weights Code 1.1,
Sub-code 1.2, Span 1.1, diff 1.2 (for PHEE: argument-role labels get 1.2, event-type labels and
span texts get 1.1; see posttrain/data/token_weights.py and docs/tabpo.md). A completion whose
weights sum to 0 is scored with uniform weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from posttrain.data.token_weights import TokenWeightConfig, weight_pairs
from posttrain.losses.base import LossOutput, LossPlugin, PairLossInputs, preference_metrics, register_loss


def normalised_weights(weights: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """w~ = w * n / sum_valid w on the valid tokens (mean 1 there), 0 elsewhere; uniform for a
    row without weights or whose weights sum to 0."""
    w = mask if weights is None else weights * mask
    total = w.sum(-1, keepdim=True)
    n = mask.sum(-1, keepdim=True)
    w = torch.where(total > 0, w, mask)
    total = torch.where(total > 0, total, n)
    return w * n / total.clamp(min=1e-30)


@register_loss("tabpo")
class TABPOLoss(LossPlugin):
    needs_reference = True
    level = "sequence"

    @dataclass
    class Params:
        beta: float = 0.5
        tau: float = 0.66  # policy_prob_threshold: the barrier gates chosen tokens with p < tau
        lam: float = 0.5  # sft_barrier_weight
        code_weight: float = 1.1
        subcode_weight: float = 1.2
        span_weight: float = 1.1
        diff_weight: float = 1.2  # 1.0 turns the difference weights off
        diff_alignment: Literal["position", "lcs"] = "position"
        value_weights: bool = True  # JSON value weights (code / subcode / span)
        use_data_spans: bool = True  # user weight spans from the rows' weight_spans_chosen / _rejected

        def validate(self):
            if self.beta <= 0:
                raise ValueError(f"beta must be positive, got {self.beta}")
            if not 0 < self.tau <= 1:
                raise ValueError(f"tau (the barrier's probability threshold) must be in (0, 1], got {self.tau}")
            if self.lam < 0:
                raise ValueError(f"lam (the barrier weight) must be >= 0, got {self.lam}")
            for name in ("code_weight", "subcode_weight", "span_weight", "diff_weight"):
                if getattr(self, name) <= 0:
                    raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
            if self.diff_alignment not in ("position", "lcs"):
                raise ValueError(f"diff_alignment must be 'position' or 'lcs', got {self.diff_alignment!r}")

        def token_weight_config(self) -> TokenWeightConfig:
            return TokenWeightConfig(self.code_weight, self.subcode_weight, self.span_weight, self.diff_weight,
                                     self.diff_alignment, self.value_weights, self.use_data_spans)

    def prepare_pairs(self, pairs: list, tokenizer) -> list:
        return weight_pairs(pairs, tokenizer, self.params.token_weight_config())

    def __call__(self, inputs: PairLossInputs) -> LossOutput:
        p = self.params
        beta = p.beta
        if inputs.ref_chosen_logps is None or inputs.ref_rejected_logps is None:
            raise ValueError("TAB-PO needs reference log-probs (ref_chosen_logps / ref_rejected_logps).")
        mc, mr = inputs.chosen_mask, inputs.rejected_mask
        wc = normalised_weights(inputs.chosen_token_weights, mc)
        wr = normalised_weights(inputs.rejected_token_weights, mr)
        n_w, n_l = mc.sum(-1).clamp(min=1), mr.sum(-1).clamp(min=1)
        lp_w, lp_l = inputs.chosen_logps, inputs.rejected_logps
        s_w = (wc * lp_w).sum(-1) / n_w
        s_l = (wr * lp_l).sum(-1) / n_l
        r_w = ((wc * inputs.ref_chosen_logps).sum(-1) / n_w).detach()
        r_l = ((wr * inputs.ref_rejected_logps).sum(-1) / n_l).detach()
        z = (s_w - s_l) - (r_w - r_l)
        pref = -F.logsigmoid(beta * z)
        gate = ((lp_w.detach() < math.log(p.tau)) & (mc > 0)).to(lp_w.dtype)
        gated_weight = wc * gate
        denom = gated_weight.sum(-1).clamp(min=1.0)
        barrier = (gated_weight * -lp_w).sum(-1) / denom
        # logps/* are the weighted averages s(y), not sums
        metrics = preference_metrics(beta * (s_w - r_w), beta * (s_l - r_l), s_w, s_l)
        metrics.update({"tabpo/pref": pref.detach(), "tabpo/barrier": barrier.detach(),
                        "tabpo/gated_tokens": gate.sum(-1)})
        return LossOutput(pref + p.lam * barrier, metrics)
