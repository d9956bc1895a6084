"""The hf engine's own decode loop: a static KV cache, each distinct prompt prefilled once, logits of the last
position only, and sampling on those (docs/performance.md, "Generation").

transformers' `generate` grows a `DynamicCache` by concatenation (every layer's keys and values copied and
reallocated at every step), runs its logits processors over the whole batch x vocabulary with fresh tensors,
and samples with `torch.multinomial`. Here the cache is allocated once at `prompt width + max_new_tokens`
(transformers' `StaticCache`, written in place), the attention mask is allocated once at that width and
filled column by column, and a token is drawn by inverting the cumulative distribution with one uniform number
per row, and each decode step's attention is one fp32 kernel call that reads grouped-query heads in place
(`decode_step_attention`). Greedy decoding gives generate's tokens exactly in fp32 and float64 (the same
forward up to the attention kernel's rounding, argmax); sampling draws from the same distribution
(temperature, then top-k, then top-p, as generate's warpers do) but not the same tokens under a seed, since
the random numbers are used differently.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NEG_INF = float("-inf")
DECODE_ATTENTION = "posttrain_decode_step"


def decode_step_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax(q k^T * scaling + mask) v for one new token per row against the static cache, in fp32 (float64 for a
    float64 model) with autocast off, every query head reading its key/value head in place.

    transformers' sdpa path repeats the key and value heads of a grouped-query model into a new tensor whenever a
    mask is given (every decode step: about 1 ms a layer for 32 rows of SmolLM2 here), and under bf16 autocast it runs
    the CPU kernel in bf16, which at one query position is four times slower than in fp32. Keys and values are
    already fp32 in the cache under autocast (`values_as_keys`), so fp32 costs no precision and no casts."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    with torch.autocast(query.device.type, enabled=False):
        out = F.scaled_dot_product_attention(query.to(dtype), key.to(dtype), value.to(dtype), attn_mask=attention_mask,
                                             scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_ATTENTION, decode_step_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def attention_for_decode_steps(model):
    """`decode_step_attention` in place of the model's sdpa attention (other kernels are left as they are)."""
    config = model.config
    if config._attn_implementation != "sdpa":
        yield
        return
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def next_token_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities [rows, vocab] of the next token: softmax(logits / temperature) restricted to the top-k
    logits (ties with the k-th kept) and then to the nucleus, the most probable tokens whose cumulative
    probability before them is under top_p (generate's TopK and TopP warpers, in that order), renormalised."""
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(dim=-1, descending=True)
        before = ordered.cumsum(dim=-1) - ordered
        probs = torch.zeros_like(probs).scatter_(-1, order, ordered.masked_fill(before >= top_p, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row from `probs` [rows, vocab]: the first index whose cumulative probability (float64)
    exceeds u * total, u ~ U[0, 1) from the device's generator; a token of probability 0 is never drawn."""
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    u = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def left_padded(prompts: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and their attention mask [len(prompts), width], built on the host."""
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device="cpu")
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long, device="cpu")
        attention_mask[i, width - len(p):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def values_as_keys(cache):
    """The cache with values stored in the keys' dtype. Under bf16 autocast the keys leave the rotary embedding
    in float32 while the values stay bf16, and a static cache layer takes one dtype (from the first keys) for both
    (transformers < 5.20 refuses the bf16 values)."""
    for layer in cache.layers:
        def update(key_states, value_states, *args, _update=layer.update, **kwargs):
            return _update(key_states, value_states.to(key_states.dtype), *args, **kwargs)
        layer.update = update
    return cache


def static_cache_decode(model, prompts: list[list[int]], params, pad_id: int, stop_ids: Sequence[int],
                        cache_keyword: str, prefill_once: bool, device: torch.device) -> list[list[int]]:
    """`params.max_new_tokens` new tokens (or fewer, when every row has stopped) after each prompt; rows that
    stopped are continued with `pad_id`, as generate does.

    Every prompt but its last token is prefilled (once per distinct prompt with `prefill_once`, the cache then
    copied to each occurrence); each decode step feeds one token per row, starting with the prompts' last.
    Position ids follow generate's rule (the cumulative attention mask), so left padding changes nothing.
    """
    rows, max_new = len(prompts), params.max_new_tokens
    width = max(len(p) for p in prompts)
    distinct: dict[tuple, int] = {}
    owner = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts] if prefill_once else list(range(rows))
    sources = list(distinct) if prefill_once else prompts
    ids, prompt_mask = left_padded(sources, width, pad_id)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)

    from transformers import StaticCache

    cache = values_as_keys(StaticCache(config=model.config, max_cache_len=width + max_new))
    owner_index = torch.tensor(owner, dtype=torch.long, device="cpu")
    if width > 1:
        model(input_ids=ids[:, :-1].to(device), attention_mask=prompt_mask[:, :-1].to(device),
              position_ids=positions[:, :-1].to(device), use_cache=True, logits_to_keep=1, **{cache_keyword: cache})
        if len(sources) != rows:
            cache.reorder_cache(owner_index.to(device))
    mask = torch.zeros((rows, width + max_new), dtype=torch.long, device=device)
    mask[:, :width] = prompt_mask[owner_index].to(device)
    token = ids[owner_index, -1].to(device)
    position = positions[owner_index, -1:].to(device)
    stop = torch.tensor(sorted(set(int(s) for s in stop_ids)), dtype=torch.long, device=device)
    generated = torch.full((rows, max_new), pad_id, dtype=torch.long, device=device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)
    for step in range(max_new):
        with attention_for_decode_steps(model):
            logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                           logits_to_keep=1, **{cache_keyword: cache}).logits[:, -1].float()
        if step < params.min_new_tokens:
            logits[:, stop] = NEG_INF
        if params.greedy:
            token = logits.argmax(dim=-1)
        else:
            token = draw(next_token_distribution(logits, params.temperature, params.top_k, params.top_p))
        token = token.masked_fill(stopped, pad_id)
        generated[:, step] = token
        stopped |= torch.isin(token, stop)
        if bool(stopped.all()):
            break
        mask[:, width + step] = 1
        position = position + 1
    return generated.tolist()
