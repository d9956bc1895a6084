"""sdpa over posttrain's layout masks one piece of a row at a time (docs/performance.md, "Attention by segment").

The shared-prompt and packed layouts (posttrain.data.layout) give the model a boolean 4-D mask [rows, 1, W, W] in
which no query attends outside its own segment, and within a shared segment x + y_1 + [x_last] + y_2 + ... each
response attends to the prompt and causally to itself. sdpa given the whole mask multiplies every query of a row by
every key of it and masks afterwards: W^2 products per head. Here each row is cut into blocks at every position
that no later query reaches back over (segment starts), and each segment into pieces: the prompt and the first
response are one causal piece (`is_causal`: the kernel skips the blocks above the diagonal), each later response
one piece whose keys are the prompt's and its own, gathered, under their part of the mask. A packed row of four
equal plain segments then costs an eighth of its whole-row products, a shared pair's segment about half. Every
query sees the same keys under the same mask, so the result is sdpa's over the whole row up to float summation
order (tests/test_layout.py). Rows are cut once per mask (the same tensor reaches every layer) and the pieces kept
on it. A row is attended whole where the products the pieces save would not pay for the extra calls (a short
segment and its padding), or where its mask lets a query see a later block; a segment whose mask is not of the
layout's form, or with a response shorter than MIN_BLOCK, is one piece under its part of the mask.

Used for the forwards of `PolicyLogProbs` (`segment_attention_for`) when the model's attention is sdpa and the mask
is a boolean 4-D one, and not under gradient checkpointing, whose recomputation runs outside that forward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SEGMENT_ATTENTION = "posttrain_segments"
MIN_BLOCK = 32  # runs of shorter blocks (a row's padding: one position each) are joined into one
CALL_PRODUCTS = 128 * 128  # query-key products an extra sdpa call must save to be worth its overhead


Piece = tuple  # (query start, query end, ((key start, key end), ...), mask [1, 1, queries, keys] or None: causal)


def _branch_pieces(allowed: torch.Tensor, start: int, end: int) -> list[Piece] | None:
    """The pieces of one segment [start, end) of a row's mask: its first run of queries attending causally from the
    segment's start (the prompt and the first response: one causal piece), then each later response attending to
    the prompt's keys and causally to its own (one piece, keys gathered from the two ranges). None where the
    segment's mask is not of that form or a response is shorter than MIN_BLOCK."""
    block = allowed[start:end, start:end]
    n = end - start
    index = torch.arange(n, device=allowed.device)
    unseen = ~block & (index[None, :] <= index[:, None])
    run_start = torch.where(unseen, index[None, :], -1).max(-1).values + 1  # where each query's own run of keys starts
    firsts = [0] + (run_start[1:] != run_start[:-1]).nonzero().flatten().add(1).tolist()
    pieces = []
    for a, b in zip(firsts, firsts[1:] + [n]):
        if (b - a < MIN_BLOCK and len(firsts) > 1) or int(run_start[a]) != a or block[a:b, b:].any():
            return None
        own = block[a:b, a:b]
        if not torch.equal(own, torch.ones_like(own).tril()):
            return None
        if a == 0:
            pieces.append((start, start + b, ((start, start + b),), None))
            continue
        prompt_end = int(block[a].to(torch.uint8).argmin())  # the prompt's keys: the row's first run
        if not (block[a:b, :prompt_end].all() and not block[a:b, prompt_end:a].any()):
            return None
        mask = torch.cat([block[a:b, :prompt_end], own], dim=1)[None, None]
        pieces.append((start + a, start + b, ((start, start + prompt_end), (start + a, start + b)), mask))
    return pieces


def _products(piece: Piece) -> int:
    """Query-key products sdpa computes for a piece: a causal one skips the blocks above the diagonal."""
    q0, q1, keys, mask = piece
    width = sum(k1 - k0 for k0, k1 in keys)
    return (q1 - q0) * (q1 - q0 + 1) // 2 if mask is None else (q1 - q0) * width


