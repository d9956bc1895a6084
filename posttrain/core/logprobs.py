"""Per-token log-probabilities of completion tokens, without ever keeping full-vocabulary logits.

Only positions whose next token is a completion token are sent through the output layer, in
chunks, each under activation checkpointing: the tensors saved for backward are the chunk's hidden
states (tokens x hidden), never logits (tokens x vocabulary). Convention (spec section 0): the
log-prob at label position t is computed from the hidden state at t-1.

Models whose forward post-processes the output layer's logits are handled as their forward does:
Cohere's `logit_scale` (logits * scale) and Gemma 2/3's `final_logit_softcapping` (cap * tanh(logits / cap)).
`check_against_forward` compares the result with `model(...).logits` on a probe batch at set-up, so a
model whose forward does anything else is refused instead of trained on wrong log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from posttrain.core.segments import segment_attention_for


@dataclass(frozen=True)
class LogitProcessing:
    """What a model's forward does to the output layer's logits (from its config)."""

    scale: Optional[float] = None  # Cohere: logits * logit_scale
    softcap: Optional[float] = None  # Gemma 2/3: cap * tanh(logits / cap)

    @classmethod
    def of(cls, config) -> "LogitProcessing":
        text = getattr(config, "get_text_config", lambda: config)()
        return cls(getattr(text, "logit_scale", None), getattr(text, "final_logit_softcapping", None))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _chunk_logprobs(output_layer: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    temperature: float, processing: LogitProcessing = LogitProcessing()
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of `targets`, the mean logit over the vocabulary, detached) at each row of `hidden`."""
    logits = output_layer(hidden)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = processing(logits)
    mean_logit = logits.detach().mean(-1)
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1), mean_logit


def chunked_token_logprobs(output_layer: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                           temperature: float = 1.0, chunk_size: int = 1024,
                           processing: LogitProcessing = LogitProcessing(),
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(processing(output_layer(hidden)) / temperature)[targets], for hidden [M, H] and targets [M],
    and the mean of processing(output_layer(hidden)) over the vocabulary (TRL's logits/chosen), detached."""
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logprobs, output_layer, h, t, temperature, processing,
                                     use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(output_layer, h, t, temperature, processing))
    if not pieces:
        empty = hidden.new_zeros(0, dtype=torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16)
                                 else hidden.dtype)
        return empty, empty
    return torch.cat([logp for logp, _ in pieces]), torch.cat([mean for _, mean in pieces])


def token_entropy(output_layer: nn.Module, hidden: torch.Tensor, temperature: float = 1.0,
                  chunk_size: int = 1024, processing: LogitProcessing = LogitProcessing()) -> torch.Tensor:
    """Full-distribution entropy (nats) at each row of hidden [M, H], without gradient."""
    out = []
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_size):
            logits = processing(output_layer(hidden[start:start + chunk_size]).float()) / temperature
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
    elsewhere. `position_ids` allows padding-free packing. A boolean 4-D layout mask is attended segment by
    segment (`posttrain.core.segments`).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.processing = LogitProcessing.of(_base_model(model).config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, loss_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, temperature: float = 1.0,
                return_entropy: bool = False, return_mean_logits: bool = False):
        """Log-probs [N, L-1]; with `return_entropy` also the per-token entropy, with `return_mean_logits`
        the per-token mean logit over the vocabulary (both detached, same shape; in that order)."""
        base = _base_model(self.model)
        decoder = base.get_decoder()
        output_layer = base.get_output_embeddings()
        with segment_attention_for(base, attention_mask):
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
        target_mask = loss_mask[:, 1:].bool()
        selected = hidden[:, :-1][target_mask]
        targets = input_ids[:, 1:][target_mask]
        logps, mean_logits = chunked_token_logprobs(output_layer, selected, targets, temperature, self.chunk_size,
                                                    self.processing)
        dense = lambda values: values.new_zeros(target_mask.shape).masked_scatter(target_mask, values)  # noqa: E731
        outputs = [dense(logps)]
        if return_entropy:
            outputs.append(dense(token_entropy(output_layer, selected.detach(), temperature, self.chunk_size,
                                               self.processing)))
        if return_mean_logits:
            outputs.append(dense(mean_logits))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


PROBE_TOLERANCE = 1e-4  # nats, per token, float32: only summation order may differ from the model's forward


@torch.no_grad()
def check_against_forward(logprobs: PolicyLogProbs, device: torch.device, length: int = 12) -> float:
    """The largest per-token difference between these log-probs and log_softmax(model(...).logits) on a
    seeded probe batch of `length` tokens. Raises ValueError (with the gap) beyond PROBE_TOLERANCE: the
    model's forward does something to its logits that posttrain does not reproduce."""
    base = _base_model(logprobs.model)
    vocab = base.get_output_embeddings().weight.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (2, length), generator=generator, device="cpu").to(device)
    mask = torch.ones_like(ids)
    was_training = base.training
    base.eval()
    try:
        ours = logprobs(ids, mask, mask).float()
        logits = logprobs.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    finally:
        base.train(was_training)
    theirs = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    gap = float((ours - theirs).abs().max())
    if not gap <= PROBE_TOLERANCE:
        raise ValueError(f"its log-probs computed from the decoder and output layer differ from its own forward's "
                         f"logits by up to {gap:.3g} nats per token (tolerance {PROBE_TOLERANCE:g}): its forward "
                         f"post-processes the logits in a way posttrain does not reproduce (known: logit_scale, "
                         f"final_logit_softcapping)")
    return gap
