"""Per-token log-probabilities of completion tokens, without ever keeping full-vocabulary logits.

Only positions whose next token is a completion token are sent through the output layer, in
chunks, each under activation checkpointing: the tensors saved for backward are the chunk's hidden
states (tokens x hidden), never logits (tokens x vocabulary). Convention (spec section 0): the
log-prob at label position t is computed from the hidden state at t-1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(output_layer: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    logits = output_layer(hidden)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def chunked_token_logprobs(output_layer: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                           temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(output_layer(hidden) / temperature)[targets], for hidden [M, H] and targets [M]."""
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logprobs, output_layer, h, t, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(output_layer, h, t, temperature))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16)
                                else hidden.dtype)
    return torch.cat(pieces)


def token_entropy(output_layer: nn.Module, hidden: torch.Tensor, temperature: float = 1.0,
                  chunk_size: int = 1024) -> torch.Tensor:
    """Full-distribution entropy (nats) at each row of hidden [M, H], without gradient."""
    out = []
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_size):
            logits = output_layer(hidden[start:start + chunk_size]).float() / temperature
            logp = F.log_softmax(logits, dim=-1)
            out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else hidden.new_zeros(0)


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class PolicyLogProbs(nn.Module):
    """Wraps a causal LM so that its forward returns completion-token log-probs.

    This is the module handed to `accelerate.prepare`, so DDP and DeepSpeed see every forward.
    forward(input_ids [N, L], attention_mask [N, L], loss_mask [N, L]) -> log-probs [N, L-1], where
    entry t-1 is log pi(input_ids[t] | input_ids[<t]) for completion tokens (loss_mask[t] = 1) and 0
    elsewhere. `position_ids` allows padding-free packing.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, loss_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, temperature: float = 1.0,
                return_entropy: bool = False):
        base = _base_model(self.model)
        decoder = base.get_decoder()
        output_layer = base.get_output_embeddings()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
        target_mask = loss_mask[:, 1:].bool()
        selected = hidden[:, :-1][target_mask]
        targets = input_ids[:, 1:][target_mask]
        logps = chunked_token_logprobs(output_layer, selected, targets, temperature, self.chunk_size)
        dense = logps.new_zeros(target_mask.shape).masked_scatter(target_mask, logps)
        if not return_entropy:
            return dense
        entropy = token_entropy(output_layer, selected.detach(), temperature, self.chunk_size)
        return dense, entropy.new_zeros(target_mask.shape).masked_scatter(target_mask, entropy)
