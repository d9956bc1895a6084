"""Ranking accuracy (Chen et al. 2024, Def. 2.3; spec section 11) as a reusable scorer.

    R(x, y_w, y_l; pi) = 1[ log pi(y_w|x) >= log pi(y_l|x) ]   (summed completion log-probs)
    R~ compares mean token log-probs instead (length-normalised, App. C Eq. 15).

`score_pairs` computes the summed log-probs and lengths of both responses of every pair, batched,
without gradient, and with little padding. Two row layouts:

- `shared` (the default where the model allows it): one row per pair,
  `prompt + chosen + [last prompt token again] + rejected`, with a 4-D attention mask and position
  ids that make the rejected branch see the prompt but not the chosen response: the training
  layout `share_prompt` of posttrain.data.layout, without gradient. The prompt, which in multi-turn
  data such as HH-RLHF is the longer part, is computed once per pair instead of twice.
- `separate`: one row per sequence (`prompt + response`), with the usual 2-D padding mask.

Rows are sorted by length before they are cut into batches of `batch_size` rows, so a batch's rows
have almost the same length (with `max_padding`, a batch also ends early rather than carry more than
that share of padding); the share of padded positions is reported in `ScoringStats`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

from posttrain.data.layout import build_pair_rows, pad_sequences, shared_length
from posttrain.data.tokenize import TokenizedPair
from posttrain.eval.metrics import TIE_THRESHOLD, normalised_ranking_correct, ranking_correct

LAYOUTS = ("auto", "shared", "separate")


@dataclass
class ScoringStats:
    """How a scoring pass went: layout, work done, time taken and the padding it carried."""

    layout: str
    pairs: int
    rows: int
    forward_passes: int
    seconds: float
    real_tokens: int  # token positions holding a real token
    total_positions: int  # rows x padded length, summed over batches

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else float("nan")

    @property
    def padding_share(self) -> float:
        return 1.0 - self.real_tokens / self.total_positions if self.total_positions else 0.0

    def to_dict(self) -> dict:
        return {"layout": self.layout, "pairs": self.pairs, "rows": self.rows, "forward_passes": self.forward_passes,
                "seconds": self.seconds, "pairs_per_second": self.pairs_per_second,
                "real_tokens": self.real_tokens, "total_positions": self.total_positions,
                "padding_share": self.padding_share}


@dataclass
class PairScores:
    """Summed log-probs and token counts of chosen (w) and rejected (l) responses, one entry per pair."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    stats: Optional[ScoringStats] = field(default=None, compare=False)

    @property
    def chosen_means(self) -> torch.Tensor:
        return self.chosen_logps / self.chosen_lengths

    @property
    def rejected_means(self) -> torch.Tensor:
        return self.rejected_logps / self.rejected_lengths

    def ranking_correct(self, alpha=None, tie_threshold: float = TIE_THRESHOLD) -> torch.Tensor:
        """Per pair 1/0. Pairs with alpha = 0.5 are ties: correct iff |S_w - S_l| < tie_threshold."""
        return torch.as_tensor(ranking_correct(self.chosen_logps.numpy(), self.rejected_logps.numpy(),
                                               alpha, tie_threshold))

    def normalised_ranking_correct(self, alpha=None, tie_threshold: float = TIE_THRESHOLD) -> torch.Tensor:
        """Per pair 1/0 on mean token log-probs; ties compare geometric-mean probabilities exp(A)."""
        return torch.as_tensor(normalised_ranking_correct(self.chosen_means.numpy(), self.rejected_means.numpy(),
                                                          alpha, tie_threshold))

    def ranking_accuracy(self, alpha=None, tie_threshold: float = TIE_THRESHOLD) -> float:
        return self.ranking_correct(alpha, tie_threshold).double().mean().item()

    def normalised_ranking_accuracy(self, alpha=None, tie_threshold: float = TIE_THRESHOLD) -> float:
        return self.normalised_ranking_correct(alpha, tie_threshold).double().mean().item()

    def subset(self, index) -> "PairScores":
        index = torch.as_tensor(index, dtype=torch.long)
        return PairScores(self.chosen_logps[index], self.rejected_logps[index], self.chosen_lengths[index],
                          self.rejected_lengths[index], self.stats)

    def __len__(self) -> int:
        return len(self.chosen_logps)


# ---------------------------------------------------------------------------------------------- layouts


def _hf_config(logprob_model):
    """The transformers config under DDP / DeepSpeed / PolicyLogProbs / peft wrappers, or None."""
    node = logprob_model
    for _ in range(6):
        if hasattr(node, "config") and hasattr(node.config, "model_type"):
            return node.config
        get_base = getattr(node, "get_base_model", None)
        if callable(get_base):
            node = get_base()
        elif hasattr(node, "module"):
            node = node.module
        elif hasattr(node, "model"):
            node = node.model
        else:
            return None
    return None


