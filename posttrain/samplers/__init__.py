"""Prompt samplers for online RL: which dataset indices the next rollout batch uses.

Interface (`PromptSampler`): `select(batch_size) -> list[int]`, `update(indices, successes, group_size)`,
`state_dict()` / `load_state_dict()` (JSON-serialisable, RNG state included).
"""

import dataclasses
from pathlib import Path
from typing import Iterable

from posttrain.samplers.base import SAMPLERS, PromptSampler
from posttrain.samplers.sequential import SequentialSampler
from posttrain.samplers.uniform import UniformSampler
from posttrain.samplers.vade import VADESampler, information_gain, top_b


def build_sampler(name: str, num_items: int, seed: int = 0, search_dirs: Iterable[Path] = (),
                  **params) -> PromptSampler:
    """A sampler by name (`uniform`, `sequential`, `vade`, or `module:Class`), its params checked as a recipe's
    `sampler.params` are (unknown keys, types, ranges: a RecipeError)."""
    cls = SAMPLERS.get(name, search_dirs)
    checked = SAMPLERS.params(cls, params, f"sampler.params ({name})")
    return cls(num_items, seed=seed, **(dataclasses.asdict(checked) if checked is not None else {}))


__all__ = ["PromptSampler", "SAMPLERS", "SequentialSampler", "UniformSampler", "VADESampler", "build_sampler", "information_gain", "top_b"]
