"""What `posttrain inspect` prints: per row, the prompt and completion tokens as decoded, and which tokens the
loss is computed on (the completion's, end of turn included) and which are context (the prompt's)."""

from __future__ import annotations

from typing import Optional


def _tokens(tokenizer, ids: list[int], weights: Optional[list[float]] = None) -> str:
    pieces = [repr(tokenizer.decode([i]))[1:-1] for i in ids]
    if weights is not None:
        pieces = [f"{p}(w={w:g})" if w != 1 else p for p, w in zip(pieces, weights)]
    return "|".join(pieces)


def describe_pair(tokenizer, pair) -> str:
    lines = [f"{pair.source}, row {pair.row}: prompt {len(pair.prompt_ids)} tokens, chosen {len(pair.chosen_ids)}, "
             f"rejected {len(pair.rejected_ids)}{' (truncated)' if pair.truncated else ''}",
             f"  [context]  prompt:   {_tokens(tokenizer, pair.prompt_ids)}",
             f"  [loss]     chosen:   {_tokens(tokenizer, pair.chosen_ids, pair.chosen_weights)}",
             f"  [loss]     rejected: {_tokens(tokenizer, pair.rejected_ids, pair.rejected_weights)}"]
    if pair.chosen_weights is not None:
        lines.append("  (w=...: the token's raw loss weight where it is not 1)")
    return "\n".join(lines) + "\n"


def describe_prompt(tokenizer, example, prompt_ids: list[int]) -> str:
    return (f"{example.where}: prompt {len(prompt_ids)} tokens, answer {example.answer!r}\n"
            f"  [context]  prompt:   {_tokens(tokenizer, prompt_ids)}\n"
            f"  [loss]     the sampled completions (generated during training)\n")
