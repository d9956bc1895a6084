"""Row layouts of a batch of pairs: which tokens go in which row, and who attends to whom.

A pair (x, y_w, y_l) becomes *segments*, and segments are laid out in *rows*:

- plain: two segments per pair, `x + y_w` and `x + y_l`, one per row, right-padded, with the usual
  2-D padding mask (chosen rows first, then rejected rows; the path every other layout is checked against).
- share_prompt: one segment per pair, `x + y_w + [x_last] + y_l`. The prompt is computed once instead of
  twice. A 4-D mask lets y_l see x but not y_w, and position ids of y_l continue from x's end. The
  repeated last prompt token (at x's last position, attending to x like the original) predicts the
  first rejected token, so the shift-by-one convention holds without special cases.
- packing: several segments per row (ceil(total / `pack_tokens`) rows of balanced length), position
  ids restarting at every segment and attention confined to it (block-diagonal mask). Padding is
  only what is left at the end of a row when the rows are stacked: none at all in one row.

Every position carries a segment id and a branch id (0: the shared prompt, seen by both responses;
1: the chosen response, or the whole sequence of a plain segment; 2: the rejected response; padding
has segment -1). A query attends to a key iff the key is not later, in the same segment, and of
branch 0 or the query's own branch; a padding query sees only itself (no empty softmax rows).

Whatever the layout, `split` returns per-pair tensors [B, T] of chosen and rejected completion
tokens, token k of the response at column k (T = the longest response of the batch): what the loss
plug-ins receive (`PairLossInputs`), so no loss knows the layout. The values are those of the plain
path up to float summation order (tests/test_layout.py checks 1e-9 in float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from posttrain.data.collate import pad_sequences
from posttrain.data.tokenize import TokenizedPair

PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class PairRows:
    """Model inputs of a batch of B pairs in some layout, and where each response token's log-prob lands.

    Log-probs come back as [n, W-1] (entry t-1 scores token t); `chosen_at[b, k]` is the flat index
    in them of token k of pair b's chosen response (0 where `chosen_mask` is 0), likewise rejected.
    """

    input_ids: torch.Tensor  # [n, W]
    attention_mask: torch.Tensor  # [n, W] (plain) or [n, 1, W, W]
    loss_mask: torch.Tensor  # [n, W], 1 on response tokens
    position_ids: Optional[torch.Tensor]  # [n, W], None for plain rows
    chosen_at: torch.Tensor  # [B, T] long
    rejected_at: torch.Tensor
    chosen_mask: torch.Tensor  # [B, T] float32
    rejected_mask: torch.Tensor
    chosen_weights: Optional[torch.Tensor] = None  # [B, T] per-token weights (token-weighted losses)
    rejected_weights: Optional[torch.Tensor] = None
    real_tokens: int = 0  # positions holding a real token
    total_positions: int = 0  # n x W

    def model_inputs(self) -> tuple:
        return self.input_ids, self.attention_mask, self.loss_mask, self.position_ids

    def split(self, logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs [n, W-1] -> (chosen [B, T], rejected [B, T]), zero off the responses."""
        flat = logps.reshape(-1)
        chosen = flat[self.chosen_at] * self.chosen_mask.to(logps.dtype)
        rejected = flat[self.rejected_at] * self.rejected_mask.to(logps.dtype)
        return chosen, rejected


def shared_length(pair: TokenizedPair) -> int:
    """Positions of a pair's shared-prompt segment: x + y_w + [x_last] + y_l."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + 1 + len(pair.rejected_ids)


def pair_segments(pair: TokenizedPair, share_prompt: bool):
    """The segments of one pair, each (token ids, position ids, branch ids, chosen label start,
    rejected label start) with None for a response the segment does not hold."""
    x, w, l = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
    P, C, R = len(x), len(w), len(l)
    if share_prompt:
        ids = x + w + [x[-1]] + l
        positions = list(range(P + C)) + list(range(P - 1, P + R))
        branches = [PROMPT] * (P - 1) + [CHOSEN] * (C + 1) + [REJECTED] * (R + 1)
        return [(ids, positions, branches, P, P + C + 1)]
    return [(x + w, list(range(P + C)), [CHOSEN] * (P + C), P, None),
            (x + l, list(range(P + R)), [CHOSEN] * (P + R), None, P)]


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Segment indices grouped into k = ceil(total / capacity) rows of balanced length: longest first, each
    into the currently shortest row. Stacked rows are padded to the longest, so balancing them keeps the padding
    small (filling rows in turn would leave a short last row); a row may exceed `capacity` by up to its longest
    segment."""
    k = max(1, math.ceil(sum(lengths) / capacity))
    rows: list[list[int]] = [[] for _ in range(k)]
    filled = [0] * k
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min(range(k), key=lambda r: filled[r])
        rows[r].append(i)
        filled[r] += lengths[i]
    return [row for row in rows if row]


def _response_tensors(values: list[list[float]], width: int, dtype) -> torch.Tensor:
    out = torch.zeros((len(values), width), dtype=dtype)
    for b, v in enumerate(values):
        out[b, :len(v)] = torch.tensor(v, dtype=dtype)
    return out


