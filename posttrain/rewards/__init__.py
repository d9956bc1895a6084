"""Verifiers and reward functions for online RL, and their combination (docs/rewards.md).

Importing this package registers the built-in rewards: math, exact_match, json, format. It imports neither
torch nor the trainer nor the losses: reward worker processes import only this package.
"""

from posttrain.rewards.base import FunctionReward, RewardError, RewardFunction, RewardResult, to_reward_result
from posttrain.examples import PromptExample
from posttrain.rewards.registry import (REWARDS, RewardTerm, build_reward_function, get_reward, register_reward,
                                        validate_reward_terms)
from posttrain.rewards.reward_set import RewardSet, build_reward_set
from posttrain.rewards import exact_match, json_reward, math_answer, regex_format  # noqa: F401  (registration)

__all__ = ["REWARDS", "FunctionReward", "PromptExample", "RewardError", "RewardFunction", "RewardResult",
           "RewardSet", "RewardTerm", "build_reward_function", "build_reward_set", "get_reward", "register_reward",
           "to_reward_result", "validate_reward_terms"]
