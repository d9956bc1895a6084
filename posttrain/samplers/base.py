"""The prompt-sampler interface of online RL: which dataset indices to roll out next.

    select(batch_size) -> list[int]                  distinct dataset indices for the next rollout batch
    update(indices, successes, group_size) -> None   feedback: successes[i] = correct completions (0..G)
                                                     of the group sampled for indices[i]
    state_dict() / load_state_dict(state)            plain lists / ints / floats (JSON-serialisable),
                                                     RNG state included, so a resumed run continues identically
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from posttrain.registry import Registry


class PromptSampler:
    """Base class. `num_items` is the dataset size; `seed` seeds the sampler's own numpy Generator. The
    constructor takes the fields of `Params` (the recipe's `sampler.params`) as keyword arguments."""

    name = ""

    @dataclass
    class Params:
        pass

    def __init__(self, num_items: int, seed: int = 0):
        if num_items < 1:
            raise ValueError(f"a sampler needs at least one item, got num_items={num_items}")
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)

    def select(self, batch_size: int) -> list[int]:
        """The dataset indices of the next `batch_size` prompts (distinct)."""
        raise NotImplementedError  # abstractmethod: every sampler defines it

    def update(self, indices: Sequence[int], successes: Sequence[float], group_size: int) -> None:
        """Default: no state to update."""
        self._check_update(indices, successes, group_size)

    # -- helpers -------------------------------------------------------------------------------------
    def _check_batch_size(self, batch_size: int) -> None:
        if not 1 <= batch_size <= self.num_items:
            raise ValueError(f"batch_size must be in [1, {self.num_items}] (distinct items), got {batch_size}")

    def _check_update(self, indices, successes, group_size) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        succ = np.asarray(successes, dtype=np.float64).reshape(-1)
        if idx.shape != succ.shape:
            raise ValueError(f"indices and successes must have the same length, got {idx.size} and {succ.size}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_items):
            raise ValueError(f"indices must be in [0, {self.num_items}), got {idx.tolist()}")
        if np.unique(idx).size != idx.size:
            raise ValueError(f"indices must be distinct, got {idx.tolist()}")
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {group_size}")
        if succ.size and (succ.min() < 0 or succ.max() > group_size):
            raise ValueError(f"successes count correct completions and must be in [0, group_size={group_size}], "
                             f"got {succ.tolist()}")
        return idx, succ

    def _rng_state(self) -> dict:
        return self.rng.bit_generator.state  # a dict of str / int: JSON-serialisable

    def _set_rng_state(self, state: dict) -> None:
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state

    def state_dict(self) -> dict:
        return {"name": self.name, "num_items": self.num_items, "seed": self.seed, "rng": self._rng_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_items") != self.num_items:
            raise ValueError(f"sampler state is for {state.get('num_items')} items, this dataset has {self.num_items}")
        self.seed = int(state["seed"])
        self._set_rng_state(state["rng"])


SAMPLERS = Registry("sampler", PromptSampler, "or give your own as 'module.path:SamplerClass'")
