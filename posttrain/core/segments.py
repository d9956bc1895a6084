"""sdpa over posttrain's layout masks one block of positions at a time (docs/performance.md, "Attention by
segment").

The shared-prompt and packed layouts (posttrain.data.layout) give the model a boolean 4-D mask [rows, 1, W, W] in
which no query attends outside its own segment. sdpa given the whole mask multiplies every query of a row by every
key of it and masks afterwards: W^2 products per head, where the segments need only the sum of their squares (a
row of four 256-position segments: a quarter). Here each row is cut into blocks at every position t that no query
at or after t reaches back over, and sdpa runs on each block with its own part of the mask (`is_causal` where that
part is the causal triangle). Every query sees the same keys with the same mask, so the result is sdpa's over the
whole row up to float summation order (tests/test_layout.py). Rows are cut once per mask (the same tensor reaches
every layer) and kept on it. A row is attended whole where the products cutting saves would not pay for the extra
calls (a short segment and its padding) or where its mask lets a query see a later block.

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


def row_blocks(allowed: torch.Tensor) -> list[tuple[int, int, bool]] | None:
    """(start, end, causal) blocks of one row's mask `allowed` [W, W] (query, key): no query attends to a key of
    another block, a run of blocks shorter than MIN_BLOCK is one block, `causal` where the block's part of the mask is
    the causal triangle. None, the row attended whole, where cutting would not save CALL_PRODUCTS query-key
    products per extra call (a short segment and its padding) or where a query attends to a key after its block."""
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
    saved = W * W - sum((end - start) ** 2 for start, end in bounds)
    if len(bounds) == 1 or saved < (len(bounds) - 1) * CALL_PRODUCTS:
        return None
    blocks = []
    for start, end in bounds:
        if allowed[start:end, end:].any():
            return None
        part = allowed[start:end, start:end]
        blocks.append((start, end, bool(torch.equal(part, torch.ones_like(part).tril()))))
    return blocks


def _blocks(mask: torch.Tensor) -> list:
    """Each row's blocks, computed once per mask tensor and kept on it."""
    blocks = getattr(mask, "_posttrain_blocks", None)
    if blocks is None:
        blocks = [row_blocks(mask[row, 0]) for row in range(mask.shape[0])]
        mask._posttrain_blocks = blocks
    return blocks


def segment_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: sdpa block by block over a boolean 4-D mask without a KV cache
    (query and key of one length), each row that `row_blocks` cuts; anything else goes to transformers' sdpa."""
    if (attention_mask is None or attention_mask.dim() != 4 or attention_mask.dtype != torch.bool
            or attention_mask.shape[1] != 1 or query.shape[2] != key.shape[2]
            or all(blocks is None for blocks in _blocks(attention_mask))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    grouped = query.shape[1] != key.shape[1]
    rows = []
    for row, blocks in enumerate(_blocks(attention_mask)):
        q, k, v, allowed = (query[row:row + 1], key[row:row + 1], value[row:row + 1],
                            attention_mask[row:row + 1])
        rows.append(torch.cat([
            F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                                           attn_mask=None if causal else allowed[:, :, s:e, s:e], dropout_p=dropout,
                                           is_causal=causal, scale=scaling, enable_gqa=grouped)
            for s, e, causal in blocks or [(0, q.shape[2], False)]], dim=2))
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
