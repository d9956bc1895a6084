"""Raw per-token weights of a preference pair for token-weighted losses (TAB-PO, spec section 5).

For each completion token (end-of-turn token included) a raw weight w_t >= 0 is computed:

1. w_t = 1.
2. Structured-output value weights (`value_weights`): the response is scanned as JSON and every
   token whose character range overlaps a classified string gets w_t = max(w_t, class weight):

   | class    | weight (default)       | authors' schema (spec 5)      | PHEE (`posttrain.data.phee`)                      |
   |----------|------------------------|-------------------------------|---------------------------------------------------|
   | code     | code_weight = 1.1      | value of "Code"               | value of "event_type" (the event-type label)      |
   | subcode  | subcode_weight = 1.2   | value of "Sub-code"/"Subcode" | keys of the "arguments" object (argument roles)   |
   | span     | span_weight = 1.1      | value of "Span"               | values of the "arguments" object (span texts)     |

   For PHEE: argument-role labels get 1.2, event-type labels and span texts get 1.1. The spec's
   mapping is hierarchical (a Code is a coarse label, a Sub-code the finer label nested under it, a
   Span the copied text); in PHEE the event type is the coarse label of an event and the argument
   role (Trigger, Effect, Treatment.Drug, ...) the finer label nested under it, so they take Code's
   and Sub-code's weights, and span texts take Span's. Also recognised: values of "role" (subcode)
   and "text" (span), so a list-of-{role, text} layout gets the same weights.

   Only the field's own characters count (the string's content, without its quotes). The authors'
   code instead upweights *every* occurrence of a value string anywhere in the answer (spec 5,
   pitfalls); posttrain uses the exact positions. A response that is not complete JSON (for example
   truncated to max_length) is scanned up to the first syntax error; what was read before keeps
   its weights.
3. User weight spans from the data row (`use_data_spans`): the fields `weight_spans_chosen` and
   `weight_spans_rejected` hold `[[char_start, char_end, weight], ...]`, character offsets into
   the response text as given in the data row. A token overlapping a user
   span gets that span's weight (the largest, if several overlap it); it replaces the value weight,
   so a user span may also lower a weight (0 ignores the token in the sequence score and barrier).
4. Difference weights (`diff_weight`, applied only when > 1, as in the authors' collator): tokens
   that differ between chosen and rejected are multiplied by diff_weight on both sides.
   `position` (the authors' code, default): the two completions are compared token by token from
   the response start, k = 0 .. min(len_c, len_r) - 1, and differing ids are upweighted; after an
   insertion or deletion every later token counts as different. `lcs`: tokens outside one longest
   common subsequence of the two id lists are upweighted, which marks only the inserted, deleted
   or replaced tokens when the lengths differ.

The end-of-turn tokens after the response (the EOS, or what the chat template writes after an
assistant turn: `TokenizedPair.chosen_tail` / `rejected_tail`) have no characters in the response and
always have raw weight 1 (no value, user or difference weight; they are also left out of the position
comparison).

Token character offsets: the response text is tokenised alone with `return_offsets_mapping=True`;
if its ids equal the completion ids without the end-of-turn tokens (or, for a truncated completion, start with
them), those offsets are used; otherwise (prompt and response merged at the boundary, or a
tokenizer without offsets) offsets come from cumulative decoding of the completion ids.

The weights are raw: the TAB-PO loss renormalises them to mean 1 over each completion.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from posttrain.errors import DataError

CODE_FIELDS = frozenset({"Code", "code", "event_type"})
SUBCODE_FIELDS = frozenset({"Sub-code", "Subcode", "subcode", "sub_code", "role"})
SPAN_FIELDS = frozenset({"Span", "span", "text"})
ROLE_MAP_FIELDS = frozenset({"arguments"})  # objects mapping a role label (subcode) to its span text (span)

USER_SPAN_FIELDS = ("weight_spans_chosen", "weight_spans_rejected")


@dataclass(frozen=True)
class TokenWeightConfig:
    code_weight: float = 1.1
    subcode_weight: float = 1.2
    span_weight: float = 1.1
    diff_weight: float = 1.2
    diff_alignment: str = "position"  # "position" | "lcs"
    value_weights: bool = True
    use_data_spans: bool = True

    def class_weight(self, kind: str) -> float:
        return {"code": self.code_weight, "subcode": self.subcode_weight, "span": self.span_weight}[kind]


# --------------------------------------------------------------------------------------------
# JSON strings with their character positions


@dataclass(frozen=True)
class JsonString:
    """One JSON string of a text: its content's character range [start, end) (quotes excluded),
    whether it is an object key, the key it belongs to (for a key: itself; for a value: the key of
    the member holding it, inherited through arrays) and the key of the object that contains it."""

    start: int
    end: int
    is_key: bool
    key: Optional[str]
    container_key: Optional[str]


class _Stop(Exception):
    pass


class _Scanner:
    """A small JSON reader that records every string's position. It stops at the first syntax
    error, keeping what it has read (a truncated response still gets weights for its first part)."""

    _NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
    _WS = re.compile(r"[ \t\n\r]*")

    def __init__(self, text: str):
        self.text, self.i, self.out = text, 0, []

    def ws(self):
        self.i = self._WS.match(self.text, self.i).end()

    def string(self) -> tuple[int, int, str]:
        t, i = self.text, self.i
        if i >= len(t) or t[i] != '"':
            raise _Stop
        j = i + 1
        while j < len(t):
            if t[j] == "\\":
                j += 2
                continue
            if t[j] == '"':
                break
            j += 1
        if j >= len(t):
            raise _Stop
        self.i = j + 1
        raw = t[i + 1:j]
        try:
            value = json.loads(t[i:j + 1])
        except ValueError:
            value = raw
        return i + 1, j, value

    def value(self, key: Optional[str], container_key: Optional[str]):
        self.ws()
        t = self.text
        if self.i >= len(t):
            raise _Stop
        c = t[self.i]
        if c == "{":
            self.i += 1
            self.ws()
            if self.i < len(t) and t[self.i] == "}":
                self.i += 1
                return
            while True:
                self.ws()
                start, end, name = self.string()
                self.out.append(JsonString(start, end, True, name, key))
                self.ws()
                if self.i >= len(t) or t[self.i] != ":":
                    raise _Stop
                self.i += 1
                self.value(name, key)
                self.ws()
                if self.i < len(t) and t[self.i] == ",":
                    self.i += 1
                    continue
                if self.i < len(t) and t[self.i] == "}":
                    self.i += 1
                    return
                raise _Stop
        if c == "[":
            self.i += 1
            self.ws()
            if self.i < len(t) and t[self.i] == "]":
                self.i += 1
                return
            while True:
                self.value(key, container_key)
                self.ws()
                if self.i < len(t) and t[self.i] == ",":
                    self.i += 1
                    continue
                if self.i < len(t) and t[self.i] == "]":
                    self.i += 1
                    return
                raise _Stop
        if c == '"':
            start, end, _ = self.string()
            self.out.append(JsonString(start, end, False, key, container_key))
            return
        for literal in ("true", "false", "null"):
            if t.startswith(literal, self.i):
                self.i += len(literal)
                return
        m = self._NUMBER.match(t, self.i)
        if not m or m.end() == self.i:
            raise _Stop
        self.i = m.end()


def json_strings(text: str) -> list[JsonString]:
    """Every string of the JSON value at the start of `text` (after whitespace), with positions;
    reading stops at the first syntax error."""
    scanner = _Scanner(text)
    try:
        scanner.value(None, None)
    except _Stop:
        pass
    return scanner.out


def classify(item: JsonString) -> Optional[str]:
    """"code", "subcode", "span" or None (see the module docstring's table)."""
    if item.is_key:
        return "subcode" if item.container_key in ROLE_MAP_FIELDS else None
    if item.key in CODE_FIELDS:
        return "code"
    if item.key in SUBCODE_FIELDS:
        return "subcode"
    if item.key in SPAN_FIELDS:
        return "span"
    if item.container_key in ROLE_MAP_FIELDS:
        return "span"
    return None


def value_char_weights(text: str, config: TokenWeightConfig) -> list[tuple[int, int, float]]:
    """[(start, end, weight)] for the classified strings of a JSON response."""
    spans = []
    for item in json_strings(text):
        kind = classify(item)
        if kind is not None and item.end > item.start:
            spans.append((item.start, item.end, config.class_weight(kind)))
    return spans


# --------------------------------------------------------------------------------------------
# Token character offsets


def end_of_turn_tokens(tokenizer, completion_ids: Sequence[int], tail: Optional[int]) -> int:
    """`tail` if given, else 1 if the completion ends with the tokenizer's EOS, else 0."""
    if tail is not None:
        return tail
    return int(bool(completion_ids) and completion_ids[-1] == tokenizer.eos_token_id)


def token_offsets(tokenizer, text: str, completion_ids: Sequence[int], tail: Optional[int] = None,
                  ) -> list[Optional[tuple[int, int]]]:
    """Character range in `text` of each completion token; None for the `tail` end-of-turn tokens."""
    tail = end_of_turn_tokens(tokenizer, completion_ids, tail)
    body = list(completion_ids[:len(completion_ids) - tail])
    tail_offsets = [None] * (len(completion_ids) - len(body))
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # slow tokenizers have no offsets
        ids, offsets = None, None
    if ids is not None and ids[:len(body)] == body and (len(ids) == len(body) or not tail_offsets):
        return offsets[:len(body)] + tail_offsets
    # Fallback: cumulative decoding (each token covers the characters its decoding adds).
    result: list[Optional[tuple[int, int]]] = []
    previous = 0
    for k in range(len(body)):
        current = min(len(tokenizer.decode(body[:k + 1], skip_special_tokens=False)), len(text))
        result.append((min(previous, current), current))
        previous = current
    return result + tail_offsets


# --------------------------------------------------------------------------------------------
# Difference weights


def lcs_membership(a: Sequence[int], b: Sequence[int]) -> tuple[list[bool], list[bool]]:
    """Which items of `a` and of `b` belong to one longest common subsequence (deterministic:
    common prefix and suffix first, then dynamic programming on the middle)."""
    n, m = len(a), len(b)
    in_a, in_b = [False] * n, [False] * m
    p = 0
    while p < n and p < m and a[p] == b[p]:
        in_a[p] = in_b[p] = True
        p += 1
    s = 0
    while s < n - p and s < m - p and a[n - 1 - s] == b[m - 1 - s]:
        in_a[n - 1 - s] = in_b[m - 1 - s] = True
        s += 1
    mid_a, mid_b = a[p:n - s], b[p:m - s]
    if mid_a and mid_b:
        rows, cols = len(mid_a), len(mid_b)
        table = [[0] * (cols + 1) for _ in range(rows + 1)]
        for i in range(rows - 1, -1, -1):  # table[i][j] = LCS length of mid_a[i:], mid_b[j:]
            row, below, x = table[i], table[i + 1], mid_a[i]
            for j in range(cols - 1, -1, -1):
                row[j] = below[j + 1] + 1 if x == mid_b[j] else max(below[j], row[j + 1])
        i = j = 0
        while i < rows and j < cols:
            if mid_a[i] == mid_b[j]:
                in_a[p + i] = in_b[p + j] = True
                i += 1
                j += 1
            elif table[i + 1][j] >= table[i][j + 1]:
                i += 1
            else:
                j += 1
    return in_a, in_b


def diff_multipliers(chosen: Sequence[int], rejected: Sequence[int], diff_weight: float,
                     alignment: str = "position") -> tuple[list[float], list[float]]:
    """Per-token multipliers (1 or diff_weight) of two token-id lists (end-of-turn tokens already removed)."""
    mc, mr = [1.0] * len(chosen), [1.0] * len(rejected)
    if diff_weight == 1.0:
        return mc, mr
    if alignment == "position":
        for k in range(min(len(chosen), len(rejected))):
            if chosen[k] != rejected[k]:
                mc[k] = mr[k] = diff_weight
    elif alignment == "lcs":
        in_c, in_r = lcs_membership(chosen, rejected)
        mc = [1.0 if keep else diff_weight for keep in in_c]
        mr = [1.0 if keep else diff_weight for keep in in_r]
    else:
        raise ValueError(f"diff_alignment must be 'position' or 'lcs', got {alignment!r}")
    return mc, mr


# --------------------------------------------------------------------------------------------
# Putting it together


def check_user_spans(spans, where: str) -> list[tuple[int, int, float]]:
    if spans is None:
        return []
    if not isinstance(spans, list):
        raise DataError(f"{where}: expected a list of [char_start, char_end, weight], got {spans!r}.")
    out = []
    for item in spans:
        ok = isinstance(item, (list, tuple)) and len(item) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in item)
        if not ok or item[0] < 0 or item[1] < item[0] or item[2] < 0:
            raise DataError(f"{where}: each weight span must be [char_start, char_end, weight] with "
                            f"0 <= char_start <= char_end and weight >= 0, got {item!r}.")
        out.append((int(item[0]), int(item[1]), float(item[2])))
    return out


