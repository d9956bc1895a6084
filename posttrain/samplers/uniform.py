"""Uniform sampling without replacement: a seeded permutation of the dataset per epoch.

A batch that straddles two epochs takes the rest of the old epoch and then items of the new
permutation that are not already in the batch (those it skips come first in the new epoch), so a
batch never holds an index twice.

`zero_variance_filter: True` is a simple sampler-side form of DAPO's dynamic sampling: an index whose
latest group was all-correct or all-wrong (zero reward variance, so zero GRPO advantage) sits out
the next epoch once, then returns to the pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from posttrain.samplers.base import SAMPLERS, PromptSampler


@SAMPLERS.register("uniform")
class UniformSampler(PromptSampler):
    @dataclass
    class Params:
        zero_variance_filter: bool = False

    def __init__(self, num_items: int, seed: int = 0, zero_variance_filter: bool = False):
        super().__init__(num_items, seed)
        self.zero_variance_filter = bool(zero_variance_filter)
        self.epoch = 0
        self.remaining: list[int] = self._permutation(set())
        self.flagged: set[int] = set()

    def _permutation(self, exclude: set[int]) -> list[int]:
        return [int(i) for i in self.rng.permutation(self.num_items) if int(i) not in exclude]

    def _new_epoch(self, chosen: set[int], needed: int) -> None:
        self.epoch += 1
        sit_out = self.flagged if self.zero_variance_filter else set()
        if self.num_items - len(sit_out | chosen) < needed:
            sit_out = set()  # too few items left to fill the batch: ignore the filter this epoch
        self.flagged = set()
        self.remaining = self._permutation(sit_out)

    def select(self, batch_size: int) -> list[int]:
        self._check_batch_size(batch_size)
        batch: list[int] = []
        chosen: set[int] = set()
        while len(batch) < batch_size:
            if not self.remaining:
                self._new_epoch(chosen, batch_size - len(batch))
            kept = []
            for i in self.remaining:
                if len(batch) < batch_size and i not in chosen:
                    batch.append(i)
                    chosen.add(i)
                else:
                    kept.append(i)
            self.remaining = kept  # new-epoch items already in this batch keep their place in the epoch
        return batch

    def update(self, indices: Sequence[int], successes: Sequence[float], group_size: int) -> None:
        idx, succ = self._check_update(indices, successes, group_size)
        for i, s in zip(idx.tolist(), succ.tolist()):
            if s == 0 or s == group_size:
                self.flagged.add(i)
            else:
                self.flagged.discard(i)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "epoch": self.epoch, "remaining": list(self.remaining),
                "flagged": sorted(self.flagged), "zero_variance_filter": self.zero_variance_filter}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.epoch = int(state["epoch"])
        self.remaining = [int(i) for i in state["remaining"]]
        self.flagged = {int(i) for i in state["flagged"]}
        self.zero_variance_filter = bool(state["zero_variance_filter"])
