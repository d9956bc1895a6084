r"""`format`: does the completion show its final answer in the expected form?

`re.search(pattern, completion)` (or `re.fullmatch` with `fullmatch: true`) with Python's `re` syntax and no
flags. The default pattern accepts a \boxed{...} answer or a GSM8K "#### answer" line:
`\\boxed\{.+\}|####\s*\S+`. Score = `match_score` (default 1.0) on a match, else `miss_score` (0.0).

Components: `match` (0 or 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from posttrain.rewards.base import RewardFunction, RewardResult
from posttrain.examples import PromptExample
from posttrain.rewards.registry import register_reward


@register_reward("format")
class FormatReward(RewardFunction):
    components: ClassVar[tuple[str, ...]] = ("match",)

    @dataclass
    class Params:
        pattern: str = r"\\boxed\{.+\}|####\s*\S+"
        fullmatch: bool = False
        match_score: float = 1.0
        miss_score: float = 0.0

        def validate(self) -> None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {exc}") from None

    def __init__(self, params=None):
        super().__init__(params)
        self.regex = re.compile(self.params.pattern)

    def __call__(self, completion: str, example: PromptExample) -> RewardResult:
        found = self.regex.fullmatch(completion) if self.params.fullmatch else self.regex.search(completion)
        matched = float(found is not None)
        return RewardResult(self.params.match_score if found else self.params.miss_score, None, {"match": matched})
