"""Online DPO from groups (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", with
rewards in place of an AI judge): each sampled group's completions are paired by reward and trained with
any registered pair loss (DPO, IPO, SimPO, ...), the reference being the run's. One trainer and one online
loop; the pair loss is the offline plug-in, unchanged.

    pairing best_worst: per group, the first completion with the highest reward against the first with the
                        lowest; a group whose rewards are all equal gives no pair
    pairing all_pairs:  every (y_i, y_j) of a group with r_i > r_j (ties dropped)
    loss = mean over the step's pairs of pair_loss(y_w, y_l)

Pairs never cross groups, and micro-batches hold whole groups, so every pair is inside one micro-batch.
`compute_advantages` sees the whole rollout batch and returns, per completion, N / P (completions over
pairs in the step); each pair's loss sits on its chosen completion's row times that factor, so the
core's mean over the step's completions is the mean over its pairs. Sequence level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from posttrain.losses.base import LOSSES, LossOutput, PairLossInputs, register_loss
from posttrain.losses.group import GroupLoss, GroupLossInputs, RolloutBatch
from posttrain.losses.registry import CombinedLoss


def reward_pairs(rewards: torch.Tensor, group_index: torch.Tensor, real: torch.Tensor,
                 pairing: str) -> list[tuple[int, int]]:
    """(chosen row, rejected row) pairs by reward within each group, among the `real` rows."""
    pairs = []
    for group in torch.unique(group_index[real]).tolist():
        rows = [i for i in torch.nonzero((group_index == group) & real).flatten().tolist()]
        values = [float(rewards[i]) for i in rows]
        if pairing == "best_worst":
            best, worst = rows[values.index(max(values))], rows[values.index(min(values))]
            if max(values) > min(values):
                pairs.append((best, worst))
        else:
            pairs += [(i, j) for i, a in zip(rows, values) for j, b in zip(rows, values) if a > b]
    return pairs


@register_loss("online_dpo")
class OnlinePairLoss(GroupLoss):
    level = "sequence"

    @dataclass
    class Params:
        pair_loss: str = "dpo"  # any registered pair loss
        pair_params: dict = field(default_factory=dict)  # its params, checked as in an offline recipe
        pairing: Literal["best_worst", "all_pairs"] = "best_worst"

    def __init__(self, params=None):
        super().__init__(params)
        cls = LOSSES.get(self.params.pair_loss)
        if cls.data_kind != "pairs":
            raise ValueError(f"pair_loss {self.params.pair_loss!r} trains on {cls.data_kind}, not on pairs")
        plugin = cls(LOSSES.params(cls, self.params.pair_params, f"pair_params ({self.params.pair_loss})"))
        if isinstance(plugin, CombinedLoss) and len(plugin.terms) == 1 and plugin.terms[0][0] == 1.0:
            plugin = plugin.terms[0][1]  # SimPO without its SFT term
        if isinstance(plugin, CombinedLoss) or plugin.level != "sequence":
            raise ValueError(f"online_dpo trains one sequence-level pair loss (dpo, rdpo, simpo without sft_weight, "
                             f"...); {self.params.pair_loss!r} with these params is {plugin.level}-level or a sum "
                             f"of losses")
        self.pair_loss = plugin
        self.needs_reference = plugin.needs_reference

    def compute_advantages(self, batch: RolloutBatch) -> torch.Tensor:
        """N / P for every completion: the step's completions over its pairs (0 when it has no pair)."""
        real = torch.ones_like(batch.group_index, dtype=torch.bool)
        n_pairs = len(reward_pairs(batch.rewards, batch.group_index, real, self.params.pairing))
        scale = len(batch.rewards) / n_pairs if n_pairs else 0.0
        return torch.full_like(batch.rewards, scale, dtype=torch.float64)

    def __call__(self, inputs: GroupLossInputs) -> LossOutput:
        lp, mask = inputs.logps, inputs.mask.to(inputs.logps.dtype)
        if inputs.rewards is None or inputs.group_index is None:
            raise ValueError("online_dpo needs the completions' rewards and group_index")
        pairs = reward_pairs(inputs.rewards, inputs.group_index, inputs.completion_weight > 0, self.params.pairing)
        per_row = lp.new_zeros(lp.shape[0])
        if not pairs:
            return LossOutput(per_row + 0 * lp.sum(), {"pairs": per_row.detach()})
        w = torch.tensor([i for i, _ in pairs], device=lp.device)
        l = torch.tensor([j for _, j in pairs], device=lp.device)  # noqa: E741
        ref = inputs.ref_logps.detach() if inputs.ref_logps is not None else None
        pair_inputs = PairLossInputs(chosen_logps=lp[w], rejected_logps=lp[l], chosen_mask=mask[w], rejected_mask=mask[l],
                                     pair_weight=lp.new_ones(len(pairs)),
                                     ref_chosen_logps=ref[w] if ref is not None else None,
                                     ref_rejected_logps=ref[l] if ref is not None else None)
        out = self.pair_loss(pair_inputs)
        scale = inputs.advantages.detach().to(lp.dtype).reshape(-1)[w]
        per_row = per_row.index_add(0, w, out.loss * scale)
        counts = lp.new_zeros(lp.shape[0]).index_add(0, w, lp.new_ones(len(pairs)))
        return LossOutput(per_row, {"pairs": counts})
