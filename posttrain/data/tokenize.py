"""The tokenisation contract (docs/data.md). By default it is TRL 1.16's `DPOTrainer` preparation, token
for token, for each of TRL's preference formats (standard, conversational, implicit prompt):

1. `template` decides how a row is rendered. `auto` (default, TRL's rule): a row whose prompt is chat
   messages goes through the tokenizer's chat template, a string prompt is raw text. `chat`: string prompts
   become one user message (an HH-RLHF dialogue its turns) and go through the chat template too. `plain`:
   raw text (chat messages become an HH-style "\n\nHuman: ...\n\nAssistant:" dialogue).
2. A chat row is the template's rendering of the prompt with the generation prompt, and of the prompt followed
   by the assistant's response; the completion therefore ends with whatever the template writes after an
   assistant turn (`<|im_end|>\n` for SmolLM2). A text row is the prompt, and the prompt + response + the EOS
   text (unless the response already ends with it), tokenised with the tokenizer's special tokens.
3. The completion starts after the longest token prefix that the prompt alone shares with both
   prompt + response tokenisations. If a token merges across the prompt's end, the prompt's last tokens are
   left out of the prompt (TRL does the same); such rows are counted as `boundary_merges` and logged.
4. Over-long rows: with `max_prompt_length`, the prompt keeps its last tokens; then, if prompt plus
   completion exceed `max_length`, `truncation: keep_start` keeps the first `max_length` tokens (as
   TRL does) and `truncation: error` stops with the file and row. Truncated rows are counted and logged.
   A row whose prompt leaves no room for any completion token is invalid.

The tokens after the response's last character (end of turn) are counted per completion (`chosen_tail`,
`rejected_tail`), so that token weights (TAB-PO) know which tokens carry no response text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

from posttrain.data.readers import InvalidRow, PreferenceRow, is_messages
from posttrain.errors import DataError

TEMPLATES = ("auto", "chat", "plain")


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # completion tokens, end-of-turn tokens included
    rejected_ids: list[int]
    source: str = ""
    row: int = 0
    extras: dict = field(default_factory=dict)
    truncated: bool = False
    chosen_text: str = ""  # the responses the completion tokens came from
    rejected_text: str = ""
    chosen_weights: Optional[list[float]] = None  # per completion token (token-weighted losses, e.g. TAB-PO)
    rejected_weights: Optional[list[float]] = None
    chosen_tail: int = 1  # completion tokens after the response's text (the end of turn)
    rejected_tail: int = 1


@dataclass
class TokenizeStats:
    rows: int = 0
    truncated: int = 0
    boundary_merges: int = 0
    chat_rows: int = 0  # rendered through the chat template (the others as raw text)


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


def uses_chat_template(prompt, template: str) -> bool:
    """Whether a prompt is rendered through the chat template under `template` (auto: chat messages only)."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    return template == "chat" or (template == "auto" and is_messages(prompt))


def as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return hh_to_messages(prompt) if is_hh_dialogue(prompt) else [{"role": "user", "content": prompt}]
    return prompt


def as_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in prompt) + "\n\nAssistant:"


# apply_chat_template's own parameters, which a row's `chat_template_kwargs` cannot set
TEMPLATE_CALL_PARAMETERS = ("conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                            "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                            "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")


class ChatTemplateError(ValueError):
    """The chat template cannot render a row's messages (the template's own exception, or a value it cannot use)."""


