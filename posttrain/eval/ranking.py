"""Ranking accuracy (Chen et al. 2024, Def. 2.3; spec section 11) as a reusable scorer.

    R(x, y_w, y_l; pi) = 1[ log pi(y_w|x) >= log pi(y_l|x) ]   (summed completion log-probs)
    R~ compares mean token log-probs instead (length-normalised, App. C Eq. 15).

`score_pairs` computes the summed log-probs and lengths of both responses of every pair, batched,
without gradient, with pairs sorted by length so that batches carry little padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from posttrain.data.collate import collate_pairs
from posttrain.data.tokenize import TokenizedPair


@dataclass
class PairScores:
    """Summed log-probs and token counts of chosen (w) and rejected (l) responses, one entry per pair."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor

    def ranking_accuracy(self) -> float:
        return (self.chosen_logps >= self.rejected_logps).double().mean().item()

    def normalised_ranking_accuracy(self) -> float:
        return (self.chosen_logps / self.chosen_lengths >= self.rejected_logps / self.rejected_lengths
                ).double().mean().item()

    def __len__(self) -> int:
        return len(self.chosen_logps)


@torch.no_grad()
def score_pairs(logprob_model, pairs: list[TokenizedPair], pad_id: int, batch_size: int = 16,
                progress: bool = False, autocast_bf16: bool = False) -> PairScores:
    """Score every pair with `logprob_model` (a PolicyLogProbs, or anything with its forward)."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids) + max(len(pairs[i].chosen_ids),
                                                                                   len(pairs[i].rejected_ids)))
    n = len(pairs)
    chosen, rejected = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    was_training = logprob_model.training
    logprob_model.eval()
    try:
        for start in tqdm(range(0, n, batch_size), desc="scoring pairs", disable=not progress, leave=False):
            index = order[start:start + batch_size]
            batch = collate_pairs([pairs[i] for i in index], pad_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
                logps = logprob_model(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
            sums = logps.double().sum(-1)
            k = len(index)
            chosen[index] = sums[:k]
            rejected[index] = sums[k:]
    finally:
        logprob_model.train(was_training)
    lengths_w = torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.float64)
    lengths_l = torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.float64)
    return PairScores(chosen, rejected, lengths_w, lengths_l)
