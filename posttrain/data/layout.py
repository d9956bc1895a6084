"""Row layouts of a batch of (prompt, completion) sequences: which tokens go in which row, and who attends to whom.

Sequences become *segments*, and segments are laid out in *rows*:

- plain: one segment per sequence, `x + y`, one per row, right-padded, with the usual 2-D padding
  mask (the path every other layout is checked against).
- shared prompt: sequences that share a prompt x (a pair's chosen and rejected response, a group's G
  completions) become one segment, `x + y_1 + [x_last] + y_2 + ... + [x_last] + y_k`. The prompt is
  computed once instead of k times. A 4-D mask lets each y_j see x and itself but no other y, and the
  position ids of each y_j continue from x's end. Each repeated last prompt token (at x's last
  position, attending to x like the original) predicts the first token of the next response, so the
  shift-by-one convention holds without special cases.
- packing: several segments per row (ceil(total / `pack_tokens`) rows of balanced length), position
  ids restarting at every segment and attention confined to it (block-diagonal mask). Padding is
  only what is left at the end of a row when the rows are stacked: none at all in one row.

Every position carries a segment id and a branch id (0: the shared prompt, seen by every response;
j: the j-th response of the segment, or the whole sequence of a plain segment; padding has segment -1).
A query attends to a key iff the key is not later, in the same segment, and of branch 0 or the query's
own branch; a padding query sees only itself (no empty softmax rows).

Whatever the layout, `SequenceRows.gather` returns [N, T] completion log-probs, token k of sequence
i's completion at column k (T = the longest completion): pairs split them into chosen and rejected
(`PairRows.split`, what `PairLossInputs` holds), groups take them as they are (`GroupLossInputs`), so
no loss knows the layout. The values are those of the plain path up to float summation order
(tests/test_layout.py checks 1e-9 in float64).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from posttrain.data.tokenize import TokenizedPair

HOST = torch.device("cpu")  # rows are built here from token lists, then moved once (SequenceRows.to)
PROMPT = 0  # branch of the shared prompt; response j of a segment has branch j (1, 2, ...)


def pad_sequences(sequences: list[tuple[list[int], list[int]]], pad_id: int):
    """(input_ids, attention_mask, loss_mask) for (prompt, completion) sequences, right-padded; the loss
    mask is 1 on completion tokens."""
    length = max(len(a) + len(b) for a, b in sequences)
    n = len(sequences)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long, device=HOST)
    attention_mask = torch.zeros((n, length), dtype=torch.long, device=HOST)
    loss_mask = torch.zeros((n, length), dtype=torch.long, device=HOST)
    for i, (prompt, completion) in enumerate(sequences):
        seq = prompt + completion
        input_ids[i, :len(seq)] = torch.tensor(seq, device=HOST)
        attention_mask[i, :len(seq)] = 1
        loss_mask[i, len(prompt):len(seq)] = 1
    return input_ids, attention_mask, loss_mask


@dataclass
class SequenceRows:
    """Model inputs of N sequences in some layout, and where each completion token's log-prob lands.

    Log-probs come back as [n, W-1] (entry t-1 scores token t); `completion_at[i, k]` is the flat index
    in them of token k of sequence i's completion (0 where `completion_mask` is 0).
    """

    input_ids: torch.Tensor  # [n, W]
    attention_mask: torch.Tensor  # [n, W] (plain) or [n, 1, W, W]
    loss_mask: torch.Tensor  # [n, W], 1 on completion tokens
    position_ids: Optional[torch.Tensor]  # [n, W], None for plain rows
    completion_at: torch.Tensor  # [N, T] long
    completion_mask: torch.Tensor  # [N, T] float32
    real_tokens: int = 0  # positions holding a real token
    total_positions: int = 0  # n x W

    def model_inputs(self) -> tuple:
        return self.input_ids, self.attention_mask, self.loss_mask, self.position_ids

    def as_batch(self) -> dict:
        """The model inputs by name."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "loss_mask": self.loss_mask,
                "position_ids": self.position_ids}

    def to(self, device: torch.device) -> "SequenceRows":
        """The same rows with every tensor on `device`: the one place a micro-batch is moved. Rows are built on
        the host (from token lists) and moved once, with non-blocking copies."""
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return type(self)(**moved)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Per-position values [n, W-1] -> [N, T] per completion token (differentiable), zero off the completions."""
        return values.reshape(-1)[self.completion_at] * self.completion_mask.to(values.dtype)


def segment_length(prompt: list[int], completions: list[list[int]]) -> int:
    """Positions of a shared-prompt segment: x + y_1 + [x_last] + y_2 + ... (one position per extra response)."""
    return len(prompt) + sum(len(c) for c in completions) + len(completions) - 1


def _segment(prompt: list[int], completions: list[list[int]], members: list[int]):
    """One segment: (token ids, position ids, branch ids, [(sequence, label start)]). Several members share the
    prompt; one member is a plain sequence."""
    P = len(prompt)
    if len(members) == 1:
        L = P + len(completions[0])
        return prompt + completions[0], list(range(L)), [1] * L, [(members[0], P)]
    ids, positions, branches, starts = prompt[:-1], list(range(P - 1)), [PROMPT] * (P - 1), []
    for j, (completion, member) in enumerate(zip(completions, members), start=1):
        starts.append((member, len(ids) + 1))
        ids = ids + [prompt[-1]] + completion
        positions += list(range(P - 1, P + len(completion)))
        branches += [j] * (len(completion) + 1)
    return ids, positions, branches, starts


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


def forward_cost(rows: list[list[int]], weights: int, layers: int, attention_width: int, by_segment: bool = False,
                 padded_width: Optional[int] = None) -> float:
    """FLOPs of a forward over rows holding segments of these lengths, each row `padded_width` positions wide (None:
    its segments' total) (docs/performance.md, the cost model): per position 2 x weights for the matmuls, and for
    attention 4 x layers x attention_width x W per position of a row of W masked as a whole, or x its segment's
    length with `by_segment` (sdpa segment by segment, posttrain.core.segments)."""
    cost = 0.0
    for segments in rows:
        W = padded_width or sum(segments)
        attended = sum(L * L for L in segments) if by_segment else W * W
        cost += 2 * weights * W + 4 * layers * attention_width * attended
    return cost


def packing_pays(segment_batches: list[list[int]], capacity: int, weights: int, layers: int,
                 attention_width: int, by_segment: bool = False, margin: float = 0.9) -> bool:
    """Whether packing micro-batches of segments of these lengths into rows of about `capacity` positions costs
    at most `margin` of stacking them padded to the longest, by `forward_cost`. Packing removes padding; where
    attention runs over whole rows it makes each row's attention quadratic in the whole row, so it pays where
    lengths vary, not where they are all alike; attended `by_segment` it adds no attention and pays wherever the
    padding it removes is worth more than the margin."""
    stacked = packed = 0.0
    for lengths in segment_batches:
        stacked += forward_cost([[L] for L in lengths], weights, layers, attention_width, by_segment,
                                padded_width=max(lengths))
        packed += forward_cost([[lengths[i] for i in row] for row in pack(lengths, capacity)], weights, layers,
                               attention_width, by_segment)
    return packed <= margin * stacked


def build_sequence_rows(sequences: list[tuple[list[int], list[int]]], pad_id: int,
                        shared_by: Optional[list] = None, pack_tokens: Optional[int] = None,
                        attention: str = "sdpa", mask_dtype: torch.dtype = torch.float32) -> SequenceRows:
    """Lay out (prompt, completion) `sequences` (see the module docstring). `shared_by[i]`: a key; sequences with
    the same key share one segment, their prompt computed once (their prompts must be equal); None: one segment
    per sequence. `pack_tokens=None`: one segment per row; otherwise rows of about that many positions.
    `attention` is the model's attention implementation: sdpa takes a boolean 4-D mask, eager an additive one in
    `mask_dtype`."""
    if not sequences:
        raise ValueError("build_sequence_rows: no sequences to lay out.")
    custom = shared_by is not None or pack_tokens is not None
    if custom and any(not prompt for prompt, _ in sequences):
        raise ValueError("shared-prompt and packed rows need a non-empty prompt in every sequence")
    members: dict = {}
    for i, key in enumerate(shared_by if shared_by is not None else range(len(sequences))):
        members.setdefault(key, []).append(i)
    segments = []
    for key, group in members.items():
        prompt = sequences[group[0]][0]
        if any(sequences[i][0] != prompt for i in group):
            raise ValueError(f"build_sequence_rows: sequences sharing the key {key!r} have different prompts")
        segments.append(_segment(prompt, [sequences[i][1] for i in group], group))
    lengths = [len(seg[0]) for seg in segments]
    rows = [[s] for s in range(len(segments))] if pack_tokens is None else pack(lengths, pack_tokens)
    n, W = len(rows), max(sum(lengths[s] for s in row) for row in rows)

    N, T = len(sequences), max(1, max(len(c) for _, c in sequences))
    completion_at = torch.zeros((N, T), dtype=torch.long, device=HOST)
    completion_mask = torch.zeros((N, T), dtype=torch.float32, device=HOST)
    if not custom:
        input_ids, attention_mask, loss_mask = pad_sequences(sequences, pad_id)
        position_ids = None
        W = input_ids.shape[1]
    else:
        input_ids = torch.full((n, W), pad_id, dtype=torch.long, device=HOST)
        position_ids = torch.zeros((n, W), dtype=torch.long, device=HOST)
        segment = torch.full((n, W), -1, dtype=torch.long, device=HOST)
        branch = torch.full((n, W), -1, dtype=torch.long, device=HOST)
        loss_mask = torch.zeros((n, W), dtype=torch.long, device=HOST)
    for r, row in enumerate(rows):
        offset = 0
        for s in row:
            ids, positions, branches, starts = segments[s]
            L = len(ids)
            if custom:
                input_ids[r, offset:offset + L] = torch.tensor(ids, device=HOST)
                position_ids[r, offset:offset + L] = torch.tensor(positions, device=HOST)
                branch[r, offset:offset + L] = torch.tensor(branches, device=HOST)
                segment[r, offset:offset + L] = s
            for i, start in starts:
                first, C = offset + start, len(sequences[i][1])  # row position of the completion's first token
                if custom:
                    loss_mask[r, first:first + C] = 1
                # token at row position t is scored at log-prob column t - 1
                completion_at[i, :C] = r * (W - 1) + torch.arange(first - 1, first - 1 + C, device=HOST)
                completion_mask[i, :C] = 1.0
            offset += L

    if custom:
        causal = torch.ones((W, W), dtype=torch.bool, device=HOST).tril()
        sq, sk = segment[:, :, None], segment[:, None, :]
        bq, bk = branch[:, :, None], branch[:, None, :]
        allowed = causal[None] & (sq == sk) & (sq >= 0) & ((bk == PROMPT) | (bk == bq))
        allowed |= torch.eye(W, dtype=torch.bool, device=HOST)[None] & (sq < 0)
        allowed = allowed[:, None]  # [n, 1, q, k]
        if attention == "sdpa":
            attention_mask = allowed
        else:  # eager attention adds the mask to the scores
            attention_mask = torch.zeros(allowed.shape, dtype=mask_dtype, device=HOST).masked_fill(~allowed,
                                                                                     torch.finfo(mask_dtype).min)
    return SequenceRows(input_ids, attention_mask, loss_mask, position_ids, completion_at, completion_mask,
                        real_tokens=sum(lengths), total_positions=int(input_ids.numel()))


# ---------------------------------------------------------------------------------------------- pairs
@dataclass
class PairRows(SequenceRows):
    """The rows of B pairs: sequences 0..B-1 are the chosen responses, B..2B-1 the rejected ones."""

    chosen_weights: Optional[torch.Tensor] = None  # [B, T] per-token weights (token-weighted losses)
    rejected_weights: Optional[torch.Tensor] = None

    @property
    def num_pairs(self) -> int:
        return self.completion_at.shape[0] // 2

    @property
    def chosen_at(self) -> torch.Tensor:
        return self.completion_at[:self.num_pairs]

    @property
    def rejected_at(self) -> torch.Tensor:
        return self.completion_at[self.num_pairs:]

    @property
    def chosen_mask(self) -> torch.Tensor:
        return self.completion_mask[:self.num_pairs]

    @property
    def rejected_mask(self) -> torch.Tensor:
        return self.completion_mask[self.num_pairs:]

    def split(self, logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs [n, W-1] -> (chosen [B, T], rejected [B, T]), zero off the responses."""
        both = self.gather(logps)
        return both[:self.num_pairs], both[self.num_pairs:]


def shared_length(pair: TokenizedPair) -> int:
    """Positions of a pair's shared-prompt segment: x + y_w + [x_last] + y_l."""
    return segment_length(pair.prompt_ids, [pair.chosen_ids, pair.rejected_ids])


def _response_tensors(values: list[list[float]], width: int, dtype) -> torch.Tensor:
    out = torch.zeros((len(values), width), dtype=dtype, device=HOST)
    for b, v in enumerate(values):
        out[b, :len(v)] = torch.tensor(v, dtype=dtype, device=HOST)
    return out


def build_pair_rows(pairs: list[TokenizedPair], pad_id: int, share_prompt: bool = False,
                    pack_tokens: Optional[int] = None, attention: str = "sdpa",
                    mask_dtype: torch.dtype = torch.float32) -> PairRows:
    """Lay out `pairs`: their chosen sequences, then their rejected ones, each pair's two sharing one segment when
    `share_prompt` (see `build_sequence_rows`)."""
    if not pairs:
        raise ValueError("build_pair_rows: no pairs to lay out.")
    B = len(pairs)
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    rows = build_sequence_rows(sequences, pad_id, shared_by=list(range(B)) * 2 if share_prompt else None,
                               pack_tokens=pack_tokens, attention=attention, mask_dtype=mask_dtype)
    chosen_weights = rejected_weights = None
    if any(p.chosen_weights is not None or p.rejected_weights is not None for p in pairs):
        T = rows.completion_at.shape[1]
        for p in pairs:
            for weights, response in ((p.chosen_weights, p.chosen_ids), (p.rejected_weights, p.rejected_ids)):
                if weights is not None and len(weights) != len(response):
                    raise ValueError(f"{p.source} row {p.row}: {len(weights)} token weights for {len(response)} "
                                     f"response tokens.")
        chosen_weights = _response_tensors([p.chosen_weights or [1.0] * len(p.chosen_ids) for p in pairs], T,
                                           torch.float32)
        rejected_weights = _response_tensors([p.rejected_weights or [1.0] * len(p.rejected_ids) for p in pairs], T,
                                             torch.float32)
    return PairRows(**vars(rows), chosen_weights=chosen_weights, rejected_weights=rejected_weights)
