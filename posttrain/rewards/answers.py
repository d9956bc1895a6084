"""Final-answer extraction from a completion, and numeric comparison of answers.

`extract_answer(text)` tries, in this order:
1. GSM8K's marker: after the last "####", the number that starts the rest of the line (an optional "$"
   before it; "#### 1,000 apples" -> "1,000"), else the rest of that line, stripped, if not empty;
2. the content of the last `\\boxed{...}` whose braces balance (nested braces are kept:
   "\\boxed{\\frac{1}{2}}" -> "\\frac{1}{2}"; `\\fbox{...}` counts too);
3. the last number in the text ("-3", "1,000", "2.5", ".5").
It returns None when none of them finds anything.

`parse_number(text)` reads an answer as a plain number after removing "$", "\\$", "%", "\\%", thousands
commas, spaces, LaTeX thin spaces "\\," / "\\!" and a trailing "." ("$1,000." -> 1000.0, "50%" -> 50.0);
anything else (a fraction, LaTeX, words) is not a number. `numbers_equal` compares with a relative
tolerance of 1e-6: |a - b| <= 1e-6 * max(|a|, |b|).
"""

from __future__ import annotations

import re
from typing import Optional

GSM8K_MARK = "####"
RELATIVE_TOLERANCE = 1e-6
NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER_AT_START = re.compile(rf"\$?\s*({NUMBER})(?![\d/^])")
_LAST_NUMBER = re.compile(rf"(?<![\w.])(?:{NUMBER})")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NOT_NUMBER_PARTS = ("\\$", "$", "\\%", "%", "\\,", "\\!", ",", " ")


def _after_marker(text: str) -> Optional[str]:
    rest = text.rsplit(GSM8K_MARK, 1)[1].split("\n", 1)[0].strip()
    number = _NUMBER_AT_START.match(rest)
    if number:
        return number.group(1)
    return rest or None


def last_boxed(text: str) -> Optional[str]:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces, or None."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a completion (rules in the module docstring), or None."""
    if GSM8K_MARK in text:
        answer = _after_marker(text)
        if answer:
            return answer
    boxed = last_boxed(text)
    if boxed:
        return boxed
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def parse_number(text: str) -> Optional[float]:
    s = text.strip().replace("\u2212", "-")  # a typographic minus sign
    for part in _NOT_NUMBER_PARTS:
        s = s.replace(part, "")
    s = s.rstrip(".")
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    return float(s)


def numbers_equal(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= RELATIVE_TOLERANCE * max(abs(a), abs(b))