def _overlaps(offset: Optional[tuple[int, int]], start: int, end: int) -> bool:
    return offset is not None and offset[1] > offset[0] and offset[0] < end and start < offset[1]


def completion_weights(tokenizer, completion_ids: Sequence[int], text: str, config: TokenWeightConfig,
                       user_spans: Sequence[tuple[int, int, float]] = (), tail: Optional[int] = None) -> list[float]:
    """Value and user-span weights of one completion (steps 1 to 3), before difference weights."""
    offsets = token_offsets(tokenizer, text, completion_ids, tail)
    weights = [1.0] * len(completion_ids)
    char_spans = value_char_weights(text, config) if config.value_weights else []
    for k, offset in enumerate(offsets):
        if offset is None:
            continue
        for start, end, w in char_spans:
            if _overlaps(offset, start, end):
                weights[k] = max(weights[k], w)
        user = [w for start, end, w in user_spans if _overlaps(offset, start, end)]
        if user:
            weights[k] = max(user)
    return weights


def pair_token_weights(tokenizer, chosen_ids: Sequence[int], rejected_ids: Sequence[int], chosen_text: str,
                       rejected_text: str, config: TokenWeightConfig, chosen_spans=(), rejected_spans=(),
                       chosen_tail: Optional[int] = None, rejected_tail: Optional[int] = None,
                       ) -> tuple[list[float], list[float]]:
    """Raw weights (one per completion token, end-of-turn tokens included) of both completions of a pair."""
    wc = completion_weights(tokenizer, chosen_ids, chosen_text, config, chosen_spans, chosen_tail)
    wr = completion_weights(tokenizer, rejected_ids, rejected_text, config, rejected_spans, rejected_tail)
    body_c = list(chosen_ids[:len(chosen_ids) - end_of_turn_tokens(tokenizer, chosen_ids, chosen_tail)])
    body_r = list(rejected_ids[:len(rejected_ids) - end_of_turn_tokens(tokenizer, rejected_ids, rejected_tail)])
    mc, mr = diff_multipliers(body_c, body_r, config.diff_weight, config.diff_alignment)
    for k, factor in enumerate(mc):
        wc[k] *= factor
    for k, factor in enumerate(mr):
        wr[k] *= factor
    return wc, wr


def weight_pairs(pairs: list, tokenizer, config: TokenWeightConfig) -> list:
    """Set `chosen_weights` / `rejected_weights` on tokenised pairs (new objects; the input is not changed)."""
    import dataclasses

    out = []
    for pair in pairs:
        spans_c = spans_r = ()
        if config.use_data_spans:
            where = f"{pair.source}, row {pair.row}"
            spans_c = check_user_spans(pair.extras.get(USER_SPAN_FIELDS[0]), f"{where}, field {USER_SPAN_FIELDS[0]!r}")
            spans_r = check_user_spans(pair.extras.get(USER_SPAN_FIELDS[1]), f"{where}, field {USER_SPAN_FIELDS[1]!r}")
        wc, wr = pair_token_weights(tokenizer, pair.chosen_ids, pair.rejected_ids, pair.chosen_text,
                                    pair.rejected_text, config, spans_c, spans_r, pair.chosen_tail, pair.rejected_tail)
        out.append(dataclasses.replace(pair, chosen_weights=wc, rejected_weights=wr))
    return out
