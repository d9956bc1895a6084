"""Collation of tokenised pairs into one concatenated batch: chosen rows first, then rejected rows.

`loss_mask[i, t] = 1` where token t of row i is a completion token; padding is on the right and
masked. When pairs carry per-token weights, `token_weights[i, t]` is the weight of completion token
t of row i (1 where a pair has none, 0 off the completion). A row with `pair_weight = 0` only fills a micro-batch (a process with no real pair left in
an uneven last step still has to run forward and backward for the collective operations).
"""

from __future__ import annotations

import torch

from posttrain.data.tokenize import TokenizedPair


def pad_sequences(sequences: list[tuple[list[int], list[int]]], pad_id: int):
    """(input_ids, attention_mask, loss_mask) for (prompt, completion) sequences, right-padded; the loss
    mask is 1 on completion tokens."""
    length = max(len(a) + len(b) for a, b in sequences)
    n = len(sequences)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    loss_mask = torch.zeros((n, length), dtype=torch.long)
    for i, (prompt, completion) in enumerate(sequences):
        seq = prompt + completion
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention_mask[i, :len(seq)] = 1
        loss_mask[i, len(prompt):len(seq)] = 1
    return input_ids, attention_mask, loss_mask


def collate_pairs(pairs: list[TokenizedPair], pad_id: int, weights: list[float] | None = None) -> dict:
    if not pairs:
        raise ValueError("collate_pairs: no pairs to collate.")
    if weights is not None and len(weights) != len(pairs):
        raise ValueError(f"collate_pairs: {len(weights)} weights for {len(pairs)} pairs.")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    input_ids, attention_mask, loss_mask = pad_sequences(rows, pad_id)
    n, length = input_ids.shape
    weight = torch.tensor(weights if weights is not None else [1.0] * len(pairs), dtype=torch.float32)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
             "pair_weight": weight, "num_pairs": len(pairs)}
    if any(p.chosen_weights is not None or p.rejected_weights is not None for p in pairs):
        token_weights = torch.zeros((n, length), dtype=torch.float32)
        per_row = [p.chosen_weights for p in pairs] + [p.rejected_weights for p in pairs]
        for i, ((prompt, completion), row_weights) in enumerate(zip(rows, per_row)):
            if row_weights is None:
                row_weights = [1.0] * len(completion)
            if len(row_weights) != len(completion):
                raise ValueError(f"collate_pairs: row {i} has {len(row_weights)} token weights for "
                                 f"{len(completion)} completion tokens.")
            token_weights[i, len(prompt):len(prompt) + len(completion)] = torch.tensor(row_weights)
        batch["token_weights"] = token_weights
    return batch
