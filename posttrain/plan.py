"""Planning an optimiser step: which examples it trains on, and how they are split over processes and
micro-batches. Pure functions of counts and indices: no torch, no process group, the same on every process."""

from __future__ import annotations

import math
from typing import Optional, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


class StepPlan:
    """Which examples each optimiser step trains on: a seeded permutation per epoch, cut into global
    batches (the last batch of an epoch may be short). Every process computes the same plan, so the
    data position of a checkpoint is just its step number."""

    def __init__(self, num_items: int, batch_size: int, epochs: int, seed: int, shuffle: bool,
                 max_steps: Optional[int] = None):
        self.num_items, self.batch_size, self.seed, self.shuffle = num_items, batch_size, seed, shuffle
        self.steps_per_epoch = math.ceil(num_items / batch_size)
        self.total_steps = max_steps if max_steps is not None else self.steps_per_epoch * epochs

    def visits(self) -> int:
        """How many examples the whole plan trains on, counting each epoch's visit."""
        epochs, steps = divmod(self.total_steps, self.steps_per_epoch)
        return epochs * self.num_items + min(steps * self.batch_size, self.num_items)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = np.arange(self.num_items)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        return order[k * self.batch_size:(k + 1) * self.batch_size].tolist()


def round_robin(items: Sequence[T], rank: int, world: int, length: Optional[int] = None,
                filler=None) -> list:
    """Process `rank`'s share of `items` (items rank, rank + world, ...), padded with `filler` to `length`
    (default: the largest share, ceil(len / world)), so every process runs the same number of passes."""
    mine = list(items[rank::world])
    length = math.ceil(len(items) / world) if length is None else length
    return mine + [filler] * (length - len(mine))


def micro_batches_per_step(batch_size: int, world: int, micro_batch_size: int) -> int:
    return math.ceil(math.ceil(batch_size / world) / micro_batch_size)


def shard_for_rank(indices: list[int], rank: int, world: int, micro_batch_size: int,
                   micro_batches: int = 0) -> list[list[Optional[int]]]:
    """This process's micro-batches of one step. Every process gets the same number of micro-batches
    and rows; `None` rows (only in a short last step) are zero-weight fillers. With `micro_batches`,
    a short step is padded with one-row filler micro-batches to that many: accelerate (and DeepSpeed
    through it) counts micro-batches to decide when to update, so every step must have the same."""
    mine = round_robin(indices, rank, world) if indices else []
    shards = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    return shards + [[None]] * (micro_batches - len(shards))


def split_groups(groups: list[int], world: int, rank: int, per_micro: int, n_micro: int) -> list[list[Optional[int]]]:
    """This process's micro-batches of groups: groups k, k+world, ... for rank k, then `None` fillers so every
    process runs exactly `n_micro` micro-batches of `per_micro` groups (collectives stay in step)."""
    mine = round_robin(groups, rank, world, n_micro * per_micro)
    return [mine[i:i + per_micro] for i in range(0, len(mine), per_micro)]
