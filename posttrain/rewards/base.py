"""The reward contract: a reward function scores one completion of one prompt example.

`RewardFunction(params)(completion, example) -> RewardResult`. `score` is what training uses; `answer` is the
final answer the reward extracted (COPO's answer entropy reads it; None when there is none); `components`
are named parts of the score, logged as `<term>/<component>`.

A user's reward may also be a plain function `fn(completion, example, **params)` returning a float, a
RewardResult, or a dict of floats (the components; the score is the dict's "score" entry, else the sum of
its entries). `to_reward_result` turns any of these into a RewardResult or says what is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

from posttrain.errors import PosttrainError
from posttrain.params import WithParams
from posttrain.examples import PromptExample


class RewardError(PosttrainError):
    """A reward cannot score a completion: its message names the reward, the example's file and row."""


@dataclass
class RewardResult:
    score: float
    answer: Optional[str] = None
    components: dict[str, float] = field(default_factory=dict)


class RewardFunction(WithParams):
    """Base class of every reward. Subclass it, give `Params` (a dataclass of options with defaults),
    `components` (the names every call reports, for logging) and `__call__`; register it with
    `@register_reward("name")` or reference it from a recipe as `my_module:MyReward`."""

    name: ClassVar[str] = ""
    components: ClassVar[tuple[str, ...]] = ()
    needs_answer: ClassVar[bool] = False  # every example must have an answer (checked when the data loads)

    def __call__(self, completion: str, example: PromptExample) -> RewardResult:
        raise NotImplementedError  # abstractmethod: every reward defines it


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)):
        raise RewardError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise RewardError(f"{what} must be finite, got {value!r}")
    return float(value)


def to_reward_result(value: Any, who: str) -> RewardResult:
    """A reward function's return value as a RewardResult; `who` names the function in errors."""
    if isinstance(value, RewardResult):
        if value.answer is not None and not isinstance(value.answer, str):
            raise RewardError(f"{who}: RewardResult.answer must be a string or None, got {value.answer!r}")
        components = {str(k): _number(v, f"{who}: component {k!r}") for k, v in value.components.items()}
        return RewardResult(_number(value.score, f"{who}: the score"), value.answer, components)
    if isinstance(value, dict):
        components = {str(k): _number(v, f"{who}: entry {k!r} of the returned dict") for k, v in value.items()}
        score = components.pop("score") if "score" in components else sum(components.values())
        return RewardResult(score, None, components)
    if isinstance(value, (bool, int, float)):
        return RewardResult(_number(value, f"{who}: the returned score"))
    raise RewardError(f"{who} returned {type(value).__name__} {value!r:.80}; a reward returns a float, a "
                      f"posttrain.rewards.RewardResult, or a dict of floats (its components).")


class FunctionReward(RewardFunction):
    """A user's plain function as a RewardFunction; the term's params are passed as keyword arguments."""

    def __init__(self, fn: Callable[..., Any], reference: str, kwargs: dict):
        super().__init__()
        self.fn, self.reference, self.kwargs = fn, reference, kwargs

    def __call__(self, completion: str, example: PromptExample) -> RewardResult:
        return to_reward_result(self.fn(completion, example, **self.kwargs), f"reward {self.reference!r}")
