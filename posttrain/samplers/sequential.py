"""Sequential sampling: the dataset in file order, wrapping around at the end.

For curricula written into the file's order, and for runs that must see exactly the prompts another
framework sees (TRL with `shuffle_dataset=False`; benchmarks/grpo_vs_trl.py). A batch that wraps
takes the last items and then the first ones.
"""

from __future__ import annotations

from posttrain.samplers.base import SAMPLERS, PromptSampler


@SAMPLERS.register("sequential")
class SequentialSampler(PromptSampler):

    def __init__(self, num_items: int, seed: int = 0):
        super().__init__(num_items, seed)
        self.position = 0

    def select(self, batch_size: int) -> list[int]:
        self._check_batch_size(batch_size)
        batch = [(self.position + k) % self.num_items for k in range(batch_size)]
        self.position = (self.position + batch_size) % self.num_items
        return batch

    def state_dict(self) -> dict:
        return {**super().state_dict(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.position = int(state["position"])
