"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 7-8), as TRL
1.16's `KTOTrainer`. Trains on unpaired rows: a prompt, one completion and a label (desirable or not).

    rho  = S(y) - S_ref(y)                                   the completion's implicit reward / beta
    z0   = max(0, mean over the micro-batch of S(y'|x) - S_ref(y'|x))   detached; y' a mismatched completion
    kto:                desirable  lambda_D (1 - sigmoid(beta (rho - z0)))
                        undesirable lambda_U (1 - sigmoid(beta (z0 - rho)))
    apo_zero_unpaired:  desirable  lambda_D (1 - sigmoid(beta rho)),  undesirable lambda_U sigmoid(beta rho)
                        (APO, D'Oosterlinck et al. 2024, unpaired)

The mismatched completion y' of a row is the previous row's completion (TRL's rotation by one); with
`kl_chunk: N` the rotation stays within consecutive chunks of N rows, as TRL rotates within each
`per_device_train_batch_size` batch. The pair core carries it as the row's "rejected" sequence (prompt
x with y'), so its policy and reference log-probs come from the same forward passes as the
completion's; z0 is detached, so y' gets no gradient. TRL averages z0 over its per-device batch (then
over processes); here it is the micro-batch's, on each process. Sequence level.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch

from posttrain.data.readers import KTO_DESIRABLE, row_kind
from posttrain.losses.base import LossOutput, LossPlugin, PairLossInputs, reference_sums, register_loss, sequence_sums


@register_loss("kto")
class KTOLoss(LossPlugin):
    level = "sequence"
    row_kinds = ("unpaired",)

    @dataclass
    class Params:
        beta: float = 0.1
        desirable_weight: float = 1.0  # lambda_D
        undesirable_weight: float = 1.0  # lambda_U
        loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
        kl_chunk: Optional[int] = None  # rotate completions within chunks of this many rows (None: the whole data)

        def validate(self):
            if self.beta <= 0:
                raise ValueError(f"beta must be positive, got {self.beta}")
            if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
                raise ValueError("desirable_weight and undesirable_weight must be positive")
            if self.kl_chunk is not None and self.kl_chunk < 2:
                raise ValueError(f"kl_chunk must be at least 2 (a row's mismatched completion is another row's), "
                                 f"got {self.kl_chunk}")

    def prepare_pairs(self, pairs: list, tokenizer) -> list:
        """Each unpaired row's mismatched completion: the previous row's, within its chunk."""
        unpaired = [p for p in pairs if row_kind(p) == "unpaired"]
        chunk = self.params.kl_chunk or max(len(unpaired), 1)
        out = {}
        for start in range(0, len(unpaired), chunk):
            block = unpaired[start:start + chunk]
            for pair, other in zip(block, block[-1:] + block[:-1]):
                out[id(pair)] = replace(pair, rejected_ids=list(other.chosen_ids), rejected_text=other.chosen_text,
                                        rejected_tail=other.chosen_tail)
        return [out.get(id(p), p) for p in pairs]

    def __call__(self, inputs: PairLossInputs) -> LossOutput:
        p = self.params
        s = sequence_sums(inputs.chosen_logps, inputs.chosen_mask)
        kl_policy = sequence_sums(inputs.rejected_logps, inputs.rejected_mask)
        r, kl_ref = reference_sums(inputs)
        rho = s - r
        weight = inputs.pair_weight
        z0 = (((kl_policy - kl_ref).detach() * weight).sum() / weight.sum().clamp(min=1)).clamp(min=0)
        desirable = inputs.extras[KTO_DESIRABLE]
        if p.loss_type == "kto":
            loss_d, loss_u = 1 - torch.sigmoid(p.beta * (rho - z0)), 1 - torch.sigmoid(p.beta * (z0 - rho))
        else:
            loss_d, loss_u = 1 - torch.sigmoid(p.beta * rho), torch.sigmoid(p.beta * rho)
        per_row = desirable * p.desirable_weight * loss_d + (1 - desirable) * p.undesirable_weight * loss_u
        metrics = {"kl": z0.expand_as(rho), "rewards/implicit": (p.beta * rho).detach(), "desirable_share": desirable,
                   "logps/completion": s.detach()}
        return LossOutput(per_row, metrics)