def build_pair_rows(pairs: list[TokenizedPair], pad_id: int, share_prompt: bool = False,
                    pack_tokens: Optional[int] = None, attention: str = "sdpa",
                    mask_dtype: torch.dtype = torch.float32) -> PairRows:
    """Lay out `pairs` (see the module docstring). `pack_tokens=None`: one segment per row; otherwise
    rows of about that many positions. `attention` is the model's attention implementation: sdpa takes
    a boolean 4-D mask, eager an additive one in `mask_dtype`."""
    if not pairs:
        raise ValueError("build_pair_rows: no pairs to lay out.")
    if (share_prompt or pack_tokens is not None) and any(not p.prompt_ids for p in pairs):
        raise ValueError("shared-prompt and packed rows need a non-empty prompt in every pair")
    B = len(pairs)
    segments, owner = [], []  # owner[s] = pair of segment s
    if share_prompt:
        for b, p in enumerate(pairs):
            segments += pair_segments(p, True)
            owner.append(b)
    else:  # chosen segments of every pair, then rejected ones: the plain row order
        per_pair = [pair_segments(p, False) for p in pairs]
        segments = [s[0] for s in per_pair] + [s[1] for s in per_pair]
        owner = list(range(B)) * 2
    lengths = [len(s[0]) for s in segments]
    plain = not share_prompt and pack_tokens is None
    rows = [[s] for s in range(len(segments))] if pack_tokens is None else pack(lengths, pack_tokens)
    n, W = len(rows), max(sum(lengths[s] for s in row) for row in rows)

    T = max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    chosen_at = torch.zeros((B, T), dtype=torch.long)
    rejected_at = torch.zeros((B, T), dtype=torch.long)
    if plain:
        input_ids, attention_mask, loss_mask = pad_sequences([(p.prompt_ids, p.chosen_ids) for p in pairs]
                                                             + [(p.prompt_ids, p.rejected_ids) for p in pairs], pad_id)
        position_ids = None
    else:
        input_ids = torch.full((n, W), pad_id, dtype=torch.long)
        position_ids = torch.zeros((n, W), dtype=torch.long)
        segment = torch.full((n, W), -1, dtype=torch.long)
        branch = torch.full((n, W), -1, dtype=torch.long)
        loss_mask = torch.zeros((n, W), dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for s in row:
            ids, positions, branches, chosen_start, rejected_start = segments[s]
            b, L = owner[s], len(ids)
            if not plain:
                input_ids[r, offset:offset + L] = torch.tensor(ids)
                position_ids[r, offset:offset + L] = torch.tensor(positions)
                branch[r, offset:offset + L] = torch.tensor(branches)
                segment[r, offset:offset + L] = s
            for start, response, at in ((chosen_start, pairs[b].chosen_ids, chosen_at),
                                        (rejected_start, pairs[b].rejected_ids, rejected_at)):
                if start is None:
                    continue
                first = offset + start  # row position of the response's first token
                if not plain:
                    loss_mask[r, first:first + len(response)] = 1
                # token at row position t is scored at log-prob column t - 1
                at[b, :len(response)] = r * (W - 1) + torch.arange(first - 1, first - 1 + len(response))
            offset += L

    if not plain:
        causal = torch.ones((W, W), dtype=torch.bool).tril()
        sq, sk = segment[:, :, None], segment[:, None, :]
        bq, bk = branch[:, :, None], branch[:, None, :]
        allowed = causal[None] & (sq == sk) & (sq >= 0) & ((bk == PROMPT) | (bk == bq))
        allowed |= torch.eye(W, dtype=torch.bool)[None] & (sq < 0)
        allowed = allowed[:, None]  # [n, 1, q, k]
        if attention == "sdpa":
            attention_mask = allowed
        else:  # eager attention adds the mask to the scores
            attention_mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill(~allowed,
                                                                                     torch.finfo(mask_dtype).min)
    chosen_mask = _response_tensors([[1.0] * len(p.chosen_ids) for p in pairs], T, torch.float32)
    rejected_mask = _response_tensors([[1.0] * len(p.rejected_ids) for p in pairs], T, torch.float32)
    chosen_weights = rejected_weights = None
    if any(p.chosen_weights is not None or p.rejected_weights is not None for p in pairs):
        for p in pairs:
            for weights, response in ((p.chosen_weights, p.chosen_ids), (p.rejected_weights, p.rejected_ids)):
                if weights is not None and len(weights) != len(response):
                    raise ValueError(f"{p.source} row {p.row}: {len(weights)} token weights for {len(response)} "
                                     f"response tokens.")
        chosen_weights = _response_tensors([p.chosen_weights or [1.0] * len(p.chosen_ids) for p in pairs], T,
                                           torch.float32)
        rejected_weights = _response_tensors([p.rejected_weights or [1.0] * len(p.rejected_ids) for p in pairs], T,
                                             torch.float32)
    return PairRows(input_ids, attention_mask, loss_mask, position_ids, chosen_at, rejected_at, chosen_mask,
                    rejected_mask, chosen_weights, rejected_weights, real_tokens=sum(lengths),
                    total_positions=int(input_ids.numel()))
