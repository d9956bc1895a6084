"""One-step off-policy rollouts (rollout.max_staleness 1): the weights of the version that sampled, and the
batch started one step early (posttrain.steps.groups)."""

from __future__ import annotations

import concurrent.futures
import contextlib
from dataclasses import dataclass

import torch


class WeightSnapshot:
    """The trainable parameters' values at one policy version (LoRA: the adapter; else the whole model), so that
    pi_old of the completions that version sampled can be computed after the policy has moved on."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.values = [p.detach().clone() for p in self.params]

    @contextlib.contextmanager
    def swapped_in(self):
        with torch.no_grad():
            current = [p.detach().clone() for p in self.params]
            for p, value in zip(self.params, self.values):
                p.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, current):
                    p.copy_(value)


@dataclass
class NextBatch:
    """A rollout batch started one step early: its prompts, the policy version sampling it, that version's
    weights and the future of this process's scored records."""

    indices: list[int]
    version: int
    snapshot: WeightSnapshot
    future: concurrent.futures.Future