def row_pieces(allowed: torch.Tensor) -> list[Piece] | None:
    """The pieces one row's mask `allowed` [W, W] (query, key) is attended in, in query order: the row cut into
    blocks at every position that no query at or after it reaches back over (a segment's start, every padding
    position; a run of blocks shorter than MIN_BLOCK joined into one), each segment by its branches
    (`_branch_pieces`) or else whole with its part of the mask. None, the row attended whole, where the pieces
    would not save CALL_PRODUCTS query-key products per extra call (a short segment and its padding) or where a
    query attends to a key after its block."""
    W = allowed.shape[0]
    positions = torch.arange(W, device=allowed.device)
    first_key = torch.where(allowed.any(-1), allowed.to(torch.uint8).argmax(-1), positions)
    reach = first_key.flip(0).cummin(0).values.flip(0)  # the earliest key any query at or after t attends to
    cuts = sorted({0, W, *(reach == positions).nonzero().flatten().tolist()})
    bounds: list[tuple[int, int]] = []
    short_before = False
    for start, end in zip(cuts, cuts[1:]):
        short = end - start < MIN_BLOCK
        if short and short_before:
            start = bounds.pop()[0]  # a run of short blocks (padding: one position each) is one block
        bounds.append((start, end))
        short_before = short
    pieces: list[Piece] = []
    for start, end in bounds:
        if allowed[start:end, end:].any():
            return None
        pieces += _branch_pieces(allowed, start, end) or [
            (start, end, ((start, end),), allowed[start:end, start:end][None, None])]
    if W * W - sum(map(_products, pieces)) < (len(pieces) - 1) * CALL_PRODUCTS:
        return None
    return pieces


def _pieces(mask: torch.Tensor) -> list:
    """Each row's pieces, computed once per mask tensor and kept on it."""
    pieces = getattr(mask, "_posttrain_pieces", None)
    if pieces is None:
        pieces = [row_pieces(mask[row, 0]) for row in range(mask.shape[0])]
        mask._posttrain_pieces = pieces
    return pieces


def _keys(tensor: torch.Tensor, ranges: tuple) -> torch.Tensor:
    parts = [tensor[:, :, k0:k1] for k0, k1 in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: sdpa piece by piece over a boolean 4-D mask without a KV cache (query and
    key of one length), each row that `row_pieces` cuts; anything else goes to transformers' sdpa."""
    if (attention_mask is None or attention_mask.dim() != 4 or attention_mask.dtype != torch.bool
            or attention_mask.shape[1] != 1 or query.shape[2] != key.shape[2]
            or all(pieces is None for pieces in _pieces(attention_mask))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    grouped = query.shape[1] != key.shape[1]
    W = query.shape[2]
    rows = []
    for row, pieces in enumerate(_pieces(attention_mask)):
        q, k, v = query[row:row + 1], key[row:row + 1], value[row:row + 1]
        rows.append(torch.cat([
            F.scaled_dot_product_attention(q[:, :, q0:q1], _keys(k, keys), _keys(v, keys), attn_mask=mask,
                                           dropout_p=dropout, is_causal=mask is None, scale=scaling,
                                           enable_gqa=grouped)
            for q0, q1, keys, mask in pieces or [(0, W, ((0, W),), attention_mask[row:row + 1])]], dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)


def attends_by_segment(model) -> bool:
    """Whether `model`'s forwards over a boolean 4-D layout mask run segment by segment: sdpa attention and no
    gradient checkpointing."""
    return model.config._attn_implementation == "sdpa" and not getattr(model, "is_gradient_checkpointing", False)


@contextlib.contextmanager
def segment_attention_for(model, attention_mask):
    """`segment_attention` in place of the model's sdpa for forwards inside, when `attention_mask` is a boolean 4-D
    layout mask and `attends_by_segment(model)`; else nothing changes."""
    if not (attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool
            and attends_by_segment(model)):
        yield
        return
    config = model.config
    config._attn_implementation = SEGMENT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