def apply_template(tokenizer, messages: list[dict], **kwargs) -> str:
    """The chat template's text for `messages`, its failures as ChatTemplateError."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - jinja's errors, and TypeErrors of a template given odd values
        raise ChatTemplateError(f"{type(exc).__name__}: {exc}") from None


def chat_template_kwargs(extras: dict, source: str, row: int) -> dict:
    """What a row gives the chat template besides its messages, as TRL passes it: `tools` (a list of function
    schemas, or its JSON text) and `chat_template_kwargs` (a mapping)."""
    kwargs = {}
    tools = extras.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}, row {row}: field 'tools' is a string but not JSON ({exc.msg} at character "
                            f"{exc.pos}); give a list of function schemas.") from None
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise DataError(f"{source}, row {row}: field 'tools' must be a list of function schemas (objects), got "
                            f"{type(tools).__name__}.")
        if tools:  # TRL's `tools or None`: an empty list renders no tool boilerplate
            kwargs["tools"] = tools
    extra = extras.get("chat_template_kwargs")
    if extra is not None:
        if not isinstance(extra, dict):
            raise DataError(f"{source}, row {row}: field 'chat_template_kwargs' must be an object, got "
                            f"{type(extra).__name__}.")
        reserved = sorted(set(extra) & set(TEMPLATE_CALL_PARAMETERS))
        if reserved:
            raise DataError(f"{source}, row {row}: field 'chat_template_kwargs' sets {reserved[0]!r}, which posttrain "
                            f"sets itself when it renders the chat template; give only the template's own variables "
                            f"(for example enable_thinking).")
        kwargs.update(extra)
    return kwargs


def render_prompt(tokenizer, prompt, template: str, chat_kwargs: Optional[dict] = None) -> str:
    """The prompt as the model sees it before its response (generation prompt included for chat)."""
    if uses_chat_template(prompt, template):
        return apply_template(tokenizer, as_messages(prompt), add_generation_prompt=True, **(chat_kwargs or {}))
    return as_text(prompt)


def prompt_token_ids(tokenizer, prompt, template: str, chat_kwargs: Optional[dict] = None) -> list[int]:
    """Token ids of a rendered prompt: chat templates carry their own special tokens, raw text gets the
    tokenizer's (as TRL tokenises each)."""
    chat = uses_chat_template(prompt, template)
    return tokenizer(render_prompt(tokenizer, prompt, template, chat_kwargs), add_special_tokens=not chat)["input_ids"]


def example_prompt_ids(tokenizer, example, template: str) -> list[int]:
    """Token ids of a prompt example (online data, generation eval), with the row's tools and template
    variables; a prompt the chat template cannot render is a DataError naming the file and row."""
    chat_kwargs = chat_template_kwargs(example.extras, example.source, example.row)
    try:
        return prompt_token_ids(tokenizer, example.prompt, template, chat_kwargs)
    except ChatTemplateError as exc:
        raise DataError(f"{example.source}, row {example.row}: the chat template cannot render this prompt ({exc}). "
                        f"Fix the row's messages, or set data.template: plain.") from None


class NotPrefixPreserving(ValueError):
    """The chat template renders the prompt differently once a response follows it."""


def _render_with_response(tokenizer, prompt, response: str, chat: bool,
                          chat_kwargs: Optional[dict] = None) -> tuple[str, int]:
    """Prompt followed by the response, rendered; and the character where the response's text ends. A chat
    template must be prefix-preserving: the prompt rendered with the generation prompt is where prompt + response
    starts, else the completion's tokens would not be the response's (NotPrefixPreserving)."""
    if chat:
        messages = as_messages(prompt)
        kwargs = chat_kwargs or {}
        text = apply_template(tokenizer, messages + [{"role": "assistant", "content": response}], **kwargs)
        head = apply_template(tokenizer, messages, add_generation_prompt=True, **kwargs)
        shared = next((k for k, (a, b) in enumerate(zip(head, text)) if a != b), min(len(head), len(text)))
        if shared < len(head):
            raise NotPrefixPreserving(
                f"from character {shared} the prompt renders as {head[shared:shared + 40]!r} alone but as "
                f"{text[shared:shared + 40]!r} with the response after it")
        start = text.find(response, shared) if response else -1
        return text, (start + len(response) if start >= 0 else len(text))
    prompt_text, eos = as_text(prompt), tokenizer.eos_token
    body = response[:-len(eos)] if response.endswith(eos) else response
    return prompt_text + body + eos, len(prompt_text) + len(body)


