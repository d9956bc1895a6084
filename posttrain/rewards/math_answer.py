"""`math`: is the completion's final answer the ground truth? (GSM8K, MATH-500, DeepScaleR.)

The answer is extracted by `posttrain.rewards.answers.extract_answer` ("####", else the last \\boxed{},
else the last number). It is correct when, in this order:
1. both it and the ground truth read as plain numbers (`parse_number`): they are equal within a relative
   tolerance of 1e-6 (this decides: no further check);
2. they are the same string once spaces, "$", "\\left", "\\right", "\\!" are removed and \\dfrac / \\tfrac
   read as \\frac;
3. math-verify (Kydlicek et al., huggingface/Math-Verify) finds them equal: `verify(parse("$gold$"),
   parse("$answer$"))`, so "\\frac{1}{2}" equals "0.5" and "\\sqrt{2}/2" equals "\\frac{\\sqrt2}{2}".
math-verify's own timeouts use signal.alarm, which works only in a process's main thread; they are off
(`parsing_timeout=None`, `timeout_seconds=None`) and the reward pool's wall-clock limit bounds each call.

Components: `correct` (0 or 1). Score = correct. Answer = the extracted answer.
"""

from __future__ import annotations

import logging
import re
from typing import ClassVar

from posttrain.rewards.answers import extract_answer, numbers_equal, parse_number
from posttrain.rewards.base import RewardError, RewardFunction, RewardResult
from posttrain.examples import PromptExample
from posttrain.rewards.registry import register_reward

_LATEX_NOISE = re.compile(r"\s+|\$|\\left|\\right|\\!")


def _normalise_latex(text: str) -> str:
    return _LATEX_NOISE.sub("", text).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def ground_truth(example: PromptExample, reward: str) -> str:
    if example.answer is None or not example.answer.strip():
        raise RewardError(f"reward {reward!r} compares with the example's answer, but {example.where} has none. "
                          f"Use a prompt format with answers (docs/rewards.md) or another reward.")
    return example.answer.strip()


class MathVerifier:
    """math-verify's parse + verify without its signal-based timeouts (see the module docstring)."""

    def __init__(self):
        try:
            import math_verify
        except ImportError:
            raise RewardError("the math reward needs the math-verify package: pip install 'posttrain[rl]' "
                              "(or pip install math-verify).") from None
        # It warns once per process that its timeouts are off; the pool's limit replaces them.
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self._parse, self._verify = math_verify.parse, math_verify.verify
        self.equal("1", "1")  # warm-up: the first parse builds the LaTeX grammar (~0.1 s), outside any call's limit

    def equal(self, gold: str, answer: str) -> bool:
        gold_parsed = self._parse(f"${gold}$", parsing_timeout=None)
        answer_parsed = self._parse(f"${answer}$", parsing_timeout=None)
        if not gold_parsed or not answer_parsed:
            return False
        return bool(self._verify(gold_parsed, answer_parsed, timeout_seconds=None))


def answers_match(answer: str, gold: str, verifier: MathVerifier) -> bool:
    """Rules 1-3 of the module docstring."""
    answer_number, gold_number = parse_number(answer), parse_number(gold)
    if answer_number is not None and gold_number is not None:
        return numbers_equal(answer_number, gold_number)
    if _normalise_latex(answer) == _normalise_latex(gold):
        return True
    return verifier.equal(gold, answer)


@register_reward("math")
class MathReward(RewardFunction):
    components: ClassVar[tuple[str, ...]] = ("correct",)
    needs_answer: ClassVar[bool] = True

    def __init__(self, params=None):
        super().__init__(params)
        self.verifier = MathVerifier()

    def __call__(self, completion: str, example: PromptExample) -> RewardResult:
        gold = ground_truth(example, self.name)
        answer = extract_answer(completion)
        correct = float(answer is not None and answers_match(answer, gold, self.verifier))
        return RewardResult(correct, answer, {"correct": correct})
