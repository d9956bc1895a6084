"""The tokenisation contract (docs/data.md):

1. The prompt is rendered as text: with `template: chat` through the tokenizer's chat template
   (`add_generation_prompt=True`); with `template: plain` as is (chat messages become an HH-style
   "\n\nHuman: ...\n\nAssistant:" dialogue). HH-RLHF dialogues are turned into chat messages for `chat`.
2. Prompt and response are tokenised jointly, as one string, and the completion starts at the first
   token that starts at or after the prompt's last character. If a token would cross that boundary,
   prompt and response are tokenised separately instead (counted as `boundary_fallbacks`).
3. The end-of-turn token (the tokenizer's EOS; `<|im_end|>` for SmolLM2) is appended to every
   completion and counts in its length and loss.
4. Over-long rows: with `max_prompt_length`, the prompt keeps its last tokens; then, if prompt plus
   completion exceed `max_length`, `truncation: keep_start` keeps the first `max_length` tokens (as
   TRL does) and `truncation: error` stops with the file and row. Truncated rows are counted and logged.
   A row whose prompt leaves no room for any completion token is invalid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from posttrain.data.readers import InvalidRow, PreferenceRow
from posttrain.errors import DataError


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # completion tokens, end-of-turn token included
    rejected_ids: list[int]
    source: str = ""
    row: int = 0
    extras: dict = field(default_factory=dict)
    truncated: bool = False
    chosen_text: str = ""  # the rendered responses the completion tokens came from
    rejected_text: str = ""
    chosen_weights: Optional[list[float]] = None  # per completion token (token-weighted losses, e.g. TAB-PO)
    rejected_weights: Optional[list[float]] = None


@dataclass
class TokenizeStats:
    rows: int = 0
    truncated: int = 0
    boundary_fallbacks: int = 0


_HH_TURN = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
_HH_START = re.compile(r"\s*Human:")


def is_hh_dialogue(text: str) -> bool:
    """An HH-RLHF dialogue starts with a Human turn and has an Assistant turn."""
    return bool(_HH_START.match(text)) and "\n\nAssistant:" in text


def hh_to_messages(dialogue: str) -> list[dict]:
    """Split an HH-RLHF dialogue ("\n\nHuman: ...\n\nAssistant: ...") into chat messages. Text before the first
    turn (not part of HH-RLHF, but a prompt may have it) is kept as a user message."""
    parts = _HH_TURN.split(dialogue)
    messages = [{"role": "user", "content": parts[0].strip()}] if parts[0].strip() else []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": text.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # the trailing "Assistant:" the response follows
    return messages


def render_prompt(tokenizer, prompt, template: str) -> str:
    if template == "chat":
        messages = prompt
        if isinstance(prompt, str):
            messages = hh_to_messages(prompt) if is_hh_dialogue(prompt) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, str):
        return prompt
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    text = "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in prompt)
    return text + "\n\nAssistant:"


def render_response(response: str, template: str) -> str:
    return response.strip() if template == "chat" else response


def tokenize_prompt_completion(tokenizer, prompt_text: str, response: str, add_special_tokens: bool,
                               stats: Optional[TokenizeStats] = None) -> tuple[list[int], list[int]]:
    """Tokenise prompt+response jointly; return (prompt_ids, completion_ids) without EOS."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=add_special_tokens)["input_ids"]
    joint = tokenizer(prompt_text + response, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = joint["input_ids"], joint["offset_mapping"]
    split = len(ids)
    for k, (start, end) in enumerate(offsets):
        if start >= len(prompt_text) and end > start:
            split = k
            break
    if ids[:split] == prompt_ids:
        return prompt_ids, ids[split:]
    if stats is not None:
        stats.boundary_fallbacks += 1
    return prompt_ids, tokenizer(response, add_special_tokens=False)["input_ids"]


def _truncate(prompt: list[int], completion: list[int], max_length: int, max_prompt_length: Optional[int]):
    """Returns (prompt, completion, prompt cut by max_prompt_length, prompt+completion cut to max_length)."""
    prompt_cut = over = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, prompt_cut = prompt[-max_prompt_length:], True
    if len(prompt) + len(completion) > max_length:
        completion, over = completion[:max(0, max_length - len(prompt))], True
    return prompt, completion, prompt_cut, over


def tokenize_pairs(rows: list[PreferenceRow], tokenizer, template: str = "chat", max_length: int = 512,
                   max_prompt_length: Optional[int] = None, truncation: str = "keep_start",
                   ) -> tuple[list[TokenizedPair], list[InvalidRow], TokenizeStats]:
    """Apply the tokenisation contract to validated rows. Returns (pairs, rows that cannot train, stats)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, which the tokenisation contract appends to completions; "
                        "set one (tokenizer.eos_token) before training.")
    add_special = template == "plain"  # chat templates carry their own special tokens
    stats = TokenizeStats()
    pairs, invalid = [], []
    for row in rows:
        prompt_text = render_prompt(tokenizer, row.prompt, template)
        chosen_text, rejected_text = render_response(row.chosen, template), render_response(row.rejected, template)
        prompt_ids, chosen = tokenize_prompt_completion(tokenizer, prompt_text, chosen_text, add_special, stats)
        _, rejected = tokenize_prompt_completion(tokenizer, prompt_text, rejected_text, add_special, stats)
        chosen, rejected = chosen + [eos], rejected + [eos]
        p1, c, prompt_cut, over1 = _truncate(prompt_ids, chosen, max_length, max_prompt_length)
        _, r, _, over2 = _truncate(prompt_ids, rejected, max_length, max_prompt_length)
        # `truncation: error` is about max_length; cutting the prompt to max_prompt_length is what the user asked for.
        if (over1 or over2) and truncation == "error":
            longest = len(p1) + max(len(chosen), len(rejected))
            raise DataError(f"{row.source}, row {row.row}: {longest} tokens exceed data.max_length={max_length} and "
                            f"data.truncation is 'error'. Raise max_length, or set truncation: keep_start.")
        truncated = prompt_cut or over1 or over2
        if not c or not r:
            invalid.append(InvalidRow(row.source, row.row, "prompt", f"the prompt ({len(p1)} tokens) leaves no room "
                                                                      f"for a response within max_length={max_length}"))
            continue
        stats.rows += 1
        stats.truncated += int(truncated)
        pairs.append(TokenizedPair(p1, c, r, row.source, row.row, row.extras, truncated, chosen_text, rejected_text))
    return pairs, invalid, stats