def _encode(tokenizer, text: str, chat: bool) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _tail_tokens(offsets: list[tuple[int, int]], response_end: int) -> int:
    """Trailing tokens that start at or after the response's end (or carry no characters)."""
    tail = 0
    for start, end in reversed(offsets):
        if start < response_end and end > start:
            break
        tail += 1
    return tail


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _truncate(prompt: list[int], completion: list[int], max_length: int, max_prompt_length: Optional[int]):
    """Returns (prompt, completion, prompt cut by max_prompt_length, prompt+completion cut to max_length)."""
    prompt_cut = over = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, prompt_cut = prompt[-max_prompt_length:], True
    if len(prompt) + len(completion) > max_length:
        completion, over = completion[:max(0, max_length - len(prompt))], True
    return prompt, completion, prompt_cut, over


def tokenize_pairs(rows: list[PreferenceRow], tokenizer, template: str = "auto", max_length: int = 512,
                   max_prompt_length: Optional[int] = None, truncation: str = "keep_start",
                   ) -> tuple[list[TokenizedPair], list[InvalidRow], TokenizeStats]:
    """Apply the tokenisation contract to validated rows. Returns (pairs, rows that cannot train, stats)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, which the tokenisation contract appends to completions; "
                        "set one (tokenizer.eos_token) before training.")
    stats = TokenizeStats()
    pairs, invalid = [], []
    for row in rows:
        chat = uses_chat_template(row.prompt, template)
        kwargs = chat_template_kwargs(row.extras, row.source, row.row) if chat else {}
        try:
            prompt_ids = _encode(tokenizer, render_prompt(tokenizer, row.prompt, template, kwargs), chat)[0]
            rendered = [_render_with_response(tokenizer, row.prompt, response, chat, kwargs)
                        for response in (row.chosen, row.rejected)]
        except NotPrefixPreserving as exc:
            raise DataError(f"{row.source}, row {row.row}: the chat template is not prefix-preserving for this "
                            f"row's turns: {exc}, so the completion's tokens would not be the response. Use a "
                            f"template that renders a prompt the same with or without the response after it "
                            f"(e.g. one that does not drop earlier turns' reasoning or add an empty thinking "
                            f"block to the generation prompt), or data.template: plain.") from None
        except ChatTemplateError as exc:
            raise DataError(f"{row.source}, row {row.row}: the chat template cannot render this row ({exc}). Fix "
                            f"the row's messages, or set data.template: plain.") from None
        completions = []
        for text, response_end in rendered:
            ids, offsets = _encode(tokenizer, text, chat)
            completions.append((ids, _tail_tokens(offsets, response_end)))
        shared = min(_common_prefix(prompt_ids, ids) for ids, _ in completions)
        stats.boundary_merges += int(shared < len(prompt_ids))
        (full_c, tail_c), (full_r, tail_r) = completions
        chosen, rejected = full_c[shared:], full_r[shared:]
        p1, c, prompt_cut, over1 = _truncate(prompt_ids[:shared], chosen, max_length, max_prompt_length)
        _, r, _, over2 = _truncate(prompt_ids[:shared], rejected, max_length, max_prompt_length)
        # `truncation: error` is about max_length; cutting the prompt to max_prompt_length is what the user asked for.
        if (over1 or over2) and truncation == "error":
            longest = len(p1) + max(len(chosen), len(rejected))
            raise DataError(f"{row.source}, row {row.row}: {longest} tokens exceed data.max_length={max_length} and "
                            f"data.truncation is 'error'. Raise max_length, or set truncation: keep_start.")
        if not c or not r:
            invalid.append(InvalidRow(row.source, row.row, "prompt", f"the prompt ({len(p1)} tokens) leaves no room "
                                                                      f"for a response within max_length={max_length}"))
            continue
        stats.rows += 1
        stats.chat_rows += int(chat)
        truncated = prompt_cut or over1 or over2
        stats.truncated += int(truncated)
        pairs.append(TokenizedPair(p1, c, r, row.source, row.row, row.extras, truncated, row.chosen, row.rejected,
                                   chosen_tail=max(0, tail_c - (len(chosen) - len(c))),
                                   rejected_tail=max(0, tail_r - (len(rejected) - len(r)))))
    return pairs, invalid, stats