def choose_layout(logprob_model, pairs: list[TokenizedPair], layout: str = "auto") -> str:
    """`shared` where a custom 4-D mask is honoured exactly (sdpa or eager attention, no sliding window
    shorter than the longest sequence, every prompt non-empty); otherwise `separate`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout != "auto":
        if layout == "shared" and any(not p.prompt_ids for p in pairs):
            raise ValueError("the shared layout needs a non-empty prompt in every pair")
        return layout
    if any(not p.prompt_ids for p in pairs):
        return "separate"
    longest = max((len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs), default=0)
    return "shared" if custom_mask_supported(logprob_model, longest) else "separate"


def custom_mask_supported(logprob_model, longest: int) -> bool:
    """Whether the model honours a custom 4-D attention mask exactly for sequences up to `longest` tokens: sdpa or
    eager attention, and no sliding window shorter than that."""
    config = _hf_config(logprob_model)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    window = getattr(config, "sliding_window", None)
    return not (window and getattr(config, "use_sliding_window", True) and longest > window)


def attention_kind(logprob_model) -> str:
    config = _hf_config(logprob_model)
    return getattr(config, "_attn_implementation", "sdpa") if config is not None else "sdpa"


def model_dtype(logprob_model) -> torch.dtype:
    for p in logprob_model.parameters() if hasattr(logprob_model, "parameters") else []:
        return p.dtype if p.dtype.is_floating_point else torch.float32
    return torch.float32


def model_device(logprob_model) -> torch.device:
    """Where the model's weights are (its inputs go there); the host for a callable without parameters."""
    for p in logprob_model.parameters() if hasattr(logprob_model, "parameters") else []:
        return p.device
    return torch.device("cpu")


def separate_rows(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """One row per (prompt, completion) sequence, right-padded, with the usual 2-D mask."""
    input_ids, attention_mask, loss_mask = pad_sequences(sequences, pad_id)
    n, width = input_ids.shape
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "real_tokens": int(attention_mask.sum()), "total_positions": n * width}


# ---------------------------------------------------------------------------------------------- scoring


def _forward(logprob_model, batch: dict, autocast_bf16: bool) -> torch.Tensor:
    """Per-token log-probs of one batch, computed where the model is, returned on the host in float64."""
    device = model_device(logprob_model)
    inputs = [batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask")]
    if batch.get("position_ids") is not None:
        inputs.append(batch["position_ids"].to(device))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        logps = logprob_model(*inputs)
    return logps.double().cpu()


def batches(lengths: list[int], batch_size: int, max_padding: Optional[float] = None) -> list[list[int]]:
    """Row indices sorted by length, cut into batches of at most `batch_size` rows. With `max_padding`, a
    batch also ends before a row that would make more than that share of its positions padding (the
    number of batches then depends on the lengths: use it only where every process scores alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        if current:
            width = lengths[i]  # the longest so far: rows come in increasing length
            full = len(current) >= batch_size
            too_padded = max_padding is not None and 1 - (real + width) / (width * (len(current) + 1)) > max_padding
            if full or too_padded:
                out.append(current)
                current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        out.append(current)
    return out


@torch.no_grad()
def score_pairs(logprob_model, pairs: list[TokenizedPair], pad_id: int, batch_size: int = 16,
                progress: bool = False, autocast_bf16: bool = False, layout: str = "auto",
                max_padding: Optional[float] = None) -> PairScores:
    """Score every pair with `logprob_model`: a PolicyLogProbs, or any callable with its signature
    `(input_ids, attention_mask, loss_mask[, position_ids]) -> per-token log-probs [N, L-1]`.

    `batch_size` is the number of rows per forward pass: pairs in the shared layout, sequences in the
    separate layout (`layout="separate", batch_size=1` scores one sequence at a time). `max_padding`
    (single process only) closes a batch early rather than pad more than that share of its positions.
    """
    layout = choose_layout(logprob_model, pairs, layout)
    n = len(pairs)
    chosen, rejected = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    was_training = getattr(logprob_model, "training", False)
    if hasattr(logprob_model, "eval"):
        logprob_model.eval()
    passes = real = total = 0
    started = time.perf_counter()
    bar = tqdm(total=n, desc="scoring pairs", unit="pair", disable=not progress, leave=False)
    try:
        if layout == "shared":
            attention, dtype = attention_kind(logprob_model), model_dtype(logprob_model)
            lengths = [shared_length(p) for p in pairs]
            rows = n
            for index in batches(lengths, batch_size, max_padding):
                layout_rows = build_pair_rows([pairs[i] for i in index], pad_id, share_prompt=True,
                                              attention=attention, mask_dtype=dtype)
                logps = _forward(logprob_model, layout_rows.as_batch(), autocast_bf16)
                chosen_logps, rejected_logps = layout_rows.split(logps)
                chosen[index], rejected[index] = chosen_logps.sum(-1), rejected_logps.sum(-1)
                passes, real = passes + 1, real + layout_rows.real_tokens
                total += layout_rows.total_positions
                bar.update(len(index))
        else:
            sequences = [(i, 0) for i in range(n)] + [(i, 1) for i in range(n)]
            completion = lambda i, which: pairs[i].chosen_ids if which == 0 else pairs[i].rejected_ids  # noqa: E731
            lengths = [len(pairs[i].prompt_ids) + len(completion(i, w)) for i, w in sequences]
            rows = len(sequences)
            for rows_of_batch in batches(lengths, batch_size, max_padding):
                chunk = [sequences[r] for r in rows_of_batch]
                batch = separate_rows([(pairs[i].prompt_ids, completion(i, w)) for i, w in chunk], pad_id)
                sums = _forward(logprob_model, batch, autocast_bf16).sum(-1)
                for k, (i, which) in enumerate(chunk):
                    (chosen if which == 0 else rejected)[i] = sums[k]
                passes, real, total = passes + 1, real + batch["real_tokens"], total + batch["total_positions"]
                bar.update(len(chunk) / 2)
    finally:
        bar.close()
        if hasattr(logprob_model, "train"):
            logprob_model.train(was_training)
    stats = ScoringStats(layout, n, rows, passes, time.perf_counter() - started, real, total)
    lengths_w = torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.float64)
    lengths_l = torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.float64)
    return PairScores(chosen, rejected, lengths_w, lengths_l, stats)
