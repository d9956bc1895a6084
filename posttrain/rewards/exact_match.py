"""`exact_match`: the answer equals the ground truth string exactly (the built-in arithmetic task).

With `extract: true` (the default) the answer is `extract_answer(completion)` ("####", else the last
\\boxed{}, else the last number; see posttrain.rewards.answers); with `extract: false` it is the whole
completion, stripped. It is correct when it equals the example's answer (stripped) character for
character: no numeric or LaTeX equivalence (use `math` for that).

Components: `correct` (0 or 1). Score = correct. Answer = the answer compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from posttrain.rewards.answers import extract_answer
from posttrain.rewards.base import RewardFunction, RewardResult
from posttrain.examples import PromptExample
from posttrain.rewards.math_answer import ground_truth
from posttrain.rewards.registry import register_reward


@register_reward("exact_match")
class ExactMatchReward(RewardFunction):
    components: ClassVar[tuple[str, ...]] = ("correct",)
    needs_answer: ClassVar[bool] = True

    @dataclass
    class Params:
        extract: bool = True

    def __call__(self, completion: str, example: PromptExample) -> RewardResult:
        gold = ground_truth(example, self.name)
        answer = extract_answer(completion) if self.params.extract else completion.strip()
        correct = float(answer == gold)
        return RewardResult(correct, answer, {"correct": correct})
