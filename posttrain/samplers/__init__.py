"""Prompt samplers for online RL: which dataset indices the next rollout batch uses.

Interface (`PromptSampler`): `select(batch_size) -> list[int]`, `update(indices, successes, group_size)`,
`state_dict()` / `load_state_dict()` (JSON-serialisable, RNG state included).
"""

from posttrain.samplers.base import PromptSampler
from posttrain.samplers.sequential import SequentialSampler
from posttrain.samplers.uniform import UniformSampler
from posttrain.samplers.vade import VADESampler, information_gain, top_b

SAMPLERS: dict[str, type[PromptSampler]] = {"uniform": UniformSampler, "sequential": SequentialSampler,
                                             "vade": VADESampler}


def build_sampler(name: str, num_items: int, seed: int = 0, **params) -> PromptSampler:
    """A sampler by name (`uniform`, `sequential`, `vade`) with its keyword parameters."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name](num_items, seed=seed, **params)


__all__ = ["PromptSampler", "SAMPLERS", "SequentialSampler", "UniformSampler", "VADESampler", "build_sampler", "information_gain", "top_b"]
